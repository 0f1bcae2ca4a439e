"""One deterministic stand-in for contentv_torch_npu.encoders.Encoders, shared by the data and training tests.

It has the tiny model's widths and the real model's text layout: frames are 8x8 average-pooled (4-frame temporal
stride) through a fixed projection; each caption seeds its own random text embedding (from its bytes, so every process
and run agrees) of 333 tokens as SD3.5 lays them out: 77 CLIP tokens (the two CLIPs' 16 + 24 features, zero-padded to
the T5 width) followed by 256 T5 tokens.
"""

import numpy as np

CLIP_TOKENS, T5_TOKENS, CLIP_WIDTH = 77, 256, 40


class StandInEncoders:
    latent_channels, text_dim, pooled_dim = 16, 48, 24
    text_tokens = CLIP_TOKENS + T5_TOKENS  # 333, as the real and the tiny encoders

    def __init__(self):
        self.proj = np.random.default_rng(0).standard_normal((3, self.latent_channels)).astype(np.float32)

    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        x = frames.astype(np.float32)[:, ::4] / 127.5 - 1.0  # [B, f, H, W, 3], f = 1 + (F - 1) // 4
        b, f, h, w, _ = x.shape
        x = x.reshape(b, f, h // 8, 8, w // 8, 8, 3).mean(axis=(3, 5))
        return np.ascontiguousarray((x @ self.proj).transpose(0, 4, 1, 2, 3))

    def encode_text(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = [np.random.default_rng(list(c.encode()) or [0]) for c in captions]
        text = np.stack([r.standard_normal((self.text_tokens, self.text_dim)) for r in rows]).astype(np.float32)
        text[:, :CLIP_TOKENS, CLIP_WIDTH:] = 0.0  # SD3 zero-pads the CLIP features to the T5 width
        pooled = np.stack([r.standard_normal(self.pooled_dim) for r in rows]).astype(np.float32)
        return text, pooled
