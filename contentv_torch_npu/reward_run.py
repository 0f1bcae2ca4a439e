"""`run(recipe)`: a reward fine-tuning run (ReFL or GRPO) of the torch transformer, logged per step.

The twin of contentv_jax/reward_run.py (same numpy batches from contentv_common.reward_run, same log and plot);
runs on CPU, CUDA or Ascend NPU (`device="auto"`).

Every `checkpoint.interval` steps (and at the end) the run writes `checkpoint.dir/step_NNNNNNNN/` atomically with the
training checkpoint code (contentv_torch_npu/checkpointing.py: safetensors + JSON): `model/` (our torch weights
format, which `load_transformer` reads: the tuned model), AdamW moments and step, `ema/` = the EMA anchor when
`refl.anchor: ema` or the EMA of the weights when `optimizer.ema_decay` is set, and the counters of `ResumePoint`.
The optimizer is training's (contentv_torch_npu.optim); a divergent update is skipped and counted, more than
`nan_skip_limit` stop the run. A run whose checkpoint dir holds a checkpoint continues from the
latest one and gives the same per-step records as an uninterrupted run; the frozen anchor is rebuilt from the
initial weights (`init_from` or the seed). Checkpoints carry checksums and are verified on resume (a damaged newest
one is skipped for the newest intact one); the run holds the checkpoint dir's lock.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from contentv_common.errors import CheckpointSaveError
from contentv_common.lora_train import write_adapter_file
from contentv_common.reward import to_uint8
from contentv_common.reward_recipe import RewardRecipe
from contentv_common.reward_run import (
    ResumePoint,
    RewardData,
    RewardLog,
    black_box_reward,
    check_divergence,
    differentiable_builtin,
    divergence_guard,
    open_sft_cache,
    optimizer_updates,
    uses_ema_anchor,
)
from contentv_common.run_lock import RunLock
from contentv_common.safetensors_io import CheckpointError
from contentv_torch_npu import checkpointing as ckpt
from contentv_torch_npu import lora
from contentv_torch_npu import reward_train as tr
from contentv_torch_npu.device import resolve_device
from contentv_torch_npu.loading import load_transformer
from contentv_torch_npu.optim import make_optimizer
from contentv_torch_npu.sampling import sample
from contentv_torch_npu.transformer import Transformer


def _model(recipe: RewardRecipe, device: torch.device) -> torch.nn.Module:
    dtype = torch.bfloat16 if recipe.compute_dtype == "bfloat16" else None
    if recipe.init_from is not None:
        return load_transformer(recipe.init_from, compute_dtype=dtype, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return Transformer(recipe.model_config, compute_dtype=dtype).to(device)


class _TorchBlackBox:
    """A torch CLIP reward as a black-box scorer on uint8 numpy frames (GRPO, evaluation)."""

    def __init__(self, reward, device: torch.device):
        self.reward, self.device = reward, device

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, prompts) -> np.ndarray:
        x = torch.from_numpy(frames.astype(np.float32) / 255.0).to(self.device)
        return self.reward(x, list(prompts)).float().cpu().numpy()


def _eval_reward(model, decoder, score, data: RewardData, recipe: RewardRecipe) -> float:
    """Mean reward of ODE samples (the plain sampler) from the held-out seeds."""
    batch, prompts = data.evaluation()
    r = recipe.rollout
    latents = sample(model, batch["noise"], batch["text"], batch["pooled"], batch["neg_text"], batch["neg_pooled"],
                     steps=r.steps, guidance=r.guidance, shift=r.shift, progress=False)  # fmt: skip
    device = next(model.parameters()).device
    frames = tr.decode_first_frame(decoder, torch.from_numpy(latents).to(device)).float().cpu().numpy()
    return float(np.mean(score(to_uint8(frames), prompts)))


def _resume(
    recipe: RewardRecipe,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    anchor: torch.nn.Module | None,
    ema: dict[str, torch.Tensor] | None,
) -> tuple[ResumePoint | None, RewardLog]:
    """(resume point, log) of the run: None and a fresh log, or the latest checkpoint's counters with model, AdamW
    and EMA anchor or EMA of the weights restored in place and the log cut back to that step."""
    ckpt.remove_partial_saves(recipe.checkpoint.dir)
    folder = ckpt.latest_checkpoint(recipe.checkpoint.dir, writer=True)
    if folder is None:
        return None, RewardLog(recipe.log_dir)
    state = ckpt.load_state(folder, verify=False)
    point = ResumePoint.read({**state.counters, "step": state.step}, recipe, folder)
    ckpt.restore_weights(model, state.params)
    ckpt.restore_optimizer(model, optimizer, state)
    if anchor is not None:
        if state.ema is None:
            raise CheckpointError(f"{folder}: the EMA anchor (ema/) is missing")
        ckpt.restore_weights(anchor, state.ema)
    if ema is not None:
        if state.ema is None:
            raise CheckpointError(f"{folder}: the EMA of the weights (ema/) is missing")
        ema.update(ckpt.restore_ema(model, state.ema))
    return point, RewardLog(recipe.log_dir, keep_lines=point.log_lines)


def _save(
    recipe: RewardRecipe,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    anchor: torch.nn.Module | None,
    ema: dict[str, torch.Tensor] | None,
    point: ResumePoint,
) -> None:
    """The checkpoint's ema/ slot holds the EMA anchor or the EMA of the weights (a recipe has at most one); a LoRA
    run writes its adapters (the EMA of the weights' when kept) to `<checkpoint.dir>/lora.safetensors` as well."""
    adapters = lora.get_adapters(ema if ema is not None else dict(model.named_parameters())) if recipe.lora else None
    ema = ema if anchor is None else dict(anchor.named_parameters())
    counters = {k: v for k, v in point.as_dict().items() if k != "step"}
    state = ckpt.gather_state(model, optimizer, ema, step=point.step, data_position=point.step, counters=counters)
    try:
        ckpt.save_state(recipe.checkpoint.dir, state, recipe.checkpoint.keep)
        if adapters is not None:
            write_adapter_file(recipe.checkpoint.dir, adapters, recipe.lora)
    except Exception as e:  # any failure ends the run now, with the previous checkpoint as its resume point
        raise CheckpointSaveError(f"{recipe.checkpoint.dir}: saving step {point.step} failed: {e}") from e


def run(recipe: RewardRecipe, progress: bool = True, device: str = "auto") -> dict[str, Any]:
    """Train per the recipe, resuming from `checkpoint.dir` when it holds a checkpoint; returns the last step's
    record. The checkpoint dir's run lock is held from the start to the end."""
    lock = RunLock.acquire(recipe.checkpoint.dir)
    try:
        return _run(recipe, progress, device)
    finally:
        lock.release()


def _run(recipe: RewardRecipe, progress: bool, device: str) -> dict[str, Any]:
    from contentv_torch_npu.encoders import load_encoders, tiny_encoders

    dev = resolve_device(device)
    encoders = (
        tiny_encoders(recipe.seed, device=dev)
        if recipe.encoders == "tiny"
        else load_encoders(recipe.encoders, device=dev)
    )
    data = RewardData(recipe, encoders, open_sft_cache(recipe, encoders, progress))
    model = _model(recipe, dev)
    if recipe.lora is not None:  # the base frozen, the adapters alone train (contentv_torch_npu.lora)
        lora.add_adapters(model, recipe.lora, recipe.seed)
    decoder = tr.VaeFirstFrameDecoder(encoders.vae)
    refl, grpo = recipe.method == "refl", recipe.grpo
    anchored = recipe.refl.anchor != "none" if refl else grpo.kl_weight > 0
    ref_model = copy.deepcopy(model).requires_grad_(False) if anchored else None
    optimizer = make_optimizer(model, recipe.optimizer)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # with LoRA: the adapters
    ema = {n: p.detach().clone() for n, p in trained} if recipe.optimizer.ema_decay else None
    clip = None
    if recipe.reward.kind == "clip":
        from contentv_torch_npu.reward_clip import load_clip_reward

        clip = load_clip_reward(recipe.reward.path, dev)
    scorer = black_box_reward(recipe.reward, _TorchBlackBox(clip, dev) if clip is not None else None)
    reward = (clip if clip is not None else differentiable_builtin(recipe.reward)) if refl else None
    ema_anchor = ref_model if uses_ema_anchor(recipe) else None
    point, log = _resume(recipe, model, optimizer, ema_anchor, ema)
    start, guard = point.step if point else 0, divergence_guard(recipe, point)
    steps = tqdm(range(start, recipe.steps), desc=f"reward {recipe.method} (torch)", initial=start,
                 total=recipe.steps, disable=not progress)  # fmt: skip
    for step in steps:
        batch, prompts, step_noise = data.rollout(step)
        batch.update(data.sft(step))
        tuning = tr.Tuning(recipe.optimizer, optimizer_updates(recipe), guard, step, ema)
        if refl:
            batch["tokens"] = reward.tokenize(prompts)
            metrics = tr.refl_train_step(optimizer, tuning, model, ref_model, decoder, reward,
                                         tr.to_device_batch(batch, dev), recipe.rollout, recipe.refl)  # fmt: skip
        else:
            metrics = tr.grpo_iteration(optimizer, tuning, model, ref_model, decoder, scorer, batch,
                                        step_noise, prompts, recipe.rollout, grpo)  # fmt: skip
        record = {"step": step, **metrics}
        last = step == recipe.steps - 1
        if step % recipe.rollout.eval_interval == 0 or last:
            record["eval_reward_mean"] = _eval_reward(model, decoder, scorer, data, recipe)
        log.write(record)
        if (step + 1) % recipe.checkpoint.interval == 0 or last:
            _save(recipe, model, optimizer, ema_anchor, ema,
                  ResumePoint(step + 1, log.lines, recipe.seed, int(ema_anchor is not None), int(ema is not None),
                              guard.skipped))  # fmt: skip
        check_divergence(guard, recipe.checkpoint.dir)
    log.plot(f"{recipe.method} (torch): {recipe.reward.kind}")
    records = log.records()
    return records[-1] if records else {}
