"""The Wan2.1 causal 3D VAE in Flax NNX (mirrors contentv_torch_npu/vae.py module for module).

Numerics follow diffusers' `AutoencoderKLWan`: causal 3D convs (zeros before frame 0), Wan's RMS norm (L2-normalise
over channels, times sqrt(C) and gamma), per-frame single-head attention, nearest 2x upsampling, and causal time
resampling in which frame 0 stays alone (so F frames <-> 1 + (F - 1) / 4 latent frames). Videos go through in time
chunks with a `CausalHistory` (encode: frame 0, then 4 frames at a time; decode: one latent frame at a time), one
jitted call per chunk (two compilations per shape: the first chunk and the rest); each chunk sees exactly the
context the whole video gives it, with the memory of one chunk. Decoding can also be tiled in space, and the tiles
spread over devices (time chunks are sequential through the causal history; tiles are independent).
Public layout: `[B, C, F, H, W]` (videos in [-1, 1]); inside, channels-last `[B, T, H, W, C]`. Module attribute names
are the canonical parameter names; conv kernels are DHWIO / HWIO and RMS gammas keep diffusers' `[C, 1, 1(, 1)]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from itertools import pairwise
from pathlib import Path

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

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
from contentv_jax.loading import canonical_tensors, fill_from_source
from contentv_jax.transformer import Dtypes

# torch's default conv init (kaiming uniform, a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def with_context(x: jax.Array, history: CausalHistory, frames: int) -> jax.Array:
    """`x` preceded by the `frames` frames before it (zeros before frame 0); remembers its own last frames."""
    previous = history.take()
    if previous is None:
        b, _, h, w, c = x.shape
        previous = jnp.zeros((b, frames, h, w, c), x.dtype)
    x = jnp.concatenate([previous, x], axis=1)
    history.give(x[:, -frames:])
    return x


class CausalConv3d(nnx.Module):
    """Conv3d with 'same' spatial padding and none in time: `causal` supplies the frames before the chunk."""

    def __init__(
        self, in_dim: int, out_dim: int, kernel: tuple[int, int, int], dt: Dtypes, rngs: nnx.Rngs, stride_t: int = 1
    ):
        self.kernel = nnx.Param(_KERNEL_INIT(rngs.params(), (*kernel, in_dim, out_dim), dt.param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_dim,), dt.param_dtype))
        self.context, self.stride_t, self.dtype = kernel[0] - 1, stride_t, dt.dtype
        self.padding = ((0, 0), (kernel[1] // 2,) * 2, (kernel[2] // 2,) * 2)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            (self.stride_t, 1, 1),
            self.padding,
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        return y + self.bias[...].astype(self.dtype)

    def causal(self, x: jax.Array, history: CausalHistory) -> jax.Array:
        return self(with_context(x, history, self.context))


class Conv2d(nnx.Module):
    """Per-frame 2D conv on `[N, H, W, C]` with explicit (top, bottom) / (left, right) padding."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel: int,
        dt: Dtypes,
        rngs: nnx.Rngs,
        stride: int = 1,
        padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0)),
    ):
        self.kernel = nnx.Param(_KERNEL_INIT(rngs.params(), (kernel, kernel, in_dim, out_dim), dt.param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_dim,), dt.param_dtype))
        self.stride, self.padding, self.dtype = stride, padding, dt.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            (self.stride, self.stride),
            self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.bias[...].astype(self.dtype)


def per_frame(layer: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """Apply a 2D layer to every frame of `[B, T, H, W, C]`."""
    b = x.shape[0]
    return rearrange(layer(rearrange(x, "b t h w c -> (b t) h w c")), "(b t) h w c -> b t h w c", b=b)


class RMSNorm(nnx.Module):
    """Wan's norm over channels: L2-normalise (in fp32 for low-precision input), times sqrt(C) and gamma."""

    def __init__(self, dim: int, dt: Dtypes, frames: bool = True):
        self.gamma = nnx.Param(jnp.ones((dim, 1, 1, 1) if frames else (dim, 1, 1), dt.param_dtype))
        self.scale = dim**0.5

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32) if x.dtype in (jnp.float16, jnp.bfloat16) else x
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        y = (x32 / jnp.maximum(norm, 1e-12)).astype(x.dtype)
        return y * self.scale * self.gamma[...].reshape(-1).astype(x.dtype)


