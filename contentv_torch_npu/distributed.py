"""Multi-process training of the torch twin: process groups, FSDP2 / HSDP sharding, Ulysses sequence parallel.

The world is the recipe's mesh `data x fsdp x sequence`, laid out like the JAX mesh (sequence fastest): rank
`(d * fsdp + f) * sequence + s`. Ranks `[i*sequence, (i+1)*sequence)` form one sequence-parallel group that sees the
same batch and splits its tokens; the `data x fsdp` groups each load their own slice of the global batch.
Parameters (with their AdamW moments and EMA) are sharded over fsdp x sequence (ZeRO-3: the sequence ranks split the
weights as they split the tokens) and replicated over `mesh.data`: with `data > 1` that is FSDP2's hybrid sharding
(HSDP) on a 2-D DeviceMesh (replicate=data, shard=fsdp x sequence), pure replication when the shard side has one
rank; with `data == 1` or `mesh.shard_data` plain FSDP over every rank.
Ulysses works without changing the model's math: forward hooks pad the image and text tokens to a multiple of the
group size and keep each rank's slice after the embeddings, and gather the image tokens (padding cut off) after the
output projection; an `Ops` wrapper turns the joint attention into all-to-all (tokens -> heads), full attention for
`ceil(heads / sp)` heads over the real tokens only (padding tokens dropped, so they are never attended to), all-to-all
back. Heads are padded with zero heads up to a multiple of the group size inside attention and sliced off after, so
ContentV's 38 heads and 333 text tokens run at any sequence degree up to 38. Token order inside attention does not
matter (no mask, positions are added at the embedding), so the interleaved [image_i; text_i] layout is exact.
A model input that is itself differentiated (reward backprop through chained sampler steps) gets its gradient
summed over the group, since each rank's is only its tokens' share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.hooks import RemovableHandle

from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import MeshConfig
from contentv_torch_npu import device as device_mod
from contentv_torch_npu.ops import Ops, ops_for
from contentv_torch_npu.transformer import Transformer


@dataclass(frozen=True)
class Topology:
    """This process's place in the `data x fsdp x sp` world; `sp_group` is None without sequence parallelism and
    `shard_mesh` (the DeviceMesh FSDP2 shards over) is None in a single process."""

    rank: int = 0
    world: int = 1
    sp: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sp_group: dist.ProcessGroup | None = None
    shard_mesh: DeviceMesh | None = None

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def all_ok(ok: bool, topo: Topology) -> bool:
    """True on every rank when `ok` is true on every rank (a collective: no rank is left waiting)."""
    if topo.world == 1:
        return ok
    flag = torch.tensor([int(ok)], device=topo.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def check_mesh(mesh: MeshConfig, world: int, model: ModelConfig | None = None) -> None:
    """The mesh must cover the world exactly; the torch twin has no tensor parallelism; every rank of a sequence
    group must hold at least one real attention head (heads are padded up to a multiple of `mesh.sequence`)."""
    if model is not None and mesh.sequence > model.num_attention_heads:
        raise ValueError(
            f"mesh.sequence {mesh.sequence} exceeds num_attention_heads {model.num_attention_heads}: Ulysses gives "
            f"each sequence rank ceil(heads / sequence) heads, so at most {model.num_attention_heads} ranks"
        )
    if mesh.tensor != 1:
        raise ValueError(f"mesh.tensor: the torch twin has no tensor parallelism (got {mesh.tensor})")
    size = mesh.data * mesh.fsdp * mesh.sequence
    if size != world:
        raise ValueError(
            f"mesh.data {mesh.data} x mesh.fsdp {mesh.fsdp} x mesh.sequence {mesh.sequence} = {size} processes, "
            f"but the world size is {world} (launch {size} processes with torchrun, or change the recipe's mesh)"
        )


def sequence_groups(mesh: MeshConfig) -> list[list[int]]:
    """The ranks of each Ulysses group: consecutive runs of `mesh.sequence` ranks."""
    world = mesh.data * mesh.fsdp * mesh.sequence
    return [list(range(start, start + mesh.sequence)) for start in range(0, world, mesh.sequence)]


def shard_mesh_shape(mesh: MeshConfig) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """FSDP2's mesh: (replicate=data, shard=fsdp x sequence) for HSDP when `data > 1`, else 1-D over all ranks
    (also with `mesh.shard_data`: the state sharded over every rank)."""
    shard = mesh.fsdp * mesh.sequence
    if mesh.data > 1 and not mesh.shard_data:
        return (mesh.data, shard), ("data", "shard")
    return (mesh.data * shard,), ("shard",)


def init_distributed(
    device_name: str = "auto", mesh: MeshConfig | None = None, model: ModelConfig | None = None
) -> Topology:
    """Join the torchrun world (RANK / WORLD_SIZE / LOCAL_RANK), backend by device: hccl, nccl or gloo, and build
    the recipe mesh's process groups. A single process without torchrun variables runs without a process group.
    `model` checks the mesh against the model before any process group starts."""
    mesh = mesh or MeshConfig()
    device = device_mod.resolve_device(device_name)
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    check_mesh(mesh, world, model)
    if world == 1 and not dist.is_initialized():
        return Topology(device=device)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = device_mod.local_device(device, local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=device_mod.dist_backend(device), rank=rank, world_size=world)
    rank = dist.get_rank()
    sp_group = None
    if mesh.sequence > 1:
        for ranks in sequence_groups(mesh):  # every rank must create every group, in the same order
            group = dist.new_group(ranks)
            if rank in ranks:
                sp_group = group
    shape, names = shard_mesh_shape(mesh)
    return Topology(
        rank=rank,
        world=world,
        sp=mesh.sequence,
        device=device,
        sp_group=sp_group,
        shard_mesh=init_device_mesh(device.type, shape, mesh_dim_names=names),
    )


def shard_model(model: Transformer, mesh: DeviceMesh | None = None, reshard_after_forward: bool = True) -> Transformer:
    """FSDP2 (1-D `mesh`) or HSDP (2-D): one `fully_shard` unit per joint block (gathered just in time), then the
    root for the rest. `mesh` None shards over the whole default process group."""
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Split `x` along `scatter_dim` into one chunk per rank, exchange, concatenate what arrives along `gather_dim`."""
    size = dist.get_world_size(group)
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """Differentiable `_all_to_all`: the gradient takes the inverse exchange."""

    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int, group):
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


