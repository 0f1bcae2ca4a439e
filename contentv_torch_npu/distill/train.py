"""DMD2 distillation of the torch transformer, twin of contentv_jax/distill/train.py (same schedule, draws and loss
terms; see that module for the method).

Runs on CPU, CUDA or Ascend NPU (device-agnostic torch only). The student's simulated steps, the teacher and the
fake score's evaluation in the student's loss run without autograd; updates go through contentv_torch_npu.optim as in
training and reward tuning (schedule, decay mask, clipping, non-finite steps skipped).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from contentv_common.config.distill import DistillRecipe, DmdConfig
from contentv_common.distill.schedule import fake_turn, predicted_x0, student_sigmas
from contentv_common.sample_mesh import ONE_DEVICE, pair_rows, split_pair
from contentv_common.sampling import euler_step, guidance_batch, guide
from contentv_common.training.schedules import interpolate, velocity_target
from contentv_torch_npu.optim import make_optimizer
from contentv_torch_npu.reward.train import Tuning, guarded_update

Batch = dict[str, torch.Tensor]
"""The prompts' rows: text [B, L, D], pooled [B, P], and for a guided real score neg_text and neg_pooled."""


def _velocity(
    model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor
) -> torch.Tensor:
    """The model's velocity at noise level `sigma` (a scalar or one per sample), in float32."""
    timesteps = torch.broadcast_to(sigma * 1000.0, (x.shape[0],)).float()
    return model(x, timesteps, text, pooled).float()


def student_x0(model: torch.nn.Module, x: torch.Tensor, sigma: torch.Tensor, batch: Batch) -> torch.Tensor:
    """One student step: x at `sigma` -> its x0 prediction (conditional, no guidance: the student samples alone)."""
    return predicted_x0(x, _velocity(model, x, sigma, batch["text"], batch["pooled"]), sigma)


