"""LoRA adapters, framework-free: which modules a recipe adapts, the adapter file, and merging into full weights.

An adapter on the linear module `m` (canonical name, e.g. `blocks.3.attn.to_q`) is two float32 tensors in the torch
layout, as peft and diffusers store them: `m.lora_A.weight` [rank, in] and `m.lora_B.weight` [out, rank]. The module
computes `W x + b + scale * B (A x)` with `scale = alpha / rank`; B starts at zero, so a new adapter changes nothing.
Our adapter file is one safetensors file of those canonical keys whose metadata holds rank and alpha.

diffusers' SD3 LoRA file (`pytorch_lora_weights.safetensors`, what `StableDiffusion3Pipeline.save_lora_weights`
writes and `load_lora_weights` / `SD3Transformer2DModel.load_lora_adapter` read) holds the same matrices under
peft's names with diffusers' module names, `transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight`. Alpha
travels in diffusers' `lora_adapter_metadata` (peft LoraConfig kwargs `transformer.r` / `transformer.lora_alpha`,
read by diffusers >= 0.35); loaders that ignore it take alpha = rank, so `fold_alpha` exports B * alpha / rank with
lora_alpha = r instead, which every loader scales right.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from contentv_common.checkpoint.param_table import TRANSFORMER_TABLE
from contentv_common.config.recipe import LoraConfig
from contentv_common.errors import CheckpointError, ConfigError, UnknownParameterError

FORMAT = "contentv-lora"
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
DIFFUSERS_PREFIX = "transformer"  # the pipeline component the keys belong to
DIFFUSERS_METADATA = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
_A, _B = ".lora_A.weight", ".lora_B.weight"


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
    meta, _ = _header(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ContentV-X adapter file (metadata format {meta.get('format')!r})")
    tensors = load_file(str(path))
    adapter_modules(tensors, str(path))
    return tensors, int(meta["rank"]), float(meta["alpha"])


def _header(path: Path) -> tuple[dict[str, str], list[str]]:
    """A safetensors file's metadata and keys (no tensor data)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such LoRA adapter file")
    try:
        with safe_open(str(path), "np") as f:
            return f.metadata() or {}, list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a safetensors file ({e})") from None


def adapter_modules(adapters: Mapping[str, np.ndarray], where: str = "adapters") -> list[str]:
    """The modules of an adapter dict; each must have both A and B (matrices) with matching rank."""
    for key, value in adapters.items():
        if not key.endswith((_A, _B)):
            raise CheckpointError(f"{where}: {key!r} is not an adapter key (*{_A} or *{_B})")
        if value.ndim != 2:
            raise CheckpointError(f"{where}: {key!r} has shape {value.shape}; adapters are matrices")
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in adapters})
    for m in modules:
        a_key, b_key = lora_keys(m)
        if a_key not in adapters or b_key not in adapters:
            raise CheckpointError(f"{where}: module {m} needs both {a_key} and {b_key}")
        if adapters[a_key].shape[0] != adapters[b_key].shape[1]:
            raise CheckpointError(
                f"{where}: {m} has A {adapters[a_key].shape} and B {adapters[b_key].shape} (rank differs)"
            )
    return modules


# ---- diffusers' SD3 LoRA file -------------------------------------------------------------------------------------


def _diffusers_module(module: str) -> str:
    return TRANSFORMER_TABLE.from_canonical(f"{module}.weight").diffusers.removesuffix(".weight")


def _canonical_module(module: str, where: str) -> str:
    try:
        return TRANSFORMER_TABLE.from_diffusers(f"{module}.weight").canonical.removesuffix(".weight")
    except UnknownParameterError:
        raise CheckpointError(f"{where}: LoRA module {module!r} is no linear module of the SD3 transformer") from None


