"""Text-to-video sampling with the JAX core: flow-match Euler + classifier-free guidance, then Wan VAE decoding.

The schedule, noise and update rule come from contentv_common.sampling, so the torch twin walks the same trajectory.
One jitted function does a whole step (batched cond/uncond forward, guidance, Euler update); it is compiled once per
model structure and shape and reused for every step and every call. On a sampling mesh (`--mesh data=D,sequence=S,
cfg=C`, contentv_common.sample_mesh) the same step runs over every device of every process: the forward's rows
over `data` (the cond/uncond halves on two device groups with cfg=2), image tokens over `sequence` (Ulysses, as
training). Latents are decoded to uint8 frames by the JAX Wan VAE, rounded exactly as the torch twin's
`Encoders.decode_latents` rounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache, partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from contentv_common.sample_mesh import ONE_DEVICE, SampleMesh, pair_rows, split_pair
from contentv_common.sampling import StepFn, euler_step, flow_match_sampler, guide
from contentv_common.vae.chunks import Tiling
from contentv_jax import multihost
from contentv_jax.loading import load_transformer
from contentv_jax.multihost import to_host
from contentv_jax.ops import attention_for
from contentv_jax.sharding import ActivationSharding, make_mesh
from contentv_jax.vae import WanVAE


def guided_velocity(
    model: nnx.Module,
    x: jax.Array,
    timestep: jax.Array | float,
    text: jax.Array,
    pooled: jax.Array,
    guided: bool,
    guidance: jax.Array | float,
    layout: SampleMesh = ONE_DEVICE,
) -> jax.Array:
    """The velocity of one sampler step, for every sampler (`sample`, training's in-loop clips, reward rollouts):
    with guidance, the latents' cond/uncond rows in `layout`'s order (contentv_common.sample_mesh; `text` and
    `pooled` hold the pair's rows in that order, guidance_batch) in one forward, then guided."""
    inputs = pair_rows(x, x, layout) if guided else x
    timesteps = jnp.full((inputs.shape[0],), timestep, jnp.float32)
    velocity = model(inputs, timesteps, text, pooled).astype(jnp.float32)
    return guide(*split_pair(velocity, layout), guidance) if guided else velocity


def _denoise(graphdef, guided: bool, layout: SampleMesh, state, x, timestep, dt, text, pooled, guidance):
    """One Euler step of `guided_velocity`."""
    model = nnx.merge(graphdef, state)
    return euler_step(x, guided_velocity(model, x, timestep, text, pooled, guided, guidance, layout), dt)


@cache
def denoise_step(graphdef, guided: bool, layout: SampleMesh = ONE_DEVICE, mesh: Mesh | None = None):
    """The jitted step `(state, x, timestep, dt, text, pooled, guidance) -> x`. On `mesh` every process compiles it
    together (multihost.jit_together) and the latents come out whole on every device; without, it is this process's
    alone (training's in-loop clip is drawn by process 0 only)."""
    step = partial(_denoise, graphdef, guided, layout)
    if mesh is None:
        return jax.jit(step)
    return multihost.jit_together(step, out_shardings=NamedSharding(mesh, PartitionSpec()))


@cache
def device_mesh(mesh: SampleMesh) -> Mesh:
    """The devices of a sampling mesh laid out as training's (SampleMesh.config): every device of every process, or
    for a mesh of one device this process's first (each process alone, as without `--mesh`)."""
    devices = jax.devices() if mesh.devices > 1 else jax.local_devices()[:1]
    return make_mesh(mesh.config, devices)


def load_sampling_transformer(path, dtype: jnp.dtype, attention: str, mesh: SampleMesh) -> nnx.Module:
    """A checkpoint's transformer for `sample` on `mesh`: the weights placed by contentv_jax.sharding's rules,
    activations and attention (Ulysses over `sequence`, heads padded) laid out as training lays them out."""
    where = device_mesh(mesh)
    return load_transformer(
        path, dtype=dtype, attention=attention_for(attention, where), mesh=where, constrain=ActivationSharding(where)
    )


def _put(rows: np.ndarray, where: NamedSharding) -> jax.Array:
    """A host array every process holds whole -> a global array with each device's block (one or several hosts)."""
    return jax.make_array_from_callback(rows.shape, where, lambda index: rows[index])


def _prepare(
    model: nnx.Module,
    noise: np.ndarray,
    text: np.ndarray,
    pooled: np.ndarray,
    guided: bool,
    guidance: float,
    mesh: SampleMesh | None,
) -> tuple[jax.Array, StepFn]:
    """The JAX half of `sample` (contentv_common.sampling.flow_match_sampler): inputs on the mesh (rows of the
    forward over `data`, the latents whole), or without one where the model's weights are, and one guided step."""
    graphdef, state = nnx.split(model)
    if mesh is None:  # arrays already on devices stay there (a reward run's batch spans every process's devices)
        where, layout = None, ONE_DEVICE
        text, pooled, x = (jnp.asarray(a, jnp.float32) for a in (text, pooled, noise))
    else:
        where, layout = device_mesh(mesh), mesh
        text, pooled, noise = (np.asarray(a, np.float32) for a in (text, pooled, noise))
        rows = NamedSharding(where, PartitionSpec("data"))
        text, pooled, x = _put(text, rows), _put(pooled, rows), _put(noise, NamedSharding(where, PartitionSpec()))
    run = denoise_step(graphdef, guided, layout, where)

    def step(x: jax.Array, timestep: np.float32, dt: np.float32) -> jax.Array:
        return run(state, x, timestep, dt, text, pooled, np.float32(guidance))

    return x, step


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
