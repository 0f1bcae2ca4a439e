"""Reward fine-tuning in JAX raises the reward on held-out seeds while the SFT term bounds the FM loss.

The configs and shapes are those of tests/parity/test_reward_train_parity.py, so the compiled steps are shared. Each
method has a control run without the reward (ReFL with reward_weight 0, GRPO with policy_weight 0: it never scores its
rollouts), from the same weights on the same batches: the reward rises because of the reward term, not the SFT or
anchor terms.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from flax import nnx

from contentv_common.reward.models import as_black_box
from tests.parity.reward_fixtures import (
    EVAL_BATCH,
    EVAL_SEED,
    GRPO,
    GRPO_BATCH,
    REFL,
    REFL_BATCH,
    REWARD,
    ROLLOUT,
    jax_twins,
    reward_recipe,
    rollout_batch,
    sft_batch,
    step_noise,
)

pytestmark = pytest.mark.slow  # every test here trains, tunes or compiles for real


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """The torch tests' initial transformer and VAE weights, loaded into JAX (the same experiment in both)."""
    return jax_twins(tmp_path_factory.mktemp("reward_jax"))


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
    return evaluate(twins[0], twins[1])


def _tuner(twins, method: str, **configs):
    """(tuner, fresh state from the twins' initial weights): AdamW lr 1e-2, clipping at 1."""
    from contentv_jax.reward import train as jr
    from contentv_jax.reward.mesh import reward_mesh

    recipe = reward_recipe(method, lr=1e-2, grad_clip=1.0, **configs)
    tuner = jr.RewardTuner(recipe, reward_mesh(recipe), twins[1], REWARD if method == "refl" else None)
    return tuner, tuner.init_state(nnx.to_pure_dict(nnx.state(twins[0], nnx.Param)))


def test_refl_raises_reward_with_bounded_fm_loss(twins, before):
    from contentv_jax.reward import train as jr

    results = {}
    for name, refl in {"refl": REFL, "control": replace(REFL, reward_weight=0.0)}.items():
        tuner, state = _tuner(twins, "refl", refl=refl)
        for step in range(8):
            batch = jr.to_device_batch(
                {**rollout_batch(step, REFL_BATCH, guided=True), **sft_batch(100 + step, REFL_BATCH)}
            )
            state, metrics = tuner.update(state, batch)
            assert np.isfinite(metrics["loss"])
        results[name] = evaluate(tuner.model(state), twins[1])
    (r0, fm0), (r1, fm1), (rc, _) = before, results["refl"], results["control"]
    assert r1 > r0 + 0.01, (r0, r1)
    assert r1 > rc + 0.01, (rc, r1)
    assert fm1 < 1.25 * fm0, (fm0, fm1)


def unscored(frames, prompts):
    raise AssertionError("the control run scores nothing")


def test_grpo_raises_reward_with_bounded_fm_loss(twins, before):
    runs = {"grpo": (GRPO, as_black_box(REWARD)), "control": (replace(GRPO, policy_weight=0.0), unscored)}
    results = {}
    for name, (grpo, scorer) in runs.items():
        tuner, state = _tuner(twins, "grpo", grpo=grpo)
        for it in range(8):
            batch = {**rollout_batch(it, GRPO_BATCH, guided=True, group_size=GRPO.group_size),
                     **sft_batch(100 + it, GRPO_BATCH)}  # fmt: skip
            noise = step_noise(500 + it, GRPO_BATCH, ROLLOUT.steps)
            state, metrics = tuner.grpo_iteration(state, batch, noise, [""] * GRPO_BATCH, scorer)
            assert ("reward_mean" in metrics) == (name == "grpo"), "the control logs no training reward"
        results[name] = evaluate(tuner.model(state), twins[1])
    (r0, fm0), (r1, fm1), (rc, _) = before, results["grpo"], results["control"]
    assert r1 > r0 + 0.01, (r0, r1)
    assert r1 > rc + 0.01, (rc, r1)
    assert fm1 < 1.25 * fm0, (fm0, fm1)


