"""Fixed sin-cos position tables, written once against the numpy API (float32 result).

`xp` is numpy (float64 maths, the reference the tests hold the backends to) or jax.numpy (float32 maths computed on
device inside jit, so an 8B run does not embed a 400 MB constant in the executable; the torch twin computes the same
float32 factors on its device). The formulas follow diffusers' `get_1d/2d/3d_sincos_pos_embed`; tests compare both
variants against diffusers itself.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np


def _float(xp: ModuleType):
    return np.float64 if xp is np else xp.float32


def sincos_1d(dim: int, positions, xp: ModuleType = np):
    """[M, dim]: sin of positions x frequencies in the first half, cos in the second."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (xp.arange(dim // 2, dtype=_float(xp)) / (dim / 2.0))
    out = xp.outer(positions.reshape(-1).astype(_float(xp)), omega)
    return xp.concatenate([xp.sin(out), xp.cos(out)], axis=1)


def sincos_2d(dim: int, rows, cols, xp: ModuleType = np):
    """[len(rows) * len(cols), dim], row-major; the first half encodes the column, the second the row (diffusers)."""
    col_grid, row_grid = xp.meshgrid(cols, rows, indexing="xy")
    return xp.concatenate([sincos_1d(dim // 2, col_grid, xp), sincos_1d(dim // 2, row_grid, xp)], axis=1)


def sincos_3d_table(
    dim: int,
    frames: int,
    height: int,
    width: int,
    spatial_scale: float = 0.5,
    temporal_scale: float = 1.0,
    xp: ModuleType = np,
):
    """ContentV's table, [frames * height * width, dim] in (frame, row, col) order: [temporal 1/4 | spatial 3/4]."""
    rows = xp.arange(height, dtype=xp.float32) / np.float32(spatial_scale)
    cols = xp.arange(width, dtype=xp.float32) / np.float32(spatial_scale)
    spatial = sincos_2d(3 * dim // 4, rows, cols, xp)  # [h*w, 3d/4]
    temporal = sincos_1d(dim // 4, xp.arange(frames, dtype=xp.float32) / np.float32(temporal_scale), xp)  # [f, d/4]
    table = xp.concatenate(
        [
            xp.repeat(temporal[:, None, :], height * width, axis=1),
            xp.repeat(spatial[None, :, :], frames, axis=0),
        ],
        axis=-1,
    )
    return table.reshape(frames * height * width, dim).astype(xp.float32)


def sd3_table(dim: int, max_size: int, sample_size: int, patch_size: int) -> np.ndarray:
    """SD3's persistent 2D table, [1, max_size**2, dim] (the `pos_embed.pos_embed` buffer of SD3 checkpoints)."""
    base = sample_size // patch_size
    grid = np.arange(max_size, dtype=np.float32) / np.float32(max_size / base)
    return sincos_2d(dim, grid, grid).astype(np.float32)[None]


def crop_sd3_table(table, max_size: int, height: int, width: int):
    """Centre crop of the [1, max_size**2, dim] table to height x width patches (works on numpy/jax/torch arrays)."""
    top, left = (max_size - height) // 2, (max_size - width) // 2
    grid = table.reshape(max_size, max_size, table.shape[-1])
    return grid[top : top + height, left : left + width, :].reshape(height * width, table.shape[-1])
