"""Reward fine-tuning in JAX raises the reward on held-out seeds while the SFT term bounds the FM loss.

The configs and shapes are those of tests/parity/test_reward_train_parity.py, so the compiled steps are shared. Each
method has a control run without the reward (ReFL with reward_weight 0, GRPO with a constant black-box reward), from
the same weights on the same batches: the reward rises because of the reward term, not the SFT or anchor terms.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from flax import nnx

from contentv_common.config.recipe import OptimizerConfig
from contentv_common.reward.models import TargetColour, as_black_box
from contentv_jax.optim import model_optimizer
from tests.parity.reward_fixtures import (
    EVAL_BATCH,
    EVAL_SEED,
    GRPO,
    GRPO_BATCH,
    REFL,
    REFL_BATCH,
    ROLLOUT,
    TARGET,
    jax_twins,
    rollout_batch,
    sft_batch,
    step_noise,
)

pytestmark = pytest.mark.slow  # every test here trains, tunes or compiles for real

REWARD = TargetColour(TARGET)


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """The torch tests' initial transformer and VAE weights, loaded into JAX (the same experiment in both)."""
    return jax_twins(tmp_path_factory.mktemp("reward_jax"))


def _model(twins):
    model = nnx.clone(twins[0])
    return model, nnx.clone(model)


@nnx.jit
def _fm_loss(model, batch):
    from contentv_jax.reward.train import sft_loss

    return sft_loss(model, batch)


def evaluate(model, decoder) -> tuple[float, float]:
    """(mean reward of ODE samples from held-out seeds, FM loss on a held-out real batch)."""
    from contentv_jax.reward import train as jr
    from contentv_jax.sampling import sample

    b = rollout_batch(EVAL_SEED, EVAL_BATCH, guided=True)
    latents = sample(model, b["noise"], b["text"], b["pooled"], b["neg_text"], b["neg_pooled"], steps=ROLLOUT.steps,
                     guidance=ROLLOUT.guidance, shift=ROLLOUT.shift, progress=False)  # fmt: skip
    frames = jr.decode_first_frame(decoder, latents)
    fm = _fm_loss(model, jr.to_device_batch(sft_batch(EVAL_SEED + 1, EVAL_BATCH)))
    return float(np.mean(REWARD(np.asarray(frames), [""] * EVAL_BATCH))), float(fm)


@pytest.fixture(scope="module")
def before(twins) -> tuple[float, float]:
    """(reward, FM loss) of the initial model, where both methods start."""
    return evaluate(_model(twins)[0], twins[1])


def test_refl_raises_reward_with_bounded_fm_loss(twins, before):
    from contentv_jax.reward import train as jr

    decoder, reward = twins[1], jr.carried(REWARD)
    results = {}
    for name, refl in {"refl": REFL, "control": replace(REFL, reward_weight=0.0)}.items():
        model, ref = _model(twins)
        optimizer = model_optimizer(model, OptimizerConfig(lr=1e-2, grad_clip=1.0), None)
        for step in range(8):
            batch = jr.to_device_batch(
                {**rollout_batch(step, REFL_BATCH, guided=True), **sft_batch(100 + step, REFL_BATCH)}
            )
            metrics = jr.refl_train_step(optimizer, model, ref, decoder, reward, batch, ROLLOUT, refl)
            assert np.isfinite(float(metrics["loss"]))
        results[name] = evaluate(model, decoder)
    (r0, fm0), (r1, fm1), (rc, _) = before, results["refl"], results["control"]
    assert r1 > r0 + 0.01, (r0, r1)
    assert r1 > rc + 0.01, (rc, r1)
    assert fm1 < 1.25 * fm0, (fm0, fm1)


def test_grpo_raises_reward_with_bounded_fm_loss(twins, before):
    from contentv_jax.reward import train as jr

    decoder = twins[1]
    scorers = {"grpo": as_black_box(REWARD), "control": lambda frames, prompts: np.zeros(len(frames), np.float32)}
    results = {}
    for name, scorer in scorers.items():
        model, ref = _model(twins)
        optimizer = model_optimizer(model, OptimizerConfig(lr=1e-2, grad_clip=1.0), None)
        for it in range(8):
            batch = {**rollout_batch(it, GRPO_BATCH, guided=True, group_size=GRPO.group_size),
                     **sft_batch(100 + it, GRPO_BATCH)}  # fmt: skip
            noise = step_noise(500 + it, GRPO_BATCH, ROLLOUT.steps)
            jr.grpo_iteration(optimizer, model, ref, decoder, scorer, batch, noise, [""] * GRPO_BATCH, ROLLOUT, GRPO)
        results[name] = evaluate(model, decoder)
    (r0, fm0), (r1, fm1), (rc, _) = before, results["grpo"], results["control"]
    assert r1 > r0 + 0.01, (r0, r1)
    assert r1 > rc + 0.01, (rc, r1)
    assert fm1 < 1.25 * fm0, (fm0, fm1)
