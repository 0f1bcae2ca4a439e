"""The dimensions `tools/eval.py` scores, by name: VBench's names for VBench's, `caption_*` for the synthetic set's,
`clip_*` for the metrics of a local CLIP model.

Each scores one decoded clip (uint8 [F, H, W, 3]) given its prompt; a folder's score is the mean over its clips, as
VBench averages its per-video scores. VBench's other dimensions need backbones downloaded by VBench (CLIP, DINO,
RAFT, MUSIQ, AMT, ...) and are not supported yet.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from contentv_common.errors import ConfigError
from contentv_common.eval.caption import caption_colour, caption_direction
from contentv_common.eval.clip import ClipEmbeddings, clip_consistency, clip_score
from contentv_common.eval.composition import NORMALISATION
from contentv_common.eval.flicker import temporal_flickering
from contentv_common.training.evaluation import parse_caption

Scorer = Callable[[np.ndarray, str], float]

DIMENSIONS: dict[str, Scorer] = {
    "temporal_flickering": lambda video, prompt: temporal_flickering(video),
    "caption_colour": caption_colour,
    "caption_direction": caption_direction,
}
# What a prompt must be for a dimension to score it (checked for every clip before any is decoded).
PROMPT_CHECKS: dict[str, Callable[[str], object]] = {
    "caption_colour": parse_caption,
    "caption_direction": parse_caption,
}
CLIP_DIMENSIONS = ("clip_score", "clip_consistency")  # need --clip: scored by `clip_scorers`
SUPPORTED = (*DIMENSIONS, *CLIP_DIMENSIONS)
TWO_FRAMES = {"temporal_flickering", "caption_direction", "clip_consistency"}  # they compare frames


def clip_scorers(clip: ClipEmbeddings) -> dict[str, Scorer]:
    """The CLIP dimensions' scorers, on a backend's CLIP."""
    return {
        "clip_score": lambda video, prompt: clip_score(clip, video, prompt),
        "clip_consistency": lambda video, prompt: clip_consistency(clip, video),
    }


def parse_dimensions(text: str) -> list[str]:
    """`NAME[,NAME...]` -> the names, each supported, in order, without repeats."""
    names = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in SUPPORTED]
    if unknown or not names:
        later = sorted(set(NORMALISATION) - set(DIMENSIONS))
        raise ConfigError(
            f"--dimensions: {', '.join(unknown) or 'none given'} not supported; supported: {', '.join(SUPPORTED)} "
            f"(VBench's {', '.join(later)} need its downloaded backbones: not supported yet)"
        )
    return names
