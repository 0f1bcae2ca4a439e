"""Sharded training checkpoints of a multi-process run: every rank writes and reads only its own slices.

`torch.distributed.checkpoint` (DCP) with its safetensors storage (`HuggingFaceStorageWriter/Reader`): each rank
writes one `shard-<rank+1>-model-00001-of-00001.safetensors` per part holding its FSDP2 slices, the slices' offsets
in the file's JSON header (DCP's `DCP_SHARDING_INFO`); nothing is pickled. Reading plans each rank's slices on the
current mesh (another world size or HSDP layout reshards) and reads only those byte ranges. A checkpoint
`step_NNNNNNNN/` holds the parts `model/`, `ema/` (when kept) and `optimizer/` (`exp_avg.<name>`,
`exp_avg_sq.<name>`), each with `contentv_config.json`, plus `state.json` (the counters, `"sharded": true`) and the
checksum manifest written last (contentv_common.checkpoint.integrity).
`model/` and `ema/` are transformer folders `contentv_common.checkpoint.formats` reads (one full tensor at a time), so
`tools/convert.py` and `load_transformer` take them as they take the unsharded format.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from contentv_common.checkpoint import integrity
from contentv_common.checkpoint.formats import TensorSource, check_keys, write_our_config
from contentv_common.checkpoint.param_table import TRANSFORMER_TABLE
from contentv_common.errors import CheckpointError
from contentv_torch_npu.loading import canonical_shapes, numpy_to_torch

MOMENTS = ("exp_avg", "exp_avg_sq")


def is_sharded(folder: str | Path) -> bool:
    try:
        return bool(json.loads((Path(folder) / "state.json").read_text()).get("sharded"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _save_part(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    writer = dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True)
    dcp.save(tensors, storage_writer=writer)


def _load_part(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `tensors` (this rank's DTensors or plain tensors) in place from `folder`; every name must be there."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: missing checkpoint part")
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))


def save_sharded(
    target: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None,
    meta: dict[str, Any],
) -> Path:
    """Write `target` from every rank (collective): parts into a temporary sibling, rank 0 adds the config and
    `state.json` last and renames it into place. `meta`: the counters for state.json."""
    tmp = target.parent / f".{target.name}.tmp-sharded"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    params = get_model_state_dict(model)
    _save_part(tmp / "model", params)
    if ema is not None:
        _save_part(tmp / "ema", dict(ema))
    state = get_optimizer_state_dict(model, optimizer)["state"]
    steps = {float(s["step"]) for s in state.values()}
    if len(steps) > 1:
        raise RuntimeError(f"AdamW step counts differ between parameters: {sorted(steps)}")
    _save_part(tmp / "optimizer", {f"{kind}.{n}": s[kind] for n, s in state.items() for kind in MOMENTS})
    if _rank() == 0:
        for part in ("model", "ema", "optimizer"):
            if (tmp / part).is_dir():
                write_our_config(tmp / part, model.cfg)
        adam_step = int(steps.pop()) if steps else 0
        (tmp / "state.json").write_text(json.dumps({**meta, "adam_step": adam_step, "sharded": True}, indent=1))
        integrity.write_manifest(tmp)  # last: sizes and checksums of every file, as the unsharded format
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    _barrier()
    return target


def load_sharded(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    ema: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Restore this rank's slices of the weights, EMA (in place) and, with `optimizer`, the AdamW moments and step
    (collective); returns state.json. A checkpoint without EMA restores `ema` from its weights."""
    meta = json.loads((folder / "state.json").read_text())
    params = get_model_state_dict(model)
    _load_part(folder / "model", params)
    set_model_state_dict(model, params)
    if ema is not None:
        _load_part(folder / "ema" if (folder / "ema").is_dir() else folder / "model", ema)
    if optimizer is not None:
        trained = {n for n, p in model.named_parameters() if p.requires_grad}  # with LoRA: the adapters
        moments = {f"{kind}.{n}": torch.zeros_like(p) for n, p in params.items() if n in trained for kind in MOMENTS}
        _load_part(folder / "optimizer", moments)
        groups = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        step = torch.tensor(float(meta["adam_step"]))
        state = {n: {"step": step.clone(), **{k: moments[f"{k}.{n}"] for k in MOMENTS}} for n in params if n in trained}
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups["param_groups"]})
    return meta


def _local_index(target: torch.Tensor, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """This rank's slice of a tensor of global `shape` placed like `target` (a DTensor shard, or all of it)."""
    if not isinstance(target, DTensor):
        return tuple(slice(0, n) for n in shape)
    local, offset = compute_local_shape_and_global_offset(shape, target.device_mesh, target.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, local, strict=True))


def stream_weights(model: nn.Module, source: TensorSource) -> nn.Module:
    """Fill a sharded (FSDP2 / HSDP) model, already on its device, from `source`, each rank copying only its slice:
    read slice by slice where the format allows it (safetensors), else one full tensor at a time (`init_from`); no
    rank ever holds the whole model."""
    shapes = {n: s for n, s in canonical_shapes(model).items() if ".lora_" not in n}  # new LoRA adapters: not read
    skip = check_keys(source, shapes, TRANSFORMER_TABLE)
    targets = model.state_dict()

    def put(name: str, part) -> None:
        target = targets[name]
        local = target.to_local() if isinstance(target, DTensor) else target
        local.copy_(numpy_to_torch(part))

    with torch.no_grad():
        if source.read is not None:
            for name in sorted(set(source.shapes) - skip):
                put(name, source.read(name, _local_index(targets[name], tuple(source.shapes[name]))))
        else:
            for name, array in source.tensors():
                if name not in skip:
                    put(name, array[_local_index(targets[name], array.shape)])
    return model
