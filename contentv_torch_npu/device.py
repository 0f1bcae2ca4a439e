"""The only place that knows about accelerator vendors: device choice, lazy torch_npu import, collective backend.

Library code elsewhere asks this module; it never names a vendor API itself (a test greps for that).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

_TORCH_NPU: ModuleType | None = None


def set_torch_npu(module: ModuleType | None) -> None:
    """Inject a torch_npu module (tests pass a fake that computes reference formulas); None clears it."""
    global _TORCH_NPU
    _TORCH_NPU = module


def torch_npu() -> ModuleType:
    """The torch_npu module, imported on first use; a clear error where Ascend's CANN stack is absent."""
    global _TORCH_NPU
    if _TORCH_NPU is None:
        try:
            _TORCH_NPU = importlib.import_module("torch_npu")
        except Exception as e:  # ImportError, or OSError/RuntimeError from missing CANN libraries
            raise RuntimeError(
                f"torch_npu is not importable ({type(e).__name__}: {e}); NPU ops need torch_npu with Ascend CANN"
            ) from e
    return _TORCH_NPU


def npu_available() -> bool:
    try:
        return bool(torch_npu().npu.is_available())
    except RuntimeError:
        return False


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks npu, then cuda, then cpu; `npu`, `cuda`, `cpu` (optionally with `:index`) are taken as given."""
    if name == "auto":
        if npu_available():
            return torch.device("npu")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = name.split(":")[0]
    if kind not in ("npu", "cuda", "cpu"):
        raise ValueError(f"device {name!r} is not one of auto, npu, cuda, cpu")
    if kind == "npu":
        torch_npu()  # registers the npu device type with torch
    return torch.device(name)


def dist_backend(device: torch.device) -> str:
    """The torch.distributed backend for a device type: hccl (Ascend), nccl (NVIDIA), gloo (CPU)."""
    return {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}[device.type]
