"""Reading and writing folders of (possibly sharded) safetensors files with numpy, bf16 included (via ml_dtypes).

Tensors stream file by file, so converting an 8B checkpoint holds one shard (or one tensor) at a time, not the model
twice. Writes go to a temporary folder that is renamed into place at the end: a crash leaves no half-written output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes  # noqa: F401  (numpy knows "bfloat16" only once ml_dtypes is imported; never rely on jax doing it)
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or does not match the model; the message names file/key/shapes."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def weight_files(folder: Path, prefix: str | None = None) -> list[Path]:
    """The safetensors files of a folder: those listed by a `*.safetensors.index.json`, else every `*.safetensors`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    indexes = sorted(folder.glob(f"{prefix or '*'}.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several index files {[p.name for p in indexes]}; pass one prefix")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{indexes[0]}: not a safetensors index ({e})") from None
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{indexes[0]}: lists shard {f.name}, which is missing")
        return files
    files = sorted(p for p in folder.glob(f"{prefix or '*'}.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files")
    return files


def _open(file: Path):
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file (truncated or corrupt?): {e}") from None


def tensor_index(files: Iterable[Path]) -> dict[str, TensorInfo]:
    """Key -> file, shape and dtype, read from the headers only (no tensor data)."""
    index: dict[str, TensorInfo] = {}
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                if key in index:
                    raise CheckpointError(f"{file}: key {key!r} also stored in {index[key].file.name}")
                sl = f.get_slice(key)
                index[key] = TensorInfo(file, tuple(sl.get_shape()), sl.get_dtype())
    return index


def iter_tensors(files: Iterable[Path]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, array) file by file; bf16 arrays come back as ml_dtypes.bfloat16 without any upcast."""
    for file in files:
        with _open(file) as f:
            for key in f.keys():
                try:
                    yield key, f.get_tensor(key)
                except (SafetensorError, OSError) as e:
                    raise CheckpointError(f"{file}: cannot read tensor {key!r}: {e}") from None


def _nbytes(a: np.ndarray) -> int:
    return int(a.size * a.dtype.itemsize)


def write_sharded(
    tensors: Iterable[tuple[str, np.ndarray]],
    folder: Path,
    prefix: str,
    max_shard_bytes: int = 5 * 2**30,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write `folder/prefix.safetensors`, or shards plus `prefix.safetensors.index.json` (the diffusers layout).

    Shards are flushed as they fill, so at most one shard is held in memory.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shard: dict[str, np.ndarray] = {}
    shard_bytes = 0
    parts: list[tuple[Path, list[str]]] = []
    total = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            part = folder / f".{prefix}-part{len(parts):05d}.safetensors"
            # np.require keeps 0-d tensors 0-d (CLIP's logit_scale); np.ascontiguousarray would make them 1-d
            save_file({k: np.require(v, requirements="C") for k, v in shard.items()}, str(part), metadata=metadata)
            parts.append((part, list(shard)))
        shard, shard_bytes = {}, 0

    for key, array in tensors:
        if shard and shard_bytes + _nbytes(array) > max_shard_bytes:
            flush()
        shard[key] = array
        shard_bytes += _nbytes(array)
        total += _nbytes(array)
    flush()
    if not parts:
        raise CheckpointError(f"{folder}: nothing to write")
    if len(parts) == 1:
        final = folder / f"{prefix}.safetensors"
        os.replace(parts[0][0], final)
        return [final]
    weight_map, finals = {}, []
    for n, (part, keys) in enumerate(parts, start=1):
        final = folder / f"{prefix}-{n:05d}-of-{len(parts):05d}.safetensors"
        os.replace(part, final)
        finals.append(final)
        weight_map.update({k: final.name for k in keys})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    return finals


class AtomicFolder:
    """Context manager: yields a temporary sibling folder, renamed to `target` only if the block succeeds."""

    def __init__(self, target: str | Path, overwrite: bool = False):
        self.target = Path(target)
        self.overwrite = overwrite

    def __enter__(self) -> Path:
        if self.target.exists() and any(self.target.iterdir()) and not self.overwrite:
            raise FileExistsError(f"{self.target}: output folder exists and is not empty (pass overwrite)")
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.target.exists():
            shutil.rmtree(self.target)
        os.replace(self.tmp, self.target)
