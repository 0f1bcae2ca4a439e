"""`run(recipe)`: a reward fine-tuning run (ReFL or GRPO) of the JAX transformer, logged per step.

Everything runs in JAX, no torch: text encoders and the SFT data cache through contentv_jax.encoders (numpy in and
out, as in training), the transformer, the VAE decode of the first frame and a CLIP reward. Writes
`<log_dir>/reward_log.jsonl` (reward mean/std per step, held-out reward every `rollout.eval_interval` steps) and
`<log_dir>/reward.png`.

The run keeps training's state on the recipe's `mesh` (contentv_jax.reward.train.RewardTuner on
contentv_jax.train.Trainer): the weights, AdamW moments, EMA and anchor sharded by training's rules, rollout rows over
data x fsdp, image tokens over `sequence`; the VAE decoder and the reward model are replicated. Across processes
(several hosts, joined by tools/train.py through contentv_jax.multihost) every process builds the same numpy batch and
takes its blocks, decoded frames and sampled latents are gathered to all, process 0 writes the log, and checkpoints and
the export are written by all together.

Every `checkpoint.interval` steps (and at the end) an orbax checkpoint goes to `checkpoint.dir` through the training
`Checkpointer` (atomic, verified by checksums on resume, the dir locked by this run, `checkpoint.keep` kept): the
trainer's tree (step and skip counters, params, opt_state, the EMA of the weights when `optimizer.ema_decay` is set)
with the EMA anchor when `refl.anchor: ema`, and the counters of `ResumePoint` and the divergence guard as JSON.
Checkpoints of the earlier layout (before reward runs kept the trainer's state) resume too.
The optimizer is training's (contentv_jax.optim: schedule over the run's updates, decay mask, clipping); a divergent
update is skipped and counted, more than `nan_skip_limit` stop the run.
A run whose checkpoint dir holds a checkpoint continues from the latest one and gives the same per-step records as an
uninterrupted run; the frozen anchor is rebuilt from the initial weights (`init_from` or the seed). At the end the
tuned model is exported as a transformer folder (our JAX format, read by `load_transformer`) next to the checkpoint
dir: `<checkpoint.dir>/../transformer` (and its EMA as `transformer_ema`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import Mesh
from tqdm.auto import tqdm

from contentv_common.config.reward import RewardRecipe
from contentv_common.errors import CheckpointError
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
)
from contentv_jax import multihost
from contentv_jax.checkpointing import Checkpointer
from contentv_jax.encoders import Encoders, named_encoders
from contentv_jax.reward import train as jr
from contentv_jax.reward.mesh import device_batch, pad_rows, replicate, reward_mesh
from contentv_jax.sampling import sample
from contentv_jax.train import write_adapters


def _encoders(recipe: RewardRecipe) -> Encoders:
    """Text encoders and Wan VAE in JAX: the tiny ones (seeded), the demo's or a pipeline folder's."""
    return named_encoders(recipe.encoders, recipe.seed)


def _clip_reward(recipe: RewardRecipe):
    from contentv_jax.reward.clip import load_clip_reward

    return load_clip_reward(recipe.reward.path)


def _eval_reward(tuner: jr.RewardTuner, state, score, data: RewardData, mesh: Mesh, updates: int) -> dict:
    """Mean and seed-to-seed std of the reward of ODE samples (the plain sampler) from the held-out seeds (rows padded
    to split over the mesh) of the model after `updates` updates."""
    held_out, prompts = data.evaluation()
    padded, n = pad_rows(held_out, mesh)
    batch = device_batch(padded, mesh)
    r = tuner.recipe.rollout
    texts = (batch["text"], batch["pooled"], batch["neg_text"], batch["neg_pooled"])
    latents = sample(tuner.model(state), batch["noise"], *texts, steps=r.steps, guidance=r.guidance, shift=r.shift,
                     progress=False)  # fmt: skip
    frames = multihost.to_host(jr.decode_frames(tuner.decoder, latents, r.reward_frames))[:n]
    return eval_record(score_black_box(score, to_uint8(frames), prompts), prompts, updates)


def _log(recipe: RewardRecipe, keep_lines: int = 0) -> RewardLog | None:
    """The run's log, written by process 0 alone."""
    return RewardLog(recipe.log_dir, keep_lines) if multihost.is_primary() else None


def _resume(
    recipe: RewardRecipe, checkpointer: Checkpointer, tuner: jr.RewardTuner, state: dict[str, Any]
) -> tuple[dict[str, Any], ResumePoint | None, RewardLog | None, dict[str, Any] | None]:
    """(state, resume point, log, divergence guard history) of the run: `state`, None, a fresh log and None, or the
    latest checkpoint's state and counters, the log cut back to that step and the guard's state."""
    step = checkpointer.latest_step()
    if step is None:
        return state, None, _log(recipe), None
    counters = checkpointer.restore_data(step)
    point = ResumePoint.read(counters, recipe, checkpointer.dir / str(step))  # before the tensors: clear errors
    target = tuner.checkpointed(tuner.abstract_state())
    if point.ema_anchor and "anchor" not in target:  # an EMA anchor this recipe does not use: read, then dropped
        target["anchor"] = tuner.trainer.trained(target["params"])[0]
    try:
        restored, _ = checkpointer.restore(target, step)
    except CheckpointError as e:
        restored = _restore_earlier_layout(tuner, checkpointer, step, point, target, e)
    restored = {k: v for k, v in restored.items() if k != "anchor" or tuner.ema_anchor}
    return {**state, **restored}, point, _log(recipe, point.log_lines), counters.get("divergence")


