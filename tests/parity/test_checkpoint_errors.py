"""Bad checkpoints raise errors that name the file, the key and both shapes, in both backends."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import contentv_jax
import contentv_torch_npu
from contentv_common.checkpoint.param_table import TRANSFORMER_TABLE
from contentv_common.config.model import named_model_config
from contentv_common.errors import CheckpointError, ConfigError, UnknownParameterError
from contentv_torch_npu.reference import build_diffusers

LOADERS = {"jax": contentv_jax.load_transformer, "torch": contentv_torch_npu.load_transformer}
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture()
def folder(tmp_path):
    torch.manual_seed(0)
    build_diffusers(named_model_config("tiny")).save_pretrained(tmp_path)
    return tmp_path


def _edit(folder, fn):
    tensors = load_file(folder / WEIGHTS)
    fn(tensors)
    save_file(tensors, folder / WEIGHTS)


@pytest.mark.parametrize("backend", LOADERS)
def test_missing_key(folder, backend):
    _edit(folder, lambda t: t.pop("transformer_blocks.1.attn.norm_added_k.weight"))
    with pytest.raises(CheckpointError) as e:
        LOADERS[backend](folder)
    msg = str(e.value)
    assert "missing key 'blocks.1.attn.norm_added_k.weight'" in msg and "transformer_blocks.1.attn.norm_added_k" in msg
    assert str(folder) in msg and "(16,)" in msg


@pytest.mark.parametrize("backend", LOADERS)
def test_wrong_shape(folder, backend):
    def widen(t):
        t["proj_out.weight"] = np.zeros((64, 40), np.float32)

    _edit(folder, widen)
    with pytest.raises(
        CheckpointError, match=r"wrong shape for key 'proj_out.weight': checkpoint \(64, 40\) vs model \(64, 32\)"
    ):
        LOADERS[backend](folder)


@pytest.mark.parametrize("backend", LOADERS)
def test_unexpected_key(folder, backend):
    def add(t):
        t["transformer_blocks.1.attn.to_add_out.weight"] = np.zeros((32, 32), np.float32)

    _edit(folder, add)
    with pytest.raises(CheckpointError, match="unexpected key 'blocks.1.attn.add_out.weight'"):
        LOADERS[backend](folder)


@pytest.mark.parametrize("backend", LOADERS)
def test_truncated_file(folder, backend):
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{WEIGHTS}: cannot read safetensors file"):
        LOADERS[backend](folder)


def test_unknown_name_and_bad_config(folder):
    def add(t):
        t["transformer_blocks.0.attn.mystery.weight"] = np.zeros((2,), np.float32)

    _edit(folder, add)
    with pytest.raises(CheckpointError, match="unexpected key 'transformer_blocks.0.attn.mystery.weight'"):
        contentv_torch_npu.load_transformer(folder)
    with pytest.raises(UnknownParameterError):
        TRANSFORMER_TABLE.from_canonical("blocks.0.nothing.weight")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_attention_heads": 3}))
    with pytest.raises(ConfigError, match="config.json: .*num_attention_heads"):
        contentv_jax.load_transformer(folder)


def test_missing_shard_and_folder(folder, tmp_path_factory):
    index = {"metadata": {}, "weight_map": {"proj_out.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="00002-of-00002.safetensors, which is missing"):
        contentv_torch_npu.load_transformer(folder)
    with pytest.raises(CheckpointError, match="not found"):
        contentv_jax.load_transformer(tmp_path_factory.mktemp("x") / "nope")
