"""Benchmark: samples per second one process's loader delivers from a local cache, against what it consumes per step.

    python tools/bench_loader.py --recipe configs/recipes/stage4_480p.yaml [--samples 32] [--batches 24] [--text online]

A cache of `--samples` samples of the recipe's largest bucket's sizes (its latents, 333 x 4096 text, pooled 2048, in
its `data.cache_dtype`; with `--text online`, latents only, the loader tokenizing each row's caption with the tiny
encoders' CLIP and T5 tokenizers) is built through the cache builder from tiny clips,
with stand-in encoders that return arrays of those shapes: only the records' sizes and the read path matter here.
Its files leave the page cache, then the JAX loader (contentv_jax.data.make_loader: grain, the recipe's threads and
prefetch) yields one process's rows of consecutive global batches, each with its step's random inputs (noise, noise
levels, text dropout); the first batch is left out (start-up). Reported: rows per second, bytes per second against
the disk's direct read of the same files (contentv_common/checkpoint/disk_speed.py), and the rate the process
consumes: its rows of a global batch over the step's time, the step's FLOPs (the recipe's v5p plan in docs/plans/) at
40% of a v5p chip's bf16 peak (459 TFLOP/s) over the recipe's chips, one process per 4-chip host.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import av
import numpy as np

from contentv_common.checkpoint.disk_speed import direct_read, drop_cache
from contentv_common.cli import run_cli
from contentv_common.config.recipe import BucketConfig, Recipe, load_recipe
from contentv_common.data.build import build_cache
from contentv_common.data.cache import read_index
from contentv_common.data.manifest import write_manifest
from contentv_common.sampling import latent_shape

ROOT = Path(__file__).resolve().parent.parent
V5P_BF16_FLOPS = 459e12
UTILISATION = 0.4
CHIPS_PER_HOST = 4
TEXT_TOKENS, TEXT_DIM, POOLED_DIM = 333, 4096, 2048
CLIP = BucketConfig(width=64, height=64, frames=1, batch_size=1)  # the stand-in stills' bucket


class ShapedEncoders:
    """Stand-in encoders: arrays of the real sizes (random, so they do not compress), whatever the clip or caption."""

    latent_channels, text_dim, pooled_dim = 16, TEXT_DIM, POOLED_DIM

    def __init__(self, latents: tuple[int, ...]):
        self.latents, self.rng = latents, np.random.default_rng(0)

    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        return self.rng.standard_normal((len(frames), *self.latents), dtype=np.float32)

    def encode_text(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        n = len(captions)
        text = self.rng.standard_normal((n, TEXT_TOKENS, TEXT_DIM), dtype=np.float32)
        return text, self.rng.standard_normal((n, POOLED_DIM), dtype=np.float32)


def largest(recipe: Recipe) -> BucketConfig:
    return max(recipe.data.buckets, key=lambda b: (b.width * b.height * b.frames, b.batch_size))


def rows_per_process(recipe: Recipe, chips: int, batch: int) -> tuple[int, int, int]:
    """(rows a process feeds, its row blocks, all row blocks): the batch splits into data x fsdp blocks; a host's
    chips hold one block or several (a block spread over hosts is fed whole by each of them)."""
    blocks = recipe.mesh.data * recipe.mesh.fsdp
    mine = max(1, CHIPS_PER_HOST * blocks // chips)
    return batch // blocks * mine, mine, blocks


def step_seconds(name: str, bucket: BucketConfig, chips: int) -> float:
    """The train step's time at the bucket from recipe `name`'s v5p plan, at UTILISATION of the chips' bf16 peak."""
    plan = ROOT / "docs" / "plans" / f"{name}.v5p-4x4x4.json"
    if not plan.is_file():
        raise FileNotFoundError(f"{plan}: no v5p plan of this recipe (python tools/plan.py --all)")
    steps = json.loads(plan.read_text())["steps"]
    flops = next(s["flops"] for s in steps if s["kind"] == "train" and s["bucket"] == bucket.name)
    return flops / (chips * UTILISATION * V5P_BF16_FLOPS)


