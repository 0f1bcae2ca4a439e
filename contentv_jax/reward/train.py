"""Reward fine-tuning of the JAX transformer: ReFL / DRaFT-K reward backprop and GRPO (Flow-GRPO / DanceGRPO).

ReFL: sample from noise with the flow-match Euler sampler; the early steps run without gradient, the last K steps
carry it (each step rematerialised, so memory is one step's activations whatever K); the first latent frame alone is
decoded (the causal VAE decodes it without the others) and scored. loss = -w_r mean(reward) + w_sft FM loss on a real
batch + w_a anchor, the anchor being |v - v_ref|^2 on the K differentiable steps against a frozen copy or an EMA of
the weights (for equal-variance Gaussian steps this is the KL up to a constant).

GRPO: rollouts in groups per prompt that explore (SDE, contentv_common.reward.sde) in the trained steps alone and
take Euler steps after them, any black-box reward on uint8 frames, group-normalised advantages, PPO-clipped ratio of
per-step Gaussian log-probs (of the noise grid's cell means when set), optional KL to the reference policy.

Both share the numpy schedule, noise and SFT draws with the torch twin (contentv_torch_npu/reward/train.py), so the
same weights and inputs give the same gradients. The training loop `run(recipe)` lives in contentv_jax/reward/run.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange
from flax import nnx
from jax.sharding import Mesh

from contentv_common.config.reward import GrpoConfig, ReflConfig, RewardRecipe, RolloutConfig
from contentv_common.reward.models import BlackBoxReward, Reward, group_advantages, per_video, score_black_box, to_uint8
from contentv_common.reward.run import uses_anchor, uses_ema_anchor
from contentv_common.reward.sde import gaussian_kl, gaussian_log_prob, sde_mean, sde_schedule
from contentv_common.sampling import euler_step, flow_match_schedule, guidance_batch
from contentv_common.training.divergence import DivergenceGuard
from contentv_common.training.schedules import interpolate, velocity_target
from contentv_jax.lora import trained_filter
from contentv_jax.multihost import to_host
from contentv_jax.optim import ema, keep_if_bad
from contentv_jax.sampling import guided_velocity
from contentv_jax.train import get_trainer, initial_params, step_layout
from contentv_jax.vae import WanVAE

Decoder = Callable[[jax.Array], jax.Array]
"""First-frame latents [B, C, 1, h, w] (normalised, as the transformer sees them) -> RGB [B, H, W, 3] in [0, 1]."""

Batch = dict[str, Any]


def velocity(model: nnx.Module, x: jax.Array, timestep: float, batch: Batch, guidance: float) -> jax.Array:
    """The sampler's (guided) velocity at one step (contentv_jax.sampling.guided_velocity): the cond/uncond pair in
    one forward, uncond first as diffusers."""
    text, pooled, guided = guidance_batch(
        batch["text"], batch["pooled"], batch.get("neg_text"), batch.get("neg_pooled"), guidance
    )
    return guided_velocity(model, x, timestep, text, pooled, guided, guidance)


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


def _sde_arrays(rollout: RolloutConfig, grpo: GrpoConfig) -> dict[str, jax.Array]:
    """Per sampler step: timestep and the SDE coefficients (std 0 and log_std -inf after the explored steps)."""
    schedule = flow_match_schedule(rollout.steps, rollout.shift)
    sched = sde_schedule(schedule, grpo.noise_level, grpo.explored_steps(rollout.steps))
    arrays = {"t": schedule.timesteps, "sigma": sched.sigmas, "dt": sched.dts, "drift": sched.drift,
              "std": sched.std, "log_std": sched.log_std}  # fmt: skip
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def _sde_step_mean(model: nnx.Module, x: jax.Array, c: dict[str, jax.Array], batch: Batch, guidance: float):
    return sde_mean(x, velocity(model, x, c["t"], batch, guidance), c["sigma"], c["dt"], c["drift"])


@nnx.jit(static_argnames=("rollout", "grpo", "explored_only"))
def sde_rollout(model, batch, step_noise, rollout: RolloutConfig, grpo: GrpoConfig, explored_only: bool = False):
    """Sampling without gradient -> (states [S + 1, B, ...], log-probs [n, B]): n = `grpo.explored_steps` SDE steps
    with step_noise [n, B, ...] (the exploration noise drawn in numpy, shared with the torch twin), then the
    deterministic Euler steps; `explored_only`: the states [n + 1, B, ...] of the SDE steps alone (what the loss
    reads)."""
    n = grpo.explored_steps(rollout.steps)
    if step_noise.shape[0] != n:
        raise ValueError(f"step_noise has {step_noise.shape[0]} steps, the rollout explores {n}")
    graphdef, state = nnx.split(model)
    coeffs = _sde_arrays(rollout, grpo)

    def sde_step(x, inputs):
        c, eps = inputs
        mean = _sde_step_mean(nnx.merge(graphdef, state), x, c, batch, rollout.guidance)
        x_next = mean + c["std"] * eps
        return x_next, (x_next, gaussian_log_prob(x_next, mean, c["std"], c["log_std"], grpo.noise_grid))

    def ode_step(x, c):
        x_next = euler_step(x, velocity(nnx.merge(graphdef, state), x, c["t"], batch, rollout.guidance), c["dt"])
        return x_next, x_next

    x0 = batch["noise"]
    x, (sde_states, log_probs) = jax.lax.scan(sde_step, x0, ({k: v[:n] for k, v in coeffs.items()}, step_noise))
    states = [x0[None], sde_states]
    if n < rollout.steps and not explored_only:
        states.append(jax.lax.scan(ode_step, x, {k: coeffs[k][n:] for k in ("t", "dt")})[1])
    return jnp.concatenate(states), log_probs


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

    batch adds to the rollout inputs: "states" [S + 1, B, ...], "old_log_probs" [n, B] (n: the explored steps),
    "advantages" [B].
    """
    n = grpo.explored_steps(rollout.steps)
    coeffs = {k: v[:n] for k, v in _sde_arrays(rollout, grpo).items()}
    graphdef, params, rest = _split(model)
    ref = nnx.split(ref_model) if ref_model is not None and grpo.kl_weight > 0 else None
    adv = batch["advantages"]
    xs = (coeffs, batch["old_log_probs"], jnp.arange(n))
    # Steps indexed in place (no per-step copies), from rows flattened: the compiler can only lay out the step it
    # takes for the model, never the whole rollout (on TPU it padded all S + 1 states ~10x to put frames minor).
    states, shape = batch["states"].reshape(*batch["states"].shape[:2], -1), batch["states"].shape[1:]

    def step_loss(p: nnx.State, inputs) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        c, old_logp, i = inputs
        x, x_next = states[i].reshape(shape), states[i + 1].reshape(shape)
        mean = _sde_step_mean(nnx.merge(graphdef, p, rest), x, c, batch, rollout.guidance)
        ratio = jnp.exp(gaussian_log_prob(x_next, mean, c["std"], c["log_std"], grpo.noise_grid) - old_logp)
        clipped = jnp.clip(ratio, 1.0 - grpo.clip_range, 1.0 + grpo.clip_range)
        policy = jnp.mean(-jnp.minimum(ratio * adv, clipped * adv)) / n
        kl = jnp.zeros((), jnp.float32)
        if ref is not None:
            ref_mean = jax.lax.stop_gradient(_sde_step_mean(nnx.merge(*ref), x, c, batch, rollout.guidance))
            kl = jnp.mean(gaussian_kl(mean, ref_mean, c["std"], grpo.noise_grid)) / n
        clip_fraction = jnp.mean(jnp.abs(ratio - 1.0) > grpo.clip_range) / n
        return grpo.policy_weight * policy + grpo.kl_weight * kl, (policy, kl, clip_fraction)

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
    loss = grpo.policy_weight * policy + grpo.kl_weight * kl + grpo.sft_weight * sft
    metrics = {"loss": loss, "policy_loss": policy, "kl": kl, "sft_loss": sft, "clip_fraction": clip_fraction}
    return loss, grads, metrics


