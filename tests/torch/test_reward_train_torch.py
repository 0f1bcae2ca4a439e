"""Reward fine-tuning in the torch twin raises the reward on held-out seeds while the SFT term bounds the FM loss.

Each method is compared with a control run that gets no reward signal (ReFL's reward weight 0, GRPO's policy weight 0:
it never scores its rollouts) but the same SFT and anchor terms, so the gain is the reward's, not a side effect of the
SFT data.
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


def unscored(frames, prompts):
    raise AssertionError("the control run scores nothing")


@pytest.mark.slow
def test_grpo_raises_reward_with_bounded_fm_loss():
    from contentv_torch_npu.reward import train as tr

    opt_cfg = OptimizerConfig(lr=1e-2, grad_clip=1.0)
    runs = {"grpo": (GRPO, as_black_box(REWARD)), "control": (dataclasses.replace(GRPO, policy_weight=0.0), unscored)}
    results = {}
    for name, (grpo, scorer) in runs.items():
        model, ref = _model()
        optimizer = make_optimizer(model, opt_cfg)
        before = evaluate(model)
        for it in range(8):
            batch = {**rollout_batch(it, GRPO_BATCH, guided=True, group_size=GRPO.group_size),
                     **sft_batch(100 + it, GRPO_BATCH)}  # fmt: skip
            noise = step_noise(500 + it, GRPO_BATCH, ROLLOUT.steps)
            metrics = tr.grpo_iteration(optimizer, tr.Tuning(opt_cfg), model, ref, DECODER, scorer, batch, noise,
                                        [""] * GRPO_BATCH, ROLLOUT, grpo)  # fmt: skip
            assert np.isfinite(metrics["loss"])
            assert ("reward_mean" in metrics) == (name == "grpo"), "the control logs no training reward"
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
    head, head_log_probs = tr.sde_rollout(model, batch, noise[:n], ROLLOUT, grpo, explored_only=True)
    assert torch.equal(head, states[: n + 1]) and torch.equal(head_log_probs, log_probs)
    with pytest.raises(ValueError, match=f"explores {n}"):
        tr.sde_rollout(model, batch, noise, ROLLOUT, grpo)


def test_grpo_policy_weight_scales_the_clipped_ratio_term_alone():
    """`grpo.policy_weight` w: loss and gradient are w x the clipped-ratio term's + the KL's and SFT's, so at 0 (the
    control run) they are those of the same batch without a reward signal (zero advantages); the policy loss is still
    reported."""
    from contentv_common.reward.models import group_advantages
    from contentv_torch_npu.reward import train as tr

    model, ref = torch_model(), torch_model()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    batch = tr.to_device_batch(
        {**rollout_batch(3, GRPO_BATCH, guided=True, group_size=GRPO.group_size), **sft_batch(4, GRPO_BATCH)}
    )
    states, log_probs = tr.sde_rollout(model, batch, torch.from_numpy(step_noise(5, GRPO_BATCH, ROLLOUT.steps)),
                                       ROLLOUT, GRPO)  # fmt: skip
    # ratios exp(-0.3), exp(0.1), ...: with these advantages rows 0 and 3 are clipped, rows 1 and 2 carry gradient
    batch.update(states=states, old_log_probs=log_probs + torch.tensor([[0.3, -0.1, 0.1, -0.3]]))
    advantages = torch.from_numpy(group_advantages(np.array([0.1, 0.5, 0.2, 0.9]), GRPO.group_size))

    def run(weight: float, adv: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        model.zero_grad()
        grpo = dataclasses.replace(GRPO, policy_weight=weight)
        metrics = tr.grpo_backward(model, ref, {**batch, "advantages": adv}, ROLLOUT, grpo)
        return {k: float(v) for k, v in metrics.items()}, torch.cat([p.grad.flatten() for p in model.parameters()])

    (m0, g0), (m_half, g_half), (m1, g1) = (run(w, advantages) for w in (0.0, 0.5, 1.0))
    m_rest, g_rest = run(1.0, torch.zeros_like(advantages))
    assert m0["policy_loss"] != 0 and m0["kl"] > 0 and m0["sft_loss"] > 0 and m0["clip_fraction"] > 0
    assert m0["loss"] == pytest.approx(m_rest["loss"], rel=1e-6) and m_rest["policy_loss"] == 0
    assert m1["loss"] - m0["loss"] == pytest.approx(m1["policy_loss"], rel=1e-5)
    torch.testing.assert_close(g0, g_rest)
    assert (g1 - g0).norm() > 0.1 * g0.norm(), "the policy term moves this gradient"
    torch.testing.assert_close(g_half, (g0 + g1) / 2, rtol=1e-5, atol=1e-6)
    assert m_half["loss"] == pytest.approx((m0["loss"] + m1["loss"]) / 2, rel=1e-6)


def test_grpo_control_run_trains_as_from_its_whole_scored_rollouts():
    """`grpo.policy_weight` 0 (the control run): the iteration samples the explored steps alone and neither decodes
    nor scores, yet makes the updates that the whole rollout, scored, gives at that weight; no training reward is
    logged."""
    from contentv_common.reward.models import group_advantages
    from contentv_torch_npu.reward import train as tr

    opt_cfg = OptimizerConfig(lr=1e-2, grad_clip=1.0)
    control = dataclasses.replace(GRPO, policy_weight=0.0, train_steps=1)  # the later 2 sampler steps: Euler
    batch = {**rollout_batch(3, GRPO_BATCH, guided=True, group_size=GRPO.group_size), **sft_batch(4, GRPO_BATCH)}
    noise = step_noise(5, GRPO_BATCH, 1)
    (model, ref), (whole, _) = _model(), _model()
    optimizer, whole_optimizer = make_optimizer(model, opt_cfg), make_optimizer(whole, opt_cfg)

    metrics = tr.grpo_iteration(optimizer, tr.Tuning(opt_cfg), model, ref, None, unscored, batch, noise,
                                [""] * GRPO_BATCH, ROLLOUT, control)  # fmt: skip
    device_batch = tr.to_device_batch(batch)
    states, log_probs = tr.sde_rollout(whole, device_batch, torch.from_numpy(noise), ROLLOUT, control)
    advantages = group_advantages(np.array([0.1, 0.5, 0.2, 0.9]), GRPO.group_size)
    device_batch.update(states=states, old_log_probs=log_probs, advantages=torch.from_numpy(advantages))
    for _ in range(control.updates_per_rollout):
        whole_metrics = tr.grpo_train_step(whole_optimizer, tr.Tuning(opt_cfg), whole, ref, device_batch, ROLLOUT,
                                           control)  # fmt: skip
    assert "reward_mean" not in metrics and metrics["kl"] > 0 and metrics["skipped"] == 0
    assert metrics["loss"] == pytest.approx(whole_metrics["loss"], rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), whole.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(next(model.parameters()), next(ref.parameters())), "the model moved"
