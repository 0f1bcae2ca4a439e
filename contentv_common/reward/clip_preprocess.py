"""CLIP image preprocessing as fixed linear maps, so it is differentiable and identical in both backends.

CLIPImageProcessor resizes the shortest side to `image_size` (PIL bicubic, antialiased) and centre-crops a square.
Both are linear in the pixels: `crop(resize(x)) = R_h @ x @ R_w^T` per channel, with the crop being a slice of the
resize matrices' rows. Building R_h and R_w here (numpy, PIL's filter and support rules) lets either backend apply the
same two small matmuls and then normalise with the CLIP mean and std.
"""

from __future__ import annotations

import math

import numpy as np


def _bicubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (PIL's bicubic, a = -0.5), support 2."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix of PIL-style antialiased bicubic resampling (filter widened when shrinking)."""
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 2.0 * filter_scale
    m = np.zeros((out_size, in_size), dtype=np.float64)
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = _bicubic((taps - center + 0.5) / filter_scale)
        m[i, lo:hi] = w / w.sum()
    return m


def clip_resize_crop_matrices(height: int, width: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(R_h [S, H], R_w [S, W]) float32: shortest side -> image_size, then the centre S x S crop."""
    short, long = min(height, width), max(height, width)
    long_out = int(image_size * long / short)
    out_h, out_w = (image_size, long_out) if height <= width else (long_out, image_size)
    r_h, r_w = resize_matrix(height, out_h), resize_matrix(width, out_w)
    top, left = (out_h - image_size) // 2, (out_w - image_size) // 2
    return (
        r_h[top : top + image_size].astype(np.float32),
        r_w[left : left + image_size].astype(np.float32),
    )


def normalisation(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset) float32 [3] with (x - mean) / std = x * scale + offset."""
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 or not math.isfinite(s) for s in std):
        raise ValueError(f"CLIP mean/std must be 3 values with std > 0, got {mean}, {std}")
    scale = 1.0 / np.asarray(std, dtype=np.float64)
    return scale.astype(np.float32), (-np.asarray(mean, dtype=np.float64) * scale).astype(np.float32)
