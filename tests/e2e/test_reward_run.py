"""End to end: the tiny reward recipes run in each backend, log reward mean/std per step, plot, and checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contentv_common.config import ConfigError
from contentv_common.reward_recipe import is_reward_recipe, load_reward_recipe


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    from contentv_common.data.synthetic import make_synthetic_set

    folder = tmp_path_factory.mktemp("reward_e2e")
    return make_synthetic_set(folder / "synthetic", num_videos=4, sizes=((64, 64),), frames=12, fps=8, progress=False)


def _recipe(name: str, synthetic, tmp_path, **extra):
    overrides = {
        "data.manifest": str(synthetic),
        "data.cache_dir": str(synthetic.parent / "cache"),
        "log_dir": str(tmp_path / "logs"),
        "checkpoint.dir": str(tmp_path / "ckpt"),
        "steps": 3,
        "rollout.eval_interval": 2,
        "rollout.steps": 3,
        **extra,
    }
    return load_reward_recipe(f"configs/recipes/{name}.yaml", overrides)


@pytest.mark.parametrize("name", ["reward_refl_tiny", "reward_grpo_tiny"])
def test_torch_run_logs_plots_and_checkpoints(name, synthetic, tmp_path):
    from contentv_torch_npu.reward_run import run

    grpo = {"grpo.group_size": 2, "grpo.updates_per_rollout": 1, "steps": 2, "rollout.steps": 2}
    recipe = _recipe(name, synthetic, tmp_path, **(grpo if "grpo" in name else {}))
    last = run(recipe, progress=False, device="cpu")
    rows = [json.loads(line) for line in (tmp_path / "logs" / "reward_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(recipe.steps))
    assert all(np.isfinite(r["reward_mean"]) and r["reward_std"] >= 0 and r["sft_loss"] > 0 for r in rows)
    assert [r["step"] for r in rows if "eval_reward_mean" in r] == [0, recipe.steps - 1]
    assert last == rows[-1]
    assert (tmp_path / "logs" / "reward.png").stat().st_size > 1000
    assert (tmp_path / "ckpt" / "contentv_config.json").exists()


def test_jax_run_refl(synthetic, tmp_path):
    from contentv_jax.reward_run import run

    recipe = _recipe("reward_refl_tiny", synthetic, tmp_path, steps=2, **{"rollout.steps": 2, "refl.grad_steps": 1})
    run(recipe, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "logs" / "reward_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["reward_mean"]) and np.isfinite(r["eval_reward_mean"]) for r in rows)
    assert (tmp_path / "logs" / "reward.png").exists() and (tmp_path / "ckpt" / "params").is_dir()


def test_recipe_errors_name_the_key(tmp_path):
    assert is_reward_recipe("configs/recipes/reward_grpo_tiny.yaml")
    assert not is_reward_recipe("configs/recipes/tiny.yaml")
    with pytest.raises(ConfigError, match="reward_refl_tiny.yaml: reward.kind"):
        load_reward_recipe(
            "configs/recipes/reward_refl_tiny.yaml", {"reward.kind": "black_box", "reward.black_box": "m:f"}
        )
    with pytest.raises(ConfigError, match="refl.grad_steps"):
        load_reward_recipe("configs/recipes/reward_refl_tiny.yaml", {"refl.grad_steps": 9})
    with pytest.raises(ConfigError, match="rollout.frames"):
        load_reward_recipe("configs/recipes/reward_grpo_tiny.yaml", {"rollout.frames": 6})
