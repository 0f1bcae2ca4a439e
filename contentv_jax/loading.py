"""Weights in and out of the JAX models through the shared parameter tables (no model logic here).

`load_transformer` reads a diffusers transformer folder (the official SD3.5-Large / ContentV-8B layout), our torch
safetensors folder, or our JAX (orbax) folder. Every parameter is built with `jax.make_array_from_callback`: each
device reads only its own slice from the safetensors files (or orbax restores straight onto the shards), so no
whole copy of the model is ever held by one host or one device beyond the one the devices hold together.

Layout: the transformer stores blocks 0..L-2 stacked (`blocks.*`, leading layer axis) and block L-1 as
`last_block.*`; checkpoints keep the canonical per-block names `blocks.{i}.*` of contentv_common.param_table.
`slots` maps between the two, so every format round trip stays bit-exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from contentv_common.checkpoint import (
    CheckpointFormat,
    Index,
    TensorSource,
    check_keys,
    detect_format,
    open_checkpoint,
    read_our_config,
    register_format,
    write_our_config,
)
from contentv_common.config import ModelConfig
from contentv_common.param_table import TRANSFORMER_TABLE, Param, ParamTable, inverse_perm, jax_shape
from contentv_common.safetensors_io import AtomicFolder, CheckpointError
from contentv_jax import sharding
from contentv_jax.ops import XLA_ATTENTION, Attention
from contentv_jax.transformer import Constrain, Transformer, no_constraint

_STACKED = re.compile(r"blocks\.(.+)")
_LAST = re.compile(r"last_block\.(.+)")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


@dataclass(frozen=True)
class Slot:
    """One canonical parameter inside a model leaf: the whole leaf, or index `layer` of a stacked leaf."""

    param: Param
    layer: int | None = None


def _path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def slots(path: str, shape: tuple[int, ...], table: ParamTable, num_layers: int | None) -> list[Slot]:
    """The canonical parameters a model leaf holds. `num_layers` is set for the transformer (stacked blocks)."""
    if num_layers is not None:
        if m := _STACKED.fullmatch(path):
            return [Slot(table.from_jax(f"blocks.{i}.{m[1]}"), i) for i in range(shape[0])]
        if m := _LAST.fullmatch(path):
            return [Slot(table.from_jax(f"blocks.{num_layers - 1}.{m[1]}"))]
    return [Slot(table.from_jax(path))]


def model_path(param: Param, num_layers: int | None) -> tuple[str, int | None]:
    """(model leaf path, index on its layer axis or None) of a canonical parameter: the inverse of `slots`."""
    m = _BLOCK.fullmatch(param.jax) if num_layers is not None else None
    if m is None:
        return param.jax, None
    i = int(m[1])
    return (f"last_block.{m[2]}", None) if i == num_layers - 1 else (f"blocks.{m[2]}", i)


def _num_layers(model: nnx.Module) -> int | None:
    return model.cfg.num_layers if isinstance(model, Transformer) else None


def _leaf_slots(model: nnx.Module, table: ParamTable) -> Iterator[tuple[tuple, nnx.Variable, list[Slot]]]:
    n = _num_layers(model)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        yield path, var, slots(_path(path), tuple(var.shape), table, n)


def _torch_shape(shape: tuple[int, ...], slot: Slot) -> tuple[int, ...]:
    shape = shape[1:] if slot.layer is not None else shape
    perm = slot.param.jax_perm
    return shape if perm is None else jax_shape(shape, inverse_perm(perm))


def canonical_shapes(model: nnx.Module, table: ParamTable = TRANSFORMER_TABLE) -> dict[str, tuple[int, ...]]:
    """Canonical name -> torch-layout shape of every weight/buffer of a (possibly abstract) model."""
    return {
        s.param.canonical: _torch_shape(tuple(var.shape), s)
        for _, var, leaf_slots in _leaf_slots(model, table)
        for s in leaf_slots
    }


def _read_jax_layout(read, param: Param, where: Index) -> np.ndarray:
    """A slice given in JAX layout, read from the torch-layout tensor (the index permuted, then the data)."""
    perm = param.jax_perm
    if perm is None:
        return read(param.canonical, where)
    torch_where = tuple(where[k] for k in inverse_perm(perm))
    return np.transpose(read(param.canonical, torch_where), perm)


def _leaf_array(read, leaf_slots: list[Slot], shape: tuple[int, ...], dtype, where_sharding: Sharding) -> jax.Array:
    """One model leaf, assembled device by device from the slices each device holds."""

    def shard(where: Index) -> np.ndarray:
        if leaf_slots[0].layer is None:
            part = _read_jax_layout(read, leaf_slots[0].param, where)
        else:
            layers = leaf_slots[where[0]]
            part = np.stack([_read_jax_layout(read, s.param, where[1:]) for s in layers])
        part = np.asarray(part, dtype=dtype)  # not ascontiguousarray: it turns a scalar into shape (1,)
        return part if part.flags.c_contiguous else part.copy()

    return jax.make_array_from_callback(shape, where_sharding, shard)


def _in_memory(source: TensorSource, skip: set[str]):
    """A slice reader over a source that can only stream (it holds the model once on the host)."""
    arrays = {k: v for k, v in source.tensors() if k not in skip}
    return lambda name, where: arrays[name][where]


def fill_from_source(
    abstract: nnx.Module,
    source: TensorSource,
    table: ParamTable = TRANSFORMER_TABLE,
    shardings: dict[str, Sharding] | None = None,
) -> nnx.Module:
    """Materialise an abstract model from a checkpoint, checking every key and shape first (`table` maps names).

    `shardings` (model leaf path -> Sharding; default: the first device) says where each leaf goes; each device
    reads its own slices when the source allows it.
    """
    skip = check_keys(source, canonical_shapes(abstract, table), table)
    read = source.read or _in_memory(source, skip)
    default = SingleDeviceSharding(jax.local_devices()[0])
    graphdef, state = nnx.split(abstract)
    items = []
    for path, var, leaf_slots in _leaf_slots(abstract, table):
        where = (shardings or {}).get(_path(path), default)
        array = _leaf_array(read, leaf_slots, tuple(var.shape), var.dtype, where)
        items.append((path, var.replace(array)))
    return nnx.merge(graphdef, nnx.from_flat_state(items))


def canonical_tensors(model: nnx.Module, table: ParamTable = TRANSFORMER_TABLE) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (canonical name, numpy array in torch layout) for every weight/buffer, without changing dtypes.

    Block by block in order; a stacked leaf is fetched one layer at a time (the host holds one tensor).
    """
    leaves = list(_leaf_slots(model, table))
    order = sorted(
        ((s.layer if s.layer is not None else -1, s.param.canonical), var, s)
        for _, var, leaf_slots in leaves
        for s in leaf_slots
    )
    for _, var, s in order:
        array = var[...] if s.layer is None else var[...][s.layer]
        array = np.asarray(jax.device_get(array))
        if s.param.jax_perm is not None:
            array = np.transpose(array, inverse_perm(s.param.jax_perm))
        yield s.param.canonical, np.ascontiguousarray(array)