class ResidualBlock(nnx.Module):
    def __init__(self, in_dim: int, out_dim: int, dt: Dtypes, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(in_dim, dt)
        self.conv1 = CausalConv3d(in_dim, out_dim, (3, 3, 3), dt, rngs)
        self.norm2 = RMSNorm(out_dim, dt)
        self.conv2 = CausalConv3d(out_dim, out_dim, (3, 3, 3), dt, rngs)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, (1, 1, 1), dt, rngs) if in_dim != out_dim else None

    def __call__(self, x: jax.Array, history: CausalHistory) -> jax.Array:
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1.causal(nnx.silu(self.norm1(x)), history)
        x = self.conv2.causal(nnx.silu(self.norm2(x)), history)
        return x + shortcut


class Attention(nnx.Module):
    """Single-head self-attention over the pixels of each frame; it never looks across time (history unused)."""

    def __init__(self, dim: int, dt: Dtypes, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim, dt, frames=False)
        self.to_qkv = Conv2d(dim, 3 * dim, 1, dt, rngs)
        self.proj = Conv2d(dim, dim, 1, dt, rngs)

    def __call__(self, x: jax.Array, history: CausalHistory) -> jax.Array:
        b, _, h, _, _ = x.shape
        qkv = self.to_qkv(self.norm(rearrange(x, "b t h w c -> (b t) h w c")))
        q, k, v = rearrange(qkv, "n h w (three c) -> three n (h w) 1 c", three=3)
        y = rearrange(jax.nn.dot_product_attention(q, k, v), "n (h w) 1 c -> n h w c", h=h)
        return x + rearrange(self.proj(y), "(b t) h w c -> b t h w c", b=b)


class Downsample(nnx.Module):
    """Halve H and W (pad right and bottom by one, 3x3 stride-2 conv); with `temporal`, then halve time with a
    stride-2 causal conv over (last frame of the previous chunk, chunk). Frame 0 passes the time conv untouched."""

    def __init__(self, dim: int, temporal: bool, dt: Dtypes, rngs: nnx.Rngs):
        self.resample = Conv2d(dim, dim, 3, dt, rngs, stride=2, padding=((0, 1), (0, 1)))
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), dt, rngs, stride_t=2) if temporal else None

    def __call__(self, x: jax.Array, history: CausalHistory) -> jax.Array:
        x = per_frame(self.resample, x)
        if self.time_conv is None:
            return x
        previous = history.take()
        history.give(x[:, -1:])
        return x if previous is None else self.time_conv(jnp.concatenate([previous, x], axis=1))


class Upsample(nnx.Module):
    """With `temporal`, double time with a causal conv giving two frames per frame (frame 0 stays one frame); then
    double H and W (nearest) and conv 3x3 to half the channels."""

    def __init__(self, dim: int, temporal: bool, dt: Dtypes, rngs: nnx.Rngs):
        self.resample = Conv2d(dim, dim // 2, 3, dt, rngs, padding=((1, 1), (1, 1)))
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), dt, rngs) if temporal else None

    def __call__(self, x: jax.Array, history: CausalHistory) -> jax.Array:
        if self.time_conv is not None:
            if history.first:
                b, _, h, w, c = x.shape
                history.give(jnp.zeros((b, 2, h, w, c), x.dtype))  # the chunk after frame 0 starts from zeros
            else:
                pairs = self.time_conv.causal(x, history)
                x = rearrange(pairs, "b t h w (two c) -> b (t two) h w c", two=2)
        return per_frame(lambda y: self.resample(jnp.repeat(jnp.repeat(y, 2, axis=1), 2, axis=2)), x)


