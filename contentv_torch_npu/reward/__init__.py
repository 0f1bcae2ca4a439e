"""Reward fine-tuning in the torch twin: the CLIP scorer, the run and its steps."""
