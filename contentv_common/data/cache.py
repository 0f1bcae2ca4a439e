"""The latent/text cache: decode each manifest entry into its bucket, encode it once, train from the cache.

Layout of `cache_dir`: `samples/NNNNNN.safetensors` (latents [C, f, h, w], text [L, D], pooled [P], float32),
`empty_prompt.safetensors` (the encoded "" used for text dropout), `index.json` (samples with their bucket, the
skipped files with reasons) and, for a recipe with `eval.prompts`, `eval_prompts.safetensors` (those prompts' text
[N, L, D] and pooled [N, P], encoded by the cache's encoders). A build writes into a fresh `.build-*` folder inside
`cache_dir`, then moves the new files in and writes `index.json` last, atomically: without it the cache is not
complete, and a crash leaves no mix of old and new samples. One process builds (tools/train.py: process or rank 0;
the others wait at a barrier).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from contentv_common.data.buckets import BucketLike, assign_bucket, available_frames
from contentv_common.data.decode import decode_clip, probe
from contentv_common.data.manifest import read_manifest
from contentv_common.demo import demo_identity
from contentv_common.errors import ClipError, DataError

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
    """What `index.json` holds: the cached samples and the files that were skipped, with reasons."""

    samples: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(s["reason"] for s in self.skipped))


def _save_atomic(path: Path, tensors: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def cache_settings(
    manifest: str | Path, buckets: Sequence[BucketLike], fps: float, encoders_name: str, text: str = "cached"
) -> dict[str, Any]:
    """What a cache depends on; a cache whose settings differ must be rebuilt. `text` "online": latents only."""
    settings = {
        "manifest": str(Path(manifest).resolve()),
        "buckets": [bucket_name(b) for b in buckets],
        "fps": fps,
        "encoders": f"demo:{demo_identity()}" if encoders_name == "demo" else encoders_name,
    }
    return settings if text == "cached" else {**settings, "text": text}


def build_cache(
    manifest: str | Path,
    cache_dir: str | Path,
    encoders: Encoders,
    buckets: Sequence[BucketLike],
    fps: float,
    encoders_name: str = "",
    progress: bool = True,
    text_batch: int = 8,
    text: bool = True,
) -> CacheIndex:
    """Decode, bucket and encode every manifest entry into `cache_dir`; bad entries are skipped and counted.

    Captions go through the text encoders `text_batch` at a time (one batched call, as the accelerator likes it);
    each sample's file is written once its caption is encoded. Without `text` (recipe data.text: online) the samples
    hold latents only; the empty prompt is encoded either way."""
    cache_dir = Path(cache_dir)
    entries = read_manifest(manifest)
    cache_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*cache_dir.glob(".build-*"), *cache_dir.glob(".old-*")]:  # left by a build that crashed
        shutil.rmtree(stale, ignore_errors=True)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    (build / "samples").mkdir()
    settings = cache_settings(manifest, buckets, fps, encoders_name, "cached" if text else "online")
    index = CacheIndex(samples=[], settings=settings)
    pending: list[tuple[np.ndarray, dict[str, str]]] = []  # encoded latents whose captions wait for the text batch

    def write_pending() -> None:
        if not pending:
            return
        if text:
            embeds, pooled = encoders.encode_text([sample["caption"] for _, sample in pending])
        for i, (latents, sample) in enumerate(pending):
            row = {"latents": latents, "text": embeds[i], "pooled": pooled[i]} if text else {"latents": latents}
            _save_atomic(build / sample["file"], row)
            index.samples.append(sample)
        pending.clear()

    for entry in tqdm(entries, desc="cache latents", disable=not progress):
        try:
            info = probe(entry)
            frames = 1 if entry.is_image else available_frames(info.duration_s, info.fps, fps)
            b = assign_bucket(info.width, info.height, frames, entry.is_image, buckets)
            if b is None:
                kind = "image" if entry.is_image else f"video with {frames} frames at {fps} fps"
                raise ClipError(
                    "too_short" if not entry.is_image else "no_bucket", f"{entry.path}: no bucket for {kind}"
                )
            bucket = buckets[b]
            clip = decode_clip(entry.path, fps, bucket.frames, bucket.width, bucket.height)
        except ClipError as e:
            index.skipped.append({"path": str(entry.path), "reason": e.reason, "message": str(e)})
            continue
        name = f"samples/{len(index.samples) + len(pending):06d}.safetensors"
        sample = {"file": name, "bucket": bucket_name(bucket), "caption": entry.caption, "source": str(entry.path)}
        pending.append((encoders.encode_video(clip[None])[0], sample))
        if len(pending) == text_batch:
            write_pending()
    write_pending()
    empty_text, empty_pooled = encoders.encode_text([""])
    _save_atomic(build / EMPTY_PROMPT, {"text": empty_text[0], "pooled": empty_pooled[0]})
    (build / INDEX).write_text(
        json.dumps({"samples": index.samples, "skipped": index.skipped, "settings": index.settings}, indent=1)
    )
    _move_in(build, cache_dir)
    return index


def _move_in(build: Path, cache_dir: Path) -> None:
    """Replace the cache in `cache_dir` by the finished build: unindex, swap `samples/`, index (the commit)."""
    (cache_dir / INDEX).unlink(missing_ok=True)
    old = cache_dir / (".old-" + build.name.removeprefix(".build-"))
    if (cache_dir / "samples").exists():
        os.replace(cache_dir / "samples", old)
    os.replace(build / "samples", cache_dir / "samples")
    os.replace(build / EMPTY_PROMPT, cache_dir / EMPTY_PROMPT)
    os.replace(build / INDEX, cache_dir / INDEX)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(build, ignore_errors=True)


def read_index(cache_dir: str | Path) -> CacheIndex:
    path = Path(cache_dir) / INDEX
    if not path.exists():
        raise FileNotFoundError(f"{path}: no cache index (run the cache step first)")
    data = json.loads(path.read_text())
    return CacheIndex(samples=data["samples"], skipped=data["skipped"], settings=data["settings"])


def cache_is_current(cache_dir: str | Path, settings: dict[str, Any]) -> bool:
    try:
        return read_index(cache_dir).settings == settings
    except FileNotFoundError:
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
                    f"{self.dir / INDEX}: sample {s['file']} is in bucket {s['bucket']}, not one of {names}"
                )
            self.bucket_ids.append(names.index(s["bucket"]))
        empty = load_file(str(self.dir / EMPTY_PROMPT))
        self.empty_text, self.empty_pooled = empty["text"], empty["pooled"]

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
        path = self.dir / self.index.samples[i]["file"]
        try:
            return load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise OSError(f"{path}: cannot read this cached sample ({e}); delete {INDEX} to rebuild") from None

    def batch(self, indices: list[int]) -> dict[str, np.ndarray]:
        """Stacked latents [B, C, f, h, w], text [B, L, D], pooled [B, P] (a cache with text) of the given samples."""
        rows = [self.sample(i) for i in indices]
        return {k: np.stack([r[k] for r in rows]) for k in ("latents", "text", "pooled") if k in rows[0]}

    def captions(self, indices: list[int]) -> list[str]:
        return [self.index.samples[i]["caption"] for i in indices]