def build(recipe: Recipe, bucket: BucketConfig, samples: int, work: Path, text: bool) -> Path:
    """The shaped cache in `work` (rebuilt every run: the samples' sizes are the point)."""
    shutil.rmtree(work, ignore_errors=True)
    clips = work / "clips"
    clips.mkdir(parents=True)
    rows = []
    for i in range(samples):
        still = np.full((CLIP.height, CLIP.width, 3), i % 255, np.uint8)
        av.VideoFrame.from_ndarray(still, format="rgb24").to_image().save(clips / f"{i}.png")
        rows.append({"path": f"clips/{i}.png", "caption": f"clip {i}"})
    manifest = write_manifest(work / "manifest.jsonl", rows)
    shape = latent_shape(16, bucket.frames, bucket.height, bucket.width)[1:]
    data = recipe.data
    build_cache(manifest, work / "cache", lambda: ShapedEncoders(shape), [CLIP], data.fps, "bench",
                cache_dtype=data.cache_dtype, chunk_size=data.chunk_size, progress=False, text=text)  # fmt: skip
    return work / "cache"


def measure(path: Path, samples: int, batches: int, work: Path, text: str) -> dict[str, Any]:
    from contentv_jax.data import make_loader

    recipe = load_recipe(path, {"data.text": text, **({"data.encoders": "tiny"} if text == "online" else {})})
    chips = recipe.mesh.data * recipe.mesh.fsdp * recipe.mesh.sequence * recipe.mesh.tensor
    bucket = largest(recipe)
    rows, mine, blocks = rows_per_process(recipe, chips, bucket.batch_size)
    if samples < bucket.batch_size:
        raise ValueError(f"--samples {samples}: needs at least the bucket's batch of {bucket.batch_size}")
    cache = build(recipe, bucket, samples, work, text == "cached")
    index = read_index(cache)
    files = [cache / index.data / f for f in index.files]
    disk = direct_read(files)
    drop_cache(files)
    buckets = (dataclasses.replace(CLIP, batch_size=bucket.batch_size),)
    loaded = dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, cache_dir=str(cache), buckets=buckets))
    loader = make_loader(loaded, shards=(0, mine, blocks))
    t0 = time.perf_counter()
    first = next(loader)
    t1 = time.perf_counter()
    for _ in range(batches - 1):
        next(loader)
    elapsed = time.perf_counter() - t1
    record_bytes = sum(f.stat().st_size for f in files) / samples
    rate = rows * (batches - 1) / elapsed
    consumed = rows / step_seconds(path.stem, bucket, chips)
    return {
        "recipe": path.stem,
        "bucket": bucket.name,
        "cache_dtype": recipe.data.cache_dtype,
        "text": text,
        "rows_per_process": rows,
        "record_mb": record_bytes / 1e6,
        "first_batch_s": t1 - t0,
        "rows_per_s": rate,
        "read_gb_per_s": rate * record_bytes / 1e9,
        "disk_gb_per_s": disk["gb_per_s"],
        "consumed_rows_per_s": consumed,
        "headroom": rate / consumed,
        "latents_shape": list(first["latents"].shape),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, action="append", required=True, help="a stage recipe (repeatable)")
    ap.add_argument("--samples", type=int, default=32, help="samples in the cache")
    ap.add_argument("--batches", type=int, default=24, help="global batches read (the first is left out)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_loader"))
    ap.add_argument("--text", choices=["cached", "online"], default="cached", help="data.text of the recipes")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    results = [measure(r, args.samples, args.batches, args.work, args.text) for r in args.recipe]
    print("| recipe | bucket | cache, text | MB/sample | rows/process | rows/s read | GB/s read (disk) "
          "| rows/s consumed | read / consumed |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {Path(r['recipe']).stem} | {r['bucket']} | {r['cache_dtype']}, {r['text']} | {r['record_mb']:.2f} | "
              f"{r['rows_per_process']} | {r['rows_per_s']:.1f} | {r['read_gb_per_s']:.2f} "
              f"({r['disk_gb_per_s']:.2f}) | {r['consumed_rows_per_s']:.3f} | {r['headroom']:.0f}x |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(math.isfinite(r["headroom"]) for r in results) else 1


if __name__ == "__main__":
    run_cli(main)
