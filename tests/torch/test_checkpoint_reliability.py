"""Torch checkpoints fail loudly and recover: damaged or incomplete checkpoints fall back to the newest intact one,
missing components are errors, a save killed by SIGKILL resumes bit-identically, a save that cannot write ends the
run with one line, and divergence keeps the last checkpoint from before the first bad step as the resume point."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from contentv_common.checkpoint import integrity
from contentv_common.checkpoint.run_lock import LOCK_FILE
from contentv_common.config.recipe import load_recipe
from contentv_common.errors import CheckpointError, TrainingStopped
from contentv_torch_npu import checkpointing as ckpt
from contentv_torch_npu.train import run
from tests.cache_edit import nan_latents
from tests.full_disk import cli_args, train_on_a_full_disk

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "tests" / "recipes" / "tiny.yaml"


def _overrides(dataset, folder, **extra):
    return {
        "data": {**dataset, "text_dropout": 0.25, "num_threads": 0},
        "steps": 4,
        "compute_dtype": "float32",
        "checkpoint": {"dir": str(folder / "ckpt"), "interval": 2, "keep": 3},
        "log_dir": str(folder / "logs"),
        "optimizer.warmup_steps": 2,
        **extra,
    }


def _recipe(dataset, folder, **extra):
    return load_recipe(RECIPE, _overrides(dataset, folder, **extra))


def _same_state(a, b):
    assert (a.step, a.adam_step, a.data_position, a.divergence) == (b.step, b.adam_step, b.data_position, b.divergence)
    for field in ("params", "exp_avg", "exp_avg_sq", "ema"):
        x, y = getattr(a, field), getattr(b, field)
        assert sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x), field


def _damage(path: Path, how: str) -> None:
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:-9])
    elif how == "flip":
        data = bytearray(path.read_bytes())
        data[-40:-24] = bytes(b ^ 0x5A for b in data[-40:-24])  # 16 bytes inside the last tensor
        path.write_bytes(bytes(data))
    else:
        path.unlink()


@pytest.fixture(scope="module")
def straight(tiny_dataset, tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at 2, 4 and 6."""
    folder = tmp_path_factory.mktemp("straight")
    run(_recipe(tiny_dataset, folder, steps=6), device="cpu", progress=False)
    return folder


def test_every_damage_in_every_component_falls_back(straight, tmp_path, capsys):
    parts = ["model/model.safetensors", "ema/model.safetensors", "optimizer.safetensors", "state.json"]
    for part in parts:
        for how in ("truncate", "flip", "delete"):
            copy = tmp_path / f"{part.replace('/', '_')}-{how}"
            shutil.copytree(straight / "ckpt", copy)
            _damage(copy / "step_00000006" / part, how)
            assert ckpt.latest_checkpoint(copy, writer=True) == copy / "step_00000004", (part, how)
            err = capsys.readouterr().err
            assert f"skipping checkpoint step 6: {copy / 'step_00000006' / part}" in err, (part, how, err)
            assert (copy / ".damaged.step_00000006").is_dir() and not (copy / "step_00000006").exists()
            with pytest.raises(CheckpointError, match=part.split("/")[-1]):
                ckpt.load_state(copy / ".damaged.step_00000006")


def test_damaged_newest_resumes_from_the_previous_and_ends_identical(straight, tiny_dataset, tmp_path, capsys):
    run(_recipe(tiny_dataset, tmp_path, steps=4), device="cpu", progress=False)
    _damage(tmp_path / "ckpt" / "step_00000004" / "model" / "model.safetensors", "flip")
    (tmp_path / "ckpt" / ".step_00000006.tmp-x1").mkdir()  # a killed save's leftovers
    run(_recipe(tiny_dataset, tmp_path, steps=6), device="cpu", progress=False)
    assert "skipping checkpoint step 4" in capsys.readouterr().err
    assert not (tmp_path / "ckpt" / ".step_00000006.tmp-x1").exists()
    _same_state(
        ckpt.load_state(tmp_path / "ckpt" / "step_00000006"), ckpt.load_state(straight / "ckpt" / "step_00000006")
    )


def test_missing_components_are_errors(straight, tiny_dataset, tmp_path):
    for component in ("ema", "optimizer.safetensors"):
        folder = tmp_path / component
        shutil.copytree(straight / "ckpt", folder / "ckpt")
        for step in folder.glob("ckpt/step_*"):
            target = step / component
            shutil.rmtree(target) if target.is_dir() else target.unlink()
            integrity.write_manifest(step)  # consistent, but the component is gone
        with pytest.raises(CheckpointError, match="EMA|optimizer"):
            run(_recipe(tiny_dataset, folder, steps=8), device="cpu", progress=False)


