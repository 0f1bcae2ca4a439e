"""DMD2 distillation of the JAX transformer: a K-step student, the teacher's guided score, a trainable fake score.

One update (`Distiller.step`): the fake score takes `fake_updates` flow-matching updates on fresh student samples
(drawn without gradient), then the student takes one distribution-matching update. For the student: its input at
the trained step k comes from its own earlier steps (backward simulation, no gradient), it predicts x0; x0 is noised
to a drawn sigma; the teacher with classifier-free guidance gives x0_real and the fake score x0_fake there; the
gradient (x0_fake - x0_real) / mean|x0 - x0_real| (per sample, no gradient) is pushed into x0 through
0.5 mse(x0, stop_gradient(x0 - gradient)), whose gradient with respect to x0 is that direction over x0's size.

The schedule and every draw come from contentv_common.distill.schedule, shared with the torch twin
(contentv_torch_npu/distill/train.py), so the same weights and draws give the same losses and gradients.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from contentv_common.config.distill import DistillRecipe, DmdConfig
from contentv_common.distill.schedule import DRAWS, predicted_x0, student_sigmas
from contentv_common.sample_mesh import ONE_DEVICE, pair_rows, split_pair
from contentv_common.sampling import euler_step, guidance_batch, guide
from contentv_common.training.schedules import interpolate, velocity_target
from contentv_jax.optim import guarded_update, make_optimizer

Batch = dict[str, jax.Array]
"""The prompts' rows: text [B, L, D], pooled [B, P], and for a guided real score neg_text and neg_pooled."""


def _velocity(model: nnx.Module, x: jax.Array, sigma: jax.Array, text: jax.Array, pooled: jax.Array) -> jax.Array:
    """The model's velocity at noise level `sigma` (a scalar or one per sample), in float32."""
    timesteps = jnp.broadcast_to(sigma * 1000.0, (x.shape[0],)).astype(jnp.float32)
    return model(x, timesteps, text, pooled).astype(jnp.float32)


def student_x0(model: nnx.Module, x: jax.Array, sigma: jax.Array, batch: Batch) -> jax.Array:
    """One student step: x at `sigma` -> its x0 prediction (conditional, no guidance: the student samples alone)."""
    return predicted_x0(x, _velocity(model, x, sigma, batch["text"], batch["pooled"]), sigma)


def simulated_input(model: nnx.Module, batch: Batch, turn: Batch, sigmas: jax.Array) -> jax.Array:
    """The input of the student's step `turn["k"]` (no gradient): its steps 0 .. k-1 from the start noise, each the
    sampler's Euler step to the next sigma. A loop of traced length: one program for every k."""
    if sigmas.shape[0] == 1:
        return turn["noise"]
    graphdef, state = nnx.split(model)
    state = jax.lax.stop_gradient(state)

    def step(i: jax.Array, x: jax.Array) -> jax.Array:
        v = _velocity(nnx.merge(graphdef, state), x, sigmas[i], batch["text"], batch["pooled"])
        return euler_step(x, v, sigmas[i + 1] - sigmas[i])

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, turn["k"], step, turn["noise"]))


def generated_x0(model: nnx.Module, batch: Batch, turn: Batch, sigmas: jax.Array) -> jax.Array:
    """The student's x0 at its step k from the simulated input (no gradient): the fake score's training sample."""
    x = simulated_input(model, batch, turn, sigmas)
    return jax.lax.stop_gradient(student_x0(model, x, sigmas[turn["k"]], batch))


def real_x0(teacher: nnx.Module, x_t: jax.Array, sigma: jax.Array, batch: Batch, guidance: float) -> jax.Array:
    """The real score: the teacher's x0 with classifier-free guidance (uncond and cond rows in one forward)."""
    text, pooled, guided = guidance_batch(
        batch["text"], batch["pooled"], batch.get("neg_text"), batch.get("neg_pooled"), guidance
    )
    if not guided:
        return predicted_x0(x_t, _velocity(teacher, x_t, sigma, text, pooled), sigma)
    pair = pair_rows(x_t, x_t, ONE_DEVICE)
    v = _velocity(teacher, pair, pair_rows(sigma, sigma, ONE_DEVICE), text, pooled)
    return predicted_x0(x_t, guide(*split_pair(v, ONE_DEVICE), guidance), sigma)


