"""The optimizer's rules both backends share (contentv_jax/optim.py and contentv_torch_npu/optim.py build AdamW from
them, for flow-matching training and reward tuning alike): the learning-rate schedule and which parameters decay.

Written once in plain Python so the two backends agree exactly, step by step.
"""

from __future__ import annotations

import math

from contentv_common.config.recipe import OptimizerConfig


def learning_rate(opt: OptimizerConfig, updates: int, total_steps: int | None) -> float:
    """The rate of AdamW update number `updates` (0-based; skipped steps do not count): linear warm-up from 0 over
    `warmup_steps`, then constant, or cosine decay to 0 at `total_steps` (held at 0 after it)."""
    if updates < opt.warmup_steps:
        return opt.lr * updates / opt.warmup_steps
    if opt.decay == "constant":
        return opt.lr
    span = schedule_length(opt, total_steps) - opt.warmup_steps
    return opt.lr * 0.5 * (1.0 + math.cos(math.pi * min(updates - opt.warmup_steps, span) / span))


def schedule_length(opt: OptimizerConfig, total_steps: int | None) -> int:
    """Updates after which the rate no longer changes: the end of warm-up (constant) or of the cosine decay."""
    if opt.decay == "constant":
        return opt.warmup_steps
    return max(total_steps or 0, opt.warmup_steps + 1)


def decays(per_layer_ndim: int) -> bool:
    """Weight decay applies to matrices and kernels, not to biases and norm scales (1-d per layer)."""
    return per_layer_ndim > 1