def test_grpo_rollout_explores_its_trained_steps_alone(twins):
    """`grpo.train_steps` n < S: the first n steps are those of the all-exploring rollout given the same noise, the
    later ones the Euler sampler's from states[n]; the rollout takes n steps of noise and gives n log-probs."""
    from contentv_common.sampling import flow_match_schedule
    from contentv_jax.reward import train as jr

    model, n = twins[0], 1
    grpo = replace(GRPO, train_steps=n)
    batch = jr.to_device_batch(rollout_batch(3, GRPO_BATCH, guided=True, group_size=GRPO.group_size))
    noise = step_noise(5, GRPO_BATCH, ROLLOUT.steps)
    states, log_probs = jr.sde_rollout(model, batch, noise[:n], ROLLOUT, grpo)
    all_states, all_log_probs = jr.sde_rollout(model, batch, noise, ROLLOUT, GRPO)
    assert states.shape == all_states.shape and log_probs.shape == (n, GRPO_BATCH)
    np.testing.assert_allclose(states[: n + 1], all_states[: n + 1], atol=1e-5)
    np.testing.assert_allclose(log_probs, all_log_probs[:n], atol=1e-5)
    schedule = flow_match_schedule(ROLLOUT.steps, ROLLOUT.shift)
    x = states[n]
    for i in range(n, ROLLOUT.steps):
        v = jr.velocity(model, x, float(schedule.timesteps[i]), batch, ROLLOUT.guidance)
        x = x + float(schedule.step_sizes[i]) * v
        np.testing.assert_allclose(states[i + 1], x, atol=1e-5)
    assert not np.allclose(states[-1], all_states[-1], atol=1e-2)  # the later steps no longer explore
    head, head_log_probs = jr.sde_rollout(model, batch, noise[:n], ROLLOUT, grpo, explored_only=True)
    np.testing.assert_allclose(head, states[: n + 1], atol=1e-6)
    np.testing.assert_allclose(head_log_probs, log_probs, atol=1e-6)
    with pytest.raises(ValueError, match=f"explores {n}"):
        jr.sde_rollout(model, batch, noise, ROLLOUT, grpo)


def test_grpo_policy_weight_0_leaves_the_kl_and_sft_terms_alone(twins):
    """`grpo.policy_weight` 0 (the control run): loss = the KL and SFT terms, and the gradient is the same whatever
    the advantages (the reward signal); the policy loss is still reported. (The torch twin's test checks the weight
    scales the term; tests/parity that the twins agree with it.)"""
    import jax

    from contentv_common.reward.models import group_advantages
    from contentv_jax.reward import train as jr

    model, grpo = twins[0], replace(GRPO, policy_weight=0.0)
    ref = nnx.clone(model)
    params = nnx.state(ref, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(0), len(jax.tree.leaves(params))))
    nnx.update(ref, jax.tree.map(lambda p: p + 0.01 * jax.random.normal(next(keys), p.shape, p.dtype), params))
    batch = jr.to_device_batch(
        {**rollout_batch(3, GRPO_BATCH, guided=True, group_size=GRPO.group_size), **sft_batch(4, GRPO_BATCH)}
    )
    states, log_probs = jr.sde_rollout(model, batch, step_noise(5, GRPO_BATCH, ROLLOUT.steps), ROLLOUT, GRPO)
    # ratios exp(-0.3), exp(0.1), ...: with these advantages rows 0 and 3 are clipped, rows 1 and 2 carry gradient
    batch.update(states=states, old_log_probs=log_probs + np.array([[0.3, -0.1, 0.1, -0.3]], np.float32))
    advantages = group_advantages(np.array([0.1, 0.5, 0.2, 0.9]), GRPO.group_size)

    def run(adv: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
        _, grads, metrics = jr.grpo_grads(model, ref, {**batch, "advantages": adv}, ROLLOUT, grpo)
        return {k: float(v) for k, v in metrics.items()}, np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])

    (m, g), (m_flat, g_flat) = run(advantages), run(np.zeros_like(advantages))
    assert m["policy_loss"] != 0 and m["kl"] > 0 and m["sft_loss"] > 0 and m["clip_fraction"] > 0
    assert m["loss"] == pytest.approx(grpo.kl_weight * m["kl"] + grpo.sft_weight * m["sft_loss"], rel=1e-6)
    assert m_flat["policy_loss"] == 0 and m_flat["loss"] == pytest.approx(m["loss"], rel=1e-6)
    np.testing.assert_allclose(g, g_flat, rtol=1e-5, atol=1e-7)
