"""Training checkpoints of the torch twin: safetensors for tensors, JSON for counters; never pickle.

One checkpoint is a folder `step_NNNNNNNN/` written atomically (a temporary sibling renamed into place):
- `model/`: our torch weights format (contentv_config.json + model*.safetensors, canonical names), so
  `load_transformer` and the JAX loader read it directly;
- `ema/`: the same format for the EMA weights, when the recipe keeps an EMA;
- `optimizer.safetensors`: AdamW moments `exp_avg.<name>` / `exp_avg_sq.<name>` in canonical names and torch layout;
- `state.json`: training step, AdamW step count, data position (next global batch), counters and the divergence
  guard's state (skip count, first bad step, recent losses);
- `checksums.json`: size and sha256 of every other file, written last (contentv_common.checkpoint.integrity): a
  checkpoint that lacks it or no longer matches it is skipped for the newest intact one.
Everything random in a step is a function of (seed, step), so these files resume a run exactly. The numpy-level
`TrainState` is framework-free, so a JAX run's state converts to it and back through the shared parameter table.
Runs (training and reward tuning) go through `Checkpointer`, which writes this format in one process and
contentv_torch_npu.sharded_checkpoint's on several.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from contentv_common.checkpoint import integrity
from contentv_common.checkpoint.formats import (
    iter_rank_shards,
    open_checkpoint,
    read_our_config,
    write_our_config,
    write_torch,
)
from contentv_common.checkpoint.run_lock import RunLock
from contentv_common.checkpoint.safetensors_io import AtomicFolder, iter_tensors, weight_files, write_sharded
from contentv_common.config.model import ModelConfig
from contentv_common.config.recipe import CheckpointConfig, LoraConfig
from contentv_common.errors import CheckpointError, CheckpointSaveError, RunLockedError
from contentv_common.lora.training import write_adapter_file
from contentv_torch_npu.distributed import Topology, all_ok
from contentv_torch_npu.loading import numpy_to_torch, torch_to_numpy
from contentv_torch_npu.lora import export_merged
from contentv_torch_npu.sharded_checkpoint import is_sharded, load_sharded, save_sharded

_STEP_DIR = re.compile(r"step_(\d{8})")
MOMENTS = ("exp_avg", "exp_avg_sq")


@dataclass
class TrainState:
    """A whole training state as numpy arrays with canonical names (torch layout), plus the counters."""

    config: ModelConfig
    params: dict[str, np.ndarray]
    exp_avg: dict[str, np.ndarray]
    exp_avg_sq: dict[str, np.ndarray]
    step: int
    adam_step: int
    data_position: int
    ema: dict[str, np.ndarray] | None = None
    counters: dict[str, int] = field(default_factory=dict)
    divergence: dict[str, Any] = field(default_factory=dict)


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest_checkpoint(root: str | Path, writer: bool = False) -> Path | None:
    """The newest intact checkpoint under `root`, verified against its manifest; damaged or incomplete newer ones are
    skipped with a warning (and renamed aside when `writer`, the process holding the run lock). None when there is
    none at all; CheckpointError when there are checkpoints but none is intact."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [(int(m[1]), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name))]
    chosen = integrity.newest_intact(steps, writer=writer)
    return None if chosen is None else chosen[1]


def remove_partial_saves(root: str | Path) -> list[Path]:
    """Delete the temporary folders of killed saves (`.step_NNNNNNNN.tmp-*`); only the run-lock holder may."""
    return integrity.remove_partial(root, lambda name: name.startswith(".step_") and ".tmp-" in name)


def set_aside_from(root: str | Path, step: int) -> list[Path]:
    """Rename the checkpoints from `step` on out of the way (a diverged run must not resume from them)."""
    root = Path(root)
    later = sorted(p for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and int(m[1]) >= step)
    return [integrity.set_aside(p, "diverged") for p in later]


