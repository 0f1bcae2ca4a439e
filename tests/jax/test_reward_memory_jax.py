"""Reward memory does not grow with the trained sampler steps: GRPO's compiled loss (each step's gradient taken as
soon as its forward is done and summed) keeps its temporaries about flat from 2 to 4 trained steps (with one
backward over all steps, unrematerialised, it grew 1.84x for the 1-layer tiny model), and the whole update step of
ReFL / GRPO as the planner compiles it, in bf16 with scanned blocks, does not grow from 1 to 8 trained steps."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from contentv_common.config.model import named_model_config
from contentv_common.config.reward import GrpoConfig, RolloutConfig, load_reward_recipe

C, F, H, W = 16, 2, 8, 8
BATCH, STEPS = 2, 4
TINY_3_LAYERS = {**dataclasses.asdict(named_model_config("tiny")), "num_layers": 3}  # two of them scanned


def _temp_bytes(train_steps: int) -> int:
    from contentv_jax.reward import train as jr
    from contentv_jax.transformer import Transformer

    cfg = dataclasses.replace(named_model_config("tiny"), num_layers=1)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    shapes = {"noise": (BATCH, C, F, H, W), "text": (BATCH, 5, cfg.joint_attention_dim),
              "pooled": (BATCH, cfg.pooled_projection_dim), "states": (STEPS + 1, BATCH, C, F, H, W),
              "old_log_probs": (train_steps, BATCH), "advantages": (BATCH,)}  # fmt: skip
    batch = {k: jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for k, s in shapes.items()}
    rollout = RolloutConfig(prompts=("p",), steps=STEPS, shift=3.0, guidance=1.0)
    grpo = GrpoConfig(group_size=BATCH, noise_level=0.7, kl_weight=0.0, sft_weight=0.0, train_steps=train_steps)

    def grads(state, batch):
        return jr.grpo_loss(nnx.merge(graphdef, state), None, batch, rollout, grpo)[1]

    return jax.jit(grads).lower(state, batch).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_grpo_temp_memory_flat_in_trained_steps():
    two, four = _temp_bytes(2), _temp_bytes(4)
    assert two > 0 and four < 1.3 * two, (two, four)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["refl", "grpo"])
def test_reward_update_temp_memory_does_not_grow_with_trained_steps(method):
    """The planner's program (the run's whole update step: rollout or trained steps, decode, reward, SFT, anchor,
    AdamW; contentv_jax.reward.plan) compiled with 1 and 8 of 8 trained steps: the temporaries do not grow."""
    from contentv_common.vae.config import tiny_vae_config
    from contentv_jax.reward.plan import plan_reward
    from contentv_jax.sharding import make_mesh

    key = "refl.grad_steps" if method == "refl" else "grpo.train_steps"

    def temp(k: int) -> int:
        overrides = {key: k, "rollout.steps": 8, "model": TINY_3_LAYERS, "compute_dtype": "bfloat16", "remat": "full"}
        recipe = load_reward_recipe(f"configs/recipes/reward_{method}_tiny.yaml", overrides)
        mesh = make_mesh(recipe.mesh, jax.devices()[:1])
        return plan_reward(recipe, mesh, 2**40, text_tokens=7, vae=tiny_vae_config()).temp_bytes

    one, eight = temp(1), temp(8)
    assert one > 0 and eight <= 1.05 * one, (one, eight)
