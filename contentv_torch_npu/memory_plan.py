"""Per-rank memory of the torch twin's train step at real size, without accelerators (torchtitan's method).

One process plays rank 0 of the recipe's whole world: a fake process group (`FakeStore`, backend "fake") stands in
for hccl/nccl, `FakeTensorMode` makes every tensor shape-only, and the real model (all blocks, LoRA adapters over a
frozen base when the recipe has `lora`), the real FSDP2 / HSDP sharding (none in a world of one process, as
contentv_torch_npu.train runs it), Ulysses hooks, autocast, activation checkpointing and AdamW run one train step,
with AdamW's moments in place as after the first step (the steady state). `FSDPMemTracker` (`MemTracker` for one
process) counts the bytes of every live tensor by category and keeps the snapshot at the peak. Nothing is allocated,
so a 64-rank 8B plan runs on a laptop.

What the count leaves out: the caching allocator's rounding and fragmentation, the communication library's buffers,
and the fused NPU attention's saved softmax statistics (`[B, heads, S, 8]` twice in fp32 per block; the CPU trace
saves SDPA's `[B, heads, S]` log-sum-exp instead), so keep a few GiB of headroom.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import BucketConfig, Recipe
from contentv_common.model.flops import image_tokens, text_encoder_flops, transformer_flops
from contentv_common.plan.report import StepPlan, peak_bytes
from contentv_common.sample_mesh import SampleMesh
from contentv_common.sampling import latent_shape
from contentv_common.text.encoder_table import clip_text_shapes, t5_shapes
from contentv_common.text.online import text_configs
from contentv_torch_npu.distributed import (
    check_mesh,
    enable_sequence_parallel,
    sequence_groups,
    shard_mesh_shape,
    shard_model,
)
from contentv_torch_npu.lora import add_adapters
from contentv_torch_npu.optim import global_grad_norm, make_optimizer
from contentv_torch_npu.train import DTYPES, StepInputs, flow_matching_loss
from contentv_torch_npu.transformer import Transformer

TEXT_TOKENS = 333
CLIP_TOKENS = 77  # of TEXT_TOKENS: SD3.5's CLIP tokenizers' model_max_length; the rest are T5's
# tracker categories that persist between steps: FSDPMemTracker's (sharded world) and MemTracker's (one process,
# where the step's inputs are tracked as "Other")
_STATE = ("SHARDED_PARAM", "BUFFER", "OPT", "INP", "PARAM", "OTH")


def _step(
    model: Transformer, optimizer: torch.optim.Optimizer, ema: dict, decay: float, inputs: StepInputs, sp: int
) -> None:
    """contentv_torch_npu.train.train_step without its host syncs (a fake tensor has no value): forward, backward,
    global norm, clip, AdamW, EMA of the trained parameters, zero_grad; the same tensors live at the same time."""
    loss = flow_matching_loss(model, inputs)
    (loss * sp).backward()
    scale = (1.0 / global_grad_norm(model).clamp(min=1.0)).to(loss.device)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    optimizer.step()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ema:
                ema[name].mul_(decay).add_(p.detach(), alpha=1 - decay)
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


def _build(recipe: Recipe, world: int, groups: list[dist.ProcessGroup], device_mesh: DeviceMesh | None) -> Transformer:
    """The model as contentv_torch_npu.train builds it (LoRA adapters added, Ulysses hooks over `groups[0]`, FSDP2 /
    HSDP over `device_mesh` in a world of more than one rank), built on the meta device and materialised as fake
    tensors (call under FakeTensorMode; the process groups and the mesh are made outside it)."""
    with torch.device("meta"):
        model = Transformer(
            recipe.model_config,
            compute_dtype=DTYPES[recipe.compute_dtype],
            ops="torch",
            gradient_checkpointing=recipe.remat != "none",
        )
    if recipe.lora is not None:
        add_adapters(model, recipe.lora, recipe.seed)  # on meta: frozen base in lora.base_dtype, fp32 adapters
    if groups:
        enable_sequence_parallel(model, groups[0], "cpu")
    if device_mesh is not None:
        return shard_model(model, device_mesh).to_empty(device="cpu")
    for module in model.modules():  # to_empty cannot swap a plain module's meta parameters for fake ones
        for name, p in module.named_parameters(recurse=False):
            setattr(module, name, nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad))
        for name, b in module.named_buffers(recurse=False):
            setattr(module, name, torch.empty_like(b, device="cpu"))
    return model


class _NoHook:
    def remove(self) -> None:
        pass


class _OneProcessTracker(MemTracker):
    """MemTracker for a model that is not FSDP-sharded. It registers a gradient hook on every parameter it meets,
    which a frozen one (a LoRA base) refuses: those are marked as hooked already."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        for p in module.parameters():
            if not p.requires_grad:
                self._param_to_grad_hook_handles.setdefault(p, (_NoHook(), _NoHook()))
        return super()._track_module_params_and_buffers(module, install_grad_hooks)


