"""A recipe's `eval.prompts` inside training: every `eval.interval` steps each prompt is sampled on the training mesh,
decoded, scored (flicker, caption accuracy, and CLIP's metrics on a tiny random CLIP) and logged (metrics.jsonl,
TensorBoard, a lossless PNG of the very frames scored), the same in both backends."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contentv_common.backend import get
from contentv_common.checkpoint.formats import write_torch
from contentv_common.config.recipe import load_recipe
from contentv_common.data.cache import EVAL_PROMPTS, eval_prompts_current, read_eval_prompts
from contentv_common.data.prepare import prepare_data
from contentv_common.data.synthetic import make_synthetic_set
from contentv_common.errors import DataError
from contentv_common.tiny_models import random_weights
from contentv_common.training.demo import DEMO_PROMPTS
from contentv_common.training.evaluation import eval_scorers, score_clips
from tests.parity.test_reward_clip import save_tiny_clip

TINY = Path(__file__).resolve().parents[2] / "tests" / "recipes" / "tiny.yaml"
PROMPTS = list(DEMO_PROMPTS[:2])
FRAMES, SIZE, GAP = 5, 32, 2  # the first video bucket's clips; frame_strip's gap between rows


def _recipe(root: Path, name: str):
    bucket = {"width": SIZE, "height": SIZE, "frames": FRAMES, "batch_size": 2}
    data = {"manifest": str(root / "set" / "manifest.jsonl"), "cache_dir": str(root / "cache"), "encoders": "demo",
            "buckets": [bucket], "num_threads": 0}  # fmt: skip
    overrides = {"data": data, "steps": 1, "init_from": str(root / "transformer"), "log_dir": str(root / name / "logs")}
    overrides |= {"checkpoint": {"dir": str(root / name / "ckpt"), "interval": 1}, "compute_dtype": "float32"}
    # warm-up from 0: the first update's rate is 0, so both backends sample the very weights of `init_from`
    overrides |= {"optimizer.warmup_steps": 2}
    overrides |= {
        "eval": {"interval": 1, "samples": 1, "timesteps": [500], "prompts": PROMPTS, "clip": str(root / "clip")}
    }
    return load_recipe(TINY, overrides)


def _logged(root: Path, name: str) -> tuple[dict, np.ndarray]:
    """The run's `eval_samples` line and the clips of its PNG, uint8 [N, F, H, W, 3]."""
    lines = [json.loads(line) for line in (root / name / "logs" / "metrics.jsonl").read_text().splitlines()]
    (record,) = [line["eval_samples"] for line in lines if "eval_samples" in line]
    strip = np.asarray(Image.open(root / name / "logs" / "eval_samples" / f"step_{record['step']:07d}.png"))
    rows = [strip[i * (SIZE + GAP) : i * (SIZE + GAP) + SIZE] for i in range(len(PROMPTS))]
    assert strip.shape == (len(PROMPTS) * (SIZE + GAP) - GAP, FRAMES * SIZE, 3)
    return record, np.stack([row.reshape(SIZE, FRAMES, SIZE, 3).transpose(1, 0, 2, 3) for row in rows])


def _flat(scores: dict) -> dict[tuple[str, str], float]:
    """An `eval_samples` record's values by (prompt, metric); the means under ("mean", metric)."""
    out = {("mean", k): v for k, v in scores.items() if k not in ("step", "prompts")}
    return out | {(p, k): v for p, values in scores["prompts"].items() for k, v in values.items()}


@pytest.mark.slow
def test_both_backends_log_the_metrics_of_the_prompts_clips(tmp_path):
    from contentv_jax.train import run as run_jax
    from contentv_torch_npu.train import run as run_torch

    make_synthetic_set(tmp_path / "set", num_videos=3, sizes=((SIZE, SIZE),), frames=12, fps=8, progress=False)
    save_tiny_clip(tmp_path / "clip")
    recipe = _recipe(tmp_path, "jax")
    cfg = recipe.model_config
    write_torch(tmp_path / "transformer", cfg, iter(random_weights(get("jax").transformer_shapes(cfg), 1).items()))
    prepare_data(recipe, progress=False, backend=get("jax"))  # the cache and the prompts' embeddings, demo encoders
    run_jax(recipe, progress=False)
    with pytest.raises(DataError, match="eval.prompts: .* does not hold these prompts"):
        read_eval_prompts(tmp_path / "cache", PROMPTS[::-1])
    (tmp_path / "cache" / EVAL_PROMPTS).unlink()  # the torch run encodes them again, with its own demo encoders
    run_torch(_recipe(tmp_path, "torch"), device="cpu", progress=False)
    assert eval_prompts_current(tmp_path / "cache", PROMPTS)
    jax_record, jax_clips = _logged(tmp_path, "jax")
    torch_record, torch_clips = _logged(tmp_path, "torch")
    metrics = {"temporal_flickering", "caption_colour", "caption_direction", "clip_score", "clip_consistency"}
    assert jax_record["step"] == 1 and set(jax_record) == {"step", "prompts", *metrics}
    assert list(jax_record["prompts"]) == PROMPTS and all(set(v) == metrics for v in jax_record["prompts"].values())
    for record, clips, backend in ((jax_record, jax_clips, "jax"), (torch_record, torch_clips, "torch")):
        clip = get(backend).clip_embeddings(tmp_path / "clip")
        scored = _flat(score_clips(clips, PROMPTS, eval_scorers(PROMPTS, clip)))  # from the PNG's frames
        logged = _flat(record)
        assert logged.keys() == scored.keys()
        for key, value in logged.items():  # the CLIP model's own float noise aside, the very same numbers
            assert value == (pytest.approx(scored[key], rel=1e-6) if key[1].startswith("clip") else scored[key]), key
    assert jax_clips.std() > 1, "the clips show something: decoded, not blank"
    # The same weights, noise and embeddings: the samplers agree within 1e-5 and the VAEs closely, so a uint8 pixel
    # differs by at most one rounding step, rarely (measured: 1 pixel value of 31680). A pixel off by 1 moves
    # temporal flickering by at most 2 / (255 x 3 x H x W x (F - 1)) = 6.4e-7: 1e-5 allows 15 such pixels a clip.
    diff = np.abs(jax_clips.astype(int) - torch_clips)
    assert diff.max() <= 1 and diff.mean() < 1e-3, (diff.max(), diff.mean())
    jax_flat, torch_flat = _flat(jax_record), _flat(torch_record)
    # CLIP: the backends' embeddings agree within 1e-5 (tests/parity/test_eval_clip.py) and the one pixel off by 1
    # moves a frame's embedding: measured 3e-6 (clip_score), 3e-7 (clip_consistency); 1e-4 is well below the spread
    # between prompts (0.016 and 0.102 here)
    for key, value in jax_flat.items():
        assert abs(value - torch_flat[key]) < (1e-4 if key[1].startswith("clip") else 1e-5), (
            key,
            value,
            torch_flat[key],
        )
