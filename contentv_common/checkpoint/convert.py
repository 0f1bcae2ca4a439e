"""Checkpoint conversion between diffusers, our torch (safetensors) and our JAX (orbax) formats, every direction.

Tensors stream one at a time from the source; the diffusers and torch writers flush shard by shard, so converting
between safetensors formats holds at most one shard. The JAX format is the JAX backend's own (registered by
`contentv_jax` on import); its writer holds the model once (orbax saves one tree of stacked blocks).
Without a dtype change, every tensor is copied bit for bit, so any round trip is exact. LoRA adapters given as
`loras` are merged into their weights on the way (in float32, stored in the weight's dtype, before any dtype cast).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from contentv_common.checkpoint.formats import (
    POS_TABLE,
    checkpoint_format,
    open_checkpoint,
    write_diffusers,
    write_torch,
)
from contentv_common.dtypes import DTYPES
from contentv_common.lora.adapters import adapted, merged_weight, open_lora

Format = Literal["diffusers", "torch", "jax"]
FORMATS = ("diffusers", "torch", "jax")


def convert(
    src: str | Path,
    dst: str | Path,
    to: Format,
    dtype: str | None = None,
    pos_embed: Literal["sincos_3d", "sd3_2d"] | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    progress: bool = True,
    loras: Sequence[tuple[str | Path, float]] = (),
) -> Path:
    """Convert the transformer checkpoint folder `src` into `dst` in format `to`.

    `dtype` casts floating tensors (e.g. "bfloat16"); `pos_embed="sincos_3d"` turns an SD3/SD3.5 image checkpoint into
    a ContentV video checkpoint (SD3's 2D position table is dropped). `loras` are (adapter file, scale) pairs merged
    in order, each checked against the checkpoint's keys and shapes before anything is written.
    """
    if to not in FORMATS:
        raise ValueError(f"unknown target format {to!r} ({', '.join(FORMATS)})")
    writer = None if to in ("diffusers", "torch") else checkpoint_format(to, dst).write
    source = open_checkpoint(src)
    cfg = source.config if pos_embed is None else source.config.replace(pos_embed=pos_embed)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if cfg.pos_embed == "sd3_2d" and POS_TABLE not in source.shapes:
        raise ValueError(f"{src}: has no {POS_TABLE!r} (a sincos_3d checkpoint); cannot convert to sd3_2d mode")
    merged = [open_lora(path, scale, source.shapes) for path, scale in loras]
    total = len([k for k in source.shapes if not (k == POS_TABLE and cfg.pos_embed == "sincos_3d")])

    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        bar = tqdm(total=total, desc=f"convert -> {to}", unit="tensor", disable=not progress)
        for name, array in source.tensors():
            if name == POS_TABLE and cfg.pos_embed == "sincos_3d":
                continue
            if adapted(name, merged):
                array = merged_weight(name, array, merged).astype(array.dtype)
            if dtype is not None and array.dtype.kind in "fV":
                array = array.astype(DTYPES[dtype])
            bar.update()
            yield name, array
        bar.close()

    if to == "diffusers":
        return write_diffusers(dst, cfg, tensors(), max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    if to == "torch":
        return write_torch(dst, cfg, tensors(), max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    assert writer is not None  # set above for every other format
    return writer(Path(dst), cfg, tensors(), overwrite)
