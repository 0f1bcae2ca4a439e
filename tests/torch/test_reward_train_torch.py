"""Reward fine-tuning in the torch twin raises the reward on held-out seeds while the SFT term bounds the FM loss.

Each method is compared with a control run that gets no reward signal (reward weight 0 / constant black-box reward)
but the same SFT and anchor terms, so the gain is the reward's, not a side effect of the SFT data.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from contentv_common.config.recipe import OptimizerConfig
from contentv_common.reward.models import as_black_box
from contentv_torch_npu.optim import make_optimizer
from tests.parity.reward_fixtures import (
    EVAL_BATCH,
    EVAL_SEED,
    GRPO,
    GRPO_BATCH,
    REFL,
    REFL_BATCH,
    REWARD,
    ROLLOUT,
    rollout_batch,
    sft_batch,
    step_noise,
    tiny_vae_decoder_torch,
    torch_model,
)

DECODER = tiny_vae_decoder_torch()


def _model():
    model = torch_model()
    return model, copy.deepcopy(model).requires_grad_(False)


def evaluate(model) -> tuple[float, float]:
    """(mean reward of ODE samples from held-out seeds, FM loss on a held-out real batch)."""
    from contentv_torch_npu.reward import train as tr
    from contentv_torch_npu.sampling import sample

    b = rollout_batch(EVAL_SEED, EVAL_BATCH, guided=True)
    latents = sample(model, b["noise"], b["text"], b["pooled"], b["neg_text"], b["neg_pooled"], steps=ROLLOUT.steps,
                     guidance=ROLLOUT.guidance, shift=ROLLOUT.shift, progress=False)  # fmt: skip
    with torch.no_grad():
        frames = tr.decode_first_frame(DECODER, torch.from_numpy(latents))
        fm = tr.sft_loss(model, tr.to_device_batch(sft_batch(EVAL_SEED + 1, EVAL_BATCH)))
    return float(REWARD(frames, [""] * EVAL_BATCH).mean()), float(fm)


@pytest.mark.slow
def test_refl_raises_reward_with_bounded_fm_loss():
    from contentv_torch_npu.reward import train as tr

    opt_cfg = OptimizerConfig(lr=1e-2, grad_clip=1.0)
    results = {}
    for name, refl in (("refl", REFL), ("control", dataclasses.replace(REFL, reward_weight=0.0))):
        model, ref = _model()
        optimizer = make_optimizer(model, opt_cfg)
        before = evaluate(model)
        for step in range(8):
            batch = tr.to_device_batch(
                {**rollout_batch(step, REFL_BATCH, guided=True), **sft_batch(100 + step, REFL_BATCH)}
            )
            tr.refl_train_step(optimizer, tr.Tuning(opt_cfg), model, ref, DECODER, REWARD, batch, ROLLOUT, refl)
        results[name] = evaluate(model)
    (r0, fm0), (r1, fm1), (rc, _) = before, results["refl"], results["control"]
    assert r1 > r0 + 0.01, (r0, r1)
    assert r1 > rc + 0.01, (rc, r1)
    assert fm1 < 1.25 * fm0, (fm0, fm1)


@pytest.mark.slow
def test_grpo_raises_reward_with_bounded_fm_loss():
    from contentv_torch_npu.reward import train as tr

    opt_cfg = OptimizerConfig(lr=1e-2, grad_clip=1.0)
    scorers = {"grpo": as_black_box(REWARD), "control": lambda frames, prompts: np.zeros(len(frames), np.float32)}
    results = {}
    for name, scorer in scorers.items():
        model, ref = _model()
        optimizer = make_optimizer(model, opt_cfg)
        before = evaluate(model)
        for it in range(8):
            batch = {**rollout_batch(it, GRPO_BATCH, guided=True, group_size=GRPO.group_size),
                     **sft_batch(100 + it, GRPO_BATCH)}  # fmt: skip
            noise = step_noise(500 + it, GRPO_BATCH, ROLLOUT.steps)
            metrics = tr.grpo_iteration(optimizer, tr.Tuning(opt_cfg), model, ref, DECODER, scorer, batch, noise,
                                        [""] * GRPO_BATCH, ROLLOUT, GRPO)  # fmt: skip
            assert np.isfinite(metrics["loss"])
        results[name] = evaluate(model)
    (r0, fm0), (r1, fm1), (rc, _) = before, results["grpo"], results["control"]
    assert r1 > r0 + 0.01, (r0, r1)
    assert r1 > rc + 0.01, (rc, r1)
    assert fm1 < 1.25 * fm0, (fm0, fm1)


def test_grpo_rollout_explores_its_trained_steps_alone():
    """`grpo.train_steps` n < S: the first n steps are those of the all-exploring rollout given the same noise, the
    later ones the Euler sampler's from states[n]; the rollout takes n steps of noise and gives n log-probs."""
    from contentv_common.sampling import flow_match_schedule
    from contentv_torch_npu.reward import train as tr

    model, n = torch_model(), 1
    grpo = dataclasses.replace(GRPO, train_steps=n)
    batch = tr.to_device_batch(rollout_batch(3, GRPO_BATCH, guided=True, group_size=GRPO.group_size))
    noise = torch.from_numpy(step_noise(5, GRPO_BATCH, ROLLOUT.steps))
    states, log_probs = tr.sde_rollout(model, batch, noise[:n], ROLLOUT, grpo)
    all_states, all_log_probs = tr.sde_rollout(model, batch, noise, ROLLOUT, GRPO)
    assert states.shape == all_states.shape and log_probs.shape == (n, GRPO_BATCH)
    torch.testing.assert_close(states[: n + 1], all_states[: n + 1], rtol=0, atol=1e-5)
    torch.testing.assert_close(log_probs, all_log_probs[:n], rtol=0, atol=1e-5)
    schedule = flow_match_schedule(ROLLOUT.steps, ROLLOUT.shift)
    x = states[n]
    with torch.no_grad():
        for i in range(n, ROLLOUT.steps):
            v = tr.velocity(model, x, float(schedule.timesteps[i]), batch, ROLLOUT.guidance)
            x = x + float(schedule.step_sizes[i]) * v
            torch.testing.assert_close(states[i + 1], x, rtol=0, atol=1e-5)
    assert not torch.allclose(states[-1], all_states[-1], atol=1e-2)  # the later steps no longer explore
    with pytest.raises(ValueError, match=f"explores {n}"):
        tr.sde_rollout(model, batch, noise, ROLLOUT, grpo)
