"""The only place that knows about accelerator vendors: device choice, lazy torch_npu import, collective backend.

Library code elsewhere asks this module; it never names a vendor API itself (a test greps for that). torch_npu is
imported on first use only, so CPU and CUDA environments never need it; tests inject a fake with `set_torch_npu`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

_TORCH_NPU: ModuleType | None = None
DEVICE_TYPES = ("npu", "cuda", "cpu")


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
    if kind not in DEVICE_TYPES:
        raise ValueError(f"device {name!r} is not one of auto, {', '.join(DEVICE_TYPES)}")
    if kind == "npu":
        torch_npu()  # registers the npu device type with torch
    return torch.device(name)


def dist_backend(device: torch.device) -> str:
    """The torch.distributed backend for a device type: hccl (Ascend), nccl (NVIDIA), gloo (CPU)."""
    return {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}[device.type]


def accelerator(device: torch.device) -> ModuleType | None:
    """The per-vendor runtime namespace (torch.npu / torch.cuda) of a device; None for the CPU."""
    if device.type == "npu":
        torch_npu()
        return torch.npu
    if device.type == "cuda":
        return torch.cuda
    return None


def local_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of one process of a multi-process run: accelerator `local_rank` made current, or the CPU."""
    runtime = accelerator(device)
    if runtime is None:
        return torch.device("cpu")
    runtime.set_device(local_rank)
    return torch.device(device.type, local_rank)


def configure_numerics(device: torch.device, allow_tf32: bool) -> None:
    """Exact fp32 matmuls (parity, tests) or TF32/HF32 (speed); NPU tensors stay in plain ND layout."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32
    elif device.type == "npu":
        torch_npu()
        torch.npu.config.allow_internal_format = False
        torch.npu.matmul.allow_hf32 = allow_tf32
        torch.npu.conv.allow_hf32 = allow_tf32


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (timings); a no-op on the CPU."""
    runtime = accelerator(device)
    if runtime is not None:
        runtime.synchronize()
