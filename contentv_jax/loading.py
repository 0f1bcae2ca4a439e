"""Weights in and out of the JAX models through the shared parameter tables (no model logic here).

`load_transformer` reads a diffusers transformer folder (the official SD3.5-Large / ContentV-8B layout), our torch
safetensors folder, or our JAX (orbax) folder. Every safetensors tensor is read once (contentv_common's direct
reader) and copied into page-aligned buffers, one per distinct shard of this host's devices; a leaf goes to its
devices once its last tensor has arrived (orbax restores straight onto the shards), so the host holds the model once
plus the tensors being read.

Layout: the transformer stores blocks 0..L-2 stacked (`blocks.*`, leading layer axis) and block L-1 as
`last_block.*`; checkpoints keep the canonical per-block names `blocks.{i}.*` of contentv_common.checkpoint.param_table.
`slots` maps between the two, so every format round trip stays bit-exact.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from contentv_common.checkpoint.formats import (
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
from contentv_common.checkpoint.hub import transformer_folder
from contentv_common.checkpoint.param_table import TRANSFORMER_TABLE, Param, ParamTable, inverse_perm, jax_shape
from contentv_common.checkpoint.safetensors_io import AtomicFolder, page_aligned
from contentv_common.config.model import ModelConfig
from contentv_common.errors import CheckpointError
from contentv_jax import sharding
from contentv_jax.ops import Attention
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


BLOCK = 128  # rows / columns of a transposing copy's tiles (cache-sized)
COPY_THREADS = min(8, os.cpu_count() or 1)  # tensors placed at once (numpy copies run without the GIL)


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """`dst[...] = src`, cast to `dst`'s dtype, fast: a same-dtype copy moves raw bits (numpy's bf16 loops are slow),
    and a transposed 2-d source goes tile by tile (a whole-row walk misses the cache on every element)."""
    if src.dtype == dst.dtype:
        bits = np.dtype(f"u{src.dtype.itemsize}")
        dst, src = dst.view(bits), src.view(bits)
    if src.ndim == 2 and src.strides[0] < src.strides[1]:
        for i in range(0, src.shape[0], BLOCK):
            for j in range(0, src.shape[1], BLOCK):
                np.copyto(dst[i : i + BLOCK, j : j + BLOCK], src[i : i + BLOCK, j : j + BLOCK])
    else:
        np.copyto(dst, src)


def host_buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An empty page-aligned array: JAX's CPU devices take such arrays as their buffers without a copy."""
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return np.frombuffer(page_aligned(max(size, 1)), dtype, int(np.prod(shape))).reshape(shape)


