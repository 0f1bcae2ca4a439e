"""Stochastic flow-match sampling for GRPO (Flow-GRPO / DanceGRPO), framework-free.

The Euler ODE x' = x + dt v has no randomness, so it gives no log-probability to optimise. The reverse-time SDE with
the same marginals does: with x_t = (1 - t) x0 + t eps, the score is -(x + (1 - t) v) / t, and for a diffusion
coefficient g_t a step from sigma t to t + dt (dt < 0) is Gaussian with

    mean = x + [v + g_t^2 / (2 t) (x + (1 - t) v)] dt,      std = g_t sqrt(-dt),     g_t = a sqrt(t / (1 - t)),

where `a` (noise_level) sets the exploration. At t = 1 the factor 1 / (1 - t) diverges, so 1 - t is floored at the
first step size. Only `+ - *` touch arrays here (std and log-normaliser are numpy scalars per step), so the functions
serve numpy, jax and torch alike. Log-probabilities are averaged over latent elements (one number per sample), which
keeps importance ratios near 1 for big latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np

from contentv_common.sampling import FlowMatchSchedule

Array: TypeAlias = Any  # a numpy, JAX or torch array: the math is the same


@dataclass(frozen=True)
class SdeSchedule:
    """Per step i: sigma[i], dt[i] (< 0), the drift factor g_i^2 / (2 sigma_i), the step's std and log(std)."""

    sigmas: np.ndarray
    dts: np.ndarray
    drift: np.ndarray
    std: np.ndarray
    log_std: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.dts)


def sde_schedule(schedule: FlowMatchSchedule, noise_level: float) -> SdeSchedule:
    """The SDE coefficients of a flow-match schedule; noise_level 0 is the deterministic Euler sampler."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    sigmas = schedule.sigmas[:-1].astype(np.float64)
    dts = np.diff(schedule.sigmas.astype(np.float64))
    floor = -dts[0] if len(dts) else 1.0
    g2 = noise_level**2 * sigmas / np.maximum(1.0 - sigmas, floor)
    drift = g2 / (2.0 * sigmas)
    std = np.sqrt(g2 * -dts)
    f32 = np.float32
    with np.errstate(divide="ignore"):
        log_std = np.log(std)
    return SdeSchedule(sigmas.astype(f32), dts.astype(f32), drift.astype(f32), std.astype(f32), log_std.astype(f32))


def sde_mean(x: Array, velocity: Array, sigma: float, dt: float, drift: float) -> Array:
    """Mean of the next state: x + [v + drift (x + (1 - sigma) v)] dt."""
    return x + (velocity + drift * (x + (1.0 - sigma) * velocity)) * dt


def gaussian_log_prob(x_next: Array, mean: Array, std: Any, log_std: Any) -> Array:
    """log N(x_next; mean, std^2) averaged over all but the batch axis -> [B] (`log_std` from the SdeSchedule, so
    no backend log is needed)."""
    b = x_next.shape[0]
    sq = ((x_next - mean) ** 2).reshape(b, -1).mean(-1)
    return sq * (-0.5 / std**2) - (log_std + 0.5 * math.log(2 * math.pi))


def gaussian_kl(mean: Array, ref_mean: Array, std: Any) -> Array:
    """KL between two Gaussians of the same std, averaged over elements: |m - m_ref|^2 / (2 std^2) -> [B]."""
    b = mean.shape[0]
    return ((mean - ref_mean) ** 2).reshape(b, -1).mean(-1) * (0.5 / std**2)
