"""The README's main job learns something a person can see: after `tools/train.py` on the tiny recipe, the clip for
each demo prompt shows the named colour moving the named way (measured on the decoded frames), beside strip.png and
loss.png. The whole demo runs here, every step of it, in a temporary folder (about 2 minutes of CPU), once per test
session (tests/e2e/conftest.py: the reward demo tests tune the same model).
"""

import json

import numpy as np
import pytest

from contentv_common.cli import train
from contentv_common.data.synthetic import render
from contentv_common.data.video_io import read_video
from contentv_common.demo import DEMO_VAE
from contentv_common.sampling import slug
from contentv_common.training.evaluation import demo_measure, shape_motion, shows_caption

pytestmark = pytest.mark.slow  # every test here trains, tunes or compiles for real

PROMPTS = train.DEMO_PROMPTS


def test_the_demo_vae_keeps_what_the_captions_say():
    """The shipped demo VAE's reconstructions still show each caption's colour and motion (a VAE that lost them would
    leave the transformer nothing to learn)."""
    import torch

    from contentv_torch_npu.vae import load_vae

    vae = load_vae(DEMO_VAE).float().eval()
    for i, (shape, colour, direction) in enumerate(
        [
            ("circle", "red", "right"),
            ("square", "blue", "down"),
            ("circle", "green", "left"),
            ("square", "yellow", "up"),
        ]
    ):
        clip = render(shape, colour, direction, 64, 64, 12, seed=100 + i)[:9]
        x = torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
        with torch.no_grad():
            y = vae.decode(vae.encode(x))
        assert float((y - x).square().mean()) < 0.02, "PSNR above 23 dB"
        frames = ((y[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
        assert shows_caption(frames, colour, direction), shape_motion(frames, colour, direction)


def test_the_measure_tells_right_from_wrong():
    clip = render("circle", "red", "right", 64, 64, 12, seed=1)[:9]
    assert shows_caption(clip, "red", "right")
    assert not shows_caption(clip, "blue", "right") and not shows_caption(clip, "red", "left")
    assert not shows_caption(clip, "red", "up"), "sideways motion is not upward motion"
    noise = np.random.default_rng(0).integers(0, 256, clip.shape, dtype=np.uint8)
    assert not shows_caption(noise, "red", "right"), "coloured noise shows nothing"


def test_demo_writes_samples_and_its_loss_falls(trained_demo):
    samples = trained_demo / "samples"
    assert sorted(p.name for p in samples.glob("*.mp4")) == [sample_name(i, p) for i, p in enumerate(PROMPTS)]
    assert (samples / "strip.png").stat().st_size > 0 and (samples / "loss.png").stat().st_size > 0
    losses = [json.loads(line)["loss"] for line in (trained_demo / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20]), "the loss falls"


def test_demo_samples_show_their_captions(trained_demo):
    measured = {
        p: demo_measure(read_video(trained_demo / "samples" / sample_name(i, p))[0], p) for i, p in enumerate(PROMPTS)
    }
    assert all(m["ok"] for m in measured.values()), measured


def sample_name(index: int, prompt: str) -> str:
    """The file tools/sample.py writes for its `index`-th prompt."""
    return f"{index:03d}-{slug(prompt)}.mp4"
