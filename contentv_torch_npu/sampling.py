"""Text-to-video sampling with the torch transformer: flow-match Euler + classifier-free guidance.

The twin of contentv_jax/sampling.py: the same numpy schedule, noise and update rule, so both backends walk the same
trajectory from the same seed. On a sampling mesh (`--mesh data=D,sequence=S,cfg=C` under torchrun, one rank per
device, contentv_common.sample_mesh) the ranks are laid out as the training mesh (data x cfg, sequence): rank
`(d * C + c) * S + s`; each data shard's S ranks run the forward on its rows of the guidance pair with Ulysses over
their tokens (contentv_torch_npu.distributed), the velocities are gathered from every shard, and every rank takes
the same Euler step on the whole latents.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from contentv_common.sample_mesh import ONE_DEVICE, SampleMesh, pair_rows, split_pair
from contentv_common.sampling import StepFn, euler_step, flow_match_sampler, guide
from contentv_torch_npu.distributed import Topology, enable_sequence_parallel, init_distributed
from contentv_torch_npu.loading import load_transformer


@cache
def topology(device: str, mesh: SampleMesh) -> Topology:
    """The torchrun world as the sampling mesh's process groups (joined once per process)."""
    return init_distributed(device, mesh.config)


def load_sampling_transformer(path: Path, dtype: torch.dtype, device: str, mesh: SampleMesh) -> torch.nn.Module:
    """A checkpoint's transformer on this rank's device, whole (replicated over the mesh), with Ulysses over its
    sequence group when `mesh.sequence > 1`."""
    topo = topology(device, mesh)
    model = load_transformer(path, dtype=dtype, device=topo.device).eval()
    if topo.sp_group is not None:
        enable_sequence_parallel(model, topo.sp_group, topo.device.type)
    return model


def shard_rows(rows: int, layout: SampleMesh) -> slice:
    """This rank's data shard of a forward's `rows` (all of them on one device): shard `rank // sequence` of the
    `data x cfg` shards."""
    if layout.devices == 1:
        return slice(None)
    shard, shards = dist.get_rank() // layout.sequence, layout.cfg * layout.data
    return slice(shard * rows // shards, (shard + 1) * rows // shards)


def _gather_rows(rows: torch.Tensor, mesh: SampleMesh) -> torch.Tensor:
    """Every data shard's rows (each rank's, the sequence ranks of a shard holding the same), in shard order."""
    out = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
    dist.all_gather(out, rows.contiguous())
    return torch.cat(out[:: mesh.sequence])


def guided_velocity(
    model: torch.nn.Module,
    x: torch.Tensor,
    timestep: float,
    text: torch.Tensor,
    pooled: torch.Tensor,
    guided: bool,
    guidance: float,
    layout: SampleMesh = ONE_DEVICE,
) -> torch.Tensor:
    """The velocity of one sampler step, for every sampler (`sample`, training's in-loop clips, reward rollouts):
    with guidance, the latents' cond/uncond rows in `layout`'s order (contentv_common.sample_mesh), this rank's data
    shard of them (`text`, `pooled`: the shard's rows, `shard_rows`) in one forward, every shard's velocities
    gathered, then guided."""
    rows = pair_rows(x, x, layout) if guided else x
    inputs = rows[shard_rows(len(rows), layout)]
    timesteps = torch.full((inputs.shape[0],), float(timestep), device=x.device)
    velocity = model(inputs, timesteps, text, pooled).float()
    if layout.devices > 1 and layout.data * layout.cfg > 1:
        velocity = _gather_rows(velocity, layout)
    return guide(*split_pair(velocity, layout), guidance) if guided else velocity


def _prepare(
    model: torch.nn.Module,
    noise: np.ndarray,
    text: np.ndarray,
    pooled: np.ndarray,
    guided: bool,
    guidance: float,
    mesh: SampleMesh | None,
) -> tuple[torch.Tensor, StepFn]:
    """The torch half of `sample` (contentv_common.sampling.flow_match_sampler): this rank's rows of the forward
    on the model's device, and one guided Euler step on the whole latents."""
    layout = mesh or ONE_DEVICE
    device = next(model.parameters()).device
    mine = shard_rows(len(text), layout)
    text = torch.as_tensor(np.asarray(text[mine], np.float32), device=device)
    pooled = torch.as_tensor(np.asarray(pooled[mine], np.float32), device=device)

    def step(x: torch.Tensor, timestep: np.float32, dt: np.float32) -> torch.Tensor:
        return euler_step(
            x, guided_velocity(model, x, float(timestep), text, pooled, guided, guidance, layout), float(dt)
        )

    return torch.as_tensor(np.asarray(noise, np.float32), device=device), step


# not inference_mode: FSDP keeps its all-gather buffers across calls, and training reuses them
sample = torch.no_grad()(flow_match_sampler(_prepare, lambda x: x.cpu().numpy(), "sampling (torch)"))
