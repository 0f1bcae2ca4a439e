"""The one AdamW builder of the torch twin, for flow-matching training (contentv_torch_npu/train.py) and reward
tuning (contentv_torch_npu/reward_train.py); mirrors contentv_jax/optim.py.

AdamW without decay on biases and norm scales (contentv_common.optim.decays), its rate set before each update from
contentv_common.optim.learning_rate, global-norm clipping as optax's clip_by_global_norm (scale by clip / norm when
the norm exceeds it), a step with a non-finite or out-of-limits loss or gradient norm skipped, and an EMA of the
weights after each applied step.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from contentv_common.optim import decays
from contentv_common.recipe import OptimizerConfig


def make_optimizer(model: torch.nn.Module, opt: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and kernels only (not on biases and norm scales), as the JAX core."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if decays(p.ndim)], "weight_decay": opt.weight_decay},
        {"params": [p for p in params if not decays(p.ndim)], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps)


def global_grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """L2 norm of all gradients over every FSDP shard, from the local shards: each rank's sum of squares, summed over
    the shard ranks (HSDP replicas hold the same shards). `get_total_norm` on the DTensors would gather every full
    gradient onto every rank (a whole fp32 model of temporary memory at real size)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
    norm = torch.nn.utils.get_total_norm(local, 2.0)
    if not sharded:
        return norm
    mesh = sharded[0].device_mesh
    square = norm.float().square()
    dist.all_reduce(square, group=mesh.get_group(mesh.ndim - 1))
    return square.sqrt()


def updates_done(optimizer: torch.optim.Optimizer) -> int:
    """Applied AdamW updates so far (skipped steps do not count), from the optimizer state (survives a resume)."""
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def step_ok(loss: float, grad_norm: float, limits: tuple[float, float] = (math.inf, math.inf)) -> bool:
    """Apply the step? Finite loss and gradient norm, both within `limits` (max loss, max norm)."""
    return math.isfinite(loss) and math.isfinite(grad_norm) and loss <= limits[0] and grad_norm <= limits[1]


@torch.no_grad()
def apply_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_norm: float,
    *,
    lr: float,
    grad_clip: float | None,
    ema: dict[str, torch.Tensor] | None = None,
    ema_decay: float | None = None,
) -> None:
    """Clip (by the given global norm), AdamW at rate `lr`, EMA; the caller has checked `step_ok`."""
    if grad_clip is not None and grad_norm > grad_clip:
        scale = grad_clip / grad_norm
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    if ema is not None:  # of the trained parameters (with LoRA: the adapters)
        for name, p in model.named_parameters():
            if name in ema:
                ema[name].mul_(ema_decay).add_(p.detach(), alpha=1.0 - ema_decay)
