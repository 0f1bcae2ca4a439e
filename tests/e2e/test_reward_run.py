"""End to end: the tiny reward recipes run in each backend, log reward mean/std per step, plot, checkpoint, and
resume from a checkpoint exactly."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from contentv_common.config.reward import is_reward_recipe, load_reward_recipe
from contentv_common.errors import ConfigError


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


def _rows(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "logs" / "reward_log.jsonl").read_text().splitlines()]


def _count_rollouts(monkeypatch) -> list[int]:
    """The steps a run actually executes (to tell a resumed run from one that started over)."""
    from contentv_common.reward.run import RewardData

    steps, rollout = [], RewardData.rollout

    def counted(self, step, *rows):
        steps.append(step)
        return rollout(self, step, *rows)

    monkeypatch.setattr(RewardData, "rollout", counted)
    return steps


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, extra",
    [
        ("reward_refl_tiny", {"refl.anchor": "ema"}),
        ("reward_grpo_tiny", {"grpo.group_size": 2, "grpo.updates_per_rollout": 1, "rollout.steps": 2}),
    ],
)
def test_torch_run_logs_plots_checkpoints_and_resumes(name, extra, synthetic, tmp_path, monkeypatch):
    """3 steps with checkpoints after steps 2 and 3; the step-3 checkpoint is then deleted (a crash after the log
    line of step index 2, before its checkpoint) and the rerun must redo exactly that step: same log, same weights,
    AdamW moments and EMA anchor, bit for bit."""
    from contentv_torch_npu.checkpointing import latest_checkpoint, load_state
    from contentv_torch_npu.reward.run import run

    executed = _count_rollouts(monkeypatch)
    recipe = _recipe(name, synthetic, tmp_path, **{"checkpoint.interval": 2, **extra})
    last = run(recipe, progress=False, device="cpu")
    rows = _rows(tmp_path)
    assert executed == [0, 1, 2] and [r["step"] for r in rows] == [0, 1, 2]
    assert all(np.isfinite(r["reward_mean"]) and r["reward_std"] >= 0 and r["sft_loss"] > 0 for r in rows)
    assert [r["step"] for r in rows if "eval_reward_mean" in r] == [0, 2]
    assert last == rows[-1]
    assert (tmp_path / "logs" / "reward.png").stat().st_size > 1000
    final = latest_checkpoint(tmp_path / "ckpt")
    assert final.name == "step_00000003" and (final / "model" / "contentv_config.json").exists()
    full = load_state(final)
    assert full.step == 3 and full.counters["log_lines"] == 3 and (full.ema is not None) == ("refl" in name)

    shutil.rmtree(final)
    executed.clear()
    resumed = run(recipe, progress=False, device="cpu")
    assert executed == [2]
    assert _rows(tmp_path) == rows and resumed == last
    again = load_state(latest_checkpoint(tmp_path / "ckpt"))
    assert again.adam_step == full.adam_step
    for field in ("params", "exp_avg", "exp_avg_sq") + (("ema",) if full.ema is not None else ()):
        a, b = getattr(full, field), getattr(again, field)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a), field

    executed.clear()
    assert run(recipe, progress=False, device="cpu") == last and executed == []  # finished: nothing to redo
    with pytest.raises(ConfigError, match="^seed: the recipe has 5"):
        run(replace(recipe, seed=5), progress=False, device="cpu")


@pytest.mark.slow
def test_jax_run_resumes_exactly(synthetic, tmp_path, monkeypatch):
    """JAX twin of the torch resume test (2 steps, checkpoint every step, the last one deleted)."""
    import jax
    from flax import nnx

    from contentv_jax.loading import load_transformer
    from contentv_jax.reward.run import run

    executed = _count_rollouts(monkeypatch)
    overrides = {"rollout.steps": 2, "refl.grad_steps": 1, "refl.anchor": "ema", "checkpoint.interval": 1}
    recipe = _recipe("reward_refl_tiny", synthetic, tmp_path, steps=2, **overrides)
    run(recipe, progress=False)
    rows = _rows(tmp_path)
    assert executed == [0, 1] and [r["step"] for r in rows] == [0, 1]
    assert all(np.isfinite(r["reward_mean"]) and np.isfinite(r["eval_reward_mean"]) for r in rows)
    assert (tmp_path / "logs" / "reward.png").exists()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_dir()) == ["1", "2"]
    weights = nnx.to_pure_dict(nnx.state(load_transformer(tmp_path / "transformer"), nnx.Param))
    from contentv_jax.checkpointing import Checkpointer

    saved = Checkpointer(recipe.checkpoint, writer=False)
    history = saved.restore_data(1)["divergence"]  # the guard's spike window travels with the checkpoint
    saved.close()
    assert history["skipped"] == 0 and history["losses"] == [pytest.approx(rows[0]["loss"], rel=1e-6)]

    for earlier in (False, True):  # resume from step 1, then from step 1 in the layout reward runs wrote before
        shutil.rmtree(tmp_path / "ckpt" / "2")
        if earlier:
            _rewrite_in_earlier_layout(recipe, 1)
        executed.clear()
        run(recipe, progress=False)
        assert executed == [1] and _rows(tmp_path) == rows
        again = nnx.to_pure_dict(nnx.state(load_transformer(tmp_path / "transformer"), nnx.Param))
        assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), weights, again)))


def _rewrite_in_earlier_layout(recipe, step: int) -> None:
    """Checkpoint `step` rewritten as reward runs wrote it before they kept the trainer's state: `params`, flax's
    nnx.Optimizer state as a pure dict under `optimizer` ({step, opt_state}), the EMA anchor as a whole model."""
    import jax
    from flax import nnx

    from contentv_jax.checkpointing import Checkpointer
    from contentv_jax.reward.mesh import reward_mesh
    from contentv_jax.reward.train import RewardTuner

    tuner = RewardTuner(recipe, reward_mesh(recipe), None)
    saved = Checkpointer(recipe.checkpoint, writer=False)
    state, counters = saved.restore(tuner.checkpointed(tuner.abstract_state()), step)
    saved.close()
    optimizer = nnx.Optimizer(tuner.trainer.model(state["params"]), tuner.trainer.tx, wrt=nnx.Param)
    theirs, treedef = jax.tree.flatten(nnx.to_pure_dict(nnx.state(optimizer))["opt_state"])
    ours = jax.tree.leaves(state["opt_state"])
    assert [a.shape for a in theirs] == [a.shape for a in ours]
    opt = {"step": jax.numpy.uint32(step), "opt_state": jax.tree.unflatten(treedef, ours)}
    shutil.rmtree(saved.dir / str(step))
    ckpt = Checkpointer(recipe.checkpoint)
    ckpt.save(step, {"params": state["params"], "anchor": state["anchor"], "optimizer": opt}, counters)
    ckpt.close()


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
