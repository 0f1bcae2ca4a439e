"""Reading and writing folders of (possibly sharded) safetensors files with numpy, bf16 included (via ml_dtypes).

Tensors stream file by file, so converting an 8B checkpoint holds one shard (or one tensor) at a time, not the model
twice. Writes go to a temporary folder that is renamed into place at the end: a crash leaves no half-written output.

Reads run at disk speed (`iter_tensors`): every tensor of 1 MiB or more is read with one large direct read (O_DIRECT:
no page cache, so no file pages count as this process's memory or crowd the machine's cache) into its own
page-aligned buffer, which the returned array owns (a loader can keep it as the parameter: no copy); smaller tensors
are read together and copied out. Several threads read ahead of the consumer, a bounded number of bytes at a time.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import tempfile
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from contentv_common.errors import CheckpointError


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


TAG_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16, "U32": np.uint32,
    "I32": np.int32, "U64": np.uint64, "I64": np.int64, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F32": np.float32, "F64": np.float64, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}  # fmt: skip
BLOCK = 4096  # direct reads start, end and land on multiples of this
OWN_BUFFER = 1 << 20  # tensors at least this large get their own buffer; smaller ones are read in groups of
GROUP = 16 << 20  # up to this many bytes
READ_THREADS = 8
IN_FLIGHT = 512 << 20  # bytes read ahead of the consumer at most, and at most 1/16 of what is read: a few % of memory
SPARE = 256 << 20  # bytes of read buffers kept for reuse at most
SIZE_CLASS = 64 << 10  # buffer sizes round up to this: equal shapes meet again, little is wasted


@dataclass(frozen=True)
class Stored:
    """Where a tensor's bytes are in its file (absolute offsets)."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def stored_tensors(file: Path) -> list[Stored]:
    """The tensors of a safetensors file in file order, from its header (validated by safetensors itself)."""
    with _open(file):  # the library's own checks: header, offsets, file size
        pass
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    out = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in TAG_DTYPES:
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {info['dtype']}, which this reader does not know")
        start, end = info["data_offsets"]
        out.append(
            Stored(key, np.dtype(TAG_DTYPES[info["dtype"]]), tuple(info["shape"]), 8 + size + start, 8 + size + end)
        )
    return sorted(out, key=lambda t: t.start)


def page_aligned(size: int) -> mmap.mmap:
    """`size` bytes of fresh, page-aligned memory, faulted in at once (MAP_POPULATE: on a virtual machine touching
    pages one by one costs several times more)."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return mmap.mmap(-1, size, flags=flags)


def _open_direct(file: Path) -> tuple[int, bool]:
    """A file descriptor for direct reads, or for ordinary ones where the file system refuses O_DIRECT (tmpfs)."""
    try:
        return os.open(file, os.O_RDONLY | getattr(os, "O_DIRECT", 0)), True
    except OSError:
        return os.open(file, os.O_RDONLY), False


class _Buffers:
    """Read buffers handed back once the arrays on them are gone, for the next tensor of the same size (the blocks
    of a model repeat their shapes): fresh memory costs more than the read into it. At most `SPARE` bytes wait."""

    def __init__(self) -> None:
        self.free: dict[int, list[mmap.mmap]] = {}
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, size: int) -> mmap.mmap:
        size = -(-size // SIZE_CLASS) * SIZE_CLASS
        with self.lock:
            if self.free.get(size):
                self.bytes -= size
                return self.free[size].pop()
        return page_aligned(size)

    def give_back(self, buffer: mmap.mmap) -> None:
        with self.lock:
            if self.bytes + len(buffer) <= SPARE:
                self.free.setdefault(len(buffer), []).append(buffer)
                self.bytes += len(buffer)


_BUFFERS = _Buffers()


def _read_range(file: Path, start: int, end: int) -> tuple[mmap.mmap, int]:
    """Bytes [start, end) of a file in a page-aligned buffer: (buffer, where `start` is in it)."""
    first = start - start % BLOCK
    last = -(-end // BLOCK) * BLOCK
    buffer = _BUFFERS.get(last - first)
    view = memoryview(buffer)
    fd, direct = _open_direct(file)
    try:
        done = 0
        while first + done < end:
            n = os.preadv(fd, [view[done:]], first + done)
            if n == 0:
                raise CheckpointError(f"{file}: ends at byte {first + done}, its header says {end} (truncated?)")
            done += n
            if direct and n % BLOCK:  # a short direct read ends the file
                if first + done < end:
                    raise CheckpointError(f"{file}: ends at byte {first + done}, its header says {end} (truncated?)")
                break
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read bytes {start}..{end}: {e}") from None
    finally:
        view.release()
        os.close(fd)
    return buffer, start - first


def _array(buffer: mmap.mmap, offset: int, t: Stored, base: int, reuse: bool = False) -> np.ndarray:
    count = (t.end - t.start) // t.dtype.itemsize
    flat = np.frombuffer(buffer, t.dtype, count, offset + t.start - base)
    if reuse:  # every view of the array has `flat` as its base: the buffer is free once `flat` is gone
        weakref.finalize(flat, _BUFFERS.give_back, buffer)
    return flat.reshape(t.shape)


def _read_group(file: Path, group: list[Stored]) -> list[tuple[str, np.ndarray]]:
    buffer, offset = _read_range(file, group[0].start, group[-1].end)
    if len(group) == 1 and group[0].end - group[0].start >= OWN_BUFFER:
        return [(group[0].key, _array(buffer, offset, group[0], group[0].start, reuse=True))]
    out = [(t.key, _array(buffer, offset, t, group[0].start).copy()) for t in group]  # small: copied out
    _BUFFERS.give_back(buffer)
    return out


def _groups(stored: list[Stored]) -> Iterator[list[Stored]]:
    group: list[Stored] = []
    for t in stored:
        if t.end - t.start >= OWN_BUFFER:
            yield from [group, [t]] if group else [[t]]
            group = []
            continue
        if group and (t.end - group[0].start > GROUP or t.start - group[-1].end > OWN_BUFFER):
            yield group
            group = []
        group.append(t)
    if group:
        yield group


def iter_tensors(files: Iterable[Path], keys: set[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, array) file by file in file order, every tensor or those in `keys`; bf16 arrays come back as
    ml_dtypes.bfloat16 without any upcast. Reads run ahead in threads (module docstring)."""
    plan = [
        (file, group)
        for file in files
        for group in _groups([t for t in stored_tensors(file) if keys is None or t.key in keys])
    ]
    pending: deque[tuple[Future, int]] = deque()
    ahead = min(IN_FLIGHT, sum(group[-1].end - group[0].start for _, group in plan) // 16)
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="safetensors-read") as pool:
        in_flight, i = 0, 0
        try:
            while i < len(plan) or pending:
                while i < len(plan) and (not pending or in_flight < ahead):
                    file, group = plan[i]
                    size = group[-1].end - group[0].start
                    pending.append((pool.submit(_read_group, file, group), size))
                    in_flight += size
                    i += 1
                future, size = pending.popleft()
                in_flight -= size
                yield from future.result()
        finally:
            for future, _ in pending:
                future.cancel()


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
