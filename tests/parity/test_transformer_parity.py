"""Both backends load a diffusers-saved SD3 transformer and compute the same function as diffusers (fp32)."""

import jax
import numpy as np
import pytest
import torch

import contentv_jax
import contentv_torch_npu
from contentv_common.config.model import named_model_config
from contentv_common.model.pos_embed import sd3_table, sincos_3d_table
from contentv_torch_npu.reference import build_diffusers, reference_forward
from contentv_torch_npu.transformer import sincos_3d_parts

TOL = 1e-5


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """A random tiny SD3Transformer2DModel saved by diffusers' own save_pretrained."""
    torch.manual_seed(0)
    model = build_diffusers(named_model_config("tiny").replace(pos_embed="sd3_2d")).eval()
    folder = tmp_path_factory.mktemp("sd3")
    model.save_pretrained(folder)
    return folder, model


def _inputs(cfg, frames, seed=0, batch=2, height=8, width=12, tokens=5):
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((batch, cfg.in_channels, frames, height, width), dtype=np.float32),
        np.array([3.0, 871.5], np.float32)[:batch],
        rng.standard_normal((batch, tokens, cfg.joint_attention_dim), dtype=np.float32),
        rng.standard_normal((batch, cfg.pooled_projection_dim), dtype=np.float32),
    )


def _run_both(folder, inputs, pos_embed=None):
    jm = contentv_jax.load_transformer(folder, pos_embed=pos_embed)
    tm = contentv_torch_npu.load_transformer(folder, pos_embed=pos_embed).eval()
    with torch.no_grad():
        y_torch = tm(*(torch.from_numpy(a) for a in inputs)).numpy()
    return np.asarray(jm(*inputs)), y_torch


def test_image_mode_matches_diffusers(sd3_folder, rel_err):
    folder, ref = sd3_folder
    cfg = named_model_config("tiny")
    inputs = _inputs(cfg, frames=1)
    with torch.no_grad():
        x, t, ctx, pooled = (torch.from_numpy(a) for a in inputs)
        y_ref = ref(x[:, :, 0], ctx, pooled, t).sample.numpy()[:, :, None]
    y_jax, y_torch = _run_both(folder, inputs)
    assert y_jax.shape == y_ref.shape == (2, 16, 1, 8, 12)
    assert rel_err(y_jax, y_ref) < TOL
    assert rel_err(y_torch, y_ref) < TOL


@pytest.mark.slow
def test_contentv_mode_matches_diffusers_reference(sd3_folder, rel_err):
    """SD3 checkpoint -> video model (3D sin-cos): both backends vs diffusers modules + get_3d_sincos_pos_embed."""
    folder, ref = sd3_folder
    cfg = named_model_config("tiny")
    inputs = _inputs(cfg, frames=3, seed=1)
    y_ref = reference_forward(ref, cfg, *(torch.from_numpy(a) for a in inputs)).numpy()
    y_jax, y_torch = _run_both(folder, inputs, pos_embed="sincos_3d")
    assert y_jax.shape == (2, 16, 3, 8, 12)
    assert rel_err(y_jax, y_ref) < TOL
    assert rel_err(y_torch, y_ref) < TOL
    assert rel_err(y_jax, y_torch) < TOL
    # Frames are not independent: the video model attends across time.
    y_single = reference_forward(
        ref, cfg, *(torch.from_numpy(a[:, :, :1]) if i == 0 else torch.from_numpy(a) for i, a in enumerate(inputs))
    ).numpy()
    assert rel_err(y_single[:, :, 0], y_ref[:, :, 0]) > 1e-3


def test_position_tables_match_diffusers(rel_err):
    from diffusers.models.embeddings import PatchEmbed, get_3d_sincos_pos_embed

    ours = sincos_3d_table(64, 3, 4, 6, 0.5, 1.0)
    theirs = get_3d_sincos_pos_embed(64, (6, 4), 3, spatial_interpolation_scale=0.5, temporal_interpolation_scale=1.0)
    assert rel_err(ours, theirs.reshape(-1, 64).numpy()) < 1e-6
    on_device = sincos_3d_table(64, 3, 4, 6, 0.5, 1.0, xp=jax.numpy)  # float32 maths inside jit (JAX backend)
    assert on_device.dtype == np.float32 and rel_err(on_device, theirs.reshape(-1, 64).numpy()) < 1e-6
    temporal, spatial = sincos_3d_parts(64, 3, 4, 6, 0.5, 1.0, torch.device("cpu"))  # torch twin: factors, float32
    torch_table = torch.cat([temporal[:, None].expand(3, 24, 16), spatial[None].expand(3, 24, 48)], -1)
    assert temporal.dtype == torch.float32 and rel_err(torch_table.reshape(-1, 64), theirs.reshape(-1, 64)) < 1e-6
    embed = PatchEmbed(height=32, width=32, patch_size=2, in_channels=4, embed_dim=64, pos_embed_max_size=24)
    assert rel_err(sd3_table(64, 24, 32, 2), embed.pos_embed.numpy()) < 1e-6


