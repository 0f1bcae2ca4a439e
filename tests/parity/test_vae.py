"""Wan2.1 VAE: both backends against diffusers' AutoencoderKLWan (tiny random weights, fp32), and against each other.

One tiny diffusers VAE (Wan2.1 strides: 4x time, 8x space, 16 latent channels; random RMS gammas) is saved with
`save_pretrained` (sharded) and loaded by our two backends through the parameter table.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from safetensors.numpy import load_file, save_file

from contentv_common.errors import CheckpointError, ConfigError
from contentv_common.vae.chunks import Tiling
from contentv_common.vae.config import VAEConfig, config_to_diffusers, tiny_vae_config
from contentv_common.vae.table import vae_table
from contentv_jax import vae as jvae
from contentv_torch_npu import vae as tvae

pytestmark = pytest.mark.slow  # every test here trains, tunes or compiles for real

TILING = Tiling(tile_height=24, tile_width=24, stride_height=16, stride_width=16)  # 32x32 -> 2x2 overlapping tiles


def diffusers_vae(cfg: VAEConfig, seed: int) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    kwargs = config_to_diffusers(cfg)
    vae = AutoencoderKLWan(**{k: v for k, v in kwargs.items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return vae


@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "vae"
    diffusers_vae(tiny_vae_config(), seed=0).save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists()  # loaders read the sharded layout
    return folder


@pytest.fixture(scope="module")
def reference(ref_folder):
    """diffusers' results on a 9-frame 32x32 video: posterior mean/std, decode, tiled decode."""
    ref = AutoencoderKLWan.from_pretrained(ref_folder).eval()
    gen = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, 9, 32, 32, generator=gen) * 2 - 1
    noise = torch.randn(1, 16, 3, 4, 4, generator=gen)
    with torch.no_grad():
        posterior = ref.encode(video).latent_dist
        decoded = ref.decode(posterior.mean).sample
        ref.enable_tiling(TILING.tile_height, TILING.tile_width, TILING.stride_height, TILING.stride_width)
        tiled = ref.decode(posterior.mean).sample
    out = dict(video=video, noise=noise, mean=posterior.mean, sample=posterior.mean + posterior.std * noise)
    return {k: v.numpy() for k, v in out.items()} | dict(decoded=decoded.numpy(), tiled=tiled.numpy())


@pytest.fixture(scope="module")
def torch_results(ref_folder, reference):
    vae = tvae.load_vae(ref_folder)
    r = reference
    with torch.no_grad():
        mean = vae.encode(torch.from_numpy(r["video"]))
        return dict(
            mean=mean.numpy(),
            sample=vae.encode(torch.from_numpy(r["video"]), torch.from_numpy(r["noise"])).numpy(),
            decoded=vae.decode(torch.from_numpy(r["mean"])).numpy(),
            first=vae.decode(torch.from_numpy(r["mean"][:, :, :1])).numpy(),
            tiled=vae.decode(torch.from_numpy(r["mean"]), TILING).numpy(),
        )


@pytest.fixture(scope="module")
def jax_results(ref_folder, reference):
    vae = jvae.load_vae(ref_folder)
    r = reference
    return dict(
        mean=np.asarray(vae.encode(r["video"])),
        sample=np.asarray(vae.encode(r["video"], r["noise"])),
        decoded=np.asarray(vae.decode(r["mean"])),
        first=np.asarray(vae.decode(r["mean"][:, :, :1])),
        tiled=np.asarray(vae.decode(r["mean"][:, :, :1], TILING)),  # frame 0 only: 4 tile shapes, 4 compilations
    )


@pytest.mark.parametrize("backend", ["torch", "jax"])
@pytest.mark.parametrize("what", ["mean", "sample", "decoded", "tiled"])
def test_matches_diffusers(backend, what, reference, torch_results, jax_results, rel_err):
    ours = (torch_results if backend == "torch" else jax_results)[what]
    expected = reference[what][:, :, : ours.shape[2]]  # causal: the first frames of a decode do not see later ones
    assert ours.shape == expected.shape
    assert np.abs(expected).max() > 0.05  # a meaningful signal, not clamped or vanished
    assert rel_err(ours, expected) < 1e-5


