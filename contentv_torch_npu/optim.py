"""The one AdamW builder of the torch twin, for flow-matching training (contentv_torch_npu/train.py) and reward
tuning (contentv_torch_npu/reward/train.py); mirrors contentv_jax/optim.py.

AdamW without decay on biases and norm scales (contentv_common.training.optim.decays), its rate set before each update
from contentv_common.training.optim.learning_rate, global-norm clipping as optax's clip_by_global_norm (scale by clip /
norm when the norm exceeds it), a step with a non-finite or out-of-limits loss or gradient norm skipped, and an EMA of
the weights after each applied step.

The update decides on the device: on unsharded parameters AdamW is torch's fused kernel, which leaves parameters,
moments and step count as they were when its `found_inf` flag is set (the mechanism torch's GradScaler uses), and the
EMA is blended with a weight of zero then; the rate may be a device tensor (`DeviceSchedule`). So the training loop
never waits for a step's loss before it starts the next (contentv_torch_npu/train.py). On FSDP's DTensors AdamW is
not fused (`make_optimizer`) and the skip is read on the host.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from contentv_common.config.recipe import OptimizerConfig
from contentv_common.training.optim import decays, learning_rate, schedule_length


def make_optimizer(model: torch.nn.Module, opt: OptimizerConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and kernels only (not on biases and norm scales), as the JAX core.

    Fused (the device decides a skip, see `apply_update`) unless the parameters are FSDP's DTensors: traced by
    contentv_torch_npu.memory_plan, the fused and foreach kernels on DTensors hold every parameter, gradient and
    moment whole (4x the model per rank), so sharded runs take torch's default (per-parameter on DTensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if decays(p.ndim)], "weight_decay": opt.weight_decay},
        {"params": [p for p in params if not decays(p.ndim)], "weight_decay": 0.0},
    ]
    fused = None if any(isinstance(p, DTensor) for p in params) else True  # None: torch's own choice
    return torch.optim.AdamW(groups, lr=opt.lr, betas=opt.betas, eps=opt.eps, fused=fused)


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


def device_step_ok(loss: torch.Tensor, grad_norm: torch.Tensor, limits: torch.Tensor | None) -> torch.Tensor:
    """`step_ok` on the device: a bool tensor, nothing read back."""
    ok = torch.isfinite(loss) & torch.isfinite(grad_norm)
    return ok if limits is None else ok & (loss <= limits[0]) & (grad_norm <= limits[1])


def guard_limits(window: dict[str, torch.Tensor], spike_factor: float | None) -> torch.Tensor:
    """(max loss, max gradient norm) of contentv_common.training.divergence's rule, on the device, from the guard's
    window (`DivergenceGuard.window()` as tensors): `spike_factor` x the median of its good steps once full, else
    infinite."""
    inf = torch.full((2,), math.inf, device=window["losses"].device)
    if spike_factor is None:
        return inf
    size = window["losses"].shape[0]
    medians = torch.stack([window[k].sort().values[size // 2] for k in ("losses", "grad_norms")])
    return torch.where(window["count"] >= size, spike_factor * medians, inf)


def guard_record(
    window: dict[str, torch.Tensor], ok: torch.Tensor, loss: torch.Tensor, grad_norm: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The window after a step: an applied step's loss and gradient norm pushed in (the oldest out)."""

    def push(values: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return torch.where(ok, torch.cat([values[1:], value.to(values.dtype).reshape(1)]), values)

    size = window["losses"].shape[0]
    return {
        "losses": push(window["losses"], loss),
        "grad_norms": push(window["grad_norms"], grad_norm),
        "count": (window["count"] + ok.to(window["count"].dtype)).clamp(max=size),
    }


class DeviceSchedule:
    """The rate of the next applied update, on the device: contentv_common.training.optim.learning_rate tabulated (as
    contentv_jax.optim.lr_schedule) and indexed by a count of applied updates that the device advances."""

    def __init__(self, cfg: OptimizerConfig, total_steps: int | None, applied: int, device: torch.device):
        table = [learning_rate(cfg, i, total_steps) for i in range(schedule_length(cfg, total_steps) + 1)]
        self.rates = torch.tensor(table, dtype=torch.float32, device=device)
        self.applied = torch.tensor(applied, device=device)

    def rate(self) -> torch.Tensor:
        return self.rates[self.applied.clamp(max=len(self.rates) - 1)]

    def advance(self, ok: torch.Tensor) -> None:
        self.applied += ok.to(self.applied.dtype)


@torch.no_grad()
def apply_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    grad_norm: float | torch.Tensor,
    *,
    lr: float | torch.Tensor,
    grad_clip: float | None,
    ema: dict[str, torch.Tensor] | None = None,
    ema_decay: float | None = None,
    ok: torch.Tensor | None = None,
) -> None:
    """Clip (by the given global norm), AdamW at rate `lr`, EMA. With `ok` (a bool tensor) the device decides (the
    host, reading `ok`, for the unfused AdamW of sharded runs): where it is false, parameters, AdamW moments and step
    count and the EMA stay as they were; without, the caller has checked `step_ok`."""
    if ok is not None and not optimizer.defaults["fused"] and not bool(ok):  # only the fused AdamW reads found_inf
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grad_clip is not None and grads:
        norm = torch.as_tensor(grad_norm, dtype=torch.float32, device=grads[0].device)
        torch._foreach_mul_(grads, torch.where(norm > grad_clip, grad_clip / norm, 1.0))
    for group in optimizer.param_groups:
        group["lr"] = lr
    if ok is not None and optimizer.defaults["fused"]:
        optimizer.found_inf = (~ok).float()  # read by the fused AdamW, as GradScaler sets it
    try:
        optimizer.step()
    finally:
        optimizer.__dict__.pop("found_inf", None)
    if ema is not None:  # of the trained parameters (with LoRA: the adapters)
        keep = ema_decay if ok is None else torch.where(ok, ema_decay, 1.0)
        take = 1.0 - ema_decay if ok is None else torch.where(ok, 1.0 - ema_decay, 0.0)
        for name, p in model.named_parameters():
            if name in ema:
                ema[name].mul_(keep).add_(p.detach() * take)
