"""Aspect-ratio x duration buckets and a deterministic batch sampler (pure Python + numpy).

The sampler is the one batch order of both backends: grain (JAX) indexes it by global batch number, a torch
DataLoader uses it as `batch_sampler`. Batch k is a pure function of (seed, k), so resuming needs only k.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np


class BucketLike(Protocol):
    """What the data code reads of a bucket (a recipe's frozen BucketConfig among others)."""

    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def frames(self) -> int: ...
    @property
    def batch_size(self) -> int: ...


def available_frames(duration_s: float, source_fps: float, fps: float) -> int:
    """How many frames at `fps` fit in a clip of `duration_s` whose last frame starts 1/source_fps before the end."""
    span = max(duration_s - 1.0 / source_fps, 0.0)
    return int(math.floor(span * fps + 1e-6)) + 1


def assign_bucket(width: int, height: int, frames: int, is_image: bool, buckets: Sequence[BucketLike]) -> int | None:
    """Index of the bucket for a source of this size and number of available frames (None: no bucket fits).

    Images go to 1-frame buckets and videos to multi-frame buckets with no more frames than available; among those,
    the closest aspect ratio wins, then the longest clip, then the largest area.
    """
    aspect = width / height
    best, best_key = None, None
    for i, b in enumerate(buckets):
        if is_image != (b.frames == 1) or b.frames > frames:
            continue
        key = (round(abs(math.log(b.width / b.height / aspect)), 6), -b.frames, -b.width * b.height)
        if best_key is None or key < best_key:
            best, best_key = i, key
    return best


def epoch_batches(bucket_ids: Sequence[int], batch_sizes: Sequence[int], seed: int, epoch: int) -> list[list[int]]:
    """One epoch: samples shuffled within their bucket, cut into full batches of the bucket's size, batches shuffled.

    A bucket's remainder (fewer samples than its batch size) is left out of this epoch; the shuffle changes with
    the epoch, so different samples are left out each time.
    """
    rng = np.random.default_rng([seed, epoch])
    by_bucket: dict[int, list[int]] = {}
    for i, b in enumerate(bucket_ids):
        if b >= 0:  # -1: held out of training (LatentCache.hold_out)
            by_bucket.setdefault(int(b), []).append(i)
    batches = []
    for b in sorted(by_bucket):
        members = np.asarray(by_bucket[b])[rng.permutation(len(by_bucket[b]))]
        size = batch_sizes[b]
        batches += [members[k : k + size].tolist() for k in range(0, len(members) - size + 1, size)]
    return [batches[k] for k in rng.permutation(len(batches))]


class BucketBatchSampler:
    """Endless deterministic batches of sample indices; `batch(k)` is the k-th batch of the whole run."""

    def __init__(self, bucket_ids: Sequence[int], batch_sizes: Sequence[int], seed: int):
        self.bucket_ids, self.batch_sizes, self.seed = list(bucket_ids), list(batch_sizes), seed
        self._epochs: dict[int, list[list[int]]] = {}
        self.batches_per_epoch = len(epoch_batches(self.bucket_ids, self.batch_sizes, seed, 0))
        if self.batches_per_epoch == 0:
            raise ValueError(
                "no bucket has enough samples for one batch (per-bucket counts "
                f"{np.bincount(self.bucket_ids, minlength=len(batch_sizes)).tolist()}, batch sizes {self.batch_sizes})"
            )

    def __len__(self) -> int:
        return self.batches_per_epoch

    def batch(self, k: int) -> list[int]:
        epoch, i = divmod(k, self.batches_per_epoch)
        batches = self._epochs.get(epoch)
        if batches is None:  # pure function of the epoch: safe to compute twice from loader threads
            batches = epoch_batches(self.bucket_ids, self.batch_sizes, self.seed, epoch)
            self._epochs = {e: b for e, b in self._epochs.items() if e >= epoch - 1} | {epoch: batches}
        return batches[i]

    def __iter__(self) -> Iterator[list[int]]:
        """One epoch from the start (what a torch DataLoader's batch_sampler iterates)."""
        return iter(epoch_batches(self.bucket_ids, self.batch_sizes, self.seed, 0))


def host_slice(indices: Sequence[int], process_index: int, process_count: int) -> list[int]:
    """The contiguous part of a global batch that one host loads (its devices hold those rows)."""
    n = len(indices)
    if n % process_count:
        raise ValueError(f"global batch of {n} does not split over {process_count} hosts")
    per = n // process_count
    return list(indices[process_index * per : (process_index + 1) * per])
