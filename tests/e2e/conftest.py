"""The README's main job, trained once per test session and shared by every pytest-xdist worker: the demo test checks
what it learned, the reward demo tests tune it."""

import fcntl
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory, worker_id: str) -> Path:
    """`tools/train.py` on the tiny recipe, every step of it, in a temporary folder (about 2 minutes of CPU): the
    synthetic set, its cache, checkpoints, logs, the exported model (`transformer/`) and the demo's samples. Under
    xdist the first worker to ask trains it in the workers' shared temporary folder while the others wait (a lock)."""
    from contentv_common.cli import train

    base = tmp_path_factory.getbasetemp()
    shared = base if worker_id == "master" else base.parent
    root = shared / "demo"
    with open(shared / "demo.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when a worker dies
        if not (root / "trained").exists():
            overrides = [
                f"data.manifest={root / 'synthetic' / 'manifest.jsonl'}",
                f"data.cache_dir={root / 'cache'}",
                f"checkpoint.dir={root / 'checkpoints'}",
                f"log_dir={root / 'logs'}",
            ]
            assert train.main(["--config", str(train.TINY), "--no-progress", *overrides]) == 0
            (root / "trained").touch()
    return root
