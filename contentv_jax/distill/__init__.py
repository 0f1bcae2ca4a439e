"""Distillation (DMD2) in JAX: the loss terms and the update."""
