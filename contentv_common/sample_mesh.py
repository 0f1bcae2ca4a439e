"""The sampling mesh, `--mesh data=D,sequence=S,cfg=C`, framework-free: parsing, the checks made before any model
loads, and the order of the guidance pair's rows that puts the cond/uncond halves on their device groups.

Both backends lay it out as the training mesh (data, fsdp, sequence, tensor) = (D x C, 1, S, 1): the rows of a
forward are split over the `data` axis, image tokens over `sequence` (Ulysses, heads padded as in training). Rows
are ordered data group by data group, each group's uncond rows then its cond rows, so data shard `d * C + c` holds
group d's uncond (c = 0) or cond (c = 1) rows with cfg=2, and both with cfg=1. A data group's devices are adjacent
(on one host where they fit), so the exchange guidance needs each step stays inside the group.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from einops import rearrange

from contentv_common.config.recipe import MeshConfig
from contentv_common.model.sequence_split import check_sequence_split

MESH_KEYS = ("data", "sequence", "cfg")


@dataclass(frozen=True)
class SampleMesh:
    """Devices of a sampling run: `data` prompt groups x `sequence` ranks splitting the image tokens x `cfg` (1, or
    2: uncond and cond rows on two device groups)."""

    data: int = 1
    sequence: int = 1
    cfg: int = 1

    @property
    def devices(self) -> int:
        return self.data * self.sequence * self.cfg

    @property
    def config(self) -> MeshConfig:
        """The training mesh that lays it out: the data axis holds data x cfg shards (the cfg index innermost)."""
        return MeshConfig(data=self.data * self.cfg, sequence=self.sequence)

    def __str__(self) -> str:
        return f"data={self.data},sequence={self.sequence},cfg={self.cfg}"


ONE_DEVICE = SampleMesh()  # sampling without a mesh: one device, the pair's rows as diffusers batches them


def parse_mesh(text: str) -> SampleMesh:
    """`data=D,sequence=S,cfg=C` (any order, any subset; missing sizes are 1) -> SampleMesh; argparse's type."""
    sizes: dict[str, int] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in MESH_KEYS or key in sizes or not value.strip().isdigit() or int(value) < 1:
            raise argparse.ArgumentTypeError(
                f"--mesh {text!r}: give {', '.join(f'{k}=N' for k in MESH_KEYS)} with N >= 1, each once "
                f"(bad item {item!r})"
            )
        sizes[key] = int(value)
    if sizes.get("cfg", 1) > 2:
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: cfg is 1 or 2 (the uncond and cond rows)")
    return SampleMesh(**sizes)


def check_mesh_devices(mesh: SampleMesh, devices: int) -> None:
    """ValueError (one line) unless the mesh's sizes multiply to the `devices` count."""
    if mesh.devices != devices:
        raise ValueError(f"--mesh {mesh}: data x sequence x cfg = {mesh.devices} does not match the {devices} devices")


def check_sample_mesh(mesh: SampleMesh, image_tokens: int, heads: int, guided: bool, batch: int) -> None:
    """ValueError (one line) unless the mesh can sample: the image tokens split over `sequence` as training requires
    (text tokens stay whole: any count), `cfg=2` has the guidance pair to split, `data` divides the `batch` of
    prompts denoised together, and every sequence rank holds a head."""
    if mesh.cfg == 2 and not guided:
        raise ValueError(f"--mesh {mesh}: cfg=2 splits the guidance pair, but --guidance <= 1 runs no uncond branch")
    if batch % mesh.data:
        raise ValueError(f"--mesh {mesh}: --batch-size {batch} does not split over data={mesh.data}")
    if mesh.sequence > heads:
        raise ValueError(f"--mesh {mesh}: sequence={mesh.sequence} exceeds the model's {heads} heads (Ulysses)")
    check_sequence_split(image_tokens, 1, heads, mesh.config)


def pair_rows(uncond: Any, cond: Any, mesh: SampleMesh) -> Any:
    """The guidance pair's rows of one forward, [B] + [B] -> [2B], in the data shards' order (numpy, JAX or torch):
    data group by data group, its uncond rows then its cond rows (on one device: all uncond, then all cond)."""
    return rearrange([uncond, cond], "m (d b) ... -> (d m b) ...", d=mesh.data)


def split_pair(rows: Any, mesh: SampleMesh) -> tuple[Any, Any]:
    """`pair_rows` undone: [2B] rows -> (uncond [B], cond [B])."""
    pair = rearrange(rows, "(d m b) ... -> m (d b) ...", d=mesh.data, m=2)
    return pair[0], pair[1]
