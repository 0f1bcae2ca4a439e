"""Ahead-of-time memory plan of a reward recipe's update step (as contentv_jax.memory_plan does for training): the
program `contentv_jax.reward.run` runs each step (ReFL: the whole rollout, the last `refl.grad_steps` steps with
gradient, first-frame VAE decode, reward, SFT and anchor terms; GRPO: the `grpo.train_steps` trained sampler steps,
KL and SFT terms; then the guarded AdamW update, EMA and EMA anchor: contentv_jax.reward.train.RewardTuner on the
trainer's jitted step, state donated) is lowered with an abstract state and batch carrying the recipe's shardings, and
compiled for the target; nothing is allocated.

The reward model and VAE are the run's own: the Wan2.1 VAE (decoder) and, for `reward.kind: clip`, the CLIP towers of
`reward.path` when that folder exists, else the ViT-H/14 sizes of PickScore_v1 (the usual preference model).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from contentv_common.config.recipe import BucketConfig, image_tokens
from contentv_common.config.reward import RewardRecipe, rollout_rows
from contentv_common.model.flops import TRAIN_MULTIPLIER, transformer_flops
from contentv_common.plan.report import StepPlan
from contentv_common.reward.clip_table import ClipConfig, ClipTowerConfig, read_clip_config
from contentv_common.reward.run import differentiable_builtin
from contentv_common.sampling import latent_shape, uses_guidance
from contentv_common.vae.config import VAEConfig
from contentv_jax.memory_plan import argument_bytes, compile_plan
from contentv_jax.reward import train as jr
from contentv_jax.reward.clip import ClipReward, ClipScorer
from contentv_jax.reward.mesh import batch_sharding
from contentv_jax.vae import WanVAE

WAN21 = VAEConfig()

# PickScore_v1 (laion CLIP-ViT-H-14): the preference model a `reward.kind: clip` recipe points at
PICKSCORE_CLIP = ClipConfig(
    text=ClipTowerConfig(1024, 4096, 24, 16, "gelu", 1e-5),
    vision=ClipTowerConfig(1280, 5120, 32, 16, "gelu", 1e-5),
    vocab_size=49408,
    max_position_embeddings=77,
    eos_token_id=49407,
    image_size=224,
    patch_size=14,
    projection_dim=1024,
)


def _replicated(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Give an abstract module's leaves the replicated sharding, in place."""
    whole = NamedSharding(mesh, PartitionSpec())
    state = nnx.state(module)
    placed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=whole), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(module, state)
    return module


def _clip_config(recipe: RewardRecipe) -> ClipConfig:
    path = recipe.reward.path
    return read_clip_config(path) if path and (Path(path) / "config.json").exists() else PICKSCORE_CLIP


def _reward(recipe: RewardRecipe, mesh: Mesh) -> tuple[Any, int]:
    """(the differentiable reward as the run carries it, its token count per row)."""
    if recipe.reward.kind != "clip":
        return differentiable_builtin(recipe.reward), 0
    cfg = _clip_config(recipe)
    scorer = nnx.eval_shape(lambda: ClipScorer(cfg, rngs=nnx.Rngs(0)))
    return ClipReward(_replicated(scorer, mesh), None), cfg.max_position_embeddings


def _batch(recipe: RewardRecipe, mesh: Mesh, text_tokens: int, reward_tokens: int) -> dict[str, Any]:
    """The abstract batch of one step: rollout inputs (+ GRPO's states, log-probs, advantages), CLIP tokens, SFT."""
    cfg, r = recipe.model_config, recipe.rollout
    rows = rollout_rows(recipe)
    latent = latent_shape(cfg.in_channels, r.frames, r.height, r.width, rows)
    shapes: dict[str, tuple[tuple[int, ...], Any]] = {
        "noise": (latent, jnp.float32),
        "text": ((rows, text_tokens, cfg.joint_attention_dim), jnp.float32),
        "pooled": ((rows, cfg.pooled_projection_dim), jnp.float32),
    }
    if uses_guidance(r.guidance):
        shapes["neg_text"], shapes["neg_pooled"] = shapes["text"], shapes["pooled"]
    if recipe.method == "refl":
        shapes["tokens"] = ((rows, reward_tokens), jnp.int32)
    else:
        shapes["states"] = ((r.steps + 1, *latent), jnp.float32)
        shapes["old_log_probs"] = ((recipe.grpo.explored_steps(r.steps), rows), jnp.float32)
        shapes["advantages"] = ((rows,), jnp.float32)
    if recipe.data is not None:
        b = max(recipe.data.buckets, key=lambda b: image_tokens(b, cfg.patch_size))
        x0 = latent_shape(cfg.in_channels, b.frames, b.height, b.width, r.batch_size)
        for name, shape in (("sft_x0", x0), ("sft_noise", x0), ("sft_sigmas", (r.batch_size,)),
                            ("sft_weights", (r.batch_size,)), ("sft_pooled", (r.batch_size, cfg.pooled_projection_dim)),
                            ("sft_text", (r.batch_size, text_tokens, cfg.joint_attention_dim))):  # fmt: skip
            shapes[name] = (shape, jnp.float32)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=batch_sharding(k, s, mesh)) for k, (s, d) in shapes.items()}


