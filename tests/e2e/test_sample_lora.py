"""tools/sample.py --lora: the adapter merged at load time samples exactly what the checkpoint merged by
tools/convert.py --lora samples (both backends), and differs from no adapter; bad adapters fail before any load."""

import re

import numpy as np
import pytest

import contentv_jax.loading as jax_loading
import contentv_torch_npu.loading as torch_loading
from contentv_common.backend import get
from contentv_common.checkpoint.convert import convert
from contentv_common.checkpoint.formats import open_checkpoint
from contentv_common.cli import sample as sample_tool
from contentv_common.config.recipe import LoraConfig
from contentv_common.data.video_io import read_video
from contentv_common.errors import CheckpointError
from contentv_common.lora.adapters import lora_keys, save_adapters, target_modules

LORA = LoraConfig(rank=4, alpha=6.0)
ARGS = ["--tiny", "--prompt", "a cat walking", "--frames", "1", "--size", "16x16", "--steps", "2"]
ARGS += ["--guidance", "1", "--seed", "3", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The random tiny checkpoint, an adapter for it with non-zero B, and the checkpoint with it merged by convert."""
    folder = tmp_path_factory.mktemp("lora")
    checkpoint = sample_tool.random_tiny_checkpoint(folder, seed=0)
    shapes = open_checkpoint(checkpoint).shapes
    rng = np.random.default_rng(0)
    adapters = {}
    for m in target_modules(shapes, LORA):
        rows, cols = shapes[f"{m}.weight"]
        a_key, b_key = lora_keys(m)
        adapters[a_key] = rng.standard_normal((LORA.rank, cols), dtype=np.float32) / np.sqrt(cols)
        adapters[b_key] = rng.standard_normal((rows, LORA.rank), dtype=np.float32) * 0.5
    adapter = folder / "adapter.safetensors"
    save_adapters(adapter, adapters, LORA)
    merged = convert(checkpoint, folder / "merged", "torch", loras=[(adapter, 0.8)], progress=False)
    return checkpoint, adapter, merged


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_sample_with_lora_equals_merged_checkpoint(tiny, tmp_path, backend):
    checkpoint, adapter, merged = tiny
    frames = {}
    for name, extra in (
        ("lora", ["--transformer", str(checkpoint), "--lora", f"{adapter}:0.8"]),
        ("merged", ["--transformer", str(merged)]),
        ("none", ["--transformer", str(checkpoint)]),
    ):
        (path,) = sample_tool.main([*ARGS, "--backend", backend, "--out", str(tmp_path / name), *extra])
        frames[name] = read_video(path)[0].astype(int)
    np.testing.assert_array_equal(frames["lora"], frames["merged"])
    assert np.abs(frames["lora"] - frames["none"]).mean() > 1, "the adapter changes the video"


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_merge_at_load_gives_the_converted_weights_in_bfloat16(tiny, tmp_path, backend):
    """Merging into loaded bf16 weights rounds once, as convert does on a bf16 checkpoint: bit-identical weights."""
    checkpoint, adapter, _ = tiny
    bf16 = convert(checkpoint, tmp_path / "bf16", "torch", dtype="bfloat16", progress=False)
    merged = convert(bf16, tmp_path / "merged", "torch", loras=[(adapter, 0.8)], progress=False)
    model = get(backend).load_transformer(bf16, "bfloat16", "cpu")
    get(backend).merge_loras(model, sample_tool.open_loras([(adapter, 0.8)], bf16))
    loading = jax_loading if backend == "jax" else torch_loading
    ours = dict(loading.canonical_tensors(model))
    theirs = dict(loading.canonical_tensors(get(backend).load_transformer(merged, "bfloat16", "cpu")))
    base = dict(open_checkpoint(bf16).tensors())
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype
        np.testing.assert_array_equal(ours[key].view(np.uint16), value.view(np.uint16), err_msg=key)
    assert not np.array_equal(ours["blocks.1.ff.fc2.weight"], base["blocks.1.ff.fc2.weight"])


def test_bad_lora_fails_before_loading(tiny, tmp_path, monkeypatch):
    checkpoint, _, _ = tiny
    monkeypatch.setattr(get("jax"), "load_transformer", _load_forbidden)
    wrong = dict(zip(lora_keys("proj_out"), (np.ones((4, 3), np.float32), np.ones((5, 4), np.float32)), strict=True))
    save_adapters(tmp_path / "other.safetensors", wrong, LORA)
    for spec, message in (
        (str(tmp_path / "nope.safetensors"), "nope.safetensors: no such LoRA adapter file"),
        (str(tmp_path / "other.safetensors"), "proj_out.weight is (64, 32), B @ A of proj_out is (5, 3)"),
    ):
        with pytest.raises(CheckpointError, match=re.escape(message)) as info:
            sample_tool.main([*ARGS, "--transformer", str(checkpoint), "--lora", spec, "--out", str(tmp_path)])
        assert "\n" not in str(info.value)


def _load_forbidden(*args, **kwargs):
    raise AssertionError("the model was loaded before the adapter was checked")
