"""The device mesh and where every parameter and input lives on it (logical axis rules, maxtext style).

Parameters get logical axis names from their canonical path (contentv_common.checkpoint.param_table names, which are
the NNX paths of contentv_jax/transformer.py); ordered rules map logical names to mesh axes. A mesh axis that does not
divide a parameter's dimension is dropped for that parameter (it stays replicated there; `unsplit_params` lists them).
For activations a split the mesh asks for but cannot honour is an error naming the dimension and the mesh axis.
Attention is laid out by contentv_jax.ops.Attention (Ulysses over `sequence`, heads padded inside attention).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from contentv_common.config.recipe import MeshConfig

AXES = ("data", "fsdp", "sequence", "tensor")
BATCH = ("data", "fsdp")

# logical name -> mesh axes; "embed" is the model width the train state is sharded on (ZeRO-3 over fsdp x sequence:
# the sequence ranks split the tokens, so they split the weights, moments and EMA too, and a block's weights are
# all-gathered over both axes before use), "heads"/"mlp" the tensor-parallel dims.
# Activations: image tokens are split over `sequence` (contentv_jax.ops.Attention re-splits them by heads inside).
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    "batch": BATCH,
    "embed": ("fsdp", "sequence"),
    "heads": ("tensor",),
    "mlp": ("tensor",),
    "tokens": ("sequence",),
}

# (regex on the dotted parameter path, logical axes per dimension of the JAX array). First match wins.
Rules = tuple[tuple[str, tuple[str | None, ...]], ...]
PARAM_AXES: Rules = (
    (r".*attn\.(to_q|to_k|to_v|add_q|add_k|add_v)\.kernel", ("embed", "heads")),
    (r".*attn\.(to_q|to_k|to_v|add_q|add_k|add_v)\.bias", ("heads",)),
    (r".*attn\.(to_out|add_out)\.kernel", ("heads", "embed")),
    (r".*\.(ff|ff_context)\.fc1\.kernel", ("embed", "mlp")),
    (r".*\.(ff|ff_context)\.fc1\.bias", ("mlp",)),
    (r".*\.(ff|ff_context)\.fc2\.kernel", ("mlp", "embed")),
    (r".*\.(norm1|norm1_context)\.kernel", ("embed", None)),
    (r"norm_out\.kernel", ("embed", None)),
    (r"proj_out\.kernel", ("embed", None)),
    (r"context_embedder\.kernel", (None, "embed")),
    (r"time_embed\.(timestep|pooled)\.linear_1\.kernel", (None, "embed")),
    (r"time_embed\.(timestep|pooled)\.linear_2\.kernel", ("embed", None)),
    (r"patch_embed\.proj\.kernel", (None, None, None, "embed")),
)


# SD3.5's text encoders (contentv_jax.text_encoders; paths inside one encoder or the three together): T5-XXL's and the
# CLIPs' width over `fsdp`, their attention heads and feed-forward over `tensor`, embedding tables along their width.
TEXT_PARAM_AXES: Rules = (
    (r".*attn\.(q|k|v|q_proj|k_proj|v_proj)\.kernel", ("embed", "heads")),
    (r".*attn\.(q_proj|k_proj|v_proj)\.bias", ("heads",)),
    (r".*attn\.(o|out_proj)\.kernel", ("heads", "embed")),
    (r".*\.(ff\.wi_0|ff\.wi_1|mlp\.fc1)\.kernel", ("embed", "mlp")),
    (r".*\.mlp\.fc1\.bias", ("mlp",)),
    (r".*\.(ff\.wo|mlp\.fc2)\.kernel", ("mlp", "embed")),
    (r"(.*\.)?(shared|text\.token_embedding|text\.position_embedding)\.embedding", (None, "embed")),
    (r"(.*\.)?text_projection\.kernel", ("embed", None)),
)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes (data, fsdp, sequence, tensor); the sizes must multiply to the number of devices.

    With `cfg.shard_data` the data axis is folded into fsdp (data 1, fsdp data x fsdp): the batch splits over the
    same devices in the same order, and the state is sharded over the data ranks as well."""
    devices = list(jax.devices() if devices is None else devices)
    if int(np.prod(cfg.shape)) != len(devices):
        raise ValueError(
            f"mesh: data x fsdp x sequence x tensor = {' x '.join(map(str, cfg.shape))} = {int(np.prod(cfg.shape))} "
            f"does not match the {len(devices)} devices"
        )
    shape = (1, cfg.data * cfg.fsdp, cfg.sequence, cfg.tensor) if cfg.shard_data else cfg.shape
    return Mesh(np.asarray(devices).reshape(shape), AXES)


# The scanned blocks of contentv_jax.transformer: one leading layer axis, never split (each device keeps its
# slice of every layer, so the scan body sees the same sharding as an unstacked block).
STACKED_PARAMS = re.compile(r"blocks\..*")


# LoRA adapters (contentv_jax.lora): A [in, rank] splits like its kernel's input dim, B [rank, out] like its output dim
LORA_LEAF = re.compile(r"(.*)\.lora_(a|b)")


