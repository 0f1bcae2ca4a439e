"""`run(recipe)`: a reward fine-tuning run (ReFL or GRPO) of the torch transformer, logged per step.

The twin of contentv_jax/reward/run.py (same numpy batches from contentv_common.reward.run, same log and plot);
runs on CPU, CUDA or Ascend NPU (`device="auto"`).

Parallelism is training's (contentv_torch_npu/train.py, distributed.py): launch `mesh.data x mesh.fsdp x
mesh.sequence` processes with torchrun; the model is sharded with FSDP2 (HSDP when `mesh.data > 1`) and runs Ulysses
over `mesh.sequence`; the frozen anchor / reference policy is sharded the same way (no optimizer state), the reward
model (CLIP) and the VAE decoder are replicated. Every rank draws the step's whole batch from (seed, step) and keeps
its data-parallel group's contiguous rows (rollouts, exploration noise, SFT rows), so a step on the mesh is the
single-process step (contentv_torch_npu/reward/train.py); the held-out seeds are split over the groups too. A mesh
the world or the batch cannot honour is a one-line ConfigError before any model is built.

Every `checkpoint.interval` steps (and at the end) the run writes `checkpoint.dir/step_NNNNNNNN/` atomically through the
training `Checkpointer` (checkpointing.py): in one process its format (safetensors + JSON): `model/` (our torch
weights format, which `load_transformer` reads: the tuned model), AdamW moments and step, `ema/` = the EMA anchor
when `refl.anchor: ema` or the EMA of the weights when `optimizer.ema_decay` is set, and the counters of
`ResumePoint`; on a mesh the same parts as `sharded_checkpoint.py`'s per-rank slices. The optimizer is training's
(contentv_torch_npu.optim); a divergent update is skipped and counted, more than `nan_skip_limit` stop the run. A run
whose checkpoint dir holds a checkpoint continues from the latest one (either format, on any mesh) and gives the
same per-step records as an uninterrupted run; the frozen anchor is rebuilt from the initial weights (`init_from` or
the seed). Checkpoints carry checksums and are verified on resume (a damaged newest one is skipped for the newest
intact one); the main rank holds the checkpoint dir's lock.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from contentv_common.config.reward import RewardRecipe
from contentv_common.data.cache import Encoders, LatentCache
from contentv_common.errors import ConfigError
from contentv_common.reward.models import score_black_box, to_uint8
from contentv_common.reward.run import (
    ResumePoint,
    RewardData,
    RewardLog,
    black_box_reward,
    check_divergence,
    differentiable_builtin,
    divergence_guard,
    eval_record,
    evaluated_updates,
    open_sft_cache,
    optimizer_updates,
    uses_anchor,
    uses_ema_anchor,
)
from contentv_torch_npu import checkpointing as ckpt
from contentv_torch_npu import lora
from contentv_torch_npu.checkpointing import Checkpointer
from contentv_torch_npu.distributed import Topology, check_mesh, enable_sequence_parallel, init_distributed
from contentv_torch_npu.optim import make_optimizer
from contentv_torch_npu.reward import train as tr
from contentv_torch_npu.sampling import sample
from contentv_torch_npu.train import build_model


def check_world(recipe: RewardRecipe, world: int) -> None:
    """ConfigError (one line naming the key) unless `world` processes run the recipe's mesh (training's rules; how
    the batch splits over the mesh is checked when the recipe loads)."""
    try:
        check_mesh(recipe.mesh, world, recipe.model_config)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def local_batch(
    batch: dict[str, np.ndarray], prompts: list[str], topo: Topology
) -> tuple[dict[str, np.ndarray], list[str]]:
    """This data-parallel group's rows of a step's batch (rollout and SFT rows) and prompts."""
    batch = {k: v[tr.row_slice(len(v), topo)] for k, v in batch.items()}
    return batch, prompts[tr.row_slice(len(prompts), topo)]


class _TorchBlackBox:
    """A torch CLIP reward as a black-box scorer on uint8 numpy frames (GRPO, evaluation)."""

    def __init__(self, reward, device: torch.device):
        self.reward, self.device = reward, device

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, prompts) -> np.ndarray:
        x = torch.from_numpy(frames.astype(np.float32) / 255.0).to(self.device)
        return self.reward(x, list(prompts)).float().cpu().numpy()


def _eval_reward(model, decoder, score, data: RewardData, recipe: RewardRecipe, topo: Topology, updates: int) -> dict:
    """Mean and seed-to-seed std of the reward of ODE samples (the plain sampler) from the held-out seeds of the model
    after `updates` updates, split over the data-parallel groups (a group without a seed samples the first one and
    drops it: every rank takes part in the sharded forwards)."""
    batch, prompts = data.evaluation()
    mine = np.array_split(np.arange(len(prompts)), topo.dp)[topo.dp_rank]
    rows = mine if len(mine) else np.arange(1)
    batch = {k: v[rows] for k, v in batch.items()}
    r = recipe.rollout
    latents = sample(model, batch["noise"], batch["text"], batch["pooled"], batch["neg_text"], batch["neg_pooled"],
                     steps=r.steps, guidance=r.guidance, shift=r.shift, progress=False)  # fmt: skip
    frames = tr.decode_frames(decoder, torch.from_numpy(latents).to(topo.device), r.reward_frames)
    rewards = score_black_box(score, to_uint8(frames.float().cpu().numpy()), [prompts[i] for i in rows])[: len(mine)]
    if topo.world > 1:  # every group's rewards in row order, padded to one length with NaN (dropped)
        padded = np.full(-(-len(prompts) // topo.dp), np.nan, np.float32)
        padded[: len(rewards)] = rewards
        gathered = tr.gather_rows(torch.from_numpy(padded).to(topo.device), topo).cpu().numpy()
        rewards = gathered[~np.isnan(gathered)]
    return eval_record(rewards, prompts, updates)


def _sft_cache(recipe: RewardRecipe, encoders: Encoders, progress: bool, topo: Topology) -> LatentCache | None:
    """The SFT cache, built (when stale) by the main rank while the others wait, then opened by every rank."""
    cache = open_sft_cache(recipe, encoders, progress) if topo.is_main else None
    if topo.world > 1:
        dist.barrier()
        if not topo.is_main:
            cache = open_sft_cache(recipe, encoders, progress=False)
    return cache


@dataclass(frozen=True)
class _Tuned:
    """What a checkpoint holds: the model, its AdamW and, in ema/, the EMA anchor or the EMA of the weights (a recipe
    has at most one)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    anchor: torch.nn.Module | None
    ema: dict[str, torch.Tensor] | None

    def ema_slot(self) -> tuple[dict | None, str]:
        """(what ema/ holds, its name in errors)."""
        if self.anchor is not None:
            return dict(self.anchor.named_parameters()), "EMA anchor"
        return self.ema, "EMA of the weights"


