"""`run(recipe)`: a reward fine-tuning run (ReFL or GRPO) of the JAX transformer, logged per step.

Everything runs in JAX, no torch: text encoders and the SFT data cache through contentv_jax.encoders (numpy in and
out, as in training), the transformer, the VAE decode of the first frame and a CLIP reward. Writes
`<log_dir>/reward_log.jsonl` (reward mean/std per step, held-out reward every `rollout.eval_interval` steps) and
`<log_dir>/reward.png`.

The run uses the recipe's `mesh` as training does (contentv_jax.reward.mesh): the weights, AdamW moments, EMA and
frozen anchor sharded by training's rules, rollout rows over data x fsdp, image tokens over `sequence`; the VAE
decoder and the reward model are replicated. Across processes (several hosts, joined by tools/train.py through
contentv_jax.multihost) every process builds the same numpy batch and takes its blocks, decoded frames and sampled
latents are gathered to all, process 0 writes the log, and checkpoints and the export are written by all together.

Every `checkpoint.interval` steps (and at the end) an orbax checkpoint goes to `checkpoint.dir` through the training
`Checkpointer` (atomic, verified by checksums on resume, the dir locked by this run, `checkpoint.keep` kept): params,
optimizer state, the EMA anchor when `refl.anchor: ema`, the EMA of the weights when `optimizer.ema_decay` is set,
and the counters of `ResumePoint` as JSON. The optimizer is training's (contentv_jax.optim: schedule over the run's
updates, decay mask, clipping); a divergent update is skipped and counted, more than `nan_skip_limit` stop the run.
A run whose checkpoint dir holds a checkpoint continues from the latest one and gives the same per-step records as an
uninterrupted run; the frozen anchor is rebuilt from the initial weights (`init_from` or the seed). At the end the
tuned model is exported as a transformer folder (our JAX format, read by `load_transformer`) next to the checkpoint
dir: `<checkpoint.dir>/../transformer` (and its EMA as `transformer_ema`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from contentv_common.config.reward import RewardRecipe
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
    uses_ema_anchor,
)
from contentv_jax import lora, multihost
from contentv_jax.checkpointing import Checkpointer, abstract_like
from contentv_jax.encoders import Encoders, named_encoders
from contentv_jax.reward import train as jr
from contentv_jax.reward.mesh import (
    build_model,
    device_batch,
    pad_rows,
    place_params,
    replicate,
    reward_mesh,
    sharded_optimizer,
)
from contentv_jax.sampling import sample


def _encoders(recipe: RewardRecipe) -> Encoders:
    """Text encoders and Wan VAE in JAX: the tiny ones (seeded), the demo's or a pipeline folder's."""
    return named_encoders(recipe.encoders, recipe.seed)


def _clip_reward(recipe: RewardRecipe):
    from contentv_jax.reward.clip import load_clip_reward

    return load_clip_reward(recipe.reward.path)


def _eval_reward(model, decoder, score, data: RewardData, recipe: RewardRecipe, mesh: Mesh, updates: int) -> dict:
    """Mean and seed-to-seed std of the reward of ODE samples (the plain sampler) from the held-out seeds (rows padded
    to split over the mesh) of the model after `updates` updates."""
    held_out, prompts = data.evaluation()
    padded, n = pad_rows(held_out, mesh)
    batch = device_batch(padded, mesh)
    r = recipe.rollout
    latents = sample(model, batch["noise"], batch["text"], batch["pooled"], batch["neg_text"], batch["neg_pooled"],
                     steps=r.steps, guidance=r.guidance, shift=r.shift, progress=False)  # fmt: skip
    frames = multihost.to_host(jr.decode_frames(decoder, latents, r.reward_frames))[:n]
    return eval_record(score_black_box(score, to_uint8(frames), prompts), updates)


def _modules(
    model: nnx.Module, optimizer: nnx.Optimizer, anchor: nnx.Module | None, ema: nnx.Module | None
) -> dict[str, nnx.Module]:
    extra = {k: m for k, m in (("anchor", anchor), ("ema", ema)) if m is not None}
    return {"params": model, "optimizer": optimizer, **extra}


def _state(modules: dict[str, nnx.Module]) -> dict[str, Any]:
    """The checkpointed tree: the model's and the anchor's nnx.Params, all of the optimizer's state."""
    return {
        k: nnx.to_pure_dict(nnx.state(m) if k == "optimizer" else nnx.state(m, nnx.Param)) for k, m in modules.items()
    }


def _log(recipe: RewardRecipe, keep_lines: int = 0) -> RewardLog | None:
    """The run's log, written by process 0 alone."""
    return RewardLog(recipe.log_dir, keep_lines) if multihost.is_primary() else None


def _resume(
    recipe: RewardRecipe, checkpointer: Checkpointer, modules: dict[str, nnx.Module]
) -> tuple[ResumePoint | None, RewardLog | None, dict[str, Any] | None]:
    """(resume point, log, divergence guard history) of the run: None, a fresh log and None, or the latest
    checkpoint's counters with the modules restored in place, the log cut back to that step and the guard's state."""
    step = checkpointer.latest_step()
    if step is None:
        return None, _log(recipe), None
    counters = checkpointer.restore_data(step)
    point = ResumePoint.read(counters, recipe, checkpointer.dir / str(step))  # before the tensors: clear errors
    target = abstract_like(_state(modules))
    if point.ema_anchor and "anchor" not in target:  # an EMA anchor this recipe does not use: read, then dropped
        target["anchor"] = target["params"]
    state, _ = checkpointer.restore(target, step)
    for key, module in modules.items():
        current = nnx.state(module) if key == "optimizer" else nnx.state(module, nnx.Param)
        nnx.replace_by_pure_dict(current, state[key])
        nnx.update(module, current)
    return point, _log(recipe, point.log_lines), counters.get("divergence")


