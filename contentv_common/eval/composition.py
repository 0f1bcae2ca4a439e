"""VBench's Quality, Semantic and Total scores from its 16 per-dimension scores, as VBench's leaderboard computes them.

Each dimension's raw score (its mean over the videos) is min-max normalised with fixed per-dimension constants (not
clipped: a raw score above the maximum normalises above 1), multiplied by the dimension's weight (dynamic degree counts
half, the others fully), and each group is the weighted mean of its dimensions; Total = (4 x Quality + Semantic) / 5.
The published leaderboard figures (ContentV's 85.14) are these numbers in percent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

# VBench's dimension names (its `--dimension` values): (min, max) of the normalisation.
NORMALISATION: dict[str, tuple[float, float]] = {
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
    "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0),
    "human_action": (0.0, 1.0),
    "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0),
    "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364),
    "overall_consistency": (0.0, 0.364),
}
WEIGHTS: dict[str, float] = {name: 0.5 if name == "dynamic_degree" else 1.0 for name in NORMALISATION}
QUALITY = (
    "subject_consistency",
    "background_consistency",
    "temporal_flickering",
    "motion_smoothness",
    "aesthetic_quality",
    "imaging_quality",
    "dynamic_degree",
)
SEMANTIC = (
    "object_class",
    "multiple_objects",
    "human_action",
    "color",
    "spatial_relationship",
    "scene",
    "appearance_style",
    "temporal_style",
    "overall_consistency",
)
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0


def normalised(dimension: str, score: float) -> float:
    """A dimension's raw score on VBench's normalised scale (before its weight)."""
    low, high = NORMALISATION[dimension]
    return (score - low) / (high - low)


def group_score(scores: Mapping[str, float], group: tuple[str, ...]) -> float:
    """The weighted mean of a group's normalised scores; every dimension of the group must be in `scores`."""
    total = sum(WEIGHTS[name] * normalised(name, scores[name]) for name in group)
    return total / sum(WEIGHTS[name] for name in group)


@dataclass(frozen=True)
class Composite:
    """Quality, Semantic and Total, each None while a dimension it needs is missing (listed in `missing`)."""

    quality: float | None
    semantic: float | None
    total: float | None
    missing: dict[str, list[str]]


def composite(scores: Mapping[str, float]) -> Composite:
    """VBench's group scores from raw per-dimension scores (other keys of `scores` are ignored)."""
    missing = {
        "quality": [name for name in QUALITY if name not in scores],
        "semantic": [name for name in SEMANTIC if name not in scores],
    }
    quality = None if missing["quality"] else group_score(scores, QUALITY)
    semantic = None if missing["semantic"] else group_score(scores, SEMANTIC)
    total = None
    if quality is not None and semantic is not None:
        total = (QUALITY_WEIGHT * quality + SEMANTIC_WEIGHT * semantic) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return Composite(quality, semantic, total, missing)
