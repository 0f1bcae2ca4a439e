"""Reward fine-tuning gradients agree between JAX and torch on the same weights, noise and batches (fp32)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from contentv_common.config.model import named_model_config
from contentv_common.reward.models import group_advantages
from tests.parity.reward_fixtures import (
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
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(torch model, torch ref, jax model, jax ref): the same weights in both backends; ref is a perturbed copy."""
    from contentv_jax.loading import load_transformer as load_jax
    from contentv_torch_npu.loading import save_torch
    from contentv_torch_npu.transformer import Transformer

    cfg = named_model_config("tiny")
    torch.manual_seed(0)
    model = Transformer(cfg)
    ref = Transformer(cfg)
    ref.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("reward_parity")
    save_torch(folder / "model", model)
    save_torch(folder / "ref", ref)
    return model, ref, load_jax(folder / "model"), load_jax(folder / "ref")


def _jax_grads_canonical(grads, model) -> dict[str, np.ndarray]:
    """Gradients under canonical (torch) names: written into a copy of the model, read back per block."""
    from flax import nnx

    from contentv_jax.loading import canonical_tensors

    holder = nnx.clone(model)
    nnx.update(holder, grads)
    return dict(canonical_tensors(holder))


def _compare_grads(jax_grads, jax_model, torch_model, rel_err) -> float:
    ours = _jax_grads_canonical(jax_grads, jax_model)
    theirs = {k: p.grad.numpy() for k, p in torch_model.named_parameters()}
    assert set(ours) == set(theirs)
    flat_j = np.concatenate([ours[k].ravel() for k in sorted(ours)])
    flat_t = np.concatenate([theirs[k].ravel() for k in sorted(ours)])
    assert np.linalg.norm(flat_t) > 0
    return rel_err(flat_j, flat_t)


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """(torch, jax) first-frame decoders over the same tiny random Wan VAE (C1), moved through a diffusers folder."""
    from contentv_jax.reward.train import VaeFirstFrameDecoder as JaxDecoder
    from contentv_jax.vae import load_vae
    from contentv_torch_npu.vae import save_vae

    t_decoder = tiny_vae_decoder_torch()
    folder = tmp_path_factory.mktemp("reward_vae") / "vae"
    save_vae(folder, t_decoder.vae)
    return t_decoder, JaxDecoder(load_vae(folder))


@pytest.mark.slow
def test_refl_gradients_match(models, decoders, rel_err):
    from contentv_jax.reward import train as jr
    from contentv_torch_npu.reward import train as tr

    t_model, t_ref, j_model, j_ref = models
    t_decoder, j_decoder = decoders
    refl = REFL
    batch = {**rollout_batch(1, REFL_BATCH, guided=True), **sft_batch(2, REFL_BATCH)}
    reward = REWARD

    loss_j, grads_j, metrics_j = jr.refl_grads(
        j_model, j_ref, j_decoder, jr.carried(reward),
        jr.to_device_batch(batch), ROLLOUT, refl,
    )  # fmt: skip
    t_model.zero_grad()
    loss_t, metrics_t = tr.refl_loss(t_model, t_ref, t_decoder, reward, tr.to_device_batch(batch), ROLLOUT, refl)
    loss_t.backward()
    for key in ("reward_mean", "sft_loss", "anchor"):
        assert rel_err(metrics_j[key], metrics_t[key].numpy()) < 1e-5, key
    assert float(metrics_t["anchor"]) > 0 and float(metrics_t["sft_loss"]) > 0
    assert rel_err(loss_j, loss_t.detach().numpy()) < 1e-5
    assert _compare_grads(grads_j, j_model, t_model, rel_err) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    "grpo",
    [GRPO, replace(GRPO, train_steps=2, noise_grid=2, policy_weight=0.5)],
    ids=["every_step_explores", "2_of_3_on_grid_2_policy_weight_half"],
)
def test_grpo_gradients_match(models, rel_err, grpo):
    """Rollout and update of both backends: every sampler step exploring per latent element, or the first 2 of 3
    exploring on a 2 x 2 grid of the 4 x 4 latent (the last step Euler, log-probs and KL of cell means) with the
    clipped-ratio term at half weight."""
    from contentv_jax.reward import train as jr
    from contentv_torch_npu.reward import train as tr

    t_model, t_ref, j_model, j_ref = models
    batch = {**rollout_batch(3, GRPO_BATCH, guided=True, group_size=grpo.group_size), **sft_batch(4, GRPO_BATCH)}
    noise = step_noise(5, GRPO_BATCH, grpo.explored_steps(ROLLOUT.steps), grpo.noise_grid)
    states_j, logp_j = jr.sde_rollout(j_model, jr.to_device_batch(batch), noise, ROLLOUT, grpo)
    states_t, logp_t = tr.sde_rollout(t_model, tr.to_device_batch(batch), torch.from_numpy(noise), ROLLOUT, grpo)
    assert states_t.shape[0] == ROLLOUT.steps + 1 and logp_t.shape == (grpo.explored_steps(ROLLOUT.steps), GRPO_BATCH)
    assert rel_err(states_j, states_t.numpy()) < 1e-5
    assert rel_err(logp_j, logp_t.numpy()) < 1e-5

    # train on the rollout with a policy that has moved, so ratios differ from 1: exp(-0.3), exp(0.1), ...; with these
    # advantages rows 0 and 3 are clipped and rows 1 and 2 carry the policy term's gradient
    shifted = logp_t.numpy() + np.array([[0.3, -0.1, 0.1, -0.3]], np.float32)
    batch.update(
        states=states_t.numpy(), old_log_probs=shifted, advantages=group_advantages(np.array([0.1, 0.5, 0.2, 0.9]), 4)
    )
    loss_j, grads_j, metrics_j = jr.grpo_grads(j_model, j_ref, jr.to_device_batch(batch), ROLLOUT, grpo)
    t_model.zero_grad()
    metrics_t = tr.grpo_backward(t_model, t_ref, tr.to_device_batch(batch), ROLLOUT, grpo)
    loss_t = metrics_t["loss"]
    assert float(metrics_t["kl"]) > 0 and float(metrics_t["clip_fraction"]) > 0
    for key in ("policy_loss", "kl", "sft_loss", "clip_fraction"):
        assert rel_err(metrics_j[key], metrics_t[key].numpy()) < 1e-5, key
    assert rel_err(loss_j, loss_t.detach().numpy()) < 1e-5
    assert _compare_grads(grads_j, j_model, t_model, rel_err) < 1e-5


