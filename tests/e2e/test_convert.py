"""tools/convert: diffusers <-> jax <-> torch in every direction, bit-exact round trips, bounded memory; parity tool."""

import json
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import contentv_jax
import contentv_torch_npu
from contentv_common.checkpoint.convert import convert
from contentv_common.checkpoint.formats import config_from_diffusers, open_checkpoint, write_diffusers
from contentv_common.cli import convert as convert_tool
from contentv_common.cli import parity as parity_tool
from contentv_common.config.model import named_model_config
from contentv_torch_npu.loading import canonical_tensors
from contentv_torch_npu.reference import build_diffusers


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd3")
    build_diffusers(named_model_config("tiny").replace(pos_embed="sd3_2d")).save_pretrained(
        folder, max_shard_size="80KB"
    )
    return folder


def _diffusers_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("chain", [("jax", "torch", "diffusers"), ("torch", "jax", "diffusers")])
def test_round_trip_is_bit_exact(sd3_folder, tmp_path, chain):
    src = sd3_folder
    for i, fmt in enumerate(chain):
        dst = tmp_path / f"{i}_{fmt}"
        assert convert_tool.main([str(src), str(dst), "--to", fmt, "--shard-size", "50KB"]) == 0
        src = dst
    before, after = _diffusers_tensors(sd3_folder), _diffusers_tensors(src)
    assert sorted(before) == sorted(after)
    for key, value in before.items():
        assert after[key].dtype == value.dtype
        np.testing.assert_array_equal(after[key], value, err_msg=key)
    original = config_from_diffusers(json.loads((sd3_folder / "config.json").read_text()))
    assert config_from_diffusers(json.loads((src / "config.json").read_text())) == original


def test_converted_checkpoints_compute_the_same(sd3_folder, tmp_path):
    jax_dir = convert(sd3_folder, tmp_path / "jax", "jax", pos_embed="sincos_3d", progress=False)
    torch_dir = convert(jax_dir, tmp_path / "torch", "torch", progress=False)
    assert open_checkpoint(torch_dir).config.pos_embed == "sincos_3d"
    assert "patch_embed.pos_table" not in open_checkpoint(jax_dir).shapes
    rng = np.random.default_rng(0)
    inputs = (
        rng.standard_normal((1, 16, 2, 4, 4), dtype=np.float32),
        np.array([500.0], np.float32),
        rng.standard_normal((1, 3, 48), dtype=np.float32),
        rng.standard_normal((1, 24), dtype=np.float32),
    )
    y_direct = np.asarray(contentv_jax.load_transformer(sd3_folder, pos_embed="sincos_3d")(*inputs))
    y_jax = np.asarray(contentv_jax.load_transformer(jax_dir)(*inputs))
    with torch.no_grad():
        y_torch = contentv_torch_npu.load_transformer(torch_dir)(*(torch.from_numpy(a) for a in inputs)).numpy()
    np.testing.assert_array_equal(y_jax, y_direct)
    assert np.linalg.norm(y_torch - y_jax) / np.linalg.norm(y_jax) < 1e-5


def test_dtype_cast_and_overwrite_guard(sd3_folder, tmp_path):
    out = convert(sd3_folder, tmp_path / "bf16", "torch", dtype="bfloat16", progress=False)
    tensors = load_file(out / "model.safetensors")
    original = _diffusers_tensors(sd3_folder)
    assert tensors["proj_out.weight"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(tensors["proj_out.weight"], original["proj_out.weight"].astype(ml_dtypes.bfloat16))
    with pytest.raises(FileExistsError, match="not empty"):
        convert(sd3_folder, out, "torch", progress=False)


def test_streaming_conversion_peak_memory(tmp_path):
    """diffusers -> torch holds about one shard, not the model: peak well under the checkpoint size."""
    cfg = named_model_config("tiny").replace(
        num_layers=4, num_attention_heads=4, attention_head_dim=32, hidden_size=128, joint_attention_dim=128
    )
    torch.manual_seed(0)
    model = contentv_torch_npu.Transformer(cfg)
    total = sum(v.numel() * 4 for v in model.state_dict().values())
    src = write_diffusers(tmp_path / "src", cfg, canonical_tensors(model), max_shard_bytes=total // 8)
    del model
    tracemalloc.start()
    convert(src, tmp_path / "dst", "torch", max_shard_bytes=total // 8, progress=False)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total > 4e6
    assert peak < 0.5 * total, f"peak {peak / 1e6:.1f} MB for a {total / 1e6:.1f} MB checkpoint"


def test_parity_tool_prints_table(capsys):
    assert parity_tool.main(["--tiny", "--frames", "2", "--size", "8x8"]) == 0
    out = capsys.readouterr().out
    assert "torch vs jax" in out and "diffusers vs jax" in out and "blocks.1.x" in out
    assert "all layers within tol" in out


def test_parity_tool_reports_first_bad_layer(capsys, monkeypatch):
    original = parity_tool.TRACERS["torch"]

    def broken(path, pos_embed, inputs):
        trace = original(path, pos_embed, inputs)
        trace["blocks.1.x"] = trace["blocks.1.x"] * 1.01
        return trace

    monkeypatch.setitem(parity_tool.TRACERS, "torch", broken)
    assert parity_tool.main(["--tiny", "--backends", "jax,torch", "--frames", "1"]) == 1
    assert "first layer exceeding tol 1e-05: blocks.1.x" in capsys.readouterr().out


def test_cli_errors_name_the_problem(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert convert_tool.main([str(missing), str(tmp_path / "out"), "--to", "jax"]) == 2
    assert f"{missing}: checkpoint folder not found" in capsys.readouterr().err
    assert parity_tool.main(["--checkpoint", str(missing)]) == 2
    assert f"{missing}: checkpoint folder not found" in capsys.readouterr().err
