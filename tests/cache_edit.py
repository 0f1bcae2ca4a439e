"""Edit a built cache's records in place (the tests' NaN and unreadable samples)."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
from grain.sources import ArrayRecordDataSource

from contentv_common.data.cache import read_index
from contentv_common.data.record import from_bytes, to_bytes, write_records


def rewrite_records(cache_dir: Path, edit: Callable[[int, bytes], bytes]) -> None:
    """Replace sample i's record by `edit(i, record)`, for every sample."""
    index = read_index(cache_dir)
    first = 0
    for name in index.files:
        path = cache_dir / index.data / name
        records = [source[i] for source in [ArrayRecordDataSource([str(path)])] for i in range(len(source))]
        write_records(path, [edit(first + i, r) for i, r in enumerate(records)])
        first += len(records)


def nan_latents(cache_dir: Path) -> None:
    """Every sample's latents become NaN."""
    dtype = read_index(cache_dir).settings["cache_dtype"]

    def edit(_: int, record: bytes) -> bytes:
        arrays = from_bytes(record, dtype)
        return to_bytes({**arrays, "latents": np.full_like(arrays["latents"], np.nan)}, dtype)

    rewrite_records(cache_dir, edit)
