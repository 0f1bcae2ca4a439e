"""The latent/text cache: each manifest entry decoded into its bucket and encoded once; training reads the cache.

Layout of `cache_dir`: `index.json` (the samples in order with their bucket, caption and source; the skipped entries
with reasons; the settings that built the cache; its data folder and files), the data folder `data-<settings key>/`
with `chunk-NNNNNN.array_record` (one record per sample: contentv_common.data.record) and `empty_prompt.safetensors`
(the encoded "" used for text dropout, one record in the same format) and, for a recipe with `eval.prompts`,
`eval_prompts.safetensors` (those prompts' text [N, L, D] and pooled [N, P], float32, by the cache's encoders).
Sample i is record i of the chunk files taken in order (grain's ArrayRecordDataSource over them). `index.json` is
written last, atomically, and names its data folder, so a cache reads as complete only once everything it refers to
is there; the previous cache stays readable until then. contentv_common.data.build writes it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from grain.sources import ArrayRecordDataSource
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from contentv_common.data.buckets import BucketLike
from contentv_common.data.record import CacheDtype, from_bytes
from contentv_common.demo import demo_identity
from contentv_common.errors import DataError

INDEX = "index.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
EVAL_PROMPTS = "eval_prompts.safetensors"


class Encoders(Protocol):
    """What the cache needs from the VAE and text encoders (contentv_torch_npu.encoders.Encoders provides it)."""

    latent_channels: int
    text_dim: int
    pooled_dim: int

    def encode_video(self, frames: np.ndarray) -> np.ndarray: ...

    def encode_text(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]: ...


def bucket_name(b: BucketLike) -> str:
    return f"{b.width}x{b.height}x{b.frames}"


@dataclass
class CacheIndex:
    """What `index.json` holds: the cached samples in order, the entries that were skipped with reasons, the
    settings, and where the records are (`data` folder, its chunk `files` in order)."""

    samples: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    data: str = ""
    files: list[str] = field(default_factory=list)

    @property
    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(s["reason"] for s in self.skipped))


def cache_settings(
    manifest: str | Path,
    buckets: Sequence[BucketLike],
    fps: float,
    encoders_name: str,
    cache_dtype: CacheDtype = "float32",
    chunk_size: int = 64,
    text: str = "cached",
) -> dict[str, Any]:
    """What a cache depends on; a cache whose settings differ must be rebuilt. `text` "online": latents only."""
    settings = {
        "manifest": str(Path(manifest).resolve()),
        "buckets": [bucket_name(b) for b in buckets],
        "fps": fps,
        "encoders": f"demo:{demo_identity()}" if encoders_name == "demo" else encoders_name,
        "cache_dtype": cache_dtype,
        "chunk_size": chunk_size,
    }
    return settings if text == "cached" else {**settings, "text": text}


def settings_key(settings: dict[str, Any]) -> str:
    """A short hash of the settings: names the build and data folders."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def read_index(cache_dir: str | Path) -> CacheIndex:
    path = Path(cache_dir) / INDEX
    if not path.exists():
        raise FileNotFoundError(f"{path}: no cache index (run the cache step first)")
    data = json.loads(path.read_text())
    if "data" not in data:
        raise DataError(f"{path}: a cache of the older one-file-per-sample layout (tools/prepare_data.py rebuilds it)")
    return CacheIndex(**data)


def cache_is_current(cache_dir: str | Path, settings: dict[str, Any]) -> bool:
    try:
        return read_index(cache_dir).settings == settings
    except (FileNotFoundError, DataError):
        return False


def eval_prompts_current(cache_dir: str | Path, prompts: Sequence[str]) -> bool:
    """`cache_dir` holds the embeddings of exactly `prompts`, encoded by the encoders that built the cache."""
    path = Path(cache_dir) / EVAL_PROMPTS
    if not path.is_file():
        return False
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    encoders = read_index(cache_dir).settings["encoders"]
    return meta.get("prompts") == json.dumps(list(prompts)) and meta.get("encoders") == encoders


