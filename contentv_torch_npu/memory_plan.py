"""Per-rank memory of the torch twin's train step at real size, without accelerators (torchtitan's method).

One process plays rank 0 of the recipe's whole world: a fake process group (`FakeStore`, backend "fake") stands in
for hccl/nccl, `FakeTensorMode` makes every tensor shape-only, and the real model (all blocks), the real FSDP2 /
HSDP sharding, Ulysses hooks, autocast, activation checkpointing and AdamW run one train step, with AdamW's moments
in place as after the first step (the steady state). `FSDPMemTracker` counts the bytes of every live tensor by
category and keeps the snapshot at the peak. Nothing is allocated, so a 64-rank 8B plan runs on a laptop.

What the count leaves out: the caching allocator's rounding and fragmentation, the communication library's buffers,
and the fused NPU attention's saved softmax statistics (`[B, heads, S, 8]` twice in fp32 per block; the CPU trace
saves SDPA's `[B, heads, S]` log-sum-exp instead), so keep a few GiB of headroom.
"""

from __future__ import annotations

import dataclasses
import time

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore

from contentv_common.flops import image_tokens, transformer_flops
from contentv_common.plan_report import StepPlan, peak_bytes
from contentv_common.recipe import BucketConfig, Recipe
from contentv_common.sampling import latent_shape
from contentv_torch_npu.distributed import (
    check_mesh,
    enable_sequence_parallel,
    sequence_groups,
    shard_mesh_shape,
    shard_model,
)
from contentv_torch_npu.optim import global_grad_norm, make_optimizer
from contentv_torch_npu.train import DTYPES, StepInputs, flow_matching_loss
from contentv_torch_npu.transformer import Transformer

TEXT_TOKENS = 333
_STATE = ("SHARDED_PARAM", "BUFFER", "OPT", "INP")  # tracker categories that persist between steps


def _step(model: Transformer, optimizer: torch.optim.Optimizer, ema: dict, inputs: StepInputs, sp: int) -> None:
    """contentv_torch_npu.train.train_step without its host syncs (a fake tensor has no value): forward, backward,
    global norm, clip, AdamW, EMA, zero_grad; the same tensors live at the same time."""
    loss = flow_matching_loss(model, inputs)
    (loss * sp).backward()
    scale = (1.0 / global_grad_norm(model).clamp(min=1.0)).to(loss.device)
    for p in model.parameters():
        p.grad.mul_(scale)
    optimizer.step()
    with torch.no_grad():
        for name, p in model.named_parameters():
            ema[name].mul_(0.999).add_(p.detach(), alpha=0.001)
    optimizer.zero_grad(set_to_none=True)


def _inputs(recipe: Recipe, bucket: BucketConfig, rows: int, text_tokens: int) -> StepInputs:
    cfg = recipe.model_config
    shape = latent_shape(cfg.in_channels, bucket.frames, bucket.height, bucket.width, rows)
    return StepInputs(
        latents=torch.randn(shape),
        noise=torch.randn(shape),
        sigmas=torch.rand(rows),
        weights=torch.ones(rows),
        text=torch.randn(rows, text_tokens, cfg.joint_attention_dim),
        pooled=torch.randn(rows, cfg.pooled_projection_dim),
    )


def _tokens(cfg, bucket: BucketConfig) -> int:
    return image_tokens(cfg, *latent_shape(cfg.in_channels, bucket.frames, bucket.height, bucket.width)[2:])


def plan_buckets(recipe: Recipe, hbm_bytes: int, text_tokens: int = TEXT_TOKENS) -> list[StepPlan]:
    """Trace one train step per bucket as rank 0 of the recipe's mesh (the fake world must be initialised); the
    sharded model, AdamW and EMA are built once."""
    mesh, cfg = recipe.mesh, recipe.model_config
    dp, sp = mesh.data * mesh.fsdp, mesh.sequence
    for bucket in recipe.data.buckets:
        if bucket.batch_size % dp:
            raise ValueError(f"bucket {bucket.name}: batch_size {bucket.batch_size} does not split over {dp} ranks")
    start = time.perf_counter()
    shape, names = shard_mesh_shape(mesh)
    device_mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    groups = [dist.new_group(ranks) for ranks in sequence_groups(mesh)] if sp > 1 else []
    plans = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = Transformer(
            cfg, compute_dtype=DTYPES[recipe.compute_dtype], ops="torch", gradient_checkpointing=recipe.remat != "none"
        )
        if sp > 1:
            enable_sequence_parallel(model, groups[0], "cpu")
        shard_model(model, device_mesh)
        optimizer = make_optimizer(model, recipe.optimizer)
        for p in model.parameters():  # AdamW's state as after its first step, so one traced step is the steady one
            optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p)}
            optimizer.state[p]["exp_avg_sq"] = torch.zeros_like(p)
        ema = {n: p.detach().clone() for n, p in model.named_parameters()}
        ema_bytes = sum(t.to_local().nbytes for t in ema.values())
        build_s = time.perf_counter() - start
        for bucket in recipe.data.buckets:
            start = time.perf_counter()
            inputs = _inputs(recipe, bucket, bucket.batch_size // dp, text_tokens)
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_external(optimizer)
            tracker.track_inputs(tuple(vars(inputs).values()))
            with tracker:
                _step(model, optimizer, ema, inputs, sp)
            snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
            by_name = {getattr(k, "name", str(k)): v for k, v in snapshot.items()}
            state = sum(by_name.get(k, 0) for k in _STATE) + ema_bytes
            temp = by_name["Total"] + ema_bytes - state
            tokens = _tokens(cfg, bucket)
            peak = peak_bytes(state, temp, 0, 0)
            plans.append(
                StepPlan(
                    kind="train",
                    bucket=bucket.name,
                    tokens=tokens + text_tokens,
                    batch=bucket.batch_size,
                    argument_bytes=state,
                    temp_bytes=temp,
                    output_bytes=0,
                    alias_bytes=0,
                    peak_bytes=peak,
                    compile_s=build_s + time.perf_counter() - start,
                    flops=transformer_flops(cfg, tokens, text_tokens, bucket.batch_size).step("train"),
                    fits=peak <= hbm_bytes,
                )
            )
    return plans


def plan_recipe(recipe: Recipe, hbm_bytes: int, blocks: int | None = None) -> list[StepPlan]:
    """The peak per rank of the train step of every bucket of `recipe` (`blocks` overrides the depth for quick
    checks). Runs in this process on a fake world of the mesh's size; a mesh the model cannot honour is a ValueError."""
    if blocks is not None:
        recipe = dataclasses.replace(recipe, model=recipe.model_config.replace(num_layers=blocks))
    world = recipe.mesh.data * recipe.mesh.fsdp * recipe.mesh.sequence
    check_mesh(recipe.mesh, world, recipe.model_config)
    if dist.is_initialized():
        raise RuntimeError("plan_recipe starts its own fake process group; call it outside a distributed run")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        return plan_buckets(recipe, hbm_bytes)
    finally:
        dist.destroy_process_group()
