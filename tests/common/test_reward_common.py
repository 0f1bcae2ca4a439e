"""Framework-free reward pieces: built-in rewards, black-box wrapping, GRPO advantages and the SDE sampler's math."""

from __future__ import annotations

import numpy as np
import pytest

from contentv_common.reward.models import (
    MeanBrightness,
    ObjectArea,
    TargetColour,
    as_black_box,
    group_advantages,
    load_black_box,
    score_black_box,
    simple_reward,
    to_uint8,
)
from contentv_common.reward.sde import (
    cell_means,
    exploration_noise,
    gaussian_kl,
    gaussian_log_prob,
    sde_mean,
    sde_schedule,
)
from contentv_common.sampling import flow_match_schedule


def test_builtin_rewards():
    flat = np.broadcast_to(np.array([0.9, 0.2, 0.1], np.float32), (2, 4, 4, 3))
    noisy = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    target = TargetColour((0.9, 0.2, 0.1))
    assert np.allclose(target(flat, ["a", "b"]), 0.0)
    assert np.all(target(noisy, ["a", "b"]) < -0.01)
    assert np.allclose(MeanBrightness()(noisy, ["a", "b"]), noisy.reshape(2, -1).mean(-1))
    assert simple_reward("target_colour", target=(0.9, 0.2, 0.1)) == target
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        target(np.zeros((2, 3, 4, 4), np.float32), ["a", "b"])
    with pytest.raises(ValueError, match="3 values in"):
        TargetColour((2.0, 0.0, 0.0))


def test_object_area_is_the_share_of_the_named_colour():
    """The demo's reward: the share of the frame (percent) in the colour the prompt names; the dark background and
    the other colours count nothing; capped; the same numbers on numpy, torch and JAX arrays."""
    import jax.numpy as jnp
    import torch

    from contentv_common.data.synthetic import render

    circle = render("circle", "red", "right", 64, 64, 1, seed=1)[0]
    square = render("square", "blue", "down", 64, 64, 1, seed=2)[0]
    frames = np.stack([circle, square]).astype(np.float32) / 255.0
    reward = ObjectArea()
    np.testing.assert_allclose(reward(frames, ["a red circle", "a blue square"]), [100 * 201 / 4096, 100 * 256 / 4096])
    assert np.all(reward(frames, ["a blue circle", "a yellow square"]) == 0) and reward(frames[:1], ["a cat"]) == 0
    assert np.all(ObjectArea(cap=5.5)(frames, ["a red circle", "a blue square"]) == [100 * 201 / 4096, 5.5])
    grown = render("square", "blue", "down", 96, 96, 1, seed=2)[0][16:80, 16:80].astype(np.float32) / 255.0
    assert reward(grown[None], ["a blue square"]) > reward(frames[1:], ["a blue square"]), "a larger shape"
    tokens = reward.tokenize(["a red circle", "a blue square"])
    ours = reward.score_tokens(frames, tokens)
    np.testing.assert_allclose(reward.score_tokens(torch.from_numpy(frames), torch.from_numpy(tokens)), ours, 1e-6)
    np.testing.assert_allclose(reward.score_tokens(jnp.asarray(frames), jnp.asarray(tokens)), ours, 1e-6)
    with pytest.raises(ValueError, match="cap"):
        ObjectArea(cap=0.0)


def test_black_box_scores_every_frame_of_a_video():
    frames = to_uint8(np.random.default_rng(2).random((2, 3, 4, 4, 3)))
    score = as_black_box(MeanBrightness())
    per_frame = score(frames.reshape(6, 4, 4, 3), ["a"] * 6).reshape(2, 3)
    np.testing.assert_allclose(score_black_box(score, frames, ["a", "b"]), per_frame.mean(1), 1e-6)
    np.testing.assert_allclose(score_black_box(score, frames[:, :1], ["a", "b"]), per_frame[:, 0], 1e-6)