def write_eval_prompts(cache_dir: str | Path, prompts: Sequence[str], encoders: Encoders) -> None:
    """Encode `prompts` (a recipe's `eval.prompts`) with the cache's encoders into `cache_dir`, atomically."""
    text, pooled = encoders.encode_text(list(prompts))
    path = Path(cache_dir) / EVAL_PROMPTS
    tmp = path.with_name(path.name + ".tmp")
    meta = {"prompts": json.dumps(list(prompts)), "encoders": read_index(cache_dir).settings["encoders"]}
    arrays = {"text": np.ascontiguousarray(text, np.float32), "pooled": np.ascontiguousarray(pooled, np.float32)}
    save_file(arrays, str(tmp), metadata=meta)
    os.replace(tmp, path)


def read_eval_prompts(cache_dir: str | Path, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(text [N, L, D], pooled [N, P]) of `prompts`, as `write_eval_prompts` stored them."""
    if not eval_prompts_current(cache_dir, prompts):
        raise DataError(
            f"eval.prompts: {Path(cache_dir) / EVAL_PROMPTS} does not hold these prompts' embeddings by the cache's "
            "encoders (contentv-train's data step writes it: contentv_common.data.prepare.prepare_data)"
        )
    stored = load_file(str(Path(cache_dir) / EVAL_PROMPTS))
    return stored["text"], stored["pooled"]


class LatentCache:
    """Random access to a built cache: samples by index, their buckets (as indices into `buckets`), the empty prompt."""

    def __init__(self, cache_dir: str | Path, buckets: Sequence[BucketLike]):
        self.dir = Path(cache_dir)
        self.index = read_index(self.dir)
        names = [bucket_name(b) for b in buckets]
        self.bucket_ids = []
        for s in self.index.samples:
            if s["bucket"] not in names:
                raise ValueError(
                    f"{self.dir / INDEX}: sample {s['source']} is in bucket {s['bucket']}, not one of {names}"
                )
            self.bucket_ids.append(names.index(s["bucket"]))
        self.dtype: CacheDtype = self.index.settings["cache_dtype"]
        data = self.dir / self.index.data
        self.paths = [str(data / f) for f in self.index.files]
        self._source: ArrayRecordDataSource | None = None  # opened on first read, in the process that reads
        empty = from_bytes((data / EMPTY_PROMPT).read_bytes(), self.dtype)
        self.empty_text, self.empty_pooled = empty["text"], empty["pooled"]

    def __getstate__(self) -> dict[str, Any]:
        """Loader workers get the cache without its open files (each opens its own)."""
        return {**self.__dict__, "_source": None}

    def __len__(self) -> int:
        return len(self.index.samples)

    def hold_out(self, count: int, seed: int) -> list[int]:
        """Take `count` samples (a seeded choice, one per bucket in turn) out of training: their bucket id becomes -1,
        so the batch samplers skip them; returns their indices, for validation (recipe `eval`)."""
        if count <= 0:
            return []
        if count >= len(self):
            raise ValueError(f"{self.dir}: eval.samples={count} would hold out all {len(self)} cached samples")
        order = np.random.default_rng([seed, 1 << 20]).permutation(len(self)).tolist()
        held = sorted(order[:count])
        for i in held:
            self.bucket_ids[i] = -1
        return held

    def sample(self, i: int) -> dict[str, np.ndarray]:
        """Sample i's latents, text and pooled, float32."""
        if self._source is None:
            self._source = ArrayRecordDataSource(self.paths)
        try:
            return from_bytes(self._source[i], self.dtype)
        except (OSError, SafetensorError, ValueError) as e:
            where = f"{self.dir / self.index.data}: sample {i} ({self.index.samples[i]['source']})"
            raise OSError(f"{where}: cannot read this cached sample ({e}); delete {INDEX} to rebuild") from None

    def batch(self, indices: list[int]) -> dict[str, np.ndarray]:
        """Stacked latents [B, C, f, h, w], text [B, L, D], pooled [B, P] (a cache with text) of the given samples."""
        rows = [self.sample(i) for i in indices]
        return {k: np.stack([r[k] for r in rows]) for k in ("latents", "text", "pooled") if k in rows[0]}

    def captions(self, indices: list[int]) -> list[str]:
        return [self.index.samples[i]["caption"] for i in indices]
