"""Under torchrun (RANK / WORLD_SIZE), each rank builds its chunks of the latent/text cache on its device and rank 0
commits when every chunk is done (they meet through the chunks' completion records: no process group yet); the cache
equals one process's byte for byte."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from contentv_common.backend import get
from contentv_common.config.recipe import load_recipe
from contentv_common.data.prepare import prepare_data
from contentv_common.data.synthetic import make_synthetic_set
from tests.common.test_cache_build import cache_bytes

pytestmark = pytest.mark.multiprocess  # every test here starts several processes

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "recipes" / "tiny.yaml"


def test_two_ranks_build_the_cache_one_builds(tmp_path):
    manifest = make_synthetic_set(tmp_path / "set", num_videos=8, num_images=2, frames=12, fps=8, progress=False)
    data = {"data.manifest": str(manifest), "data.chunk_size": 2}
    prepare_data(load_recipe(TINY, {**data, "data.cache_dir": str(tmp_path / "one")}), False, get("torch"))
    cmd = [sys.executable, "tools/prepare_data.py", "--config", str(TINY), "--backend", "torch", "--no-progress"]
    cmd += [f"{k}={v}" for k, v in data.items()] + [f"data.cache_dir={tmp_path / 'two'}"]
    ranks = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=180)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert "cache " in outputs[0] and "cache " not in outputs[1]  # rank 0 commits and summarises
    assert cache_bytes(tmp_path / "two") == cache_bytes(tmp_path / "one")