class _Staged:
    """One model leaf assembled on the host as its canonical tensors stream in: a page-aligned buffer per distinct
    shard of this process's devices, each filled in place (layout change and cast in one copy), then put on the
    devices once every tensor of the leaf has arrived (JAX's CPU devices keep the buffers as they are). Several
    threads may `put` tensors of one leaf at once."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, where: Sharding, count: int):
        self.shape, self.dtype, self.sharding, self.waiting = shape, np.dtype(dtype), where, count
        self.indices = where.addressable_devices_indices_map(shape)
        self.buffers: dict[tuple, np.ndarray] = {}
        self.lock = threading.Lock()

    @staticmethod
    def _key(index: Index) -> tuple:
        return tuple((s.start, s.stop) for s in index)

    def put(self, slot: Slot, array: np.ndarray) -> bool:
        """Copy one canonical tensor (torch layout) into every shard; True once the leaf is complete."""
        perm = slot.param.jax_perm
        jax_layout = array if perm is None else np.transpose(array, perm)
        for index in {self._key(i): i for i in self.indices.values()}.values():
            key = self._key(index)
            with self.lock:
                if key not in self.buffers:
                    shape = tuple(len(range(*s.indices(n))) for s, n in zip(index, self.shape, strict=True))
                    self.buffers[key] = host_buffer(shape, self.dtype)
                dst, part = self.buffers[key], index
            if slot.layer is not None:  # the layer axis is never split: every shard holds every layer
                dst, part = dst[slot.layer], index[1:]
            copy_into(dst, jax_layout[part])
        with self.lock:
            self.waiting -= 1
            return self.waiting == 0

    def array(self) -> jax.Array:
        shards = [jax.device_put(self.buffers[self._key(i)], d) for d, i in self.indices.items()]
        self.buffers.clear()  # on an accelerator the host copies go once transferred
        return jax.make_array_from_single_device_arrays(self.shape, self.sharding, shards)


def fill_from_source(
    abstract: nnx.Module,
    source: TensorSource,
    table: ParamTable = TRANSFORMER_TABLE,
    shardings: dict[str, Sharding] | None = None,
) -> nnx.Module:
    """Materialise an abstract model from a checkpoint, checking every key and shape first (`table` maps names).

    `shardings` (model leaf path -> Sharding; default: the first device) says where each leaf goes. The tensors
    stream in once (contentv_common.checkpoint.safetensors_io reads at disk speed); each is copied into the shards of
    this process's devices and dropped, so the host holds the model once plus the tensors being read.
    """
    skip = check_keys(source, canonical_shapes(abstract, table), table)
    default = SingleDeviceSharding(jax.local_devices()[0])
    graphdef, state = nnx.split(abstract)
    staged: dict[tuple, tuple[nnx.Variable, _Staged]] = {}
    where: dict[str, tuple[tuple, Slot]] = {}
    for path, var, leaf_slots in _leaf_slots(abstract, table):
        leaf = _Staged(tuple(var.shape), var.dtype, (shardings or {}).get(_path(path), default), len(leaf_slots))
        staged[path] = (var, leaf)
        where.update({s.param.canonical: (path, s) for s in leaf_slots})
    arrays = {}

    def put(name: str, array: np.ndarray) -> None:
        path, slot = where[name]
        if staged[path][1].put(slot, array):
            arrays[path] = staged[path][1].array()

    with ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="place") as pool:
        pending: deque[Future] = deque()
        for name, array in source.tensors(skip) if skip else source.tensors():  # sources in memory take no skip
            pending.append(pool.submit(put, name, array))
            while len(pending) > 2 * COPY_THREADS or (pending and pending[0].done()):
                pending.popleft().result()  # errors surface here; a few tensors wait at most
        for future in pending:
            future.result()
    items = [(path, var.replace(arrays[path])) for path, (var, _) in staged.items()]
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


def abstract_transformer(
    cfg: ModelConfig, mesh: Mesh | None = None, *, attention: Attention | None = None, **kwargs
) -> Transformer:
    """load_transformer's model before its weights (shapes only, nothing allocated). `attention` defaults to "auto"
    on `mesh`, resolved when traced for the mesh's platform, else this process's (contentv_jax.ops.Attention)."""
    attention = Attention(mesh=mesh) if attention is None else attention
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), attention=attention, **kwargs))


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
    attention: Attention | None = None,
    remat: str = "none",
    mesh: Mesh | None = None,
    constrain: Constrain = no_constraint,
) -> Transformer:
    """Load a transformer checkpoint folder (diffusers, torch or jax format), or a Hugging Face Hub id
    (`owner/name/transformer`: its config and safetensors only, via the Hub cache; a local path that exists wins).

    `dtype` is the parameter dtype (default float32; bf16 checkpoints are cast directly, never via float64);
    `compute_dtype` defaults to `dtype`. `pos_embed="sincos_3d"` turns an SD3/SD3.5 image checkpoint into the
    ContentV video model (its 2D table is dropped); `"sd3_2d"` keeps image mode. With `mesh`, every parameter is
    placed on its shards (sharding.PARAM_AXES) as it is read; without, on the first device. `attention` defaults to
    "auto" on `mesh`, resolved when traced for the mesh's platform, else this process's: cuDNN flash on GPU, splash
    on TPU, XLA on CPU (contentv_jax.ops.Attention).
    """
    path = transformer_folder(path)
    source = open_checkpoint(path)
    cfg = source.config if pos_embed is None else source.config.replace(pos_embed=pos_embed)
    param_dtype = jnp.dtype(dtype or jnp.float32)
    abstract = abstract_transformer(
        cfg,
        mesh,
        dtype=jnp.dtype(compute_dtype or param_dtype),
        param_dtype=param_dtype,
        attention=attention,
        remat=remat,
        constrain=constrain,
    )
    shardings = model_shardings(abstract, mesh) if mesh is not None else None
    if detect_format(path) == "jax":
        return _restore_jax(path, abstract, source, shardings)
    return fill_from_source(abstract, source, shardings=shardings)


# ---- our JAX format: contentv_config.json + orbax `params/` of {model leaf path: array}, blocks stacked ----------


def save_jax(folder: str | Path, model: Transformer, overwrite: bool = False) -> Path:
    """Write our JAX format from the model's arrays as they are (orbax writes each shard from its device)."""
    params = {_path(path): var[...] for path, var in nnx.to_flat_state(nnx.state(model))}
    return write_jax_params(folder, model.cfg, params, overwrite)


