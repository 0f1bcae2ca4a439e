"""SD3.5's text encoders in both backends vs diffusers' StableDiffusion3Pipeline.encode_prompt, on tiny random
CLIP-L (quick-GELU, legacy end-of-text id) / CLIP-G (GELU) / T5 in the official pipeline layout, 77 + 256 tokens."""

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from contentv_common.errors import CheckpointError, ConfigError
from contentv_common.text.encoder_table import write_text_encoder
from contentv_common.text.sd3_prompt import check_text_widths, read_text_configs
from contentv_common.tiny_models import tiny_text
from contentv_jax.text_encoders import load_text_encoders as load_jax
from contentv_jax.text_encoders import tiny_text_encoders as tiny_jax
from contentv_torch_npu.text_encoders import load_text_encoders as load_torch
from contentv_torch_npu.text_encoders import tiny_text_encoders as tiny_torch

PROMPTS = [
    "a cat walking on the sea",
    "The RED dog!! under a blue sky, 漢字 and unknown words",
    " ".join(["a red cat"] * 40),  # longer than 77 CLIP tokens: truncated
]
NEGATIVES = ["low quality", "", "blue"]
ALL = PROMPTS + NEGATIVES + [""]  # one batch of 7 (padded to 8): one JAX program serves every test
SEED = 3
FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
DTYPES = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}


def write_pipeline(root: Path, precision: str = "fp32", shard_bytes: int = 16 * 2**10) -> Path:
    """The tiny encoders in the official layout, written without torch; small shards, so every folder is sharded."""
    tiny = tiny_text(SEED)
    for name, raw, weights in zip(FOLDERS, tiny.raw_configs, tiny.weights, strict=True):
        tensors = ((k, v.astype(DTYPES[precision])) for k, v in weights.items())
        write_text_encoder(root / name, raw, tensors, max_shard_bytes=shard_bytes)
    tiny.tokenizers.save(root)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {p: write_pipeline(root / p, p) for p in DTYPES}


def transformers_text_modules(folder: Path) -> dict:
    """A pipeline folder's CLIP-L, CLIP-G and T5 and their tokenizers, loaded by transformers, as the keyword
    arguments of diffusers' StableDiffusion3Pipeline."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    return {
        "text_encoder": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder"),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
        "text_encoder_3": T5EncoderModel.from_pretrained(folder / "text_encoder_3"),
        "tokenizer": AutoTokenizer.from_pretrained(folder / "tokenizer"),
        "tokenizer_2": AutoTokenizer.from_pretrained(folder / "tokenizer_2"),
        "tokenizer_3": AutoTokenizer.from_pretrained(folder / "tokenizer_3"),
    }


@pytest.fixture(scope="module")
def reference(folders):
    """diffusers' encode_prompt on the fp32 folder: (embeds, negative embeds, pooled, negative pooled) for PROMPTS /
    NEGATIVES, and the same for PROMPTS[:1] with diffusers' own empty negative prompt."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        **transformers_text_modules(folders["fp32"]),
    )
    cpu = torch.device("cpu")
    with torch.no_grad():
        pairs = pipe.encode_prompt(PROMPTS, None, None, device=cpu, do_classifier_free_guidance=True,
                                   negative_prompt=NEGATIVES)  # fmt: skip
        empty = pipe.encode_prompt(PROMPTS[:1], None, None, device=cpu, do_classifier_free_guidance=True)
    return [t.numpy() for t in pairs], [t.numpy() for t in empty]


def _check(encoders, reference, rel_err, tol: float) -> tuple[np.ndarray, np.ndarray]:
    """ALL encoded in one call against diffusers; the last row is "", diffusers' negative prompt when none is given."""
    pairs, empty = reference
    embeds, pooled = encoders.encode(ALL)
    assert embeds.shape == (7, 77 + 256, 48) and pooled.shape == (7, 24)
    got = (embeds[:3], embeds[3:6], pooled[:3], pooled[3:6])
    for ours, want in zip(got, pairs, strict=True):
        assert ours.shape == want.shape and ours.dtype == np.float32
        assert rel_err(ours, want) < tol
    assert rel_err(embeds[6:], empty[1]) < tol and rel_err(pooled[6:], empty[3]) < tol
    return embeds, pooled


def test_torch_matches_diffusers_encode_prompt(folders, reference, rel_err):
    ours = load_torch(folders["fp32"])
    assert (ours.text_dim, ours.pooled_dim, ours.sequence_length) == (48, 24, 77 + 256)
    _check(ours, reference, rel_err, 1e-6)


