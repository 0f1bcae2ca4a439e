"""The disk's direct read bandwidth for a checkpoint's own files, the yardstick of the load benchmarks.

`drop_cache(files)` evicts the files from the page cache (posix_fadvise DONTNEED: only these files, so other work on
the machine keeps its cache), so a load that follows reads from the disk. `direct_read(files)` reads them with
O_DIRECT (no page cache) in 64 MiB requests from 4 threads into reused buffers: the disk alone, with no memory to
fault in and no copies, the most any loader could reach. Both are used by tools/bench_load.py,
tools/bench_train_state.py and tools/smoke_full_size.py, which read the files directly just before and just after the
load (a shared disk's speed drifts) and compare the load with the two together (`combined`); `checkpoint_files` says
which files a load reads, `rss_bytes` what the process holds.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CHUNK = 64 << 20
THREADS = 4


def drop_cache(files: list[Path]) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def direct_read(files: list[Path]) -> dict[str, float]:
    """{bytes, seconds, gb_per_s} of reading `files` whole with O_DIRECT (the page cache dropped first)."""
    drop_cache(files)
    jobs = [(f, offset) for f in files for offset in range(0, os.path.getsize(f), CHUNK)]
    local = threading.local()

    def read(job: tuple[Path, int]) -> int:
        file, offset = job
        if not hasattr(local, "buffer"):
            local.buffer = mmap.mmap(-1, CHUNK)
        try:
            fd = os.open(file, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
        except OSError:  # a file system without direct I/O (tmpfs): an ordinary read of a dropped cache
            fd = os.open(file, os.O_RDONLY)
        try:
            return os.preadv(fd, [local.buffer], offset)
        finally:
            os.close(fd)

    start = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        total = sum(pool.map(read, jobs))
    seconds = time.perf_counter() - start
    drop_cache(files)
    return {"bytes": total, "seconds": seconds, "gb_per_s": total / seconds / 1e9}


def combined(reads: list[dict[str, float]]) -> dict[str, float]:
    """Several direct reads as one: their bytes over their seconds, with the slowest and fastest rate."""
    nbytes, seconds = sum(r["bytes"] for r in reads), sum(r["seconds"] for r in reads)
    rates = [r["gb_per_s"] for r in reads]
    return {
        "bytes": nbytes,
        "seconds": seconds,
        "gb_per_s": nbytes / seconds / 1e9,
        "min": min(rates),
        "max": max(rates),
    }


def checkpoint_files(folder: Path) -> list[Path]:
    """The files a load reads: the safetensors weights (diffusers / torch format) or everything of an orbax folder."""
    found = sorted(folder.glob("*.safetensors"))
    return found or sorted(p for p in folder.rglob("*") if p.is_file())


def rss_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