class MidBlock(nnx.Module):
    def __init__(self, dim: int, dt: Dtypes, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(dim, dim, dt, rngs), ResidualBlock(dim, dim, dt, rngs)])
        self.attentions = nnx.List([Attention(dim, dt, rngs)])

    def __call__(self, x: jax.Array, history: CausalHistory) -> jax.Array:
        x = self.resnets[0](x, history)
        return self.resnets[1](self.attentions[0](x, history), history)


class Encoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, dt: Dtypes, rngs: nnx.Rngs):
        layers = []
        for layer in encoder_layers(cfg):
            if layer.kind == "residual":
                layers.append(ResidualBlock(layer.in_dim, layer.out_dim, dt, rngs))
            else:
                layers.append(Downsample(layer.out_dim, layer.kind == "downsample3d", dt, rngs))
        dim = mid_dim(cfg)
        self.conv_in = CausalConv3d(RGB, cfg.base_dim, (3, 3, 3), dt, rngs)
        self.down_blocks = nnx.List(layers)
        self.mid_block = MidBlock(dim, dt, rngs)
        self.norm_out = RMSNorm(dim, dt)
        self.conv_out = CausalConv3d(dim, 2 * cfg.z_dim, (3, 3, 3), dt, rngs)

    def __call__(self, x: jax.Array, history: CausalHistory) -> jax.Array:
        x = self.conv_in.causal(x, history)
        for layer in self.down_blocks:
            x = layer(x, history)
        x = self.mid_block(x, history)
        return self.conv_out.causal(nnx.silu(self.norm_out(x)), history)


class UpStage(nnx.Module):
    def __init__(self, block: UpBlock, num_res_blocks: int, dt: Dtypes, rngs: nnx.Rngs):
        dims = [block.in_dim] + [block.out_dim] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(i, o, dt, rngs) for i, o in pairwise(dims)])
        temporal = block.upsample == "upsample3d"
        self.upsampler = None if block.upsample is None else Upsample(block.out_dim, temporal, dt, rngs)

    def __call__(self, x: jax.Array, history: CausalHistory) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, history)
        return x if self.upsampler is None else self.upsampler(x, history)


class Decoder(nnx.Module):
    def __init__(self, cfg: VAEConfig, dt: Dtypes, rngs: nnx.Rngs):
        dim = mid_dim(cfg)
        blocks = decoder_blocks(cfg)
        self.conv_in = CausalConv3d(cfg.z_dim, dim, (3, 3, 3), dt, rngs)
        self.mid_block = MidBlock(dim, dt, rngs)
        self.up_blocks = nnx.List([UpStage(block, cfg.num_res_blocks, dt, rngs) for block in blocks])
        self.norm_out = RMSNorm(blocks[-1].out_dim, dt)
        self.conv_out = CausalConv3d(blocks[-1].out_dim, RGB, (3, 3, 3), dt, rngs)

    def __call__(self, x: jax.Array, history: CausalHistory) -> jax.Array:
        x = self.mid_block(self.conv_in.causal(x, history), history)
        for stage in self.up_blocks:
            x = stage(x, history)
        return self.conv_out.causal(nnx.silu(self.norm_out(x)), history)


@partial(jax.jit, static_argnums=0)
def _encode_chunk(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, previous: list[jax.Array] | None):
    """One time chunk through the encoder; the module split once per video by the caller (nnx.jit would walk the
    VAE's graph at every chunk: a quarter of the demo cache build's time)."""
    vae = nnx.merge(graphdef, state)
    history = CausalHistory(previous)
    return vae.quant_conv(vae.encoder(x, history)), history.current


@nnx.jit(graph_updates=False)
def _decode_chunk(vae: WanVAE, z: jax.Array, previous: list[jax.Array] | None):
    history = CausalHistory(previous)
    return vae.decoder(vae.post_quant_conv(z), history), history.current


