"""LoRA in the torch twin (mirrors contentv_jax/lora.py): adapted linear modules, the adapter tensors by name.

`add_adapters` replaces the targeted `nn.Linear` modules by `LoraLinear`: the base `weight` and `bias` keep their names
(so loading, FSDP2 and the checkpoint formats see the same base keys), frozen and stored in `base_dtype`, plus
`lora_A` [rank, in] and `lora_B` [out, rank] (float32), so the state-dict keys of the adapters are the canonical ones
of contentv_common.lora.adapters (`<module>.lora_A.weight`). Call it before FSDP2's `fully_shard`: the adapters are then
sharded like the base, one unit per block.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from contentv_common import dtypes
from contentv_common.config.recipe import LoraConfig
from contentv_common.errors import ConfigError
from contentv_common.lora.adapters import Lora, adapted, merged_weight, target_modules
from contentv_common.lora.training import initial_adapters

DTYPES = {name: getattr(torch, name) for name in dtypes.DTYPES}  # the shared names as torch dtypes


class LoraLinear(nn.Module):
    """`W x + b + scale B (A x)` with W, b frozen."""

    def __init__(self, base: nn.Linear, rank: int, scale: float):
        super().__init__()
        d_out, d_in = base.weight.shape
        self.weight, self.bias = base.weight, base.bias
        device = base.weight.device
        self.lora_A = nn.Linear(d_in, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, d_out, bias=False, device=device, dtype=torch.float32)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """In `x`'s dtype (under autocast, the compute dtype), as the JAX core promotes to its compute dtype."""
        dt = x.dtype
        y = F.linear(x, self.weight.to(dt), self.bias.to(dt))
        return y + self.scale * F.linear(F.linear(x, self.lora_A.weight.to(dt)), self.lora_B.weight.to(dt))


def adapted_modules(model: nn.Module, lora: LoraConfig) -> list[str]:
    """The canonical modules of `model` (plain, state-dict keys are canonical names) that `lora.targets` pick."""
    return target_modules(model.state_dict().keys(), lora)


def add_adapters(model: nn.Module, lora: LoraConfig, seed: int) -> list[str]:
    """Adapt `model` in place: every parameter frozen and stored in `lora.base_dtype`, the targeted linears replaced
    by LoraLinear with new adapters (contentv_common.lora.training: the values the JAX core starts from). Returns the
    adapted modules."""
    if lora.base_dtype == "bfloat16" and getattr(model, "compute_dtype", None) != torch.bfloat16:
        raise ConfigError("lora.base_dtype: bfloat16 needs compute_dtype: bfloat16 in the torch twin")
    modules = adapted_modules(model, lora)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(DTYPES[lora.base_dtype])
            p.requires_grad_(False)
    shapes = {m: tuple(model.get_submodule(m).weight.shape) for m in modules}
    start = initial_adapters(shapes, lora.rank, seed)
    for m in modules:
        parent, _, name = m.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, name, LoraLinear(getattr(holder, name), lora.rank, lora.scale))
    if not any(p.is_meta for p in model.parameters()):
        set_adapters(model, start)
    return modules


def adapter_names(model: nn.Module) -> list[str]:
    """State-dict names of the adapter matrices of an adapted model."""
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


@torch.no_grad()
def set_adapters(model: nn.Module, adapters: dict[str, np.ndarray]) -> None:
    """Copy canonical adapter arrays into the (possibly FSDP2-sharded) adapted model; every name must fit."""
    params = {n: p for n, p in model.named_parameters() if n in set(adapter_names(model))}
    if set(adapters) != set(params):
        raise KeyError(f"adapters do not match the model: {sorted(set(adapters) ^ set(params))[:3]}")
    for name, p in params.items():
        full = torch.from_numpy(np.ascontiguousarray(adapters[name], np.float32))
        if isinstance(p, DTensor):
            p.copy_(distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements))
        else:
            p.copy_(full)


def get_adapters(tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The adapter entries of named tensors (the model's parameters or its EMA) as canonical float32 arrays,
    gathered from FSDP2 shards (a collective: every rank calls it)."""
    out = {}
    for name, t in tensors.items():
        if ".lora_A." in name or ".lora_B." in name:
            full = t.full_tensor() if isinstance(t, DTensor) else t
            out[name] = full.detach().float().cpu().numpy()
    return out


def export_merged(checkpoint: Path, part: str, scale: float, out: Path) -> Path:
    """A LoRA checkpoint's base (`model/`) with the adapters of `part` (`model` or `ema`: the EMA of the adapters)
    merged in (contentv_common.lora.adapters.merge, `scale` = alpha / rank), written as a plain transformer folder (our
    torch format) that load_transformer reads; one full tensor set on the host (the tiny demo's export; tools/convert.py
    merges at scale)."""
    from contentv_common.checkpoint.formats import read_our_config, write_our_config
    from contentv_common.checkpoint.safetensors_io import AtomicFolder, iter_tensors, weight_files, write_sharded
    from contentv_common.lora.adapters import merge

    def is_adapter(key: str) -> bool:
        return ".lora_A." in key or ".lora_B." in key

    base = {k: v for k, v in iter_tensors(weight_files(checkpoint / "model", "model")) if not is_adapter(k)}
    adapters = {k: v for k, v in iter_tensors(weight_files(checkpoint / part, "model")) if is_adapter(k)}
    with AtomicFolder(out, overwrite=True) as tmp:
        write_our_config(tmp, read_our_config(checkpoint / "model"))
        write_sharded(sorted(merge(base, adapters, scale).items()), tmp, "model", metadata={"format": "pt"})
    return out


def merge_adapters(model: nn.Module, loras: list[Lora]) -> None:
    """Add adapter files (`contentv_common.lora.adapters.open_lora`) to a loaded transformer's weights in place, in
    float32 on the host, cast back once per weight: the very weights `contentv-convert --lora` writes (the JAX core's
    `merge_adapters`)."""
    with torch.no_grad():
        for name, weight in model.state_dict().items():
            if adapted(name, loras):
                weight.copy_(torch.from_numpy(merged_weight(name, weight.float().cpu().numpy(), loras)))
