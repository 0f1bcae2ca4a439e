"""Train ContentV with flow matching: `contentv-train [--config RECIPE] [--backend jax|torch] [key=value ...]`.

Flags and overrides may come in any order. Everything is checked before any model or data work (recipe file, YAML,
overrides, mesh vs devices, the checkpoint dir's run lock, then the data): a problem is one line naming the file or
key, exit status 2; a run that stops (divergence, a failed checkpoint save) is one line and exit status 1.

With the default tiny recipe the run is self-contained: it generates the synthetic moving-shapes set, caches its
latents and text embeddings with the demo encoders (configs/demo_vae + word embeddings), trains the demo model on CPU,
writes a loss-curve PNG and samples the four demo prompts into `<run>/samples/` beside a strip image.
Logs go to `<log_dir>/metrics.jsonl` and TensorBoard; multi-stage recipes run their stages in order.
Several processes (JAX: jax.distributed, see contentv_jax.multihost and tools/launch_local.py; torch: torchrun) run
the same command; every process builds its share of the data cache (as contentv-prepare-data does), process / rank
0 alone writes the logs and samples the demo clips after
training, while the in-loop clips of the held-out evaluation are drawn by every process together (the sampler on the
training mesh).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from contentv_common.backend import Backend, get
from contentv_common.checkpoint.hub import transformer_folder
from contentv_common.checkpoint.run_lock import check_unlocked
from contentv_common.cli import run_cli
from contentv_common.config.distill import DistillRecipe, is_distill_recipe, load_distill_recipe
from contentv_common.config.recipe import Recipe, load_recipe, parse_override
from contentv_common.config.reward import RewardRecipe, is_reward_recipe, load_reward_recipe
from contentv_common.data.prepare import check_encoder_widths, prepare_data_together
from contentv_common.errors import ConfigError
from contentv_common.training.demo import DEMO_PROMPTS, lora_demo_base, sample_demo, sample_reward_demo
from contentv_common.training.metrics import LossCurve

TINY = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "tiny.yaml"
R = TypeVar("R", Recipe, RewardRecipe, DistillRecipe)
Tuning = TypeVar("Tuning", RewardRecipe, DistillRecipe)


def local_init_from(recipe: R) -> R:
    """The recipe with `init_from` a local folder: a Hugging Face Hub id (owner/name/transformer) is fetched into the
    Hub cache now, before any model work (a local path that exists wins)."""
    if recipe.init_from is None:
        return recipe
    return replace(recipe, init_from=str(transformer_folder(recipe.init_from)))


def existing_init_from(path: str, recipe: Tuning) -> Tuning:
    """`local_init_from` for a tuning recipe (reward, distillation) read from `path`: its `init_from`, when set, must
    be a folder here; errors are one line, and with the demo's encoders they say to train the demo first."""
    hint = " (the CPU demo's model: run `python tools/train.py` first)" if recipe.encoders == "demo" else ""
    try:
        recipe = local_init_from(recipe)
    except ConfigError as e:
        raise ConfigError(f"{path}: init_from: {e}{hint}") from None
    if recipe.init_from is not None and not Path(recipe.init_from).exists():
        raise ConfigError(f"{path}: init_from: {recipe.init_from}: no such folder{hint}")
    return recipe


def train_reward(path: str, overrides: dict[str, Any], backend: Backend, progress: bool, prompts: list[str]) -> int:
    """Reward fine-tuning (ReFL or GRPO): recipes with a `method` key (configs/recipes/reward_*.yaml). A run that
    tunes a model of its own (`init_from`) with the tiny or demo encoders then samples `prompts` before and after."""
    recipe = existing_init_from(path, load_reward_recipe(path, overrides))
    primary = backend.check_devices(recipe)  # joins a multi-process run first, before any data work
    if primary:
        check_unlocked(recipe.checkpoint.dir)
    check_encoder_widths(recipe.encoders, recipe.model_config)
    if recipe.data is not None:
        # the SFT data section has the training recipe's data fields, which is all prepare_data reads
        prepare_data_together(recipe, backend, progress)  # type: ignore[arg-type]
    record = backend.reward_tune(recipe, progress=progress and primary)
    if primary:
        print(f"reward fine-tuning ({recipe.method}, {backend.name}): last step {record}")
        if prompts and recipe.init_from is not None and recipe.encoders in ("tiny", "demo"):
            sample_reward_demo(recipe, backend, prompts, progress)
    backend.barrier("reward-demo")  # the others wait for process 0's clips
    return 0


def train_distill(path: str, overrides: dict[str, Any], backend: Backend, progress: bool) -> int:
    """DMD2 distillation: recipes with a `distill` section (configs/recipes/distill_*.yaml), one process. The teacher
    (`init_from`) must exist; the student is exported to `<checkpoint.dir>/../transformer`."""
    recipe = existing_init_from(path, load_distill_recipe(path, overrides))
    check_unlocked(recipe.checkpoint.dir)
    check_encoder_widths(recipe.encoders, recipe.model_config)
    record = backend.distill(recipe, progress=progress)
    print(f"distillation (dmd2, {backend.name}): last step {record}")
    print(f"student: {Path(recipe.checkpoint.dir).parent / 'transformer'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(TINY), help="recipe YAML (default: the tiny CPU demo)")
    parser.add_argument("--backend", choices=("jax", "torch"), default="jax")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--sample-prompt",
        action="append",
        help="after training (or reward-tuning a model) with tiny or demo encoders, sample a clip with this prompt "
        "(repeatable; default: the four demo prompts; '' to skip)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optimizer.lr=3e-4 steps=50")
    args = parser.parse_intermixed_args(argv)
    progress = not args.no_progress
    overrides = dict(parse_override(o) for o in args.overrides)
    prompts = [p for p in (args.sample_prompt or DEMO_PROMPTS) if p]
    if is_distill_recipe(args.config):
        return train_distill(args.config, overrides, get(args.backend), progress)
    if is_reward_recipe(args.config):
        return train_reward(args.config, overrides, get(args.backend), progress, prompts)
    recipe = lora_demo_base(load_recipe(args.config, overrides))
    try:
        recipe = local_init_from(recipe)
    except ConfigError as e:
        raise ConfigError(f"{args.config}: init_from: {e}") from None
    stages = recipe.stage_recipes()
    backend = get(args.backend)
    primary = backend.check_devices(recipe)  # joins a multi-process run first
    if primary:  # fail fast; the trainer's main process takes the lock itself
        for _, stage in stages:
            check_unlocked(stage.checkpoint.dir)
    progress = progress and primary
    for name, stage in stages:
        print(f"stage {name}: {stage.steps} steps, checkpoints in {stage.checkpoint.dir}")
        prepare_data_together(stage, backend, progress)
        curve = LossCurve(stage.log_dir) if primary else None
        backend.train(stage, progress, curve)
        if curve is not None and curve.losses:
            plot = curve.plot()
            print(f"stage {name}: loss {curve.losses[0]:.4f} -> {curve.losses[-1]:.4f}; curve {plot}")
    folder = backend.export(stage)  # every process takes part; the follow-up commands read <run>/transformer
    if primary:
        print(f"trained model: {folder}")
    if prompts and stage.data.encoders in ("tiny", "demo"):
        sample_demo(stage, backend, folder, prompts, progress, primary)
    return 0


def entry() -> None:
    """The `contentv-train` command."""
    run_cli(main)


if __name__ == "__main__":
    entry()