def _blend(a: jax.Array, b: jax.Array, blend: int, axis: int) -> jax.Array:
    """`b` with its first rows (axis 2) or columns (axis 3) faded in from the end of `a` (channels-last)."""
    weights = blend_weights(a.shape[axis], b.shape[axis], blend)
    n = len(weights)
    shape = [1] * b.ndim
    shape[axis] = n
    w = jnp.asarray(weights, b.dtype).reshape(shape)
    tail = jax.lax.slice_in_dim(a, a.shape[axis] - n, a.shape[axis], axis=axis)
    head = tail * (1 - w) + jax.lax.slice_in_dim(b, 0, n, axis=axis) * w
    return jnp.concatenate([head, jax.lax.slice_in_dim(b, n, b.shape[axis], axis=axis)], axis=axis)


class WanVAE(nnx.Module):
    """Wan2.1 VAE: `encode(video) -> latents`, `decode(latents) -> video`, and the latent normalisation."""

    def __init__(
        self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32
    ):
        dt = Dtypes(dtype, param_dtype)
        self.cfg, self.dtype = cfg, dtype
        self.encoder = Encoder(cfg, dt, rngs)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), dt, rngs)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), dt, rngs)
        self.decoder = Decoder(cfg, dt, rngs)

    def encode(self, video: jax.Array, noise: jax.Array | None = None) -> jax.Array:
        """Raw latents `[B, z, f, h, w]` of a video `[B, 3, F, H, W]` in [-1, 1]: the posterior mean, or a sample
        mean + std * noise with the given standard-normal `noise`. Frames past the last full time chunk are dropped
        (f = 1 + (F - 1) // 4)."""
        self.cfg.check_video_shape(video.shape, None if noise is None else noise.shape)
        x = rearrange(jnp.asarray(video, self.dtype), "b c f h w -> b f h w c")
        graphdef, state = nnx.split(self)
        previous, moments = None, []
        for start, stop in encode_chunks(x.shape[1], self.cfg.temporal_factor):
            out, previous = _encode_chunk(graphdef, state, x[:, start:stop], previous)
            moments.append(out)
        mean, logvar = jnp.split(rearrange(jnp.concatenate(moments, axis=1), "b f h w c -> b c f h w"), 2, axis=1)
        if noise is None:
            return mean
        return mean + jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0)) * jnp.asarray(noise, mean.dtype)

    def decode(
        self, latents: jax.Array, tiling: Tiling | None = None, devices: Sequence[jax.Device] | None = None
    ) -> jax.Array:
        """Video `[B, 3, F, H, W]` in [-1, 1] from raw latents `[B, z, f, h, w]` (F = 1 + 4 (f - 1)), one latent
        frame at a time; `tiling` also splits space into blended tiles. Latent frame 0 alone decodes to frame 0.
        With `tiling`, `devices` (local ones) decode the tiles side by side, one tile per device at a time: the same
        frames as one device decoding the same tiles, gathered on the first device."""
        self.cfg.check_latent_shape(latents.shape)
        z = rearrange(jnp.asarray(latents, self.dtype), "b c f h w -> b f h w c")
        _, _, h, w, _ = z.shape
        plan = None if tiling is None else tile_plan(h, w, tiling, self.cfg.spatial_factor)
        video = self._decode_frames(z) if plan is None else self._decode_tiles(z, plan, devices)
        return rearrange(jnp.clip(video, -1.0, 1.0), "b f h w c -> b c f h w")

    def _decode_frames(self, z: jax.Array) -> jax.Array:
        previous, frames = None, []
        for i in range(z.shape[1]):
            out, previous = _decode_chunk(self, z[:, i : i + 1], previous)
            frames.append(out)
        return jnp.concatenate(frames, axis=1)

    def _decode_tiles(self, z: jax.Array, plan: TilePlan, devices: Sequence[jax.Device] | None) -> jax.Array:
        """Decode every tile (in rounds of one tile per device: the tiles of one shape stacked on the batch axis,
        sharded over the devices, zero tiles filling the last round), then blend and crop them."""
        vae, n, sharded, gather = self, 1, None, None
        if devices is not None and len(devices) > 1:
            mesh = Mesh(list(devices), ("tiles",))
            graphdef, state = nnx.split(self)
            vae = nnx.merge(graphdef, jax.device_put(state, NamedSharding(mesh, PartitionSpec())))
            n, sharded = len(devices), NamedSharding(mesh, PartitionSpec("tiles"))
            gather = jax.sharding.SingleDeviceSharding(devices[0])
        b = z.shape[0]
        decoded: dict[tuple[int, int], jax.Array] = {}
        for spots in tile_groups(plan, n):
            parts = [z[:, :, slice(*plan.rows[i]), slice(*plan.cols[j])] for i, j in spots]
            parts += [jnp.zeros_like(parts[0])] * (n - len(parts))
            batch = jnp.concatenate(parts) if n > 1 else parts[0]
            out = vae._decode_frames(batch if sharded is None else jax.device_put(batch, sharded))
            out = out if gather is None else jax.device_put(out, gather)
            decoded |= {spot: out[k * b : (k + 1) * b] for k, spot in enumerate(spots)}
        rows = [[decoded[i, j] for j in range(len(plan.cols))] for i in range(len(plan.rows))]
        for i, row in enumerate(rows):
            for j, tile in enumerate(row):
                if i > 0:
                    tile = _blend(rows[i - 1][j], tile, plan.blend_height, axis=2)
                if j > 0:
                    tile = _blend(row[j - 1], tile, plan.blend_width, axis=3)
                row[j] = tile
        kh, kw = plan.keep_height, plan.keep_width
        video = jnp.concatenate([jnp.concatenate([t[:, :, :kh, :kw] for t in row], axis=3) for row in rows], axis=2)
        return video[:, :, : plan.height, : plan.width]

    def _stats(self) -> tuple[jax.Array, jax.Array]:
        def column(values: tuple[float, ...]) -> jax.Array:
            return jnp.asarray(values, jnp.float32).reshape(1, -1, 1, 1, 1)

        return column(self.cfg.latents_mean), column(self.cfg.latents_std)

    def normalize(self, latents: jax.Array) -> jax.Array:
        """Raw VAE latents -> the per-channel standardised latents the transformer is trained on."""
        mean, std = self._stats()
        return ((latents.astype(jnp.float32) - mean) / std).astype(latents.dtype)

    def denormalize(self, latents: jax.Array) -> jax.Array:
        """Transformer latents -> raw VAE latents (before `decode`)."""
        mean, std = self._stats()
        return (latents.astype(jnp.float32) * std + mean).astype(latents.dtype)


def load_vae(path: str | Path, dtype: jnp.dtype | None = None, *, compute_dtype: jnp.dtype | None = None) -> WanVAE:
    """Load a diffusers `AutoencoderKLWan` folder (e.g. a ContentV pipeline's `vae/`) or a Hugging Face Hub id
    (`ByteDance/ContentV-8B/vae`: its config and safetensors only); dtype defaults to float32."""
    source = open_vae_source(vae_folder(path))
    param_dtype = jnp.dtype(dtype or jnp.float32)
    compute = jnp.dtype(compute_dtype or param_dtype)
    abstract = nnx.eval_shape(lambda: WanVAE(source.config, rngs=nnx.Rngs(0), dtype=compute, param_dtype=param_dtype))
    return fill_from_source(abstract, source, vae_table(source.config))


def save_vae(folder: str | Path, vae: WanVAE, overwrite: bool = False) -> Path:
    """Write `vae` as a diffusers `AutoencoderKLWan` folder (loadable by diffusers and by both backends)."""
    return write_vae_diffusers(folder, vae.cfg, canonical_tensors(vae, vae_table(vae.cfg)), overwrite=overwrite)
