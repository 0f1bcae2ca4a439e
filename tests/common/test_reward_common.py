"""Framework-free reward pieces: built-in rewards, black-box wrapping, GRPO advantages and the SDE sampler's math."""

from __future__ import annotations

import numpy as np
import pytest

from contentv_common.reward import (
    MeanBrightness,
    TargetColour,
    as_black_box,
    group_advantages,
    load_black_box,
    simple_reward,
    to_uint8,
)
from contentv_common.reward_sde import gaussian_log_prob, sde_mean, sde_schedule
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


def test_black_box_wrapping():
    frames = np.random.default_rng(1).random((3, 5, 5, 3)).astype(np.float32)
    score = as_black_box(MeanBrightness())
    u8 = to_uint8(frames)
    assert u8.dtype == np.uint8 and np.abs(u8 / 255.0 - frames).max() <= 0.5 / 255 + 1e-7
    assert np.allclose(score(u8, ["x"] * 3), frames.reshape(3, -1).mean(-1), atol=1e-3)
    with pytest.raises(ValueError, match="uint8"):
        score(frames, ["x"] * 3)
    scorer = load_black_box("contentv_common.reward:MeanBrightness")
    assert isinstance(scorer, MeanBrightness)
    with pytest.raises(ValueError, match="module:factory"):
        load_black_box("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        load_black_box("contentv_common.reward:nope")


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
    from contentv_common.reward_recipe import load_reward_recipe
    from contentv_common.reward_run import RewardData
    from tests.stand_in_encoders import StandInEncoders

    data = RewardData(load_reward_recipe("configs/recipes/reward_grpo_tiny.yaml"), StandInEncoders(), None)
    batch, prompts, whole = data.rollout(3)
    assert whole.shape == (data.recipe.rollout.steps, data.rows, *data.latent_shape[1:])
    part_batch, part_prompts, part = data.rollout(3, slice(2, 6))
    np.testing.assert_array_equal(part, whole[:, 2:6])
    assert part_prompts == prompts and all(np.array_equal(part_batch[k], v) for k, v in batch.items())
    assert not np.allclose(whole[:, 0], whole[:, 1]) and not np.allclose(data.rollout(4)[2], whole)