def _write_weights(folder: Path, config: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
    folder.mkdir()
    write_our_config(folder, config)
    write_sharded(sorted(tensors.items()), folder, "model", metadata={"format": "pt"})


def _read_weights(folder: Path) -> dict[str, np.ndarray]:
    return dict(iter_tensors(weight_files(folder, "model")))


def save_state(root: str | Path, state: TrainState, keep: int, pin_before: int | None = None) -> Path:
    """Write `root/step_NNNNNNNN` atomically with its manifest last, then delete all but the `keep` newest
    checkpoints (and the newest one before step `pin_before`, the resume point should the run diverge)."""
    target = step_dir(root, state.step)
    with AtomicFolder(target, overwrite=True) as tmp:
        _write_weights(tmp / "model", state.config, state.params)
        if state.ema is not None:
            _write_weights(tmp / "ema", state.config, state.ema)
        moments = {f"{kind}.{name}": a for kind in MOMENTS for name, a in getattr(state, kind).items()}
        write_sharded(sorted(moments.items()), tmp, "optimizer", metadata={"format": "pt"})
        counters = {"step": state.step, "adam_step": state.adam_step, "data_position": state.data_position}
        meta = {**counters, "counters": state.counters, "divergence": state.divergence}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        integrity.write_manifest(tmp)
    done = {int(m[1]): p for p in Path(root).iterdir() if (m := _STEP_DIR.fullmatch(p.name))}
    for old in integrity.steps_to_delete(list(done), keep, pin_before):
        shutil.rmtree(done[old])
    return target


def prune(root: str | Path, keep: int, pin_before: int | None = None) -> None:
    """Delete all but the `keep` newest checkpoints under `root` (and the newest before `pin_before`)."""
    done = {int(m[1]): p for p in Path(root).iterdir() if (m := _STEP_DIR.fullmatch(p.name))}
    for old in integrity.steps_to_delete(list(done), keep, pin_before):
        shutil.rmtree(done[old])


def load_state(folder: str | Path, verify: bool = True) -> TrainState:
    """Read a checkpoint folder (checked against its manifest unless `verify` is False: `latest_checkpoint` did);
    a missing or damaged file is a CheckpointError naming it."""
    folder = Path(folder)
    if verify:
        integrity.verify(folder)
    if is_sharded(folder):
        return read_sharded_state(folder)
    meta_file = folder / "state.json"
    try:
        meta = json.loads(meta_file.read_text())
        step, adam_step, position = (int(meta[k]) for k in ("step", "adam_step", "data_position"))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_file}: not a training state ({type(e).__name__}: {e})") from None
    moments: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in MOMENTS}
    for key, array in iter_tensors(weight_files(folder, "optimizer")):
        kind, _, name = key.partition(".")
        if kind not in moments:
            raise CheckpointError(f"{folder / 'optimizer.safetensors'}: unexpected key {key!r}")
        moments[kind][name] = array
    params = _read_weights(folder / "model")
    trained = _trained(params)
    for kind, values in moments.items():
        if values and set(values) != trained:
            missing = sorted(set(params) - set(values)) or sorted(set(values) - set(params))
            raise CheckpointError(f"{folder}: {kind} does not match the parameters (first mismatch {missing[0]!r})")
    return TrainState(
        config=read_our_config(folder / "model"),
        params=params,
        exp_avg=moments["exp_avg"],
        exp_avg_sq=moments["exp_avg_sq"],
        step=step,
        adam_step=adam_step,
        data_position=position,
        ema=_read_weights(folder / "ema") if (folder / "ema").is_dir() else None,
        counters={k: int(v) for k, v in meta.get("counters", {}).items()},
        divergence=dict(meta.get("divergence") or {}),
    )


def _trained(params: dict[str, Any]) -> set[str]:
    """The names the optimizer and EMA cover: the LoRA adapters when there are any (a LoRA run), else all."""
    adapters = {n for n in params if ".lora_A." in n or ".lora_B." in n}
    return adapters or set(params)


def read_sharded_state(folder: Path) -> TrainState:
    """The whole state of a sharded checkpoint in one process, as a TrainState (full numpy arrays,
    assembled one tensor at a time): what the single-process tools (conversion, comparisons) read."""
    meta = json.loads((folder / "state.json").read_text())

    def part(name: str) -> dict[str, np.ndarray]:
        return dict(iter_rank_shards(sorted((folder / name).glob("shard-*.safetensors"))))

    moments: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in MOMENTS}
    for key, array in part("optimizer").items():
        kind, _, name = key.partition(".")
        moments[kind][name] = array
    return TrainState(
        config=read_our_config(folder / "model"),
        params=part("model"),
        exp_avg=moments["exp_avg"],
        exp_avg_sq=moments["exp_avg_sq"],
        step=int(meta["step"]),
        adam_step=int(meta["adam_step"]),
        data_position=int(meta["data_position"]),
        ema=part("ema") if (folder / "ema").is_dir() else None,
        counters={k: int(v) for k, v in meta.get("counters", {}).items()},
        divergence=dict(meta.get("divergence") or {}),
    )


