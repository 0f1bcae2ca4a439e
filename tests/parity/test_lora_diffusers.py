"""LoRA export for diffusers: our adapter -> `pytorch_lora_weights.safetensors` that diffusers' SD3 pipeline and
`SD3Transformer2DModel.load_lora_adapter` load into the same function as our merged checkpoint (both twins, fp32);
import is the exact inverse; bad adapters are one-line errors (exit 2)."""

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch

import contentv_jax
import contentv_torch_npu
from contentv_common.checkpoint.convert import convert
from contentv_common.checkpoint.formats import open_checkpoint
from contentv_common.cli import convert as convert_tool
from contentv_common.config.model import named_model_config
from contentv_common.config.recipe import LoraConfig
from contentv_common.lora.adapters import (
    DIFFUSERS_FILE,
    DIFFUSERS_METADATA,
    load_adapters,
    lora_keys,
    save_adapters,
    target_modules,
)
from contentv_torch_npu.reference import build_diffusers

TOL = 1e-5
LORA = LoraConfig(rank=4, alpha=6.0)  # alpha != rank: the scale 1.5 must survive the export


def random_adapters(shapes, lora=LORA, seed=0, std=0.3):
    """Adapters on the default targets with non-zero B, large enough to move the output by several percent."""
    rng = np.random.default_rng(seed)
    out = {}
    for m in target_modules(shapes, lora):
        rows, cols = shapes[f"{m}.weight"]
        a_key, b_key = lora_keys(m)
        out[a_key] = rng.standard_normal((lora.rank, cols), dtype=np.float32) * std / np.sqrt(cols)
        out[b_key] = rng.standard_normal((rows, lora.rank), dtype=np.float32) * std
    return out


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A random tiny SD3Transformer2DModel saved by diffusers, and an adapter file for it."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("sd3")
    build_diffusers(named_model_config("tiny").replace(pos_embed="sd3_2d")).save_pretrained(folder)
    adapter = folder.parent / "adapter.safetensors"
    save_adapters(adapter, random_adapters(open_checkpoint(folder).shapes), LORA)
    return folder, adapter


def _diffusers_model(folder):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(folder).eval()


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((2, 16, 1, 8, 12), dtype=np.float32),
        np.array([3.0, 871.5], np.float32),
        rng.standard_normal((2, 5, 48), dtype=np.float32),
        rng.standard_normal((2, 24), dtype=np.float32),
    )


@torch.no_grad()
def _diffusers_forward(model, inputs):
    x, t, ctx, pooled = (torch.from_numpy(a) for a in inputs)
    return model(x[:, :, 0], ctx, pooled, t).sample.numpy()[:, :, None]


