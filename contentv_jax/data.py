"""Training batches for JAX from the latent cache, through grain, with a checkpointable iterator position.

Batch k holds the samples `BucketBatchSampler.batch(k)` plus everything random about step k (noise, sigmas, loss
weights, text dropout) drawn from `step_rng(seed, k)`: the stream is a pure function of (recipe, k), so the grain
iterator state (the next k) is all that resume needs, and every mesh and backend sees the same numbers.
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import numpy as np

from contentv_common.data.buckets import BucketBatchSampler, host_slice
from contentv_common.data.cache import LatentCache
from contentv_common.recipe import Recipe
from contentv_common.schedules import drop_text, flow_inputs, resolve_shift, step_rng

ENDLESS = 2**40  # batches: the stream never runs out; the run length is the recipe's step count


class StepBatches:
    """Host batch k (numpy) of one process: cached latents/text plus the step's random inputs."""

    def __init__(self, recipe: Recipe, process_index: int = 0, process_count: int = 1):
        buckets = list(recipe.data.buckets)
        self.recipe = recipe
        self.cache = LatentCache(recipe.data.cache_dir, buckets)
        self.sampler = BucketBatchSampler(self.cache.bucket_ids, [b.batch_size for b in buckets], recipe.seed)
        self.process_index, self.process_count = process_index, process_count
        self.patch = recipe.model_config.patch_size

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        r, global_ids = self.recipe, self.sampler.batch(int(k))
        obj = r.objective
        batch = self.cache.batch(global_ids)
        _, _, f, h, w = batch["latents"].shape
        shift = resolve_shift(obj.shift_mode, obj.shift, f * (h // self.patch) * (w // self.patch), obj.base_tokens)
        rng = step_rng(r.seed, int(k))
        extra = flow_inputs(
            rng,
            batch["latents"].shape,
            logit_mean=obj.logit_mean,
            logit_std=obj.logit_std,
            shift=shift,
            weighting=obj.weighting,
        )
        batch["text"], batch["pooled"], _ = drop_text(
            rng, batch["text"], batch["pooled"], self.cache.empty_text, self.cache.empty_pooled, r.data.text_dropout
        )
        batch.update(extra)
        rows = host_slice(range(len(global_ids)), self.process_index, self.process_count)
        return {name: value[rows[0] : rows[-1] + 1] for name, value in batch.items()}


def make_loader(recipe: Recipe, state: dict[str, Any] | None = None) -> grain.DatasetIterator:
    """A grain iterator over batches 0, 1, ... (threads prefetch ahead); `state` (from `get_state`) resumes it."""
    batches = StepBatches(recipe, jax.process_index(), jax.process_count())
    options = grain.ReadOptions(num_threads=recipe.data.num_threads, prefetch_buffer_size=recipe.data.prefetch)
    it = iter(grain.MapDataset.range(ENDLESS).map(batches).to_iter_dataset(options))
    if state is not None:
        it.set_state(state)
    return it
