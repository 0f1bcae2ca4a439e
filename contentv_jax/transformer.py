"""The ContentV / SD3.5 MMDiT in Flax NNX (mirrors contentv_torch_npu/transformer.py module for module).

Module attribute names are the canonical parameter names of contentv_common.checkpoint.param_table, so weights map by
name. Layout: input and output `[B, C, F, H, W]`; tokens are ordered (frame, row, col); attention runs in
`[B, N, heads, d]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from contentv_common.config.model import ModelConfig
from contentv_common.model.patches import unpatchify
from contentv_common.model.pos_embed import crop_sd3_table, sd3_table, sincos_3d_table
from contentv_jax.ops import DEFAULT_ATTENTION, Attention, layer_norm, rms_norm

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.dots_saveable,
}


# Places an activation on the device mesh by logical axis names ("batch", "tokens"); identity by default.
# The trainer passes contentv_jax.sharding.activation_constraint(mesh), keeping the model free of mesh code.
Constrain = Callable[[jax.Array, tuple[str | None, ...]], jax.Array]


def layer_axes(path: tuple) -> int:
    """1 for a parameter of the stacked blocks (leading layer axis), else 0; `path` is a jax key path from the root
    of the model's parameter tree."""
    return int(bool(path) and getattr(path[0], "key", path[0]) == "blocks")


