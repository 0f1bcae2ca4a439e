"""CLIP preference scorer (PickScore / HPS style) in Flax NNX: a differentiable reward for reward backprop.

score = exp(logit_scale) * cos(visual_projection(vision(frames)), text_projection(text(ids))). Module attribute names
are the canonical names of contentv_common.reward.clip_table.CLIP_TABLE, so a transformers CLIPModel folder loads by
name. Frames enter as `[B, H, W, 3]` floats in [0, 1]; resize, centre crop and normalisation are fixed linear maps
(contentv_common.reward.clip_preprocess), so gradients reach the pixels. Prompts are tokenised by the scorer's own
tokenizer outside any compiled step; the tower takes the ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from contentv_common.reward.clip_preprocess import clip_resize_crop_matrices, normalisation
from contentv_common.reward.clip_table import (
    CLIP_TABLE,
    ClipConfig,
    ClipTowerConfig,
    load_clip_tokenizer,
    open_clip_source,
    tokenize,
)
from contentv_common.reward.models import RewardBase
from contentv_common.text.encoder_table import ClipTextConfig
from contentv_jax.loading import fill_from_source
from contentv_jax.transformer import Dtypes


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)


class Attention(nnx.Module):
    def __init__(self, cfg: ClipTowerConfig, causal: bool, rngs: nnx.Rngs, dt: Dtypes):
        d = cfg.hidden_size
        self.heads, self.causal = cfg.num_attention_heads, causal
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (dt.linear(d, d, rngs) for _ in range(4))

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = (
            rearrange(p(x), "b n (h d) -> b n h d", h=self.heads) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(rearrange(out, "b n h d -> b n (h d)"))


class MLP(nnx.Module):
    def __init__(self, cfg: ClipTowerConfig, rngs: nnx.Rngs, dt: Dtypes):
        self.act = cfg.hidden_act
        self.fc1 = dt.linear(cfg.hidden_size, cfg.intermediate_size, rngs)
        self.fc2 = dt.linear(cfg.intermediate_size, cfg.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_activation(self.act, self.fc1(x)))


def _layer_norm(cfg: ClipTowerConfig, rngs: nnx.Rngs, dt: Dtypes) -> nnx.LayerNorm:
    """Statistics in float32; the output in the promoted dtype of input and parameters."""
    return nnx.LayerNorm(
        cfg.hidden_size,
        epsilon=cfg.layer_norm_eps,
        use_fast_variance=False,
        param_dtype=dt.param_dtype,
        rngs=rngs,
    )


class Layer(nnx.Module):
    """Pre-norm transformer layer (CLIPEncoderLayer)."""

    def __init__(self, cfg: ClipTowerConfig, causal: bool, rngs: nnx.Rngs, dt: Dtypes):
        self.norm1, self.norm2 = _layer_norm(cfg, rngs, dt), _layer_norm(cfg, rngs, dt)
        self.attn = Attention(cfg, causal, rngs, dt)
        self.mlp = MLP(cfg, rngs, dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextTower(nnx.Module):
    """Causal text transformer (CLIPTextTransformer); the pooled state is the first end-of-text token (right padding
    is harmless). Also SD3.5's CLIP-L and CLIP-G (contentv_jax.text_encoders), which read its hidden states."""

    def __init__(self, cfg: ClipConfig | ClipTextConfig, rngs: nnx.Rngs, dt: Dtypes):
        t = cfg.text
        self.eos_token_id = cfg.eos_token_id
        embed = partial(nnx.Embed, dtype=dt.dtype, param_dtype=dt.param_dtype, rngs=rngs)
        self.token_embedding = embed(cfg.vocab_size, t.hidden_size)
        self.position_embedding = embed(cfg.max_position_embeddings, t.hidden_size)
        self.layers = nnx.List([Layer(t, True, rngs, dt) for _ in range(t.num_hidden_layers)])
        self.final_norm = _layer_norm(t, rngs, dt)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.encode(input_ids)[1]

    def encode(self, input_ids: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        """(hidden states: the embeddings then every layer's output, before the final norm, as transformers'
        `output_hidden_states`; the final-normed state at the end-of-text token [B, D])."""
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.position_embedding.embedding[...][:length][None]
        hidden = [x]
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        x = self.final_norm(x)
        if self.eos_token_id == 2:  # legacy configs: end-of-text is the largest id (transformers' rule)
            pos = jnp.argmax(input_ids, axis=-1)
        else:
            pos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
        return hidden, jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]


