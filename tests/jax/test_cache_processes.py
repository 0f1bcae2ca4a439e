"""`tools/prepare_data.py` as 2 JAX processes x 4 CPU devices (tools/launch_local.py) builds the very cache that one
process builds: each takes its chunks (c % 2), process 0 commits; every byte of the index and the records equal."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from contentv_common.data.synthetic import make_synthetic_set
from tests.common.test_cache_build import cache_bytes

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "recipes" / "tiny.yaml"


def prepare(processes: int, manifest: Path, cache: Path) -> str:
    cmd = [sys.executable, "tools/launch_local.py", "--processes", str(processes), "--devices-per-process", "4"]
    cmd += ["--timeout", "240", "--", "tools/prepare_data.py", "--config", str(TINY), "--no-progress"]
    cmd += [f"data.manifest={manifest}", f"data.cache_dir={cache}", "data.chunk_size=2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def test_two_processes_build_the_cache_one_builds(tmp_path):
    manifest = make_synthetic_set(tmp_path / "set", num_videos=8, num_images=2, frames=12, fps=8, progress=False)
    prepare(1, manifest, tmp_path / "one")
    out = prepare(2, manifest, tmp_path / "two")
    assert "[0] cache " in out and "[1] cache " not in out  # process 0 commits and summarises
    assert cache_bytes(tmp_path / "two") == cache_bytes(tmp_path / "one")
    assert sorted(p.name for p in (tmp_path / "two").glob(".lock.*")) == [".lock.0", ".lock.1"]