def abstract_transformer(cfg: ModelConfig, **kwargs) -> Transformer:
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), **kwargs))


def model_shardings(
    abstract: nnx.Module, mesh: Mesh, rules: sharding.Rules = sharding.PARAM_AXES
) -> dict[str, Sharding]:
    """Model leaf path -> NamedSharding on `mesh`: parameters by the logical axis `rules`, buffers replicated."""
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    flat = jax.tree_util.tree_flatten_with_path(sharding.param_shardings(params, mesh, rules))[0]
    out = {".".join(str(k.key) for k in path): s for path, s in flat}
    replicated = NamedSharding(mesh, PartitionSpec())
    for path, _ in nnx.to_flat_state(nnx.state(abstract)):
        out.setdefault(_path(path), replicated)
    return out


def load_transformer(
    path: str | Path,
    dtype: jnp.dtype | None = None,
    pos_embed: Literal["sincos_3d", "sd3_2d"] | None = None,
    *,
    compute_dtype: jnp.dtype | None = None,
    attention: Attention = XLA_ATTENTION,
    remat: str = "none",
    mesh: Mesh | None = None,
    constrain: Constrain = no_constraint,
) -> Transformer:
    """Load a transformer checkpoint folder (diffusers, torch or jax format).

    `dtype` is the parameter dtype (default float32; bf16 checkpoints are cast directly, never via float64);
    `compute_dtype` defaults to `dtype`. `pos_embed="sincos_3d"` turns an SD3/SD3.5 image checkpoint into the
    ContentV video model (its 2D table is dropped); `"sd3_2d"` keeps image mode. With `mesh`, every parameter is
    placed on its shards (sharding.PARAM_AXES) as it is read; without, on the first device.
    """
    source = open_checkpoint(path)
    cfg = source.config if pos_embed is None else source.config.replace(pos_embed=pos_embed)
    param_dtype = jnp.dtype(dtype or jnp.float32)
    abstract = abstract_transformer(
        cfg,
        dtype=jnp.dtype(compute_dtype or param_dtype),
        param_dtype=param_dtype,
        attention=attention,
        remat=remat,
        constrain=constrain,
    )
    shardings = model_shardings(abstract, mesh) if mesh is not None else None
    if detect_format(path) == "jax":
        return _restore_jax(Path(path), abstract, source, shardings)
    return fill_from_source(abstract, source, shardings=shardings)


