"""Batches for the torch trainer: a torch DataLoader over the shared bucket sampler and latent/text cache.

The global batch order is `BucketBatchSampler.batch(k)` (contentv_common.data), the same one the JAX trainer
reads; each data-parallel rank loads its contiguous slice of global batch k, and every rank of a
sequence-parallel group loads the same slice. Resuming at batch k needs only k.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from contentv_common.config.recipe import DataConfig
from contentv_common.data.buckets import BucketBatchSampler, host_slice
from contentv_common.data.build import build_data_cache, data_settings
from contentv_common.data.cache import (
    Encoders,
    LatentCache,
    cache_is_current,
    eval_prompts_current,
    write_eval_prompts,
)


class GlobalBatches(Sampler):
    """Endless `(k, global batch k)` from batch `start` on (one DataLoader item per training step)."""

    def __init__(self, sampler: BucketBatchSampler, start: int):
        self.sampler, self.start = sampler, start

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        k = self.start
        while True:
            yield k, self.sampler.batch(k)
            k += 1


class RankSlices(Dataset):
    """Item `(k, global indices)` -> this rank's rows of the batch as tensors (and, for online text, their
    `captions`), with where they sit globally."""

    def __init__(self, cache: LatentCache, dp_rank: int, dp: int, captions: bool = False):
        self.cache, self.dp_rank, self.dp, self.captions = cache, dp_rank, dp, captions

    def __getitem__(self, item: tuple[int, list[int]]) -> dict[str, Any]:
        k, indices = item
        mine = host_slice(indices, self.dp_rank, self.dp)
        arrays = self.cache.batch(mine)
        return {
            **{name: torch.from_numpy(a) for name, a in arrays.items()},
            **({"captions": self.cache.captions(mine)} if self.captions else {}),
            "batch_index": k,
            "global_size": len(indices),
            "offset": self.dp_rank * len(mine),
        }


def _identity(item: Any) -> Any:
    return item


def make_loader(cache: LatentCache, data: DataConfig, seed: int, start: int, dp_rank: int, dp: int) -> DataLoader:
    """A DataLoader yielding this rank's slice of global batches start, start + 1, ... (workers prefetch ahead)."""
    sizes = [b.batch_size for b in data.buckets]
    for b in data.buckets:
        if b.batch_size % dp:
            raise ValueError(f"data.buckets: batch_size {b.batch_size} of {b.name} does not split over {dp} ranks")
    sampler = BucketBatchSampler(cache.bucket_ids, sizes, seed)
    workers = data.num_threads
    return DataLoader(
        RankSlices(cache, dp_rank, dp, captions=data.text == "online"),
        sampler=GlobalBatches(sampler, start),
        batch_size=None,
        collate_fn=_identity,
        num_workers=workers,
        prefetch_factor=data.prefetch if workers else None,
        persistent_workers=False,
    )


def open_cache(
    data: DataConfig,
    encoders: Encoders | None,
    *,
    build: bool,
    progress: bool = True,
    prompts: tuple[str, ...] = (),
    seed: int = 0,
) -> LatentCache:
    """The recipe's latent cache, (re)built first when `build` and its settings are stale, with the embeddings of
    `prompts` (a recipe's `eval.prompts`) beside it.

    `encoders` defaults to `data.encoders`: "tiny" (random tiny encoders of `seed`), "demo" or a local diffusers
    pipeline folder. Only one process should pass `build=True`, building every chunk (the others wait at a barrier,
    then open it); `contentv-train` and `contentv-prepare-data` share the build over the ranks before this.
    """
    stale = not cache_is_current(data.cache_dir, data_settings(data))
    if build and (stale or (prompts and not eval_prompts_current(data.cache_dir, prompts))):
        if encoders is None:
            from contentv_torch_npu.encoders import named_encoders

            encoders = named_encoders(data.encoders, seed)
        given = encoders
        if stale:
            build_data_cache(data, lambda: given, progress=progress)
        if prompts:
            write_eval_prompts(data.cache_dir, prompts, encoders)
    return LatentCache(data.cache_dir, list(data.buckets))


def empty_prompt(cache: LatentCache) -> tuple[np.ndarray, np.ndarray]:
    return cache.empty_text, cache.empty_pooled