def _tracker(model: Transformer, optimizer: torch.optim.Optimizer, inputs: StepInputs, world: int) -> MemTracker:
    tensors = tuple(vars(inputs).values())
    if world == 1:
        tracker = _OneProcessTracker()
        tracker.track_external(model, optimizer, *tensors)
        return tracker
    tracker = FSDPMemTracker(model, optimizer)
    tracker.track_inputs(tensors)
    return tracker


def online_text_bytes(recipe: Recipe) -> int:
    """The float32 weights of the text encoders a `data.text: online` run keeps whole on every rank (0 otherwise)."""
    configs = text_configs(recipe.data.encoders) if recipe.data.text == "online" else None
    if configs is None:
        return 0
    clip_l, clip_g, t5 = configs
    shapes = [*clip_text_shapes(clip_l).values(), *clip_text_shapes(clip_g).values(), *t5_shapes(t5).values()]
    return sum(int(np.prod(s)) for s in shapes) * 4


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def plan_buckets(
    recipe: Recipe, hbm_bytes: int, text_tokens: int = TEXT_TOKENS
) -> tuple[list[StepPlan], dict[str, int]]:
    """Trace one train step per bucket as rank 0 of the recipe's mesh (the fake world must be initialised); the
    model, AdamW (over the trained parameters: all, or the LoRA adapters) and the EMA are built once. Returns the
    plans and the rank's train state in bytes (params, optimizer, ema; with online text the encoders' weights, which
    are counted, not traced: their forward's activations are not in the peak, their FLOPs are)."""
    mesh, cfg = recipe.mesh, recipe.model_config
    dp, sp = mesh.data * mesh.fsdp, mesh.sequence
    world = dp * sp
    for bucket in recipe.data.buckets:
        if bucket.batch_size % dp:
            raise ValueError(f"bucket {bucket.name}: batch_size {bucket.batch_size} does not split over {dp} ranks")
    start = time.perf_counter()
    groups = [dist.new_group(ranks) for ranks in sequence_groups(mesh)] if sp > 1 else []
    device_mesh = None
    if world > 1:
        shape, names = shard_mesh_shape(mesh)
        device_mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    plans = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = _build(recipe, world, groups, device_mesh)
        optimizer = make_optimizer(model, recipe.optimizer)
        for group in optimizer.param_groups:  # AdamW's state as after its first step: one traced step is the steady one
            for p in group["params"]:
                optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p)}
                optimizer.state[p]["exp_avg_sq"] = torch.zeros_like(p)
        decay = recipe.optimizer.ema_decay
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        ema = {n: p.detach().clone() for n, p in trained} if decay is not None else {}
        ema_bytes = _local_bytes(ema.values())
        moments = [t for st in optimizer.state.values() for t in st.values() if t.dim() > 0]
        state_bytes = {"params": _local_bytes(model.parameters()), "optimizer": _local_bytes(moments)}
        if ema:
            state_bytes["ema"] = ema_bytes
        text_bytes = online_text_bytes(recipe)
        if text_bytes:
            state_bytes["text_encoders"] = text_bytes
        configs = text_configs(recipe.data.encoders) if text_bytes else None
        build_s = time.perf_counter() - start
        for bucket in recipe.data.buckets:
            start = time.perf_counter()
            inputs = _inputs(recipe, bucket, bucket.batch_size // dp, text_tokens)
            tracker = _tracker(model, optimizer, inputs, world)
            with tracker:
                _step(model, optimizer, ema, decay or 0.0, inputs, sp)
            snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
            by_name = {getattr(k, "name", str(k)): v for k, v in snapshot.items()}
            state = sum(by_name.get(k, 0) for k in _STATE) + ema_bytes
            temp = by_name["Total"] + ema_bytes - state
            state += text_bytes
            tokens = _tokens(cfg, bucket)
            peak = peak_bytes(state, temp, 0, 0)
            flops = transformer_flops(cfg, tokens, text_tokens, bucket.batch_size).step("train")
            if configs is not None:
                flops += text_encoder_flops(configs, CLIP_TOKENS, text_tokens - CLIP_TOKENS, bucket.batch_size)
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
                    flops=flops,
                    fits=peak <= hbm_bytes,
                )
            )
    return plans, state_bytes


def plan_recipe(recipe: Recipe, hbm_bytes: int, blocks: int | None = None) -> tuple[list[StepPlan], dict[str, int]]:
    """The peak per rank of the train step of every bucket of `recipe` (`blocks` overrides the depth for quick
    checks), and the rank's train state in bytes. Runs in this process on a fake world of the mesh's size; a mesh the
    model cannot honour is a ValueError."""
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


