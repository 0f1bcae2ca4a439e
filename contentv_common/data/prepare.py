"""A training run's data, made ready before any model work: the synthetic demo set, the latent/text cache, a batch.

Process 0 builds the cache with the run's backend's encoders (`contentv_common.backend.Backend.encoders`); the other
processes wait for it (`prepare_data_once`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import Recipe
from contentv_common.data.buckets import BucketBatchSampler
from contentv_common.data.cache import (
    Encoders,
    build_cache,
    cache_is_current,
    cache_settings,
    eval_prompts_current,
    read_index,
    write_eval_prompts,
)
from contentv_common.data.synthetic import make_synthetic_set
from contentv_common.errors import DataError
from contentv_common.text.sd3_prompt import check_text_widths, read_text_configs

if TYPE_CHECKING:
    from contentv_common.backend import Backend


def check_encoder_widths(name: str, cfg: ModelConfig) -> None:
    """A pipeline's text encoders must give the model's text and pooled widths: ConfigError naming the encoder's
    config file and key, from config files alone (before any data or weight is read)."""
    if name not in ("tiny", "demo"):
        check_text_widths(read_text_configs(name), name, cfg.joint_attention_dim, cfg.pooled_projection_dim)


def eval_prompt_list(recipe: Recipe) -> tuple[str, ...]:
    """The recipe's `eval.prompts` (a reward recipe, whose SFT data this module also prepares, has none)."""
    return recipe.eval.prompts if isinstance(recipe, Recipe) else ()


def prepare_data(recipe: Recipe, progress: bool = True, backend: Backend | None = None) -> None:
    """Make sure the cache matches the recipe: generate the synthetic set if the manifest is missing and it is the
    demo's, then (re)build the latent/text cache when its settings differ, with the backend's encoders (default:
    JAX's), and encode the recipe's `eval.prompts` beside it when they are not there yet."""
    data = recipe.data
    manifest = Path(data.manifest)
    if not manifest.exists() and "synthetic" in manifest.parts:
        make_synthetic_set(manifest.parent, seed=recipe.seed, progress=progress)
    if not manifest.is_file():
        raise DataError(f"data.manifest: {manifest}: no such file")
    settings = cache_settings(manifest, list(data.buckets), data.fps, data.encoders, data.text)
    encoders = None  # loaded once, only if the cache or the eval prompts' embeddings need them

    def get_encoders() -> Encoders:
        nonlocal encoders, backend
        if encoders is None:
            check_encoder_widths(data.encoders, recipe.model_config)
            if backend is None:
                from contentv_common.backend import get

                backend = get("jax")
            encoders = backend.encoders(data.encoders, recipe.seed)
        return encoders

    if not cache_is_current(data.cache_dir, settings):  # a current cache needs no encoders
        build_cache(
            manifest,
            data.cache_dir,
            get_encoders(),
            list(data.buckets),
            data.fps,
            encoders_name=data.encoders,
            progress=progress,
            text=data.text == "cached",
        )
    prompts = eval_prompt_list(recipe)
    if prompts and not eval_prompts_current(data.cache_dir, prompts):
        write_eval_prompts(data.cache_dir, prompts, get_encoders())
    index = read_index(data.cache_dir)
    skipped = index.skip_counts
    print(f"cache {data.cache_dir}: {len(index.samples)} samples" + (f", skipped {skipped}" if skipped else ""))
    check_batches(index, recipe)


def check_batches(index, recipe: Recipe) -> None:
    """DataError unless the cache makes at least one full batch; names the manifest and the first skipped file."""
    names = [b.name for b in recipe.data.buckets]
    ids = [names.index(s["bucket"]) for s in index.samples if s["bucket"] in names]
    try:
        BucketBatchSampler(ids, [b.batch_size for b in recipe.data.buckets], recipe.seed)
    except ValueError as e:
        first = f"; first skipped: {index.skipped[0]['message']}" if index.skipped else ""
        raise DataError(f"{recipe.data.manifest}: {len(index.samples)} usable samples, {e}{first}") from None


def prepare_data_once(recipe: Recipe, backend: Backend, primary: bool, progress: bool, poll_s: float = 2.0) -> None:
    """prepare_data in process 0 only. The others wait at the backend's barrier (JAX), then until the cache and the
    eval prompts' embeddings are current (torch ranks, which have no process group yet), for as long as it takes: the
    launcher stops every process if process 0 fails."""
    if primary:
        prepare_data(recipe, progress, backend)
    backend.barrier("data")
    data = recipe.data
    settings = cache_settings(data.manifest, list(data.buckets), data.fps, data.encoders, data.text)
    prompts = eval_prompt_list(recipe)
    while not cache_is_current(recipe.data.cache_dir, settings) or (
        prompts and not eval_prompts_current(recipe.data.cache_dir, prompts)
    ):
        time.sleep(poll_s)
