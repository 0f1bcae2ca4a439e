"""The README's main job, trained once per test session and shared: the demo test checks what it learned, the reward
demo tests tune it."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory) -> Path:
    """`tools/train.py` on the tiny recipe, every step of it, in a temporary folder (about 2 minutes of CPU): the
    synthetic set, its cache, checkpoints, logs, the exported model (`transformer/`) and the demo's samples."""
    from contentv_common.cli import train

    root = tmp_path_factory.mktemp("demo")
    overrides = [
        f"data.manifest={root / 'synthetic' / 'manifest.jsonl'}",
        f"data.cache_dir={root / 'cache'}",
        f"checkpoint.dir={root / 'checkpoints'}",
        f"log_dir={root / 'logs'}",
    ]
    assert train.main(["--config", str(train.TINY), "--no-progress", *overrides]) == 0
    return root
