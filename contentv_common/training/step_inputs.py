"""Everything random about training step k (noise, noise levels, loss weights, text dropout), drawn once for both
backends.

The draws come from `step_rng(seed, k)` for the whole global batch and each process keeps its rows: the stream is a
pure function of (recipe, k), so resume needs only k, and every mesh, process count and backend sees the same numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from contentv_common.config.recipe import Recipe
from contentv_common.text.online import captions_kept
from contentv_common.training.schedules import flow_inputs, resolve_shift, step_rng


def step_inputs(
    recipe: Recipe,
    k: int,
    batch: dict[str, Any],
    *,
    global_size: int,
    first_row: int,
    empty: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """`batch` (rows first_row.. of global batch k: latents, and text and pooled, or online the `captions`) with the
    step's random inputs: captions dropped out (replaced by the `empty` prompt's text and pooled embeddings, or online
    by the caption "", which encodes to them), noise, sigmas and loss weights added."""
    obj = recipe.objective
    latents = batch["latents"]
    _, c, f, h, w = latents.shape
    p = recipe.model_config.patch_size
    shift = resolve_shift(obj.shift_mode, obj.shift, f * (h // p) * (w // p), obj.base_tokens)
    rng = step_rng(recipe.seed, int(k))
    rows = slice(first_row, first_row + len(latents))
    drawn = flow_inputs(
        rng,
        (global_size, c, f, h, w),
        logit_mean=obj.logit_mean,
        logit_std=obj.logit_std,
        shift=shift,
        weighting=obj.weighting,
    )
    flow = {name: value[rows] for name, value in drawn.items()}
    keep = ~(rng.random(global_size) < recipe.data.text_dropout)[rows]  # schedules.drop_text's draw
    if "captions" in batch:
        return {**batch, "captions": captions_kept(list(batch["captions"]), keep), **flow}
    if empty is None:
        raise ValueError("cached text needs the empty prompt's embeddings for its dropout")
    empty_text, empty_pooled = empty
    return {
        **batch,
        "text": np.where(keep[:, None, None], batch["text"], empty_text[None]),
        "pooled": np.where(keep[:, None], batch["pooled"], empty_pooled[None]),
        **flow,
    }