KILL_DURING_SAVE = """
import os, signal, sys
from contentv_common.checkpoint import integrity
from contentv_common.config.recipe import load_recipe
from contentv_torch_npu.train import run

write = integrity.write_manifest
def killed_at_step_4(folder):
    if "step_00000004" in str(folder):
        os.kill(os.getpid(), signal.SIGKILL)  # dies inside the save: tensors written, no commit marker
    return write(folder)
integrity.write_manifest = killed_at_step_4
run(load_recipe(sys.argv[1], eval(sys.argv[2])), device="cpu", progress=False)
"""


def test_sigkill_during_save_resumes_bit_identical(straight, tiny_dataset, tmp_path):
    overrides = _overrides(tiny_dataset, tmp_path, steps=6)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, str(RECIPE), repr(overrides)], env=env)
    assert proc.returncode == -9
    assert list((tmp_path / "ckpt").glob(".step_00000004.tmp-*")) and not (tmp_path / "ckpt" / "step_00000004").exists()
    run(load_recipe(RECIPE, overrides), device="cpu", progress=False)
    assert not list((tmp_path / "ckpt").glob(".step_*"))
    _same_state(
        ckpt.load_state(tmp_path / "ckpt" / "step_00000006"), ckpt.load_state(straight / "ckpt" / "step_00000006")
    )


@pytest.mark.slow
def test_a_failed_save_ends_the_run_with_one_line_and_status_1(tiny_dataset, tmp_path):
    """tools/train.py on a full disk (no file may grow past 64 kB: the logs fit, the step-2 weights do not): exit
    status 1, one line naming the step and the error, no traceback, nothing half-written left as a checkpoint."""
    start = time.perf_counter()
    args = ["--config", str(RECIPE), *cli_args(_overrides(tiny_dataset, tmp_path, steps=3)), "--backend", "torch"]
    proc = train_on_a_full_disk(args, max_file_bytes=64 * 1024)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("train: stopped: ") and "saving step 2 failed" in last and "File too large" in last, last
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == [LOCK_FILE]  # no step folder, no temporary left
    logged = [json.loads(line)["step"] for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1]  # the steps before the failed save were trained and logged
    print(f"full disk: exit 1 after {elapsed:.1f} s")


def _nan_cache(dataset, folder):
    bad = folder / "nan_cache"
    shutil.copytree(dataset["cache_dir"], bad)
    nan_latents(bad)
    return {**dataset, "cache_dir": str(bad), "text_dropout": 0.25, "num_threads": 0}


def test_skip_count_survives_restarts_and_the_resume_point_predates_the_first_bad_step(tiny_dataset, tmp_path):
    every = {"checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 1, "keep": 2}, "nan_skip_limit": 3}
    run(_recipe(tiny_dataset, tmp_path, steps=2, **every), device="cpu", progress=False)
    good = ckpt.load_state(tmp_path / "ckpt" / "step_00000001")
    nan = {**every, "data": _nan_cache(tiny_dataset, tmp_path)}
    run(_recipe(tiny_dataset, tmp_path, steps=4, **nan), device="cpu", progress=False)  # steps 2, 3 skipped
    assert ckpt.load_state(tmp_path / "ckpt" / "step_00000004").divergence["skipped"] == 2
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step_*")) == [  # 1 outlives `keep`: the resume point
        "step_00000001",
        "step_00000003",
        "step_00000004",
    ]
    with pytest.raises(TrainingStopped, match=r"4 skipped steps .* first at step 2; resume point: .*step_00000001"):
        run(_recipe(tiny_dataset, tmp_path, steps=8, **nan), device="cpu", progress=False)  # a restart counts on
    assert ckpt.latest_checkpoint(tmp_path / "ckpt").name == "step_00000001"
    assert sorted(p.name for p in (tmp_path / "ckpt").glob(".diverged.*")) == [  # 3 went with `keep`
        ".diverged.step_00000004",
        ".diverged.step_00000005",
    ]
    _same_state(ckpt.load_state(tmp_path / "ckpt" / "step_00000001"), good)


def test_huge_learning_rate_keeps_no_diverged_checkpoint(tiny_dataset, tmp_path):
    """lr 1e30 (warm-up 2): step 1 makes finite parameters of ~1e29, step 2 is the first non-finite one; the step-2
    checkpoint holds those parameters, so it is set aside too and no checkpoint is left to resume from."""
    every = {"checkpoint": {"dir": str(tmp_path / "ckpt"), "interval": 2, "keep": 1}, "nan_skip_limit": 1}
    recipe = _recipe(tiny_dataset, tmp_path, steps=12, **every, **{"optimizer.lr": 1e30})
    with pytest.raises(TrainingStopped, match=r"first at step 2; no checkpoint from before it .*step_00000002"):
        run(recipe, device="cpu", progress=False)
    aside = ckpt.load_state(tmp_path / "ckpt" / ".diverged.step_00000002")
    assert max(float(np.abs(a).max()) for a in aside.params.values()) > 1e20
    assert ckpt.latest_checkpoint(tmp_path / "ckpt") is None
