"""Training: the one fine-tuning loop, its schedule, and pretraining of the built-in world model."""
