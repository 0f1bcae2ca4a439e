"""Fixed sin-cos position tables in numpy (float64 maths, float32 result), shared by both backends.

Both backends add the same table, so position embeddings can never be a source of cross-framework drift. The formulas
follow diffusers' `get_1d/2d/3d_sincos_pos_embed` (tests compare against diffusers itself).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[M, dim]: sin of positions x frequencies in the first half, cos in the second."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """[len(rows) * len(cols), dim], row-major; the first half encodes the column, the second the row (diffusers)."""
    col_grid, row_grid = np.meshgrid(cols, rows, indexing="xy")
    return np.concatenate([sincos_1d(dim // 2, col_grid), sincos_1d(dim // 2, row_grid)], axis=1)


@lru_cache(maxsize=64)
def sincos_3d(
    dim: int, frames: int, height: int, width: int, spatial_scale: float = 0.5, temporal_scale: float = 1.0
) -> np.ndarray:
    """ContentV's table, [frames * height * width, dim] in (frame, row, col) order: [temporal 1/4 | spatial 3/4]."""
    rows = np.arange(height, dtype=np.float32) / np.float32(spatial_scale)
    cols = np.arange(width, dtype=np.float32) / np.float32(spatial_scale)
    spatial = sincos_2d(3 * dim // 4, rows, cols)  # [h*w, 3d/4]
    temporal = sincos_1d(dim // 4, np.arange(frames, dtype=np.float32) / np.float32(temporal_scale))  # [f, d/4]
    table = np.concatenate(
        [
            np.repeat(temporal[:, None, :], height * width, axis=1),
            np.repeat(spatial[None, :, :], frames, axis=0),
        ],
        axis=-1,
    )
    table = table.reshape(frames * height * width, dim).astype(np.float32)
    table.setflags(write=False)
    return table


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
