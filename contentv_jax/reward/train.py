"""Reward fine-tuning of the JAX transformer: ReFL / DRaFT-K reward backprop and GRPO (Flow-GRPO / DanceGRPO).

ReFL: sample from noise with the flow-match Euler sampler; the early steps run without gradient, the last K steps
carry it (each step rematerialised, so memory is one step's activations whatever K); the first latent frame alone is
decoded (the causal VAE decodes it without the others) and scored. loss = -w_r mean(reward) + w_sft FM loss on a real
batch + w_a anchor, the anchor being |v - v_ref|^2 on the K differentiable steps against a frozen copy or an EMA of
the weights (for equal-variance Gaussian steps this is the KL up to a constant).

GRPO: SDE rollouts (contentv_common.reward.sde) in groups per prompt, any black-box reward on uint8 frames,
group-normalised advantages, PPO-clipped ratio of per-step Gaussian log-probs, optional KL to the reference policy.

Both share the numpy schedule, noise and SFT draws with the torch twin (contentv_torch_npu/reward/train.py), so the
same weights and inputs give the same gradients. The training loop `run(recipe)` lives in contentv_jax/reward/run.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx

from contentv_common.config.reward import GrpoConfig, ReflConfig, RolloutConfig
from contentv_common.reward.models import BlackBoxReward, Reward, group_advantages, per_video, score_black_box, to_uint8
from contentv_common.reward.sde import gaussian_kl, gaussian_log_prob, sde_mean, sde_schedule
from contentv_common.sampling import euler_step, flow_match_schedule, guide, uses_guidance
from contentv_common.training.divergence import DivergenceGuard
from contentv_common.training.schedules import interpolate, velocity_target
from contentv_jax import sharding
from contentv_jax.lora import trained_filter
from contentv_jax.multihost import to_host
from contentv_jax.optim import ema, keep_if_bad, step_ok
from contentv_jax.vae import WanVAE

Decoder = Callable[[jax.Array], jax.Array]
"""First-frame latents [B, C, 1, h, w] (normalised, as the transformer sees them) -> RGB [B, H, W, 3] in [0, 1]."""

Batch = dict[str, Any]


def velocity(model: nnx.Module, x: jax.Array, timestep: float, batch: Batch, guidance: float) -> jax.Array:
    """The (guided) velocity at one sampler step; uncond and cond share one forward, uncond first (diffusers)."""
    guided = uses_guidance(guidance)
    text, pooled = batch["text"], batch["pooled"]
    if guided:
        x_in = jnp.concatenate([x, x])
        text = jnp.concatenate([batch["neg_text"], text])
        pooled = jnp.concatenate([batch["neg_pooled"], pooled])
    else:
        x_in = x
    t = jnp.full((x_in.shape[0],), timestep, jnp.float32)
    v = model(x_in, t, text, pooled).astype(jnp.float32)
    if guided:
        uncond, cond = jnp.split(v, 2)
        v = guide(uncond, cond, guidance)
    return v


@dataclass
class Tuning:
    """What an update needs besides the gradients: the run's divergence guard (skips and counts divergent updates;
    None: only non-finite ones are skipped, uncounted), the step it records them under, and the EMA of the weights
    (`optimizer.ema_decay`) when the run keeps one."""

    guard: DivergenceGuard | None = None
    step: int = 0
    ema: nnx.Module | None = None
    ema_decay: float | None = None


class VaeFirstFrameDecoder(nnx.Module):
    """The reward's decoder: normalised first-frame latents -> RGB [B, H, W, 3] in [0, 1] through the Wan VAE;
    `video` decodes every frame (`rollout.reward_frames: all`).

    The causal VAE decodes latent frame 0 alone into pixel frame 0, so a first-frame reward never pays for the whole
    video. The VAE stays frozen (it is not in the optimizer); gradients flow through it to the latents.
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae

    def __call__(self, latents: jax.Array) -> jax.Array:
        return self.video(latents[:, :, :1])[:, 0]

    def video(self, latents: jax.Array) -> jax.Array:
        """Normalised latents [B, C, f, h, w] -> RGB frames [B, F, H, W, 3] in [0, 1]."""
        video = self.vae.decode(self.vae.denormalize(latents))
        return (rearrange(video, "b c f h w -> b f h w c").astype(jnp.float32) + 1.0) * 0.5