def test_jax_matches_diffusers_encode_prompt(folders, reference, rel_err):
    """fp32 from the sharded fp32 folder within 1e-5; the layout is SD3's: CLIP features in 16 + 24 of 48 columns
    (the rest zero), T5 in all of its 256 tokens."""
    ours = load_jax(folders["fp32"])
    assert (ours.text_dim, ours.pooled_dim, ours.sequence_length) == (48, 24, 77 + 256)
    assert (folders["fp32"] / "text_encoder_3" / "model.safetensors.index.json").exists()
    embeds, _ = _check(ours, reference, rel_err, 1e-5)
    assert np.all(embeds[:, :77, 40:] == 0)
    assert np.abs(embeds[:, :77, :40]).mean() > 1e-2 and np.abs(embeds[:, 77:]).mean() > 1e-2
    assert rel_err(embeds[0], embeds[1]) > 0.1, "different prompts must give different embeddings"


def test_jax_half_precision_folders(folders, reference, rel_err):
    """bf16 weights computed in bf16 within bf16 tolerance; fp16 weights (upcast as read) within fp16 rounding."""
    bf16 = load_jax(folders["bf16"], dtype=jnp.bfloat16)
    assert bf16.model.t5.layers[0].ff.wo.kernel.dtype == jnp.bfloat16
    embeds, pooled = bf16.encode(PROMPTS)
    assert 0 < rel_err(embeds, reference[0][0]) < 3e-2 and 0 < rel_err(pooled, reference[0][2]) < 3e-2
    embeds, pooled = load_jax(folders["fp16"]).encode(ALL)
    assert 0 < rel_err(embeds[:3], reference[0][0]) < 2e-3 and 0 < rel_err(pooled[:3], reference[0][2]) < 2e-3


def test_tiny_encoders_are_the_same_in_both_backends(rel_err):
    """The tiny encoders draw their weights in numpy: the JAX and torch ones are one function."""
    jax_out, torch_out = tiny_jax(SEED).encode(ALL), tiny_torch(SEED).encode(ALL)
    assert tiny_jax(SEED).identity == tiny_torch(SEED).identity
    for got, want in zip(jax_out, torch_out, strict=True):
        assert rel_err(got, want) < 1e-5


def test_sharded_on_a_mesh(folders, rel_err):
    """T5 and CLIP weights split over fsdp (model width) and tensor (heads, feed-forward), prompts over data x fsdp;
    the same embeddings as on one device, the batch padded to split."""
    from contentv_common.config.recipe import MeshConfig
    from contentv_jax.sharding import make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, sequence=1, tensor=2), jax.devices()[:8])
    sharded = load_jax(folders["fp32"], mesh=mesh)
    q = sharded.model.t5.layers[1].attn.q.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (48 // 2, 16 // 2)
    wo = sharded.model.t5.layers[0].ff.wo.kernel[...]
    assert wo.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    single = load_jax(folders["fp32"])
    for got, want in zip(sharded.encode(ALL), single.encode(ALL), strict=True):
        assert rel_err(got, want) < 1e-5


def test_bad_folders_are_one_error_naming_folder_and_key(folders, tmp_path):
    good = folders["fp32"]
    for missing in ("text_encoder_2", "tokenizer_3"):
        bad = write_pipeline(tmp_path / f"no_{missing}")
        for file in (bad / missing).iterdir():
            file.unlink()
        (bad / missing).rmdir()
        with pytest.raises(FileNotFoundError, match=f"{bad / missing}: missing"):
            load_jax(bad)
    bad = write_pipeline(tmp_path / "bad_keys", shard_bytes=2**30)
    weights = bad / "text_encoder_3" / "model.safetensors"
    tensors = load_file(weights)
    tensors["encoder.block.1.layer.0.SelfAttention.k.weight"] = np.zeros((16, 47), np.float32)
    del tensors["encoder.final_layer_norm.weight"]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError) as e:
        load_jax(bad)
    message = str(e.value)
    assert message.startswith(f"{bad / 'text_encoder_3'}: checkpoint does not match")
    assert "missing key 'final_norm.weight' (diffusers 'encoder.final_layer_norm.weight')" in message
    assert "wrong shape for key 'layers.1.attn.k.weight': checkpoint (16, 47) vs model (16, 48)" in message
    with pytest.raises(CheckpointError, match="text_encoder_3: checkpoint does not match"):
        load_torch(bad)  # the same check before transformers reads anything
    configs = read_text_configs(good)
    with pytest.raises(ConfigError, match=r"text_encoder_3/config.json: d_model 48 is not the transformer's text"):
        check_text_widths(configs, good, text_dim=4096, pooled_dim=24)
    with pytest.raises(ConfigError, match=r"projection_dim 8 \+ 16 is not the transformer's pooled_projection_dim"):
        check_text_widths(configs, good, text_dim=48, pooled_dim=2048)
