"""One cached sample as bytes, and the ArrayRecord files that hold many of them.

A record is `safetensors.numpy.save` of the sample's arrays (latents [C, f, h, w], text [L, D], pooled [P]) in the
cache's dtype: float32, or bfloat16 stored as its uint16 bits (safetensors' numpy reader has no bfloat16). Readers
get float32 whatever the cache's dtype. The files are written with `group_size:1` (every record its own chunk: one
read per random access) and uncompressed (latents and embeddings barely compress; decompression would cost the
loader CPU), and read through grain's `ArrayRecordDataSource`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import ml_dtypes
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from safetensors.numpy import load, save

CacheDtype = Literal["bfloat16", "float32"]
WRITER_OPTIONS = "group_size:1,uncompressed"


def to_bytes(arrays: dict[str, np.ndarray], dtype: CacheDtype) -> bytes:
    """The arrays as one record, rounded to `dtype` (bfloat16: round to nearest even)."""
    if dtype == "bfloat16":
        return save({k: np.ascontiguousarray(v, ml_dtypes.bfloat16).view(np.uint16) for k, v in arrays.items()})
    return save({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()})


def from_bytes(record: bytes, dtype: CacheDtype) -> dict[str, np.ndarray]:
    """A record's arrays as float32."""
    arrays = load(record)
    if dtype == "bfloat16":
        return {k: v.view(ml_dtypes.bfloat16).astype(np.float32) for k, v in arrays.items()}
    return arrays


def write_records(path: Path, records: Iterable[bytes]) -> None:
    """An ArrayRecord file of `records`, in order (closed when this returns)."""
    writer = ArrayRecordWriter(str(path), WRITER_OPTIONS)
    try:
        for record in records:
            writer.write(record)
    finally:
        writer.close()
