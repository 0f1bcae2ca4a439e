"""tools/sample end to end on tiny models: prompts -> mp4, and the JAX and torch backends give the same video."""

import numpy as np
import pytest

import contentv_jax.encoders as jax_encoders
import contentv_jax.sampling as jax_sampling
import contentv_torch_npu.encoders as torch_encoders
import contentv_torch_npu.sampling as torch_sampling
from contentv_common.backend import get
from contentv_common.checkpoint.formats import write_torch
from contentv_common.cli import sample as sample_tool
from contentv_common.config.model import ModelConfig
from contentv_common.data.video_io import read_video
from contentv_common.sampling import draw_noise, latent_shape
from contentv_common.tiny_models import random_weights
from tests.narrow_model import NARROW

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


def _forbidden(*args, **kwargs):
    raise AssertionError("a model was loaded")


def test_a_mesh_the_devices_or_the_video_cannot_honour_is_one_line(monkeypatch, capsys, tmp_path):
    """8 fake devices, the tiny model (2 heads); the video is 2 latent frames x 2 x 3 patches (12 image tokens, at
    1 frame of 48x48: 9); the batch is 1 prompt."""
    import contentv_jax.backend as jax_backend

    for name in ("load_transformer", "encoders"):
        monkeypatch.setattr(jax_backend.JaxBackend, name, _forbidden)
    for argv, message in (
        (["--mesh", "data=2,sequence=2"], "data x sequence x cfg = 4 does not match the 8 devices"),
        (["--mesh", "data=4,sequence=2", "--batch-size", "4", "--frames", "1", "--size", "48x48"], "image tokens 9 do"),
        (["--mesh", "data=4,cfg=2", "--guidance", "1"], "cfg=2 splits the guidance pair"),
        (["--mesh", "data=8"], "--batch-size 1 does not split over data=8"),
        (["--mesh", "sequence=8"], "sequence=8 exceeds the model's 2 heads"),
        (["--mesh", "data=2,tensor=4"], "bad item 'tensor=4'"),
        (["--mesh", "cfg=4,data=2"], "cfg is 1 or 2"),
        (["--mesh", "data=2", "--backend", "torch"], "data x sequence x cfg = 2 does not match the 1 devices"),
        (["--seeds", "2", "--latents-out", str(tmp_path / "l.npz")], "a --seeds suite writes videos"),
    ):
        with pytest.raises(SystemExit) as stop:
            sample_tool.main([*ARGS[:5], *ARGS[7:], *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and message in err[-1], (argv, err)


def test_latents_out_on_a_mesh_equal_one_device(tmp_path, rel_err, monkeypatch):
    """The narrow model (38 heads; the tiny encoders give 333 text tokens) through the CLI: 3 prompts, 2 per forward
    over data=2 x sequence=2 x cfg=2 (the last forward padded to the data groups), the same final latents as one
    device, written by --latents-out."""
    cfg = ModelConfig(**{**NARROW, "joint_attention_dim": 48, "pooled_projection_dim": 24})
    weights = random_weights(get("jax").transformer_shapes(cfg), 3)
    narrow = write_torch(tmp_path / "narrow", cfg, iter(weights.items()))
    argv = [*ARGS, "--prompt", "a blue bird", "--transformer", str(narrow), "--batch-size", "2"]
    argv += ["--frames", "1", "--steps", "2"]
    shared = jax_encoders.tiny_encoders(seed=0)  # both runs: built once
    monkeypatch.setattr(sample_tool, "build_encoders", lambda backend, args: shared)
    out = {}
    for name, mesh in (("one", []), ("mesh", ["--mesh", "data=2,sequence=2,cfg=2"])):
        npz = tmp_path / f"{name}.npz"
        assert len(sample_tool.main([*argv, *mesh, "--out", str(tmp_path / name), "--latents-out", str(npz)])) == 3
        out[name] = np.load(npz)["latents"]
    assert out["one"].shape == (3, 16, 1, 4, 6) and np.isfinite(out["one"]).all()
    assert rel_err(out["mesh"], out["one"]) < 1e-5, rel_err(out["mesh"], out["one"])