def sft_loss(model: nnx.Module, batch: Batch) -> jax.Array:
    """Flow-matching loss on a real batch: weighted MSE of the velocity against noise - x0 at the drawn sigmas."""
    x0, noise, sigmas = batch["sft_x0"], batch["sft_noise"], batch["sft_sigmas"]
    pred = model(interpolate(x0, noise, sigmas), sigmas * 1000.0, batch["sft_text"], batch["sft_pooled"])
    err = (pred.astype(jnp.float32) - velocity_target(x0, noise)) ** 2
    return jnp.mean(err.reshape(err.shape[0], -1).mean(-1) * batch["sft_weights"])


def reward_frames(decoder: Decoder, latents: jax.Array, which: str = "first") -> jax.Array:
    """What the reward scores -> RGB [B, F, H, W, 3] in [0, 1]: latent frame 0 decoded alone (F = 1, "first") or the
    whole video ("all", a decoder with `video`)."""
    if which == "first":
        return unwrap(decoder)(latents[:, :, :1])[:, None]
    return unwrap(decoder).video(latents)


def score_frames(decoder: Decoder, reward: Reward, latents: jax.Array, tokens: jax.Array, which: str) -> jax.Array:
    """Decode (`reward_frames`) and score every frame, each with its video's prompt -> the mean per video [B]."""
    frames = reward_frames(decoder, latents, which)
    b, f = frames.shape[:2]
    scores = unwrap(reward).score_tokens(frames.reshape(b * f, *frames.shape[2:]), jnp.repeat(tokens, f, axis=0))
    return per_video(scores, f)


class Carried(nnx.Module):
    """A plain callable (a built-in reward, a fixture decoder) carried through nnx.jit as a static graph attribute;
    rewards and decoders that are nnx.Modules (ClipReward, the VAE) pass as they are, weights as jit arguments."""

    def __init__(self, obj: Any):
        self.obj = obj


def carried(obj: Any) -> nnx.Module:
    return obj if isinstance(obj, nnx.Module) else Carried(obj)


def unwrap(obj: Any) -> Any:
    return obj.obj if isinstance(obj, Carried) else obj


def _split(model: nnx.Module):
    """(graphdef, trained parameters, the rest): with LoRA the adapters alone train (contentv_jax.lora)."""
    return nnx.split(model, trained_filter(model), ...)


def refl_loss(
    model: nnx.Module,
    ref_model: nnx.Module | None,
    decoder: nnx.Module,
    reward: nnx.Module,
    batch: Batch,
    rollout: RolloutConfig,
    refl: ReflConfig,
) -> tuple[jax.Array, nnx.State, dict[str, jax.Array]]:
    """(loss, grads w.r.t. the model's nnx.Param state, metrics). Call inside nnx.jit (see `refl_grads`).

    Sampler steps run under lax.scan (one compiled step body however many steps); the differentiable ones are
    rematerialised with jax.checkpoint.
    """
    schedule = flow_match_schedule(rollout.steps, rollout.shift)
    graphdef, params, rest = _split(model)
    first_grad = schedule.steps - refl.grad_steps
    ts, dts = jnp.asarray(schedule.timesteps), jnp.asarray(schedule.step_sizes)
    ref = nnx.split(ref_model) if ref_model is not None else None

    def loss_fn(p: nnx.State):
        frozen = jax.lax.stop_gradient(p)

        def no_grad_step(x, t_dt):
            v = velocity(nnx.merge(graphdef, frozen, rest), x, t_dt[0], batch, rollout.guidance)
            return euler_step(x, v, t_dt[1]), None

        x, _ = jax.lax.scan(no_grad_step, batch["noise"], (ts[:first_grad], dts[:first_grad]))
        x = jax.lax.stop_gradient(x)

        @jax.checkpoint
        def grad_step(carry, t_dt):
            x, anchor = carry
            v = velocity(nnx.merge(graphdef, p, rest), x, t_dt[0], batch, rollout.guidance)
            if ref is not None:
                v_ref = jax.lax.stop_gradient(velocity(nnx.merge(*ref), x, t_dt[0], batch, rollout.guidance))
                anchor = anchor + jnp.mean((v - v_ref) ** 2) / refl.grad_steps
            return (euler_step(x, v, t_dt[1]), anchor), None

        init = (x, jnp.zeros((), jnp.float32))
        (x, anchor), _ = jax.lax.scan(grad_step, init, (ts[first_grad:], dts[first_grad:]))
        rewards = score_frames(decoder, reward, x, batch["tokens"], rollout.reward_frames).astype(jnp.float32)
        sft = sft_loss(nnx.merge(graphdef, p, rest), batch) if refl.sft_weight > 0 else jnp.zeros((), jnp.float32)
        loss = -refl.reward_weight * jnp.mean(rewards) + refl.sft_weight * sft + refl.anchor_weight * anchor
        metrics = {"loss": loss, "reward_mean": jnp.mean(rewards), "reward_std": jnp.std(rewards),
                   "sft_loss": sft, "anchor": anchor}  # fmt: skip
        return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, metrics


