"""Framework-free resume pieces of a reward run: the log cut back to a checkpoint, and the checkpoint's counters."""

from __future__ import annotations

import pytest

from contentv_common.config.reward import load_reward_recipe
from contentv_common.errors import CheckpointError, ConfigError, RunStopped
from contentv_common.reward.run import ResumePoint, RewardLog, check_divergence, divergence_guard, optimizer_updates


def test_log_keeps_the_checkpointed_lines(tmp_path):
    log = RewardLog(tmp_path)
    for step in range(5):
        log.write({"step": step, "reward_mean": 0.1 * step, "reward_std": 0.0})
    assert log.lines == 5
    resumed = RewardLog(tmp_path, keep_lines=3)
    assert resumed.lines == 3 and [r["step"] for r in resumed.records()] == [0, 1, 2]
    resumed.write({"step": 3, "reward_mean": -1.0, "reward_std": 0.0})
    assert [r["reward_mean"] for r in resumed.records()] == [0.0, 0.1, 0.2, -1.0]
    assert not list(tmp_path.glob("*.tmp"))
    assert RewardLog(tmp_path).lines == 0 and not (tmp_path / "reward_log.jsonl").exists()
    with pytest.raises(CheckpointError, match="reward_log.jsonl: 0 lines.*after 2"):
        RewardLog(tmp_path, keep_lines=2)


def test_resume_point_checks_the_recipe():
    recipe = load_reward_recipe("configs/recipes/reward_refl_tiny.yaml", {"refl.anchor": "ema"})
    point = ResumePoint(step=4, log_lines=4, seed=recipe.seed, ema_anchor=1)
    assert ResumePoint.read(point.as_dict(), recipe, "ckpt/4") == point
    with pytest.raises(ConfigError, match=r"^seed: .* ckpt/4 .* seed 7"):
        ResumePoint.read({**point.as_dict(), "seed": 7}, recipe, "ckpt/4")
    with pytest.raises(ConfigError, match="^refl.anchor: ema"):
        ResumePoint.read({**point.as_dict(), "ema_anchor": 0}, recipe, "ckpt/4")
    with pytest.raises(CheckpointError, match="ckpt/4: not a reward-run checkpoint.*log_lines"):
        ResumePoint.read({"step": 4, "seed": 0, "ema_anchor": 0}, recipe, "ckpt/4")


def test_resume_point_carries_skips_and_the_weights_ema():
    recipe = load_reward_recipe("configs/recipes/reward_grpo_tiny.yaml", {"optimizer.ema_decay": 0.99})
    point = ResumePoint(step=4, log_lines=4, seed=recipe.seed, ema_anchor=0, ema_weights=1, skipped=2)
    assert ResumePoint.read(point.as_dict(), recipe, "ckpt/4") == point
    guard = divergence_guard(recipe, point)
    assert guard.skipped == 2 and divergence_guard(recipe, None).skipped == 0
    with pytest.raises(ConfigError, match="^optimizer.ema_decay: .*ckpt/4"):
        ResumePoint.read({**point.as_dict(), "ema_weights": 0}, recipe, "ckpt/4")
    old = {k: v for k, v in point.as_dict().items() if k not in ("ema_weights", "skipped")}  # an older checkpoint
    plain = load_reward_recipe("configs/recipes/reward_grpo_tiny.yaml")
    assert ResumePoint.read(old, plain, "ckpt/4").skipped == 0
    assert optimizer_updates(recipe) == recipe.steps * recipe.grpo.updates_per_rollout


def test_skipped_updates_beyond_the_limit_stop_the_run():
    recipe = load_reward_recipe("configs/recipes/reward_refl_tiny.yaml", {"nan_skip_limit": 1})
    guard = divergence_guard(recipe, None)
    for step in range(2):
        check_divergence(guard, "ckpt")
        guard.record(step, float("nan"), 1.0, applied=False)
    with pytest.raises(RunStopped, match="2 skipped steps.*first at step 0.*ckpt"):
        check_divergence(guard, "ckpt")


def test_weights_ema_and_ema_anchor_are_one_setting():
    with pytest.raises(ConfigError, match="reward_refl_tiny.yaml: optimizer.ema_decay: .*refl.anchor_ema_decay"):
        load_reward_recipe("configs/recipes/reward_refl_tiny.yaml", {"refl.anchor": "ema", "optimizer.ema_decay": 0.9})
