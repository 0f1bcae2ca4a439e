"""The Wan2.1 causal 3D VAE in PyTorch (mirrors contentv_jax/vae.py module for module).

Numerics follow diffusers' `AutoencoderKLWan`: causal 3D convs (zeros before frame 0), Wan's RMS norm (L2-normalise
over channels, times sqrt(C) and gamma), per-frame single-head attention, nearest 2x upsampling, and causal time
resampling in which frame 0 stays alone (so F frames <-> 1 + (F - 1) / 4 latent frames). Videos go through in time
chunks with a `CausalHistory` (encode: frame 0, then 4 frames at a time; decode: one latent frame at a time), so each
chunk sees exactly the context the whole video gives it, with the memory of one chunk. Decoding can also be tiled
in space, and the tiles spread over the ranks of a process group (time chunks are sequential through the causal
history; tiles are independent).
Layout: `[B, C, F, H, W]`; videos are in [-1, 1]. Module attribute names are the canonical parameter names.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from contentv_common.checkpoint.hub import vae_folder
from contentv_common.vae.checkpoint import open_vae_source, write_vae_diffusers
from contentv_common.vae.chunks import (
    CausalHistory,
    TilePlan,
    Tiling,
    blend_weights,
    encode_chunks,
    tile_groups,
    tile_plan,
)
from contentv_common.vae.config import RGB, UpBlock, VAEConfig, decoder_blocks, encoder_layers, mid_dim
from contentv_common.vae.table import vae_table
from contentv_torch_npu.loading import canonical_tensors, fill_from_source


def with_context(x: torch.Tensor, history: CausalHistory, frames: int) -> torch.Tensor:
    """`x` preceded by the `frames` frames before it (zeros before frame 0); remembers its own last frames."""
    previous = history.take()
    if previous is None:
        b, c, _, h, w = x.shape
        previous = x.new_zeros(b, c, frames, h, w)
    x = torch.cat([previous, x], dim=2)
    history.give(x[:, :, -frames:].clone())
    return x


def per_frame(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D layer to every frame of `[B, C, T, H, W]`."""
    b = x.shape[0]
    y = layer(rearrange(x, "b c t h w -> (b t) c h w"))
    return rearrange(y, "(b t) c h w -> b c t h w", b=b)


class CausalConv3d(nn.Conv3d):
    """Conv3d with 'same' spatial padding and none in time: `causal` supplies the frames before the chunk."""

    def __init__(self, in_dim: int, out_dim: int, kernel: tuple[int, int, int], stride_t: int = 1):
        super().__init__(in_dim, out_dim, kernel, stride=(stride_t, 1, 1), padding=(0, kernel[1] // 2, kernel[2] // 2))

    def causal(self, x: torch.Tensor, history: CausalHistory) -> torch.Tensor:
        return self(with_context(x, history, self.kernel_size[0] - 1))


class RMSNorm(nn.Module):
    """Wan's norm over channels: L2-normalise (in fp32 for low-precision input), times sqrt(C) and gamma."""

    def __init__(self, dim: int, frames: bool = True):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1, 1) if frames else (dim, 1, 1)))
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=1).to(x.dtype)
        return y * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, (3, 3, 3))
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, (3, 3, 3))
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, (1, 1, 1)) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, history: CausalHistory) -> torch.Tensor:
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1.causal(F.silu(self.norm1(x)), history)
        x = self.conv2.causal(F.silu(self.norm2(x)), history)
        return x + shortcut


class Attention(nn.Module):
    """Single-head self-attention over the pixels of each frame; it never looks across time (history unused)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, frames=False)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, history: CausalHistory) -> torch.Tensor:
        b, _, _, h, _ = x.shape
        qkv = self.to_qkv(self.norm(rearrange(x, "b c t h w -> (b t) c h w")))
        q, k, v = rearrange(qkv, "n (three c) h w -> three n 1 (h w) c", three=3)
        y = rearrange(F.scaled_dot_product_attention(q, k, v), "n 1 (h w) c -> n c h w", h=h)
        return x + rearrange(self.proj(y), "(b t) c h w -> b c t h w", b=b)


class Downsample(nn.Module):
    """Halve H and W (pad right and bottom by one, 3x3 stride-2 conv); with `temporal`, then halve time with a
    stride-2 causal conv over (last frame of the previous chunk, chunk). Frame 0 passes the time conv untouched."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Conv2d(dim, dim, 3, stride=2)
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride_t=2) if temporal else None

    def forward(self, x: torch.Tensor, history: CausalHistory) -> torch.Tensor:
        x = per_frame(self.resample, F.pad(x, (0, 1, 0, 1)))
        if self.time_conv is None:
            return x
        previous = history.take()
        history.give(x[:, :, -1:].clone())
        return x if previous is None else self.time_conv(torch.cat([previous, x], dim=2))


