"""Videos to and from mp4 through PyAV (H.264, yuv420p): the sampler's output format.

Frames are uint8 `[F, H, W, 3]` RGB. Writes go to a temporary file next to the target and are renamed into place, so
an interrupted run never leaves a truncated mp4 under the final name.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_video(path: str | Path, frames: np.ndarray, fps: float = 24.0, crf: int = 18) -> Path:
    """Encode uint8 RGB frames [F, H, W, 3] (H and W even, as yuv420p needs) to an H.264 mp4 at `path`."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"H.264 yuv420p needs even height and width, got {height}x{width}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not *.mp4: a killed write leaves no file that a folder scan (VBench) takes for a video
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".partial")
    os.close(fd)
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = {"crf": str(crf)}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode every frame of a video file: (uint8 RGB [F, H, W, 3], frames per second)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return np.stack(frames), fps
