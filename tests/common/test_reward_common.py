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
from contentv_common.reward.sde import gaussian_log_prob, sde_mean, sde_schedule
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
