"""Blocks under scan: the program does not grow with depth, equals a block-by-block loop, and keeps its layer axis
out of the sharding rules and out of the weight-decay mask."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import OptimizerConfig
from contentv_jax import sharding
from contentv_jax.train import make_optimizer
from contentv_jax.transformer import Transformer

# narrow: 38 heads and 333 text tokens as in ContentV-8B, everything else tiny
NARROW = ModelConfig(
    num_layers=2,
    num_attention_heads=38,
    attention_head_dim=8,
    hidden_size=304,
    joint_attention_dim=8,
    pooled_projection_dim=8,
    sample_size=8,
    pos_embed_max_size=8,
)


def _inputs(cfg: ModelConfig, seed: int = 0) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.standard_normal((1, cfg.in_channels, 2, 4, 4), np.float32)),
        jnp.asarray([500.0]),
        jnp.asarray(rng.standard_normal((1, 333, cfg.joint_attention_dim), np.float32)),
        jnp.asarray(rng.standard_normal((1, cfg.pooled_projection_dim), np.float32)),
    )


def _train_program_ops(num_layers: int) -> int:
    """Operations in the lowered (StableHLO) loss-and-gradient program of a model that deep, remat on."""
    cfg = NARROW.replace(num_layers=num_layers)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), remat="full")))
    inputs = _inputs(cfg)

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p)(*inputs) ** 2)

    text = jax.jit(jax.value_and_grad(loss)).lower(params).as_text()
    return len(re.findall(r"= stablehlo\.", text))


def test_program_size_does_not_grow_with_depth():
    two, deep = _train_program_ops(2), _train_program_ops(38)
    assert two > 100  # a real program was counted
    assert deep < 1.5 * two, (two, deep)


@pytest.mark.slow
def test_scan_equals_running_the_blocks_one_by_one(rel_err):
    cfg = NARROW.replace(num_layers=3)
    model = Transformer(cfg, rngs=nnx.Rngs(1))
    inputs = _inputs(cfg, seed=1)
    x, context, temb_act = model.embed(*inputs)
    for i in range(cfg.num_layers):
        x, context = model.block(i)(x, context, temb_act)
    assert context is None  # the last block is context_pre_only
    assert model.blocks.attn.to_q.kernel.shape == (2, 304, 304) and not hasattr(model.last_block.attn, "add_out")
    assert rel_err(np.asarray(model(*inputs)), np.asarray(model.head(x, temb_act, inputs[0].shape))) < 1e-6


def test_stacked_parameters_keep_their_layer_axis_replicated():
    for leaf, ndim in (("attn.to_q.kernel", 2), ("ff.fc2.kernel", 2), ("norm1.kernel", 2), ("ff.fc1.bias", 1)):
        last = sharding.logical_axes(f"last_block.{leaf}", ndim)
        assert sharding.logical_axes(f"blocks.{leaf}", ndim + 1) == ("layers", *last)
    assert any(sharding.logical_axes("blocks.attn.to_q.kernel", 3)[1:])  # a rule matched: the kernel is split


def test_weight_decay_skips_stacked_biases():
    """A stacked bias [layers, d] is 2-d but still a bias: no decay, as for the last block's [d] bias."""
    tx = make_optimizer(OptimizerConfig(lr=0.1, weight_decay=0.5, warmup_steps=0, grad_clip=None), None)
    params = {
        "blocks": {"fc": {"bias": jnp.ones((3, 4)), "kernel": jnp.ones((3, 4, 4))}},
        "last_block": {"fc": {"bias": jnp.ones((4,)), "kernel": jnp.ones((4, 4))}},
    }
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    for block in ("blocks", "last_block"):
        assert np.all(new[block]["fc"]["bias"] == 1.0)
        assert np.all(new[block]["fc"]["kernel"] < 1.0)
