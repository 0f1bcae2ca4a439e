"""Building the latent/text cache (layout: contentv_common.data.cache) by every process of a run, resumably.

Every process probes the manifest until it finds a usable clip (a manifest without one is a DataError before any
encoder loads), then decodes and encodes its chunks (contentv_common.data.shard) into `.build-<settings key>/`: per
chunk an ArrayRecord file, then its completion record `chunk-NNNNNN.json` (the chunk's samples and skipped entries).
A killed build resumes from the chunks without a completion record; other settings' `.build-*` folders are stale and
removed. When every chunk is done, process 0 encodes the empty prompt, renames the build folder to `data-<key>/` and
writes `index.json`, atomically: the commit. What is written depends on the manifest, the settings and the encoders,
never on the process count. Bad entries (unreadable, empty, too short or undecodable videos, non-string captions) are
skipped with their reason.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from contentv_common.config.recipe import DataConfig
from contentv_common.data.buckets import BucketLike, assign_bucket, available_frames
from contentv_common.data.cache import (
    EMPTY_PROMPT,
    INDEX,
    CacheIndex,
    Encoders,
    bucket_name,
    cache_is_current,
    cache_settings,
    read_index,
    settings_key,
)
from contentv_common.data.decode import decode_clip, probe
from contentv_common.data.manifest import ManifestEntry, read_manifest
from contentv_common.data.record import CacheDtype, to_bytes, write_records
from contentv_common.data.shard import chunk_ranges, my_chunks, process_lock, wait_until
from contentv_common.errors import ClipError, DataError


def clip_bucket(entry: ManifestEntry, buckets: Sequence[BucketLike], fps: float) -> int:
    """The bucket `entry` goes to, from its probe; ClipError with the reason when it cannot be used."""
    if entry.problem is not None:
        raise ClipError(entry.problem, f"{entry.path}: the caption is not a string")
    info = probe(entry)
    frames = 1 if entry.is_image else available_frames(info.duration_s, info.fps, fps)
    b = assign_bucket(info.width, info.height, frames, entry.is_image, buckets)
    if b is None:
        kind = "image" if entry.is_image else f"video with {frames} frames at {fps} fps"
        raise ClipError("no_bucket" if entry.is_image else "too_short", f"{entry.path}: no bucket for {kind}")
    return b


def check_usable(manifest: Path, entries: Sequence[ManifestEntry], buckets: Sequence[BucketLike], fps: float) -> None:
    """DataError unless some entry can be cached; probes entries in order until the first usable one."""
    reasons: Counter[str] = Counter()
    first = ""
    for entry in entries:
        try:
            clip_bucket(entry, buckets, fps)
            return
        except ClipError as e:
            reasons[e.reason] += 1
            first = first or f"; first: {e}"
    counts = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
    raise DataError(f"{manifest}: no usable clip among its {len(entries)} entries ({counts or 'none'}){first}")


def _records(
    entries: Sequence[ManifestEntry],
    buckets: Sequence[BucketLike],
    fps: float,
    encoders: Encoders,
    dtype: CacheDtype,
    batch: int,
    done: dict[str, list[dict[str, Any]]],
    text: bool = True,
) -> Iterator[bytes]:
    """The records of `entries` in order, `batch` decoded clips at a time: the clips of one shape encoded together
    (the backend spreads them over its devices), their captions together (latents alone without `text`); the
    samples and skipped entries go to `done`."""
    pending: list[tuple[np.ndarray, dict[str, Any]]] = []

    def flush() -> Iterator[bytes]:
        latents: list[Any] = [None] * len(pending)
        for shape in dict.fromkeys(clip.shape for clip, _ in pending):
            rows = [i for i, (clip, _) in enumerate(pending) if clip.shape == shape]
            for i, z in zip(rows, encoders.encode_video(np.stack([pending[i][0] for i in rows])), strict=True):
                latents[i] = z
        if text and pending:
            embeds, pooled = encoders.encode_text([sample["caption"] for _, sample in pending])
        for i, (_, sample) in enumerate(pending):
            done["samples"].append(sample)
            row = {"latents": latents[i], "text": embeds[i], "pooled": pooled[i]} if text else {"latents": latents[i]}
            yield to_bytes(row, dtype)
        pending.clear()

    for entry in entries:
        try:
            bucket = buckets[clip_bucket(entry, buckets, fps)]
            clip = decode_clip(entry.path, fps, bucket.frames, bucket.width, bucket.height)
        except ClipError as e:
            done["skipped"].append({"path": str(entry.path), "reason": e.reason, "message": str(e)})
            continue
        pending.append((clip, {"bucket": bucket_name(bucket), "caption": entry.caption, "source": str(entry.path)}))
        if len(pending) == batch:
            yield from flush()
    yield from flush()


def data_settings(data: DataConfig) -> dict[str, Any]:
    """cache_settings of a recipe's data section."""
    return cache_settings(
        data.manifest, list(data.buckets), data.fps, data.encoders, data.cache_dtype, data.chunk_size, data.text
    )


def build_data_cache(
    data: DataConfig,
    encoders: Callable[[], Encoders],
    *,
    process: int = 0,
    processes: int = 1,
    progress: bool = True,
    poll_s: float = 1.0,
) -> CacheIndex:
    """build_cache of a recipe's data section (its manifest, buckets, fps, encoders, dtype, chunks and text)."""
    return build_cache(
        data.manifest,
        data.cache_dir,
        encoders,
        list(data.buckets),
        data.fps,
        data.encoders,
        cache_dtype=data.cache_dtype,
        chunk_size=data.chunk_size,
        text=data.text == "cached",
        process=process,
        processes=processes,
        progress=progress,
        poll_s=poll_s,
    )


