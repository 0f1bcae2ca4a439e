"""The evaluation package: VBench's composition against its published constants, its temporal flickering against a
straightforward computation of its definition, the synthetic set's caption accuracy on hand-made clips, and the
in-loop scores of a recipe's `eval.prompts`."""

import numpy as np
import pytest

from contentv_common.data.synthetic import render
from contentv_common.eval.caption import caption_colour, caption_direction
from contentv_common.eval.composition import composite
from contentv_common.eval.flicker import temporal_flickering
from contentv_common.eval.videos import benchmark

# Raw scores built from VBench's published (min, max) so that each normalises to the number after the comma.
RAW = {
    "subject_consistency": 0.1462 + (1.0 - 0.1462) * 0.9,
    "background_consistency": 0.2615 + (1.0 - 0.2615) * 0.8,
    "temporal_flickering": 0.6293 + (1.0 - 0.6293) * 0.95,
    "motion_smoothness": 0.706 + (0.9975 - 0.706) * 0.9,
    "aesthetic_quality": 0.6,
    "imaging_quality": 0.7,
    "dynamic_degree": 0.4,  # weight 0.5
    "object_class": 0.9,
    "multiple_objects": 0.5,
    "human_action": 0.8,
    "color": 0.85,
    "spatial_relationship": 0.6,
    "scene": 0.8222 * 0.5,
    "appearance_style": 0.0009 + (0.2855 - 0.0009) * 0.5,
    "temporal_style": 0.364 * 0.75,
    "overall_consistency": 0.364 * 0.75,
}
# By hand: Quality = (0.9 + 0.8 + 0.95 + 0.9 + 0.6 + 0.7 + 0.5 * 0.4) / 6.5 = 5.05 / 6.5 = 101 / 130;
# Semantic = (0.9 + 0.5 + 0.8 + 0.85 + 0.6 + 0.5 + 0.5 + 0.75 + 0.75) / 9 = 6.15 / 9 = 41 / 60;
# Total = (4 * 101 / 130 + 41 / 60) / 5 = (2424 + 533) / 780 / 5 = 2957 / 3900.
QUALITY, SEMANTIC, TOTAL = 101 / 130, 41 / 60, 2957 / 3900


def test_composition_matches_vbench_constants():
    c = composite(RAW)
    assert c.quality == pytest.approx(QUALITY, rel=1e-12)
    assert c.semantic == pytest.approx(SEMANTIC, rel=1e-12)
    assert c.total == pytest.approx(TOTAL, rel=1e-12)
    assert c.missing == {"quality": [], "semantic": []}


def test_composition_names_what_is_missing():
    partial = {k: v for k, v in RAW.items() if k not in ("dynamic_degree", "scene")} | {"caption_colour": 1.0}
    c = composite(partial)
    assert (c.quality, c.semantic, c.total) == (None, None, None)
    assert c.missing == {"quality": ["dynamic_degree"], "semantic": ["scene"]}
    only_quality = composite({k: RAW[k] for k in list(RAW)[:7]})
    assert only_quality.quality == pytest.approx(QUALITY, rel=1e-12) and only_quality.total is None


def _reference_flicker(video: np.ndarray) -> float:
    """VBench's definition written out: mean |frame[t+1] - frame[t]| per pair, averaged over pairs, on a 0-255 scale."""
    per_pair = np.abs(np.diff(video.astype(np.float64), axis=0)).mean(axis=(1, 2, 3))
    return (255.0 - per_pair.mean()) / 255.0


def test_temporal_flickering_static_is_max_and_flicker_is_lower():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (1, 16, 24, 3), dtype=np.uint8)
    static = np.repeat(frame, 6, axis=0)
    assert temporal_flickering(static) == 1.0
    flicker = static.copy()
    flicker[1::2] = np.clip(flicker[1::2].astype(np.int16) + 60, 0, 255).astype(np.uint8)  # every other frame brighter
    score = temporal_flickering(flicker)
    assert score < 0.85
    assert score == pytest.approx(_reference_flicker(flicker), rel=1e-12)
    noise = rng.integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
    assert temporal_flickering(noise) == pytest.approx(_reference_flicker(noise), rel=1e-12)
    with pytest.raises(ValueError, match="F >= 2"):
        temporal_flickering(static[:1])


def test_caption_accuracy_on_hand_made_clips():
    right = render("circle", "red", "right", 64, 64, 9, seed=1)
    assert caption_colour(right, "a red circle moving right") == 1.0
    assert caption_direction(right, "a red circle moving right") == 1.0
    assert caption_direction(right, "a red circle moving left") == 0.0, "moving the wrong way"
    assert caption_direction(right, "a red circle moving up") == 0.0, "sideways is not up"
    assert caption_colour(right, "a blue circle moving right") == 0.0, "the wrong colour"
    down = render("square", "yellow", "down", 64, 64, 9, seed=2)
    assert caption_direction(down, "a yellow square moving down") == 1.0
    with pytest.raises(ValueError, match="not a synthetic-set caption"):
        caption_colour(right, "a cat on a sofa")


def test_benchmark_follows_vbench_five_second_rule():
    assert benchmark([2.0, 4.99]).startswith("VBench (")
    assert benchmark([5.0, 5.2]).startswith("VBench-Long")
    assert benchmark([4.0, 5.0]).startswith("mixed: 1 of 2")


def test_the_in_loop_scores_of_eval_prompts():
    from contentv_common.training.evaluation import EvalPrompts, eval_scorers, score_clips

    prompts = ["a red circle moving right", "a yellow square moving left"]  # the second clip moves down
    clips = np.stack(
        [render("circle", "red", "right", 64, 64, 9, seed=1), render("square", "yellow", "down", 64, 64, 9, seed=2)]
    )
    scorers = eval_scorers(prompts, None)
    assert list(scorers) == ["temporal_flickering", "caption_colour", "caption_direction"]
    assert list(eval_scorers(["a red circle moving right", "a cat on a sofa"], None)) == ["temporal_flickering"]
    scores = score_clips(clips, prompts, scorers)
    second = {"temporal_flickering": temporal_flickering(clips[1]), "caption_colour": 1.0, "caption_direction": 0.0}
    assert scores["prompts"][prompts[1]] == second
    assert scores["caption_colour"] == 1.0 and scores["caption_direction"] == 0.5
    assert scores["temporal_flickering"] == pytest.approx(np.mean([temporal_flickering(c) for c in clips]), abs=1e-15)
    rng = np.random.default_rng(0)
    ready = EvalPrompts(tuple(prompts[:1] + ["x", "y"]), rng.standard_normal((3, 4)), rng.standard_normal((3, 5, 2)),
                        rng.standard_normal((3, 2)), np.zeros((5, 2)), np.zeros(2))  # fmt: skip
    rows = ready.inputs(shards=4)  # 3 prompts padded to the 4 data shards with prompt 0's row
    np.testing.assert_array_equal(rows["noise"], ready.noise[[0, 1, 2, 0]])
    np.testing.assert_array_equal(rows["text"], ready.text[[0, 1, 2, 0]])
    assert rows["neg_text"].shape == (4, 5, 2) and ready.inputs(shards=1)["pooled"].shape == (3, 2)
