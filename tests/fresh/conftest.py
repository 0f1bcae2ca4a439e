"""Fixtures of the fresh-process tests: tiny fp32/bf16 checkpoints, and each backend's loader outputs (one process)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.fresh.checkpoints import canonical_shapes, write_all
from tests.fresh.runner import NOT_JAX, NOT_TORCH, assert_ok, run_blocked


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Path:
    """`{transformer,vae,clip}_{fp32,bf16}` folders in the official layouts (see checkpoints.py)."""
    return write_all(tmp_path_factory.mktemp("fresh_checkpoints"), canonical_shapes())


def _loader_outputs(backend: str, blocked: str, checkpoints: Path, folder: Path) -> dict[str, np.ndarray]:
    out = folder / f"{backend}.npz"
    assert_ok(run_blocked(blocked, ["tests/fresh/check_loaders.py", backend, checkpoints, out]))
    return dict(np.load(out))


@pytest.fixture(scope="session")
def torch_outputs(checkpoints, tmp_path_factory) -> dict[str, np.ndarray]:
    """The torch twin's loaders and forwards run in a fresh process where JAX cannot be imported."""
    return _loader_outputs("torch", NOT_JAX, checkpoints, tmp_path_factory.mktemp("torch_outputs"))


@pytest.fixture(scope="session")
def jax_outputs(checkpoints, tmp_path_factory) -> dict[str, np.ndarray]:
    """The JAX core's loaders and forwards run in a fresh process where torch cannot be imported."""
    return _loader_outputs("jax", NOT_TORCH, checkpoints, tmp_path_factory.mktemp("jax_outputs"))
