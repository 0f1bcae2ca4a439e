"""The ContentV / SD3.5 MMDiT in PyTorch (mirrors contentv_jax/transformer.py module for module).

Module attribute names are the canonical parameter names, so `state_dict()` keys are canonical names. Layout: input
and output `[B, C, F, H, W]`; tokens ordered (frame, row, col); attention runs in `[B, heads, N, d]` (BNSD).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from contentv_common.config.model import ModelConfig
from contentv_common.model.patches import unpatchify
from contentv_common.model.pos_embed import crop_sd3_table, sd3_table
from contentv_torch_npu.ops import Ops, ops_for


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers TimestepEmbedding / PixArtAlphaTextProjection)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(d_in, d_out)
        self.linear_2 = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class FeedForward(nn.Module):
    """fc1 -> GELU (tanh) -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, ops: Ops) -> torch.Tensor:
        return self.fc2(ops.gelu_tanh(self.fc1(x)))


def timestep_embedding(timestep: torch.Tensor, channels: int) -> torch.Tensor:
    """Sinusoidal projection of timesteps in 0..1000, [cos | sin] (diffusers Timesteps, flip_sin_to_cos=True)."""
    half = channels // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half)
    args = timestep.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeEmbed(nn.Module):
    """Timestep MLP + pooled-text MLP, summed: the conditioning vector of every adaLN."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.channels = cfg.timestep_channels
        self.timestep = MLP(cfg.timestep_channels, cfg.hidden_size)
        self.pooled = MLP(cfg.pooled_projection_dim, cfg.hidden_size)

    def forward(self, timestep: torch.Tensor, pooled_projections: torch.Tensor) -> torch.Tensor:
        t = timestep_embedding(timestep, self.channels).to(pooled_projections.dtype)
        return self.timestep(t) + self.pooled(pooled_projections)


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M, dim] float32 on `positions`' device: sin of positions x frequencies, then cos (diffusers' formula)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32, device=positions.device) / (dim / 2.0))
    out = positions.reshape(-1, 1).float() * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_3d_parts(
    dim: int, frames: int, height: int, width: int, spatial_scale: float, temporal_scale: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """ContentV's 3D table in its two factors, float32 on `device`: temporal [frames, dim/4] and spatial
    [height*width, 3dim/4] (column code, then row code). The full [frames*h*w, dim] table is their broadcast concat,
    so it is never built: at 720p it would be 1.1 GB, the factors are a few MB."""
    rows = torch.arange(height, dtype=torch.float32, device=device) / spatial_scale
    cols = torch.arange(width, dtype=torch.float32, device=device) / spatial_scale
    half = 3 * dim // 8
    spatial = torch.cat(
        [_sincos_1d(half, cols[None, :].expand(height, width)), _sincos_1d(half, rows[:, None].expand(height, width))],
        dim=1,
    )
    temporal = _sincos_1d(dim // 4, torch.arange(frames, dtype=torch.float32, device=device) / temporal_scale)
    return temporal, spatial


class PatchEmbed(nn.Module):
    """Per-frame 2D patch projection plus a fixed position table (3D sin-cos, or SD3's cropped 2D table).

    The 3D table is computed for the current shape on the input's device in float32 and added in float32 (as the
    JAX side does inside jit); nothing is cached on the host or the device.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p)
        if cfg.pos_embed == "sd3_2d":
            table = sd3_table(cfg.hidden_size, cfg.pos_embed_max_size, cfg.sample_size, cfg.patch_size)
            self.register_buffer("pos_table", torch.from_numpy(table), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, _, f, _, _ = x.shape
        x = self.proj(rearrange(x, "b c f h w -> (b f) c h w"))
        _, d, h, w = x.shape
        x = rearrange(x, "(b f) d h w -> b (f h w) d", b=b)
        if cfg.pos_embed == "sd3_2d":
            table = crop_sd3_table(self.pos_table.float(), cfg.pos_embed_max_size, h, w)
            return (x.float() + table[None]).to(x.dtype)
        temporal, spatial = sincos_3d_parts(
            d, f, h, w, cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale, x.device
        )
        x32 = x.float().view(b, f, h * w, d)
        out = torch.cat([x32[..., : d // 4] + temporal[None, :, None], x32[..., d // 4 :] + spatial[None, None]], -1)
        return out.view(b, f * h * w, d).to(x.dtype)


class JointAttention(nn.Module):
    """Separate q/k/v (and output) projections for the image and text streams, one attention over both."""

    def __init__(self, cfg: ModelConfig, context_pre_only: bool):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.add_q, self.add_k, self.add_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.to_out = nn.Linear(d, d)
        self.add_out = None if context_pre_only else nn.Linear(d, d)
        self.qk_norm = cfg.qk_norm is not None
        if self.qk_norm:
            hd, eps = cfg.attention_head_dim, cfg.norm_eps
            self.norm_q, self.norm_k = RMSNorm(hd, eps), RMSNorm(hd, eps)
            self.norm_added_q, self.norm_added_k = RMSNorm(hd, eps), RMSNorm(hd, eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor, ops: Ops) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = (self._heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        cq, ck, cv = (self._heads(proj(context)) for proj in (self.add_q, self.add_k, self.add_v))
        if self.qk_norm:
            q, k = self.norm_q(q, ops), self.norm_k(k, ops)
            cq, ck = self.norm_added_q(cq, ops), self.norm_added_k(ck, ops)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((q, cq), (k, ck), (v, cv)))
        out = rearrange(ops.attention(q, k, v), "b h n d -> b n (h d)")
        n = x.shape[1]
        x_out = self.to_out(out[:, :n])
        return x_out, None if self.add_out is None else self.add_out(out[:, n:])


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype) * (1 + scale) + shift


class JointBlock(nn.Module):
    """MMDiT block with adaLN-zero; `context_pre_only` (last block) drops the text stream's output path."""

    def __init__(self, cfg: ModelConfig, context_pre_only: bool):
        super().__init__()
        d = cfg.hidden_size
        self.eps, self.context_pre_only = cfg.norm_eps, context_pre_only
        self.norm1 = nn.Linear(d, 6 * d)
        self.norm1_context = nn.Linear(d, (2 if context_pre_only else 6) * d)
        self.attn = JointAttention(cfg, context_pre_only)
        self.ff = FeedForward(d, cfg.mlp_ratio * d)
        self.ff_context = None if context_pre_only else FeedForward(d, cfg.mlp_ratio * d)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, temb_act: torch.Tensor, ops: Ops
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        eps = self.eps
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb_act)[:, None].chunk(6, -1)
        c_mod = self.norm1_context(temb_act)[:, None].chunk(2 if self.context_pre_only else 6, -1)
        if self.context_pre_only:
            c_mod = c_mod[::-1]  # AdaLayerNormContinuous order: scale first
        c_shift_msa, c_scale_msa, *c_rest = c_mod
        norm_context = _modulate(context, c_shift_msa, c_scale_msa, eps)
        attn_x, attn_context = self.attn(_modulate(x, shift_msa, scale_msa, eps), norm_context, ops)
        x = x + gate_msa * attn_x
        x = x + gate_mlp * self.ff(_modulate(x, shift_mlp, scale_mlp, eps), ops)
        if self.context_pre_only:
            return x, None
        c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_rest
        context = context + c_gate_msa * attn_context
        context = context + c_gate_mlp * self.ff_context(_modulate(context, c_shift_mlp, c_scale_mlp, eps), ops)
        return x, context


class Transformer(nn.Module):
    """ContentV-8B / SD3.5-Large MMDiT. Call as `model(hidden_states, timestep, encoder_hidden_states, pooled)`.

    `compute_dtype` (e.g. bf16) runs the matmuls under autocast while parameters stay in their own dtype (fp32
    masters); norms, position tables and timestep features are fp32. `ops`: "auto" (by device), "torch" or "npu".
    `gradient_checkpointing` recomputes each block in the backward pass.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        compute_dtype: torch.dtype | None = None,
        ops: str = "auto",
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        ops_for(ops, "cpu")  # validate the choice early
        d = cfg.hidden_size
        self.cfg, self.compute_dtype, self.ops = cfg, compute_dtype, ops
        self.gradient_checkpointing = gradient_checkpointing
        self.patch_embed = PatchEmbed(cfg)
        self.time_embed = TimeEmbed(cfg)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, d)
        self.blocks = nn.ModuleList([JointBlock(cfg, i == cfg.num_layers - 1) for i in range(cfg.num_layers)])
        self.norm_out = nn.Linear(d, 2 * d)
        self.proj_out = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels)

    def _autocast(self, device: torch.device):
        param_dtype = self.proj_out.weight.dtype
        if self.compute_dtype is None or self.compute_dtype == param_dtype:
            return contextlib.nullcontext()
        # no cast cache: it would keep a bf16 copy of every block's gathered weights until the forward ends,
        # defeating FSDP2's per-block resharding (the casts are recomputed instead; same numbers)
        return torch.autocast(device.type, dtype=self.compute_dtype, cache_enabled=False)

    def embed(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image tokens, text tokens and the SiLU-activated conditioning vector fed to every block."""
        self.cfg.check_latent_shape(tuple(hidden_states.shape))
        dtype = self.compute_dtype or self.proj_out.weight.dtype
        x = self.patch_embed(hidden_states.to(dtype))
        temb_act = F.silu(self.time_embed(timestep, pooled_projections.to(dtype)))
        context = self.context_embedder(encoder_hidden_states.to(dtype))
        return x, context, temb_act

    def head(self, x: torch.Tensor, temb_act: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """Final adaLN + projection, unpatchified back to `[B, C, F, H, W]`."""
        scale, shift = self.norm_out(temb_act)[:, None].chunk(2, -1)
        x = self.proj_out(_modulate(x, shift, scale, self.cfg.norm_eps))
        return unpatchify(x, latent_shape, self.cfg.patch_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
    ) -> torch.Tensor:
        ops = ops_for(self.ops, hidden_states.device.type)
        with self._autocast(hidden_states.device):
            x, context, temb_act = self.embed(hidden_states, timestep, encoder_hidden_states, pooled_projections)
            for block in self.blocks:
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    x, context = checkpoint(block, x, context, temb_act, ops, use_reentrant=False)
                else:
                    x, context = block(x, context, temb_act, ops)
            return self.head(x, temb_act, tuple(hidden_states.shape))