# bytes (GB) orbax moves at once while saving / restoring: the host never stages a whole second copy of the model
HOST_GB_IN_FLIGHT = 1.0
RESTORE_GB_IN_FLIGHT = 0.25  # reads land in the buffers the devices keep: more in flight only raises the peak


async def _read_shard_adoptable(
    t: Any, *, new_shard_shape: tuple[int, ...], dtype: Any, requested_domain: Any, restricted_domain: Any
) -> np.ndarray:
    """Orbax's read of one shard (`serialization._read_shard`, same arguments and result) into adoptable buffers:
    orbax's own reads into `np.zeros`, which JAX's CPU devices copy again (a second copy of every shard, 1.33x
    peak). Fresh anonymous memory is zeroed, as orbax pads a shard larger than the stored array."""
    import tensorstore as ts

    out = await asyncio.to_thread(host_buffer, tuple(new_shard_shape), t.dtype.numpy_dtype)  # faulting in: no GIL
    await ts.array(out)[ts.d[:].translate_to[requested_domain.origin]][restricted_domain].write(t[restricted_domain])
    return out if dtype is None else out.astype(dtype, copy=False)  # orbax casts in tensorstore: the same dtype


def adopting_restores() -> None:
    """Orbax restores read every shard with O_DIRECT (tensorstore's `file_io_mode`: no page cache to fill and copy
    out of) into a buffer JAX's CPU devices adopt. Orbax has an option for neither: this sets tensorstore's context in
    orbax's defaults and replaces its shard read. Idempotent."""
    try:
        from orbax.checkpoint._src.serialization import serialization
        from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    except ImportError:  # another orbax layout: its own restores (slower; tests/jax/test_sharded_loading.py fails)
        return
    contexts = [getattr(ts_utils, name, None) for name in ("_BASE_TS_CONTEXT", "_DEFAULT_OCDBT_TS_CONTEXT")]
    if not hasattr(serialization, "_read_shard") or not all(isinstance(c, dict) for c in contexts):
        return
    for context in contexts:
        context["file_io_mode"] = {"mode": "direct"}
    serialization._read_shard = _read_shard_adoptable


def write_jax_params(folder: str | Path, cfg: ModelConfig, params: dict[str, Any], overwrite: bool) -> Path:
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=HOST_GB_IN_FLIGHT, save_device_host_concurrent_gb=HOST_GB_IN_FLIGHT, use_compression=False
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
    adopting_restores()
    handler = ocp.PyTreeCheckpointHandler(restore_concurrent_gb=RESTORE_GB_IN_FLIGHT, **options)
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

    def tensors(skip: Iterable[str] = ()) -> Iterator[tuple[str, np.ndarray]]:
        cpu = SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        target = {k: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=cpu) for k, m in meta.items()}
        params = _restore(path, target)
        for name, (leaf, s) in where.items():
            if name in skip:
                continue
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
