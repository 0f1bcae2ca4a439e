"""The sequence-parallel rule of the JAX core (Ulysses with padded heads), framework-free so recipes and the planner
can check a bucket against a mesh before anything is compiled.

Image tokens are split over the mesh axis `sequence`; inside attention one all-to-all trades that split for a split of
the heads over sequence x tensor, so heads are zero-padded to a multiple of sequence x tensor there (38 heads: 38 at
degree 2, 40 at 4 or 8). Text tokens (333 for ContentV) stay whole on every device: their count is free.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MESH_AXES = ("data", "fsdp", "sequence", "tensor")


def mesh_sizes(mesh: Any) -> dict[str, int]:
    """{axis: size} of a MeshConfig (shape is a tuple), a jax Mesh (shape is a mapping) or a plain mapping."""
    if isinstance(mesh, Mapping):
        return {a: int(mesh.get(a, 1)) for a in MESH_AXES}
    shape = mesh.shape
    if isinstance(shape, Mapping):
        return {a: int(shape.get(a, 1)) for a in MESH_AXES}
    return dict(zip(MESH_AXES, map(int, shape), strict=True))


def padded_heads(heads: int, sequence: int, tensor: int) -> int:
    """Heads inside attention: zero-padded to a multiple of sequence x tensor (padded heads are sliced off after)."""
    split = sequence * tensor
    return -(-heads // split) * split


def check_sequence_split(tokens_image: int, tokens_text: int, heads: int, mesh: Any) -> None:
    """Raise ValueError (naming the dimension and the mesh axis) when the mesh's sequence split cannot run.

    `tokens_image` = frames x (height / patch) x (width / patch) of the latent; it must divide by `sequence`.
    """
    sizes = mesh_sizes(mesh)
    seq = sizes["sequence"]
    for name, value in (("image tokens", tokens_image), ("text tokens", tokens_text), ("heads", heads)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if tokens_image % seq:
        raise ValueError(
            f"image tokens {tokens_image} do not split over mesh axis sequence={seq} (remainder {tokens_image % seq});"
            f" choose a bucket whose frames x height x width in patches divides by {seq}, or a smaller sequence axis"
        )
