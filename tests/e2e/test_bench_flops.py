"""The documented FLOP count (contentv_common/model/flops.py) against the matmuls the models actually run.

Three independent counts on the tiny model at a token count with odd text length and batch 2: multiply-adds of every
torch Linear/Conv from its weight shape (our twin and the diffusers reference), torch's FlopCounterMode with SDPA's
math path (linear + attention), and the dot_general/conv ops of the JAX model's jaxpr. Any change to the model's
layers makes these differ from the formula.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
import torch
from jax.extend.core import jaxprs_in_params
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from contentv_common.config.model import named_model_config
from contentv_common.model.flops import headline_forward_flops, image_tokens, transformer_flops

CFG = named_model_config("tiny")
BATCH, FRAMES, HEIGHT, WIDTH, TEXT = 2, 3, 8, 12, 7


def _inputs() -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((BATCH, CFG.in_channels, FRAMES, HEIGHT, WIDTH), dtype=np.float32),
        rng.uniform(0, 1000, BATCH).astype(np.float32),
        rng.standard_normal((BATCH, TEXT, CFG.joint_attention_dim), dtype=np.float32),
        rng.standard_normal((BATCH, CFG.pooled_projection_dim), dtype=np.float32),
    )


def _expected():
    return transformer_flops(CFG, image_tokens(CFG, FRAMES, HEIGHT, WIDTH), TEXT, BATCH)


def _weight_macs(model: torch.nn.Module, call) -> int:
    """Multiply-adds of every Linear/Conv2d call, from the weight shape and the output size."""
    total = 0

    def hook(module, _inputs, output):
        nonlocal total
        fan_in = module.weight[0].numel()  # in_features, or in_channels/groups x kernel
        total += output.numel() * fan_in

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    handles = [m.register_forward_hook(hook) for m in layers]
    with torch.no_grad():
        call()
    for h in handles:
        h.remove()
    return total


def _torch_twin() -> torch.nn.Module:
    from contentv_torch_npu import Transformer

    torch.manual_seed(0)
    return Transformer(CFG).eval()


def test_linear_count_matches_torch_twin_layers():
    model = _torch_twin()
    args = [torch.from_numpy(a) for a in _inputs()]
    assert 2 * _weight_macs(model, lambda: model(*args)) == _expected().linear


def test_linear_count_matches_diffusers_reference_on_flattened_frames():
    """The reference runs the same video tokens as a 1-frame image (rows = frames x height): same linear work."""
    from diffusers import SD3Transformer2DModel

    rows, cols = FRAMES * HEIGHT // CFG.patch_size, WIDTH // CFG.patch_size
    ref = SD3Transformer2DModel(
        sample_size=CFG.sample_size,
        patch_size=CFG.patch_size,
        in_channels=CFG.in_channels,
        num_layers=CFG.num_layers,
        attention_head_dim=CFG.attention_head_dim,
        num_attention_heads=CFG.num_attention_heads,
        joint_attention_dim=CFG.joint_attention_dim,
        caption_projection_dim=CFG.hidden_size,
        pooled_projection_dim=CFG.pooled_projection_dim,
        out_channels=CFG.out_channels,
        pos_embed_max_size=max(rows, cols),
        qk_norm="rms_norm",
    ).eval()
    x, t, c, p = (torch.from_numpy(a) for a in _inputs())
    image = x.reshape(BATCH, CFG.in_channels, FRAMES * HEIGHT, WIDTH)
    macs = _weight_macs(ref, lambda: ref(image, c, p, t, return_dict=False))
    assert 2 * macs == _expected().linear


def test_total_count_matches_torch_flop_counter_with_math_attention():
    model = _torch_twin()
    args = [torch.from_numpy(a) for a in _inputs()]
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args)
    assert counter.get_total_flops() == _expected().forward


def _jaxpr_matmul_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        out = math.prod(eqn.outvars[0].aval.shape)
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * out * math.prod(lhs[i] for i in lhs_contract)
        elif eqn.primitive.name == "conv_general_dilated":
            kernel = eqn.invars[1].aval.shape
            out_features = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
            total += 2 * out * math.prod(kernel) // out_features
        total += sum(_jaxpr_matmul_flops(sub) for sub in jaxprs_in_params(eqn.params))
    return total


@pytest.mark.parametrize("remat", ["none", "full"])
def test_total_count_matches_jax_model_matmuls(remat):
    """Remat changes the backward, not the forward: the forward jaxpr must count the same."""
    from flax import nnx

    from contentv_jax import Transformer

    graphdef, state = nnx.split(Transformer(CFG, rngs=nnx.Rngs(0), remat=remat))
    jaxpr = jax.make_jaxpr(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *_inputs())
    assert _jaxpr_matmul_flops(jaxpr.jaxpr) == _expected().forward


def test_training_is_three_forwards_and_breakdown_adds_up():
    count = _expected()
    assert count.step("train") == 3 * count.forward
    assert count.step("sample") == count.forward
    assert count.forward == count.stream_linear + count.attention + count.modulation + count.embed
    with pytest.raises(ValueError, match="mode"):
        count.step("eval")
    with pytest.raises(ValueError, match="text_tokens"):
        transformer_flops(CFG, 10, 0)


def test_headline_formula_describes_contentv_8b():
    """The docs' 24 d^2 N + 4 N^2 d per block is within 1% of the exact count at 8B sizes, 4k to 42k tokens."""
    cfg = named_model_config("contentv-8b")
    for frames, h, w in ((9, 32, 56), (21, 60, 104), (32, 54, 96)):
        video = image_tokens(cfg, frames, h, w)
        exact = transformer_flops(cfg, video, 333).forward
        headline = headline_forward_flops(cfg, video + 333)
        assert abs(exact - headline) / exact < 0.01
    assert image_tokens(cfg, 21, 60, 104) + 333 == 33_093
    attn = transformer_flops(cfg, 32_760, 333)
    assert 0.6 < attn.attention / attn.forward < 0.75  # attention dominates at 33k tokens (docs/benchmarks.md: ~69%)


@pytest.mark.parametrize("num_res_blocks", [1, 2])
def test_vae_encode_flops_match_torch_flop_counter(num_res_blocks: int) -> None:
    """The Wan VAE encode's counted FLOPs (the cache builder's time model) equal FlopCounterMode's count of the torch
    twin encoding 2 clips of 9 frames (frame 0, then two 4-frame chunks with the causal history), 24 x 40 pixels (a
    middle block of 3 x 5)."""
    from contentv_common.model.flops import vae_encode_flops
    from contentv_common.vae.config import VAEConfig
    from contentv_torch_npu.vae import WanVAE

    cfg = VAEConfig(base_dim=8, num_res_blocks=num_res_blocks)
    vae = WanVAE(cfg).eval()
    video = torch.zeros(2, 3, 9, 24, 40)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        vae.encode(video)
    assert counter.get_total_flops() == vae_encode_flops(cfg, 9, 24, 40, batch=2)