def to_diffusers(
    adapters: Mapping[str, np.ndarray], rank: int, alpha: float, fold_alpha: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Our adapters as diffusers' SD3 LoRA tensors and safetensors metadata (see the module docstring)."""
    modules = adapter_modules(adapters)
    scale = alpha / rank
    tensors, targets = {}, []
    for m in modules:
        a_key, b_key = lora_keys(m)
        if adapters[a_key].shape[0] != rank:
            raise CheckpointError(f"adapters: {a_key} has rank {adapters[a_key].shape[0]}, the file's rank is {rank}")
        try:
            name = _diffusers_module(m)
        except UnknownParameterError:
            raise CheckpointError(f"adapters: module {m} is not in the transformer parameter table") from None
        b = adapters[b_key].astype(np.float32)
        tensors[f"{DIFFUSERS_PREFIX}.{name}{_A}"] = np.ascontiguousarray(adapters[a_key], np.float32)
        tensors[f"{DIFFUSERS_PREFIX}.{name}{_B}"] = np.ascontiguousarray(b * np.float32(scale) if fold_alpha else b)
        targets.append(name)
    config = {"r": rank, "lora_alpha": rank if fold_alpha else alpha, "target_modules": targets}
    packed = {f"{DIFFUSERS_PREFIX}.{k}": v for k, v in config.items()}
    return tensors, {"format": "pt", DIFFUSERS_METADATA: json.dumps(packed, indent=2, sort_keys=True)}


def save_diffusers(
    path: str | Path,
    adapters: Mapping[str, np.ndarray],
    rank: int,
    alpha: float,
    fold_alpha: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write diffusers' SD3 LoRA file; a folder `path` gets `pytorch_lora_weights.safetensors` inside."""
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / DIFFUSERS_FILE
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: already exists (pass overwrite to replace it)")
    tensors, metadata = to_diffusers(adapters, rank, alpha, fold_alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _peft_config(metadata: Mapping[str, str], where: str) -> dict[str, Any]:
    """The transformer's peft LoraConfig kwargs from diffusers' lora_adapter_metadata ({} when absent)."""
    raw = metadata.get(DIFFUSERS_METADATA)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: {DIFFUSERS_METADATA} is not JSON ({e})") from None
    prefix = f"{DIFFUSERS_PREFIX}."
    return {k.removeprefix(prefix): v for k, v in packed.items() if k.startswith(prefix)}


def from_diffusers(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], where: str = "LoRA file"
) -> tuple[dict[str, np.ndarray], int, float]:
    """diffusers' SD3 LoRA tensors (peft names, `transformer.` prefix optional) as our (adapters, rank, alpha).

    With diffusers' metadata its r / lora_alpha are kept as they are (use_rslora's alpha / sqrt(r) becomes our alpha
    / r); without, every module has peft's default alpha = its rank (scale 1), so mixed ranks are fine.
    """
    adapters = {}
    for key, value in tensors.items():
        name = key.removeprefix(f"{DIFFUSERS_PREFIX}.")
        if name.startswith("text_encoder"):
            raise CheckpointError(f"{where}: {key!r}: text-encoder LoRA is not supported, only the transformer's")
        if not name.endswith((_A, _B)):
            raise CheckpointError(f"{where}: {key!r} is not a transformer LoRA matrix (*{_A} / *{_B}, peft names)")
        module, suffix = name[: -len(_A)], name[-len(_A) :]
        adapters[_canonical_module(module, where) + suffix] = np.asarray(value, np.float32)
    modules = adapter_modules(adapters, where)
    if not modules:
        raise CheckpointError(f"{where}: no LoRA matrices")
    ranks = Counter(adapters[lora_keys(m)[0]].shape[0] for m in modules)
    config = _peft_config(metadata, where)
    if not config:
        rank = ranks.most_common(1)[0][0]
        return adapters, rank, float(rank)
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise CheckpointError(f"{where}: per-module {field} in {DIFFUSERS_METADATA} is not supported")
    if config.get("use_dora"):
        raise CheckpointError(f"{where}: a DoRA adapter (use_dora) cannot be merged as LoRA")
    rank = int(config.get("r", 8))
    if set(ranks) != {rank}:
        raise CheckpointError(f"{where}: {DIFFUSERS_METADATA} says r={rank}, the matrices have ranks {sorted(ranks)}")
    alpha = float(config.get("lora_alpha", 8))
    return adapters, rank, alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def read_adapter(path: str | Path) -> tuple[dict[str, np.ndarray], int, float]:
    """Either adapter file (ours, or diffusers' SD3 LoRA file or the folder holding it): (canonical adapters, rank,
    alpha)."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_FILE
    metadata, keys = _header(path)
    if metadata.get("format") == FORMAT:
        return load_adapters(path)
    if any(k.endswith((_A, _B)) for k in keys):
        return from_diffusers(load_file(str(path)), metadata, str(path))
    raise CheckpointError(
        f"{path}: not a LoRA adapter file (neither metadata format {FORMAT!r} nor diffusers' *{_A} / *{_B} keys)"
    )


# ---- merging into full weights ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lora:
    """An adapter to merge: canonical weight name -> (A, B), and the factor on B @ A (user scale x alpha / rank)."""

    path: Path
    factors: dict[str, tuple[np.ndarray, np.ndarray]]
    scale: float


def parse_lora_spec(text: str) -> tuple[Path, float]:
    """`PATH[:SCALE]` -> (path, scale); the scale defaults to 1.0 (a colon not followed by a number is in the path)."""
    head, sep, tail = text.rpartition(":")
    if sep:
        try:
            return Path(head), float(tail)
        except ValueError:
            pass
    return Path(text), 1.0


def _factors(
    adapters: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]], where: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Canonical weight name -> (A, B), checked against the model's canonical weight shapes: every adapted weight
    must exist and B @ A must have its shape. The error names the file, the modules and the shapes."""
    factors, problems = {}, []
    for m in adapter_modules(adapters, where):
        a_key, b_key = lora_keys(m)
        a, b = adapters[a_key], adapters[b_key]
        key = f"{m}.weight"
        if key not in shapes:
            problems.append(f"the model has no weight {key!r} for {a_key}")
        elif tuple(shapes[key]) != (b.shape[0], a.shape[1]):
            problems.append(f"{key} is {tuple(shapes[key])}, B @ A of {m} is {(b.shape[0], a.shape[1])}")
        factors[key] = (a, b)
    if problems:
        raise CheckpointError(f"{where}: adapter does not match the model: " + "; ".join(problems))
    return factors


def open_lora(path: str | Path, scale: float, shapes: Mapping[str, tuple[int, ...]]) -> Lora:
    """Read an adapter file (either format), checked against the model's canonical weight shapes; its factor is
    `scale` x alpha / rank."""
    adapters, rank, alpha = read_adapter(path)
    return Lora(Path(path), _factors(adapters, shapes, str(path)), scale * alpha / rank)


def merged_weight(name: str, weight: np.ndarray, loras: Iterable[Lora]) -> np.ndarray:
    """`weight` + sum of scale * B @ A of the loras that adapt `name`, added in float32 and stored in float32; callers
    cast back to the weight's dtype once, so every path (convert, either backend) rounds alike."""
    out = np.asarray(weight, np.float32)
    for lora in loras:
        if name in lora.factors:
            a, b = lora.factors[name]
            out = out + np.float32(lora.scale) * (b.astype(np.float32) @ a.astype(np.float32))
    return out


def adapted(name: str, loras: Iterable[Lora]) -> bool:
    return any(name in lora.factors for lora in loras)


def merge(weights: Mapping[str, np.ndarray], adapters: Mapping[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """Full canonical weights with `scale * B @ A` added to each adapted `*.weight` (computed in float32, stored in the
    weight's own dtype); other weights are passed through unchanged."""
    lora = Lora(Path("adapters"), _factors(adapters, {k: v.shape for k, v in weights.items()}, "adapters"), scale)
    out = dict(weights)
    for key in lora.factors:
        out[key] = merged_weight(key, out[key], [lora]).astype(out[key].dtype)
    return out