def _write_adapters(recipe: RewardRecipe, plan: lora.LoraPlan, model: nnx.Module) -> None:
    """A LoRA run's adapters (the EMA's when kept) as `<checkpoint.dir>/lora.safetensors`."""
    from contentv_common.lora.training import write_adapter_file

    adapters = lora.split_adapters(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    canonical = lora.canonical_adapters(plan, multihost.to_host(adapters))  # every process takes part
    if multihost.is_primary():
        write_adapter_file(recipe.checkpoint.dir, canonical, recipe.lora)


def run(recipe: RewardRecipe, progress: bool = True) -> dict[str, Any]:
    """Train per the recipe, resuming from `checkpoint.dir` when it holds a checkpoint; returns the last step's
    record."""
    mesh = reward_mesh(recipe)
    encoders = _encoders(recipe)
    data = RewardData(recipe, encoders, open_sft_cache(recipe, encoders, progress))
    model = build_model(recipe, mesh)
    plan = lora.adapt_model(model, recipe.lora, recipe.seed) if recipe.lora else None
    if plan is not None:
        place_params(model, mesh)  # the new adapters onto their shards
    decoder = replicate(jr.VaeFirstFrameDecoder(encoders.wan_vae()), mesh)
    refl, grpo = recipe.method == "refl", recipe.grpo
    anchored = recipe.refl.anchor != "none" if refl else grpo.kl_weight > 0
    ref_model = jr.copy_module(model) if anchored else None  # sharded like the model
    optimizer = sharded_optimizer(model, recipe.optimizer, optimizer_updates(recipe), mesh)
    ema = jr.copy_module(model) if recipe.optimizer.ema_decay is not None else None
    clip = replicate(_clip_reward(recipe), mesh) if recipe.reward.kind == "clip" else None
    scorer = black_box_reward(recipe.reward, clip)
    reward = (clip if clip is not None else jr.carried(differentiable_builtin(recipe.reward))) if refl else None
    ema_anchor = ref_model if uses_ema_anchor(recipe) else None
    modules = _modules(model, optimizer, ema_anchor, ema)
    checkpointer = Checkpointer(recipe.checkpoint)
    point, log, history = _resume(recipe, checkpointer, modules)
    start, guard = point.step if point else 0, divergence_guard(recipe, point, history)
    record: dict[str, Any] = {}
    try:
        steps = tqdm(range(start, recipe.steps), desc=f"reward {recipe.method} (jax)", initial=start,
                     total=recipe.steps, disable=not progress)  # fmt: skip
        for step in steps:
            updates = evaluated_updates(step, recipe)
            held_out = _eval_reward(model, decoder, scorer, data, recipe, mesh, step) if updates == step else {}
            batch, prompts, step_noise = data.rollout(step)
            batch.update(data.sft(step))
            tuning = jr.Tuning(guard, step, ema, recipe.optimizer.ema_decay)
            if refl:
                batch["tokens"] = jr.unwrap(reward).tokenize(prompts)
                metrics = jr.refl_train_step(optimizer, model, ref_model, decoder, reward, device_batch(batch, mesh),
                                             recipe.rollout, recipe.refl, tuning, donate=True)  # fmt: skip
            else:
                place = partial(device_batch, mesh=mesh)
                metrics = jr.grpo_iteration(optimizer, model, ref_model, decoder, scorer, batch, step_noise, prompts,
                                            recipe.rollout, grpo, tuning, place, donate=True)  # fmt: skip
            if updates == step + 1:
                held_out = _eval_reward(model, decoder, scorer, data, recipe, mesh, updates)
            record = {"step": step, **{k: float(v) for k, v in metrics.items()}, **held_out}
            last = step == recipe.steps - 1
            if log is not None:
                log.write(record)
            if (step + 1) % recipe.checkpoint.interval == 0 or last:
                point = ResumePoint(step + 1, step + 1, recipe.seed, int(ema_anchor is not None),
                                    int(ema is not None), guard.skipped)  # fmt: skip
                checkpointer.save(step + 1, _state(modules), {**point.as_dict(), "divergence": guard.state()})
                if plan is not None:
                    _write_adapters(recipe, plan, ema if ema is not None else model)
            check_divergence(guard, checkpointer.dir)
    finally:
        checkpointer.close()
    plain = (lambda m: lora.merged_model(m, plan)) if plan is not None else (lambda m: m)  # LoRA: merged
    multihost.export_model(Path(recipe.checkpoint.dir).parent / "transformer", plain(model))
    if ema is not None:
        multihost.export_model(Path(recipe.checkpoint.dir).parent / "transformer_ema", plain(ema))
    if log is None:
        return record
    log.plot(f"{recipe.method} (jax): {recipe.reward.kind}")
    records = log.records()
    return records[-1] if records else {}