def test_black_box_wrapping():
    frames = np.random.default_rng(1).random((3, 5, 5, 3)).astype(np.float32)
    score = as_black_box(MeanBrightness())
    u8 = to_uint8(frames)
    assert u8.dtype == np.uint8 and np.abs(u8 / 255.0 - frames).max() <= 0.5 / 255 + 1e-7
    assert np.allclose(score(u8, ["x"] * 3), frames.reshape(3, -1).mean(-1), atol=1e-3)
    with pytest.raises(ValueError, match="uint8"):
        score(frames, ["x"] * 3)
    scorer = load_black_box("contentv_common.reward.models:MeanBrightness")
    assert isinstance(scorer, MeanBrightness)
    with pytest.raises(ValueError, match="module:factory"):
        load_black_box("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        load_black_box("contentv_common.reward.models:nope")


def test_group_advantages():
    rewards = np.array([1.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(rewards, 3)
    adv = group_advantages(rewards, 4).reshape(2, 4)
    assert np.allclose(adv.mean(1), 0.0, atol=1e-6)
    assert np.allclose(adv.std(1), 1.0, atol=1e-4)
    assert adv[0].argmax() == 3 and adv[1].argmin() == 2


def test_sde_without_noise_is_euler():
    sched = sde_schedule(flow_match_schedule(5, 3.0), 0.0)
    assert np.all(sched.std == 0) and np.all(sched.drift == 0)
    x, v = np.ones((2, 3)), np.full((2, 3), 0.5)
    assert np.allclose(sde_mean(x, v, sched.sigmas[1], sched.dts[1], sched.drift[1]), x + sched.dts[1] * v)


def test_sde_sampler_reaches_the_data_distribution():
    """With the exact velocity of 1-D Gaussian data N(0, a^2), SDE sampling from noise ends at std a (the drift's
    score correction keeps the marginals), and the per-step Gaussian log-prob matches the drawn noise."""
    a, n = 0.3, 200_000
    schedule = flow_match_schedule(200, 1.0)
    sched = sde_schedule(schedule, 0.7)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 1))
    for i in range(sched.steps):
        t = float(sched.sigmas[i])
        var = (1 - t) ** 2 * a**2 + t**2
        v = (t - (1 - t) * a**2) / var * x
        mean = sde_mean(x, v, sched.sigmas[i], sched.dts[i], sched.drift[i])
        eps = rng.standard_normal((n, 1))
        x = mean + sched.std[i] * eps
        if i == 10:
            logp = gaussian_log_prob(x, mean, sched.std[i], sched.log_std[i])
            expected = -0.5 * eps[:, 0] ** 2 - np.log(sched.std[i]) - 0.5 * np.log(2 * np.pi)
            assert np.allclose(logp, expected, atol=1e-4)
    assert abs(x.std() - a) < 0.02, x.std()
    assert abs(x.mean()) < 0.01


def test_sde_explores_only_its_first_steps():
    """`explore_steps` n: the first n steps keep their SDE coefficients, the later ones are Euler steps (no drift, no
    noise), and every coefficient a rollout uses is finite (log_std only where it explores)."""
    schedule = flow_match_schedule(5, 3.0)
    full, part = sde_schedule(schedule, 0.7), sde_schedule(schedule, 0.7, explore_steps=2)
    for name in ("sigmas", "dts", "drift", "std", "log_std"):
        np.testing.assert_array_equal(getattr(part, name)[:2], getattr(full, name)[:2])
    assert np.all(part.std[:2] > 0) and np.all(np.isfinite(part.log_std[:2]))
    assert np.all(part.std[2:] == 0) and np.all(part.drift[2:] == 0)
    assert all(np.all(np.isfinite(getattr(part, k))) for k in ("sigmas", "dts", "drift", "std"))
    x, v = np.ones((2, 3), np.float32), np.full((2, 3), 0.5, np.float32)
    np.testing.assert_array_equal(sde_mean(x, v, part.sigmas[3], part.dts[3], part.drift[3]), x + part.dts[3] * v)


def test_cell_means_average_each_cell():
    x = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6)
    cells = cell_means(x, 2)
    assert cells.shape == (2, 2, 2)
    expected = [
        [[x[b, 2 * i : 2 * i + 2, 3 * j : 3 * j + 3].mean() for j in range(2)] for i in range(2)] for b in (0, 1)
    ]
    np.testing.assert_allclose(cells, expected)
    assert cell_means(x, None) is x


def test_grid_log_prob_is_the_density_of_the_coarse_noise():
    """Block-constant noise z on a 2 x 2 grid of a 4 x 4 latent: the log-prob of mean + std z is the mean over cells
    of log N(z; 0, 1) - log std; the KL only sees the cell means of the mean difference."""
    std = np.float32(0.3)
    rng = np.random.default_rng(0)
    z = exploration_noise(np.random.default_rng(1), (3, 2, 1, 4, 4), 2)
    coarse = z[..., ::2, ::2]
    mean = rng.standard_normal(z.shape).astype(np.float32)
    expected = (-0.5 * coarse**2 - 0.5 * np.log(2 * np.pi)).reshape(3, -1).mean(-1) - np.log(std)
    np.testing.assert_allclose(gaussian_log_prob(mean + std * z, mean, std, np.log(std), grid=2), expected, rtol=1e-5)
    within = np.tile(np.array([[1.0, -1.0], [-1.0, 1.0]], np.float32), (2, 2))  # cell means 0
    x_next = mean + std * z + 0.1 * within  # what the grid does not explore leaves its log-prob as it is
    np.testing.assert_allclose(gaussian_log_prob(x_next, mean, std, np.log(std), grid=2), expected, rtol=1e-5)
    assert np.all(gaussian_log_prob(x_next, mean, std, np.log(std)) < expected - 0.01)
    assert np.all(gaussian_kl(mean + within, mean, std, grid=2) < 1e-10)
    assert np.all(gaussian_kl(mean + within, mean, std) > 1.0)
    np.testing.assert_allclose(
        gaussian_kl(mean + z, mean, std, grid=2), (coarse**2).reshape(3, -1).mean(-1) / (2 * std**2), rtol=1e-5
    )