def logical_axes(path: str, ndim: int, rules: Rules = PARAM_AXES) -> tuple[str | None, ...]:
    """Logical axis names of a parameter (None = replicated); unknown paths (norm scales, biases) are replicated."""
    if m := LORA_LEAF.fullmatch(path):
        *lead, d_in, d_out = logical_axes(f"{m[1]}.kernel", ndim, rules)
        return (*lead, d_in, None) if m[2] == "a" else (*lead, None, d_out)
    stacked = rules is PARAM_AXES and STACKED_PARAMS.fullmatch(path) is not None
    for pattern, axes in rules:
        if re.fullmatch(pattern, path):
            axes = ("layers", *axes) if stacked else axes
            if len(axes) != ndim:
                raise ValueError(f"parameter {path}: rule gives {len(axes)} axes for a {ndim}-d array")
            return axes
    return (None,) * ndim


def _split(
    logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh
) -> tuple[PartitionSpec, list[tuple[int, str]]]:
    """PartitionSpec keeping the mesh axes of size > 1 that divide the dimension, and the (dim, axis) pairs dropped."""
    used: set[str] = set()
    out, dropped = [], []
    for dim, (name, size) in enumerate(zip(logical, shape, strict=True)):
        axes: list[str] = []
        for axis in LOGICAL_RULES.get(name, ()) if name else ():
            n = mesh.shape[axis]
            if n == 1 or axis in used:
                continue
            if size % (n * int(np.prod([mesh.shape[a] for a in axes]))) == 0:
                axes.append(axis)
            else:
                dropped.append((dim, axis))
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*out), dropped


def spec_for(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Parameter PartitionSpec from logical names: a mesh axis that does not divide a dimension is dropped there."""
    return _split(logical, shape, mesh)[0]


def activation_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Activation PartitionSpec from logical names; a split the mesh cannot honour is a ValueError, never dropped."""
    spec, dropped = _split(logical, shape, mesh)
    if dropped:
        dim, axis = dropped[0]
        raise ValueError(
            f"activation {tuple(shape)}: dimension {dim} ({logical[dim]}, size {shape[dim]}) does not split over "
            f"mesh axis {axis}={mesh.shape[axis]}"
        )
    return spec


@dataclass(frozen=True)
class ActivationSharding:
    """The model's `constrain` hook: pins an activation to the mesh by logical axis names (hashable, so jit caches)."""

    mesh: Mesh

    def __call__(self, x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(self.mesh, activation_spec(logical, x.shape, self.mesh))
        )


def _dotted(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def param_shardings(params, mesh: Mesh, rules: Rules = PARAM_AXES):
    """NamedSharding for every leaf of a (pure-dict) parameter tree, from the logical axis rules."""

    def one(path, leaf):
        return NamedSharding(mesh, spec_for(logical_axes(_dotted(path), leaf.ndim, rules), leaf.shape, mesh))

    return jax.tree_util.tree_map_with_path(one, params)


def unsplit_params(params, mesh: Mesh, rules: Rules = PARAM_AXES) -> list[str]:
    """Parameters a rule asks to split but the mesh axis does not divide (they stay replicated on that axis), as
    "path: dim D (size S) not split over AXIS=N" lines, for the planner's report."""
    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = _dotted(path)
        logical = logical_axes(name, len(leaf.shape), rules)
        for dim, axis in _split(logical, leaf.shape, mesh)[1]:
            out.append(f"{name}: dim {dim} (size {leaf.shape[dim]}) not split over {axis}={mesh.shape[axis]}")
    return out


def like_params_shardings(tree, params_shardings, mesh: Mesh):
    """Shardings for a tree that embeds copies of the parameter tree (optimizer moments, EMA): a leaf whose path
    ends with a parameter's path gets that parameter's sharding, everything else (counters) is replicated."""
    by_path = {
        tuple(_dotted((k,)) for k in path): s for path, s in jax.tree_util.tree_flatten_with_path(params_shardings)[0]
    }
    depth = max(len(k) for k in by_path)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        keys = tuple(_dotted((k,)) for k in path)
        for n in range(min(depth, len(keys)), 0, -1):
            s = by_path.get(keys[-n:])
            if s is not None and len(s.spec) <= leaf.ndim:
                return s
        return replicated

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_shardings(batch_shapes: dict[str, tuple[int, ...]], mesh: Mesh) -> dict[str, NamedSharding]:
    """Inputs are split over (data, fsdp) on the batch axis. Latents are small (16 channels) and stay whole over
    `sequence`: the model splits image tokens after the patch embedding, where any token count dividing it works."""
    out = {}
    for name, shape in batch_shapes.items():
        logical = ["batch"] + [None] * (len(shape) - 1)
        spec = spec_for(logical, shape, mesh)
        if shape[0] % int(np.prod([mesh.shape[a] for a in BATCH])):
            raise ValueError(
                f"batch of {shape[0]} does not split over data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}"
            )
        out[name] = NamedSharding(mesh, spec)
    return out