def export_weights(
    checkpoint: str | Path, out: str | Path, part: str = "model", lora: LoraConfig | None = None
) -> Path:
    """The weights of a checkpoint folder (`model`, or `ema`: the EMA of the weights) as a plain transformer folder in
    our torch format (what load_transformer reads), replaced atomically and streamed one tensor at a time from either
    layout (one process or per-rank shards); a LoRA run's adapters of `part` merged into its base."""
    checkpoint, out = Path(checkpoint), Path(out)
    if lora is not None:
        return export_merged(checkpoint, part, lora.scale, out)
    source = open_checkpoint(checkpoint / part)
    return write_torch(out, source.config, source.tensors(), overwrite=True)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _like(full: np.ndarray, ref: torch.Tensor) -> torch.Tensor:
    """A tensor holding `full`, placed (and sharded, for FSDP2's DTensors) like `ref`."""
    t = numpy_to_torch(full).to(dtype=ref.dtype)
    if isinstance(ref, DTensor):
        return distribute_tensor(t.to(ref.device_mesh.device_type), ref.device_mesh, ref.placements)
    return t.to(ref.device)


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def gather_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None,
    *,
    step: int,
    data_position: int,
    counters: dict[str, int],
) -> TrainState | None:
    """The full state of a (possibly FSDP2-sharded) model and its AdamW; every rank must call it, rank 0 gets it."""
    params = get_model_state_dict(model, options=_FULL)
    optim = get_optimizer_state_dict(model, optimizer, options=_FULL)
    main = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    ema_full = None if ema is None else {}
    for name, t in (ema or {}).items():  # one gathered tensor at a time; only rank 0 keeps them
        full = _full(t).detach()
        if main:
            ema_full[name] = full.cpu()
    if not main:
        return None
    state = optim["state"]
    adam_steps = {int(s["step"]) for s in state.values()}
    if len(adam_steps) > 1:
        raise RuntimeError(f"AdamW step counts differ between parameters: {sorted(adam_steps)}")
    return TrainState(
        config=model.cfg,
        params={n: torch_to_numpy(t) for n, t in params.items()},
        exp_avg={n: torch_to_numpy(s["exp_avg"]) for n, s in state.items()},
        exp_avg_sq={n: torch_to_numpy(s["exp_avg_sq"]) for n, s in state.items()},
        step=step,
        adam_step=adam_steps.pop() if adam_steps else 0,
        data_position=data_position,
        ema=None if ema_full is None else {n: torch_to_numpy(t) for n, t in ema_full.items()},
        counters=dict(counters),
    )


def restore_weights(model: nn.Module, params: dict[str, np.ndarray]) -> None:
    """Load full canonical weights into a (possibly sharded) model; every rank passes the full arrays."""
    missing = sorted(set(model.state_dict()) - set(params))
    unused = sorted(set(params) - set(model.state_dict()))
    if missing or unused:
        raise CheckpointError(f"weights do not match the model: missing {missing[:3]}, unused {unused[:3]}")
    full = {n: numpy_to_torch(a) for n, a in params.items()}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))