def flow_matching_loss(fake: nnx.Module, x0: jax.Array, batch: Batch, turn: Batch) -> jax.Array:
    """The fake score's flow-matching loss on student samples x0 at the turn's noise levels and noise."""
    noise, sigmas = turn["score_noise"], turn["sigmas"]
    v = _velocity(fake, interpolate(x0, noise, sigmas), sigmas, batch["text"], batch["pooled"])
    return jnp.mean((v - velocity_target(x0, noise)) ** 2)


def fake_loss_and_grads(
    student: nnx.Module, fake: nnx.Module, batch: Batch, turn: Batch, dmd: DmdConfig
) -> tuple[jax.Array, nnx.State]:
    """(the fake score's loss on a fresh student sample, its gradients w.r.t. the fake score's nnx.Params)."""
    x0 = generated_x0(student, batch, turn, jnp.asarray(student_sigmas(dmd)))
    graphdef, params, rest = nnx.split(fake, nnx.Param, ...)
    return jax.value_and_grad(lambda p: flow_matching_loss(nnx.merge(graphdef, p, rest), x0, batch, turn))(params)


def dmd_loss_and_grads(
    student: nnx.Module, fake: nnx.Module, teacher: nnx.Module, batch: Batch, turn: Batch, dmd: DmdConfig
) -> tuple[jax.Array, nnx.State, dict[str, jax.Array]]:
    """(the student's weighted DMD loss, its gradients w.r.t. the student's nnx.Params, metrics)."""
    sigmas = jnp.asarray(student_sigmas(dmd))
    x = simulated_input(student, batch, turn, sigmas)
    graphdef, params, rest = nnx.split(student, nnx.Param, ...)
    noise, score_sigmas = turn["score_noise"], turn["sigmas"]

    def loss_fn(p: nnx.State) -> tuple[jax.Array, dict[str, jax.Array]]:
        x0 = student_x0(nnx.merge(graphdef, p, rest), x, sigmas[turn["k"]], batch)
        fixed = jax.lax.stop_gradient(x0)
        x_t = interpolate(fixed, noise, score_sigmas)
        x0_real = real_x0(teacher, x_t, score_sigmas, batch, dmd.guidance)
        x0_fake = predicted_x0(x_t, _velocity(fake, x_t, score_sigmas, batch["text"], batch["pooled"]), score_sigmas)
        axes = tuple(range(1, x0.ndim))
        normaliser = jnp.mean(jnp.abs(fixed - x0_real), axis=axes, keepdims=True)
        direction = jax.lax.stop_gradient((x0_fake - x0_real) / normaliser)
        dmd_loss = 0.5 * jnp.mean((x0 - jax.lax.stop_gradient(x0 - direction)) ** 2)
        loss = dmd.dmd_weight * dmd_loss
        return loss, {"loss": loss, "dmd_loss": dmd_loss}

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, grads, metrics


@nnx.jit(static_argnames=("dmd",))
def fake_grads(student, fake, batch, turn, dmd):
    """Jitted `fake_loss_and_grads` (parity tests, gradient inspection)."""
    return fake_loss_and_grads(student, fake, batch, turn, dmd)


@nnx.jit(static_argnames=("dmd",))
def dmd_grads(student, fake, teacher, batch, turn, dmd):
    """Jitted `dmd_loss_and_grads` (parity tests, gradient inspection)."""
    return dmd_loss_and_grads(student, fake, teacher, batch, turn, dmd)


