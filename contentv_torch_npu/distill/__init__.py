"""Distillation (DMD2) in the torch twin: the loss terms and the update."""
