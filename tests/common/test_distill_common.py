"""DMD2's framework-free parts: the recipe's checks, the student's sigmas, the draws and the x0 arithmetic."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from contentv_common.config.distill import DmdConfig, is_distill_recipe, load_distill_recipe
from contentv_common.config.reward import is_reward_recipe
from contentv_common.distill.schedule import (
    DRAWS,
    fake_turn,
    predicted_x0,
    score_sigmas,
    student_sigmas,
    update_draws,
)
from contentv_common.errors import ConfigError
from contentv_common.sampling import flow_match_schedule
from contentv_common.training.schedules import interpolate, shift_sigmas

RECIPE = """\
distill: {steps: 4, shift: 3.0, guidance: 4.0, fake_updates: 2}
model: tiny
init_from: runs/teacher/transformer
data: {prompts: ["a red circle moving right"], width: 32, height: 32, frames: 5, batch_size: 2}
checkpoint: {dir: runs/distill/checkpoint}
steps: 10
fake_optimizer: {lr: 2.0e-4}
"""


def test_recipe_loads_and_dispatches(tmp_path):
    path = tmp_path / "distill.yaml"
    path.write_text(RECIPE)
    recipe = load_distill_recipe(path, {"distill.fake_updates": 3})
    assert recipe.distill == DmdConfig(steps=4, shift=3.0, guidance=4.0, fake_updates=3)
    assert recipe.fake_optimizer.lr == 2.0e-4 and recipe.optimizer.lr == 1e-4
    assert recipe.fake_steps == 30 and recipe.data.prompts == ("a red circle moving right",)
    assert is_distill_recipe(path) and not is_reward_recipe(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"distill.gan_weight": 0.5}, "distill.gan_weight: the GAN term is not implemented yet: set gan_weight: 0"),
        ({"distill.fake_updates": 0}, "distill.fake_updates: must be >= 1, got 0"),
        ({"distill.min_sigma": 0.9, "distill.max_sigma": 0.5}, "distill.min_sigma: needs 0 < min_sigma < max_sigma"),
        ({"distill.guidance": 0.5}, "distill.guidance: must be >= 1"),
        ({"distill.steps": 0}, "distill.steps: must be >= 1, got 0"),
        ({"init_from": ""}, "init_from: needs the teacher's transformer folder"),
        ({"data.frames": 4}, "data.frames: must be 4k+1, got 4"),
        ({"distill.lora": 4}, "distill.lora: unknown key"),
    ],
)
def test_recipe_errors_are_one_line_naming_file_and_key(tmp_path, override, message):
    path = tmp_path / "distill.yaml"
    path.write_text(RECIPE)
    with pytest.raises(ConfigError) as e:
        load_distill_recipe(path, override)
    text = str(e.value)
    assert text.startswith(f"{path}: {message}") and "\n" not in text


def test_missing_teacher_is_an_error(tmp_path):
    path = tmp_path / "distill.yaml"
    path.write_text(RECIPE.replace("init_from: runs/teacher/transformer\n", ""))
    with pytest.raises(ConfigError, match="init_from: required key is missing"):
        load_distill_recipe(path)


def test_student_sigmas_are_the_samplers():
    """The student's K input sigmas are those `contentv-sample --steps K --shift S` steps through: 1 first."""
    sigmas = student_sigmas(DmdConfig(steps=4, shift=3.0))
    np.testing.assert_allclose(sigmas, [1.0, 0.9, 0.75, 0.5], rtol=1e-6)
    assert sigmas.dtype == np.float32
    np.testing.assert_array_equal(sigmas, flow_match_schedule(4, 3.0).sigmas[:-1])
    np.testing.assert_allclose(student_sigmas(DmdConfig(steps=2, shift=1.0)), [1.0, 0.5])


def test_score_sigmas_are_uniform_then_shifted():
    dmd = DmdConfig(shift=3.0, min_sigma=0.1, max_sigma=0.6)
    sigmas = score_sigmas(np.random.default_rng(0), 4000, dmd)
    low, high = shift_sigmas(np.array([0.1, 0.6]), 3.0)
    assert sigmas.dtype == np.float32 and low <= sigmas.min() and sigmas.max() <= high
    assert sigmas.min() < low + 0.01 and sigmas.max() > high - 0.01
    # uniform before the shift: the unshifted values' median sits mid-range
    unshifted = sigmas / (3.0 - 2.0 * sigmas)
    assert abs(np.median(unshifted) - 0.35) < 0.02


def test_update_draws_shapes_order_and_determinism():
    dmd = DmdConfig(steps=4, fake_updates=3)
    shape = (2, 16, 2, 4, 4)
    draws = update_draws(np.random.default_rng([7, 1]), dmd, shape)
    assert set(draws) == set(DRAWS) | {f"fake_{name}" for name in DRAWS}
    assert draws["fake_k"].shape == (3,) and draws["k"].shape == () and draws["sigmas"].shape == (2,)
    assert draws["fake_noise"].shape == (3, *shape) and draws["score_noise"].dtype == np.float32
    again = update_draws(np.random.default_rng([7, 1]), dmd, shape)
    assert all(np.array_equal(draws[k], again[k]) for k in draws)
    other = update_draws(np.random.default_rng([7, 2]), dmd, shape)
    assert not np.array_equal(draws["noise"], other["noise"])
    turn = fake_turn(draws, 1)
    assert set(turn) == set(DRAWS) and np.array_equal(turn["noise"], draws["fake_noise"][1])
    assert not np.array_equal(turn["noise"], draws["noise"])  # the student's turn has its own draws