@nnx.jit(static_argnames=("rollout", "refl"))
def refl_grads(model, ref_model, decoder, reward, batch, rollout, refl):
    """Jitted `refl_loss`: (loss, grads, metrics) without an optimizer step (parity tests, gradient inspection).

    `decoder` and `reward` are nnx.Modules or plain callables wrapped with `carried`."""
    return refl_loss(model, ref_model, decoder, reward, batch, rollout, refl)


def _apply_gradients(
    optimizer: nnx.Optimizer,
    model: nnx.Module,
    grads: nnx.State,
    loss: jax.Array,
    limits: jax.Array,
    ema_model: nnx.Module | None = None,
    ema_decay: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Optimizer update in place (call inside nnx.jit).

    As in training (contentv_jax.optim): a non-finite loss or gradient norm, or one above `limits` (max loss, max
    norm), leaves model, optimizer and EMA untouched. Returns (applied, gradient norm).
    """
    ok, grad_norm = step_ok(loss, grads, limits)
    params, opt_state = nnx.state(model, nnx.Param), nnx.state(optimizer)
    old_params, old_opt = nnx.to_pure_dict(params), nnx.to_pure_dict(opt_state)
    optimizer.update(model, grads)
    _keep_if_bad(model, nnx.Param, ok, old_params)
    _keep_if_bad(optimizer, ..., ok, old_opt)
    if ema_model is not None:
        _ema_if_ok(ema_model, model, ema_decay, ok)
    return ok, grad_norm


apply_gradients = nnx.jit(_apply_gradients, static_argnames=("ema_decay",))
"""Jitted `_apply_gradients`, kept apart from the loss so one compiled loss serves inspection and training."""


def _keep_if_bad(module: nnx.Module, kind: Any, ok: jax.Array, old: dict) -> None:
    state = nnx.state(module, kind)
    nnx.replace_by_pure_dict(state, keep_if_bad(ok, nnx.to_pure_dict(state), old))
    nnx.update(module, state)


def _ema_if_ok(average_model: nnx.Module, model: nnx.Module, decay: float, ok: jax.Array) -> None:
    """average <- decay average + (1 - decay) model where the update was applied, in place."""
    average = nnx.state(average_model, nnx.Param)
    old = nnx.to_pure_dict(average)
    nnx.replace_by_pure_dict(average, ema(old, nnx.to_pure_dict(nnx.state(model, nnx.Param)), decay))
    nnx.update(average_model, average)
    _keep_if_bad(average_model, nnx.Param, ok, old)


def _limits(tuning: Tuning) -> jax.Array:
    return jnp.asarray(tuning.guard.limits() if tuning.guard else (np.inf, np.inf), jnp.float32)


def _record(tuning: Tuning, loss: jax.Array, ok: jax.Array, grad_norm: jax.Array) -> tuple[bool, float]:
    ok, grad_norm = bool(ok), float(grad_norm)
    if tuning.guard is not None:
        tuning.guard.record(tuning.step, float(loss), grad_norm, ok)
    return ok, grad_norm


def guarded_update(optimizer, model, loss, grads, tuning: Tuning) -> tuple[bool, float]:
    """Apply (or skip) one update on the host side of the divergence guard: (applied, gradient norm)."""
    ok, grad_norm = apply_gradients(optimizer, model, grads, loss, _limits(tuning), tuning.ema, tuning.ema_decay)
    return _record(tuning, loss, ok, grad_norm)


@nnx.jit(static_argnames=("decay",))
def ema_update(ref_model: nnx.Module, model: nnx.Module, decay: float) -> None:
    """ref <- decay ref + (1 - decay) model, in place: the EMA anchor."""
    ref_params, params = nnx.state(ref_model, nnx.Param), nnx.state(model, nnx.Param)
    nnx.update(ref_model, jax.tree.map(lambda r, p: decay * r + (1.0 - decay) * p, ref_params, params))


def _pin(model: nnx.Module, optimizer: nnx.Optimizer, grads: nnx.State, *copies: nnx.Module | None) -> None:
    """On a mesh (the model's `constrain` hook knows it), hold the gradients, the updated weights and their copies
    (EMA, anchor) to training's parameter shardings and each optimizer moment to its parameter's, as training's
    jitted step does with its out_shardings; left to propagation, XLA may lay the updated state out otherwise."""
    mesh = getattr(getattr(model, "constrain", None), "mesh", None)
    if mesh is None:
        return
    where = sharding.param_shardings(nnx.to_pure_dict(nnx.state(model, nnx.Param)), mesh)

    def pin(state: nnx.State, shardings: Any) -> None:
        nnx.replace_by_pure_dict(state, jax.lax.with_sharding_constraint(nnx.to_pure_dict(state), shardings))

    pin(grads, sharding.param_shardings(nnx.to_pure_dict(grads), mesh))  # LoRA: the adapters alone
    for module in (model, *copies):
        if module is not None:
            state = nnx.state(module, nnx.Param)
            pin(state, where)
            nnx.update(module, state)
    state = nnx.state(optimizer)
    pin(state, sharding.like_params_shardings(nnx.to_pure_dict(state), where, mesh))
    nnx.update(optimizer, state)


def _refl_update(optimizer, model, ref_model, decoder, reward, batch, limits, ema_model, rollout, refl, ema_decay):
    """Loss, gradients, guarded update, EMA of the weights and EMA anchor in one program (see `refl_update`)."""
    loss, grads, metrics = refl_loss(model, ref_model, decoder, reward, batch, rollout, refl)
    _pin(model, optimizer, grads)
    ok, grad_norm = _apply_gradients(optimizer, model, grads, loss, limits, ema_model, ema_decay)
    if ref_model is not None and refl.anchor == "ema":
        _ema_if_ok(ref_model, model, refl.anchor_ema_decay, ok)
    _pin(model, optimizer, grads, ema_model, ref_model)
    return ok, grad_norm, metrics


def _grpo_update(optimizer, model, ref_model, batch, limits, ema_model, rollout, grpo, ema_decay):
    """Loss, gradients, guarded update and EMA of the weights in one program (see `grpo_update`)."""
    loss, grads, metrics = grpo_loss(model, ref_model, batch, rollout, grpo)
    _pin(model, optimizer, grads)
    ok, grad_norm = _apply_gradients(optimizer, model, grads, loss, limits, ema_model, ema_decay)
    _pin(model, optimizer, grads, ema_model, ref_model)
    return ok, grad_norm, metrics


# One reward update as one compiled program, as training's step: the gradients never leave the device program. The
# `_in_place` variants donate every module argument: the model, optimizer and EMAs are replaced by the update, and
# nnx.jit returns the state of the unchanged ones too (anchor, decoder, reward), which then alias their inputs
# instead of being copied. So the state is counted once, as in training; the modules must share no arrays
# (copy_module, not nnx.clone).
_REFL_STATIC = ("rollout", "refl", "ema_decay")
_GRPO_STATIC = ("rollout", "grpo", "ema_decay")
_MODULES = ("optimizer", "model", "ref_model", "ema_model")
refl_update = nnx.jit(_refl_update, static_argnames=_REFL_STATIC)
refl_update_in_place = nnx.jit(
    _refl_update, static_argnames=_REFL_STATIC, donate_argnames=(*_MODULES, "decoder", "reward")
)
grpo_update = nnx.jit(_grpo_update, static_argnames=_GRPO_STATIC)
grpo_update_in_place = nnx.jit(_grpo_update, static_argnames=_GRPO_STATIC, donate_argnames=_MODULES)


def copy_module(module: nnx.Module) -> nnx.Module:
    """A copy with its own buffers (same shardings): nnx.clone shares arrays, which donation would free."""
    copy = nnx.clone(module)
    nnx.update(copy, jax.tree.map(jnp.copy, nnx.state(copy)))
    return copy


def refl_train_step(
    optimizer, model, ref_model, decoder, reward, batch, rollout, refl, tuning: Tuning | None = None, donate=False
) -> dict[str, Any]:
    """One ReFL update in place (model, optimizer, EMA anchor), skipped when divergent; returns the metrics.
    `donate` frees the old buffers (modules from copy_module)."""
    tuning = tuning or Tuning()
    update = refl_update_in_place if donate else refl_update
    ok, grad_norm, metrics = update(optimizer, model, ref_model, decoder, reward, batch, _limits(tuning), tuning.ema,
                                    rollout, refl, tuning.ema_decay)  # fmt: skip
    applied, grad_norm = _record(tuning, metrics["loss"], ok, grad_norm)
    return {**metrics, "grad_norm": grad_norm, "skipped": int(not applied)}


def _sde_arrays(rollout: RolloutConfig, noise_level: float) -> dict[str, jax.Array]:
    schedule = flow_match_schedule(rollout.steps, rollout.shift)
    sched = sde_schedule(schedule, noise_level)
    arrays = {"t": schedule.timesteps, "sigma": sched.sigmas, "dt": sched.dts, "drift": sched.drift,
              "std": sched.std, "log_std": sched.log_std}  # fmt: skip
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def _sde_step_mean(model: nnx.Module, x: jax.Array, c: dict[str, jax.Array], batch: Batch, guidance: float):
    return sde_mean(x, velocity(model, x, c["t"], batch, guidance), c["sigma"], c["dt"], c["drift"])


@nnx.jit(static_argnames=("rollout", "noise_level"))
def sde_rollout(model, batch, step_noise, rollout: RolloutConfig, noise_level: float):
    """SDE sampling without gradient -> (states [S + 1, B, ...], log-probs [S, B]); step_noise [S, B, ...] is the
    exploration noise drawn in numpy (shared with the torch twin)."""
    graphdef, state = nnx.split(model)

    def step(x, inputs):
        c, eps = inputs
        mean = _sde_step_mean(nnx.merge(graphdef, state), x, c, batch, rollout.guidance)
        x_next = mean + c["std"] * eps
        return x_next, (x_next, gaussian_log_prob(x_next, mean, c["std"], c["log_std"]))

    x0 = batch["noise"]
    _, (states, log_probs) = jax.lax.scan(step, x0, (_sde_arrays(rollout, noise_level), step_noise))
    return jnp.concatenate([x0[None], states]), log_probs


def grpo_loss(
    model: nnx.Module,
    ref_model: nnx.Module | None,
    batch: Batch,
    rollout: RolloutConfig,
    grpo: GrpoConfig,
) -> tuple[jax.Array, nnx.State, dict[str, jax.Array]]:
    """Clipped GRPO objective over the trained sampler steps (+ KL, + SFT): (loss, grads, metrics).

    The objective is a sum over steps, each from stored rollout states, so a lax.scan over the trained steps takes
    each step's gradient as soon as its forward is done and adds it to a carried sum (as the torch twin runs backward
    per step): memory holds one step's activations and two gradient-sized buffers, whatever the number of steps;
    the SFT term's gradient starts the sum.

    batch adds to the rollout inputs: "states" [S + 1, B, ...], "old_log_probs" [S, B], "advantages" [B].
    """
    n = min(grpo.train_steps or rollout.steps, rollout.steps)
    coeffs = {k: v[:n] for k, v in _sde_arrays(rollout, grpo.noise_level).items()}
    graphdef, params, rest = _split(model)
    ref = nnx.split(ref_model) if ref_model is not None and grpo.kl_weight > 0 else None
    adv = batch["advantages"]
    xs = (coeffs, batch["old_log_probs"][:n], jnp.arange(n))
    # Steps indexed in place (no per-step copies), from rows flattened: the compiler can only lay out the step it
    # takes for the model, never the whole rollout (on TPU it padded all S + 1 states ~10x to put frames minor).
    states, shape = batch["states"].reshape(*batch["states"].shape[:2], -1), batch["states"].shape[1:]

    def step_loss(p: nnx.State, inputs) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        c, old_logp, i = inputs
        x, x_next = states[i].reshape(shape), states[i + 1].reshape(shape)
        mean = _sde_step_mean(nnx.merge(graphdef, p, rest), x, c, batch, rollout.guidance)
        ratio = jnp.exp(gaussian_log_prob(x_next, mean, c["std"], c["log_std"]) - old_logp)
        clipped = jnp.clip(ratio, 1.0 - grpo.clip_range, 1.0 + grpo.clip_range)
        policy = jnp.mean(-jnp.minimum(ratio * adv, clipped * adv)) / n
        kl = jnp.zeros((), jnp.float32)
        if ref is not None:
            ref_mean = jax.lax.stop_gradient(_sde_step_mean(nnx.merge(*ref), x, c, batch, rollout.guidance))
            kl = jnp.mean(gaussian_kl(mean, ref_mean, c["std"])) / n
        clip_fraction = jnp.mean(jnp.abs(ratio - 1.0) > grpo.clip_range) / n
        return policy + grpo.kl_weight * kl, (policy, kl, clip_fraction)

    def step(carry, inputs):
        grads, sums = carry
        (_, terms), g = jax.value_and_grad(step_loss, has_aux=True)(params, inputs)
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, terms)), None

    def weighted_sft(p: nnx.State) -> tuple[jax.Array, jax.Array]:
        sft = sft_loss(nnx.merge(graphdef, p, rest), batch)
        return grpo.sft_weight * sft, sft

    zero = jnp.zeros((), jnp.float32)
    if grpo.sft_weight > 0:  # its gradient starts the sum: no second gradient-sized buffer beside the steps' sum
        (_, sft), grads = jax.value_and_grad(weighted_sft, has_aux=True)(params)
    else:
        sft, grads = zero, jax.tree.map(jnp.zeros_like, params)
    (grads, (policy, kl, clip_fraction)), _ = jax.lax.scan(step, (grads, (zero, zero, zero)), xs)
    loss = policy + grpo.kl_weight * kl + grpo.sft_weight * sft
    metrics = {"loss": loss, "policy_loss": policy, "kl": kl, "sft_loss": sft, "clip_fraction": clip_fraction}
    return loss, grads, metrics


@nnx.jit(static_argnames=("rollout", "grpo"))
def grpo_grads(model, ref_model, batch, rollout, grpo):
    return grpo_loss(model, ref_model, batch, rollout, grpo)


def grpo_train_step(
    optimizer, model, ref_model, batch, rollout, grpo, tuning: Tuning | None = None, donate=False
) -> dict[str, Any]:
    """One GRPO update in place, skipped when divergent; returns the metrics. `donate` as in `refl_train_step`."""
    tuning = tuning or Tuning()
    update = grpo_update_in_place if donate else grpo_update
    ok, grad_norm, metrics = update(optimizer, model, ref_model, batch, _limits(tuning), tuning.ema, rollout, grpo,
                                    tuning.ema_decay)  # fmt: skip
    applied, grad_norm = _record(tuning, metrics["loss"], ok, grad_norm)
    return {**metrics, "grad_norm": grad_norm, "skipped": int(not applied)}


def grpo_iteration(
    optimizer: nnx.Optimizer,
    model: nnx.Module,
    ref_model: nnx.Module | None,
    decoder: nnx.Module,
    black_box: BlackBoxReward,
    batch: dict[str, np.ndarray],
    step_noise: np.ndarray,
    prompts: Sequence[str],
    rollout: RolloutConfig,
    grpo: GrpoConfig,
    tuning: Tuning | None = None,
    place: Callable[[dict[str, np.ndarray]], Batch] | None = None,
    donate: bool = False,
) -> dict[str, float]:
    """Rollout (SDE, no gradient) -> decode frame 0 -> black-box rewards on uint8 -> advantages -> updates.

    `batch` holds consecutive groups of `grpo.group_size` rows sharing a prompt; `prompts` has one entry per row.
    `place` puts host arrays on the devices (contentv_jax.reward.mesh.device_batch on a mesh; default: one device).
    The metrics are the last update's, with "skipped" counting the skipped updates of the iteration.
    """
    place = place or to_device_batch
    device_batch = place({**batch, "step_noise": step_noise})
    noise = device_batch.pop("step_noise")
    states, log_probs = sde_rollout(model, device_batch, noise, rollout, grpo.noise_level)
    frames = to_host(decode_frames(decoder, states[-1], rollout.reward_frames))  # every row's, in every process
    rewards = score_black_box(black_box, to_uint8(frames), list(prompts))
    device_batch.update(states=states, old_log_probs=log_probs,
                        **place({"advantages": group_advantages(rewards, grpo.group_size)}))  # fmt: skip
    skipped = 0
    for _ in range(grpo.updates_per_rollout):
        metrics = grpo_train_step(optimizer, model, ref_model, device_batch, rollout, grpo, tuning, donate)
        skipped += metrics["skipped"]
    out = {k: float(v) for k, v in metrics.items()}
    out["skipped"] = skipped
    out.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()))
    return out


@nnx.jit(static_argnames=("which",))
def decode_frames(decoder, latents, which: str = "first"):
    """`reward_frames` compiled -> RGB [B, F, H, W, 3] in [0, 1] (for black-box scoring and logging)."""
    return reward_frames(decoder, latents, which)


def decode_first_frame(decoder, latents):
    """Decode latent frame 0 -> RGB [B, H, W, 3] in [0, 1]."""
    return decode_frames(decoder, latents)[:, 0]


def to_device_batch(batch: dict[str, np.ndarray]) -> Batch:
    return {k: jnp.asarray(v) for k, v in batch.items()}