def test_diffusers_pipeline_loads_export_like_our_merged_model(sd3, tmp_path, rel_err):
    """StableDiffusion3Pipeline.load_lora_weights(folder) on the exported file == our merged checkpoint in the torch
    and the JAX twin; diffusers' own save_lora_weights writes the same file back."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    folder, adapter = sd3
    export = tmp_path / "export"
    assert convert_tool.main([str(adapter), str(export), "--to", "diffusers-lora"]) == 0
    exported = load_file(export / DIFFUSERS_FILE)
    assert "transformer.transformer_blocks.1.attn.to_out.0.lora_A.weight" in exported
    assert "transformer.transformer_blocks.0.ff_context.net.2.lora_B.weight" in exported

    model = _diffusers_model(folder)
    inputs = _inputs()
    y_base = _diffusers_forward(model, inputs)
    encoders = {f"{k}{i}": None for k in ("text_encoder", "tokenizer") for i in ("", "_2", "_3")}
    pipe = StableDiffusion3Pipeline(
        transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, **encoders
    )
    pipe.load_lora_weights(export)
    assert model.transformer_blocks[0].attn.to_q.scaling["default_0"] == LORA.alpha / LORA.rank
    y_diffusers = _diffusers_forward(model, inputs)

    merged = tmp_path / "merged"
    assert convert_tool.main([str(folder), str(merged), "--to", "torch", "--lora", str(adapter)]) == 0
    with torch.no_grad():
        y_torch = contentv_torch_npu.load_transformer(merged)(*(torch.from_numpy(a) for a in inputs)).numpy()
    y_jax = np.asarray(contentv_jax.load_transformer(merged)(*inputs))
    assert rel_err(y_diffusers, y_base) > 0.02, "the adapter changes the output"
    assert rel_err(y_torch, y_diffusers) < TOL
    assert rel_err(y_jax, y_diffusers) < TOL

    # diffusers' writer, given the loaded adapter, writes our file: same keys, tensors and alpha metadata
    resaved = tmp_path / "resaved"
    StableDiffusion3Pipeline.save_lora_weights(
        resaved,
        transformer_lora_layers=get_peft_model_state_dict(model, adapter_name="default_0"),
        transformer_lora_adapter_metadata={"r": LORA.rank, "lora_alpha": LORA.alpha},
    )
    theirs = load_file(resaved / DIFFUSERS_FILE)
    assert sorted(theirs) == sorted(exported)
    for key, value in theirs.items():
        np.testing.assert_array_equal(value, exported[key], err_msg=key)


def test_folded_export_loads_without_metadata(sd3, tmp_path, rel_err):
    """SD3Transformer2DModel.load_lora_adapter: from the file (alpha from its metadata) it gives our merged model's
    output; from a bare state dict (alpha = rank) only the --fold-alpha export does."""
    folder, adapter = sd3
    plain, folded = tmp_path / "plain.safetensors", tmp_path / "folded.safetensors"
    assert convert_tool.main([str(adapter), str(plain), "--to", "diffusers-lora"]) == 0
    assert convert_tool.main([str(adapter), str(folded), "--to", "diffusers-lora", "--fold-alpha"]) == 0
    inputs = _inputs(seed=1)
    outputs = {}
    for name, path in (("plain", plain), ("folded", folded)):
        model = _diffusers_model(folder)
        model.load_lora_adapter(load_torch(path), prefix="transformer")  # a dict: no metadata reaches diffusers
        outputs[name] = _diffusers_forward(model, inputs)
    model = _diffusers_model(folder)
    model.load_lora_adapter(tmp_path, weight_name=plain.name, prefix="transformer")  # the file, with its metadata
    outputs["file"] = _diffusers_forward(model, inputs)
    merged = contentv_torch_npu.load_transformer(
        convert(folder, tmp_path / "merged", "torch", loras=[(adapter, 1.0)], progress=False)
    )
    with torch.no_grad():
        y_merged = merged(*(torch.from_numpy(a) for a in inputs)).numpy()
    assert rel_err(outputs["folded"], y_merged) < TOL
    assert rel_err(outputs["file"], y_merged) < TOL
    assert rel_err(outputs["plain"], y_merged) > 1e-3, "without metadata or folding the scale is lost"


def test_export_import_round_trip_is_exact(sd3, tmp_path):
    _, adapter = sd3
    export, back = tmp_path / "export", tmp_path / "back.safetensors"
    assert convert_tool.main([str(adapter), str(export), "--to", "diffusers-lora"]) == 0
    assert convert_tool.main([str(export), str(back), "--to", "lora"]) == 0
    before, rank, alpha = load_adapters(adapter)
    after, rank2, alpha2 = load_adapters(back)
    assert (rank2, alpha2) == (rank, alpha) == (LORA.rank, LORA.alpha)
    assert sorted(after) == sorted(before)
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value, err_msg=key)


def test_merge_scale_and_either_format(sd3, tmp_path):
    """--lora PATH:SCALE scales B @ A; merging the diffusers file or ours writes the same weights; two adapters add."""
    folder, adapter = sd3
    export = tmp_path / "export"
    convert_tool.main([str(adapter), str(export), "--to", "diffusers-lora"])
    weights = {}
    for name, specs in (
        ("ours", [f"{adapter}:0.5"]),
        ("diffusers", [f"{export}:0.5"]),
        ("twice", [f"{adapter}:0.25", f"{export}:0.25"]),
    ):
        argv = [str(folder), str(tmp_path / name), "--to", "torch"]
        assert convert_tool.main(argv + [arg for s in specs for arg in ("--lora", s)]) == 0
        weights[name] = load_file(tmp_path / name / "model.safetensors")
    base = dict(open_checkpoint(folder).tensors())
    adapters, rank, alpha = load_adapters(adapter)
    a, b = (adapters[k] for k in lora_keys("blocks.0.attn.to_q"))
    np.testing.assert_allclose(
        weights["ours"]["blocks.0.attn.to_q.weight"],
        base["blocks.0.attn.to_q.weight"] + 0.5 * alpha / rank * b @ a,
        rtol=1e-6,
        atol=1e-6,
    )
    for key in base:
        np.testing.assert_array_equal(weights["diffusers"][key], weights["ours"][key], err_msg=key)
        np.testing.assert_allclose(weights["twice"][key], weights["ours"][key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert np.array_equal(weights["ours"]["proj_out.weight"], base["proj_out.weight"]), "untargeted weights unchanged"


def test_bad_adapters_are_one_line_errors(sd3, tmp_path, capsys):
    folder, adapter = sd3
    shapes = open_checkpoint(folder).shapes
    adapters = random_adapters(shapes)
    a, b = (adapters[k] for k in lora_keys("blocks.0.attn.to_q"))
    extra = {**adapters, **dict(zip(lora_keys("blocks.7.attn.to_q"), (a, b), strict=True))}
    save_adapters(tmp_path / "extra.safetensors", extra, LORA)
    wide = random_adapters({k: (v[0], v[1] * 2) if len(v) == 2 else v for k, v in shapes.items()})
    save_adapters(tmp_path / "wide.safetensors", wide, LORA)
    save_file({"proj_out.weight": np.zeros((4, 4), np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "junk.safetensors").write_text("not safetensors")
    bad_name = {"transformer.transformer_blocks.0.attn.to_qq.lora_A.weight": np.zeros((4, 32), np.float32)}
    save_file(bad_name, str(tmp_path / "bad_name.safetensors"))
    text = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 8), np.float32)}
    save_file(text, str(tmp_path / "text.safetensors"))
    meta = {"format": "pt", DIFFUSERS_METADATA: json.dumps({"transformer.r": 8, "transformer.lora_alpha": 8})}
    exported = tmp_path / "exported.safetensors"
    convert_tool.main([str(adapter), str(exported), "--to", "diffusers-lora"])
    save_file(load_file(exported), str(tmp_path / "bad_rank.safetensors"), metadata=meta)
    out = str(tmp_path / "out")
    cases = [
        ([str(tmp_path / "nope.safetensors"), out, "--to", "diffusers-lora"], "nope.safetensors: no such LoRA adapter"),
        ([str(tmp_path / "junk.safetensors"), out, "--to", "lora"], "junk.safetensors: not a safetensors file"),
        ([str(tmp_path / "model.safetensors"), out, "--to", "diffusers-lora"], "not a LoRA adapter file"),
        (
            [str(tmp_path / "bad_name.safetensors"), out + ".safetensors", "--to", "lora"],
            "'transformer_blocks.0.attn.to_qq' is no linear module",
        ),
        (
            [str(tmp_path / "bad_rank.safetensors"), out + ".safetensors", "--to", "lora"],
            "says r=8, the matrices have ranks [4]",
        ),
        (
            [str(folder), out, "--to", "torch", "--lora", str(tmp_path / "extra.safetensors")],
            "the model has no weight 'blocks.7.attn.to_q.weight'",
        ),
        (
            [str(folder), out, "--to", "torch", "--lora", str(tmp_path / "wide.safetensors")],
            "blocks.0.attn.to_q.weight is (32, 32), B @ A of blocks.0.attn.to_q is (32, 64)",
        ),
        ([str(adapter), out, "--to", "torch"], "a LoRA adapter, not a checkpoint folder"),
        ([str(tmp_path / "text.safetensors"), out, "--to", "diffusers-lora"], "text-encoder LoRA is not supported"),
    ]
    for argv, message in cases:
        assert convert_tool.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, err
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
