"""The JAX sampling path decodes with the JAX Wan VAE (the torch one's weights), compiled once per latent shape."""

from types import SimpleNamespace

import jax
import numpy as np
import pytest

from contentv_common.config import named_model_config
from contentv_common.video_io import read_video
from contentv_torch_npu.encoders import Encoders, SD3ImageVAE, tiny_encoders
from tools import sample as sample_tool

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
ARGS = ["--prompt", "a cat walking", "--frames", "5", "--size", "32x48", "--steps", "2", "--guidance", "1"]


@pytest.fixture(scope="module")
def encoders():
    return tiny_encoders(seed=2)


@pytest.fixture
def compiles():
    """The XLA compilations done while the test runs."""
    events = []

    def listen(event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    yield events
    jax.monitoring.unregister_event_duration_listener(listen)


def _forbid_torch_decode(monkeypatch):
    def decode(self, latents):
        raise AssertionError("the JAX backend decoded with the torch VAE")

    monkeypatch.setattr(Encoders, "decode_latents", decode)


def test_jax_decode_matches_torch_and_compiles_once_per_shape(encoders, tmp_path, compiles):
    decode = sample_tool.latent_decoder("jax", encoders, None, tmp_path)
    assert (tmp_path / "vae" / "config.json").exists(), "the tiny encoders' VAE is handed over through a folder"
    rng = np.random.default_rng(0)
    for shape in ((2, 16, 2, 4, 6), (1, 16, 3, 4, 6)):
        latents = rng.standard_normal(shape, dtype=np.float32)
        frames = decode(latents)
        want = encoders.decode_latents(latents)
        assert frames.shape == want.shape == (shape[0], 1 + 4 * (shape[2] - 1), 32, 48, 3)
        assert frames.dtype == np.uint8
        assert np.abs(frames.astype(int) - want.astype(int)).max() <= 1
        assert frames.std() > 5, "decoded frames are not flat"
    compiles.clear()
    again = decode(rng.standard_normal((3, 16, 2, 4, 6), dtype=np.float32))
    assert again.shape == (3, 5, 32, 48, 3)
    assert compiles == [], "a known latent shape (any batch size) must not compile again"
    with pytest.raises(ValueError, match=r"latents must be \[B, 16, f, h, w\]"):
        decode(np.zeros((1, 8, 2, 4, 6), np.float32))


def test_cli_from_a_pipeline_folder_decodes_with_the_jax_vae(encoders, tmp_path, monkeypatch):
    """`--pipeline` (ContentV layout, Wan VAE): the JAX backend loads PIPELINE/vae itself and matches torch."""
    pipe = encoders.save(tmp_path / "pipe")
    sample_tool.random_tiny_checkpoint(pipe, seed=1)
    videos = {}
    for backend in ("torch", "jax"):
        if backend == "jax":
            _forbid_torch_decode(monkeypatch)
        argv = [*ARGS, "--pipeline", str(pipe), "--backend", backend, "--out", str(tmp_path / backend)]
        (path,) = sample_tool.main([*argv, "--no-progress"])
        videos[backend], _ = read_video(path)
    assert videos["jax"].shape == videos["torch"].shape == (5, 32, 48, 3)
    assert np.abs(videos["jax"].astype(int) - videos["torch"].astype(int)).mean() < 1.0  # mp4 is lossy


def test_image_pipelines_decode_in_torch(tmp_path):
    """SD3's 2D image VAE has no JAX twin: the JAX backend falls back to the torch decoder and writes nothing."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(8,), latent_channels=named_model_config("tiny").in_channels, norm_num_groups=4
    )
    encoders = SimpleNamespace(vae=SD3ImageVAE(vae), decode_latents=object())
    assert sample_tool.latent_decoder("jax", encoders, None, tmp_path) is encoders.decode_latents
    assert list(tmp_path.iterdir()) == []