class VisionTower(nnx.Module):
    """ViT: patch embedding as a matmul over (channel, row, col)-flattened patches, class token, pre/post norms."""

    def __init__(self, cfg: ClipConfig, rngs: nnx.Rngs, dt: Dtypes):
        v, p = cfg.vision, cfg.patch_size
        self.patch_size, self.dtype = p, dt.dtype
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (v.hidden_size,)) * v.hidden_size**-0.5)
        self.patch_embedding = nnx.Param(jax.random.normal(rngs.params(), (v.hidden_size, 3, p, p)) * 0.02)
        self.position_embedding = nnx.Embed(cfg.num_patches + 1, v.hidden_size, dtype=dt.dtype, rngs=rngs)
        self.pre_norm = _layer_norm(v, rngs, dt)
        self.layers = nnx.List([Layer(v, False, rngs, dt) for _ in range(v.num_hidden_layers)])
        self.post_norm = _layer_norm(v, rngs, dt)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        p = self.patch_size
        patches = rearrange(pixel_values, "b (h p) (w q) c -> b (h w) (c p q)", p=p, q=p).astype(self.dtype)
        kernel = self.patch_embedding[...].reshape(self.patch_embedding.shape[0], -1).astype(self.dtype)
        x = patches @ kernel.T
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding.embedding[...][None]
        x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x)
        return self.post_norm(x[:, 0])


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ClipScorer(nnx.Module):
    """CLIP vision + text towers, projections and logit scale; `__call__(frames, input_ids) -> scores [B]`."""

    def __init__(self, cfg: ClipConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32):
        self.cfg = cfg
        dt = Dtypes(dtype, jnp.float32)  # float32 weights, `dtype` compute
        self.text = TextTower(cfg, rngs, dt)
        self.vision = VisionTower(cfg, rngs, dt)
        self.text_projection = nnx.Linear(cfg.text.hidden_size, cfg.projection_dim, use_bias=False, rngs=rngs)
        self.visual_projection = nnx.Linear(cfg.vision.hidden_size, cfg.projection_dim, use_bias=False, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(2.6592, jnp.float32))

    def preprocess(self, frames: jax.Array) -> jax.Array:
        """[B, H, W, 3] in [0, 1] -> CLIP pixel values [B, S, S, 3] (resize, centre crop, normalise)."""
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"CLIP scorer frames must be [B, H, W, 3], got shape {frames.shape}")
        r_h, r_w = clip_resize_crop_matrices(frames.shape[1], frames.shape[2], self.cfg.image_size)
        scale, offset = normalisation(self.cfg.image_mean, self.cfg.image_std)
        x = jnp.einsum("ih,bhwc,jw->bijc", r_h, frames.astype(jnp.float32), r_w)
        return x * scale + offset

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """Projected (unnormalised) image embeddings, as CLIPModel.get_image_features."""
        return self.visual_projection(self.vision(pixel_values))

    def text_features(self, input_ids: jax.Array) -> jax.Array:
        """Projected (unnormalised) text embeddings, as CLIPModel.get_text_features."""
        return self.text_projection(self.text(input_ids))

    def __call__(self, frames: jax.Array, input_ids: jax.Array) -> jax.Array:
        image = _unit(self.image_features(self.preprocess(frames)).astype(jnp.float32))
        text = _unit(self.text_features(input_ids).astype(jnp.float32))
        return jnp.exp(self.logit_scale[...]) * jnp.sum(image * text, axis=-1)


def _path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def load_clip_scorer(folder: str | Path, dtype: jnp.dtype = jnp.float32) -> ClipScorer:
    """A ClipScorer from a local transformers CLIPModel folder; every key and shape is checked first."""
    source = open_clip_source(folder)
    abstract = nnx.eval_shape(lambda: ClipScorer(source.config, rngs=nnx.Rngs(0), dtype=dtype))
    return fill_from_source(abstract, source, CLIP_TABLE)


class ClipReward(nnx.Module, RewardBase):
    """The scorer as a `Reward`: prompts -> ids with the scorer's tokenizer, `score_tokens` is differentiable.

    An nnx.Module, so jitted training steps take the scorer's weights as arguments (the tokenizer stays static)."""

    def __init__(self, scorer: ClipScorer, tokenizer):
        self.scorer, self.tokenizer = scorer, tokenizer

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        return tokenize(self.tokenizer, prompts, self.scorer.cfg.max_position_embeddings)

    def score_tokens(self, frames: jax.Array, tokens: jax.Array) -> jax.Array:
        return self.scorer(frames, jnp.asarray(tokens))


def load_clip_reward(folder: str | Path) -> ClipReward:
    """Scorer weights and tokenizer from one CLIPModel folder (e.g. a local PickScore download)."""
    return ClipReward(load_clip_scorer(folder), load_clip_tokenizer(folder))


@nnx.jit
def _image_embeddings(scorer: ClipScorer, frames: jax.Array) -> jax.Array:
    return _unit(scorer.image_features(scorer.preprocess(frames.astype(jnp.float32) / 255.0)).astype(jnp.float32))


@nnx.jit
def _text_embeddings(scorer: ClipScorer, input_ids: jax.Array) -> jax.Array:
    return _unit(scorer.text_features(input_ids).astype(jnp.float32))


class ClipEmbeddings:
    """The scorer's unit image and text embeddings, numpy in and out (contentv_common.eval.clip's protocol)."""

    def __init__(self, folder: str | Path):
        self.scorer, self.tokenizer = load_clip_scorer(folder), load_clip_tokenizer(folder)

    def image_embeddings(self, frames: np.ndarray) -> np.ndarray:
        return np.asarray(_image_embeddings(self.scorer, jnp.asarray(frames)))

    def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        ids = tokenize(self.tokenizer, list(prompts), self.scorer.cfg.max_position_embeddings)
        return np.asarray(_text_embeddings(self.scorer, jnp.asarray(ids)))
