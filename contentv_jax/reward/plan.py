"""Ahead-of-time memory plan of a reward recipe's update step (as contentv_jax.memory_plan does for training): the
program `contentv_jax.reward.run` runs each step (ReFL: the whole rollout, the last `refl.grad_steps` steps with
gradient, first-frame VAE decode, reward, SFT and anchor terms; GRPO: the `grpo.train_steps` trained sampler steps,
KL and SFT terms; then the guarded AdamW update, EMA and EMA anchor, model and optimizer donated) is lowered with
abstract modules and batches carrying the recipe's shardings, and compiled for the target; nothing is allocated.

The reward model and VAE are the run's own: the Wan2.1 VAE (decoder) and, for `reward.kind: clip`, the CLIP towers of
`reward.path` when that folder exists, else the ViT-H/14 sizes of PickScore_v1 (the usual preference model).
"""

from __future__ import annotations

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
from contentv_common.reward.run import differentiable_builtin, optimizer_updates, uses_ema_anchor
from contentv_common.sampling import latent_shape, uses_guidance
from contentv_common.vae.config import VAEConfig
from contentv_jax import sharding
from contentv_jax.loading import model_shardings
from contentv_jax.memory_plan import argument_bytes, compile_plan
from contentv_jax.optim import model_optimizer
from contentv_jax.reward import train as jr
from contentv_jax.reward.clip import ClipReward, ClipScorer
from contentv_jax.reward.mesh import abstract_model, batch_sharding
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


def _dotted(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _place(module: nnx.Module, where) -> nnx.Module:
    """Give an abstract module's leaves shardings, in place: `where(dotted path)` -> Sharding."""
    state = nnx.state(module)
    placed = jax.tree_util.tree_map_with_path(
        lambda p, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where(_dotted(p))), nnx.to_pure_dict(state)
    )
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(module, state)
    return module


def _replicated(module: nnx.Module, mesh: Mesh) -> nnx.Module:
    whole = NamedSharding(mesh, PartitionSpec())
    return _place(module, lambda _path: whole)


def _abstract_model(recipe: RewardRecipe, mesh: Mesh) -> nnx.Module:
    model = abstract_model(recipe, mesh)
    where = model_shardings(model, mesh)
    return _place(model, lambda path: where[path])


def _abstract_optimizer(recipe: RewardRecipe, model: nnx.Module, mesh: Mesh) -> nnx.Optimizer:
    optimizer = nnx.eval_shape(lambda m: model_optimizer(m, recipe.optimizer, optimizer_updates(recipe)), model)
    params = jax.tree.map(lambda a: a.sharding, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    pure = nnx.to_pure_dict(nnx.state(optimizer))
    flat = jax.tree_util.tree_flatten_with_path(sharding.like_params_shardings(pure, params, mesh))[0]
    where = {_dotted(p): s for p, s in flat}
    return _place(optimizer, lambda path: where[path])


def _pure(x: Any) -> Any:
    return nnx.to_pure_dict(nnx.state(x)) if isinstance(x, nnx.Module) else x


def _clip_config(recipe: RewardRecipe) -> ClipConfig:
    path = recipe.reward.path
    return read_clip_config(path) if path and (Path(path) / "config.json").exists() else PICKSCORE_CLIP


def _reward(recipe: RewardRecipe, mesh: Mesh) -> tuple[nnx.Module, int]:
    """(the differentiable reward as the run carries it, its token count per row)."""
    if recipe.reward.kind != "clip":
        return jr.carried(differentiable_builtin(recipe.reward)), 0
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
        shapes["old_log_probs"] = ((r.steps, rows), jnp.float32)
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
        k = min(recipe.grpo.train_steps or r.steps, r.steps)
        total = k * step * (TRAIN_MULTIPLIER + (recipe.grpo.kl_weight > 0))
    if recipe.data is not None:
        b = max(recipe.data.buckets, key=lambda b: image_tokens(b, cfg.patch_size))
        sft = transformer_flops(cfg, image_tokens(b, cfg.patch_size), text_tokens, r.batch_size)
        total += sft.step("train")
    return total


def plan_reward(
    recipe: RewardRecipe, mesh: Mesh, hbm_bytes: int, text_tokens: int = 333, vae: VAEConfig = WAN21
) -> StepPlan:
    """Compile the reward update step of `recipe` on `mesh` and read its per-device bytes (kind "reward"); `vae`
    is Wan2.1's (tests pass a narrow one)."""
    model = _abstract_model(recipe, mesh)
    optimizer = _abstract_optimizer(recipe, model, mesh)
    refl = recipe.method == "refl"
    anchored = recipe.refl.anchor != "none" if refl else recipe.grpo.kl_weight > 0
    ref_model = _abstract_model(recipe, mesh) if anchored else None
    ema = _abstract_model(recipe, mesh) if recipe.optimizer.ema_decay is not None else None
    reward, reward_tokens = _reward(recipe, mesh) if refl else (None, 0)
    decoder = jr.VaeFirstFrameDecoder(_replicated(nnx.eval_shape(lambda: WanVAE(vae, rngs=nnx.Rngs(0))), mesh))
    batch = _batch(recipe, mesh, text_tokens, reward_tokens)
    limits = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    decay = recipe.optimizer.ema_decay
    if refl:
        args = (optimizer, model, ref_model, decoder, reward, batch, limits, ema)

        def lower():
            return jr.refl_update_in_place.lower(*args, recipe.rollout, recipe.refl, decay)
    else:
        args = (optimizer, model, ref_model, batch, limits, ema)

        def lower():
            return jr.grpo_update_in_place.lower(*args, recipe.rollout, recipe.grpo, decay)

    r = recipe.rollout
    tokens = image_tokens(BucketConfig(r.width, r.height, r.frames, 1), recipe.model_config.patch_size)
    arg_bytes = argument_bytes(*(_pure(a) for a in args if a is not None))
    bucket = f"{r.width}x{r.height}x{r.frames}"
    rows = rollout_rows(recipe)
    return compile_plan("reward", bucket, tokens + text_tokens, rows, reward_flops(recipe, text_tokens), lower,
                        arg_bytes, hbm_bytes)  # fmt: skip


def state_bytes(recipe: RewardRecipe, mesh: Mesh) -> dict[str, int]:
    """Per-device bytes of what a reward run keeps between steps: weights, optimizer, anchor, EMA (for the report)."""
    model = _abstract_model(recipe, mesh)
    out = {"params": argument_bytes(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
    out["optimizer"] = argument_bytes(_pure(_abstract_optimizer(recipe, model, mesh)))
    refl = recipe.method == "refl"
    if (recipe.refl.anchor != "none") if refl else recipe.grpo.kl_weight > 0:
        out["ema_anchor" if uses_ema_anchor(recipe) else "anchor"] = out["params"]
    if recipe.optimizer.ema_decay is not None:
        out["ema"] = out["params"]
    return out