@nnx.jit(static_argnames=("rollout", "grpo"))
def grpo_grads(model, ref_model, batch, rollout, grpo):
    return grpo_loss(model, ref_model, batch, rollout, grpo)


@nnx.jit(static_argnames=("which",))
def decode_frames(decoder, latents, which: str = "first"):
    """`reward_frames` compiled -> RGB [B, F, H, W, 3] in [0, 1] (for black-box scoring and logging)."""
    return reward_frames(decoder, latents, which)


def decode_first_frame(decoder, latents):
    """Decode latent frame 0 -> RGB [B, H, W, 3] in [0, 1]."""
    return decode_frames(decoder, latents)[:, 0]


def to_device_batch(batch: dict[str, np.ndarray]) -> Batch:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _weights(obj: Any) -> dict[str, Any]:
    """An nnx.Module's arrays as a pure dict (what the jitted step takes as arguments); nothing for a plain callable."""
    return nnx.to_pure_dict(nnx.state(obj)) if isinstance(obj, nnx.Module) else {}


def _with_weights(obj: Any, weights: dict[str, Any]) -> Any:
    """`obj` holding `weights` (traced, inside the step); a plain callable as it is."""
    if not isinstance(obj, nnx.Module):
        return obj
    graphdef, state = nnx.split(obj)
    nnx.replace_by_pure_dict(state, weights)
    return nnx.merge(graphdef, state)


