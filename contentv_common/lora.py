"""LoRA adapters, framework-free: which modules a recipe adapts, the adapter file, and merging into full weights.

An adapter on the linear module `m` (canonical name, e.g. `blocks.3.attn.to_q`) is two float32 tensors in the torch
layout, as peft and diffusers store them: `m.lora_A.weight` [rank, in] and `m.lora_B.weight` [out, rank]. The module
computes `W x + b + scale * B (A x)` with `scale = alpha / rank`; B starts at zero, so a new adapter changes nothing.
Our adapter file is one safetensors file of those canonical keys whose metadata holds rank and alpha.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from safetensors import safe_open

from contentv_common.config import ConfigError
from contentv_common.param_table import TRANSFORMER_TABLE, UnknownParameterError
from contentv_common.recipe import LoraConfig

FORMAT = "contentv-lora"


def lora_keys(module: str) -> tuple[str, str]:
    """The canonical keys of the A (down) and B (up) matrices of `module`'s adapter."""
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def _is_linear(module: str) -> bool:
    try:
        return TRANSFORMER_TABLE.from_canonical(f"{module}.weight").jax_perm == (1, 0)
    except UnknownParameterError:
        return False


def target_modules(param_names: Iterable[str], lora: LoraConfig) -> list[str]:
    """The linear modules (canonical names, sorted) among a model's canonical parameter names that match one of
    `lora.targets`; a pattern that matches no linear module is an error naming it."""
    modules = sorted({n[: -len(".weight")] for n in param_names if n.endswith(".weight")})
    modules = [m for m in modules if _is_linear(m)]
    chosen: set[str] = set()
    for pattern in lora.targets:
        hits = [m for m in modules if fnmatch.fnmatchcase(m, pattern)]
        if not hits:
            raise ConfigError(f"lora.targets: {pattern!r} matches no linear module of the model")
        chosen.update(hits)
    return sorted(chosen)


def save_adapters(path: str | Path, adapters: Mapping[str, np.ndarray], lora: LoraConfig) -> None:
    """Write an adapter file: canonical `*.lora_A.weight` / `*.lora_B.weight` keys, float32, rank and alpha in the
    metadata."""
    for key, value in adapters.items():
        if not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")):
            raise ValueError(f"{key}: not an adapter key (*.lora_A.weight or *.lora_B.weight)")
        if value.ndim != 2:
            raise ValueError(f"{key}: adapters are matrices, got shape {value.shape}")
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in sorted(adapters.items())}
    meta = {"format": FORMAT, "rank": str(lora.rank), "alpha": repr(float(lora.alpha))}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def load_adapters(path: str | Path) -> tuple[dict[str, np.ndarray], int, float]:
    """Read an adapter file written by `save_adapters`: (tensors, rank, alpha)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such adapter file")
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a ContentV-X adapter file (metadata format {meta.get('format')!r})")
    return load_file(str(path)), int(meta["rank"]), float(meta["alpha"])


def adapter_modules(adapters: Mapping[str, np.ndarray], where: str = "adapters") -> list[str]:
    """The modules of an adapter dict; each must have both A and B with matching rank."""
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in adapters})
    for m in modules:
        a_key, b_key = lora_keys(m)
        if a_key not in adapters or b_key not in adapters:
            raise ValueError(f"{where}: module {m} needs both {a_key} and {b_key}")
        if adapters[a_key].shape[0] != adapters[b_key].shape[1]:
            raise ValueError(f"{where}: {m} has A {adapters[a_key].shape} and B {adapters[b_key].shape} (rank differs)")
    return modules


def merge(weights: Mapping[str, np.ndarray], adapters: Mapping[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """Full canonical weights with `scale * B @ A` added to each adapted `*.weight` (computed in float32, stored in the
    weight's own dtype); other weights are passed through unchanged."""
    out = dict(weights)
    for m in adapter_modules(adapters):
        key = f"{m}.weight"
        if key not in out:
            raise KeyError(f"adapter for {m}: the model has no weight {key}")
        a_key, b_key = lora_keys(m)
        delta = adapters[b_key].astype(np.float32) @ adapters[a_key].astype(np.float32)
        w = out[key]
        if delta.shape != w.shape:
            raise ValueError(f"adapter for {m}: B @ A is {delta.shape}, the weight is {w.shape}")
        out[key] = (w.astype(np.float32) + scale * delta).astype(w.dtype)
    return out
