"""The JAX sampling path uses the JAX encoders: the tiny ones equal the torch twin's, the Wan VAE decodes compiled once
per latent shape, a pipeline folder samples without the torch encoders, and SD3's 2D image VAE decodes in torch."""

import json
import re
from types import SimpleNamespace

import jax
import numpy as np
import pytest

import contentv_jax.encoders as jax_encoders
import contentv_torch_npu.encoders as torch_encoders
from contentv_common.cli import sample as sample_tool
from contentv_common.config.model import named_model_config
from contentv_common.data.video_io import read_video
from contentv_common.demo import demo_text
from contentv_common.errors import CheckpointError

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
ARGS = ["--prompt", "a cat walking", "--frames", "5", "--size", "32x48", "--steps", "2", "--guidance", "1"]


@pytest.fixture(scope="module")
def encoders():
    return jax_encoders.tiny_encoders(seed=2)


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


@pytest.mark.slow
def test_jax_decode_matches_torch_and_compiles_once_per_shape(encoders, compiles):
    """The tiny JAX encoders' VAE is the torch twin's (weights drawn in numpy): the same frames, one level apart."""
    decode = sample_tool.latent_decoder(encoders, None, "cpu")
    reference = torch_encoders.tiny_encoders(seed=2)
    rng = np.random.default_rng(0)
    for shape in ((2, 16, 2, 4, 6), (1, 16, 3, 4, 6)):
        latents = rng.standard_normal(shape, dtype=np.float32)
        frames = decode(latents)
        want = reference.decode_latents(latents)
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


def test_cli_from_a_pipeline_folder_runs_without_the_torch_encoders(encoders, tmp_path, monkeypatch):
    """`--pipeline` (ContentV layout, written by the JAX encoders): the JAX backend reads text encoders and Wan VAE
    from the folder in JAX and gives torch's video."""
    pipe = encoders.save(tmp_path / "pipe")
    sample_tool.random_tiny_checkpoint(pipe, seed=1)
    videos = {}
    for backend in ("torch", "jax"):
        if backend == "jax":
            monkeypatch.setattr(torch_encoders, "load_encoders", _forbidden)
        argv = [*ARGS, "--pipeline", str(pipe), "--backend", backend, "--out", str(tmp_path / backend)]
        (path,) = sample_tool.main([*argv, "--no-progress"])
        videos[backend], _ = read_video(path)
    assert videos["jax"].shape == videos["torch"].shape == (5, 32, 48, 3)
    assert np.abs(videos["jax"].astype(int) - videos["torch"].astype(int)).mean() < 1.0  # mp4 is lossy


def test_bad_pipelines_stop_before_any_model_loads(encoders, tmp_path):
    """A pipeline without tokenizer_3/, or whose T5 is not the transformer's text width, is one error naming the
    folder and key (run_cli: exit status 2), in sampling and in training's data preparation."""
    from contentv_common.cli import train
    from contentv_common.errors import ConfigError

    pipe = encoders.save(tmp_path / "pipe")
    sample_tool.random_tiny_checkpoint(pipe, seed=1)
    config = pipe / "text_encoder_3" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "d_model": 64}))
    argv = [*ARGS, "--pipeline", str(pipe), "--out", str(tmp_path / "out"), "--no-progress"]
    message = f"{config}: d_model 64 is not the transformer's text width (joint_attention_dim 48)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        sample_tool.main(argv)
    with pytest.raises(ConfigError, match=re.escape(message)):
        train.check_encoder_widths(str(pipe), named_model_config("tiny"))
    for file in (pipe / "tokenizer_3").iterdir():
        file.unlink()
    (pipe / "tokenizer_3").rmdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"{pipe / 'tokenizer_3'}: missing")):
        sample_tool.main(argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_demo_encoders_equal_the_torch_twins(encoders, rel_err):
    """The JAX demo and tiny encoders give the torch twins' latents and text embeddings."""
    video = np.random.default_rng(1).integers(0, 256, (1, 5, 32, 48, 3), dtype=np.uint8)
    captions = ["a red circle moving right", ""]
    pairs = (
        (encoders, torch_encoders.tiny_encoders(seed=2)),
        (jax_encoders.demo_encoders(), torch_encoders.demo_encoders()),
    )
    for ours, twin in pairs:
        assert rel_err(ours.encode_video(video), twin.encode_video(video)) < 1e-5
        for got, want in zip(ours.encode_text(captions), twin.encode_text(captions), strict=True):
            assert rel_err(got, want) < 1e-5


def _forbidden(*args, **kwargs):
    raise AssertionError("the JAX backend loaded the torch encoders")


def test_image_pipelines_decode_in_torch(tmp_path):
    """SD3's 2D image VAE has no JAX twin: the JAX encoders hold no VAE (and say so), decoding goes to torch's."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=(8,), latent_channels=named_model_config("tiny").in_channels, norm_num_groups=4
    )
    vae.save_pretrained(tmp_path / "vae")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["_class_name"] == "AutoencoderKL"
    decode = sample_tool.latent_decoder(SimpleNamespace(vae=None), tmp_path, "cpu")
    frames = decode(np.zeros((1, 16, 1, 2, 3), np.float32))
    assert frames.shape == (1, 1, 2, 3, 3) and frames.dtype == np.uint8  # one block: no upsampling
    held = jax_encoders.Encoders(demo_text(), None, vae_folder=tmp_path / "vae", latent_channels=16)
    with pytest.raises(CheckpointError, match=r"AutoencoderKL\) has no JAX twin"):
        held.decode_latents(np.zeros((1, 16, 1, 2, 3), np.float32))
