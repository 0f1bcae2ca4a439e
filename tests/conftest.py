"""Test-wide numerics: float32 references (JAX matmul precision "highest", torch TF32 off) and 8 simulated JAX devices.

XLA_FLAGS must be set before jax is imported anywhere, so it is set here at collection time. JAX's persistent
compilation cache (in the system's temporary folder, per user) lets the many processes the tests start reuse each
other's compiled programs; it changes no result, only compile time.
"""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"contentv-x-jax-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402


def _configure_numerics() -> None:
    try:
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    except ImportError:
        pass
    try:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass


_configure_numerics()


@pytest.fixture
def rel_err():
    """Relative error ||a - b|| / ||b|| in float64."""
    import numpy as np

    def rel(a, b) -> float:
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    return rel


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module: every loaded XLA:CPU executable holds memory mappings, and
    the whole suite in one process would otherwise run into the kernel's limit (vm.max_map_count, 65530), which
    crashes XLA mid-compile (an abort or a segfault)."""
    yield
    import sys

    if "jax" in sys.modules:
        import gc

        sys.modules["jax"].clear_caches()
        gc.collect()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that starts ranks through the `spawn_ranks` fixture runs several processes: it is `multiprocess`."""
    for item in items:
        if "spawn_ranks" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.multiprocess)
