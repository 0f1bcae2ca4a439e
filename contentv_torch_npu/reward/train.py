"""Reward fine-tuning of the torch transformer: ReFL / DRaFT-K reward backprop and GRPO, twin of
contentv_jax/reward/train.py (same schedule, noise, SFT draws and loss terms; see that module for the method).

Runs on CPU, CUDA or Ascend NPU (device-agnostic torch only). Activation memory is one sampler step's whatever the
number of trained steps: ReFL's K differentiable steps are each wrapped in torch.utils.checkpoint, GRPO runs backward
per trained step (`grpo_backward`). Updates go through contentv_torch_npu.optim as in training (schedule, decay mask,
clipping, divergent steps skipped, EMA).

On the training mesh (contentv_torch_npu.distributed: FSDP2 / HSDP, Ulysses) every step function takes the run's
`Topology`: each data-parallel group holds its contiguous share of the batch's rows (`row_slice`), the losses are
means over rows, so FSDP's gradient average over the groups is the whole batch's gradient (losses are scaled by the
sequence-parallel size, whose ranks each hold their tokens' share, as in training); metrics are averaged over the
groups, and GRPO's group advantages and the reward statistics come from every group's rewards. A sharded step is
thus the single-process step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from contentv_common.config.recipe import OptimizerConfig
from contentv_common.config.reward import GrpoConfig, ReflConfig, RolloutConfig
from contentv_common.reward.models import BlackBoxReward, Reward, group_advantages, per_video, score_black_box, to_uint8
from contentv_common.reward.sde import gaussian_kl, gaussian_log_prob, sde_mean, sde_schedule
from contentv_common.sampling import euler_step, flow_match_schedule, guidance_batch
from contentv_common.training.divergence import DivergenceGuard
from contentv_common.training.optim import learning_rate
from contentv_common.training.schedules import interpolate, velocity_target
from contentv_torch_npu.distributed import Topology
from contentv_torch_npu.optim import apply_update, global_grad_norm, step_ok, updates_done
from contentv_torch_npu.sampling import guided_velocity
from contentv_torch_npu.vae import WanVAE

Decoder = Callable[[torch.Tensor], torch.Tensor]
"""First-frame latents [B, C, 1, h, w] (normalised) -> RGB [B, H, W, 3] in [0, 1]."""

Batch = dict[str, torch.Tensor]


def row_slice(rows: int, topo: Topology) -> slice:
    """This data-parallel group's contiguous share of `rows` batch rows, as training's loader splits a batch."""
    if rows % topo.dp:
        raise ValueError(f"{rows} batch rows do not split over {topo.dp} data-parallel groups")
    size = rows // topo.dp
    return slice(topo.dp_rank * size, (topo.dp_rank + 1) * size)


def gather_rows(x: torch.Tensor, topo: Topology) -> torch.Tensor:
    """The whole batch's rows from every group's share `x` (in row order); sequence ranks hold equal shares."""
    if topo.world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(topo.world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts[:: topo.sp])


def mean_over_groups(metrics: dict[str, torch.Tensor], topo: Topology) -> dict[str, torch.Tensor]:
    """Each scalar averaged over the data-parallel groups (equal rows each: the whole batch's mean), one all-reduce."""
    if topo.world == 1:
        return metrics
    names = list(metrics)
    values = torch.stack([metrics[n].detach().float().reshape(()) for n in names])
    dist.all_reduce(values)
    return dict(zip(names, (values / topo.world).unbind(), strict=True))


def velocity(model: torch.nn.Module, x: torch.Tensor, timestep: float, batch: Batch, guidance: float) -> torch.Tensor:
    """The sampler's (guided) velocity at one step (contentv_torch_npu.sampling.guided_velocity) on this rank's rows:
    the cond/uncond pair in one forward, uncond first as diffusers."""
    text, pooled, guided = guidance_batch(
        batch["text"], batch["pooled"], batch.get("neg_text"), batch.get("neg_pooled"), guidance
    )
    return guided_velocity(model, x, float(timestep), text, pooled, guided, guidance)


class VaeFirstFrameDecoder(torch.nn.Module):
    """The reward's decoder: normalised first-frame latents -> RGB [B, H, W, 3] in [0, 1] through the Wan VAE;
    `video` decodes every frame (`rollout.reward_frames: all`).

    The causal VAE decodes latent frame 0 alone into pixel frame 0; its weights are frozen, gradients flow through
    it to the latents.
    """

    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.video(latents[:, :, :1])[:, 0]

    def video(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, f, h, w] -> RGB frames [B, F, H, W, 3] in [0, 1]."""
        video = self.vae.decode(self.vae.denormalize(latents))
        return (video.permute(0, 2, 3, 4, 1).float() + 1.0) * 0.5


def sft_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Flow-matching loss on a real batch: weighted MSE of the velocity against noise - x0 at the drawn sigmas."""
    x0, noise, sigmas = batch["sft_x0"], batch["sft_noise"], batch["sft_sigmas"]
    pred = model(interpolate(x0, noise, sigmas), sigmas * 1000.0, batch["sft_text"], batch["sft_pooled"])
    err = (pred.float() - velocity_target(x0, noise)) ** 2
    return (err.reshape(err.shape[0], -1).mean(-1) * batch["sft_weights"]).mean()


def reward_frames(decoder: Decoder, latents: torch.Tensor, which: str = "first") -> torch.Tensor:
    """What the reward scores -> RGB [B, F, H, W, 3] in [0, 1]: latent frame 0 decoded alone (F = 1, "first") or the
    whole video ("all", a decoder with `video`)."""
    if which == "first":
        return decoder(latents[:, :, :1])[:, None]
    return decoder.video(latents)


def score_frames(decoder: Decoder, reward: Reward, latents: torch.Tensor, tokens: Any, which: str) -> torch.Tensor:
    """Decode (`reward_frames`) and score every frame, each with its video's prompt -> the mean per video [B]."""
    frames = reward_frames(decoder, latents, which)
    b, f = frames.shape[:2]
    tokens = (
        np.repeat(np.asarray(tokens), f, axis=0) if isinstance(tokens, np.ndarray) else tokens.repeat_interleave(f, 0)
    )
    return per_video(reward.score_tokens(frames.reshape(b * f, *frames.shape[2:]), tokens), f)


def refl_loss(
    model: torch.nn.Module,
    ref_model: torch.nn.Module | None,
    decoder: Decoder,
    reward: Reward,
    batch: Batch,
    rollout: RolloutConfig,
    refl: ReflConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss with its graph, metrics: scalars and the per-row "rewards"); call `loss.backward()` for the gradients
    of the model's parameters."""
    schedule = flow_match_schedule(rollout.steps, rollout.shift)
    first_grad = schedule.steps - refl.grad_steps
    x = batch["noise"]
    with torch.no_grad():
        for i in range(first_grad):
            x = euler_step(
                x, velocity(model, x, schedule.timesteps[i], batch, rollout.guidance), float(schedule.step_sizes[i])
            )

    def step(x: torch.Tensor, i: int) -> torch.Tensor:
        return velocity(model, x, schedule.timesteps[i], batch, rollout.guidance)

    anchor = torch.zeros((), device=x.device)
    for i in range(first_grad, schedule.steps):
        v = checkpoint(step, x, i, use_reentrant=False)
        if ref_model is not None:
            with torch.no_grad():
                v_ref = velocity(ref_model, x, schedule.timesteps[i], batch, rollout.guidance)
            anchor = anchor + ((v - v_ref) ** 2).mean() / refl.grad_steps
        x = euler_step(x, v, float(schedule.step_sizes[i]))
    rewards = score_frames(decoder, reward, x, batch["tokens"], rollout.reward_frames).float()
    sft = sft_loss(model, batch) if refl.sft_weight > 0 else torch.zeros((), device=x.device)
    loss = -refl.reward_weight * rewards.mean() + refl.sft_weight * sft + refl.anchor_weight * anchor
    metrics = {"loss": loss.detach(), "reward_mean": rewards.mean().detach(),
               "reward_std": rewards.std(unbiased=False).detach(), "sft_loss": sft.detach(),
               "anchor": anchor.detach(), "rewards": rewards.detach()}  # fmt: skip
    return loss, metrics


@dataclass
class Tuning:
    """What an update needs besides the gradients: the optimizer config and the run's length in updates (the
    learning-rate schedule), the divergence guard (skips and counts divergent updates; None: only non-finite ones are
    skipped, uncounted) with the step it records them under, and the EMA of the weights when the run keeps one."""

    opt: OptimizerConfig
    total_steps: int | None = None
    guard: DivergenceGuard | None = None
    step: int = 0
    ema: dict[str, torch.Tensor] | None = None


def guarded_update(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, loss: float, tuning: Tuning
) -> dict[str, float]:
    """Apply (or skip) the update of the gradients in `.grad` as training does (contentv_torch_npu.optim); clears
    them. Returns the gradient norm and whether it was skipped."""
    norm = float(global_grad_norm(model))
    applied = step_ok(loss, norm, tuning.guard.limits() if tuning.guard else (math.inf, math.inf))
    if applied:
        lr = learning_rate(tuning.opt, updates_done(optimizer), tuning.total_steps)
        apply_update(model, optimizer, norm, lr=lr, grad_clip=tuning.opt.grad_clip, ema=tuning.ema,
                     ema_decay=tuning.opt.ema_decay)  # fmt: skip
    optimizer.zero_grad(set_to_none=True)
    if tuning.guard is not None:
        tuning.guard.record(tuning.step, loss, norm, applied)
    return {"grad_norm": norm, "skipped": float(not applied)}


@torch.no_grad()
def ema_update(ref_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ref <- decay ref + (1 - decay) model, in place: the EMA anchor."""
    for r, p in zip(ref_model.parameters(), model.parameters(), strict=True):
        r.lerp_(p, 1.0 - decay)


def refl_train_step(
    optimizer: torch.optim.Optimizer,
    tuning: Tuning,
    model: torch.nn.Module,
    ref_model: torch.nn.Module | None,
    decoder: Decoder,
    reward: Reward,
    batch: Batch,
    rollout: RolloutConfig,
    refl: ReflConfig,
    topo: Topology | None = None,
) -> dict[str, float]:
    """One ReFL update in place (model, optimizer, EMA anchor), skipped when divergent; returns the metrics.
    `batch` holds this data-parallel group's rows."""
    topo = topo or Topology()
    optimizer.zero_grad(set_to_none=True)
    loss, metrics = refl_loss(model, ref_model, decoder, reward, batch, rollout, refl)
    (loss * topo.sp).backward()
    rewards = gather_rows(metrics.pop("rewards"), topo)
    metrics = mean_over_groups(metrics, topo)
    metrics.update(reward_mean=rewards.mean(), reward_std=rewards.std(unbiased=False))
    out = {k: float(v) for k, v in metrics.items()}
    out.update(guarded_update(optimizer, model, out["loss"], tuning))
    if not out["skipped"] and ref_model is not None and refl.anchor == "ema":
        ema_update(ref_model, model, refl.anchor_ema_decay)
    return out


@torch.no_grad()
def sde_rollout(
    model: torch.nn.Module,
    batch: Batch,
    step_noise: torch.Tensor,
    rollout: RolloutConfig,
    grpo: GrpoConfig,
    explored_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling without gradient -> (states [S + 1, B, ...], log-probs [n, B]): n = `grpo.explored_steps` SDE steps
    with step_noise [n, B, ...], then the deterministic Euler steps; `explored_only`: the states [n + 1, B, ...] of
    the SDE steps alone (what the loss reads)."""
    n = grpo.explored_steps(rollout.steps)
    if step_noise.shape[0] != n:
        raise ValueError(f"step_noise has {step_noise.shape[0]} steps, the rollout explores {n}")
    schedule = flow_match_schedule(rollout.steps, rollout.shift)
    sched = sde_schedule(schedule, grpo.noise_level, n)
    x = batch["noise"]
    states, log_probs = [x], []
    for i in range(n if explored_only else sched.steps):
        v = velocity(model, x, schedule.timesteps[i], batch, rollout.guidance)
        if i < n:
            mean = sde_mean(x, v, float(sched.sigmas[i]), float(sched.dts[i]), float(sched.drift[i]))
            x = mean + float(sched.std[i]) * step_noise[i]
            log_probs.append(gaussian_log_prob(x, mean, float(sched.std[i]), float(sched.log_std[i]), grpo.noise_grid))
        else:
            x = euler_step(x, v, float(sched.dts[i]))
        states.append(x)
    return torch.stack(states), torch.stack(log_probs)


def grpo_backward(
    model: torch.nn.Module,
    ref_model: torch.nn.Module | None,
    batch: Batch,
    rollout: RolloutConfig,
    grpo: GrpoConfig,
    loss_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Clipped GRPO objective over the trained sampler steps (+ KL, + SFT): accumulates its gradients (of the
    objective times `loss_scale`) into the model's `.grad` and returns the metrics.

    Each trained step's terms run backward as soon as they are computed (the objective is a sum over steps, each
    from stored rollout states), so at most one step's activations are alive, whatever the number of trained steps.
    batch adds to the rollout inputs: "states" [S + 1, B, ...], "old_log_probs" [n, B] (n: the explored steps),
    "advantages" [B].
    """
    n = grpo.explored_steps(rollout.steps)
    schedule = flow_match_schedule(rollout.steps, rollout.shift)
    sched = sde_schedule(schedule, grpo.noise_level, n)
    adv = batch["advantages"]
    device = adv.device
    policy, kl, ratios = torch.zeros((), device=device), torch.zeros((), device=device), []
    for i in range(n):
        x, x_next = batch["states"][i], batch["states"][i + 1]
        sigma, dt, drift, std, log_std = (
            float(a[i]) for a in (sched.sigmas, sched.dts, sched.drift, sched.std, sched.log_std)
        )
        mean = sde_mean(x, velocity(model, x, schedule.timesteps[i], batch, rollout.guidance), sigma, dt, drift)
        ratio = torch.exp(gaussian_log_prob(x_next, mean, std, log_std, grpo.noise_grid) - batch["old_log_probs"][i])
        clipped = ratio.clamp(1.0 - grpo.clip_range, 1.0 + grpo.clip_range)
        step_policy = (-torch.minimum(ratio * adv, clipped * adv)).mean() / n
        step_loss = grpo.policy_weight * step_policy
        ratios.append(ratio.detach())
        if ref_model is not None and grpo.kl_weight > 0:
            with torch.no_grad():
                ref_mean = sde_mean(x, velocity(ref_model, x, schedule.timesteps[i], batch, rollout.guidance),
                                    sigma, dt, drift)  # fmt: skip
            step_kl = gaussian_kl(mean, ref_mean, std, grpo.noise_grid).mean() / n
            step_loss = step_loss + grpo.kl_weight * step_kl
            kl = kl + step_kl.detach()
        (step_loss * loss_scale).backward()
        policy = policy + step_policy.detach()
    sft = torch.zeros((), device=device)
    if grpo.sft_weight > 0:
        sft = sft_loss(model, batch)
        (grpo.sft_weight * loss_scale * sft).backward()
        sft = sft.detach()
    r = torch.stack(ratios)
    return {"loss": grpo.policy_weight * policy + grpo.kl_weight * kl + grpo.sft_weight * sft, "policy_loss": policy,
            "kl": kl, "sft_loss": sft, "clip_fraction": ((r - 1.0).abs() > grpo.clip_range).float().mean()}  # fmt: skip


def grpo_train_step(
    optimizer: torch.optim.Optimizer,
    tuning: Tuning,
    model: torch.nn.Module,
    ref_model: torch.nn.Module | None,
    batch: Batch,
    rollout: RolloutConfig,
    grpo: GrpoConfig,
    topo: Topology | None = None,
) -> dict[str, float]:
    """One GRPO update in place, skipped when divergent; returns the metrics. `batch` holds this group's rows."""
    topo = topo or Topology()
    optimizer.zero_grad(set_to_none=True)
    metrics = mean_over_groups(grpo_backward(model, ref_model, batch, rollout, grpo, loss_scale=topo.sp), topo)
    out = {k: float(v) for k, v in metrics.items()}
    out.update(guarded_update(optimizer, model, out["loss"], tuning))
    return out


def grpo_iteration(
    optimizer: torch.optim.Optimizer,
    tuning: Tuning,
    model: torch.nn.Module,
    ref_model: torch.nn.Module | None,
    decoder: Decoder,
    black_box: BlackBoxReward,
    batch: dict[str, np.ndarray],
    step_noise: np.ndarray,
    prompts: Sequence[str],
    rollout: RolloutConfig,
    grpo: GrpoConfig,
    topo: Topology | None = None,
) -> dict[str, float]:
    """Rollout (SDE, no gradient) -> decode frame 0 -> black-box rewards on uint8 -> advantages -> updates.

    The whole batch holds consecutive groups of `grpo.group_size` rows sharing a prompt; `batch`, `step_noise`
    ([n, rows, ...], n the explored steps) and `prompts` hold this data-parallel group's rows (all of them in a single
    process), which it samples and scores; the advantages are normalised over the groups of the whole batch's rewards.
    The metrics are the last update's, with "skipped" counting the skipped updates of the iteration, and the rollouts'
    reward mean and std when `grpo.scores_rollouts()`.
    """
    topo = topo or Topology()
    device = next(model.parameters()).device
    device_batch = to_device_batch(batch, device)
    scored = grpo.scores_rollouts()
    noise = torch.as_tensor(step_noise, device=device)
    states, log_probs = sde_rollout(model, device_batch, noise, rollout, grpo, explored_only=not scored)
    advantages = np.zeros(len(prompts), np.float32)  # unread by the loss when not scored
    if scored:
        frames = decode_frames(decoder, states[-1], rollout.reward_frames).float().cpu().numpy()
        mine = torch.as_tensor(score_black_box(black_box, to_uint8(frames), list(prompts)), device=device)
        rewards = gather_rows(mine, topo).cpu().numpy()
        advantages = group_advantages(rewards, grpo.group_size)[row_slice(len(rewards), topo)]
    device_batch.update(states=states, old_log_probs=log_probs, advantages=torch.as_tensor(advantages, device=device))
    skipped = 0.0
    for _ in range(grpo.updates_per_rollout):
        metrics = grpo_train_step(optimizer, tuning, model, ref_model, device_batch, rollout, grpo, topo)
        skipped += metrics["skipped"]
    metrics["skipped"] = skipped
    if scored:
        metrics.update(reward_mean=float(rewards.mean()), reward_std=float(rewards.std()))
    return metrics


@torch.no_grad()
def decode_frames(decoder: Decoder, latents: torch.Tensor, which: str = "first") -> torch.Tensor:
    """`reward_frames` without gradient -> RGB [B, F, H, W, 3] in [0, 1] (for black-box scoring and logging)."""
    return reward_frames(decoder, latents, which)


def decode_first_frame(decoder: Decoder, latents: torch.Tensor) -> torch.Tensor:
    """Decode latent frame 0 -> RGB [B, H, W, 3] in [0, 1]."""
    return decode_frames(decoder, latents)[:, 0]


def to_device_batch(batch: dict[str, np.ndarray], device: torch.device | str = "cpu") -> Batch:
    return {k: torch.as_tensor(v, device=device) for k, v in batch.items()}
