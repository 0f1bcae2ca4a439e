"""Model FLOPs of the MMDiT transformer, counted from its layers (framework-free; used for TFLOP/s and MFU).

Counted: every matmul of the forward pass, 2 FLOPs per multiply-add. With width d, N = image + text tokens per
sample and MLP ratio 4, each block costs

    24 * d^2 * N   linear layers of both streams (q, k, v, out: 4 d^2 and MLP: 8 d^2 multiply-adds per token)
    4 * N^2 * d    joint attention (Q K^T and P V over all heads)

plus small per-sample and embedding terms that `FlopCount` keeps apart: the adaLN linears (per sample, not per
token), the patch-embedding conv, the text (context) embedder, the timestep and pooled-text MLPs and the final
norm and projection. The last block is context-pre-only: its text stream has q, k, v but no output projection and no
MLP. A training step is 3x the forward (backward = 2x forward); recomputation (remat / gradient checkpointing) is
not counted, so MFU compares implementations on the same work. Elementwise ops (norms, GELU, softmax) are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from contentv_common.config.model import ModelConfig
from contentv_common.vae.chunks import encode_chunks
from contentv_common.vae.config import RGB, VAEConfig, encoder_layers, mid_dim

Mode = Literal["train", "sample"]
TRAIN_MULTIPLIER = 3


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one model call, split by where they are spent."""

    stream_linear: float  # q/k/v/out projections and MLPs of the image and text streams, all blocks
    attention: float  # Q K^T and P V of the joint attention, all blocks
    modulation: float  # adaLN linears of the blocks (one row per sample)
    embed: float  # patch conv, context embedder, timestep + pooled MLPs, final adaLN and projection

    @property
    def linear(self) -> float:
        return self.stream_linear + self.modulation + self.embed

    @property
    def forward(self) -> float:
        return self.linear + self.attention

    def step(self, mode: Mode) -> float:
        """FLOPs of one benchmark step: a forward (sampling) or forward + backward (training, 3x forward)."""
        if mode not in ("train", "sample"):
            raise ValueError(f"mode {mode!r} is not 'train' or 'sample'")
        return self.forward * (TRAIN_MULTIPLIER if mode == "train" else 1)


def image_tokens(cfg: ModelConfig, frames: int, height: int, width: int) -> int:
    """Video tokens of a `[C, frames, height, width]` latent: each frame is cut into patch_size^2 patches."""
    p = cfg.patch_size
    if height % p or width % p:
        raise ValueError(f"latent {height}x{width} is not divisible by patch_size {p}")
    return frames * (height // p) * (width // p)


def transformer_flops(cfg: ModelConfig, image_tokens: int, text_tokens: int, batch: int = 1) -> FlopCount:
    """Forward FLOPs of `cfg`'s transformer on `batch` samples of `image_tokens` + `text_tokens` tokens."""
    for name, value in (("image_tokens", image_tokens), ("text_tokens", text_tokens), ("batch", batch)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    d, layers, r = cfg.hidden_size, cfg.num_layers, cfg.mlp_ratio
    ni, nt = image_tokens, text_tokens
    n = ni + nt
    per_token = 4 * d * d + 2 * r * d * d  # q, k, v, out + MLP of one stream
    full_blocks = layers - 1
    stream_macs = full_blocks * n * per_token + (ni * per_token + nt * 3 * d * d)  # last: text q, k, v only
    attention_macs = layers * 2 * n * n * d
    modulation_macs = full_blocks * 12 * d * d + (6 * d * d + 2 * d * d)  # last: text adaLN has shift, scale only
    patch = cfg.patch_size**2
    embed_macs = (
        ni * cfg.in_channels * patch * d  # patch-embedding conv
        + nt * cfg.joint_attention_dim * d  # context embedder
        + cfg.timestep_channels * d
        + d * d  # timestep MLP
        + cfg.pooled_projection_dim * d
        + d * d  # pooled-text MLP
        + 2 * d * d  # final adaLN
        + ni * d * patch * cfg.out_channels  # final projection
    )
    return FlopCount(
        stream_linear=2.0 * batch * stream_macs,
        attention=2.0 * batch * attention_macs,
        modulation=2.0 * batch * modulation_macs,
        embed=2.0 * batch * embed_macs,
    )


def headline_forward_flops(cfg: ModelConfig, tokens: int, batch: int = 1) -> float:
    """The short formula quoted in docs/benchmarks.md: num_layers * (24 d^2 N + 4 N^2 d) per sample.

    Within 1% of `transformer_flops` at ContentV sizes; reports use the exact count.
    """
    d = cfg.hidden_size
    per_token = 2 * (4 + 2 * cfg.mlp_ratio) * d * d  # = 24 d^2 at MLP ratio 4
    return float(batch * cfg.num_layers * (per_token * tokens + 4 * tokens * tokens * d))


def text_encoder_flops(configs: tuple, clip_tokens: int, t5_tokens: int, batch: int = 1) -> float:
    """Forward FLOPs of SD3.5's three text encoders (contentv_common.text.encoder_table configs: CLIP-L, CLIP-G, T5)
    on `batch` prompts: every layer's linears and attention, and each CLIP's projection of its pooled token."""
    *clips, t5 = configs
    macs = 0
    for c in clips:
        d, ff, n = c.text.hidden_size, c.text.intermediate_size, clip_tokens
        macs += c.text.num_hidden_layers * (n * (4 * d * d + 2 * d * ff) + 2 * n * n * d) + d * c.projection_dim
    d, inner, ff, n = t5.d_model, t5.inner_dim, t5.d_ff, t5_tokens
    macs += t5.num_layers * (n * (4 * d * inner + 3 * d * ff) + 2 * n * n * inner)
    return 2.0 * batch * macs


def vae_encode_flops(cfg: VAEConfig, frames: int, height: int, width: int, batch: int = 1) -> float:
    """Forward FLOPs of the Wan VAE encoding `batch` clips of `frames` x `height` x `width`, chunk by chunk as both
    backends run it (frame 0 alone, then `temporal_factor` frames after the causal history, which convolves zeros
    before frame 0): every conv (bias adds uncounted) and the middle block's single-head attention over each frame's
    pixels. Norms and activations are not counted."""
    macs = 0
    k3 = 27  # a 3x3x3 kernel
    mid = mid_dim(cfg)
    for start, stop in encode_chunks(frames, cfg.temporal_factor):
        t, h, w = stop - start, height, width
        macs += t * h * w * RGB * cfg.base_dim * k3  # conv_in
        for layer in encoder_layers(cfg):
            if layer.kind == "residual":
                a, b = layer.in_dim, layer.out_dim
                macs += t * h * w * (k3 * (a * b + b * b) + (a * b if a != b else 0))
                continue
            h, w = h // 2, w // 2  # 3x3 stride 2 (sizes are multiples of 8)
            macs += t * h * w * layer.out_dim**2 * 9
            if layer.kind == "downsample3d" and start > 0:  # the last frame before the chunk, then stride 2
                t = (t + 1 - 3) // 2 + 1
                macs += t * h * w * layer.out_dim**2 * 3
        s = h * w
        macs += 2 * t * s * k3 * 2 * mid * mid  # the middle block's two residual blocks
        macs += t * (s * 4 * mid * mid + 2 * s * s * mid)  # its attention: q, k, v, out; Q K^T and P V
        macs += t * s * (k3 * mid * 2 * cfg.z_dim + (2 * cfg.z_dim) ** 2)  # conv_out, quant_conv
    return 2.0 * batch * macs