# ---- our JAX format: contentv_config.json + orbax `params/` of {model leaf path: array}, blocks stacked ----------


def save_jax(folder: str | Path, model: Transformer, overwrite: bool = False) -> Path:
    """Write our JAX format from the model's arrays as they are (orbax writes each shard from its device)."""
    params = {_path(path): var[...] for path, var in nnx.to_flat_state(nnx.state(model))}
    return write_jax_params(folder, model.cfg, params, overwrite)


# bytes (GB) orbax moves at once while saving or restoring: the host never stages a whole second copy of the model
HOST_GB_IN_FLIGHT = 1.0


def write_jax_params(folder: str | Path, cfg: ModelConfig, params: dict[str, Any], overwrite: bool) -> Path:
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=HOST_GB_IN_FLIGHT, save_device_host_concurrent_gb=HOST_GB_IN_FLIGHT
    )
    with AtomicFolder(folder, overwrite) as tmp:
        write_our_config(tmp, cfg)
        with ocp.Checkpointer(handler) as ckpt:
            ckpt.save((tmp / "params").resolve(), args=ocp.args.PyTreeSave(params))
    return Path(folder)


def write_jax_tensors(
    folder: Path, cfg: ModelConfig, tensors: Iterator[tuple[str, np.ndarray]], overwrite: bool
) -> Path:
    """Canonical torch-layout tensors -> our JAX format (stacked blocks assembled on the host: the model once)."""
    params: dict[str, np.ndarray] = {}
    filled: dict[str, set[int]] = {}
    for name, array in tensors:
        p = TRANSFORMER_TABLE.from_canonical(name)
        array = array if p.jax_perm is None else np.transpose(array, p.jax_perm)
        leaf, layer = model_path(p, cfg.num_layers)
        if layer is None:
            params[leaf] = np.ascontiguousarray(array)
            continue
        if leaf not in params:
            params[leaf] = np.empty((cfg.num_layers - 1, *array.shape), array.dtype)
        params[leaf][layer] = array
        filled.setdefault(leaf, set()).add(layer)
    for leaf, layers in filled.items():
        if len(layers) != cfg.num_layers - 1:
            missing = sorted(set(range(cfg.num_layers - 1)) - layers)
            raise CheckpointError(f"{folder}: {leaf}: no tensor for blocks {missing}")
    return write_jax_params(folder, cfg, params, overwrite)


