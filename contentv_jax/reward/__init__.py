"""Reward fine-tuning in JAX: the CLIP scorer, the mesh, the planner, the run and its steps."""
