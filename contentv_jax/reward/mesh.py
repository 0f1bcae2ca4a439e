"""Reward runs on the training mesh: the transformer, its optimizer state and the frozen anchor sharded by training's
rules (contentv_jax.sharding: FSDP / tensor on the weights, batch over data x fsdp, image tokens over `sequence` with
Ulysses attention inside shard_map), the VAE decoder and the reward model replicated (small next to the transformer:
at most a few GB, unlike the 8B model's 32 GB of fp32 weights and 64 GB of AdamW moments).

The ReFL / GRPO step functions of contentv_jax.reward.train are unchanged: they take nnx.Modules whose arrays carry
these shardings, and the model's `constrain` hook pins the activations, so one code path serves one device and a pod.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from contentv_common.config.recipe import OptimizerConfig
from contentv_common.config.reward import RewardRecipe
from contentv_common.dtypes import DTYPES
from contentv_jax import sharding
from contentv_jax.loading import load_transformer, model_shardings
from contentv_jax.ops import attention_for
from contentv_jax.optim import model_optimizer
from contentv_jax.train import default_mesh
from contentv_jax.transformer import Transformer

# batch keys whose leading axis is the sampler step (GRPO's exploration noise, states, log-probs): rows are axis 1
STEP_MAJOR = frozenset({"step_noise", "states", "old_log_probs"})


def reward_mesh(recipe: RewardRecipe) -> Mesh:
    """The recipe's mesh on this process's devices (a ConfigError when there are too few, before any model work)."""
    return default_mesh(recipe)


def _dotted(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _model_kwargs(recipe: RewardRecipe, mesh: Mesh) -> dict[str, Any]:
    return {
        "dtype": DTYPES[recipe.compute_dtype],
        "attention": attention_for(recipe.attention, mesh),
        "remat": recipe.remat,
        "constrain": sharding.ActivationSharding(mesh),
    }


def abstract_model(recipe: RewardRecipe, mesh: Mesh, param_dtype: Any = jnp.float32) -> Transformer:
    """The recipe's transformer on `mesh` with shapes only (nothing allocated)."""
    kwargs = _model_kwargs(recipe, mesh)
    return nnx.eval_shape(lambda: Transformer(recipe.model_config, rngs=nnx.Rngs(0), param_dtype=param_dtype, **kwargs))


def _fill(abstract: Transformer, mesh: Mesh, make) -> Transformer:
    """Merge `abstract`'s graph with the state `make()` returns as a pure dict, each leaf placed on its shards."""
    where = model_shardings(abstract, mesh)
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    out = jax.tree_util.tree_map_with_path(lambda p, _: where[_dotted(p)], pure)
    nnx.replace_by_pure_dict(state, make(out))
    return nnx.merge(graphdef, state)


def build_model(recipe: RewardRecipe, mesh: Mesh) -> Transformer:
    """The model to tune, fp32 weights sharded over `mesh`: `init_from` read straight onto its shards, or a random
    init computed on the devices (never whole on one)."""
    kwargs = _model_kwargs(recipe, mesh)
    if recipe.init_from is not None:
        return load_transformer(recipe.init_from, compute_dtype=kwargs.pop("dtype"), mesh=mesh, **kwargs)

    def fresh() -> dict[str, Any]:
        return nnx.to_pure_dict(nnx.state(Transformer(recipe.model_config, rngs=nnx.Rngs(recipe.seed), **kwargs)))

    return _fill(abstract_model(recipe, mesh), mesh, lambda shardings: jax.jit(fresh, out_shardings=shardings)())


def on_mesh(model: Transformer, recipe: RewardRecipe, mesh: Mesh) -> Transformer:
    """A copy of `model` (same weights, own buffers) laid out on `mesh` with the recipe's attention, remat and
    constraints."""
    param_dtype = jax.tree.leaves(nnx.state(model, nnx.Param))[0].dtype
    pure = nnx.to_pure_dict(nnx.state(model))

    def copy(shardings: Any) -> dict[str, Any]:  # fresh buffers: a replicated shard may alias its source
        placed = jax.device_put(pure, shardings)
        return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=shardings)(placed)

    return _fill(abstract_model(recipe, mesh, param_dtype), mesh, copy)


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


def param_shardings(model: nnx.Module) -> Any:
    """The shardings of a placed model's nnx.Params, as a pure dict."""
    return jax.tree.map(lambda a: a.sharding, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def place_params(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Every nnx.Param of `model` on its training-rule shards, in place (e.g. LoRA adapters added after loading)."""
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, jax.device_put(pure, sharding.param_shardings(pure, mesh)))
    nnx.update(model, state)
    return model


def sharded_optimizer(model: nnx.Module, cfg: OptimizerConfig, updates: int, mesh: Mesh) -> nnx.Optimizer:
    """Training's optimizer over the placed model's Params, every moment sharded like its parameter (counters
    replicated)."""
    optimizer = model_optimizer(model, cfg, updates)  # the moments are zeros_like(param): created on its shards
    state = nnx.state(optimizer)
    pure = nnx.to_pure_dict(state)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    where = sharding.like_params_shardings(pure, sharding.param_shardings(params, mesh), mesh)
    nnx.replace_by_pure_dict(state, jax.device_put(pure, where))
    nnx.update(optimizer, state)
    return optimizer


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
