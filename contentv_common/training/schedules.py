"""Noise-level schedules and the flow-matching objective, shared by both backends (numpy).

Everything random in a training step (timesteps, noise, text dropout) is drawn here from a numpy Generator, so the
JAX and torch trainers, and any device mesh, see exactly the same numbers for the same seed and step.

Convention (rectified flow, SD3): sigma in (0, 1) is the noise level, x_t = (1 - sigma) x0 + sigma noise, the model
predicts the velocity noise - x0 and is fed timestep = 1000 sigma.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

ShiftMode = Literal["none", "static", "tokens"]
Weighting = Literal["uniform", "cosmap", "logit_normal"]


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Static time shift of flow matching (SD3): s -> shift * s / (1 + (shift - 1) * s); shift > 1 adds noise."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def token_shift(num_tokens: int, base_tokens: int) -> float:
    """Resolution-dependent shift of SD3 (paper sec. 5.3.2): sqrt(m / n) for m tokens against a base of n tokens.

    More tokens carry more redundant signal, so the same sigma destroys less of it; shifting towards noise keeps
    the signal-to-noise ratio per token comparable across resolutions and durations.
    """
    if num_tokens <= 0 or base_tokens <= 0:
        raise ValueError(f"token counts must be positive, got num_tokens={num_tokens}, base_tokens={base_tokens}")
    return math.sqrt(num_tokens / base_tokens)


def resolve_shift(mode: ShiftMode, shift: float, num_tokens: int, base_tokens: int) -> float:
    """The shift to use for a batch: 1 (none), the configured value (static) or `token_shift` (tokens)."""
    if mode == "none":
        return 1.0
    if mode == "static":
        return float(shift)
    if mode == "tokens":
        return token_shift(num_tokens, base_tokens)
    raise ValueError(f"shift mode must be one of none, static, tokens; got {mode!r}")


def sample_logit_normal(rng: np.random.Generator, n: int, mean: float, std: float) -> np.ndarray:
    """n sigmas with logit(sigma) ~ N(mean, std^2) (SD3's rf/lognorm): most samples at mid noise levels."""
    if std <= 0:
        raise ValueError(f"logit-normal std must be positive, got {std}")
    return 1.0 / (1.0 + np.exp(-rng.normal(mean, std, size=n)))


def loss_weights(sigmas: np.ndarray, weighting: Weighting) -> np.ndarray:
    """Per-sample loss weights for the velocity MSE; "uniform" is ContentV/SD3's default (the density does the work).

    "cosmap" is SD3's cosine-map weighting 2 / (pi (1 - 2s + 2s^2)); "logit_normal" weights by the standard logit-normal
    density, for runs that sample sigma uniformly but want SD3's emphasis.
    """
    s = np.asarray(sigmas, dtype=np.float64)
    if weighting == "uniform":
        return np.ones_like(s)
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * s + 2.0 * s * s))
    if weighting == "logit_normal":
        s = np.clip(s, 1e-6, 1 - 1e-6)
        logit = np.log(s / (1 - s))
        return np.exp(-0.5 * logit**2) / (math.sqrt(2 * math.pi) * s * (1 - s))
    raise ValueError(f"loss weighting must be one of uniform, cosmap, logit_normal; got {weighting!r}")


def _expand(sigma, like):
    """Reshape per-sample sigma [B] to broadcast against x [B, ...] (numpy, jax or torch)."""
    return sigma.reshape(tuple(sigma.shape) + (1,) * (like.ndim - sigma.ndim))


def interpolate(x0, noise, sigma):
    """x_t = (1 - sigma) x0 + sigma noise, sigma per sample [B]; works on numpy, jax and torch arrays alike."""
    s = _expand(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0, noise):
    """The flow-matching regression target: d x_t / d sigma = noise - x0."""
    return noise - x0


def drop_text(
    rng: np.random.Generator,
    text: np.ndarray,
    pooled: np.ndarray,
    empty_text: np.ndarray,
    empty_pooled: np.ndarray,
    prob: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Replace each sample's text with the empty-prompt embedding with probability `prob` (CFG training).

    Returns (text, pooled, dropped mask [B]). The empty prompt is the encoded "" (as at sampling time), not zeros.
    """
    b = text.shape[0]
    dropped = rng.random(size=(b,)) < prob
    mask_t = dropped.reshape(b, 1, 1)
    text = np.where(mask_t, empty_text[None].astype(text.dtype), text)
    pooled = np.where(dropped[:, None], empty_pooled[None].astype(pooled.dtype), pooled)
    return text, pooled, dropped


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The Generator for one training step: a pure function of (seed, step), so resume needs no RNG state."""
    return np.random.default_rng([seed, step])


def flow_inputs(
    rng: np.random.Generator,
    latent_shape: tuple[int, ...],
    *,
    logit_mean: float,
    logit_std: float,
    shift: float,
    weighting: Weighting,
) -> dict[str, np.ndarray]:
    """Noise [B, ...] (float32), sigmas [B] and loss weights [B] for one batch of latents of `latent_shape`.

    Sigmas are logit-normal then shifted; the model timestep is 1000 * sigma.
    """
    b = latent_shape[0]
    sigmas = shift_sigmas(sample_logit_normal(rng, b, logit_mean, logit_std), shift)
    noise = rng.standard_normal(latent_shape, dtype=np.float32)
    return {
        "noise": noise,
        "sigmas": sigmas.astype(np.float32),
        "weights": loss_weights(sigmas, weighting).astype(np.float32),
    }
