"""tools/sample end to end on tiny models: prompts -> mp4, and the JAX and torch backends give the same video."""

import numpy as np
import pytest

import contentv_jax.encoders as jax_encoders
import contentv_jax.sampling as jax_sampling
import contentv_torch_npu.encoders as torch_encoders
import contentv_torch_npu.sampling as torch_sampling
from contentv_common.backend import get
from contentv_common.cli import sample as sample_tool
from contentv_common.data.video_io import read_video
from contentv_common.sampling import draw_noise, latent_shape

ARGS = ["--tiny", "--prompt", "a cat walking", "--prompt", "a red dog", "--negative-prompt", "low quality"]
ARGS += ["--frames", "5", "--size", "32x48", "--steps", "3", "--guidance", "4", "--seed", "5", "--no-progress"]


@pytest.fixture(scope="module")
def encoders():
    """Each backend's own tiny encoders (the same weights, drawn in numpy)."""
    return {"jax": jax_encoders.tiny_encoders(seed=0), "torch": torch_encoders.tiny_encoders(seed=0)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return sample_tool.random_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.mark.slow
def test_backends_give_the_same_frames(encoders, checkpoint, rel_err, tmp_path):
    """Same weights, seed and prompt: each backend's own text encoders, transformer and Wan VAE; JAX and torch
    latents agree in fp32 and decode to the same uint8 frames (at most one level apart)."""
    noise = draw_noise(5, latent_shape(16, frames=5, height=32, width=48))
    frames, latents = {}, {}
    for backend, sample in (("jax", jax_sampling.sample), ("torch", torch_sampling.sample)):
        text, pooled = encoders[backend].encode_text(["a cat walking"])
        neg_text, neg_pooled = encoders[backend].encode_text(["low quality"])
        model = get(backend).load_transformer(checkpoint, "float32", "cpu")
        latents[backend] = sample(model, noise, text, pooled, neg_text, neg_pooled, 4, 4.0, 3.0, progress=False)
        frames[backend] = sample_tool.latent_decoder(encoders[backend], None, "cpu")(latents[backend])
    assert rel_err(latents["jax"], latents["torch"]) < 1e-5
    assert frames["jax"].shape == frames["torch"].shape == (1, 5, 32, 48, 3)
    assert frames["jax"].dtype == frames["torch"].dtype == np.uint8
    assert np.abs(frames["jax"].astype(int) - frames["torch"].astype(int)).max() <= 1
    assert frames["jax"].std() > 5, "decoded frames are not flat"


@pytest.mark.slow
def test_cli_writes_mp4_for_each_prompt_in_both_backends(tmp_path, checkpoint, monkeypatch):
    """Both backends write the same videos; the JAX one never touches the torch encoders."""
    videos = {}
    for backend, extra in (("torch", []), ("jax", ["--transformer", str(checkpoint), "--batch-size", "2"])):
        if backend == "jax":
            monkeypatch.setattr(torch_encoders.Encoders, "__init__", _torch_encoders_forbidden)
        paths = sample_tool.main([*ARGS, "--backend", backend, "--out", str(tmp_path / backend), *extra])
        assert [p.name for p in paths] == ["000-a-cat-walking.mp4", "001-a-red-dog.mp4"]
        videos[backend] = [read_video(p) for p in paths]
    for (torch_frames, fps), (jax_frames, _) in zip(videos["torch"], videos["jax"], strict=True):
        assert torch_frames.shape == jax_frames.shape == (5, 32, 48, 3) and fps == 24
        # the random tiny model (--model-seed 0, drawn in numpy) and the saved checkpoint are the same weights
        assert np.abs(torch_frames.astype(int) - jax_frames.astype(int)).mean() < 1.0
    assert np.abs(videos["jax"][0][0].astype(int) - videos["jax"][1][0].astype(int)).mean() > 1, "prompts differ"


def _torch_encoders_forbidden(self, *args, **kwargs):
    raise AssertionError("the JAX backend built the torch encoders")


def test_cli_rejects_bad_arguments(capsys):
    for argv, message in (
        (["--tiny"], "--prompt"),
        (["--prompt", "x"], "--pipeline"),
        ([*ARGS[:7], "--frames", "4"], "frames must be 1 + 4 k"),
        ([*ARGS[:7], "--size", "30x48"], "height must be a positive multiple of 16"),
        ([*ARGS[:7], "--size", "30by48"], "HEIGHTxWIDTH"),
        ([*ARGS[:7], "--attention", "cudnn"], "'cudnn' needs a GPU"),  # this CPU process
        ([*ARGS[:7], "--attention", "splash", "--backend", "torch"], "use it with --backend jax"),
    ):
        with pytest.raises(SystemExit):
            sample_tool.main(argv)
        assert message in capsys.readouterr().err
