"""The torch twin's trainer: the same recipe, data order, timesteps and noise as the JAX core, on NPU, CUDA or CPU.

Read top to bottom: `run` sets up processes, model, optimizer and data, then loops `train_step` and checkpoints.
Parallelism is configuration: the recipe's mesh (`data x fsdp x sequence` processes) gives the sequence-parallel
size (Ulysses) and the parameter layout (FSDP2 over every rank, or HSDP replicated over `mesh.data`), bf16 runs
as autocast over fp32 master weights (`compute_dtype`), and any `remat` other than "none" recomputes each block in
the backward pass (activation checkpointing). A non-finite (or, with `divergence.spike_factor`, spiking) step is
skipped and counted (contentv_common.training.divergence, kept in checkpoints); more than `nan_skip_limit` of them stop
the run (`TrainingStopped`), with the last checkpoint saved before the first bad step as the resume point. The main
rank holds the checkpoint dir's run lock for the whole run.

The loop never waits on the host between two steps (as the JAX core's): the step decides on the device whether it is
applied (contentv_torch_npu.optim: fused AdamW's skip flag, the guard's window and the rate as device tensors), the
next batches are prepared and copied to the device in a background thread (contentv_common.prefetch), and step k's
metrics are read after step k+1 is started (logged one step late). Checkpoints, evaluations and the last step wait
for their step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from contentv_common.checkpoint.formats import open_checkpoint
from contentv_common.checkpoint.hub import transformer_folder
from contentv_common.config.recipe import Recipe
from contentv_common.config.reward import RewardRecipe
from contentv_common.data.cache import Encoders, LatentCache
from contentv_common.errors import TrainingStopped
from contentv_common.lora.training import initial_adapters
from contentv_common.prefetch import Prefetcher
from contentv_common.sample_mesh import SampleMesh
from contentv_common.text.online import TOKEN_KEYS, tokenized
from contentv_common.training.divergence import DivergenceGuard
from contentv_common.training.evaluation import (
    EVAL_CLIP,
    EvalPrompts,
    eval_batch,
    eval_clip_inputs,
    eval_prompts,
    eval_scorers,
    frame_strip,
    score_clips,
)
from contentv_common.training.metrics import MetricsWriter
from contentv_common.training.optim import learning_rate
from contentv_common.training.run_result import RunResult
from contentv_common.training.schedules import interpolate, velocity_target
from contentv_common.training.step_inputs import step_inputs as common_step_inputs
from contentv_torch_npu import lora
from contentv_torch_npu.checkpointing import Checkpointer
from contentv_torch_npu.data import make_loader, open_cache
from contentv_torch_npu.distributed import Topology, enable_sequence_parallel, init_distributed, shard_model
from contentv_torch_npu.loading import load_transformer
from contentv_torch_npu.lora import DTYPES
from contentv_torch_npu.optim import (
    DeviceSchedule,
    apply_update,
    device_step_ok,
    global_grad_norm,
    guard_limits,
    guard_record,
    make_optimizer,
)
from contentv_torch_npu.sharded_checkpoint import stream_weights
from contentv_torch_npu.transformer import Transformer

if TYPE_CHECKING:
    from contentv_torch_npu.text_encoders import TextEncoders


@dataclass(frozen=True)
class StepInputs:
    """One step's rows on this rank: clean latents, noise, noise levels, loss weights and (dropped-out) text."""

    latents: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor
    weights: torch.Tensor
    text: torch.Tensor
    pooled: torch.Tensor


def step_inputs(
    recipe: Recipe, batch: dict[str, Any], empty: tuple[np.ndarray, np.ndarray], text: TextEncoders | None = None
) -> StepInputs:
    """This rank's rows of global batch k with the step's random inputs (contentv_common.training.step_inputs, as
    contentv_jax.data draws them): every backend and mesh sees the same noise, sigmas and dropped captions. Online
    text (`text`, the frozen encoders): the kept captions are tokenized and encoded on the encoders' device."""
    rows: dict[str, Any] = {name: batch[name].numpy() for name in ("latents", "text", "pooled") if name in batch}
    if text is not None:
        rows["captions"] = batch["captions"]
    drawn = common_step_inputs(
        recipe, batch["batch_index"], rows, global_size=batch["global_size"], first_row=batch["offset"], empty=empty
    )
    if text is not None:
        ids = tokenized(drawn, text.tokenizers)
        with torch.no_grad():
            encoded = text.encode_ids(*(torch.from_numpy(ids[k]).long().to(text.device) for k in TOKEN_KEYS))
        drawn["text"], drawn["pooled"] = encoded
    return StepInputs(**{name: torch.as_tensor(drawn[name]) for name in StepInputs.__dataclass_fields__})