def _resume(
    recipe: RewardRecipe, checkpoints: Checkpointer, tuned: _Tuned, topo: Topology
) -> tuple[ResumePoint | None, RewardLog | None]:
    """(resume point, log) of the run: None and a fresh log, or the latest checkpoint's counters with model, AdamW
    and EMA anchor or EMA of the weights restored in place and the log cut back to that step. The log is the main
    rank's (None elsewhere)."""
    if checkpoints.latest_step() is None:
        return None, RewardLog(recipe.log_dir) if topo.is_main else None
    meta = checkpoints.restore_data()
    point = ResumePoint.read({**meta.get("counters", {}), "step": meta.get("step")}, recipe, checkpoints.folder())
    checkpoints.restore(tuned.model, tuned.optimizer, *tuned.ema_slot())  # after the counters: clear errors first
    return point, RewardLog(recipe.log_dir, keep_lines=point.log_lines) if topo.is_main else None


def _save(recipe: RewardRecipe, checkpoints: Checkpointer, tuned: _Tuned, point: ResumePoint) -> None:
    """The checkpoint of `point` (the training Checkpointer's formats) with the EMA anchor or the EMA of the weights
    in ema/; a LoRA run writes its adapters (the EMA of the weights' when kept) to `<checkpoint.dir>/lora.safetensors`
    as well."""
    adapters = None
    if recipe.lora:  # every rank takes part in gathering
        weights = tuned.ema if tuned.ema is not None else dict(tuned.model.named_parameters())
        adapters = (lora.get_adapters(weights), recipe.lora)
    meta = {"data_position": point.step, "counters": {k: v for k, v in point.as_dict().items() if k != "step"}}
    checkpoints.save(point.step, tuned.model, tuned.optimizer, tuned.ema_slot()[0], meta, adapters=adapters)


def export(recipe: RewardRecipe) -> None:
    """The tuned model of the latest checkpoint as a transformer folder next to the checkpoint dir (as the JAX core
    exports it): `<checkpoint.dir>/../transformer`, and the EMA of the weights as `transformer_ema` when kept (the
    checkpoint's ema/ holds the EMA anchor instead with `refl.anchor: ema`); a LoRA run's adapters merged."""
    step = ckpt.latest_checkpoint(recipe.checkpoint.dir)
    root = Path(recipe.checkpoint.dir).parent
    ckpt.export_weights(step, root / "transformer", "model", recipe.lora)
    if recipe.optimizer.ema_decay is not None:
        ckpt.export_weights(step, root / "transformer_ema", "ema", recipe.lora)