class Upsample(nn.Module):
    """With `temporal`, double time with a causal conv giving two frames per frame (frame 0 stays one frame); then
    double H and W (nearest) and conv 3x3 to half the channels."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Conv2d(dim, dim // 2, 3, padding=1)
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, history: CausalHistory) -> torch.Tensor:
        if self.time_conv is not None:
            if history.first:
                b, c, _, h, w = x.shape
                history.give(x.new_zeros(b, c, 2, h, w))  # the chunk after frame 0 starts from zeros
            else:
                pairs = self.time_conv.causal(x, history)
                x = rearrange(pairs, "b (two c) t h w -> b c (t two) h w", two=2)
        return per_frame(lambda y: self.resample(F.interpolate(y, scale_factor=2.0, mode="nearest")), x)


class MidBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([Attention(dim)])

    def forward(self, x: torch.Tensor, history: CausalHistory) -> torch.Tensor:
        x = self.resnets[0](x, history)
        return self.resnets[1](self.attentions[0](x, history), history)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        layers = []
        for layer in encoder_layers(cfg):
            if layer.kind == "residual":
                layers.append(ResidualBlock(layer.in_dim, layer.out_dim))
            else:
                layers.append(Downsample(layer.out_dim, temporal=layer.kind == "downsample3d"))
        dim = mid_dim(cfg)
        self.conv_in = CausalConv3d(RGB, cfg.base_dim, (3, 3, 3))
        self.down_blocks = nn.ModuleList(layers)
        self.mid_block = MidBlock(dim)
        self.norm_out = RMSNorm(dim)
        self.conv_out = CausalConv3d(dim, 2 * cfg.z_dim, (3, 3, 3))

    def forward(self, x: torch.Tensor, history: CausalHistory) -> torch.Tensor:
        x = self.conv_in.causal(x, history)
        for layer in self.down_blocks:
            x = layer(x, history)
        x = self.mid_block(x, history)
        return self.conv_out.causal(F.silu(self.norm_out(x)), history)


class UpStage(nn.Module):
    def __init__(self, block: UpBlock, num_res_blocks: int):
        super().__init__()
        dims = [block.in_dim] + [block.out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([ResidualBlock(i, o) for i, o in pairwise(dims)])
        temporal = block.upsample == "upsample3d"
        self.upsampler = None if block.upsample is None else Upsample(block.out_dim, temporal)

    def forward(self, x: torch.Tensor, history: CausalHistory) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, history)
        return x if self.upsampler is None else self.upsampler(x, history)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dim = mid_dim(cfg)
        blocks = decoder_blocks(cfg)
        self.conv_in = CausalConv3d(cfg.z_dim, dim, (3, 3, 3))
        self.mid_block = MidBlock(dim)
        self.up_blocks = nn.ModuleList([UpStage(block, cfg.num_res_blocks) for block in blocks])
        self.norm_out = RMSNorm(blocks[-1].out_dim)
        self.conv_out = CausalConv3d(blocks[-1].out_dim, RGB, (3, 3, 3))

    def forward(self, x: torch.Tensor, history: CausalHistory) -> torch.Tensor:
        x = self.mid_block(self.conv_in.causal(x, history), history)
        for stage in self.up_blocks:
            x = stage(x, history)
        return self.conv_out.causal(F.silu(self.norm_out(x)), history)


def _blend(a: torch.Tensor, b: torch.Tensor, blend: int, dim: int) -> torch.Tensor:
    """`b` with its first rows (dim 3) or columns (dim 4) faded in from the end of `a`."""
    weights = blend_weights(a.shape[dim], b.shape[dim], blend)
    n = len(weights)
    shape = [1] * b.dim()
    shape[dim] = n
    w = torch.tensor(weights, dtype=b.dtype, device=b.device).view(shape)
    head = a.narrow(dim, a.shape[dim] - n, n) * (1 - w) + b.narrow(dim, 0, n) * w
    return torch.cat([head, b.narrow(dim, n, b.shape[dim] - n)], dim=dim)


class WanVAE(nn.Module):
    """Wan2.1 VAE: `encode(video) -> latents`, `decode(latents) -> video`, and the latent normalisation."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1))
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1))
        self.decoder = Decoder(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    def encode(self, video: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Raw latents `[B, z, f, h, w]` of a video `[B, 3, F, H, W]` in [-1, 1]: the posterior mean, or a sample
        mean + std * noise with the given standard-normal `noise`. Frames past the last full time chunk are dropped
        (f = 1 + (F - 1) // 4)."""
        self.cfg.check_video_shape(video.shape, None if noise is None else noise.shape)
        video = video.to(self.dtype)
        history = CausalHistory()
        moments = []
        for start, stop in encode_chunks(video.shape[2], self.cfg.temporal_factor):
            moments.append(self.quant_conv(self.encoder(video[:, :, start:stop], history)))
            history = CausalHistory(history.current)
        mean, logvar = torch.cat(moments, dim=2).chunk(2, dim=1)
        if noise is None:
            return mean
        return mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise.to(mean.dtype)

    def decode(
        self, latents: torch.Tensor, tiling: Tiling | None = None, group: dist.ProcessGroup | None = None
    ) -> torch.Tensor:
        """Video `[B, 3, F, H, W]` in [-1, 1] from raw latents `[B, z, f, h, w]` (F = 1 + 4 (f - 1)), one latent
        frame at a time; `tiling` also splits space into blended tiles. Latent frame 0 alone decodes to frame 0.
        With `tiling`, the ranks of `group` (every one calling with the same latents) decode the tiles side by side
        and exchange them: every rank gets the frames one rank decoding the same tiles gives."""
        self.cfg.check_latent_shape(latents.shape)
        latents = latents.to(self.dtype)
        _, _, _, h, w = latents.shape
        plan = None if tiling is None else tile_plan(h, w, tiling, self.cfg.spatial_factor)
        video = self._decode_frames(latents) if plan is None else self._decode_tiles(latents, plan, group)
        return video.clamp(-1.0, 1.0)

    def _decode_frames(self, latents: torch.Tensor) -> torch.Tensor:
        history = CausalHistory()
        frames = []
        for i in range(latents.shape[2]):
            frames.append(self.decoder(self.post_quant_conv(latents[:, :, i : i + 1]), history))
            history = CausalHistory(history.current)
        return torch.cat(frames, dim=2)

    def _decode_tiles(self, latents: torch.Tensor, plan: TilePlan, group: dist.ProcessGroup | None) -> torch.Tensor:
        """Each rank decodes its tiles (the k-th of every round of contentv_common.vae.chunks.tile_groups), then every
        tile is broadcast from the rank that decoded it; then the tiles are blended and cropped."""
        rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
        owners = {spot: k for spots in tile_groups(plan, world) for k, spot in enumerate(spots)}
        decoded: dict[tuple[int, int], torch.Tensor] = {}
        for (i, j), owner in owners.items():
            if owner == rank:
                (r0, r1), (c0, c1) = plan.rows[i], plan.cols[j]
                decoded[i, j] = self._decode_frames(latents[..., r0:r1, c0:c1]).contiguous()
        if group is not None and world > 1:
            b, _, f, _, _ = latents.shape
            t, s = self.cfg.temporal_factor, self.cfg.spatial_factor
            for (i, j), owner in sorted(owners.items()):
                (r0, r1), (c0, c1) = plan.rows[i], plan.cols[j]
                if owner != rank:
                    shape = (b, RGB, 1 + t * (f - 1), (r1 - r0) * s, (c1 - c0) * s)
                    decoded[i, j] = torch.empty(shape, dtype=latents.dtype, device=latents.device)
                dist.broadcast(decoded[i, j], src=dist.get_global_rank(group, owner), group=group)
        rows = [[decoded[i, j] for j in range(len(plan.cols))] for i in range(len(plan.rows))]
        for i, row in enumerate(rows):
            for j, tile in enumerate(row):
                if i > 0:
                    tile = _blend(rows[i - 1][j], tile, plan.blend_height, dim=3)
                if j > 0:
                    tile = _blend(row[j - 1], tile, plan.blend_width, dim=4)
                row[j] = tile
        kh, kw = plan.keep_height, plan.keep_width
        video = torch.cat([torch.cat([t[..., :kh, :kw] for t in row], dim=4) for row in rows], dim=3)
        return video[..., : plan.height, : plan.width]

    def _stats(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        def column(values: tuple[float, ...]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=latents.device).view(1, -1, 1, 1, 1)

        return column(self.cfg.latents_mean), column(self.cfg.latents_std)

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the per-channel standardised latents the transformer is trained on."""
        mean, std = self._stats(latents)
        return ((latents.float() - mean) / std).to(latents.dtype)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Transformer latents -> raw VAE latents (before `decode`)."""
        mean, std = self._stats(latents)
        return (latents.float() * std + mean).to(latents.dtype)


def load_vae(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> WanVAE:
    """Load a diffusers `AutoencoderKLWan` folder (e.g. a ContentV pipeline's `vae/`) or a Hugging Face Hub id
    (`ByteDance/ContentV-8B/vae`: its config and safetensors only); dtype defaults to float32."""
    source = open_vae_source(vae_folder(path))
    with torch.device("meta"):
        model = WanVAE(source.config)
    model = fill_from_source(model, source, dtype or torch.float32, table=vae_table(source.config))
    return model.to(device).eval()


def save_vae(folder: str | Path, vae: WanVAE, overwrite: bool = False) -> Path:
    """Write `vae` as a diffusers `AutoencoderKLWan` folder (loadable by diffusers and by both backends)."""
    return write_vae_diffusers(folder, vae.cfg, canonical_tensors(vae), overwrite=overwrite)