def reward_flops(recipe: RewardRecipe, text_tokens: int) -> float:
    """Model FLOPs of one update (transformer only, recomputation not counted): ReFL's sampler forwards (the cond /
    uncond pair when guided) with the last K trained (3x), the anchor's forwards on those K, the SFT step; GRPO's
    trained steps (3x) and the reference policy's forwards on them, the SFT step."""
    cfg, r = recipe.model_config, recipe.rollout
    tokens = image_tokens(BucketConfig(r.width, r.height, r.frames, 1), cfg.patch_size)
    pair = 2 if uses_guidance(r.guidance) else 1
    step = transformer_flops(cfg, tokens, text_tokens, pair * rollout_rows(recipe)).forward
    if recipe.method == "refl":
        k, anchored = recipe.refl.grad_steps, recipe.refl.anchor != "none"
        total = (r.steps - k) * step + k * step * (TRAIN_MULTIPLIER + anchored)
    else:
        k = recipe.grpo.explored_steps(r.steps)
        total = k * step * (TRAIN_MULTIPLIER + (recipe.grpo.kl_weight > 0))
    if recipe.data is not None:
        b = max(recipe.data.buckets, key=lambda b: image_tokens(b, cfg.patch_size))
        sft = transformer_flops(cfg, image_tokens(b, cfg.patch_size), text_tokens, r.batch_size)
        total += sft.step("train")
    return total


def plan_reward(
    recipe: RewardRecipe,
    mesh: Mesh,
    hbm_bytes: int,
    text_tokens: int = 333,
    vae: VAEConfig = WAN21,
    known: Mapping[str, StepPlan] | None = None,
) -> StepPlan:
    """Compile the reward update step of `recipe` on `mesh` and read its per-device bytes (kind "reward"), unless
    its program is in `known` (compile_plan); `vae` is Wan2.1's (tests pass a narrow one)."""
    refl = recipe.method == "refl"
    reward, reward_tokens = _reward(recipe, mesh) if refl else (None, 0)
    decoder = jr.VaeFirstFrameDecoder(_replicated(nnx.eval_shape(lambda: WanVAE(vae, rngs=nnx.Rngs(0))), mesh))
    tuner = jr.RewardTuner(recipe, mesh, decoder, reward)
    state = tuner.abstract_state()
    step, inputs = tuner.compiled(state, _batch(recipe, mesh, text_tokens, reward_tokens))
    r = recipe.rollout
    tokens = image_tokens(BucketConfig(r.width, r.height, r.frames, 1), recipe.model_config.patch_size)
    arg_bytes = argument_bytes(state, inputs)
    bucket = f"{r.width}x{r.height}x{r.frames}"
    rows = rollout_rows(recipe)
    lower, flops = lambda: step.lower(state, inputs), reward_flops(recipe, text_tokens)
    return compile_plan("reward", bucket, tokens + text_tokens, rows, flops, lower, arg_bytes, hbm_bytes, known)


def state_bytes(recipe: RewardRecipe, mesh: Mesh) -> dict[str, int]:
    """Per-device bytes of what a reward run keeps between steps: weights, optimizer, anchor, EMA (for the report)."""
    tuner = jr.RewardTuner(recipe, mesh, None)
    state = tuner.abstract_state()
    out = {"params": argument_bytes(state["params"]), "optimizer": argument_bytes(state["opt_state"])}
    if "anchor" in state:
        out["ema_anchor" if tuner.ema_anchor else "anchor"] = argument_bytes(state["anchor"])
    if "ema" in state:
        out["ema"] = argument_bytes(state["ema"])
    return out
