"""SD3.5's three text encoders in Flax NNX (CLIP-L, OpenCLIP bigG, T5 v1.1 XXL), combined as diffusers'
`StableDiffusion3Pipeline.encode_prompt` combines them; the torch twin runs transformers' (contentv_torch_npu).

CLIP: the reward scorer's causal text tower (contentv_jax.reward.clip.TextTower) plus `text_projection`: hidden states
per layer, pooled output at the end-of-text token. T5 v1.1 encoder: RMS layer norm without bias or mean (statistics in
float32), attention without logit scaling whose bias comes from bucketed relative positions (the first layer's table,
shared by every layer; buckets from contentv_common), gated-GELU (tanh) feed-forward. Tokenization and the token
layout are contentv_common.text.sd3_prompt's, the same for both backends. Module attribute names are the canonical names
of contentv_common.text.encoder_table, so a pipeline folder loads by name, streamed, each device reading its slices.

`encode` runs one jitted program per padded batch size (powers of two up to `batch_size`); on a mesh the parameters
are sharded by contentv_jax.sharding.TEXT_PARAM_AXES (T5-XXL over `fsdp` and `tensor`) and prompts over data x fsdp
(in chunks of at least data x fsdp). Each process of a cache build encodes its share on a mesh of its own devices
(contentv_jax.encoders.local_mesh); the online train step on the training mesh.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from contentv_common.checkpoint.formats import TensorSource, memory_source
from contentv_common.checkpoint.param_table import ParamTable
from contentv_common.data.embedding_cache import folder_identity
from contentv_common.text.encoder_table import (
    CLIP_TEXT_TABLE,
    T5_TABLE,
    ClipTextConfig,
    T5EncoderConfig,
    t5_relative_buckets,
    write_text_encoder,
)
from contentv_common.text.sd3_prompt import (
    CLIP_FOLDERS,
    CLIP_HIDDEN_STATE,
    T5_FOLDERS,
    T5_MAX_SEQUENCE_LENGTH,
    PromptTokenizers,
    TextConfigs,
    load_tokenizers,
    open_text_sources,
    subfolders,
)
from contentv_common.tiny_models import tiny_text
from contentv_jax import sharding
from contentv_jax.loading import canonical_tensors, fill_from_source, model_shardings
from contentv_jax.multihost import to_host
from contentv_jax.reward.clip import TextTower
from contentv_jax.transformer import Dtypes


class ClipTextEncoder(nnx.Module):
    """`CLIPTextModelWithProjection`: ids [B, N] -> (hidden states per layer, projected pooled output [B, P])."""

    def __init__(self, cfg: ClipTextConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        dt = Dtypes(dtype, param_dtype)
        self.cfg = cfg
        self.text = TextTower(cfg, rngs, dt)
        self.text_projection = nnx.Linear(
            cfg.text.hidden_size, cfg.projection_dim, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, input_ids: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        hidden, pooled = self.text.encode(input_ids)
        return hidden, self.text_projection(pooled)


class T5LayerNorm(nnx.Module):
    """RMS norm without bias or mean subtraction; the statistics in float32 (T5LayerNorm)."""

    def __init__(self, dim: int, eps: float, dt: Dtypes):
        self.scale = nnx.Param(jnp.ones((dim,), dt.param_dtype))
        self.eps, self.dtype = eps, dt.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(self.dtype) * self.scale[...].astype(self.dtype)


class T5Attention(nnx.Module):
    def __init__(self, cfg: T5EncoderConfig, dt: Dtypes, rngs: nnx.Rngs):
        linear = partial(nnx.Linear, use_bias=False, dtype=dt.dtype, param_dtype=dt.param_dtype, rngs=rngs)
        self.heads = cfg.num_heads
        self.q, self.k, self.v = (linear(cfg.d_model, cfg.inner_dim) for _ in range(3))
        self.o = linear(cfg.inner_dim, cfg.d_model)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        q, k, v = (rearrange(p(x), "b n (h d) -> b n h d", h=self.heads) for p in (self.q, self.k, self.v))
        out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=1.0)  # T5 does not scale its logits
        return self.o(rearrange(out, "b n h d -> b n (h d)"))


class T5FeedForward(nnx.Module):
    """Gated-GELU (tanh approximation, transformers' gelu_new): wo(gelu(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5EncoderConfig, dt: Dtypes, rngs: nnx.Rngs):
        linear = partial(nnx.Linear, use_bias=False, dtype=dt.dtype, param_dtype=dt.param_dtype, rngs=rngs)
        self.wi_0, self.wi_1 = linear(cfg.d_model, cfg.d_ff), linear(cfg.d_model, cfg.d_ff)
        self.wo = linear(cfg.d_ff, cfg.d_model)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5Layer(nnx.Module):
    def __init__(self, cfg: T5EncoderConfig, dt: Dtypes, rngs: nnx.Rngs):
        self.attn_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dt)
        self.attn = T5Attention(cfg, dt, rngs)
        self.ff_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dt)
        self.ff = T5FeedForward(cfg, dt, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        x = x + self.attn(self.attn_norm(x), bias)
        return x + self.ff(self.ff_norm(x))


class T5Encoder(nnx.Module):
    """`T5EncoderModel`: ids [B, N] -> last hidden states [B, N, d_model]."""

    def __init__(self, cfg: T5EncoderConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype, param_dtype: jnp.dtype):
        dt = Dtypes(dtype, param_dtype)
        embed = partial(nnx.Embed, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg, self.dtype = cfg, dtype
        self.shared = embed(cfg.vocab_size, cfg.d_model)
        self.relative_attention_bias = embed(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.layers = nnx.List([T5Layer(cfg, dt, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, dt)

    def position_bias(self, length: int) -> jax.Array:
        """[1, heads, length, length]: the bias every layer adds to its attention logits."""
        buckets = t5_relative_buckets(
            length, self.cfg.relative_attention_num_buckets, self.cfg.relative_attention_max_distance
        )
        bias = self.relative_attention_bias.embedding[...][buckets].astype(self.dtype)  # [q, k, heads]
        return jnp.transpose(bias, (2, 0, 1))[None]

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        bias = self.position_bias(input_ids.shape[1])
        x = self.shared(input_ids)
        for layer in self.layers:
            x = layer(x, bias)
        return self.final_norm(x)


class SD3TextEncoders(nnx.Module):
    """CLIP-L + CLIP-G + T5 -> SD3.5's (prompt_embeds [B, N_clip + N_t5, d_t5], pooled [B, P_l + P_g]), float32."""

    def __init__(self, clip_l: ClipTextEncoder, clip_g: ClipTextEncoder, t5: T5Encoder):
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5

    def __call__(self, clip_l_ids: jax.Array, clip_g_ids: jax.Array, t5_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        hidden_l, pooled_l = self.clip_l(clip_l_ids)
        hidden_g, pooled_g = self.clip_g(clip_g_ids)
        t5 = self.t5(t5_ids).astype(jnp.float32)
        clip = jnp.concatenate([hidden_l[CLIP_HIDDEN_STATE], hidden_g[CLIP_HIDDEN_STATE]], axis=-1)
        clip = jnp.pad(clip.astype(jnp.float32), ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        pooled = jnp.concatenate([pooled_l, pooled_g], axis=-1).astype(jnp.float32)
        return jnp.concatenate([clip, t5], axis=1), pooled


@partial(jax.jit, static_argnames=("graphdef",))
def _encode(graphdef, state, clip_l: jax.Array, clip_g: jax.Array, t5: jax.Array) -> tuple[jax.Array, jax.Array]:
    return nnx.merge(graphdef, state)(clip_l, clip_g, t5)


def batch_rows(count: int, batch_size: int, divisor: int) -> int:
    """Rows of the program that encodes `count` prompts: the next power of two, at most `batch_size`, rounded up to
    a multiple of `divisor` (the mesh's data x fsdp), so few batch sizes ever compile."""
    rows = min(1 << max(count - 1, 0).bit_length(), batch_size)
    return -(-rows // divisor) * divisor


class TextEncoders:
    """The three encoders and their tokenizers; `encode(prompts)` gives SD3.5's (prompt_embeds, pooled) as numpy."""

    def __init__(
        self,
        model: SD3TextEncoders,
        tokenizers: PromptTokenizers,
        raw_configs: tuple[dict[str, Any], ...],
        identity: str,
        mesh: Mesh | None = None,
        batch_size: int = 8,
    ):
        clip_width = model.clip_l.cfg.text.hidden_size + model.clip_g.cfg.text.hidden_size
        if clip_width > model.t5.cfg.d_model:
            raise ValueError(f"CLIP widths sum to {clip_width}, wider than T5 d_model {model.t5.cfg.d_model}")
        self.model, self.tokenizers, self.raw_configs = model, tokenizers, raw_configs
        self.identity, self.mesh, self.batch_size = identity, mesh, batch_size
        self.max_sequence_length = tokenizers.max_sequence_length
        self.clip_length = tokenizers.clip_length
        self._graphdef, self._state = nnx.split(model)

    @property
    def text_dim(self) -> int:
        return self.model.t5.cfg.d_model

    @property
    def pooled_dim(self) -> int:
        return self.model.clip_l.cfg.projection_dim + self.model.clip_g.cfg.projection_dim

    @property
    def sequence_length(self) -> int:
        return self.tokenizers.sequence_length

    def _place(self, ids: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(ids)
        spec = sharding.activation_spec(("batch", None), ids.shape, self.mesh)
        return jax.device_put(ids, NamedSharding(self.mesh, spec))

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(prompt_embeds [B, clip_length + max_sequence_length, text_dim], pooled [B, pooled_dim]), float32."""
        ids = self.tokenizers.tokenize(prompts)
        divisor = 1 if self.mesh is None else int(np.prod([self.mesh.shape[a] for a in sharding.BATCH]))
        step = -(-max(self.batch_size, divisor) // divisor) * divisor  # every device gets prompts
        embeds, pooled = [], []
        for start in range(0, len(ids[0]), step):
            chunk = [a[start : start + step] for a in ids]
            n = len(chunk[0])
            rows = batch_rows(n, step, divisor)
            padded = [self._place(np.pad(a, ((0, rows - n), (0, 0)))) for a in chunk]
            e, p = _encode(self._graphdef, self._state, *padded)
            embeds.append(np.asarray(to_host(e))[:n])
            pooled.append(np.asarray(to_host(p))[:n])
        return np.concatenate(embeds), np.concatenate(pooled)

    def save(self, folder: str | Path) -> Path:
        """Write the diffusers pipeline layout (text_encoder*/, tokenizer*/) that `load_text_encoders` reads."""
        folder = Path(folder)
        names = [m for m, _ in CLIP_FOLDERS] + [T5_FOLDERS[0]]
        modules = (self.model.clip_l, self.model.clip_g, self.model.t5)
        for name, raw, module, table in zip(names, self.raw_configs, modules, _TABLES, strict=True):
            tensors = ((table.from_canonical(k).diffusers, v) for k, v in canonical_tensors(module, table))
            write_text_encoder(folder / name, raw, tensors)
        self.tokenizers.save(folder)
        return folder


_TABLES: tuple[ParamTable, ParamTable, ParamTable] = (CLIP_TEXT_TABLE, CLIP_TEXT_TABLE, T5_TABLE)


def abstract_encoder(cfg: ClipTextConfig | T5EncoderConfig, dtype: jnp.dtype, param_dtype: jnp.dtype) -> nnx.Module:
    cls = T5Encoder if isinstance(cfg, T5EncoderConfig) else ClipTextEncoder
    return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype))


def _fill(
    sources: tuple[TensorSource, ...], dtype: jnp.dtype, param_dtype: jnp.dtype, mesh: Mesh | None
) -> SD3TextEncoders:
    """The three encoders materialised from their sources, each parameter on its shards as it is read."""
    modules = []
    for source, table in zip(sources, _TABLES, strict=True):
        abstract = abstract_encoder(source.config, dtype, param_dtype)
        where = model_shardings(abstract, mesh, sharding.TEXT_PARAM_AXES) if mesh is not None else None
        modules.append(fill_from_source(abstract, source, table, where))
    return SD3TextEncoders(*modules)


def abstract_text_encoders(configs: TextConfigs, dtype: jnp.dtype, mesh: Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of ShapeDtypeStructs) of the three encoders of `configs` in `dtype`, each parameter with the
    sharding `load_text_encoders(..., mesh=mesh)` gives it (TEXT_PARAM_AXES)."""
    model = SD3TextEncoders(*(abstract_encoder(c, dtype, dtype) for c in configs))
    where = model_shardings(model, mesh, sharding.TEXT_PARAM_AXES)
    graphdef, state = nnx.split(model)
    flat = [
        (path, var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=where[".".join(map(str, path))])))
        for path, var in nnx.to_flat_state(state)
    ]
    return graphdef, nnx.from_flat_state(flat)


def planned_encode(configs: TextConfigs, dtype: jnp.dtype, mesh: Mesh, batch: int, tokens: tuple[int, int]):
    """The jitted encode lowered for `batch` prompts of (CLIP, T5) `tokens` with abstract parameters of `configs` in
    `dtype`, sharded as `load_text_encoders(..., mesh=mesh)` places them (for contentv_jax.memory_plan)."""
    graphdef, state = abstract_text_encoders(configs, dtype, mesh)
    shapes = [(batch, n) for n in (tokens[0], tokens[0], tokens[1])]
    specs = [sharding.activation_spec(("batch", None), shape, mesh) for shape in shapes]
    ids = [
        jax.ShapeDtypeStruct(shape, jnp.int32, sharding=NamedSharding(mesh, spec))
        for shape, spec in zip(shapes, specs, strict=True)
    ]
    return _encode.lower(graphdef, state, *ids), (state, *ids)


def load_text_encoders(
    folder: str | Path,
    dtype: jnp.dtype | None = None,
    mesh: Mesh | None = None,
    *,
    compute_dtype: jnp.dtype | None = None,
    max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH,
    batch_size: int = 8,
) -> TextEncoders:
    """CLIP-L, CLIP-G and T5 with their tokenizers from a local SD3.5/ContentV pipeline folder (no downloads).

    `dtype` is the parameter dtype (default float32; fp16/bf16 checkpoints are cast as they are read), `compute_dtype`
    defaults to it. Every folder, tokenizer, width, key and shape is checked before any weight is read; with `mesh`,
    each parameter goes straight onto its shards (each device reads only its slices), else onto the first device.
    """
    folder = Path(folder)
    sources = open_text_sources(folder)
    tokenizers = load_tokenizers(folder, max_sequence_length)
    param_dtype = jnp.dtype(dtype or jnp.float32)
    model = _fill(sources, jnp.dtype(compute_dtype or param_dtype), param_dtype, mesh)
    raw = tuple(json.loads((s.path / "config.json").read_text()) for s in sources)
    compute = jnp.dtype(compute_dtype or param_dtype)
    extra = f"jax;dtype={param_dtype.name};compute={compute.name};t5_length={max_sequence_length}"
    identity = folder_identity(subfolders(folder).values(), extra=extra)
    return TextEncoders(model, tokenizers, raw, identity, mesh, batch_size)


def tiny_text_encoders(
    seed: int = 0, max_sequence_length: int = T5_MAX_SEQUENCE_LENGTH, mesh: Mesh | None = None
) -> TextEncoders:
    """The random tiny CLIP-L/CLIP-G/T5 of contentv_common.tiny_models (the torch twin's tiny encoders load the very
    same weights, so both give the same embeddings); float32."""
    tiny = tiny_text(seed, max_sequence_length=max_sequence_length)
    labels = [Path(f"<tiny {name} seed {seed}>") for name in (*(m for m, _ in CLIP_FOLDERS), T5_FOLDERS[0])]
    sources = tuple(
        memory_source(label, cfg, weights, table)
        for label, cfg, weights, table in zip(labels, tiny.configs, tiny.weights, _TABLES, strict=True)
    )
    model = _fill(sources, jnp.dtype(jnp.float32), jnp.dtype(jnp.float32), mesh)
    return TextEncoders(model, tiny.tokenizers, tiny.raw_configs, tiny.identity, mesh)
