"""Evaluation outside the trainer: features of any image source, the sharded kNN, and a trained
model rebuilt from a run directory."""