def online_text_encoders(recipe: Recipe, device: torch.device) -> TextEncoders | None:
    """The frozen text encoders of `data.encoders` on this rank's device for `data.text: online` (else None): outside
    the model, so no gradient, optimizer state or checkpoint holds them."""
    if recipe.data.text != "online":
        return None
    from contentv_torch_npu.text_encoders import load_text_encoders, tiny_text_encoders  # transformers: only online

    name = recipe.data.encoders
    text = tiny_text_encoders(recipe.seed) if name == "tiny" else load_text_encoders(name)
    for model in (*text.clips, text.t5):
        model.requires_grad_(False)
    return text.to(device)


def per_sample_loss(model: torch.nn.Module, inputs: StepInputs) -> torch.Tensor:
    """Velocity MSE of each sample [B] (mean over [C, F, H, W]), unweighted."""
    x_t = interpolate(inputs.latents, inputs.noise, inputs.sigmas)
    target = velocity_target(inputs.latents, inputs.noise)
    pred = model(x_t, inputs.sigmas * 1000.0, inputs.text, inputs.pooled)
    return (pred.float() - target.float()).square().mean(dim=(1, 2, 3, 4))


def flow_matching_loss(model: torch.nn.Module, inputs: StepInputs) -> torch.Tensor:
    """Weighted velocity MSE: per-sample mean over [C, F, H, W] times the loss weight, averaged over the batch."""
    return (per_sample_loss(model, inputs) * inputs.weights).mean()


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, cache: LatentCache, held_out: list[int], recipe: Recipe, device: torch.device
) -> dict[float, float]:
    """Validation loss per fixed timestep, averaged over the held-out samples (contentv_common.training.evaluation)."""
    timesteps = recipe.eval.timesteps
    total = np.zeros(len(timesteps))
    for i in held_out:
        batch = {k: torch.from_numpy(v).to(device) for k, v in eval_batch(cache, i, timesteps, recipe.seed).items()}
        total += per_sample_loss(model, StepInputs(**batch)).cpu().numpy()
    return {t: float(v / len(held_out)) for t, v in zip(timesteps, total, strict=True)}


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: StepInputs,
    *,
    lr: float | torch.Tensor,
    grad_clip: float | None,
    ema: dict[str, torch.Tensor] | None = None,
    ema_decay: float | None = None,
    topo: Topology | None = None,
    limits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, backward, clip, AdamW, EMA. Returns (loss, grad norm, applied) as device tensors, nothing read
    back; a step whose loss or gradient norm is non-finite or above `limits` (max loss, max norm) changes nothing.

    Each rank's loss is its rows' mean; FSDP (and HSDP: reduce-scatter over the shard ranks, all-reduce over the
    replicas) averages gradients over all ranks, and the ranks of a sequence-parallel
    group each hold their tokens' share, so the loss is scaled by the group size to make the average a sum there.
    """
    topo = topo or Topology()
    loss = flow_matching_loss(model, inputs)
    (loss * topo.sp).backward()
    norm = global_grad_norm(model)
    stats = torch.stack([loss.detach().float(), norm.detach().float().to(loss.device)])
    if topo.world > 1:
        dist.all_reduce(stats[:1], op=dist.ReduceOp.SUM)
        stats[0] /= topo.world
    loss, norm = stats[0], stats[1]
    ok = device_step_ok(loss, norm, limits)
    apply_update(model, optimizer, norm, lr=lr, grad_clip=grad_clip, ema=ema, ema_decay=ema_decay, ok=ok)
    optimizer.zero_grad(set_to_none=True)
    return loss, norm, ok


def build_model(recipe: Recipe | RewardRecipe, topo: Topology, ops: str = "auto") -> Transformer:
    """The model to train or tune in fp32 masters, identical on every rank (seeded init or `init_from` weights),
    sharded (FSDP2 / HSDP) in a multi-process run. There `init_from` builds the model on the meta device, shards it and
    streams the weights one tensor at a time, each rank keeping its slices (no rank holds the whole model).
    `remat` other than "none" recomputes each block in the backward pass. With `lora`, the base is frozen (in
    `lora.base_dtype`) and adapted before sharding (contentv_torch_npu.lora)."""
    cfg = recipe.model_config
    kwargs = dict(compute_dtype=DTYPES[recipe.compute_dtype], ops=ops, gradient_checkpointing=recipe.remat != "none")
    adapt = (lambda m: lora.add_adapters(m, recipe.lora, recipe.seed)) if recipe.lora else (lambda m: [])
    if recipe.init_from:
        folder = transformer_folder(recipe.init_from)  # a Hub id: its folder in the Hub cache
        source = open_checkpoint(folder)
        source_cfg = source.config.replace(pos_embed=cfg.pos_embed)
        if source_cfg != cfg:
            raise ValueError(f"init_from {recipe.init_from}: model config {source_cfg} differs from the recipe's {cfg}")
        if topo.world == 1:
            compute = {"compute_dtype": kwargs["compute_dtype"], "ops": ops}
            dtype = DTYPES[recipe.lora.base_dtype] if recipe.lora else torch.float32  # a LoRA base never in fp32
            model = load_transformer(folder, dtype, cfg.pos_embed, device=topo.device, **compute)
            model.gradient_checkpointing = kwargs["gradient_checkpointing"]
            adapt(model)
            return model
        with torch.device("meta"):
            model = Transformer(cfg, **kwargs)
        modules = adapt(model)
        shard_model(model, topo.shard_mesh)
        model.to_empty(device=topo.device)
        stream_weights(model, source)
        if modules:
            shapes = {m: tuple(model.get_submodule(m).weight.shape) for m in modules}
            lora.set_adapters(model, initial_adapters(shapes, recipe.lora.rank, recipe.seed))
        return model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = Transformer(cfg, **kwargs).to(topo.device)
    adapt(model)
    return shard_model(model, topo.shard_mesh) if topo.world > 1 else model


def clip_latents(model: torch.nn.Module, inputs: dict[str, np.ndarray], topo: Topology, rows: int = 1) -> np.ndarray:
    """The latents of the first `rows` in-loop clips (`eval_clip_inputs` or `EvalPrompts.inputs`: rows padded to a
    multiple of the data-parallel groups), drawn by every rank together with the sampler
    (contentv_torch_npu.sampling.sample) on a sampling mesh laid out as training's ranks (data = the data-parallel
    groups, Ulysses over each sequence group), the model sharded as it trains."""
    from contentv_torch_npu.sampling import sample

    layout = SampleMesh(data=topo.dp, sequence=topo.sp)
    return sample(model, **inputs, progress=False, mesh=layout, **EVAL_CLIP)[:rows]


def _eval_tools(recipe: Recipe, device: torch.device) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """Rank 0's decoder of `eval.prompts`' clips (the VAE of the data's encoders: the demo's, the tiny random one of
    the recipe's seed or a pipeline folder's vae/) and their metrics' scorers (`eval_scorers`; CLIP's with
    `eval.clip`)."""
    from functools import partial

    from contentv_common.demo import DEMO_VAE
    from contentv_torch_npu.encoders import decode_latents, load_pipeline_vae, tiny_vae
    from contentv_torch_npu.vae import load_vae

    name = recipe.data.encoders
    if name in ("tiny", "demo"):
        vae = tiny_vae(recipe.seed).to(device) if name == "tiny" else load_vae(DEMO_VAE, device=device)
    else:
        vae = load_pipeline_vae(Path(name) / "vae", device)
    clip = None
    if recipe.eval.clip is not None:
        from contentv_torch_npu.reward.clip import ClipEmbeddings

        clip = ClipEmbeddings(recipe.eval.clip, device)
    return partial(decode_latents, vae), eval_scorers(recipe.eval.prompts, clip)


def _eval_samples(
    model: torch.nn.Module, prompts: EvalPrompts, topo: Topology, decode: Callable[[np.ndarray], np.ndarray] | None
) -> np.ndarray | None:
    """The clips of `eval.prompts` (every rank: `clip_latents`), decoded by rank 0 into uint8 [N, F, H, W, 3] (None
    elsewhere)."""
    latents = clip_latents(model, prompts.inputs(topo.dp), topo, len(prompts.prompts))
    return decode(latents) if decode is not None else None


def _eval_clip(
    model: torch.nn.Module, cache: LatentCache, index: int, recipe: Recipe, topo: Topology
) -> np.ndarray | None:
    """A clip sampled for held-out sample `index`'s caption (every rank: `clip_latents`) with the demo encoders (the
    VAE on disk), decoded into a frame strip by rank 0 (None elsewhere, or without the demo encoders)."""
    if recipe.data.encoders != "demo":
        return None
    from contentv_torch_npu.encoders import demo_encoders

    latents = clip_latents(model, eval_clip_inputs(cache, index, recipe.seed, copies=topo.dp), topo)
    return frame_strip(demo_encoders(_device(model)).decode_latents(latents)[0]) if topo.is_main else None


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def run(
    recipe: Recipe,
    *,
    device: str = "auto",
    ops: str = "auto",
    encoders: Encoders | None = None,
    progress: bool = True,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    stop_after: int | None = None,
) -> RunResult:
    """Train `recipe` to `recipe.steps`, resuming from its checkpoint dir if it holds a checkpoint.

    Launch `data x fsdp x sequence` processes with torchrun; `mesh.sequence` ranks share each batch (Ulysses), the
    rest is data parallel. `mesh.tensor` > 1 is not supported by the torch twin. `stop_after` ends the call early at
    that step (after checkpointing it), as an interruption would, as in the JAX core. `on_step` (main rank only) gets
    the same record as the JAX trainer's: {step (0-based), loss, grad_norm, skipped, step_time, batch (global size)}.
    """
    topo = init_distributed(device, recipe.mesh, recipe.model_config)
    checkpoints = Checkpointer(recipe.checkpoint, topo)
    try:
        return _run(recipe, topo, checkpoints, ops, encoders, progress, on_step, stop_after)
    finally:
        checkpoints.close()


def _run(
    recipe: Recipe,
    topo: Topology,
    checkpoints: Checkpointer,
    ops: str,
    encoders: Encoders | None,
    progress: bool,
    on_step: Callable[[dict[str, Any]], None] | None,
    stop_after: int | None,
) -> RunResult:
    prompts = recipe.eval.prompts
    cache = open_cache(recipe.data, encoders, build=topo.is_main, progress=progress, prompts=prompts, seed=recipe.seed)
    if topo.world > 1:
        dist.barrier()
        cache = open_cache(recipe.data, None, build=False)

    model = build_model(recipe, topo, ops)
    if topo.sp > 1:
        enable_sequence_parallel(model, topo.sp_group, topo.device.type)
    optimizer = make_optimizer(model, recipe.optimizer)
    decay = recipe.optimizer.ema_decay
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if decay else None

    step, position, counters, guard_state = 0, 0, {"nan_skips": 0}, None
    if checkpoints.latest_step() is not None:  # same stage: optimizer, counters and data position continue too
        meta = checkpoints.restore_data()
        checkpoints.restore(model, optimizer, ema, "EMA")
        step, position = int(meta["step"]), int(meta["data_position"])
        counters = {**counters, **{k: int(v) for k, v in meta.get("counters", {}).items()}}
        guard_state = meta.get("divergence") or {"skipped": counters["nan_skips"]}
    elif recipe.resume_from is not None:  # a new stage: the previous one's weights and EMA
        previous = Checkpointer(replace(recipe.checkpoint, dir=recipe.resume_from), topo, writer=False)
        if previous.latest_step() is None:
            raise FileNotFoundError(f"resume_from {recipe.resume_from}: no checkpoint there")
        previous.restore_weights(model, ema)
    guard = DivergenceGuard(recipe.divergence, recipe.nan_skip_limit, guard_state)

    def save() -> None:
        meta = {"data_position": position, "counters": counters, "divergence": guard.state()}
        adapters = None
        if recipe.lora:  # the EMA's when kept; every rank takes part in gathering
            adapters = (lora.get_adapters(ema if ema is not None else dict(model.named_parameters())), recipe.lora)
        checkpoints.save(step, model, optimizer, ema, meta, pin_before=guard.first_bad_step, adapters=adapters)

    held_out = cache.hold_out(recipe.eval.samples if recipe.eval.interval else 0, recipe.seed)
    writer = MetricsWriter(recipe.log_dir, recipe.log_interval) if topo.is_main else None
    sampled = eval_prompts(cache, recipe.data.buckets, prompts, recipe.seed) if held_out and prompts else None
    decode, scorers = _eval_tools(recipe, topo.device) if sampled is not None and topo.is_main else (None, {})
    loader = iter(make_loader(cache, recipe.data, recipe.seed, position, topo.dp_rank, topo.dp))
    empty = (cache.empty_text, cache.empty_pooled)
    text_encoders = online_text_encoders(recipe, topo.device)
    schedule = DeviceSchedule(recipe.optimizer, recipe.steps, step - guard.skipped, topo.device)
    window = {k: torch.from_numpy(v).to(topo.device) for k, v in guard.window().items()}
    end = recipe.steps if stop_after is None else min(stop_after, recipe.steps)
    losses: dict[int, float] = {}
    skipped: list[int] = []
    bar = tqdm(total=end, initial=step, desc="train (torch)", disable=not (progress and topo.is_main))
    last_read = time.perf_counter()

    def prepare(batch: dict[str, Any]) -> tuple[int, int, StepInputs]:
        inputs = step_inputs(recipe, batch, empty, text_encoders)
        inputs = StepInputs(*(t.to(topo.device, non_blocking=True) for t in vars(inputs).values()))
        return batch["batch_index"], batch["global_size"], inputs

    def finish(done: tuple[int, tuple[torch.Tensor, ...], int]) -> None:
        """Read a started step's metrics (waiting for it), count and log it; stop the run past the skip limit."""
        nonlocal last_read
        at, values, size = done
        loss, norm, ok = torch.stack([v.float() for v in values]).tolist()
        now = time.perf_counter()
        step_time, last_read = now - last_read, now  # the time between two steps' ends: the loop's time per step
        lr = learning_rate(recipe.optimizer, at - guard.skipped, recipe.steps)
        guard.record(at, loss, norm, bool(ok))
        counters["nan_skips"] = guard.skipped
        if ok:
            losses[at] = loss
        else:
            skipped.append(at)
        if not ok and topo.is_main:
            bar.write(f"step {at}: loss {loss} / grad norm {norm} non-finite or spiking, skipped")
        record = {"step": at, "loss": loss, "grad_norm": norm, "lr": lr, "skipped": not ok}
        record.update(nan_skips=counters["nan_skips"], step_time=step_time, batch=size)
        if topo.is_main:
            writer.step(record)
            if on_step is not None:
                on_step(record)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if guard.stopped:
            bar.close()
            if writer is not None:
                writer.close()
            raise TrainingStopped(guard.stop_message(_keep_resume_point(checkpoints, guard)))

    with bar, Prefetcher(loader, prepare) as batches:
        waiting = None
        while step < end:
            index, size, inputs = next(batches)
            if index != position:
                raise RuntimeError(f"data loader is at batch {index}, the trainer expects {position}")
            limits = guard_limits(window, recipe.divergence.spike_factor)
            loss, norm, ok = train_step(
                model, optimizer, inputs, lr=schedule.rate(), grad_clip=recipe.optimizer.grad_clip, ema=ema,
                ema_decay=decay, topo=topo, limits=limits,
            )  # fmt: skip
            schedule.advance(ok)
            window = guard_record(window, ok, loss, norm)
            if waiting is not None:
                finish(waiting)  # the previous step's, read while this one runs
            waiting = (step, (loss, norm, ok), size)
            step, position = step + 1, position + 1
            evaluating = bool(held_out) and step % recipe.eval.interval == 0
            checkpoint = step % recipe.checkpoint.interval == 0 or step == end
            if not (evaluating or checkpoint):
                continue
            finish(waiting)  # these need this step's state: the next step waits
            waiting = None
            if evaluating:
                evaluation = evaluate(model, cache, held_out, recipe, topo.device)
                # every rank; the prompts' clips, when there are some, stand in for the held-out sample's
                clip = _eval_clip(model, cache, held_out[0], recipe, topo) if sampled is None else None
                if topo.is_main:
                    writer.evaluation(step, evaluation, clip)
                if sampled is not None:
                    videos = _eval_samples(model, sampled, topo, decode)  # every rank
                    if writer is not None and videos is not None:
                        writer.eval_samples(step, score_clips(videos, sampled.prompts, scorers), videos)
            if checkpoint:
                save()
    if writer is not None:
        writer.close()
    return RunResult(losses, skipped, end, {"model": model, "optimizer": optimizer, "ema": ema})


def _keep_resume_point(checkpoints: Checkpointer, guard: DivergenceGuard) -> str:
    """Set aside the checkpoints from the first bad step on; say which one a restart resumes from."""
    moved = checkpoints.set_aside_from(guard.first_bad_step)
    aside = f" (set aside: {', '.join(p.name for p in moved)})" if moved else ""
    last = checkpoints.latest_step()
    if last is None:
        return f"no checkpoint from before it in {checkpoints.dir}{aside}"
    return f"resume point: {checkpoints.folder(last)}{aside}"