def test_sharded_bf16_checkpoint_loads_exactly(tmp_path):
    torch.manual_seed(1)
    model = build_diffusers(named_model_config("tiny")).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and list(tmp_path.glob("*.index.json"))
    ref = {k: v.float().numpy() for k, v in model.state_dict().items()}
    tm = contentv_torch_npu.load_transformer(tmp_path)
    assert tm.cfg.pos_embed == "sd3_2d"  # diffusers writes SD3Transformer2DModel: image mode
    np.testing.assert_array_equal(tm.state_dict()["patch_embed.pos_table"].numpy(), ref["pos_embed.pos_embed"])
    np.testing.assert_array_equal(
        tm.state_dict()["blocks.1.attn.to_q.weight"].numpy(), ref["transformer_blocks.1.attn.to_q.weight"]
    )
    jm = contentv_jax.load_transformer(tmp_path, dtype="bfloat16")
    kernel = np.asarray(jm.block(0).ff.fc1.kernel[...])
    assert kernel.dtype.name == "bfloat16"
    np.testing.assert_array_equal(kernel.astype(np.float32).T, ref["transformer_blocks.0.ff.net.0.proj.weight"])


@pytest.mark.slow
def test_bf16_compute_runs_close_to_fp32(sd3_folder, rel_err):
    """bf16 compute with fp32 parameters (a sanity check only: parity is proven in fp32 above)."""
    import jax.numpy as jnp

    folder, _ = sd3_folder
    cfg = named_model_config("tiny")
    inputs = _inputs(cfg, frames=2, seed=2)
    y32_jax, y32_torch = _run_both(folder, inputs, pos_embed="sincos_3d")
    jm = contentv_jax.load_transformer(folder, pos_embed="sincos_3d", compute_dtype=jnp.bfloat16)
    assert jm.block(0).attn.to_q.kernel[...].dtype == jnp.float32
    y16_jax = np.asarray(jm(*inputs).astype(jnp.float32))
    tm = contentv_torch_npu.load_transformer(folder, pos_embed="sincos_3d", compute_dtype=torch.bfloat16)
    with torch.no_grad():
        y16_torch = tm(*(torch.from_numpy(a) for a in inputs))
    assert y16_torch.dtype == torch.bfloat16 and tm.proj_out.weight.dtype == torch.float32
    assert 0 < rel_err(y16_jax, y32_jax) < 5e-2
    assert 0 < rel_err(y16_torch.float().numpy(), y32_torch) < 5e-2


@pytest.mark.slow
def test_remat_and_checkpointing_keep_outputs_and_grads(sd3_folder, rel_err):
    import jax
    from flax import nnx

    folder, _ = sd3_folder
    cfg = named_model_config("tiny")
    inputs = _inputs(cfg, frames=2, seed=3, batch=1)

    def grad_of(remat):
        model = contentv_jax.load_transformer(folder, pos_embed="sincos_3d", remat=remat)
        return nnx.grad(lambda m: jax.numpy.mean(m(*inputs) ** 2))(model)

    g_plain, g_remat = grad_of("none"), grad_of("full")
    a = g_plain.blocks.attn.to_k.kernel[...][0]  # block 0: layer 0 of the stacked blocks
    assert rel_err(g_remat.blocks.attn.to_k.kernel[...][0], a) < 1e-6 and np.abs(a).max() > 0

    tm = contentv_torch_npu.load_transformer(folder, pos_embed="sincos_3d")
    grads = []
    for flag in (False, True):
        tm.zero_grad()
        tm.gradient_checkpointing = flag
        tm(*(torch.from_numpy(x) for x in inputs)).pow(2).mean().backward()
        grads.append(tm.blocks[0].attn.to_k.weight.grad.clone().numpy())
    assert rel_err(grads[1], grads[0]) < 1e-6
    assert rel_err(grads[0], np.asarray(a).T) < 1e-4  # JAX and torch gradients agree too


@pytest.mark.slow
def test_padded_attention_equals_unpadded(sd3_folder, rel_err):
    """Padding the joint sequence for cuDNN (masked keys, dropped query rows) leaves outputs and gradients unchanged."""
    import jax
    from flax import nnx

    from contentv_jax.ops import Attention

    folder, _ = sd3_folder
    inputs = _inputs(named_model_config("tiny"), frames=2, seed=4, batch=1, height=6, width=6)  # 18 + 5 = 23 tokens
    models = [
        contentv_jax.load_transformer(folder, pos_embed="sincos_3d", attention=Attention("xla", pad_multiple=m))
        for m in (None, 16)
    ]
    outs = [np.asarray(m(*inputs)) for m in models]
    grads = [nnx.grad(lambda m: jax.numpy.mean(m(*inputs) ** 2))(m).blocks.attn.to_q.kernel[...][0] for m in models]
    assert rel_err(outs[1], outs[0]) < 1e-6
    assert rel_err(grads[1], grads[0]) < 1e-5
