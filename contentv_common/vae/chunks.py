"""How the causal VAE walks through time and space, framework-free: the causal history, time chunks, spatial tiles.

A video is processed chunk by chunk (encode: frame 0 alone, then `temporal_factor` frames at a time; decode: one
latent frame at a time). Every causal layer keeps the last input frames it saw in a `CausalHistory`, so a chunk sees
exactly the context the whole video would have given it and memory holds one chunk, not the video.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class CausalHistory:
    """The frames each causal layer remembers from the previous chunk, read and replaced in call order.

    `previous` is None for the first chunk of a video (layers then see zeros before frame 0, i.e. causal padding);
    otherwise it is the `current` list of the previous chunk. Layers run in the same order every chunk, so the n-th
    `take` gets what the n-th `give` stored one chunk earlier.
    """

    def __init__(self, previous: list[Any] | None = None):
        self.previous = previous
        self.current: list[Any] = []
        self._read = 0

    @property
    def first(self) -> bool:
        return self.previous is None

    def take(self) -> Any | None:
        """This layer's frames from the previous chunk (None in the first chunk)."""
        if self.previous is None:
            return None
        if self._read >= len(self.previous):
            raise RuntimeError("causal history: more layers read than the previous chunk stored")
        self._read += 1
        return self.previous[self._read - 1]

    def give(self, frames: Any) -> None:
        """Store this layer's frames for the next chunk."""
        self.current.append(frames)


def encode_chunks(frames: int, temporal_factor: int) -> list[tuple[int, int]]:
    """(start, stop) frame ranges: frame 0 alone, then `temporal_factor` frames each; trailing extra frames dropped."""
    n = (frames - 1) // temporal_factor
    return [(0, 1)] + [(1 + k * temporal_factor, 1 + (k + 1) * temporal_factor) for k in range(n)]


@dataclass(frozen=True)
class Tiling:
    """Spatial tiles for decoding, in pixels (the defaults are diffusers `AutoencoderKLWan.enable_tiling`'s).

    Tiles of `tile_height x tile_width` start every `stride_height` / `stride_width` pixels; overlaps are blended
    linearly (the tile above and the tile to the left fade out), exactly as diffusers' `tiled_decode` does.
    """

    tile_height: int = 256
    tile_width: int = 256
    stride_height: int = 192
    stride_width: int = 192

    def __post_init__(self) -> None:
        for axis in ("height", "width"):
            tile, stride = getattr(self, f"tile_{axis}"), getattr(self, f"stride_{axis}")
            if not 0 < stride <= tile:
                raise ValueError(f"Tiling: stride_{axis}={stride} must be in (0, tile_{axis}={tile}]")


@dataclass(frozen=True)
class TilePlan:
    """Where the latent tiles are and how their decoded pixels are blended and cropped."""

    rows: tuple[tuple[int, int], ...]  # latent (start, stop) along H
    cols: tuple[tuple[int, int], ...]  # latent (start, stop) along W
    blend_height: int  # pixels blended with the tile above
    blend_width: int  # pixels blended with the tile to the left
    keep_height: int  # pixels kept from each tile (its stride) before the final crop
    keep_width: int
    height: int  # output pixels
    width: int


def tile_plan(latent_height: int, latent_width: int, tiling: Tiling, spatial_factor: int) -> TilePlan | None:
    """The tiles for a latent of this size, or None when it fits in one tile (decode it whole)."""
    s = spatial_factor
    for name in ("tile_height", "tile_width", "stride_height", "stride_width"):
        if getattr(tiling, name) % s:
            raise ValueError(f"Tiling: {name}={getattr(tiling, name)} is not a multiple of the VAE's {s}x upsampling")
    tile_h, tile_w = tiling.tile_height // s, tiling.tile_width // s
    if latent_height <= tile_h and latent_width <= tile_w:
        return None
    step_h, step_w = tiling.stride_height // s, tiling.stride_width // s
    return TilePlan(
        rows=tuple((i, min(i + tile_h, latent_height)) for i in range(0, latent_height, step_h)),
        cols=tuple((j, min(j + tile_w, latent_width)) for j in range(0, latent_width, step_w)),
        blend_height=tiling.tile_height - tiling.stride_height,
        blend_width=tiling.tile_width - tiling.stride_width,
        keep_height=tiling.stride_height,
        keep_width=tiling.stride_width,
        height=latent_height * s,
        width=latent_width * s,
    )


def blend_weights(size_a: int, size_b: int, blend: int) -> list[float]:
    """Weights of the incoming tile over the overlap (the previous tile gets 1 - w); diffusers' blend_v / blend_h."""
    extent = min(size_a, size_b, blend)
    return [y / extent for y in range(extent)]


def tile_groups(plan: TilePlan, devices: int) -> list[list[tuple[int, int]]]:
    """The (row, col) tiles in rounds of at most `devices` tiles of one shape (decoded side by side, one per device),
    in row-major order of each shape's first tile; one device: one tile per round."""
    shapes: dict[tuple[int, int], list[tuple[int, int]]] = {}
    for i, (r0, r1) in enumerate(plan.rows):
        for j, (c0, c1) in enumerate(plan.cols):
            shapes.setdefault((r1 - r0, c1 - c0), []).append((i, j))
    return [spots[k : k + devices] for spots in shapes.values() for k in range(0, len(spots), devices)]
