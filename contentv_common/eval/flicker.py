"""VBench's temporal flickering: how little consecutive frames differ, pixel by pixel.

score = (255 - m) / 255, where m is the mean over consecutive frame pairs of the mean absolute difference of the two
frames' uint8 values over every pixel and channel; a clip whose frames are identical scores 1. VBench computes it on
every decoded frame at the clip's own frame rate (so re-encoding at another fps changes it), and in its standard
prompt suite only on the clips its optical-flow static filter keeps (a clip with real motion would count as
flickering); this function scores whatever clip it is given.
"""

from __future__ import annotations

import numpy as np


def temporal_flickering(video: np.ndarray) -> float:
    """VBench's temporal flickering of uint8 frames [F, H, W, 3], F >= 2: 1 for a still clip, lower as it flickers."""
    video = np.asarray(video)
    if video.ndim != 4 or video.dtype != np.uint8 or len(video) < 2:
        raise ValueError(f"temporal flickering needs uint8 frames [F >= 2, H, W, C], got {video.dtype} {video.shape}")
    # int16 per pair: exact differences without a float copy of the whole clip; means accumulate in float64.
    diffs = [np.abs(video[i + 1].astype(np.int16) - video[i]).mean() for i in range(len(video) - 1)]
    return float((255.0 - np.mean(diffs)) / 255.0)