def chunk_file(c: int) -> str:
    return f"chunk-{c:06d}.array_record"


def completion_record(build: Path, c: int) -> Path:
    return build / f"chunk-{c:06d}.json"


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    _fsync(tmp)
    os.replace(tmp, path)


def _remove_stale(cache_dir: Path, keep: set[str]) -> None:
    """Build and data folders of other settings (or of a cache no index refers to), and the older layout's files."""
    for folder in [*cache_dir.glob(".build-*"), *cache_dir.glob("data-*"), cache_dir / "samples"]:
        if folder.name not in keep:
            shutil.rmtree(folder, ignore_errors=True)
    (cache_dir / EMPTY_PROMPT).unlink(missing_ok=True)


def committed_data(cache_dir: Path) -> str:
    """The data folder the current index names ("" without a readable index)."""
    try:
        return read_index(cache_dir).data
    except (FileNotFoundError, DataError):
        return ""


def _commit(cache_dir: Path, build: Path, key: str, settings: dict[str, Any], chunks: int, encoders: Encoders) -> None:
    """Process 0, once every chunk is done: the empty prompt, the data folder, then `index.json` (atomically)."""
    done = [json.loads(completion_record(build, c).read_text()) for c in range(chunks)]
    text, pooled = encoders.encode_text([""])
    (build / EMPTY_PROMPT).write_bytes(to_bytes({"text": text[0], "pooled": pooled[0]}, settings["cache_dtype"]))
    data = cache_dir / f"data-{key}"
    shutil.rmtree(data, ignore_errors=True)  # a cache of these settings whose index was lost
    os.replace(build, data)
    index = CacheIndex(
        samples=[s for d in done for s in d["samples"]],
        skipped=[s for d in done for s in d["skipped"]],
        settings=settings,
        data=data.name,
        files=[chunk_file(c) for c in range(chunks)],
    )
    _write_atomic(cache_dir / INDEX, json.dumps(asdict(index), indent=1).encode())
    _remove_stale(cache_dir, {data.name})


def build_cache(
    manifest: str | Path,
    cache_dir: str | Path,
    encoders: Callable[[], Encoders],
    buckets: Sequence[BucketLike],
    fps: float,
    encoders_name: str = "",
    *,
    cache_dtype: CacheDtype = "float32",
    chunk_size: int = 64,
    process: int = 0,
    processes: int = 1,
    progress: bool = True,
    batch: int = 8,
    poll_s: float = 1.0,
    text: bool = True,
) -> CacheIndex:
    """Build (or finish building) the cache of `manifest` in `cache_dir` as process `process` of `processes` (every
    process of the run calls it); returns the committed index. `encoders` loads the encoders, called only if this
    process has something to encode. Without `text` (recipe data.text: online) the records hold latents only; the
    empty prompt is encoded either way."""
    manifest, cache_dir = Path(manifest), Path(cache_dir)
    settings = cache_settings(
        manifest, buckets, fps, encoders_name, cache_dtype, chunk_size, "cached" if text else "online"
    )
    entries = read_manifest(manifest)
    check_usable(manifest, entries, buckets, fps)
    load = functools.cache(encoders)
    key = settings_key(settings)
    build = cache_dir / f".build-{key}"
    chunks = chunk_ranges(len(entries), chunk_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with process_lock(cache_dir, process):
        if not cache_is_current(cache_dir, settings):
            if process == 0:
                _remove_stale(cache_dir, {build.name, committed_data(cache_dir)})
            build.mkdir(exist_ok=True)
            todo = [c for c in my_chunks(len(chunks), process, processes) if not completion_record(build, c).exists()]
            clips, seconds = 0, 0.0  # the build's rate: decoding, encoding and writing (not loading the encoders)
            for c in tqdm(todo, desc=f"cache chunks of process {process}", disable=not progress):
                if cache_is_current(cache_dir, settings):  # committed meanwhile (this process's chunks were done)
                    break
                mine = [entries[i] for i in chunks[c]]
                ready = load()
                start = time.perf_counter()
                clips += write_chunk(build, c, mine, buckets, fps, ready, cache_dtype, batch, text)
                seconds += time.perf_counter() - start
            if clips:
                rate = f"{clips} clips in {seconds:.1f} s ({clips / seconds:.2f} clips/s)"
                print(f"process {process} encoded {rate} into {cache_dir}", flush=True)
            if process == 0:

                def missing() -> list[int]:
                    return [c for c in range(len(chunks)) if not completion_record(build, c).exists()]

                wait_until(lambda: not missing(), lambda: f"{build}: chunks {missing()[:8]} of other processes", poll_s)
                _commit(cache_dir, build, key, settings, len(chunks), load())
    committed = f"process 0 to commit {cache_dir / INDEX}"
    wait_until(lambda: cache_is_current(cache_dir, settings), lambda: committed, poll_s)
    return read_index(cache_dir)


def write_chunk(
    build: Path,
    c: int,
    entries: Sequence[ManifestEntry],
    buckets: Sequence[BucketLike],
    fps: float,
    encoders: Encoders,
    dtype: CacheDtype,
    batch: int,
    text: bool = True,
) -> int:
    """Chunk c's ArrayRecord file, then (the file closed and renamed into place) its completion record; returns how
    many clips it holds."""
    done: dict[str, list[dict[str, Any]]] = {"samples": [], "skipped": []}
    tmp = build / (chunk_file(c) + ".tmp")
    write_records(tmp, _records(entries, buckets, fps, encoders, dtype, batch, done, text))
    _fsync(tmp)
    os.replace(tmp, build / chunk_file(c))
    _write_atomic(completion_record(build, c), json.dumps(done).encode())
    return len(done["samples"])
