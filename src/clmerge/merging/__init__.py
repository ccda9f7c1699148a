"""Merging: pure per-tensor merge methods (registry) and the engine that folds them over the store."""
