"""Loading at real size: one streaming read puts each device's slices in place, orbax restores and saves from the
shards, the framework-free layer leaves the JAX format to contentv_jax, and the SD3.5-Large-shaped checkpoint maker is
exact."""

from __future__ import annotations

import ast
import dataclasses
import json
import mmap
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import contentv_common
import contentv_jax
from contentv_common.checkpoint.formats import open_checkpoint, write_diffusers
from contentv_common.config.model import named_model_config
from contentv_common.config.recipe import MeshConfig
from contentv_jax.loading import canonical_tensors, fill_from_source, load_transformer, model_shardings, save_jax
from contentv_jax.sharding import make_mesh
from contentv_jax.transformer import Transformer
from tools import make_sd35_checkpoint as maker

CFG = named_model_config("tiny").replace(num_layers=3)  # two stacked blocks and the last one


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    model = Transformer(CFG, rngs=nnx.Rngs(7))
    out = tmp_path_factory.mktemp("ckpt") / "diffusers"
    return write_diffusers(out, CFG, canonical_tensors(model), max_shard_bytes=40_000)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(MeshConfig(fsdp=8), jax.devices()[:8])


def _flat(model: nnx.Module) -> dict[str, jax.Array]:
    return {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model))}


def test_every_tensor_is_read_once_and_every_device_keeps_only_its_slice(folder, mesh):
    source = open_checkpoint(folder)
    reads: list[str] = []
    tensors = source.tensors

    def counting(skip=()):
        for name, array in tensors(skip):
            reads.append(name)
            yield name, array

    abstract = contentv_jax.loading.abstract_transformer(CFG)
    sharded = fill_from_source(
        abstract, dataclasses.replace(source, tensors=counting), shardings=model_shardings(abstract, mesh)
    )
    whole = load_transformer(folder)
    for name, array in _flat(whole).items():
        np.testing.assert_array_equal(np.asarray(_flat(sharded)[name]), np.asarray(array), err_msg=name)
    kernel = sharded.blocks.attn.to_q.kernel[...]  # stacked [2, 32, 32], split over fsdp on the model width
    assert kernel.sharding.spec[0] is None and "fsdp" in str(kernel.sharding.spec)
    assert kernel.addressable_shards[0].data.shape == (2, 32 // 8, 32)
    assert sorted(reads) == sorted(source.shapes)  # one streaming pass: every tensor read once


def test_jax_format_saves_and_restores_on_the_shards(folder, mesh, tmp_path):
    """Restored onto the mesh's shardings, every shard kept in the page-aligned buffer it was read into (no device
    copy: JAX's own buffers are 64-byte aligned), bit-exact."""
    model = load_transformer(folder, mesh=mesh)
    save_jax(tmp_path / "jax", model)
    restored = load_transformer(tmp_path / "jax", mesh=mesh)
    shardings = model_shardings(contentv_jax.loading.abstract_transformer(CFG), mesh)
    for name, array in _flat(restored).items():
        assert array.sharding.is_equivalent_to(shardings[name], array.ndim), name
        for shard in array.addressable_shards:
            assert shard.data.unsafe_buffer_pointer() % mmap.PAGESIZE == 0, name
    expected = dict(canonical_tensors(load_transformer(folder)))
    got = dict(canonical_tensors(restored))
    assert sorted(got) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)


def test_common_layer_never_imports_a_backend(tmp_path):
    """No module of contentv_common imports a backend; the commands (contentv_common/cli, the top of the stack, which
    also time diffusers and raw kernels) only inside their functions, never at import time."""
    root = Path(contentv_common.__file__).parent
    for file in root.rglob("*.py"):
        tree = ast.parse(file.read_text())
        for node in tree.body if file.parent.name == "cli" else ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not any(n.split(".")[0] in ("contentv_jax", "contentv_torch_npu") for n in names), file
    (tmp_path / "params").mkdir()
    (tmp_path / "contentv_config.json").write_text("{}")
    code = f"from contentv_common.checkpoint.formats import open_checkpoint; open_checkpoint({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "read and written by contentv_jax" in result.stderr


def test_sd35_maker_has_exactly_the_diffusers_keys_and_shapes():
    """Full size: 38 blocks, 8.1B parameters, against diffusers' own SD3Transformer2DModel built on the meta device."""
    import torch
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        reference = SD3Transformer2DModel(**{k: v for k, v in maker.SD35_LARGE.items() if not k.startswith("_")})
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    shapes = maker.diffusers_shapes(maker.sd35_config())
    assert shapes == expected
    assert 8.0e9 < sum(int(np.prod(s)) for s in shapes.values()) < 8.2e9


def test_sd35_maker_writes_a_loadable_sharded_folder(tmp_path):
    cfg = CFG.replace(pos_embed="sd3_2d")
    names = list(maker.write_random_checkpoint(tmp_path / "ckpt", cfg, "bfloat16", max_shard_bytes=30_000))
    assert len(names) > 1
    index = json.loads((tmp_path / "ckpt" / f"{maker.PREFIX}.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(names)
    model = load_transformer(tmp_path / "ckpt", dtype="bfloat16")
    assert model.cfg == cfg
    kernel = np.asarray(model.block(1).ff.fc1.kernel[...], np.float32)
    assert kernel.dtype == np.float32 and 0.01 < kernel.std() < 0.03
    assert maker.main([str(tmp_path / "other"), "--blocks", "0"]) == 2


def test_bench_load_reports_memory_over_model_bytes(folder, tmp_path):
    """The benchmark runs end to end (in its own process: it sets the fake device count) and says what it measured."""
    tool = Path(__file__).parents[2] / "tools" / "bench_load.py"
    run = [sys.executable, str(tool), str(folder), "--devices", "2", "--save-to", str(tmp_path / "jax")]
    result = subprocess.run([*run, "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    n = sum(int(np.prod(s)) for s in open_checkpoint(folder).shapes.values())
    assert report["params"] == n and report["model_bytes"] == 2 * n and report["max_device_bytes"] < 2 * n
    assert report["load_peak_rss_bytes"] > report["baseline_rss_bytes"] and report["save_peak_over_model"] > 0
    missing = subprocess.run([sys.executable, str(tool), str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "not found" in missing.stderr