def test_trained_step_is_uniform_over_the_students_steps():
    dmd = DmdConfig(steps=4, fake_updates=1)
    ks = [int(update_draws(np.random.default_rng(s), dmd, (1, 1, 1, 1, 1))["k"]) for s in range(800)]
    counts = np.bincount(ks, minlength=4)
    assert len(counts) == 4 and counts.min() > 160, counts


def test_predicted_x0_undoes_noising():
    """x_t = (1 - s) x0 + s eps with v = eps - x0: x_t - s v is x0 again, s per sample or one for all."""
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 3, 1, 2, 2)), rng.standard_normal((2, 3, 1, 2, 2))
    for sigma in (np.array([0.3, 0.8]), np.asarray(0.6)):
        x_t = interpolate(x0, eps, sigma)
        np.testing.assert_allclose(predicted_x0(x_t, eps - x0, sigma), x0, atol=1e-12)
    assert not np.allclose(interpolate(x0, eps, np.asarray(0.6)), x0)


class _Encoders:
    """Text embeddings that name their prompt: row i of text is the index of its prompt (negative: -1)."""

    latent_channels = 16
    prompts = ("a", "b", "c")

    def encode_text(self, prompts):
        ids = np.array([self.prompts.index(p) if p in self.prompts else -1 for p in prompts], np.float32)
        return np.broadcast_to(ids[:, None, None], (len(ids), 3, 4)).copy(), np.repeat(ids[:, None], 2, axis=1)


def _tiny_recipe(tmp_path, **overrides):
    path = tmp_path / "distill.yaml"
    path.write_text(RECIPE.replace('["a red circle moving right"]', '["a", "b", "c"]'))
    return load_distill_recipe(path, overrides)


def test_distill_data_is_a_function_of_seed_and_step(tmp_path):
    from contentv_common.distill.run import DistillData

    data = DistillData(_tiny_recipe(tmp_path, **{"data.batch_size": 4}), _Encoders())
    batch, draws = data.update(3)
    again, draws_again = data.update(3)
    assert data.shape == (4, 16, 2, 4, 4) and draws["noise"].shape == data.shape
    assert all(np.array_equal(batch[k], again[k]) for k in batch)
    assert all(np.array_equal(draws[k], draws_again[k]) for k in draws)
    assert not np.array_equal(draws["noise"], data.update(4)[1]["noise"])
    ids = batch["text"][:, 0, 0]
    assert set(ids) <= {0.0, 1.0, 2.0} and np.array_equal(batch["pooled"][:, 0], ids)
    assert np.all(batch["neg_text"] == -1) and batch["neg_pooled"].shape == (4, 2)
    seen = {float(i) for step in range(20) for i in data.update(step)[0]["text"][:, 0, 0]}
    assert seen == {0.0, 1.0, 2.0}  # every prompt is drawn


def test_resume_rules(tmp_path):
    from contentv_common.distill.run import DistillPoint, check_skips, check_teacher, resume_step
    from contentv_common.errors import CheckpointError, RunStopped

    recipe = _tiny_recipe(tmp_path)
    point = DistillPoint(step=4, log_lines=4, seed=recipe.seed, skipped=1)
    assert DistillPoint.read(point.as_dict(), recipe, "ckpt") == point
    with pytest.raises(ConfigError, match=r"^seed: the recipe has 0 but the checkpoint in ckpt .* seed 7"):
        DistillPoint.read({**point.as_dict(), "seed": 7}, recipe, "ckpt")
    with pytest.raises(CheckpointError, match=r"^ckpt: not a distillation checkpoint .*skipped"):
        DistillPoint.read({"step": 4, "log_lines": 4, "seed": 0}, recipe, "ckpt")
    assert resume_step(None, None) is None and resume_step(4, 4) == 4 and resume_step(4, 6) == 4
    for student, fake in ((6, 4), (4, None), (None, 2)):
        with pytest.raises(CheckpointError, match="do not belong together"):
            resume_step(student, fake)
    check_skips(recipe, 10)
    with pytest.raises(
        RunStopped, match=r"^11 skipped updates .*nan_skip_limit=10\); resume point: .*runs/distill/che"
    ):
        check_skips(recipe, 11)
    check_teacher(recipe, recipe.model_config)
    other = replace(recipe.model_config, num_layers=recipe.model_config.num_layers + 1)
    with pytest.raises(ConfigError, match=r"^model: the teacher runs/teacher/transformer has num_layers="):
        check_teacher(recipe, other)


def test_distill_tiny_recipe_loads():
    recipe = load_distill_recipe("configs/recipes/distill_tiny.yaml")
    assert is_distill_recipe("configs/recipes/distill_tiny.yaml") and recipe.distill.steps == 4
    assert recipe.init_from == "runs/tiny/transformer" and recipe.encoders == "demo" and recipe.model == "demo"


@pytest.mark.parametrize("name", ["distill_tiny.yaml", "reward_grpo_demo.yaml"])
def test_a_tuning_recipes_missing_teacher_is_one_line_naming_the_file_and_the_demo(name, tmp_path):
    """Distillation and reward runs check their `init_from` alike before any model work: one line with the recipe,
    the key, the folder and (with the demo's encoders) what to run first."""
    from contentv_common.cli.train import existing_init_from
    from contentv_common.config.reward import load_reward_recipe

    path = str(Path(__file__).resolve().parents[2] / "configs" / "recipes" / name)
    load = load_distill_recipe if name.startswith("distill") else load_reward_recipe
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=f"init_from: {missing}: no such folder.*python tools/train.py` first"):
        existing_init_from(path, load(path, {"init_from": str(missing)}))
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    assert existing_init_from(path, load(path, {"init_from": str(teacher)})).init_from == str(teacher)
