"""The JAX core on bf16 and fp32 checkpoints in fresh processes where torch cannot be imported (`.[jax]` alone).

Text encoding and the latent/text cache run in torch (transformers has no Flax), so without torch the sampling and
parity CLIs end in one line naming the `[torch]` extra. tests/run_extras.sh also runs this file in a virtual
environment holding only `.[jax]`.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from contentv_common.video_io import read_video
from tests.fresh.runner import NOT_TORCH, assert_ok, check_loader_outputs, one_line_error, run_blocked, tensors

SAMPLE = ["tools/sample.py", "--tiny", "--backend", "jax", "--prompt", "a red circle", "--frames", "1"]
SAMPLE += ["--size", "32x32", "--steps", "2", "--no-progress"]


def test_loaders_read_bf16_and_fp32(jax_outputs, rel_err):
    """load_transformer, load_vae and load_clip_reward, then one forward each, from sharded bf16 and fp32 folders."""
    check_loader_outputs(jax_outputs, rel_err)


def test_convert_cli(checkpoints, tmp_path):
    """tools/convert.py: bf16 diffusers -> JAX (orbax) -> diffusers fp32, an exact upcast of every tensor."""
    src, ours, back = checkpoints / "transformer_bf16", tmp_path / "jax", tmp_path / "diffusers"
    result = run_blocked(
        NOT_TORCH,
        ["tools/convert.py", src, ours, "--to", "jax"],
        ["tools/convert.py", ours, back, "--to", "diffusers", "--dtype", "float32", "--shard-size", "64KB"],
    )
    assert_ok(result)
    source, upcast = tensors(src), tensors(back)
    assert source.keys() == upcast.keys()
    for key, array in source.items():
        assert array.dtype.name == "bfloat16" and upcast[key].dtype == np.float32, key
        assert np.array_equal(upcast[key], array.astype(np.float32)), key
    assert (back / "diffusion_pytorch_model.safetensors.index.json").exists()


def test_clis_without_torch_name_the_extra(checkpoints, tmp_path):
    """Training's cache and sampling (text encoders) and parity against torch need torch: one line naming
    `.[torch]`, exit status 2, before any cache is built or model loaded."""
    train_dir, sample_dir = tmp_path / "train", tmp_path / "sample"
    overrides = {"data.manifest": "synthetic/manifest.jsonl", "data.cache_dir": "cache", "checkpoint.dir": "ck"}
    overrides = [f"{key}={train_dir / value}" for key, value in overrides.items()] + [f"log_dir={train_dir}/logs"]
    train = run_blocked(NOT_TORCH, ["tools/train.py", "--no-progress", *overrides])
    assert one_line_error(train, "torch").startswith("train: error:") and not (train_dir / "cache").exists()
    bf16 = checkpoints / "transformer_bf16"
    sample = run_blocked(NOT_TORCH, [*SAMPLE, "--transformer", bf16, "--out", sample_dir])
    assert one_line_error(sample, "torch").startswith("sample: error:") and not sample_dir.exists()
    parity = run_blocked(
        NOT_TORCH, ["tools/parity.py", "--checkpoint", checkpoints / "transformer_bf16", "--backends", "jax,torch"]
    )
    one_line_error(parity, "torch")
    assert "parity:" not in parity.stdout  # nothing traced


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="sampling encodes text in torch")
def test_sample_cli(checkpoints, tmp_path):
    """tools/sample.py --backend jax in a fresh process on the bf16 folder (bf16 weights) gives the fp32 folder's
    frame within bf16 rounding."""
    result = run_blocked(
        "",
        [*SAMPLE, "--transformer", checkpoints / "transformer_bf16", "--dtype", "bfloat16", "--out", tmp_path / "bf16"],
        [*SAMPLE, "--transformer", checkpoints / "transformer_fp32", "--out", tmp_path / "fp32"],
    )
    assert_ok(result)
    (bf16, _), (fp32, _) = (read_video(next((tmp_path / p).glob("*.mp4"))) for p in ("bf16", "fp32"))
    assert bf16.shape == fp32.shape == (1, 32, 32, 3) and fp32.std() > 5
    assert np.abs(bf16.astype(np.int16) - fp32).mean() < 6  # uint8 levels, after mp4 coding
