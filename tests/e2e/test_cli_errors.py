"""Every CLI turns bad input into one line naming the file or key and exit status 2, before any model or data work;
two trainers on one checkpoint dir: the second exits at once naming the first."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from contentv_common.checkpoint.run_lock import LOCK_FILE
from contentv_common.data.synthetic import make_synthetic_set

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
BUCKET = 'data.buckets=[{"width": 64, "height": 64, "frames": 9, "batch_size": 4}]'


def _cli(tool: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / f"{tool}.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)


def _check_all(cases: list[tuple[str, list[str], str]]) -> None:
    """Run the cases (tool, args, expected text of the error line) in parallel; each must exit 2 with one line."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: _cli(c[0], *c[1]), cases))
    failures = []
    for (tool, args, expected), proc in zip(cases, results, strict=True):
        lines = proc.stderr.strip().splitlines()
        ok = proc.returncode == 2 and "Traceback" not in proc.stderr and lines and expected in lines[-1]
        if not ok:
            failures.append(f"{tool} {args}: rc {proc.returncode}, stderr tail {lines[-3:]}")
    assert not failures, "\n".join(failures)


def _data_case(tmp: Path, name: str, manifest: Path) -> list[str]:
    return [
        f"data.manifest={manifest}",
        f"data.cache_dir={tmp / name / 'cache'}",
        f"checkpoint.dir={tmp / name / 'ckpt'}",
        f"log_dir={tmp / name / 'logs'}",
        "data.fps=8",
        BUCKET,
        "--no-progress",
    ]


def _manifest(tmp: Path, name: str, video: Path | None, content: bytes | None = None) -> Path:
    folder = tmp / name
    folder.mkdir(parents=True)
    path = video or folder / "clip.mp4"
    if content is not None:
        path.write_bytes(content)
    manifest = folder / "manifest.jsonl"
    manifest.write_text(json.dumps({"path": str(path), "caption": "a clip"}) + "\n")
    return manifest


@pytest.mark.slow
def test_train_rejects_bad_input_with_one_line(tmp_path):
    recipe_dir = tmp_path / "recipes"
    recipe_dir.mkdir()
    (recipe_dir / "broken.yaml").write_text("model: tiny\nsteps: [1,\n")
    one_video = make_synthetic_set(tmp_path / "one", num_videos=1, num_images=0, frames=12, fps=8, progress=False)
    cases = [
        ("train", ["--config", str(tmp_path / "none.yaml")], "none.yaml: recipe file not found"),
        ("train", ["--config", str(recipe_dir)], "recipes: not a file"),
        ("train", ["--config", str(recipe_dir / "broken.yaml")], "broken.yaml: not valid YAML"),
        ("train", ["steps"], "override 'steps' is not key=value"),
        ("train", ["nosuch=1"], "nosuch"),
        ("train", ["steps=many"], "steps"),
        ("train", [f"checkpoint.dir={recipe_dir / 'broken.yaml' / 'ckpt'}"], "ckpt: cannot write there (Not a dir"),
        ("train", ["mesh.tensor=16"], "mesh: 1x1x1x16 (data x fsdp x sequence x tensor) needs 16 devices"),
        ("train", ["mesh.data=16"], "batch_size 8 does not split over mesh data x fsdp = 16 x 1 = 16"),
        ("train", ["mesh.data=2", "--backend", "torch"], "but the world size is 1"),
        ("train", _data_case(tmp_path, "nomanifest", tmp_path / "none" / "m.jsonl"), "data.manifest:"),
        ("train", _data_case(tmp_path, "missing", _manifest(tmp_path, "missing", tmp_path / "no.mp4")), "no.mp4"),
        ("train", _data_case(tmp_path, "empty", _manifest(tmp_path, "empty", None, b"")), "clip.mp4"),
        ("train", _data_case(tmp_path, "text", _manifest(tmp_path, "text", None, b"not a video\n" * 50)), "clip.mp4"),
        # flags and overrides in any order; the run gets as far as the data: one video, batch size 4
        ("train", ["steps=3", "--backend", "torch", *_data_case(tmp_path, "few", one_video)], "1 usable samples"),
    ]
    _check_all(cases)


@pytest.mark.slow
def test_sample_convert_parity_bench_reject_bad_input_with_one_line(tmp_path):
    from contentv_common.cli.sample import random_tiny_checkpoint

    good = random_tiny_checkpoint(tmp_path / "good", seed=0)
    truncated = random_tiny_checkpoint(tmp_path / "truncated", seed=0)
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    no_config = random_tiny_checkpoint(tmp_path / "no_config", seed=0)
    next(p for p in no_config.iterdir() if p.suffix == ".json").unlink()
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    sample = ["--tiny", "--prompt", "a cat", "--frames", "1", "--size", "32x32", "--steps", "1", "--no-progress"]
    cases = [
        ("sample", [*sample, "--transformer", str(tmp_path / "nope")], "nope: checkpoint folder not found"),
        ("sample", [*sample, "--transformer", str(tmp_path / "empty")], "empty: neither config.json"),
        ("sample", [*sample, "--transformer", str(tmp_path / "a_file")], "a_file"),
        ("sample", [*sample, "--transformer", str(no_config)], "no_config/transformer"),
        ("sample", [*sample, "--transformer", str(truncated)], weights.name),
        ("sample", [*sample, "--prompts-file", str(tmp_path / "p.txt")], "p.txt: no such file"),
        ("sample", ["--pipeline", str(tmp_path / "nope"), "--prompt", "x"], "nope: no such folder"),
        ("sample", [*sample, "--lora", str(tmp_path / "a_file")], "a_file: not a safetensors file"),
        ("convert", [str(tmp_path / "nope"), str(tmp_path / "out"), "--to", "jax"], "checkpoint folder not found"),
        ("convert", [str(good), str(tmp_path / "out"), "--to", "jax", "--shard-size", "lots"], "--shard-size"),
        ("parity", ["--checkpoint", str(tmp_path / "nope")], "nope: checkpoint folder not found"),
        ("parity", ["--tiny", "--size", "8by8"], "--size must be HxW"),
        ("bench", ["--model", "nosuch"], "nosuch"),
        ("bench", ["--tiny", "--out", str(tmp_path / "empty")], "not a writable file path"),
    ]
    _check_all(cases)


@pytest.mark.slow
def test_second_trainer_on_one_checkpoint_dir_exits_at_once_naming_the_first(tmp_path):
    """Trainer A (torch) holds the dir; B in either backend, and a torch run in this process, are refused."""
    one = make_synthetic_set(tmp_path / "set", num_videos=8, num_images=0, frames=12, fps=8, progress=False)
    case = [a for a in _data_case(tmp_path, "run", one) if not a.startswith("data.buckets")]
    case += ['data.buckets=[{"width": 64, "height": 64, "frames": 9, "batch_size": 2}]', "compute_dtype=float32"]
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--backend", "torch", "steps=100000", *case]
    first = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "run" / "ckpt" / LOCK_FILE
    try:
        deadline = time.time() + 240
        while not (lock.exists() and str(first.pid) in lock.read_text()):
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.5)
        holder = f"in use by pid {first.pid} on {socket.gethostname()}"
        for backend in ("torch", "jax"):
            start = time.perf_counter()
            second = _cli("train", "--backend", backend, *case)
            assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
            assert holder in second.stderr.strip().splitlines()[-1]
            print(f"second trainer ({backend}) refused after {time.perf_counter() - start:.1f} s")
        assert first.poll() is None  # the first run is untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