def restore_ema(model: nn.Module, arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(arrays) != set(named):
        raise CheckpointError(f"EMA weights do not match the parameters: {sorted(set(arrays) ^ set(named))[:3]}")
    return {n: _like(arrays[n], p.detach()) for n, p in named.items()}


def restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState) -> None:
    """Put AdamW moments and step count back (the hyper-parameters come from the recipe, not the checkpoint)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    name_of = {id(p): n for n, p in named}
    if set(state.exp_avg) != set(names):
        raise CheckpointError(
            f"optimizer state does not match the parameters: {sorted(set(state.exp_avg) ^ set(names))[:3]}"
        )
    full = {
        "state": {
            n: {
                "step": torch.tensor(float(state.adam_step)),
                "exp_avg": numpy_to_torch(state.exp_avg[n]),
                "exp_avg_sq": numpy_to_torch(state.exp_avg_sq[n]),
            }
            for n in names
        },
        "param_groups": [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [name_of[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups
        ],
    }
    set_optimizer_state_dict(model, optimizer, full, options=StateDictOptions(full_state_dict=True))


def _fill(tensors: dict[str, torch.Tensor], arrays: dict[str, np.ndarray], what: str) -> None:
    """Copy full canonical arrays into `tensors` in place (each placed and sharded like its target)."""
    if set(arrays) != set(tensors):
        raise CheckpointError(f"{what} weights do not match the parameters: {sorted(set(arrays) ^ set(tensors))[:3]}")
    with torch.no_grad():
        for name, t in tensors.items():
            t.copy_(_like(arrays[name], t.detach()))


class Checkpointer:
    """One run's checkpoint folder on every rank, the twin of contentv_jax.checkpointing.Checkpointer: `save(step,
    ...)`, `restore(...)` at the newest intact step, `restore_weights(...)` to start a new stage from it.

    The main rank holds the folder's run lock (removing killed saves' temporary folders) and chooses the newest intact
    checkpoint for every rank, setting damaged ones aside. One process writes the whole state (this module's format),
    several write their own slices (sharded_checkpoint's); either restores on any mesh. `slot` is what a checkpoint's
    `ema/` holds: the EMA of the weights or a reward run's EMA anchor. `writer=False` opens a folder only to read it
    (no lock, nothing renamed or removed)."""

    def __init__(self, cfg: CheckpointConfig, topo: Topology, *, writer: bool = True):
        self.dir, self.keep, self.topo = Path(cfg.dir), cfg.keep, topo
        self.lock = self._lock() if writer else None
        self._step = self._agree(writer)

    def _lock(self) -> RunLock | None:
        lock, error = None, None
        if self.topo.is_main:
            try:
                lock = RunLock.acquire(self.dir)
                remove_partial_saves(self.dir)
            except RunLockedError as e:
                error = e
        if not all_ok(error is None, self.topo):
            raise error or RunLockedError(f"{self.dir}: checkpoint dir is in use (rank 0 could not lock it)")
        return lock

    def _agree(self, writer: bool) -> int | None:
        """The main rank's choice of the newest intact step, on every rank."""
        chosen, error = None, None
        if self.topo.is_main:
            try:
                chosen = latest_checkpoint(self.dir, writer=writer)
            except CheckpointError as e:
                error = e
        if not all_ok(error is None, self.topo):
            raise error or CheckpointError(f"{self.dir}: no intact checkpoint (rank 0 could not read one)")
        step = -1 if chosen is None else int(_STEP_DIR.fullmatch(chosen.name)[1])
        if self.topo.world > 1:
            flag = torch.tensor([step], device=self.topo.device)
            dist.broadcast(flag, src=0)
            step = int(flag.item())
        return None if step < 0 else step

    def latest_step(self) -> int | None:
        """The newest intact step (verified against its manifest when the folder was opened)."""
        return self._step

    def folder(self, step: int | None = None) -> Path:
        """The folder of `step` (default: latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.dir}: no checkpoint to restore")
        return step_dir(self.dir, step)

    def restore_data(self) -> dict[str, Any]:
        """The latest step's state.json: step, data position, counters and the divergence guard's state."""
        path = self.folder() / "state.json"
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable: {e}") from None

    def restore(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        slot: dict[str, torch.Tensor] | None,
        what: str = "EMA",
    ) -> None:
        """Weights, AdamW and the `ema/` slot (`what` it holds, for errors) of the latest step, in place: each rank
        reads its slices of a sharded checkpoint, the full arrays of an unsharded one. Without `optimizer`, a new
        stage's start: the weights and the slot (from the weights when the folder kept no EMA)."""
        folder = self.folder()
        if is_sharded(folder):
            load_sharded(folder, model, optimizer, slot)
            return
        state = load_state(folder, verify=False)
        restore_weights(model, state.params)
        if optimizer is not None:
            restore_optimizer(model, optimizer, state)
        if slot is not None:
            if state.ema is None and optimizer is not None:
                raise CheckpointError(f"{folder}: the {what} (ema/) is missing; the recipe keeps one")
            _fill(slot, state.ema if state.ema is not None else state.params, what)

    def restore_weights(self, model: nn.Module, ema: dict[str, torch.Tensor] | None) -> None:
        """Only the weights and the EMA of the latest step, in place: how a new stage starts."""
        self.restore(model, None, ema)

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        slot: dict[str, torch.Tensor] | None,
        meta: dict[str, Any],
        *,
        pin_before: int | None = None,
        adapters: tuple[dict[str, np.ndarray], LoraConfig] | None = None,
    ) -> None:
        """Write `step` (with `meta`: data_position, counters and optionally divergence for state.json) and keep the
        `keep` newest steps (and the newest one before `pin_before`, the resume point should the run diverge), then
        a LoRA run's adapter file. A failure on any rank ends the run on every rank with CheckpointSaveError."""
        error = None
        try:
            if self.topo.world > 1:  # every rank writes its own slices
                save_sharded(step_dir(self.dir, step), model, optimizer, slot, {"step": step, **meta})
                if self.topo.is_main:
                    prune(self.dir, self.keep, pin_before)
            else:
                position, counters = meta["data_position"], meta["counters"]
                full = gather_state(model, optimizer, slot, step=step, data_position=position, counters=counters)
                full.divergence = meta.get("divergence", {})
                save_state(self.dir, full, self.keep, pin_before)
            if adapters is not None and self.topo.is_main:
                write_adapter_file(self.dir, *adapters)
        except Exception as e:  # any failure ends the run now, every rank, with the previous resume point
            error = CheckpointSaveError(f"{self.dir}: saving step {step} failed: {e}")
        if not all_ok(error is None, self.topo):
            raise error or CheckpointSaveError(f"{self.dir}: saving step {step} failed on another rank")
        self._step = step

    def set_aside_from(self, step: int) -> list[Path]:
        """Rename the checkpoints from `step` on out of the way (a diverged run must not resume from them)."""
        moved = set_aside_from(self.dir, step) if self.topo.is_main else []
        if self.topo.world > 1:
            dist.barrier()
        latest = latest_checkpoint(self.dir)
        self._step = None if latest is None else int(_STEP_DIR.fullmatch(latest.name)[1])
        return moved

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