class RewardTuner:
    """Reward tuning of one recipe on one mesh, on training's functional state and jitted update.

    The state is the trainer's (contentv_jax.train.Trainer: params, AdamW state, EMA, the divergence guard's window,
    counters) plus `anchor` when the loss has a reference policy: the trained part of the initial weights (frozen) or
    their running average (`refl.anchor: ema`). One update is the ReFL or GRPO gradients, then the trainer's `apply`
    (guarded AdamW, EMA) and the EMA anchor, compiled by the trainer's `compile_step` as one program with the state
    donated and held to training's shardings. `decoder` (frame decoding) and `reward` (ReFL's differentiable reward)
    are frozen: their weights, placed by the caller (replicated on a mesh), are arguments of that program.
    """

    def __init__(self, recipe: RewardRecipe, mesh: Mesh, decoder: Any, reward: Any = None):
        self.recipe, self.decoder, self.reward = recipe, decoder, reward
        self.trainer = get_trainer(recipe, mesh)
        self.refl = recipe.method == "refl"
        self.anchored, self.ema_anchor = uses_anchor(recipe), uses_ema_anchor(recipe)
        self.frozen = {"decoder": _weights(decoder), "reward": _weights(reward)}
        self._compiled: dict[tuple, Callable] = {}

    # ---- state -------------------------------------------------------------------------------------------------

    def init_state(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A fresh sharded state from `params` (a pure dict; None: the recipe's `init_from`, else its seeded init),
        the anchor a copy of the trained part."""
        t = self.trainer
        state = t.init_state(params if params is not None else initial_params(self.recipe, t.mesh))
        if self.anchored:
            shardings = t.trained(t.param_shardings)[0]
            copy = jax.jit(lambda x: jax.tree.map(jnp.copy, x), out_shardings=shardings)  # own buffers: donated
            state["anchor"] = copy(t.trained(state["params"])[0])
        return state

    def abstract_state(self) -> dict[str, Any]:
        """Shapes, dtypes and shardings of the whole state (nothing allocated)."""
        state = self.trainer.abstract_state()
        if self.anchored:
            state["anchor"] = self.trainer.trained(state["params"])[0]
        return state

    def checkpointed(self, state: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint holds: the trainer's tree, with the anchor when it is an EMA (a frozen anchor is the
        initial weights, rebuilt on resume)."""
        out = self.trainer.checkpointed(state)
        if not self.ema_anchor:
            out.pop("anchor", None)
        return out

    def model(self, state: dict[str, Any]) -> nnx.Module:
        """The model the state's parameters make (for rollouts, sampling and evaluation)."""
        return self.trainer.model(state["params"])

    # ---- the update --------------------------------------------------------------------------------------------

    def _models(self, state: dict[str, Any]) -> tuple[nnx.Module, nnx.Module | None]:
        t = self.trainer
        if "anchor" not in state:
            return t.model(state["params"]), None
        return t.model(state["params"]), t.model(t.join(state["anchor"], t.trained(state["params"])[1]))

    def _step(self, state: dict[str, Any], inputs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        """Loss and gradients of the recipe's method, the trainer's guarded update, then the EMA anchor."""
        r, t = self.recipe, self.trainer
        model, ref = self._models(state)
        batch, frozen = inputs["batch"], inputs["frozen"]
        if self.refl:
            decoder = _with_weights(self.decoder, frozen["decoder"])
            reward = _with_weights(self.reward, frozen["reward"])
            loss, grads, metrics = refl_loss(model, ref, decoder, reward, batch, r.rollout, r.refl)
        else:
            loss, grads, metrics = grpo_loss(model, ref, batch, r.rollout, r.grpo)
        new, out = t.apply(state, loss, nnx.to_pure_dict(grads))
        if self.ema_anchor:
            average = ema(state["anchor"], t.trained(new["params"])[0], r.refl.anchor_ema_decay)
            new["anchor"] = keep_if_bad(out["ok"], average, state["anchor"])
        return new, {**metrics, **out}

    def compiled(self, state: dict[str, Any], batch: Batch) -> tuple[Callable, dict[str, Any]]:
        """(the jitted update for this state and batch layout, its second argument: the batch and frozen weights).
        Kept by this tuner, not the shared trainer, so a finished run's frozen weights are not held after it."""
        inputs = {"batch": batch, "frozen": self.frozen}
        key = step_layout(state, batch)
        if key not in self._compiled:
            self._compiled[key] = self.trainer.compile_step(self._step, state, inputs)
        return self._compiled[key], inputs

    def update(
        self, state: dict[str, Any], batch: Batch, guard: DivergenceGuard | None = None, step: int = 0
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """One update on a placed batch -> (state, metrics with "skipped"), recorded in the run's host-side `guard`
        under `step` when given (a skipped update changes nothing)."""
        compiled, inputs = self.compiled(state, batch)
        state, metrics = compiled(state, inputs)
        out = {k: float(v) for k, v in jax.device_get(metrics).items()}
        ok = bool(out.pop("ok"))
        if guard is not None:
            guard.record(step, out["loss"], out["grad_norm"], ok)
        return state, {**out, "skipped": int(not ok)}

    def grpo_iteration(
        self,
        state: dict[str, Any],
        batch: dict[str, np.ndarray],
        step_noise: np.ndarray,
        prompts: Sequence[str],
        black_box: BlackBoxReward,
        place: Callable[[dict[str, np.ndarray]], Batch] | None = None,
        guard: DivergenceGuard | None = None,
        step: int = 0,
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """Rollout (SDE, no gradient) -> decode -> black-box rewards on uint8 -> advantages -> `updates_per_rollout`
        updates -> (state, the last update's metrics with "skipped" counting the iteration's skipped updates, and the
        rollouts' reward mean and std when `grpo.scores_rollouts()`).

        `batch` holds consecutive groups of `grpo.group_size` rows sharing a prompt; `prompts` has one entry per row.
        `place` puts host arrays on the devices (contentv_jax.reward.mesh.device_batch on a mesh; default: one device).
        """
        rollout, grpo = self.recipe.rollout, self.recipe.grpo
        place = place or to_device_batch
        device_batch = place({**batch, "step_noise": step_noise})
        noise = device_batch.pop("step_noise")
        scored = grpo.scores_rollouts()
        states, log_probs = sde_rollout(self.model(state), device_batch, noise, rollout, grpo, explored_only=not scored)
        advantages = np.zeros(len(prompts), np.float32)  # unread by the loss when not scored
        if scored:
            frames = to_host(decode_frames(self.decoder, states[-1], rollout.reward_frames))  # all rows, every process
            rewards = score_black_box(black_box, to_uint8(frames), list(prompts))
            advantages = group_advantages(rewards, grpo.group_size)
        device_batch.update(states=states, old_log_probs=log_probs, **place({"advantages": advantages}))
        skipped = 0
        for _ in range(grpo.updates_per_rollout):
            state, metrics = self.update(state, device_batch, guard, step)
            skipped += metrics["skipped"]
        metrics["skipped"] = skipped
        if scored:
            metrics.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()))
        return state, metrics
