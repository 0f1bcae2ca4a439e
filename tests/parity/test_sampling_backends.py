"""JAX and torch samplers walk the same trajectory from the same weights, noise and text (fp32, tiny model)."""

import numpy as np
import pytest
import torch
from flax import nnx

import contentv_jax.sampling as jax_sampling
import contentv_torch_npu.sampling as torch_sampling
from contentv_common.config.model import named_model_config
from contentv_common.sampling import draw_noise, latent_shape
from contentv_jax.loading import canonical_tensors
from contentv_jax.transformer import Transformer as JaxTransformer
from contentv_torch_npu.transformer import Transformer as TorchTransformer


@pytest.fixture(scope="module")
def models():
    cfg = named_model_config("tiny")
    jm = JaxTransformer(cfg, rngs=nnx.Rngs(0))
    tm = TorchTransformer(cfg).eval()
    tm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in canonical_tensors(jm)}, strict=True)
    return cfg, jm, tm


def _text(cfg, batch, seed):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((batch, 21, cfg.joint_attention_dim), dtype=np.float32),
        rng.standard_normal((batch, cfg.pooled_projection_dim), dtype=np.float32),
    )


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_jax_and_torch_sampling_agree(models, guidance, rel_err):
    cfg, jm, tm = models
    noise = draw_noise(11, latent_shape(cfg.in_channels, frames=5, height=32, width=48, batch=2))
    text, pooled = _text(cfg, 2, 0)
    neg_text, neg_pooled = _text(cfg, 2, 1)
    kwargs = dict(steps=4, guidance=guidance, shift=3.0, progress=False)
    out_jax = jax_sampling.sample(jm, noise, text, pooled, neg_text, neg_pooled, **kwargs)
    out_torch = torch_sampling.sample(tm, noise, text, pooled, neg_text, neg_pooled, **kwargs)
    assert out_jax.shape == out_torch.shape == noise.shape == (2, 16, 2, 4, 6)
    assert out_jax.dtype == out_torch.dtype == np.float32
    assert rel_err(out_jax, out_torch) < 1e-5
    assert rel_err(out_jax, noise) > 0.05, "sampling must move the latents"


def test_guidance_uses_the_negative_prompt(models, rel_err):
    cfg, _, tm = models
    noise = draw_noise(3, (1, 16, 1, 4, 4))
    text, pooled = _text(cfg, 1, 0)
    kwargs = dict(steps=2, guidance=5.0, shift=3.0, progress=False)
    a = torch_sampling.sample(tm, noise, text, pooled, *_text(cfg, 1, 1), **kwargs)
    b = torch_sampling.sample(tm, noise, text, pooled, *_text(cfg, 1, 2), **kwargs)
    assert rel_err(a, b) > 1e-3
    with pytest.raises(ValueError, match="neg_text"):
        torch_sampling.sample(tm, noise, text, pooled, **kwargs)