@pytest.mark.parametrize("what", ["mean", "sample", "decoded", "tiled"])
def test_jax_matches_torch(what, torch_results, jax_results, rel_err):
    frames = jax_results[what].shape[2]
    assert rel_err(jax_results[what], torch_results[what][:, :, :frames]) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_first_latent_frame_decodes_to_first_frame(backend, torch_results, jax_results):
    res = torch_results if backend == "torch" else jax_results
    assert res["first"].shape == (1, 3, 1, 32, 32) and res["decoded"].shape == (1, 3, 9, 32, 32)
    np.testing.assert_allclose(res["first"], res["decoded"][:, :, :1], rtol=0, atol=1e-6)


def test_tiling_changes_the_result(reference):
    """Guards the tiled parity tests: with random weights the tiles really differ from the untiled decode."""
    assert np.abs(reference["tiled"] - reference["decoded"]).max() > 1e-2


def test_tiled_equals_untiled_for_a_pointwise_decoder(ref_folder):
    """With spatial kernels cut to their centre tap and attention outputs zeroed, every output pixel depends only on
    its own latent pixel, so tile placement, blending weights and crops must reproduce the untiled decode."""
    vae = tvae.load_vae(ref_folder)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "attentions" in name and ".proj." in name:
                p.zero_()
            elif name.endswith("weight") and p.dim() >= 4 and p.shape[-1] == 3:
                centre = p[..., 1:2, 1:2].clone()
                p.zero_()
                p[..., 1:2, 1:2] = centre
        z = torch.randn(1, 16, 1, 4, 5, generator=torch.Generator().manual_seed(3))
        whole = vae.decode(z)
        tiled = vae.decode(z, Tiling(tile_height=24, tile_width=24, stride_height=16, stride_width=16))
    assert whole.shape == tiled.shape == (1, 3, 1, 32, 40)
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-6)


def test_latent_normalisation_round_trip():
    from flax import nnx

    cfg = tiny_vae_config()  # normalisation reads only the config: an abstract (shape-only) JAX model is enough
    z = np.random.default_rng(0).normal(size=(2, 16, 3, 2, 2)).astype(np.float32)
    mean = np.asarray(cfg.latents_mean, np.float32).reshape(1, -1, 1, 1, 1)
    std = np.asarray(cfg.latents_std, np.float32).reshape(1, -1, 1, 1, 1)
    jax_vae = nnx.eval_shape(lambda: jvae.WanVAE(cfg, rngs=nnx.Rngs(0)))
    torch_vae = tvae.WanVAE(cfg)
    for normalized in (np.asarray(jax_vae.normalize(jnp.asarray(z))), torch_vae.normalize(torch.from_numpy(z)).numpy()):
        np.testing.assert_allclose(normalized, (z - mean) / std, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax_vae.denormalize(jax_vae.normalize(jnp.asarray(z)))), z, atol=1e-5)
    np.testing.assert_allclose(torch_vae.denormalize(torch_vae.normalize(torch.from_numpy(z))).numpy(), z, atol=1e-5)


