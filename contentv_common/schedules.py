"""Noise-level schedules shared by both backends (numpy): the same sigmas and timesteps whatever the framework."""

from __future__ import annotations

import numpy as np


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Static time shift of flow matching (SD3): s -> shift * s / (1 + (shift - 1) * s); shift > 1 adds noise."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
