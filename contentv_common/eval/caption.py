"""Caption accuracy on the synthetic demo set: does a clip of "a <colour> <shape> moving <direction>" show the named
colour, and does it move the named way? Measured as the demo measures its own samples (training/evaluation.py), so
the scores of a folder are the fractions of its clips that pass each check."""

from __future__ import annotations

import numpy as np

from contentv_common.training.evaluation import parse_caption, shape_motion, shows_colour, shows_direction


def caption_colour(video: np.ndarray, prompt: str) -> float:
    """1.0 if the clip's bright pixels are mostly the caption's colour, else 0.0."""
    colour, _, direction = parse_caption(prompt)
    return float(shows_colour(shape_motion(video, colour, direction)))


def caption_direction(video: np.ndarray, prompt: str) -> float:
    """1.0 if the caption's colour moves the caption's way from the first frame to the last, else 0.0."""
    colour, _, direction = parse_caption(prompt)
    return float(shows_direction(shape_motion(video, colour, direction)))
