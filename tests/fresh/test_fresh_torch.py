"""The torch twin on bf16 and fp32 checkpoints in fresh processes where JAX cannot be imported (`.[torch]` alone).

bf16 safetensors must load whatever was imported before (numpy knows bf16 only through ml_dtypes, which JAX used to
import as a side effect). tests/run_extras.sh also runs this file in a virtual environment holding only `.[torch]`.
"""

from __future__ import annotations

import numpy as np
import pytest

from contentv_common.checkpoint.safetensors_io import iter_tensors, weight_files
from tests.fresh.runner import (
    NOT_JAX,
    assert_ok,
    check_bf16_sampling,
    check_loader_outputs,
    convert_round_trip,
    one_line_error,
    run_blocked,
    tensors,
)


def test_loaders_read_bf16_and_fp32(torch_outputs, rel_err):
    """load_transformer, load_vae and load_clip_reward, then one forward each, from sharded bf16 and fp32 folders."""
    check_loader_outputs(torch_outputs, rel_err)


def test_sample_cli(checkpoints, tmp_path):
    """tools/sample.py on the bf16 folder (bf16 weights) gives the fp32 folder's frame within bf16 rounding."""
    check_bf16_sampling(NOT_JAX, "torch", checkpoints, tmp_path)


def test_convert_cli(checkpoints, tmp_path):
    """tools/convert.py: bf16 diffusers -> torch format (bit for bit) -> diffusers fp32 (exact upcast, sharded);
    --to jax without JAX ends in one line naming the extra."""
    src, ours = checkpoints / "transformer_bf16", tmp_path / "torch"
    source = convert_round_trip(NOT_JAX, src, ours, "torch", tmp_path / "diffusers")
    converted = tensors(ours)
    assert source.keys() == converted.keys()
    for key, array in source.items():
        assert converted[key].dtype == array.dtype, key
        assert np.array_equal(converted[key].view(np.uint16), array.view(np.uint16)), key
    one_line_error(run_blocked(NOT_JAX, ["tools/convert.py", src, tmp_path / "jax", "--to", "jax"]), "jax")
    assert not (tmp_path / "jax").exists()


@pytest.mark.slow
def test_parity_cli(checkpoints):
    """tools/parity.py torch vs diffusers on the bf16 and fp32 folders: every layer within 1e-5."""
    runs = [["tools/parity.py", "--checkpoint", checkpoints / f"transformer_{p}", "--backends", "torch,diffusers",
             "--size", "8x8", "--batch", "1"] for p in ("bf16", "fp32")]  # fmt: skip
    result = run_blocked(NOT_JAX, *runs)
    assert_ok(result)
    assert result.stdout.count("all layers within tol") == 2, result.stdout[-3000:]


def test_smoke_full_size_cli(checkpoints):
    """tools/smoke_full_size.py (the docs/scale.md smoke) on the tiny bf16 folder: loads, one finite forward, JAX
    never imported; a folder without weights ends with exit status 2."""
    result = run_blocked(NOT_JAX, ["tools/smoke_full_size.py", "--backend", "torch", checkpoints / "transformer_bf16"])
    assert_ok(result)
    assert "finite=True" in result.stdout and "other framework imported: none" in result.stdout, result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("| torch | 0.00B"), result.stdout
    bad = run_blocked(NOT_JAX, ["tools/smoke_full_size.py", "--backend", "torch", checkpoints])
    assert bad.returncode == 2 and "smoke_full_size: error:" in bad.stderr, bad.stderr[-2000:]


def test_folders_are_the_official_layouts(checkpoints):
    """diffusers and transformers themselves read the bf16 folders with no missing, unexpected or mismatched key, and
    the same values: the fresh-process tests load the layout users download."""
    import torch
    from diffusers import AutoencoderKLWan, SD3Transformer2DModel
    from transformers import CLIPModel

    for cls, name in ((SD3Transformer2DModel, "transformer"), (AutoencoderKLWan, "vae"), (CLIPModel, "clip")):
        folder = checkpoints / f"{name}_bf16"
        model, info = cls.from_pretrained(folder, torch_dtype=torch.bfloat16, output_loading_info=True)
        problems = {k: v for k, v in info.items() if k != "error_msgs" and v}
        assert not problems and not info.get("error_msgs"), (name, problems)
        ours = dict(iter_tensors(weight_files(folder)))
        for key, tensor in model.state_dict().items():
            if key in ours:
                # bf16 -> fp32 is exact; diffusers may keep a buffer (SD3's position table) in fp32
                assert np.array_equal(tensor.float().numpy(), ours[key].astype(np.float32)), (name, key)
        assert len(ours) and set(ours) <= set(model.state_dict()), name
