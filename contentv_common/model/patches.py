"""Image tokens back to latents, written once for both backends (einops rearranges numpy, JAX and torch arrays)."""

from __future__ import annotations

from typing import Any

from einops import rearrange


def unpatchify(x: Any, latent_shape: tuple[int, ...], patch_size: int) -> Any:
    """Tokens `[B, f h w, p p C]` (frame-major, then rows, then columns) -> latents `[B, C, F, H, W]` of
    `latent_shape`, H = h p and W = w p."""
    _, _, f, h, w = latent_shape
    p = patch_size
    return rearrange(x, "b (f h w) (p q c) -> b c f (h p) (w q)", f=f, h=h // p, w=w // p, p=p, q=p)
