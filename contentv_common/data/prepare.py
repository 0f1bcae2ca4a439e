"""A training run's data, made ready before any model work: the synthetic demo set, the latent/text cache, a batch.

Every process of the run builds its share of the cache with the run's backend's encoders on its own devices
(`prepare_data_together`; contentv_common.data.build), as `contentv-prepare-data` and `contentv-train` both do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import Recipe
from contentv_common.data.buckets import BucketBatchSampler
from contentv_common.data.build import build_data_cache
from contentv_common.data.cache import CacheIndex, Encoders, eval_prompts_current, write_eval_prompts
from contentv_common.data.shard import wait_until
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


def prepare_data(
    recipe: Recipe,
    progress: bool = True,
    backend: Backend | None = None,
    process: int = 0,
    processes: int = 1,
    poll_s: float = 1.0,
) -> None:
    """Make sure the cache matches the recipe, as process `process` of `processes` (every one calls this): generate
    the synthetic set if the manifest is missing and it is the demo's (process 0), (re)build or finish the
    latent/text cache when its settings differ, with the backend's encoders (default: JAX's) on this process's
    device, and encode the recipe's `eval.prompts` beside it (process 0) when they are not there yet."""
    data = recipe.data
    manifest = Path(data.manifest)
    if not manifest.exists() and "synthetic" in manifest.parts:
        if process == 0:
            make_synthetic_set(manifest.parent, seed=recipe.seed, progress=progress)
        wait_until(manifest.is_file, lambda: f"process 0 to write {manifest}", poll_s)
    if not manifest.is_file():
        raise DataError(f"data.manifest: {manifest}: no such file")
    encoders = None  # loaded once, only if this process has clips or prompts to encode

    def get_encoders() -> Encoders:
        nonlocal encoders, backend
        if encoders is None:
            check_encoder_widths(data.encoders, recipe.model_config)
            if backend is None:
                from contentv_common.backend import get

                backend = get("jax")
            encoders = backend.encoders(data.encoders, recipe.seed, device=backend.data_device())
        return encoders

    index = build_data_cache(data, get_encoders, process=process, processes=processes, progress=progress, poll_s=poll_s)
    prompts = eval_prompt_list(recipe)
    if prompts and process == 0 and not eval_prompts_current(data.cache_dir, prompts):
        write_eval_prompts(data.cache_dir, prompts, get_encoders())
    if prompts:
        wait_until(lambda: eval_prompts_current(data.cache_dir, prompts), lambda: "process 0's eval prompts", poll_s)
    if process == 0:
        print("\n".join(summary(index, data.cache_dir)), flush=True)
    check_batches(index, recipe)


def summary(index: CacheIndex, cache_dir: str) -> list[str]:
    """The cache's size, then one line per skip reason with its count and first file."""
    lines = [f"cache {cache_dir}: {len(index.samples)} samples ({index.settings['cache_dtype']})"]
    for reason, count in sorted(index.skip_counts.items()):
        first = next(s for s in index.skipped if s["reason"] == reason)
        lines.append(f"cache {cache_dir}: skipped {count} {reason}, e.g. {first['message']}")
    return lines


def check_batches(index: CacheIndex, recipe: Recipe) -> None:
    """DataError unless the cache makes at least one full batch; names the manifest and the first skipped file."""
    names = [b.name for b in recipe.data.buckets]
    ids = [names.index(s["bucket"]) for s in index.samples if s["bucket"] in names]
    try:
        BucketBatchSampler(ids, [b.batch_size for b in recipe.data.buckets], recipe.seed)
    except ValueError as e:
        first = f"; first skipped: {index.skipped[0]['message']}" if index.skipped else ""
        raise DataError(f"{recipe.data.manifest}: {len(index.samples)} usable samples, {e}{first}") from None


def prepare_data_together(recipe: Recipe, backend: Backend, progress: bool) -> None:
    """prepare_data in every process of the launch, each its share; they return once the cache is complete."""
    process, processes = backend.processes()
    prepare_data(recipe, progress and process == 0, backend, process, processes)