@torch.no_grad()
def simulated_input(model: torch.nn.Module, batch: Batch, turn: Batch, sigmas: torch.Tensor) -> torch.Tensor:
    """The input of the student's step `turn["k"]`: its steps 0 .. k-1 from the start noise, each the sampler's Euler
    step to the next sigma."""
    x = turn["noise"]
    for i in range(int(turn["k"])):
        x = euler_step(x, _velocity(model, x, sigmas[i], batch["text"], batch["pooled"]), sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def generated_x0(model: torch.nn.Module, batch: Batch, turn: Batch, sigmas: torch.Tensor) -> torch.Tensor:
    """The student's x0 at its step k from the simulated input: the fake score's training sample."""
    return student_x0(model, simulated_input(model, batch, turn, sigmas), sigmas[int(turn["k"])], batch)


def real_x0(
    teacher: torch.nn.Module, x_t: torch.Tensor, sigma: torch.Tensor, batch: Batch, guidance: float
) -> torch.Tensor:
    """The real score: the teacher's x0 with classifier-free guidance (uncond and cond rows in one forward)."""
    text, pooled, guided = guidance_batch(
        batch["text"], batch["pooled"], batch.get("neg_text"), batch.get("neg_pooled"), guidance
    )
    if not guided:
        return predicted_x0(x_t, _velocity(teacher, x_t, sigma, text, pooled), sigma)
    pair = pair_rows(x_t, x_t, ONE_DEVICE)
    v = _velocity(teacher, pair, pair_rows(sigma, sigma, ONE_DEVICE), text, pooled)
    return predicted_x0(x_t, guide(*split_pair(v, ONE_DEVICE), guidance), sigma)


def _sigmas(dmd: DmdConfig, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(student_sigmas(dmd), device=device)


def fake_loss(
    student: torch.nn.Module, fake: torch.nn.Module, batch: Batch, turn: Batch, dmd: DmdConfig
) -> torch.Tensor:
    """The fake score's flow-matching loss on a fresh student sample (with its graph through the fake score alone)."""
    x0 = generated_x0(student, batch, turn, _sigmas(dmd, turn["noise"].device))
    noise, sigmas = turn["score_noise"], turn["sigmas"]
    v = _velocity(fake, interpolate(x0, noise, sigmas), sigmas, batch["text"], batch["pooled"])
    return ((v - velocity_target(x0, noise)) ** 2).mean()


def dmd_loss(
    student: torch.nn.Module,
    fake: torch.nn.Module,
    teacher: torch.nn.Module,
    batch: Batch,
    turn: Batch,
    dmd: DmdConfig,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(the student's weighted DMD loss with its graph through the student's step k alone, metrics)."""
    sigmas = _sigmas(dmd, turn["noise"].device)
    x = simulated_input(student, batch, turn, sigmas)
    x0 = student_x0(student, x, sigmas[int(turn["k"])], batch)
    noise, score_sigmas = turn["score_noise"], turn["sigmas"]
    with torch.no_grad():
        fixed = x0.detach()
        x_t = interpolate(fixed, noise, score_sigmas)
        x0_real = real_x0(teacher, x_t, score_sigmas, batch, dmd.guidance)
        x0_fake = predicted_x0(x_t, _velocity(fake, x_t, score_sigmas, batch["text"], batch["pooled"]), score_sigmas)
        normaliser = (fixed - x0_real).abs().mean(dim=tuple(range(1, x0.ndim)), keepdim=True)
        direction = (x0_fake - x0_real) / normaliser
    loss_dmd = 0.5 * ((x0 - (x0 - direction).detach()) ** 2).mean()
    loss = dmd.dmd_weight * loss_dmd
    return loss, {"loss": loss.detach(), "dmd_loss": loss_dmd.detach()}


def to_device(arrays: dict[str, Any], device: torch.device | str = "cpu") -> Batch:
    return {k: torch.as_tensor(np.asarray(v), device=device) for k, v in arrays.items()}


class Distiller:
    """DMD2 updates of one recipe, in place: the student and the fake score (trainable copies of the teacher, or of
    the modules given) with their AdamW (contentv_torch_npu.optim: the recipe's `optimizer` and `fake_optimizer`),
    the teacher frozen."""

    def __init__(
        self,
        recipe: DistillRecipe,
        teacher: torch.nn.Module,
        student: torch.nn.Module | None = None,
        fake: torch.nn.Module | None = None,
    ):
        self.recipe, self.dmd = recipe, recipe.distill
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student if student is not None else _trainable_copy(teacher)
        self.fake = fake if fake is not None else _trainable_copy(teacher)
        self.student_opt = make_optimizer(self.student, recipe.optimizer)
        self.fake_opt = make_optimizer(self.fake, recipe.fake_optimizer)
        self.student_tuning = Tuning(recipe.optimizer, recipe.steps)
        self.fake_tuning = Tuning(recipe.fake_optimizer, recipe.fake_steps)

    def step(self, batch: dict[str, Any], draws: dict[str, Any]) -> dict[str, float]:
        """One DMD2 update (`fake_updates` fake score updates, then the student's) -> metrics; `batch` and `draws`
        (contentv_common.distill.schedule.update_draws) as numpy arrays or tensors on the models' device."""
        device = next(self.student.parameters()).device
        batch, draws = to_device(batch, device), to_device(draws, device)
        fake_losses, fake_norms, skipped = [], [], 0.0
        for i in range(self.dmd.fake_updates):
            self.fake_opt.zero_grad(set_to_none=True)
            loss = fake_loss(self.student, self.fake, batch, fake_turn(draws, i), self.dmd)
            loss.backward()
            out = guarded_update(self.fake_opt, self.fake, float(loss.detach()), self.fake_tuning)
            fake_losses.append(float(loss.detach()))
            fake_norms.append(out["grad_norm"])
            skipped += out["skipped"]
        self.student_opt.zero_grad(set_to_none=True)
        loss, metrics = dmd_loss(self.student, self.fake, self.teacher, batch, draws, self.dmd)
        loss.backward()
        out = guarded_update(self.student_opt, self.student, float(loss.detach()), self.student_tuning)
        return {**{k: float(v) for k, v in metrics.items()}, "grad_norm": out["grad_norm"],
                "fake_loss": float(np.mean(fake_losses)), "fake_grad_norm": float(np.mean(fake_norms)),
                "skipped": skipped + out["skipped"]}  # fmt: skip


def _trainable_copy(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model).train().requires_grad_(True)
