"""How the processes of a cache build share the work: chunks of the manifest, a lock per process slot, waiting.

The manifest splits into chunks of `chunk_size` entries in manifest order; chunk c belongs to process c % P. A chunk
is done when its completion record exists (written, by atomic rename, after its data file is closed), so any process
can tell from the filesystem which chunks are done: no process group is needed (torch ranks have none before
training) and a build killed at any point resumes with the chunks it had not finished.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


def chunk_ranges(count: int, chunk_size: int) -> list[range]:
    """Entry indices of each chunk, in manifest order."""
    return [range(start, min(start + chunk_size, count)) for start in range(0, count, chunk_size)]


def my_chunks(chunks: int, process: int, processes: int) -> list[int]:
    return list(range(process, chunks, processes))


@contextmanager
def process_lock(cache_dir: Path, process: int) -> Iterator[None]:
    """Hold `cache_dir/.lock.<process>` (flock): a second build of the same cache waits here, saying so, until the
    first build's process of that index ends. The kernel releases the lock of a process that dies, so a killed build
    is taken over at once."""
    path = cache_dir / f".lock.{process}"
    with open(path, "a+") as f:
        if not _try_lock(f):
            f.seek(0)
            print(f"{path}: another build of this cache holds the lock ({f.read().strip()}); waiting", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}\n")
        f.flush()
        yield


def _try_lock(f: IO[str]) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def wait_until(done: Callable[[], bool], what: Callable[[], str], poll_s: float, report_s: float = 30.0) -> None:
    """Poll `done` every `poll_s` seconds; every `report_s` seconds print what is still awaited (never silent)."""
    last = time.monotonic()
    while not done():
        if time.monotonic() - last >= report_s:
            print(f"waiting for {what()}", flush=True)
            last = time.monotonic()
        time.sleep(poll_s)
