"""Distillation (DMD2), framework-free: the student's sigmas, what each update draws, the shared arithmetic."""