class Distiller:
    """DMD2 updates of one recipe on one device, on a functional state: {"student", "fake"} (pure-dict parameters,
    the teacher's tree), {"student_opt", "fake_opt"} (their AdamW states: contentv_jax.optim, the recipe's
    `optimizer` and `fake_optimizer`). The teacher's weights are an argument of the jitted update, never state."""

    def __init__(self, recipe: DistillRecipe, teacher: nnx.Module):
        self.recipe, self.dmd = recipe, recipe.distill
        self.graphdef, self._template, self.buffers = nnx.split(teacher, nnx.Param, ...)
        self.teacher = nnx.to_pure_dict(self._template)
        self.student_tx = make_optimizer(recipe.optimizer, recipe.steps)
        self.fake_tx = make_optimizer(recipe.fake_optimizer, recipe.fake_steps)
        self._update = jax.jit(self._step, donate_argnums=0)

    def model(self, params: dict[str, Any]) -> nnx.Module:
        """The transformer holding `params` (a pure dict of the teacher's tree)."""
        state = jax.tree.map(lambda x: x, self._template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state, self.buffers)

    def init_state(self, student: dict[str, Any] | None = None, fake: dict[str, Any] | None = None) -> dict[str, Any]:
        """A fresh state: student and fake score copies of `student` / `fake` (default: the teacher)."""
        s = jax.tree.map(jnp.copy, student if student is not None else self.teacher)
        f = jax.tree.map(jnp.copy, fake if fake is not None else self.teacher)
        return {"student": s, "fake": f, "student_opt": self.student_tx.init(s), "fake_opt": self.fake_tx.init(f)}

    def _step(
        self, state: dict[str, Any], teacher: dict[str, Any], batch: Batch, draws: Batch
    ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        dmd = self.dmd

        def fake_update(carry: tuple[Any, Any], turn: Batch) -> tuple[tuple[Any, Any], tuple[jax.Array, ...]]:
            params, opt_state = carry
            loss, grads = fake_loss_and_grads(self.model(state["student"]), self.model(params), batch, turn, dmd)
            params, opt_state, _, ok, norm = guarded_update(
                self.fake_tx, params, opt_state, nnx.to_pure_dict(grads), loss, None
            )
            return (params, opt_state), (loss, norm, ok)

        turns = {name: draws[f"fake_{name}"] for name in DRAWS}
        (fake, fake_opt), (fake_losses, fake_norms, fake_ok) = jax.lax.scan(
            fake_update, (state["fake"], state["fake_opt"]), turns
        )
        student_turn = {name: draws[name] for name in DRAWS}
        loss, grads, metrics = dmd_loss_and_grads(
            self.model(state["student"]), self.model(fake), self.model(teacher), batch, student_turn, dmd
        )
        student, student_opt, _, ok, norm = guarded_update(
            self.student_tx, state["student"], state["student_opt"], nnx.to_pure_dict(grads), loss, None
        )
        new = {"student": student, "fake": fake, "student_opt": student_opt, "fake_opt": fake_opt}
        skipped = (~ok).astype(jnp.int32) + jnp.sum(~fake_ok).astype(jnp.int32)
        return new, {**metrics, "grad_norm": norm, "fake_loss": jnp.mean(fake_losses),
                     "fake_grad_norm": jnp.mean(fake_norms), "skipped": skipped}  # fmt: skip

    def step(
        self, state: dict[str, Any], batch: dict[str, Any], draws: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, float]]:
        """One DMD2 update (`fake_updates` fake score updates, then the student's) -> (state, metrics as floats);
        `batch` and `draws` (contentv_common.distill.schedule.update_draws) as numpy or JAX arrays. The state passed
        in is donated."""
        as_jax = {k: jnp.asarray(v) for k, v in batch.items()}
        state, metrics = self._update(state, self.teacher, as_jax, {k: jnp.asarray(v) for k, v in draws.items()})
        return state, {k: float(v) for k, v in jax.device_get(metrics).items()}
