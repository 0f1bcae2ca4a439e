"""Running scripts in fresh processes with one framework blocked, and the checks shared by both backends' tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from contentv_common.checkpoint.formats import open_checkpoint
from contentv_common.data.video_io import read_video

ROOT = Path(__file__).resolve().parents[2]
BLOCKED = Path(__file__).with_name("blocked.py")
NOT_JAX = "jax,jaxlib,flax,optax,orbax,grain"
NOT_TORCH = "torch,torch_npu,torchvision"


def run_blocked(blocked: str, *runs: list, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run scripts (each `[script, *args]`, paths relative to the repository root) one after the other in one fresh
    process where the comma-separated top-level packages `blocked` cannot be imported."""
    argv = [sys.executable, str(BLOCKED), blocked]
    for i, run in enumerate(runs):
        argv += (["---"] if i else []) + [str(a) for a in run]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    env.pop("XLA_FLAGS", None)  # one CPU device, as in a user's fresh process
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def check_loader_outputs(outputs: dict[str, np.ndarray], rel_err) -> None:
    """Every output finite and non-trivial; the bf16 (fp16) folder's forward within bf16 (fp16) rounding of the fp32
    folder's."""
    for key, value in outputs.items():
        assert np.isfinite(value).all() and value.std() > 1e-3, key
    for model in ("transformer", "vae", "clip"):
        ref = outputs[f"{model}/fp32/float32"]
        assert 0 < rel_err(outputs[f"{model}/bf16/float32"], ref) < 2e-2, model  # bf16 weights, fp32 compute
    for model in ("transformer", "vae"):
        ref = outputs[f"{model}/fp32/float32"]
        assert 0 < rel_err(outputs[f"{model}/bf16/bfloat16"], ref) < 4e-2, model  # bf16 weights and compute
    assert 0 < rel_err(outputs["transformer/fp16/float32"], outputs["transformer/fp32/float32"]) < 2e-3


def tensors(folder: Path) -> dict[str, np.ndarray]:
    """Canonical name -> array of a diffusers or torch-format transformer folder (read without any framework)."""
    return dict(open_checkpoint(folder).tensors())


def sample_argv(backend: str) -> list[str]:
    """tools/sample.py on one tiny 32x32 frame in two steps with `backend`; the checkpoint and --out still to add."""
    argv = ["tools/sample.py", "--tiny", "--backend", backend, "--prompt", "a red circle", "--frames", "1"]
    return argv + ["--size", "32x32", "--steps", "2", "--no-progress"]


def check_bf16_sampling(blocked: str, backend: str, checkpoints: Path, out: Path) -> None:
    """tools/sample.py on the bf16 folder (bf16 weights) gives the fp32 folder's frame within bf16 rounding."""
    sample = sample_argv(backend)
    result = run_blocked(
        blocked,
        [*sample, "--transformer", checkpoints / "transformer_bf16", "--dtype", "bfloat16", "--out", out / "bf16"],
        [*sample, "--transformer", checkpoints / "transformer_fp32", "--out", out / "fp32"],
    )
    assert_ok(result)
    (bf16, _), (fp32, _) = (read_video(next((out / p).glob("*.mp4"))) for p in ("bf16", "fp32"))
    assert bf16.shape == fp32.shape == (1, 32, 32, 3) and fp32.std() > 5
    assert np.abs(bf16.astype(np.int16) - fp32).mean() < 6  # uint8 levels, after mp4 coding


def convert_round_trip(blocked: str, src: Path, ours: Path, to: str, back: Path) -> dict[str, np.ndarray]:
    """tools/convert.py `src` (bf16 diffusers) -> `ours` (format `to`) -> `back` (diffusers fp32, sharded): every
    tensor an exact upcast of the source's. Returns the source's tensors."""
    result = run_blocked(
        blocked,
        ["tools/convert.py", src, ours, "--to", to],
        ["tools/convert.py", ours, back, "--to", "diffusers", "--dtype", "float32", "--shard-size", "64KB"],
    )
    assert_ok(result)
    source, upcast = tensors(src), tensors(back)
    assert source.keys() == upcast.keys()
    for key, array in source.items():
        assert array.dtype.name == "bfloat16" and upcast[key].dtype == np.float32, key
        assert np.array_equal(upcast[key], array.astype(np.float32)), key
    assert (back / "diffusion_pytorch_model.safetensors.index.json").exists()
    return source


def one_line_error(result: subprocess.CompletedProcess, extra: str) -> str:
    """The CLI's error line, after checking it is the one-line missing-extra error with exit status 2."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert f'pip install -e ".[{extra}]"' in line, result.stderr[-3000:]
    return line
