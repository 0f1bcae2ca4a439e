"""`run(recipe)`: a reward fine-tuning run (ReFL or GRPO) of the JAX transformer, logged per step.

Text encoders and the SFT data cache go through the torch `Encoders` (numpy in and out, as in training); the
transformer, the VAE decode of the first frame and a CLIP reward run in JAX. Writes `<log_dir>/reward_log.jsonl`
(reward mean/std per step, held-out reward every `rollout.eval_interval` steps) and `<log_dir>/reward.png`.

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

from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

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
from contentv_jax import lora
from contentv_jax import reward_train as jr
from contentv_jax.checkpointing import Checkpointer, abstract_like
from contentv_jax.loading import load_transformer, save_jax
from contentv_jax.ops import attention_for
from contentv_jax.optim import model_optimizer
from contentv_jax.sampling import sample
from contentv_jax.transformer import Transformer


def _encoders(recipe: RewardRecipe):
    from contentv_torch_npu.encoders import load_encoders, tiny_encoders

    return tiny_encoders(recipe.seed) if recipe.encoders == "tiny" else load_encoders(recipe.encoders)


def _decoder(recipe: RewardRecipe, encoders) -> jr.VaeFirstFrameDecoder:
    """The Wan VAE in JAX: the pipeline's vae/ folder, or the tiny encoders' VAE moved over through a folder."""
    from contentv_jax.vae import load_vae

    if recipe.encoders != "tiny":
        return jr.VaeFirstFrameDecoder(load_vae(Path(recipe.encoders) / "vae"))
    from contentv_torch_npu.vae import save_vae

    folder = Path(recipe.log_dir) / "tiny_vae"
    save_vae(folder, encoders.vae, overwrite=True)
    return jr.VaeFirstFrameDecoder(load_vae(folder))


def _model(recipe: RewardRecipe) -> nnx.Module:
    dtype = jnp.bfloat16 if recipe.compute_dtype == "bfloat16" else jnp.float32
    attention = attention_for(recipe.attention)
    if recipe.init_from is not None:
        return load_transformer(recipe.init_from, compute_dtype=dtype, attention=attention)
    return Transformer(recipe.model_config, rngs=nnx.Rngs(recipe.seed), dtype=dtype, attention=attention)


def _clip_reward(recipe: RewardRecipe):
    from contentv_jax.reward_clip import load_clip_reward

    return load_clip_reward(recipe.reward.path)


def _eval_reward(model, decoder, score, data: RewardData, recipe: RewardRecipe) -> float:
    """Mean reward of ODE samples (the plain sampler) from the held-out seeds."""
    batch, prompts = data.evaluation()
    r = recipe.rollout
    latents = sample(model, batch["noise"], batch["text"], batch["pooled"], batch["neg_text"], batch["neg_pooled"],
                     steps=r.steps, guidance=r.guidance, shift=r.shift, progress=False)  # fmt: skip
    frames = np.asarray(jr.decode_first_frame(decoder, latents))
    return float(np.mean(score(to_uint8(frames), prompts)))


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


def _resume(
    recipe: RewardRecipe, checkpointer: Checkpointer, modules: dict[str, nnx.Module]
) -> tuple[ResumePoint | None, RewardLog]:
    """(resume point, log) of the run: None and a fresh log, or the latest checkpoint's counters with the modules
    restored in place and the log cut back to that step."""
    step = checkpointer.latest_step()
    if step is None:
        return None, RewardLog(recipe.log_dir)
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
    return point, RewardLog(recipe.log_dir, keep_lines=point.log_lines)


def _write_adapters(recipe: RewardRecipe, plan: lora.LoraPlan, model: nnx.Module) -> None:
    """A LoRA run's adapters (the EMA's when kept) as `<checkpoint.dir>/lora.safetensors`."""
    from contentv_common.lora_train import write_adapter_file

    adapters = lora.split_adapters(nnx.to_pure_dict(nnx.state(model, nnx.Param)))[0]
    write_adapter_file(recipe.checkpoint.dir, lora.canonical_adapters(plan, lora.to_host(adapters)), recipe.lora)


def run(recipe: RewardRecipe, progress: bool = True) -> dict[str, Any]:
    """Train per the recipe, resuming from `checkpoint.dir` when it holds a checkpoint; returns the last step's
    record."""
    encoders = _encoders(recipe)
    data = RewardData(recipe, encoders, open_sft_cache(recipe, encoders, progress))
    model = _model(recipe)
    plan = lora.adapt_model(model, recipe.lora, recipe.seed) if recipe.lora else None
    decoder = _decoder(recipe, encoders)
    refl, grpo = recipe.method == "refl", recipe.grpo
    anchored = recipe.refl.anchor != "none" if refl else grpo.kl_weight > 0
    ref_model = nnx.clone(model) if anchored else None
    optimizer = model_optimizer(model, recipe.optimizer, optimizer_updates(recipe))
    ema = nnx.clone(model) if recipe.optimizer.ema_decay is not None else None
    clip = _clip_reward(recipe) if recipe.reward.kind == "clip" else None
    scorer = black_box_reward(recipe.reward, clip)
    reward = (clip if clip is not None else jr.carried(differentiable_builtin(recipe.reward))) if refl else None
    ema_anchor = ref_model if uses_ema_anchor(recipe) else None
    modules = _modules(model, optimizer, ema_anchor, ema)
    checkpointer = Checkpointer(recipe.checkpoint)
    point, log = _resume(recipe, checkpointer, modules)
    start, guard = point.step if point else 0, divergence_guard(recipe, point)
    try:
        steps = tqdm(range(start, recipe.steps), desc=f"reward {recipe.method} (jax)", initial=start,
                     total=recipe.steps, disable=not progress)  # fmt: skip
        for step in steps:
            batch, prompts, step_noise = data.rollout(step)
            batch.update(data.sft(step))
            tuning = jr.Tuning(guard, step, ema, recipe.optimizer.ema_decay)
            if refl:
                batch["tokens"] = jr.unwrap(reward).tokenize(prompts)
                metrics = jr.refl_train_step(optimizer, model, ref_model, decoder, reward, jr.to_device_batch(batch),
                                             recipe.rollout, recipe.refl, tuning)  # fmt: skip
            else:
                metrics = jr.grpo_iteration(optimizer, model, ref_model, decoder, scorer, batch, step_noise, prompts,
                                            recipe.rollout, grpo, tuning)  # fmt: skip
            record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
            last = step == recipe.steps - 1
            if step % recipe.rollout.eval_interval == 0 or last:
                record["eval_reward_mean"] = _eval_reward(model, decoder, scorer, data, recipe)
            log.write(record)
            if (step + 1) % recipe.checkpoint.interval == 0 or last:
                point = ResumePoint(step + 1, log.lines, recipe.seed, int(ema_anchor is not None),
                                    int(ema is not None), guard.skipped)  # fmt: skip
                checkpointer.save(step + 1, _state(modules), point.as_dict())
                if plan is not None:
                    _write_adapters(recipe, plan, ema if ema is not None else model)
            check_divergence(guard, checkpointer.dir)
    finally:
        checkpointer.close()
    plain = (lambda m: lora.merged_model(m, plan)) if plan is not None else (lambda m: m)  # LoRA: merged
    save_jax(Path(recipe.checkpoint.dir).parent / "transformer", plain(model), overwrite=True)
    if ema is not None:
        save_jax(Path(recipe.checkpoint.dir).parent / "transformer_ema", plain(ema), overwrite=True)
    log.plot(f"{recipe.method} (jax): {recipe.reward.kind}")
    records = log.records()
    return records[-1] if records else {}
