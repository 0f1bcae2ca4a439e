"""Reward fine-tuning, framework-free: reward models, the CLIP scorer's table, GRPO's SDE, the run's shared parts."""
