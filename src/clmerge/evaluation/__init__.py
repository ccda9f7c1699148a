"""Evaluation: correct-prediction counts per task (both protocols) and metrics over the matrix."""
