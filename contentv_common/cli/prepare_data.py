"""Prepare a recipe's data: `contentv-prepare-data --config RECIPE [--backend jax|torch] [key=value ...]`.

Builds (or finishes) the latent/text cache of every stage of the recipe (a reward recipe: its SFT data), launched
exactly as training is: several JAX processes (jax.distributed, tools/launch_local.py) or torchrun's ranks each take
their share of the manifest's chunks and encode them on their own devices; process 0 commits the index when every
chunk is done. `contentv-train` runs the same step when a cache is not current. A killed build resumes where it
stopped (contentv_common.data.build). A manifest without a usable clip is one line and exit status 2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from contentv_common.backend import get
from contentv_common.cli import run_cli
from contentv_common.config.recipe import load_recipe, parse_override
from contentv_common.config.reward import is_reward_recipe, load_reward_recipe
from contentv_common.data.prepare import prepare_data_together
from contentv_common.errors import ConfigError

TINY = Path(__file__).resolve().parents[2] / "configs" / "recipes" / "tiny.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(TINY), help="recipe YAML (default: the tiny CPU demo)")
    parser.add_argument("--backend", choices=("jax", "torch"), default="jax", help="whose encoders (default: jax)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.chunk_size=16")
    args = parser.parse_intermixed_args(argv)
    overrides = dict(parse_override(o) for o in args.overrides)
    if is_reward_recipe(args.config):
        reward = load_reward_recipe(args.config, overrides)
        if reward.data is None:
            raise ConfigError(f"{args.config}: data: this reward recipe has no data section to prepare")
        stages = [("sft", reward)]
    else:
        stages = list(load_recipe(args.config, overrides).stage_recipes())
    backend = get(args.backend)
    for name, stage in stages:
        start = time.perf_counter()
        prepare_data_together(stage, backend, not args.no_progress)  # type: ignore[arg-type]
        print(f"data of {name}: ready in {time.perf_counter() - start:.1f} s")
    return 0


def entry() -> None:
    """The `contentv-prepare-data` command."""
    run_cli(main)


if __name__ == "__main__":
    entry()
