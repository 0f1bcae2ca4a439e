"""Orbax checkpoints of a training run: params, optimizer state, EMA, step and the data-iterator position.

Orbax writes each step into a temporary folder and renames it when complete; then process 0 writes the integrity
manifest (contentv_common.checkpoint.integrity), the commit marker: a step without it, or whose files no longer match
it, is skipped (with a warning naming the file) in favour of the newest intact one. Saving is synchronous and any
failure raises CheckpointSaveError at once (no background thread is left waiting). The writing Checkpointer holds the
directory's run lock, removes the temporary folders of killed saves at start-up and keeps the `keep` newest steps
(plus the resume point of a run that has skipped steps). Restoring into the abstract state (shapes, dtypes and
shardings) puts every array straight onto its devices.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from contentv_common.checkpoint import integrity
from contentv_common.checkpoint.run_lock import RunLock
from contentv_common.cli import one_line
from contentv_common.config.recipe import CheckpointConfig
from contentv_common.errors import CheckpointError, CheckpointSaveError
from contentv_jax.loading import HOST_GB_IN_FLIGHT, RESTORE_GB_IN_FLIGHT, adopting_restores

TMP_MARK = ".orbax-checkpoint-tmp"


def abstract_like(state: Any) -> Any:
    """Shape/dtype/sharding description of a state tree, the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _agree(step: int | None) -> int | None:
    """Process 0's choice of step, on every process (they verify the same files, but must not disagree)."""
    if jax.process_count() == 1:
        return step
    from jax.experimental import multihost_utils

    chosen = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if step is None else step)))
    return None if chosen < 0 else chosen


def _onto(target: Any, partial_restore: bool = False) -> ocp.args.PyTreeRestore:
    """Restore arguments that put every array straight onto the target's shardings."""
    args = ocp.checkpoint_utils.construct_restore_args(target)
    return ocp.args.PyTreeRestore(target, restore_args=args, partial_restore=partial_restore)


def _why(e: Exception) -> str:
    """Why a restore failed, short: orbax lists both trees whole where their structures differ; name the entries."""
    text = one_line(e)
    entries = re.findall(r"; ([\w.]+):; - Source", text)
    if entries:
        return f"{type(e).__name__}: the saved tree and this run's differ at {', '.join(entries)}"
    return f"{type(e).__name__}: {text[:500]}"


class Checkpointer:
    """One run's checkpoint folder: `save(step, state, data_state)`, `restore(target)` at the newest intact step.

    `writer=False` opens a folder only to read it (no lock, nothing renamed or removed)."""

    def __init__(self, cfg: CheckpointConfig, *, writer: bool = True):
        self.dir, self.keep = Path(cfg.dir).resolve(), cfg.keep
        self.main = jax.process_index() == 0
        self.lock = RunLock.acquire(self.dir) if writer and self.main else None
        if self.lock is not None:
            integrity.remove_partial(self.dir, lambda name: TMP_MARK in name)
        self._step = _agree(self._select(writer and self.main))
        adopting_restores()  # every shard read with O_DIRECT into the buffer its CPU device keeps
        gb = HOST_GB_IN_FLIGHT  # the host stages this much at a time, not a second copy of the state
        state = ocp.PyTreeCheckpointHandler(
            save_concurrent_gb=gb,
            save_device_host_concurrent_gb=gb,
            restore_concurrent_gb=RESTORE_GB_IN_FLIGHT,
            use_compression=False,
        )  # uncompressed: zstd costs more CPU time than it saves disk time, and the moments barely compress
        self.manager = ocp.CheckpointManager(
            self.dir,
            options=ocp.CheckpointManagerOptions(create=writer, enable_async_checkpointing=False),
            item_handlers={"state": state, "data": ocp.JsonCheckpointHandler()},
        )

    def _select(self, writer: bool) -> int | None:
        if not self.dir.is_dir():
            return None
        steps = [(int(p.name), p) for p in self.dir.iterdir() if p.name.isdigit() and p.is_dir()]
        chosen = integrity.newest_intact(steps, writer=writer)
        return None if chosen is None else chosen[0]

    def latest_step(self) -> int | None:
        """The newest intact step (verified against its manifest when the folder was opened)."""
        return self._step

    def save(self, step: int, state: Any, data_state: dict[str, Any], pin_before: int | None = None) -> None:
        """Write `step` and commit it with the manifest; then delete all but the `keep` newest steps (and the newest
        one before `pin_before`, the resume point should the run diverge)."""
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)),
                force=True,
            )
            self.manager.wait_until_finished()
            if self.main:
                integrity.write_manifest(self.dir / str(step))
            for old in integrity.steps_to_delete(self.manager.all_steps(), self.keep, pin_before):
                self.manager.delete(old)  # by every process: orbax's delete ends at a barrier of all of them
        except Exception as e:  # any failure ends the run now, with the previous checkpoint as its resume point
            why = f"{type(e).__name__}: {one_line(e)}"
            raise CheckpointSaveError(f"{self.dir}: saving step {step} failed: {why}") from e
        self._step = step

    def set_aside_from(self, step: int) -> list[Path]:
        """Rename the steps from `step` on out of the way (a diverged run must not resume from them)."""
        if not self.main:
            return []
        later = [s for s in self.manager.all_steps() if s >= step]
        moved = [integrity.set_aside(self.dir / str(s), "diverged") for s in sorted(later)]
        self.manager.reload()
        self._step = max((s for s in self.manager.all_steps() if s < step), default=None)
        return moved

    def _restore(self, step: int, args: ocp.args.Composite) -> Any:
        try:
            return self.manager.restore(step, args=args)
        except Exception as e:  # a verified checkpoint that does not fit this run (e.g. no EMA saved)
            raise CheckpointError(
                f"{self.dir / str(step)}: does not restore into this run's state: {_why(e)}"
            ) from None

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state, data-iterator state) of `step` (default: latest) restored into the layout of `target`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.dir}: no checkpoint to restore")
        out = self._restore(step, ocp.args.Composite(state=_onto(target), data=ocp.args.JsonRestore()))
        return out["state"], out["data"]

    def restore_data(self, step: int | None = None) -> dict[str, Any]:
        """Only the JSON item (counters, data position) of `step` (default: latest)."""
        step = self.latest_step() if step is None else step
        return self._restore(step, ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]

    def restore_weights(self, target: dict[str, Any]) -> dict[str, Any]:
        """Only the params (and EMA, if `target` has one) of the latest step: how a new stage starts. A previous
        stage without EMA gives its params as the EMA start."""
        step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"{self.dir}: no checkpoint to start this stage from")

        def restore(keys: tuple[str, ...]) -> dict[str, Any]:
            args = ocp.args.Composite(state=_onto({k: target[k] for k in keys}, partial_restore=True))
            return self._restore(step, args)["state"]

        try:
            restored = restore(("params", "ema") if "ema" in target else ("params",))
        except CheckpointError:  # the previous stage kept no EMA
            restored = restore(("params",))
        if "ema" in target and "ema" not in restored:
            restored["ema"] = jax.tree.map(lambda x: x.copy(), restored["params"])
        return restored

    def close(self) -> None:
        self.manager.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