def _fake(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A module built on the meta device given fake CPU tensors (call under FakeTensorMode), parameters in `dtype`."""
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            fake = torch.empty_like(p, device="cpu", dtype=dtype or p.dtype)
            setattr(sub, name, nn.Parameter(fake, requires_grad=False))
        for name, b in sub.named_buffers(recurse=False):
            setattr(sub, name, torch.empty_like(b, device="cpu"))
    return module


class _Step(nn.Module):
    """A step as one module call: MemTracker follows a module called again (a VAE layer per latent frame) only
    inside an outer module."""

    def __init__(self, run: Callable[[], object]) -> None:
        super().__init__()
        self.run = run

    def forward(self) -> object:
        return self.run()


def _traced(
    kind: str, name: str, tokens: int, batch: int, flops: float, hbm: int, run: Callable[[], object], *tracked
) -> StepPlan:
    """`run()` under a one-process MemTracker that counts `tracked` (modules, tensors) as the step's arguments."""
    start = time.perf_counter()
    tracker = _OneProcessTracker()
    tracker.track_external(*tracked)
    with tracker, torch.no_grad():
        _Step(run)()
    snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
    by_name = {getattr(k, "name", str(k)): v for k, v in snapshot.items()}
    args = sum(by_name.get(k, 0) for k in _STATE)
    peak = by_name["Total"]
    seconds = time.perf_counter() - start
    return StepPlan(kind, name, tokens, batch, args, peak - args, 0, 0, peak, seconds, flops, peak <= hbm)


def plan_sample_job(
    cfg: ModelConfig,
    bucket: BucketConfig,
    mesh: SampleMesh,
    hbm_bytes: int,
    text_tokens: int = TEXT_TOKENS,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[list[StepPlan], dict[str, int]]:
    """Rank 0 of `tools/sample.py --backend torch --mesh MESH --dtype bfloat16` under torchrun, in a fake world of
    the mesh's ranks: "sample", one guided step of contentv_torch_npu.sampling (the transformer whole on every rank,
    this rank's rows of the pair, Ulysses over its sequence group, the velocities gathered); "decode", the Wan VAE
    (fp32) decoding the clip whole on the rank's device, as sample.py does (its frames kept, unlike the JAX plan's).
    The text encoders are not traced: their bf16 weights, kept loaded on every rank, are counted. Returns the steps
    and the weights each rank keeps loaded: "transformer", "text", "vae"."""
    from contentv_common.text.encoder_table import SD35_TEXT_CONFIGS, clip_text_shapes, t5_shapes
    from contentv_common.vae.config import VAEConfig
    from contentv_torch_npu import sampling
    from contentv_torch_npu.vae import WanVAE

    if dist.is_initialized():
        raise RuntimeError("plan_sample_job starts its own fake process group; call it outside a distributed run")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=mesh.devices)
    try:
        groups = [dist.new_group(ranks) for ranks in sequence_groups(mesh.config)] if mesh.sequence > 1 else []
        shape = latent_shape(cfg.in_channels, bucket.frames, bucket.height, bucket.width)
        pair = np.zeros((2, text_tokens, cfg.joint_attention_dim), np.float32)
        pooled = np.zeros((2, cfg.pooled_projection_dim), np.float32)
        tokens = image_tokens(cfg, *shape[2:])
        with FakeTensorMode(allow_non_fake_inputs=True):
            with torch.device("meta"):
                model = Transformer(cfg, compute_dtype=dtype, ops="torch")
            model = _fake(model, dtype).eval()
            if groups:
                enable_sequence_parallel(model, groups[0], "cpu")
            x, step = sampling._prepare(model, np.zeros(shape, np.float32), pair, pooled, True, 6.0, mesh)
            flops = transformer_flops(cfg, tokens, text_tokens, 2).step("sample")
            run = lambda: step(x, np.float32(1.0), np.float32(-0.02))  # noqa: E731
            plans = [_traced("sample", bucket.name, tokens + text_tokens, 2, flops, hbm_bytes, run, model, x)]
            vae_cfg = VAEConfig()
            with torch.device("meta"):
                vae = WanVAE(vae_cfg)
            vae = _fake(vae).eval()
            latents = torch.zeros(shape)
            decode = lambda: vae.decode(latents)  # noqa: E731
            f, h, w = shape[2:]
            plans.append(_traced("decode", bucket.name, h * w, 1, 0.0, hbm_bytes, decode, vae, latents))
            resident = {"transformer": _local_bytes(model.parameters()), "vae": _local_bytes(vae.parameters())}
        clip_l, clip_g, t5 = SD35_TEXT_CONFIGS
        shapes = [*clip_text_shapes(clip_l).values(), *clip_text_shapes(clip_g).values(), *t5_shapes(t5).values()]
        resident["text"] = sum(int(np.prod(s)) for s in shapes) * dtype.itemsize
        return plans, resident
    finally:
        dist.destroy_process_group()