def _key(path: tuple) -> tuple:
    return tuple(getattr(k, "idx", getattr(k, "name", getattr(k, "key", k))) for k in path)


def _restore_earlier_layout(
    tuner: jr.RewardTuner,
    checkpointer: Checkpointer,
    step: int,
    point: ResumePoint,
    target: dict[str, Any],
    error: CheckpointError,
) -> dict[str, Any]:
    """A checkpoint written before reward runs kept the trainer's state, as the trainer's tree: it held `params`, the
    nnx.Optimizer's state `optimizer` ({step, opt_state}, optax's state as an nnx pure dict) and whole-model
    `anchor` / `ema` trees; the counters come from its JSON. `error` (the trainer layout's) is raised if it is not one
    either."""
    params, trainer = target["params"], tuner.trainer
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target["opt_state"])
    count = jax.ShapeDtypeStruct((), jnp.uint32, sharding=target["step"].sharding)
    earlier = {"params": params,
               "optimizer": {"step": count, "opt_state": unflatten_dict({_key(p): a for p, a in leaves})}}  # fmt: skip
    earlier.update({k: params for k, kept in (("anchor", point.ema_anchor), ("ema", point.ema_weights)) if kept})
    try:
        got, _ = checkpointer.restore(earlier, step)
    except CheckpointError:
        raise error from None
    opt = flatten_dict(got["optimizer"]["opt_state"])
    out = {"params": got["params"],
           "opt_state": jax.tree_util.tree_unflatten(treedef, [opt[_key(p)] for p, _ in leaves])}  # fmt: skip
    updates = point.step * (tuner.recipe.grpo.updates_per_rollout if not tuner.refl else 1)
    for name, value in (("step", updates), ("skipped", point.skipped)):
        out[name] = jax.device_put(np.int32(value), target[name].sharding)
    out.update({k: trainer.trained(got[k])[0] for k in ("anchor", "ema") if k in got})
    return out


def run(recipe: RewardRecipe, progress: bool = True) -> dict[str, Any]:
    """Train per the recipe, resuming from `checkpoint.dir` when it holds a checkpoint; returns the last step's
    record."""
    mesh = reward_mesh(recipe)
    encoders = _encoders(recipe)
    data = RewardData(recipe, encoders, open_sft_cache(recipe, encoders, progress))
    decoder = replicate(jr.VaeFirstFrameDecoder(encoders.wan_vae()), mesh)
    clip = replicate(_clip_reward(recipe), mesh) if recipe.reward.kind == "clip" else None
    scorer = black_box_reward(recipe.reward, clip)
    refl = recipe.method == "refl"
    reward = (clip if clip is not None else differentiable_builtin(recipe.reward)) if refl else None
    tuner = jr.RewardTuner(recipe, mesh, decoder, reward)
    trainer = tuner.trainer
    checkpointer = Checkpointer(recipe.checkpoint)
    state, point, log, history = _resume(recipe, checkpointer, tuner, tuner.init_state())
    start, guard = point.step if point else 0, divergence_guard(recipe, point, history)
    state = trainer.with_guard(state, guard)
    record: dict[str, Any] = {}
    try:
        steps = tqdm(range(start, recipe.steps), desc=f"reward {recipe.method} (jax)", initial=start,
                     total=recipe.steps, disable=not progress)  # fmt: skip
        for step in steps:
            updates = evaluated_updates(step, recipe)
            held_out = _eval_reward(tuner, state, scorer, data, mesh, step) if updates == step else {}
            batch, prompts, step_noise = data.rollout(step)
            batch.update(data.sft(step))
            if refl:
                batch["tokens"] = reward.tokenize(prompts)
                state, metrics = tuner.update(state, device_batch(batch, mesh), guard, step)
            else:
                place = partial(device_batch, mesh=mesh)
                state, metrics = tuner.grpo_iteration(state, batch, step_noise, prompts, scorer, place, guard, step)
            if updates == step + 1:
                held_out = _eval_reward(tuner, state, scorer, data, mesh, updates)
            record = {"step": step, **{k: float(v) for k, v in metrics.items()}, **held_out}
            last = step == recipe.steps - 1
            if log is not None:
                log.write(record)
            if (step + 1) % recipe.checkpoint.interval == 0 or last:
                point = ResumePoint(step + 1, step + 1, recipe.seed, int(tuner.ema_anchor), int("ema" in state),
                                    guard.skipped)  # fmt: skip
                checkpointer.save(step + 1, tuner.checkpointed(state), {**point.as_dict(), "divergence": guard.state()})
                if trainer.lora_plan is not None:
                    write_adapters(recipe, trainer, state)
            check_divergence(guard, checkpointer.dir)
    finally:
        checkpointer.close()
    out = Path(recipe.checkpoint.dir).parent
    multihost.export_model(out / "transformer", trainer.plain_model(state["params"]))  # LoRA: merged
    if "ema" in state:
        multihost.export_model(out / "transformer_ema", trainer.plain_model(trainer.final_params(state)))
    if log is None:
        return record
    log.plot(f"{recipe.method} (jax): {recipe.reward.kind}")
    records = log.records()
    return records[-1] if records else {}
