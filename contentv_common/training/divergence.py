"""Which training steps are skipped as divergent, counted the same way in both backends and kept in checkpoints.

A step is bad when its loss or gradient norm is non-finite, or (with `divergence.spike_factor` set) more than that
factor above the median of the last `divergence.window` good steps; a bad step changes nothing (params, optimizer,
EMA) and is counted. `state()` goes into every checkpoint (the count, the first bad step and the window), so a
resumed run decides exactly as an uninterrupted one and a restart cannot reset the count. More than `limit` bad steps
stop the run; the checkpoints from the first bad step on are then set aside (also one written just before it: its
parameters made that step, and a huge learning rate leaves finite but useless ones), so the run resumes from the last
checkpoint whose next step was good.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from contentv_common.config.recipe import DivergenceConfig


class DivergenceGuard:
    """Skip decisions and counters of one run, on the host. The training steps decide on the device from `window()`
    by the same rule (contentv_jax.optim / contentv_torch_npu.optim `guard_limits`) and report what they decided, one
    step late, to `record`; the reward loops ask `limits()` before each update."""

    def __init__(self, cfg: DivergenceConfig, limit: int, state: dict[str, Any] | None = None):
        self.cfg, self.limit = cfg, limit
        state = state or {}
        self.skipped = int(state.get("skipped", 0))
        self.first_bad_step: int | None = state.get("first_bad_step")
        self.losses = deque((float(v) for v in state.get("losses", [])), maxlen=cfg.window)
        self.grad_norms = deque((float(v) for v in state.get("grad_norms", [])), maxlen=cfg.window)

    def limits(self) -> tuple[float, float]:
        """(max loss, max gradient norm) a step may have to be applied; infinite until the window is full."""
        if self.cfg.spike_factor is None or len(self.losses) < self.cfg.window:
            return math.inf, math.inf
        return (
            self.cfg.spike_factor * sorted(self.losses)[len(self.losses) // 2],
            self.cfg.spike_factor * sorted(self.grad_norms)[len(self.grad_norms) // 2],
        )

    def window(self) -> dict[str, np.ndarray]:
        """The device-side guard's state: the window's losses and gradient norms as float32 arrays of length
        `cfg.window`, oldest first and filled from the end, and how many are filled."""
        n, size = len(self.losses), self.cfg.window
        losses, norms = np.zeros(size, np.float32), np.zeros(size, np.float32)
        losses[size - n :], norms[size - n :] = list(self.losses), list(self.grad_norms)
        return {"losses": losses, "grad_norms": norms, "count": np.asarray(n, np.int32)}

    def is_bad(self, loss: float, grad_norm: float) -> bool:
        max_loss, max_norm = self.limits()
        return not (math.isfinite(loss) and math.isfinite(grad_norm) and loss <= max_loss and grad_norm <= max_norm)

    def record(self, step: int, loss: float, grad_norm: float, applied: bool) -> None:
        """Count step `step` (0-based) as applied or skipped."""
        if applied:
            self.losses.append(float(loss))
            self.grad_norms.append(float(grad_norm))
            return
        self.skipped += 1
        if self.first_bad_step is None:
            self.first_bad_step = step

    @property
    def stopped(self) -> bool:
        return self.skipped > self.limit

    def state(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "first_bad_step": self.first_bad_step,
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
        }

    def stop_message(self, resume: str) -> str:
        return (
            f"{self.skipped} skipped steps (non-finite or spiking loss / gradient norm; limit nan_skip_limit="
            f"{self.limit}), the first at step {self.first_bad_step}; {resume}"
        )