@pytest.mark.slow
def test_refl_gradients_match_with_clip_reward(models, decoders, tmp_path, rel_err):
    """The full product path: CLIP preference reward on the VAE-decoded first frame, prompts tokenised once."""
    from contentv_jax.reward import train as jr
    from contentv_jax.reward.clip import load_clip_reward as load_jax_clip
    from contentv_torch_npu.reward import train as tr
    from contentv_torch_npu.reward.clip import load_clip_reward as load_torch_clip
    from tests.parity.test_reward_clip import save_tiny_clip

    t_model, _, j_model, _ = models
    t_decoder, j_decoder = decoders
    save_tiny_clip(tmp_path / "clip")
    j_clip, t_clip = load_jax_clip(tmp_path / "clip"), load_torch_clip(tmp_path / "clip")
    batch = {**rollout_batch(6, REFL_BATCH, guided=True), **sft_batch(7, REFL_BATCH)}
    batch["tokens"] = j_clip.tokenize(["a red cat", "blue dog"])
    _, grads_j, metrics_j = jr.refl_grads(j_model, None, j_decoder, j_clip, jr.to_device_batch(batch), ROLLOUT, REFL)
    t_model.zero_grad()
    loss_t, metrics_t = tr.refl_loss(t_model, None, t_decoder, t_clip, tr.to_device_batch(batch), ROLLOUT, REFL)
    loss_t.backward()
    assert rel_err(metrics_j["reward_mean"], metrics_t["reward_mean"].numpy()) < 1e-5
    assert _compare_grads(grads_j, j_model, t_model, rel_err) < 1e-5


def test_ema_anchor_update_matches(tmp_path, rel_err):
    """The EMA anchor moves the reference towards the trained weights by (1 - decay), alike in both backends."""
    from flax import nnx

    from contentv_jax.loading import canonical_tensors, load_transformer
    from contentv_jax.optim import ema
    from contentv_torch_npu.loading import save_torch
    from contentv_torch_npu.reward import train as tr
    from tests.parity.reward_fixtures import torch_model

    t_model, t_ref = torch_model(0), torch_model(1)
    save_torch(tmp_path / "model", t_model)
    save_torch(tmp_path / "ref", t_ref)
    j_model, j_ref = load_transformer(tmp_path / "model"), load_transformer(tmp_path / "ref")
    expected = {
        k: 0.9 * v.detach().numpy() + 0.1 * t_model.state_dict()[k].numpy() for k, v in t_ref.state_dict().items()
    }
    tr.ema_update(t_ref, t_model, 0.9)
    anchor = nnx.state(j_ref, nnx.Param)  # the JAX run keeps it as the anchor entry of its state (RewardTuner)
    params = nnx.to_pure_dict(nnx.state(j_model, nnx.Param))
    nnx.replace_by_pure_dict(anchor, ema(nnx.to_pure_dict(anchor), params, 0.9))
    nnx.update(j_ref, anchor)
    for name, array in canonical_tensors(j_ref):
        assert rel_err(array, expected[name]) < 1e-6, name
        assert rel_err(t_ref.state_dict()[name].numpy(), expected[name]) < 1e-6, name
