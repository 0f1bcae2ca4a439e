"""Text-to-video sampling with the JAX core: flow-match Euler + classifier-free guidance, then Wan VAE decoding.

The schedule, noise and update rule come from contentv_common.sampling, so the torch twin walks the same trajectory.
One jitted function does a whole step (batched cond/uncond forward, guidance, Euler update); it is compiled once per
model structure and shape and reused for every step and every call. Latents are decoded to uint8 frames by the JAX
Wan VAE, rounded exactly as the torch twin's `Encoders.decode_latents` rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from contentv_common.sampling import StepFn, euler_step, flow_match_sampler, guide
from contentv_common.vae.chunks import Tiling
from contentv_jax.multihost import to_host
from contentv_jax.vae import WanVAE


@partial(jax.jit, static_argnames=("graphdef", "guided"))
def _denoise_step(graphdef, state, x, timestep, dt, text, pooled, guidance, *, guided: bool):
    model = nnx.merge(graphdef, state)
    inputs = jnp.concatenate([x, x]) if guided else x
    timesteps = jnp.full((inputs.shape[0],), timestep, jnp.float32)
    velocity = model(inputs, timesteps, text, pooled).astype(jnp.float32)
    if guided:
        uncond, cond = jnp.split(velocity, 2)
        velocity = guide(uncond, cond, guidance)
    return euler_step(x, velocity, dt)


def _prepare(
    model: nnx.Module, noise: np.ndarray, text: np.ndarray, pooled: np.ndarray, guided: bool, guidance: float
) -> tuple[jax.Array, StepFn]:
    """The JAX half of `sample` (contentv_common.sampling.flow_match_sampler): inputs on the model's devices and
    one guided Euler step."""
    graphdef, state = nnx.split(model)
    text, pooled = jnp.asarray(text, jnp.float32), jnp.asarray(pooled, jnp.float32)

    def step(x: jax.Array, timestep: np.float32, dt: np.float32) -> jax.Array:
        return _denoise_step(graphdef, state, x, timestep, dt, text, pooled, np.float32(guidance), guided=guided)

    return jnp.asarray(noise, jnp.float32), step


# whole, in every process of a multi-process run
sample = flow_match_sampler(_prepare, lambda x: np.asarray(to_host(x)), "sampling (jax)")


@jax.jit
def _to_uint8(video: jax.Array) -> jax.Array:
    """Video [B, 3, F, H, W] in [-1, 1] -> uint8 frames [B, F, H, W, 3]: scale, round half to even, clamp."""
    frames = jnp.clip(jnp.round((video.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
    return jnp.transpose(frames, (0, 2, 3, 4, 1))


def decode_latents(
    vae: WanVAE, latents: np.ndarray, tiling: Tiling | None = None, devices: Sequence[jax.Device] | None = None
) -> np.ndarray:
    """Normalised latents [B, C, f, h, w] -> uint8 frames [B, 1 + 4 (f - 1), 8 h, 8 w, 3], one clip at a time.

    The VAE runs one latent frame per jitted call, compiled once per latent frame size (one program for the first
    frame, one for the rest), so neither compile time nor memory grows with the video's length, and neither a longer
    video nor a bigger batch compiles the VAE again. `tiling` decodes blended spatial tiles (WanVAE.decode), side by
    side on `devices` (default: this process's devices), one tile per device at a time.
    """
    latents = np.asarray(latents, np.float32)
    if latents.ndim != 5 or latents.shape[1] != vae.cfg.z_dim:
        raise ValueError(f"latents must be [B, {vae.cfg.z_dim}, f, h, w], got {latents.shape}")
    if tiling is not None and devices is None:
        devices = jax.local_devices()
    clips = [_to_uint8(vae.decode(vae.denormalize(jnp.asarray(clip[None])), tiling, devices)) for clip in latents]
    return np.concatenate(jax.device_get(clips))
