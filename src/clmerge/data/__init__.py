"""Datasets: the registry of known datasets, the built-in world, prompt templates."""