def test_grpo_explores_its_trained_steps_on_the_noise_grid():
    """`grpo.train_steps` n and `grpo.noise_grid` g: exploration noise for n steps, constant within each of the g x g
    cells of the latent and different across cells; a grid that does not divide the latent fails at load."""
    from contentv_common.config.reward import load_reward_recipe
    from contentv_common.errors import ConfigError
    from contentv_common.reward.run import RewardData
    from tests.stand_in_encoders import StandInEncoders

    path = "configs/recipes/reward_grpo_tiny.yaml"
    data = RewardData(load_reward_recipe(path, {"grpo.train_steps": 2, "grpo.noise_grid": 2}), StandInEncoders(), None)
    noise = data.rollout(3)[2]
    *_, h, w = data.latent_shape
    assert noise.shape == (2, data.rows, *data.latent_shape[1:]) and data.recipe.rollout.steps > 2
    coarse = noise[..., :: h // 2, :: w // 2]
    np.testing.assert_array_equal(noise, coarse.repeat(h // 2, -2).repeat(w // 2, -1))
    assert len(np.unique(coarse)) == coarse.size
    with pytest.raises(ConfigError, match=r"grpo.noise_grid: 3 does not divide the 8 x 8 latent"):
        load_reward_recipe(path, {"grpo.noise_grid": 3})


def test_grpo_exploration_noise_of_some_rows_is_those_rows_of_the_whole():
    """A process drawing its rows' SDE noise alone gets exactly its share of the whole step's draw; the rest of the
    rollout batch does not depend on which rows were asked for, and every (step, row) has its own noise."""
    from contentv_common.config.reward import load_reward_recipe
    from contentv_common.reward.run import RewardData
    from tests.stand_in_encoders import StandInEncoders

    data = RewardData(load_reward_recipe("configs/recipes/reward_grpo_tiny.yaml"), StandInEncoders(), None)
    batch, prompts, whole = data.rollout(3)
    assert whole.shape == (data.recipe.rollout.steps, data.rows, *data.latent_shape[1:])
    part_batch, part_prompts, part = data.rollout(3, slice(2, 6))
    np.testing.assert_array_equal(part, whole[:, 2:6])
    assert part_prompts == prompts and all(np.array_equal(part_batch[k], v) for k, v in batch.items())
    assert not np.allclose(whole[:, 0], whole[:, 1]) and not np.allclose(data.rollout(4)[2], whole)


def test_grpo_groups_share_their_start_when_asked():
    """`grpo.shared_start`: every rollout of a group starts from its group's noise, groups from different noise."""
    from contentv_common.config.reward import load_reward_recipe
    from contentv_common.reward.run import RewardData
    from tests.stand_in_encoders import StandInEncoders

    recipe = load_reward_recipe("configs/recipes/reward_grpo_tiny.yaml", {"grpo.shared_start": True})
    data = RewardData(recipe, StandInEncoders(), None)
    noise = data.rollout(3)[0]["noise"].reshape(recipe.rollout.batch_size, recipe.grpo.group_size, -1)
    assert all(np.array_equal(group[0], row) for group in noise for row in group)
    assert not np.allclose(noise[0, 0], noise[1, 0])


@pytest.mark.parametrize("key", ["policy_weight", "kl_weight", "sft_weight"])
def test_grpo_weights_below_zero_are_config_errors_naming_the_key(key):
    """`grpo.policy_weight` 0 is the control run (KL and SFT alone); below 0 any of the weights is a one-line error."""
    from contentv_common.config.reward import load_reward_recipe
    from contentv_common.errors import ConfigError

    path = "configs/recipes/reward_grpo_tiny.yaml"
    assert load_reward_recipe(path, {"grpo.policy_weight": 0}).grpo.policy_weight == 0
    with pytest.raises(ConfigError, match=rf"reward_grpo_tiny.yaml: grpo.{key}: must be >= 0, got -0.5$"):
        load_reward_recipe(path, {f"grpo.{key}": -0.5})


def test_held_out_seed_spread_leaves_out_the_differences_between_prompts():
    """eval_seed_std is the spread about each prompt's own mean: prompts far apart with seeds close together give a
    small seed spread and a large overall std; with one seed per prompt there is no seed spread to log."""
    from contentv_common.reward.run import eval_record

    prompts = ["red", "blue", "red", "blue", "red", "blue"]
    rewards = np.array([1.0, 11.0, 2.0, 12.0, 3.0, 13.0])
    record = eval_record(rewards, prompts, updates=7)
    assert record["eval_updates"] == 7 and record["eval_reward_mean"] == pytest.approx(7.0)
    assert record["eval_reward_std"] == pytest.approx(np.std(rewards)) and record["eval_reward_std"] > 5
    # residuals about 2 and 12: -1, 0, 1 twice; 6 clips, 2 prompt means: sqrt(4 / 4)
    assert record["eval_seed_std"] == pytest.approx(1.0)
    assert "eval_seed_std" not in eval_record(rewards[:2], prompts[:2], updates=0)
