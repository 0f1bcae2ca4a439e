"""Orbax checkpoints of a training run: params, optimizer state, EMA, step and the data-iterator position.

Orbax writes each step into a temporary folder and renames it when complete, so a crash never leaves a
half-written checkpoint as the latest; `keep` bounds how many are kept. Restoring into the abstract state
(shapes, dtypes and shardings) puts every array straight onto its devices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from contentv_common.recipe import CheckpointConfig


def abstract_like(state: Any) -> Any:
    """Shape/dtype/sharding description of a state tree, the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


class Checkpointer:
    """One run's checkpoint folder: `save(step, state, data_state)`, `restore(target)` at the latest step."""

    def __init__(self, cfg: CheckpointConfig):
        self.dir = Path(cfg.dir).resolve()
        self.manager = ocp.CheckpointManager(
            self.dir,
            options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=True),
            item_names=("state", "data"),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        self.manager.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
        )
        self.manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """(state, data-iterator state) of `step` (default: latest) restored into the layout of `target`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.dir}: no checkpoint to restore")
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
        )
        return out["state"], out["data"]

    def restore_weights(self, target: dict[str, Any]) -> dict[str, Any]:
        """Only the params (and EMA, if `target` has one) of the latest step: how a new stage starts. A previous
        stage without EMA gives its params as the EMA start."""
        step = self.latest_step()
        if step is None:
            raise FileNotFoundError(f"{self.dir}: no checkpoint to start this stage from")

        def restore(keys: tuple[str, ...]) -> dict[str, Any]:
            wanted = {k: target[k] for k in keys}
            args = ocp.args.Composite(state=ocp.args.PyTreeRestore(wanted, partial_restore=True))
            return self.manager.restore(step, args=args)["state"]

        try:
            restored = restore(("params", "ema") if "ema" in target else ("params",))
        except (KeyError, ValueError):  # the previous stage kept no EMA
            restored = restore(("params",))
        if "ema" in target and "ema" not in restored:
            restored["ema"] = jax.tree.map(lambda x: x.copy(), restored["params"])
        return restored

    def close(self) -> None:
        self.manager.close()