def test_wan21_layout_matches_diffusers():
    """The full-size Wan2.1 VAE (diffusers defaults): every diffusers key and shape maps onto our torch twin."""
    with torch.device("meta"):
        ref = AutoencoderKLWan()
        ours = tvae.WanVAE(VAEConfig())
    table = vae_table(VAEConfig())
    mapped = {table.from_diffusers(k).canonical: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(mapped) == len(ref.state_dict())  # no two diffusers keys share a canonical name
    assert mapped == {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_saved_vae_loads_in_diffusers_and_jax(tmp_path, rel_err):
    cfg = tiny_vae_config()
    torch.manual_seed(5)
    ours = tvae.WanVAE(cfg)
    tvae.save_vae(tmp_path / "vae", ours)
    ref = AutoencoderKLWan.from_pretrained(tmp_path / "vae")
    ref_state = ref.state_dict()
    table = vae_table(cfg)
    for key, value in ref_state.items():
        torch.testing.assert_close(value, ours.state_dict()[table.from_diffusers(key).canonical], rtol=0, atol=0)
    jax_vae = jvae.load_vae(tmp_path / "vae")
    jvae.save_vae(tmp_path / "from_jax", jax_vae)
    again = tvae.load_vae(tmp_path / "from_jax")
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value, rtol=0, atol=0)


def test_bf16_load_casts_parameters(ref_folder):
    vae = tvae.load_vae(ref_folder, dtype=torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = vae.decode(torch.zeros(1, 16, 1, 1, 1))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 1, 8, 8)


def _single_file(ref_folder, tmp_path, edit) -> str:
    """A copy of the reference VAE as one safetensors file, changed by `edit(tensors)`."""
    tensors = {}
    for file in sorted(ref_folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    edit(tensors)
    folder = tmp_path / "bad"
    folder.mkdir()
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text((ref_folder / "config.json").read_text())
    return folder


@pytest.mark.parametrize("load", [tvae.load_vae, jvae.load_vae], ids=["torch", "jax"])
def test_missing_key_is_named(load, ref_folder, tmp_path):
    folder = _single_file(ref_folder, tmp_path, lambda t: t.pop("decoder.up_blocks.1.upsamplers.0.time_conv.weight"))
    with pytest.raises(
        CheckpointError, match=r"missing key 'decoder\.up_blocks\.1\.upsampler\.time_conv\.weight'"
    ) as e:
        load(folder)
    assert "decoder.up_blocks.1.upsamplers.0.time_conv.weight" in str(e.value) and "(64, 32, 3, 1, 1)" in str(e.value)


@pytest.mark.parametrize("load", [tvae.load_vae, jvae.load_vae], ids=["torch", "jax"])
def test_wrong_shape_is_named_with_both_shapes(load, ref_folder, tmp_path):
    def edit(t):
        t["encoder.conv_in.weight"] = np.zeros((8, 3, 3, 3, 1), np.float32)

    with pytest.raises(CheckpointError, match=r"wrong shape for key 'encoder\.conv_in\.weight'") as e:
        load(_single_file(ref_folder, tmp_path, edit))
    assert "(8, 3, 3, 3, 1)" in str(e.value) and "(8, 3, 3, 3, 3)" in str(e.value)


def test_unexpected_key_is_named(ref_folder, tmp_path):
    def edit(t):
        t["decoder.extra.weight"] = np.zeros(2, np.float32)

    with pytest.raises(CheckpointError, match=r"unexpected key 'decoder\.extra\.weight'"):
        tvae.load_vae(_single_file(ref_folder, tmp_path, edit))


def test_bad_config_key_is_named(ref_folder, tmp_path):
    folder = _single_file(ref_folder, tmp_path, lambda t: None)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | {"is_residual": True}))
    with pytest.raises(ConfigError, match=r"config\.json: is_residual"):
        jvae.load_vae(folder)


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_bad_inputs_raise(backend, ref_folder):
    vae, arr = (
        (tvae.load_vae(ref_folder), torch.zeros) if backend == "torch" else (jvae.load_vae(ref_folder), jnp.zeros)
    )
    with pytest.raises(ValueError, match="W=12 is not divisible"):
        vae.encode(arr((1, 3, 1, 16, 12)))
    with pytest.raises(ValueError, match=r"latents must be \[B, 16"):
        vae.decode(arr((1, 4, 1, 2, 2)))
    with pytest.raises(ValueError, match="noise shape"):
        vae.encode(arr((1, 3, 1, 8, 8)), arr((1, 16, 2, 1, 1)))


def test_jax_decode_is_differentiable(ref_folder):
    """Reward fine-tuning backpropagates through the decode of latent frame 0."""
    vae = jvae.load_vae(ref_folder)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(1, 16, 1, 1, 1)), jnp.float32)
    grad = jax.grad(lambda z: jnp.sum(vae.decode(z) ** 2))(z)
    assert grad.shape == z.shape and bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).sum()) > 0
