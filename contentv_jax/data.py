"""Training batches for JAX from the latent cache, through grain, with a checkpointable iterator position.

Batch k holds the samples `BucketBatchSampler.batch(k)` plus everything random about step k (noise, sigmas, loss
weights, text dropout) from contentv_common.training.step_inputs: the stream is a pure function of (recipe, k), so the
grain iterator state (the next k) is all that resume needs, and every mesh and backend sees the same numbers. A process
reads from the cache only the rows its devices hold (`shards`, from contentv_jax.multihost.batch_shards); the random
inputs are drawn for the global batch and sliced, so they do not depend on the process count.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from contentv_common.config.recipe import Recipe
from contentv_common.data.buckets import BucketBatchSampler
from contentv_common.data.cache import LatentCache
from contentv_common.text.online import step_tokenizers, tokenized
from contentv_common.training.step_inputs import step_inputs

ENDLESS = 2**40  # batches: the stream never runs out; the run length is the recipe's step count


class StepBatches:
    """Host batch k (numpy) of one process: its rows of the cached latents/text (with `data.text: online`, the token
    ids of its captions instead of text) plus the step's random inputs.

    `shards` = (first, stop, count): the global batch splits into `count` equal row blocks and this process feeds
    blocks first..stop-1; `global_size` in each batch tells the trainer the global batch size.
    """

    def __init__(self, recipe: Recipe, shards: tuple[int, int, int] = (0, 1, 1)):
        buckets = list(recipe.data.buckets)
        self.recipe = recipe
        self.cache = LatentCache(recipe.data.cache_dir, buckets)
        self.held_out = self.cache.hold_out(recipe.eval.samples if recipe.eval.interval else 0, recipe.seed)
        self.sampler = BucketBatchSampler(self.cache.bucket_ids, [b.batch_size for b in buckets], recipe.seed)
        self.shards = shards
        self.online = recipe.data.text == "online"
        self.tokenizers = step_tokenizers(recipe.data.encoders, recipe.seed) if self.online else None

    def rows(self, global_size: int) -> slice:
        first, stop, count = self.shards
        if global_size % count:
            raise ValueError(f"global batch of {global_size} does not split into {count} blocks (data x fsdp)")
        per = global_size // count
        return slice(first * per, stop * per)

    def __call__(self, k: int) -> dict[str, np.ndarray]:
        global_ids = self.sampler.batch(int(k))
        n = len(global_ids)
        rows = self.rows(n)
        mine = global_ids[rows]
        read: dict[str, Any] = self.cache.batch(mine)
        if self.online:
            read["captions"] = self.cache.captions(mine)
        batch = step_inputs(
            self.recipe,
            k,
            read,
            global_size=n,
            first_row=rows.start,
            empty=(self.cache.empty_text, self.cache.empty_pooled),
        )
        if self.tokenizers is not None:
            batch = tokenized(batch, self.tokenizers)
        batch["global_size"] = np.asarray(n)
        return batch


def make_loader(
    recipe: Recipe, state: dict[str, Any] | None = None, shards: tuple[int, int, int] = (0, 1, 1)
) -> grain.DatasetIterator:
    """A grain iterator over batches 0, 1, ... (threads prefetch ahead); `state` (from `get_state`) resumes it."""
    batches = StepBatches(recipe, shards)
    options = grain.ReadOptions(num_threads=recipe.data.num_threads, prefetch_buffer_size=recipe.data.prefetch)
    it = iter(grain.MapDataset.range(ENDLESS).map(batches).to_iter_dataset(options))
    if state is not None:
        it.set_state(state)
    return it