def run(recipe: RewardRecipe, progress: bool = True, device: str = "auto") -> dict[str, Any]:
    """Train per the recipe on its mesh (as many processes as it has ranks), resuming from `checkpoint.dir` when it
    holds a checkpoint; returns the last step's record. The main rank holds the checkpoint dir's run lock from the
    start to the end."""
    check_world(recipe, dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1")))
    topo = init_distributed(device, recipe.mesh, recipe.model_config)
    checkpoints = Checkpointer(recipe.checkpoint, topo)
    try:
        return _run(recipe, progress and topo.is_main, topo, checkpoints)
    finally:
        checkpoints.close()


def _run(recipe: RewardRecipe, progress: bool, topo: Topology, checkpoints: Checkpointer) -> dict[str, Any]:
    from contentv_torch_npu.encoders import named_encoders

    dev = topo.device
    encoders = named_encoders(recipe.encoders, recipe.seed, device=dev)
    data = RewardData(recipe, encoders, _sft_cache(recipe, encoders, progress, topo))
    refl, grpo = recipe.method == "refl", recipe.grpo
    anchored = uses_anchor(recipe)
    model = build_model(recipe, topo)
    ref_model = build_model(recipe, topo).requires_grad_(False) if anchored else None
    if topo.sp > 1:
        for m in (model, ref_model) if ref_model is not None else (model,):
            enable_sequence_parallel(m, topo.sp_group, dev.type)
    decoder = tr.VaeFirstFrameDecoder(encoders.vae)
    optimizer = make_optimizer(model, recipe.optimizer)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # with LoRA: the adapters
    ema = {n: p.detach().clone() for n, p in trained} if recipe.optimizer.ema_decay else None
    clip = None
    if recipe.reward.kind == "clip":
        from contentv_torch_npu.reward.clip import load_clip_reward

        clip = load_clip_reward(recipe.reward.path, dev)
    scorer = black_box_reward(recipe.reward, _TorchBlackBox(clip, dev) if clip is not None else None)
    reward = (clip if clip is not None else differentiable_builtin(recipe.reward)) if refl else None
    tuned = _Tuned(model, optimizer, ref_model if uses_ema_anchor(recipe) else None, ema)
    point, log = _resume(recipe, checkpoints, tuned, topo)
    start, guard = point.step if point else 0, divergence_guard(recipe, point)
    steps = tqdm(range(start, recipe.steps), desc=f"reward {recipe.method} (torch)", initial=start,
                 total=recipe.steps, disable=not progress)  # fmt: skip
    record: dict[str, Any] = {}
    for step in steps:
        updates = evaluated_updates(step, recipe)
        held_out = _eval_reward(model, decoder, scorer, data, recipe, topo, step) if updates == step else {}
        batch, prompts, step_noise = data.rollout(step, tr.row_slice(data.rows, topo))  # this group's noise alone
        batch.update(data.sft(step))
        batch, prompts = local_batch(batch, prompts, topo)
        tuning = tr.Tuning(recipe.optimizer, optimizer_updates(recipe), guard, step, ema)
        if refl:
            batch["tokens"] = reward.tokenize(prompts)
            metrics = tr.refl_train_step(optimizer, tuning, model, ref_model, decoder, reward,
                                         tr.to_device_batch(batch, dev), recipe.rollout, recipe.refl, topo)  # fmt: skip
        else:
            metrics = tr.grpo_iteration(optimizer, tuning, model, ref_model, decoder, scorer, batch,
                                        step_noise, prompts, recipe.rollout, grpo, topo)  # fmt: skip
        if updates == step + 1:
            held_out = _eval_reward(model, decoder, scorer, data, recipe, topo, updates)
        record = {"step": step, **metrics, **held_out}
        last = step == recipe.steps - 1
        if log is not None:
            log.write(record)
        if (step + 1) % recipe.checkpoint.interval == 0 or last:
            lines = log.lines if log is not None else 0
            point = ResumePoint(
                step + 1, lines, recipe.seed, int(tuned.anchor is not None), int(ema is not None), guard.skipped
            )
            _save(recipe, checkpoints, tuned, point)
        check_divergence(guard, recipe.checkpoint.dir)
    if topo.is_main:
        export(recipe)
    if log is None:
        return record
    log.plot(f"{recipe.method} (torch): {recipe.reward.kind}")
    records = log.records()
    return records[-1] if records else {}
