"""The one AdamW builder of the JAX core, for flow-matching training (contentv_jax/train.py) and reward tuning
(contentv_jax/reward/train.py, on the trainer's state); the torch twin is contentv_torch_npu/optim.py.

Global-norm clipping, then AdamW whose rate follows contentv_common.training.optim.learning_rate (read from a table of
that function, so both backends use the same numbers) and whose decay skips biases and norm scales; a step whose loss or
gradient norm is non-finite or above the divergence guard's limits changes nothing; EMA of the weights after each
applied step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from contentv_common.config.recipe import OptimizerConfig
from contentv_common.training.optim import decays, learning_rate, schedule_length
from contentv_jax.transformer import layer_axes


def lr_schedule(cfg: OptimizerConfig, total_steps: int | None) -> optax.Schedule:
    """The shared schedule as an optax schedule: update count -> rate, constant after `schedule_length`."""
    table = np.asarray([learning_rate(cfg, i, total_steps) for i in range(schedule_length(cfg, total_steps) + 1)])
    rates = table.astype(np.float32)
    return lambda count: jnp.asarray(rates)[jnp.minimum(count, len(rates) - 1)]


def decay_mask(params: Any) -> Any:
    """True where weight decay applies; the stacked blocks' leading layer axis does not count as a dimension."""
    return jax.tree_util.tree_map_with_path(lambda path, p: decays(p.ndim - layer_axes(path)), params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int | None) -> optax.GradientTransformation:
    """Global-norm clipping (when `grad_clip` is set), then AdamW with the shared schedule and decay mask."""
    adamw = optax.adamw(
        lr_schedule(cfg, total_steps),
        b1=cfg.betas[0],
        b2=cfg.betas[1],
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    return adamw if cfg.grad_clip is None else optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)


def applied_updates(opt_state: Any) -> int:
    """How many updates an optimizer state from `make_optimizer` has applied (its count, which skipped steps keep)."""
    return int(optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1])


def step_ok(loss: jax.Array, grads: Any, limits: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(apply?, global gradient norm): finite loss and norm, both within `limits` (max loss, max norm) if given."""
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if limits is not None:
        ok = ok & (loss <= limits[0]) & (grad_norm <= limits[1])
    return ok, grad_norm


def guard_limits(window: dict[str, jax.Array], spike_factor: float | None) -> jax.Array:
    """(max loss, max gradient norm) of contentv_common.training.divergence's rule, on the device: `spike_factor` x the
    median of the window's good steps once it is full, else infinite."""
    if spike_factor is None:
        return jnp.full((2,), jnp.inf, jnp.float32)
    size = window["losses"].shape[0]
    medians = jnp.stack([jnp.sort(window[k])[size // 2] for k in ("losses", "grad_norms")])
    return jnp.where(window["count"] >= size, spike_factor * medians, jnp.inf)


def guard_record(window: dict[str, jax.Array], ok: jax.Array, loss: jax.Array, grad_norm: jax.Array) -> dict:
    """The window after a step: an applied step's loss and gradient norm pushed in (the oldest out)."""

    def push(values: jax.Array, value: jax.Array) -> jax.Array:
        return jnp.where(ok, jnp.concatenate([values[1:], value.astype(values.dtype)[None]]), values)

    size = window["losses"].shape[0]
    return {
        "losses": push(window["losses"], loss),
        "grad_norms": push(window["grad_norms"], grad_norm),
        "count": jnp.minimum(window["count"] + ok.astype(jnp.int32), size),
    }


def keep_if_bad(ok: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the step is applied, else `old`, leaf by leaf."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def ema(average: Any, params: Any, decay: float) -> Any:
    """average <- decay average + (1 - decay) params."""
    return jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, average, params)


def guarded_update(
    tx: optax.GradientTransformation,
    trained: Any,
    opt_state: Any,
    grads: Any,
    loss: jax.Array,
    limits: jax.Array | None,
    average: Any = None,
    decay: float | None = None,
) -> tuple[Any, Any, Any, jax.Array, jax.Array]:
    """One optimizer update of the trained parameters, unless the step diverged (`step_ok`): then parameters, optimizer
    state and the EMA `average` (updated with `decay` when given) stay as they were.
    Returns (parameters, optimizer state, average, applied, gradient norm)."""
    ok, grad_norm = step_ok(loss, grads, limits)
    updates, new_opt_state = tx.update(grads, opt_state, trained)
    new = keep_if_bad(ok, optax.apply_updates(trained, updates), trained)
    if average is not None:
        average = keep_if_bad(ok, ema(average, new, decay), average)
    return new, keep_if_bad(ok, new_opt_state, opt_state), average, ok, grad_norm
