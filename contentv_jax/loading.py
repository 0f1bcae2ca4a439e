"""Weights in and out of the JAX transformer through the shared parameter table (no model logic here).

`load_transformer` reads a diffusers transformer folder (the official SD3.5-Large / ContentV-8B layout), our torch
safetensors folder, or our JAX (orbax) folder, tensor by tensor into an abstract (shape-only) model, so host memory
holds the model once plus one tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from contentv_common.checkpoint import (
    TensorSource,
    check_keys,
    open_checkpoint,
    read_our_config,
    write_our_config,
)
from contentv_common.config import ModelConfig
from contentv_common.param_table import TRANSFORMER_TABLE, ParamTable, inverse_perm, jax_shape
from contentv_common.safetensors_io import AtomicFolder, CheckpointError
from contentv_jax.transformer import Transformer


def _path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def canonical_shapes(model: nnx.Module, table: ParamTable = TRANSFORMER_TABLE) -> dict[str, tuple[int, ...]]:
    """Canonical name -> torch-layout shape of every weight/buffer of a (possibly abstract) model."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        p = table.from_jax(_path(path))
        shape = tuple(var.shape)
        out[p.canonical] = shape if p.jax_perm is None else jax_shape(shape, inverse_perm(p.jax_perm))
    return out


def fill_from_source(abstract: nnx.Module, source: TensorSource, table: ParamTable = TRANSFORMER_TABLE) -> nnx.Module:
    """Materialise an abstract model from a checkpoint, checking every key and shape first (`table` maps names)."""
    skip = check_keys(source, canonical_shapes(abstract, table), table)
    graphdef, state = nnx.split(abstract)
    flat = {_path(path): var for path, var in nnx.to_flat_state(state)}
    filled = {}
    for name, array in source.tensors():
        if name in skip:
            continue
        p = table.from_canonical(name)
        var = flat[p.jax]
        if p.jax_perm is not None:
            array = np.transpose(array, p.jax_perm)
        filled[p.jax] = var.replace(jnp.asarray(array, dtype=var.dtype))
    items = [(path, filled[_path(path)]) for path, _ in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(items))


def canonical_tensors(model: nnx.Module, table: ParamTable = TRANSFORMER_TABLE) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (canonical name, numpy array in torch layout) for every weight/buffer, without changing dtypes."""
    for path, var in nnx.to_flat_state(nnx.state(model)):
        p = table.from_jax(_path(path))
        array = np.asarray(jax.device_get(var[...]))
        if p.jax_perm is not None:
            array = np.transpose(array, inverse_perm(p.jax_perm))
        yield p.canonical, np.ascontiguousarray(array)


def abstract_transformer(cfg: ModelConfig, **kwargs) -> Transformer:
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), **kwargs))


def load_transformer(
    path: str | Path,
    dtype: jnp.dtype | None = None,
    pos_embed: Literal["sincos_3d", "sd3_2d"] | None = None,
    *,
    compute_dtype: jnp.dtype | None = None,
    attention_impl: str | None = None,
    attention_pad_multiple: int | None = None,
    remat: str = "none",
) -> Transformer:
    """Load a transformer checkpoint folder (diffusers, torch or jax format).

    `dtype` is the parameter dtype (default float32; bf16 checkpoints are cast directly, never via float64);
    `compute_dtype` defaults to `dtype`. `pos_embed="sincos_3d"` turns an SD3/SD3.5 image checkpoint into the
    ContentV video model (its 2D table is dropped); `"sd3_2d"` keeps image mode.
    """
    source = open_checkpoint(path)
    cfg = source.config if pos_embed is None else source.config.replace(pos_embed=pos_embed)
    param_dtype = jnp.dtype(dtype or jnp.float32)
    abstract = abstract_transformer(
        cfg,
        dtype=jnp.dtype(compute_dtype or param_dtype),
        param_dtype=param_dtype,
        attention_impl=attention_impl,
        attention_pad_multiple=attention_pad_multiple,
        remat=remat,
    )
    return fill_from_source(abstract, source)


def save_jax(folder: str | Path, model: Transformer, overwrite: bool = False) -> Path:
    """Write our JAX format: contentv_config.json + an orbax folder `params/` of {NNX path: array}."""
    flat = nnx.to_flat_state(nnx.state(model))
    params = {_path(path): np.asarray(jax.device_get(var[...])) for path, var in flat}
    return write_jax_params(folder, model.cfg, params, overwrite)


def write_jax_params(folder: str | Path, cfg: ModelConfig, params: dict[str, np.ndarray], overwrite: bool) -> Path:
    import orbax.checkpoint as ocp

    with AtomicFolder(folder, overwrite) as tmp:
        write_our_config(tmp, cfg)
        with ocp.StandardCheckpointer() as ckpt:
            ckpt.save((tmp / "params").resolve(), params)
    return Path(folder)


def open_jax_source(path: str | Path) -> TensorSource:
    """Our JAX (orbax) folder as a TensorSource of canonical, torch-layout arrays."""
    import orbax.checkpoint as ocp

    path = Path(path)
    cfg = read_our_config(path)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore((path / "params").resolve())
    except Exception as e:  # orbax raises several types for a damaged folder
        raise CheckpointError(f"{path / 'params'}: cannot restore orbax checkpoint: {e}") from None
    converted = {}
    for key, array in params.items():
        p = TRANSFORMER_TABLE.from_jax(key)
        array = np.asarray(array)
        converted[p.canonical] = array if p.jax_perm is None else np.transpose(array, inverse_perm(p.jax_perm))
    return TensorSource(
        path=path,
        config=cfg,
        shapes={k: v.shape for k, v in converted.items()},
        dtypes={k: str(v.dtype) for k, v in converted.items()},
        tensors=lambda: ((k, np.ascontiguousarray(v)) for k, v in converted.items()),
    )