def no_constraint(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    return x


class Buffer(nnx.Variable):
    """A fixed, non-trainable array stored with the weights (SD3's 2D position table)."""


class Dtypes:
    """Compute dtype and parameter dtype, passed to every layer."""

    def __init__(self, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.dtype, self.param_dtype = dtype, param_dtype

    def linear(self, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
        return nnx.Linear(d_in, d_out, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dt: Dtypes):
        self.scale = nnx.Param(jnp.ones((dim,), dt.param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)


class MLP(nnx.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, d_in: int, d_out: int, dt: Dtypes, rngs: nnx.Rngs):
        self.linear_1 = dt.linear(d_in, d_out, rngs)
        self.linear_2 = dt.linear(d_out, d_out, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(nnx.silu(self.linear_1(x)))


class FeedForward(nnx.Module):
    """fc1 -> GELU (tanh) -> fc2."""

    def __init__(self, dim: int, hidden: int, dt: Dtypes, rngs: nnx.Rngs):
        self.fc1 = dt.linear(dim, hidden, rngs)
        self.fc2 = dt.linear(hidden, dim, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def timestep_embedding(timestep: jax.Array, channels: int) -> jax.Array:
    """Sinusoidal projection of timesteps in 0..1000, [cos | sin] (diffusers Timesteps, flip_sin_to_cos=True)."""
    half = channels // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timestep.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimeEmbed(nnx.Module):
    """Timestep MLP + pooled-text MLP, summed: the conditioning vector of every adaLN."""

    def __init__(self, cfg: ModelConfig, dt: Dtypes, rngs: nnx.Rngs):
        self.channels = cfg.timestep_channels
        self.dtype = dt.dtype
        self.timestep = MLP(cfg.timestep_channels, cfg.hidden_size, dt, rngs)
        self.pooled = MLP(cfg.pooled_projection_dim, cfg.hidden_size, dt, rngs)

    def __call__(self, timestep: jax.Array, pooled_projections: jax.Array) -> jax.Array:
        t = timestep_embedding(timestep, self.channels).astype(self.dtype)
        return self.timestep(t) + self.pooled(pooled_projections.astype(self.dtype))


class PatchEmbed(nnx.Module):
    """Per-frame 2D patch projection plus a fixed position table (3D sin-cos, or SD3's cropped 2D table)."""

    def __init__(self, cfg: ModelConfig, dt: Dtypes, rngs: nnx.Rngs):
        self.cfg = cfg
        p = cfg.patch_size
        self.proj = nnx.Conv(
            cfg.in_channels,
            cfg.hidden_size,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dt.dtype,
            param_dtype=dt.param_dtype,
            rngs=rngs,
        )
        if cfg.pos_embed == "sd3_2d":
            table = sd3_table(cfg.hidden_size, cfg.pos_embed_max_size, cfg.sample_size, cfg.patch_size)
            self.pos_table = Buffer(jnp.asarray(table))

    def positions(self, frames: int, h: int, w: int) -> jax.Array:
        cfg = self.cfg
        if cfg.pos_embed == "sd3_2d":
            return crop_sd3_table(self.pos_table[...], cfg.pos_embed_max_size, h, w)
        return sincos_3d_table(
            cfg.hidden_size, frames, h, w, cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale, xp=jnp
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """The stride-p conv as patchify + matmul (same weights): with tokens split over `sequence`, XLA's SPMD
        partitioner mis-sums a spatially split conv's kernel gradient (x2 at degree 4); a matmul splits cleanly."""
        _, _, f, h, w = x.shape
        p, dtype = self.cfg.patch_size, self.proj.dtype
        patches = rearrange(x, "b c f (h p) (w q) -> b (f h w) (p q c)", p=p, q=p).astype(dtype)
        kernel = self.proj.kernel[...].astype(dtype)
        x = patches @ kernel.reshape(-1, kernel.shape[-1]) + self.proj.bias[...].astype(dtype)
        return (x.astype(jnp.float32) + self.positions(f, h // p, w // p)[None]).astype(x.dtype)


class JointAttention(nnx.Module):
    """Separate q/k/v (and output) projections for the image and text streams, one attention over both."""

    def __init__(
        self,
        cfg: ModelConfig,
        context_pre_only: bool,
        dt: Dtypes,
        rngs: nnx.Rngs,
        attention: Attention,
    ):
        d = cfg.hidden_size
        self.heads, self.attention = cfg.num_attention_heads, attention
        self.to_q, self.to_k, self.to_v = (dt.linear(d, d, rngs) for _ in range(3))
        self.add_q, self.add_k, self.add_v = (dt.linear(d, d, rngs) for _ in range(3))
        self.to_out = dt.linear(d, d, rngs)
        if not context_pre_only:
            self.add_out = dt.linear(d, d, rngs)
        self.context_pre_only = context_pre_only
        self.qk_norm = cfg.qk_norm is not None
        if self.qk_norm:
            hd, eps = cfg.attention_head_dim, cfg.norm_eps
            self.norm_q, self.norm_k = RMSNorm(hd, eps, dt), RMSNorm(hd, eps, dt)
            self.norm_added_q, self.norm_added_k = RMSNorm(hd, eps, dt), RMSNorm(hd, eps, dt)

    def _heads(self, x: jax.Array) -> jax.Array:
        return rearrange(x, "b n (h d) -> b n h d", h=self.heads)

    def __call__(self, x: jax.Array, context: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        q, k, v = (self._heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        cq, ck, cv = (self._heads(proj(context)) for proj in (self.add_q, self.add_k, self.add_v))
        if self.qk_norm:
            q, k = self.norm_q(q), self.norm_k(k)
            cq, ck = self.norm_added_q(cq), self.norm_added_k(ck)
        out, c_out = (rearrange(o, "b n h d -> b n (h d)") for o in self.attention(q, k, v, cq, ck, cv))
        return self.to_out(out), None if self.context_pre_only else self.add_out(c_out)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    return layer_norm(x, eps) * (1 + scale) + shift


class JointBlock(nnx.Module):
    """MMDiT block with adaLN-zero; `context_pre_only` (last block) drops the text stream's output path."""

    def __init__(
        self,
        cfg: ModelConfig,
        context_pre_only: bool,
        dt: Dtypes,
        rngs: nnx.Rngs,
        attention: Attention,
        constrain: Constrain,
    ):
        d = cfg.hidden_size
        self.eps, self.context_pre_only, self.constrain = cfg.norm_eps, context_pre_only, constrain
        self.norm1 = dt.linear(d, 6 * d, rngs)
        self.norm1_context = dt.linear(d, (2 if context_pre_only else 6) * d, rngs)
        self.attn = JointAttention(cfg, context_pre_only, dt, rngs, attention)
        self.ff = FeedForward(d, cfg.mlp_ratio * d, dt, rngs)
        if not context_pre_only:
            self.ff_context = FeedForward(d, cfg.mlp_ratio * d, dt, rngs)

    def __call__(self, x: jax.Array, context: jax.Array, temb_act: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        eps = self.eps
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(
            self.norm1(temb_act)[:, None], 6, axis=-1
        )
        c_mod = jnp.split(self.norm1_context(temb_act)[:, None], 2 if self.context_pre_only else 6, axis=-1)
        if self.context_pre_only:
            c_mod = c_mod[::-1]  # AdaLayerNormContinuous order: scale first
        c_shift_msa, c_scale_msa, *c_rest = c_mod
        norm_context = _modulate(context, c_shift_msa, c_scale_msa, eps)
        attn_x, attn_context = self.attn(_modulate(x, shift_msa, scale_msa, eps), norm_context)
        x = x + gate_msa * attn_x
        x = self.constrain(x + gate_mlp * self.ff(_modulate(x, shift_mlp, scale_mlp, eps)), ("batch", "tokens", None))
        if self.context_pre_only:
            return x, None
        c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_rest
        context = context + c_gate_msa * attn_context
        context = context + c_gate_mlp * self.ff_context(_modulate(context, c_shift_mlp, c_scale_mlp, eps))
        return x, context


class Transformer(nnx.Module):
    """ContentV-8B / SD3.5-Large MMDiT. Call as `model(hidden_states, timestep, encoder_hidden_states, pooled)`.

    `dtype` is the compute dtype (e.g. bf16) and `param_dtype` the stored one (fp32 masters); norms, position
    tables and timestep features are computed in fp32. `remat` names a rematerialisation policy per block.
    `attention` is the kernel on its mesh (contentv_jax.ops.Attention: XLA, cuDNN or splash, sequence parallel);
    the default, "auto" on one device, is resolved when traced: cuDNN flash on GPU, splash on TPU, XLA on CPU.
    `constrain` places activations on the device mesh (sequence-sharded image tokens).

    Blocks 0..L-2 are one stacked JointBlock (every parameter has a leading layer axis) run by `jax.lax.scan`, so
    compile time does not grow with depth; the last, `context_pre_only` block has other parameters and runs after
    it as `last_block`. `block(i)` gives block i as a module; contentv_jax.loading maps the canonical per-block
    names `blocks.{i}.*` to and from this layout.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        attention: Attention = DEFAULT_ATTENTION,
        remat: str = "none",
        constrain: Constrain = no_constraint,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat {remat!r} is not one of {sorted(REMAT_POLICIES)}")
        dt = Dtypes(dtype, param_dtype)
        d = cfg.hidden_size
        self.cfg, self.dtype, self.remat, self.constrain = cfg, dtype, remat, constrain
        self.patch_embed = PatchEmbed(cfg, dt, rngs)
        self.time_embed = TimeEmbed(cfg, dt, rngs)
        self.context_embedder = dt.linear(cfg.joint_attention_dim, d, rngs)

        @nnx.split_rngs(splits=cfg.num_layers - 1)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked(rngs: nnx.Rngs) -> JointBlock:
            return JointBlock(cfg, False, dt, rngs, attention, constrain)

        self.blocks = nnx.data(stacked(rngs) if cfg.num_layers > 1 else None)
        self.last_block = JointBlock(cfg, True, dt, rngs, attention, constrain)
        self.norm_out = dt.linear(d, 2 * d, rngs)
        self.proj_out = dt.linear(d, cfg.patch_size**2 * cfg.out_channels, rngs)

    def block(self, i: int) -> JointBlock:
        """Block i (0..L-1) as its own module: a slice of the stacked blocks, or the last block."""
        if not 0 <= i < self.cfg.num_layers:
            raise IndexError(f"block {i} of {self.cfg.num_layers}")
        if i == self.cfg.num_layers - 1:
            return self.last_block
        graphdef, state = nnx.split(self.blocks)
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

    def embed(
        self,
        hidden_states: jax.Array,
        timestep: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Image tokens, text tokens and the SiLU-activated conditioning vector fed to every block."""
        self.cfg.check_latent_shape(hidden_states.shape)
        x = self.constrain(self.patch_embed(hidden_states.astype(self.dtype)), ("batch", "tokens", None))
        temb_act = nnx.silu(self.time_embed(timestep, pooled_projections))
        context = self.context_embedder(encoder_hidden_states.astype(self.dtype))
        return x, context, temb_act

    def run_blocks(self, x: jax.Array, context: jax.Array, temb_act: jax.Array) -> jax.Array:
        """All blocks: a scan over the stacked ones (remat inside the scan body), then the last block."""
        policy = REMAT_POLICIES[self.remat]
        if self.blocks is not None:
            graphdef, stacked = nnx.split(self.blocks)

            def body(carry: tuple[jax.Array, jax.Array], layer: nnx.State) -> tuple[tuple[jax.Array, jax.Array], None]:
                return nnx.merge(graphdef, layer)(*carry, temb_act), None

            if self.remat != "none":
                body = jax.checkpoint(body, policy=policy, prevent_cse=False)  # scan already keeps CSE apart
            (x, context), _ = jax.lax.scan(body, (x, context), stacked)

        last_graph, last_state = nnx.split(self.last_block)

        def last(state: nnx.State, x: jax.Array, context: jax.Array) -> jax.Array:
            return nnx.merge(last_graph, state)(x, context, temb_act)[0]

        if self.remat != "none":  # functional (not nnx.remat), so it also runs on a model merged inside a scan
            last = jax.checkpoint(last, policy=policy)
        return last(last_state, x, context)

    def head(self, x: jax.Array, temb_act: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
        """Final adaLN + projection, unpatchified back to `[B, C, F, H, W]`."""
        scale, shift = jnp.split(self.norm_out(temb_act)[:, None], 2, axis=-1)
        x = self.proj_out(_modulate(x, shift, scale, self.cfg.norm_eps))
        return unpatchify(x, latent_shape, self.cfg.patch_size)

    def __call__(
        self,
        hidden_states: jax.Array,
        timestep: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
    ) -> jax.Array:
        x, context, temb_act = self.embed(hidden_states, timestep, encoder_hidden_states, pooled_projections)
        return self.head(self.run_blocks(x, context, temb_act), temb_act, hidden_states.shape)