class _Slice(torch.autograd.Function):
    """Keep this rank's chunk of a replicated tensor; the gradient is zero outside the chunk."""

    @staticmethod
    def forward(ctx, x, dim: int, group):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.dim, ctx.shape, ctx.rank = dim, x.shape, rank
        return x.chunk(size, dim=dim)[rank].contiguous()

    @staticmethod
    def backward(ctx, grad):
        full = grad.new_zeros(ctx.shape)
        n = grad.shape[ctx.dim]
        full.narrow(ctx.dim, ctx.rank * n, n).copy_(grad)
        return full, None, None


class _Gather(torch.autograd.Function):
    """Concatenate every rank's chunk; each rank then computes the same loss, so the gradient of a chunk is the
    matching slice of the (identical) full gradient, not a sum over ranks."""

    @staticmethod
    def forward(ctx, x, dim: int, group):
        ctx.dim, ctx.group = dim, group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(size, dim=ctx.dim)[rank].contiguous(), None, None


class _SumGradients(torch.autograd.Function):
    """Identity on an input every rank of the group holds; the gradient is summed over the group (each rank's is
    its tokens' share), so every rank gets the whole, identical gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def padded(n: int, size: int) -> int:
    """`n` rounded up to a multiple of `size`."""
    return -(-n // size) * size


@dataclass
class SequenceLengths:
    """The real (unpadded) image and text token counts of the current forward, written by the split hooks and read
    by the attention (also when activation checkpointing recomputes a block in the backward pass)."""

    image: int = 0
    text: int = 0


def real_positions(size: int, image: int, text: int, device: torch.device | None = None) -> torch.Tensor | None:
    """Indices of the real tokens in the sequence the all-to-all assembles (rank r's chunk is its padded image slice,
    then its padded text slice), ascending; None when nothing is padded. Built from ranges (no data-dependent ops),
    so it also traces under FakeTensorMode."""
    ni, nt = padded(image, size) // size, padded(text, size) // size
    if ni * size == image and nt * size == text:
        return None
    pieces = []
    for rank in range(size):
        start = rank * (ni + nt)
        pieces.append(torch.arange(start, start + min(ni, max(image - rank * ni, 0)), device=device))
        pieces.append(torch.arange(start + ni, start + ni + min(nt, max(text - rank * nt, 0)), device=device))
    return torch.cat(pieces)


@dataclass(frozen=True)
class UlyssesOps:
    """Sequence-parallel attention around any `Ops`: tokens are split over the group, heads are split inside."""

    inner: Ops
    group: dist.ProcessGroup
    lengths: SequenceLengths = field(default_factory=SequenceLengths)
    name: str = "ulysses"

    def attention(self, q, k, v, mask=None, dropout=0.0):
        """q, k, v: [B, heads, N_local, d] -> zero heads up to a multiple of sp -> all-to-all -> [B, heads_p / sp,
        N_padded, d] -> padding tokens dropped -> attention -> padding restored -> all-to-all back -> real heads."""
        if mask is not None:
            raise ValueError("Ulysses sequence parallel attention takes no mask (the joint attention has none)")
        size, (_, heads, n_local, _) = dist.get_world_size(self.group), q.shape
        image, text = self.lengths.image, self.lengths.text
        expected = (padded(image, size) + padded(text, size)) // size
        if n_local != expected:
            raise ValueError(f"Ulysses attention got {n_local} local tokens, the split hooks give {expected}")
        extra = padded(heads, size) - heads
        if extra:
            q, k, v = (F.pad(t, (0, 0, 0, 0, 0, extra)) for t in (q, k, v))
        q, k, v = (_AllToAll.apply(t, 1, 2, self.group) for t in (q, k, v))
        keep = real_positions(size, image, text, q.device)
        if keep is None:
            out = self.inner.attention(q, k, v, dropout=dropout)
        else:
            real = self.inner.attention(*(t.index_select(2, keep) for t in (q, k, v)), dropout=dropout)
            out = real.new_zeros(q.shape).index_copy(2, keep, real)
        return _AllToAll.apply(out, 2, 1, self.group)[:, :heads]

    def rms_norm(self, x, weight, eps):
        return self.inner.rms_norm(x, weight, eps)

    def gelu_tanh(self, x):
        return self.inner.gelu_tanh(x)


def _split_tokens(group: dist.ProcessGroup, lengths: SequenceLengths, what: str):
    size = dist.get_world_size(group)

    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        setattr(lengths, what, output.shape[1])
        extra = padded(output.shape[1], size) - output.shape[1]
        return _Slice.apply(F.pad(output, (0, 0, 0, extra)) if extra else output, 1, group)

    return hook


def _gather_tokens(group: dist.ProcessGroup, lengths: SequenceLengths):
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return _Gather.apply(output, 1, group)[:, : lengths.image]

    return hook


def _sum_input_gradients(group: dist.ProcessGroup):
    def hook(module: nn.Module, args: tuple) -> tuple:
        return tuple(
            _SumGradients.apply(a, group) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in args
        )

    return hook


def enable_sequence_parallel(model: Transformer, group: dist.ProcessGroup, device_type: str) -> list[RemovableHandle]:
    """Ulysses over `group` with hooks and an ops wrapper; the model's parameters and math are untouched.

    Every rank of the group must get the same inputs; each rank's parameter gradients are then its tokens' share,
    so the group's gradients must be summed (the trainer scales the loss by the group size before FSDP averages).
    """
    size = dist.get_world_size(group)
    if size > model.cfg.num_attention_heads:
        raise ValueError(
            f"sequence_parallel {size} exceeds num_attention_heads {model.cfg.num_attention_heads} (at most one "
            f"rank per head)"
        )
    lengths = SequenceLengths()
    model.ops = UlyssesOps(ops_for(model.ops, device_type), group, lengths)
    return [
        model.register_forward_pre_hook(_sum_input_gradients(group)),
        model.patch_embed.register_forward_hook(_split_tokens(group, lengths, "image")),
        model.context_embedder.register_forward_hook(_split_tokens(group, lengths, "text")),
        model.proj_out.register_forward_hook(_gather_tokens(group, lengths)),
    ]
