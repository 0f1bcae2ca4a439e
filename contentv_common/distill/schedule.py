"""DMD2's schedule and draws, shared by both backends (numpy; the arithmetic helpers take numpy, JAX or torch arrays).

The student is a K-step sampler at fixed sigmas (`student_sigmas`): at step k it maps x at sigma_k to an x0
prediction, x0 = x - sigma_k v; the next step's input is the flow-match sampler's Euler step, x + (sigma_(k+1) -
sigma_k) v (that x0 re-noised to sigma_(k+1) with the noise the step predicts), so the student trains on the inputs
`contentv-sample --steps K` gives it. Backward simulation: the input of the step an update trains (k, uniform over the
K steps) comes from the student's own earlier steps, run without gradient from pure noise (sigma_0 = 1).

Every random number of an update (the trained step k, the start noise, the score's noise levels and noise)
is drawn here (`update_draws`), in the order the update uses them: the fake score's `fake_updates` updates first, then
the student's. Both backends take the same arrays, so the same weights give the same update.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from contentv_common.config.distill import DmdConfig
from contentv_common.sampling import flow_match_schedule
from contentv_common.training.schedules import shift_sigmas

DRAWS = ("k", "noise", "sigmas", "score_noise")
"""One generator turn's draws: the step k it ends on, start noise, the score's noise levels [B] and noise."""


def student_sigmas(dmd: DmdConfig) -> np.ndarray:
    """The student's input sigma at each of its K steps [K] (float32): the flow-match schedule's (what
    `contentv-sample --steps K --shift S` steps through) without its final 0; the first is 1, pure noise."""
    return flow_match_schedule(dmd.steps, dmd.shift).sigmas[:-1]


def score_sigmas(rng: np.random.Generator, n: int, dmd: DmdConfig) -> np.ndarray:
    """n noise levels for the DMD loss and the fake score's loss: uniform in [min_sigma, max_sigma], then shifted."""
    return shift_sigmas(rng.uniform(dmd.min_sigma, dmd.max_sigma, n), dmd.shift).astype(np.float32)


def generator_draws(rng: np.random.Generator, dmd: DmdConfig, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """The draws of one generator turn (`DRAWS`) for latents of `shape` [B, C, f, h, w]."""
    return {
        "k": np.asarray(rng.integers(dmd.steps), np.int32),
        "noise": rng.standard_normal(shape, dtype=np.float32),
        "sigmas": score_sigmas(rng, shape[0], dmd),
        "score_noise": rng.standard_normal(shape, dtype=np.float32),
    }


def update_draws(rng: np.random.Generator, dmd: DmdConfig, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """One update's draws: the fake score's turns stacked under `fake_<name>` ([fake_updates, ...]), then the
    student's under the plain names."""
    fakes = [generator_draws(rng, dmd, shape) for _ in range(dmd.fake_updates)]
    out = {f"fake_{name}": np.stack([f[name] for f in fakes]) for name in DRAWS}
    return {**out, **generator_draws(rng, dmd, shape)}


def fake_turn(draws: dict[str, Any], i: int) -> dict[str, Any]:
    """Fake update i's draws under the plain names (numpy, JAX or torch arrays)."""
    return {name: draws[f"fake_{name}"][i] for name in DRAWS}


def predicted_x0(x: Any, velocity: Any, sigma: Any) -> Any:
    """x0 = x - sigma v: the clean sample a flow-matching velocity points to (x = (1 - s) x0 + s eps, v = eps - x0);
    `sigma` a scalar or one per sample [B]."""
    if getattr(sigma, "ndim", 0):
        sigma = sigma.reshape(tuple(sigma.shape) + (1,) * (x.ndim - sigma.ndim))
    return x - sigma * velocity
