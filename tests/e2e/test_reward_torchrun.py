"""`tools/train.py --backend torch` on a reward recipe under torchrun with a mesh: 2 gloo processes (FSDP2) run ReFL
steps with an EMA anchor, write a sharded checkpoint per step, log what one process logs for the same recipe, and a
second launch resumes from the last checkpoint on the same mesh instead of starting over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess  # every test here starts several processes

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "configs/recipes/reward_refl_tiny.yaml"
# one held-out seed for two data-parallel groups: the second samples it too and drops it
OVERRIDES = {"data": None, "refl.sft_weight": 0.0, "refl.anchor": "ema", "refl.grad_steps": 1, "rollout.steps": 2,
             "rollout.eval_interval": 1, "rollout.eval_seeds": [10000], "checkpoint.interval": 1}  # fmt: skip


def _torchrun(tmp_path: Path, steps: int) -> subprocess.CompletedProcess:
    args = [f"{k}={json.dumps(v)}" for k, v in OVERRIDES.items()]  # YAML reads JSON
    args += ["mesh.fsdp=2", f"steps={steps}", f"checkpoint.dir={tmp_path / 'ckpt'}", f"log_dir={tmp_path / 'logs'}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "tools/train.py", "--config", RECIPE, "--backend", "torch", "--no-progress", *args]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _rows(logs: Path) -> list[dict]:
    return [json.loads(line) for line in (logs / "reward_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_torchrun_reward_run_matches_one_process_checkpoints_and_resumes(tmp_path):
    from contentv_common.config.reward import load_reward_recipe
    from contentv_torch_npu.reward.run import run

    first = _torchrun(tmp_path, 2)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    step2 = tmp_path / "ckpt" / "step_00000002"
    state = json.loads((step2 / "state.json").read_text())
    assert state["sharded"] and state["step"] == 2 and state["adam_step"] == 2 and state["counters"]["ema_anchor"]
    for part in ("model", "ema", "optimizer"):  # each rank wrote its own slices
        assert len(list((step2 / part).glob("shard-*.safetensors"))) == 2, part
    written = (step2 / "state.json").stat().st_mtime_ns
    rows = _rows(tmp_path / "logs")
    assert [r["step"] for r in rows] == [0, 1]

    second = _torchrun(tmp_path, 3)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    resumed = _rows(tmp_path / "logs")
    assert resumed[:2] == rows and resumed[2]["step"] == 2
    assert (step2 / "state.json").stat().st_mtime_ns == written  # continued from it, not redone
    assert json.loads((tmp_path / "ckpt" / "step_00000003" / "state.json").read_text())["adam_step"] == 3

    single = tmp_path / "single"
    overrides = {**OVERRIDES, "steps": 3, "checkpoint.dir": str(single / "ckpt"), "log_dir": str(single / "logs")}
    run(load_reward_recipe(ROOT / RECIPE, overrides), progress=False, device="cpu")
    for got, want in zip(resumed, _rows(single / "logs"), strict=True):
        assert got.keys() == want.keys()
        keys = list(want)
        if got["step"] == 1:  # the first launch's last step: its held-out eval follows that step's update
            assert (got["eval_updates"], want["eval_updates"]) == (2, 1)
            keys = [k for k in keys if not k.startswith("eval_")]
        for key in keys:  # the spread of rewards near -0.2 is tiny: its rounding is the mean's
            value = want[key]
            assert abs(got[key] - value) <= 1e-5 * max(abs(value), abs(want["reward_mean"])), (got["step"], key)
