"""The evaluation's CLIP metrics on a tiny random CLIP: both backends' embeddings agree, clip_score is the reward
scorer's own score without its logit scale, a still clip is perfectly consistent, and tools/eval.py scores a folder
with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contentv_common.backend import get
from contentv_common.cli.eval import main
from contentv_common.data.video_io import write_video
from contentv_common.errors import ConfigError
from contentv_common.eval.clip import clip_consistency, clip_score
from tests.parity.test_reward_clip import save_tiny_clip

PROMPT = "a red cat"


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip")
    save_tiny_clip(folder)
    return folder


def _clip_video(seed: int, frames: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, 40, 56, 3), dtype=np.uint8)


def test_clip_metrics_in_both_backends(clip_folder, rel_err):
    from contentv_torch_npu.reward.clip import load_clip_reward

    jax_clip = get("jax").clip_embeddings(clip_folder)
    torch_clip = get("torch").clip_embeddings(clip_folder, "cpu")
    video = _clip_video(0)
    assert rel_err(jax_clip.image_embeddings(video), torch_clip.image_embeddings(video)) < 1e-5
    assert rel_err(jax_clip.text_embeddings([PROMPT]), torch_clip.text_embeddings([PROMPT])) < 1e-5

    reward = load_clip_reward(clip_folder)
    with torch.no_grad():
        scores = reward(torch.from_numpy(video).float() / 255.0, [PROMPT] * len(video))
        cosines = (scores / reward.scorer.logit_scale.exp()).numpy()
    assert cosines.std() > 1e-4, "frames score differently: the mean below can fail"
    for clip in (jax_clip, torch_clip):
        assert clip_score(clip, video, PROMPT) == pytest.approx(float(cosines.mean()), rel=1e-5)

    still = np.repeat(video[:1], 4, axis=0)
    assert clip_consistency(torch_clip, still) == pytest.approx(1.0, abs=1e-6)
    emb = torch_clip.image_embeddings(video).astype(np.float64)
    expected = np.mean([emb[i] @ emb[i + 1] for i in range(len(video) - 1)])
    assert clip_consistency(torch_clip, video) == pytest.approx(expected, rel=1e-6) and expected < 0.999


def test_eval_cli_clip_dimensions(clip_folder, tmp_path):
    write_video(tmp_path / f"{PROMPT}-0.mp4", np.repeat(_clip_video(1, 1), 4, axis=0), fps=8)
    write_video(tmp_path / f"{PROMPT}-1.mp4", _clip_video(2, 4), fps=8)
    args = [str(tmp_path), "--dimensions", "clip_score,clip_consistency", "--json", str(tmp_path / "e.json")]
    with pytest.raises(ConfigError, match="--clip DIR"):
        main(args)
    result = main([*args, "--clip", str(clip_folder), "--backend", "torch", "--device", "cpu", "--no-progress"])
    consistency = result["dimensions"]["clip_consistency"]["per_video"]
    assert consistency[f"{PROMPT}-0.mp4"] == pytest.approx(1.0, abs=1e-4), "a still clip (after H.264)"
    assert consistency[f"{PROMPT}-1.mp4"] < consistency[f"{PROMPT}-0.mp4"] - 1e-3
    assert -1.0 <= result["dimensions"]["clip_score"]["score"] <= 1.0
