"""Reward runs on the training mesh: the state is the trainer's, sharded by its rules (contentv_jax.train.Trainer,
contentv_jax.sharding: FSDP / tensor on the weights, image tokens over `sequence` with Ulysses attention inside
shard_map); this module places the rest: rollout rows over data x fsdp, the VAE decoder and the reward model
replicated (small next to the transformer: at most a few GB, unlike the 8B model's 32 GB of fp32 weights and 64 GB of
AdamW moments).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from contentv_common.config.reward import RewardRecipe
from contentv_jax import sharding
from contentv_jax.train import default_mesh

# batch keys whose leading axis is the sampler step (GRPO's exploration noise, states, log-probs): rows are axis 1
STEP_MAJOR = frozenset({"step_noise", "states", "old_log_probs"})


def reward_mesh(recipe: RewardRecipe) -> Mesh:
    """The recipe's mesh on this process's devices (a ConfigError when there are too few, before any model work)."""
    return default_mesh(recipe)


def replicate(module: Any, mesh: Mesh) -> Any:
    """Every array of an nnx.Module (the VAE decoder, a CLIP reward) whole on every device of `mesh`, in place, from
    each process's own copy (every process loads the same weights); plain callables pass through."""
    if isinstance(module, nnx.Module):
        everywhere = NamedSharding(mesh, PartitionSpec())

        def put(x: jax.Array) -> jax.Array:
            host = np.asarray(x)
            return jax.make_array_from_callback(host.shape, everywhere, lambda index: host[index])

        nnx.update(module, jax.tree.map(put, nnx.state(module)))
    return module


def batch_sharding(name: str, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Rows over data x fsdp (axis 1 for the step-major GRPO arrays), everything else whole: the latents are small
    (16 channels) and the model splits image tokens after the patch embedding."""
    axis = 1 if name in STEP_MAJOR else 0
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    if len(shape) <= axis or shape[axis] % split:
        raise ValueError(
            f"reward batch {name} {tuple(shape)}: {shape[axis] if len(shape) > axis else 'no'} rows do not split over "
            f"mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}"
        )
    spec = [None] * len(shape)
    spec[axis] = sharding.BATCH
    return NamedSharding(mesh, PartitionSpec(*spec))


def device_batch(batch: dict[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Host arrays of the whole (global) batch -> arrays sharded over the mesh; each device takes its block. Every
    process computes the same batch (a pure function of seed and step), so this also holds across hosts."""

    def put(name: str, value: Any) -> jax.Array:
        rows = np.asarray(value)
        where = batch_sharding(name, rows.shape, mesh)
        return jax.make_array_from_callback(rows.shape, where, lambda index: rows[index])

    return {k: put(k, v) for k, v in batch.items()}


def pad_rows(batch: dict[str, np.ndarray], mesh: Mesh) -> tuple[dict[str, np.ndarray], int]:
    """(batch with its rows repeated up to a multiple of data x fsdp, the real row count): held-out evaluation runs
    any number of seeds on the mesh and keeps the first rows."""
    n = len(next(iter(batch.values())))
    pad = -n % (mesh.shape["data"] * mesh.shape["fsdp"])
    return {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in batch.items()}, n
