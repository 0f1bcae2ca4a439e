"""What a training run returns, the same in both backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class RunResult:
    """The outcome of one `run()` call: its steps' losses, the steps it skipped, where it ended and its final state.

    `state` is the backend's: the JAX train state tree, or torch's {"model", "optimizer", "ema"}."""

    losses: dict[int, float]  # step -> loss of the steps run in this call (skipped steps excluded)
    skipped_steps: list[int]
    final_step: int
    state: dict[str, Any]