def _orbax_metadata(path: Path) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    try:
        with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckpt:
            return dict(ckpt.metadata((path / "params").resolve()).item_metadata)
    except Exception as e:  # orbax raises several types for a damaged folder
        raise CheckpointError(f"{path / 'params'}: cannot read orbax checkpoint: {e}") from None


def _this_process_only():
    """Orbax options for a read by this process alone: no barrier with the other processes of a multi-process run
    (process 0 samples the demo clip by itself)."""
    import orbax.checkpoint as ocp

    return ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})


def _restore(path: Path, target: dict[str, jax.ShapeDtypeStruct]) -> dict[str, Any]:
    import orbax.checkpoint as ocp

    # arrays spread over several processes are restored by all of them together; arrays of this process, alone
    alone = all(t.sharding.is_fully_addressable for t in target.values())
    options = {"multiprocessing_options": _this_process_only()} if alone else {}
    handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=HOST_GB_IN_FLIGHT, **options)
    args = ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    try:
        with ocp.Checkpointer(handler, **options) as ckpt:
            return ckpt.restore((path / "params").resolve(), args=args)
    except Exception as e:
        raise CheckpointError(f"{path / 'params'}: cannot restore orbax checkpoint: {e}") from None


def open_jax_source(path: str | Path) -> TensorSource:
    """Our JAX (orbax) folder as a TensorSource of canonical, torch-layout arrays (headers now, data on iteration)."""
    path = Path(path)
    cfg = read_our_config(path)
    meta = _orbax_metadata(path)
    shapes, dtypes, where = {}, {}, {}
    for leaf, m in meta.items():
        try:
            leaf_slots = slots(leaf, tuple(m.shape), TRANSFORMER_TABLE, cfg.num_layers)
        except KeyError as e:
            raise CheckpointError(f"{path / 'params'}: unexpected key {leaf!r} ({e})") from None
        for s in leaf_slots:
            shapes[s.param.canonical] = _torch_shape(tuple(m.shape), s)
            dtypes[s.param.canonical] = str(np.dtype(m.dtype))
            where[s.param.canonical] = (leaf, s)

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        cpu = SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        target = {k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu) for k, m in meta.items()}
        params = _restore(path, target)
        for name, (leaf, s) in where.items():
            array = params[leaf] if s.layer is None else params[leaf][s.layer]
            array = np.asarray(array)
            if s.param.jax_perm is not None:
                array = np.transpose(array, inverse_perm(s.param.jax_perm))
            yield name, np.ascontiguousarray(array)

    return TensorSource(path=path, config=cfg, shapes=shapes, dtypes=dtypes, tensors=tensors)


def _restore_jax(
    path: Path, abstract: Transformer, source: TensorSource, shardings: dict[str, Sharding] | None
) -> Transformer:
    """Orbax restores every leaf straight onto its shards, cast to the model's dtypes; a skipped SD3 position table
    is read (replicated, small) and dropped."""
    skip = check_keys(source, canonical_shapes(abstract), TRANSFORMER_TABLE)
    default = SingleDeviceSharding(jax.local_devices()[0])
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    target = {
        _path(p): jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=(shardings or {}).get(_path(p), default))
        for p, v in flat
    }
    meta = _orbax_metadata(path)
    for name in skip:
        leaf = model_path(TRANSFORMER_TABLE.from_canonical(name), None)[0]
        target[leaf] = jax.ShapeDtypeStruct(tuple(meta[leaf].shape), meta[leaf].dtype, sharding=default)
    params = _restore(path, target)
    items = [(p, v.replace(params[_path(p)])) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(items))


register_format("jax", CheckpointFormat(open=open_jax_source, write=write_jax_tensors))
