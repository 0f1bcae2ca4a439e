"""Stochastic flow-match sampling for GRPO (Flow-GRPO / DanceGRPO), framework-free.

The Euler ODE x' = x + dt v has no randomness, so it gives no log-probability to optimise. The reverse-time SDE with
the same marginals does: with x_t = (1 - t) x0 + t eps, the score is -(x + (1 - t) v) / t, and for a diffusion
coefficient g_t a step from sigma t to t + dt (dt < 0) is Gaussian with

    mean = x + [v + g_t^2 / (2 t) (x + (1 - t) v)] dt,      std = g_t sqrt(-dt),     g_t = a sqrt(t / (1 - t)),

where `a` (noise_level) sets the exploration. At t = 1 the factor 1 / (1 - t) diverges, so 1 - t is floored at the
first step size. Only `+ - *`, reshape and mean touch arrays here (std and log-normaliser are numpy scalars per step),
so the functions serve numpy, jax and torch alike. Log-probabilities are averaged over latent elements (one number per
sample), which keeps importance ratios near 1 for big latents.

GRPO explores where it trains: the first `explore_steps` steps are SDE steps, the rest deterministic Euler steps
(g = 0): noise there would change a rollout's reward without getting any credit. With a noise grid g the exploration
noise is one draw per channel, frame and cell of a g x g partition of the latent's H x W, repeated over the cell (few
directions for a group's reward spread to be credited to); the log-probabilities and the KL are then those of the cell
means, where the block-constant noise lives: the cell mean of x_next - mean is std * z.
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


def sde_schedule(schedule: FlowMatchSchedule, noise_level: float, explore_steps: int | None = None) -> SdeSchedule:
    """The SDE coefficients of a flow-match schedule; noise_level 0 is the deterministic Euler sampler, and so are the
    steps from `explore_steps` on (None: every step explores). Where g = 0, drift and std are 0 and log_std is -inf:
    no log-probability exists there, so only the explored steps' log_std may be used."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    sigmas = schedule.sigmas[:-1].astype(np.float64)
    dts = np.diff(schedule.sigmas.astype(np.float64))
    floor = -dts[0] if len(dts) else 1.0
    g2 = noise_level**2 * sigmas / np.maximum(1.0 - sigmas, floor)
    if explore_steps is not None:
        g2[explore_steps:] = 0.0
    drift = g2 / (2.0 * sigmas)
    std = np.sqrt(g2 * -dts)
    f32 = np.float32
    with np.errstate(divide="ignore"):
        log_std = np.log(std)
    return SdeSchedule(sigmas.astype(f32), dts.astype(f32), drift.astype(f32), std.astype(f32), log_std.astype(f32))


def exploration_noise(rng: np.random.Generator, shape: tuple[int, ...], grid: int | None) -> np.ndarray:
    """Standard normal float32 noise of `shape` [..., H, W]: one draw per element, or with `grid` g one per g x g
    cell (drawn as [..., g, g]) repeated over the cell's H/g x W/g elements."""
    if grid is None:
        return rng.standard_normal(shape, dtype=np.float32)
    *lead, h, w = shape
    cells = rng.standard_normal((*lead, grid, grid), dtype=np.float32)
    return cells.repeat(h // grid, axis=-2).repeat(w // grid, axis=-1)


def cell_means(x: Array, grid: int | None) -> Array:
    """x [..., H, W] -> its means over the cells of a grid x grid partition [..., grid, grid]; None: x unchanged."""
    if grid is None:
        return x
    *lead, h, w = x.shape
    return x.reshape(*lead, grid, h // grid, grid, w // grid).mean(-1).mean(-2)


def sde_mean(x: Array, velocity: Array, sigma: float, dt: float, drift: float) -> Array:
    """Mean of the next state: x + [v + drift (x + (1 - sigma) v)] dt."""
    return x + (velocity + drift * (x + (1.0 - sigma) * velocity)) * dt


def gaussian_log_prob(x_next: Array, mean: Array, std: Any, log_std: Any, grid: int | None = None) -> Array:
    """log N(x_next; mean, std^2) averaged over all but the batch axis -> [B] (`log_std` from the SdeSchedule, so
    no backend log is needed); with `grid`, of the residual's cell means (the dimensions the grid noise explores)."""
    b = x_next.shape[0]
    sq = (cell_means(x_next - mean, grid) ** 2).reshape(b, -1).mean(-1)
    return sq * (-0.5 / std**2) - (log_std + 0.5 * math.log(2 * math.pi))


def gaussian_kl(mean: Array, ref_mean: Array, std: Any, grid: int | None = None) -> Array:
    """KL between two Gaussians of the same std, averaged over elements (with `grid`, over the cell means of the
    difference): |m - m_ref|^2 / (2 std^2) -> [B]."""
    b = mean.shape[0]
    return (cell_means(mean - ref_mean, grid) ** 2).reshape(b, -1).mean(-1) * (0.5 / std**2)
