"""Decoding with PyAV: probe a file, cut a clip of N frames at a target fps, resize and centre-crop to a bucket.

Every failure is a `ClipError` carrying a short reason ("missing", "corrupt", "too_short", ...) that the cache step
counts; a bad file never stops a run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from contentv_common.data.manifest import ManifestEntry
from contentv_common.errors import ClipError


@dataclass(frozen=True)
class SourceInfo:
    width: int
    height: int
    fps: float
    duration_s: float


def probe(entry: ManifestEntry) -> SourceInfo:
    """Size, fps and duration of a source; manifest hints are used when all are given (no file access)."""
    if entry.is_image and entry.width and entry.height:
        return SourceInfo(entry.width, entry.height, 1.0, 1.0)
    if entry.width and entry.height and entry.fps and entry.frames:
        return SourceInfo(entry.width, entry.height, float(entry.fps), entry.frames / entry.fps)
    if not entry.path.exists():
        raise ClipError("missing", f"{entry.path} does not exist")
    try:
        with av.open(str(entry.path)) as container:
            if not container.streams.video:
                raise ClipError("no_video", f"{entry.path} has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if entry.is_image:
                return SourceInfo(width, height, 1.0, 1.0)
            fps = float(stream.average_rate or stream.guessed_rate or 0) or 24.0
            if stream.frames:
                duration = stream.frames / fps
            elif stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration:
                duration = container.duration / av.time_base
            else:
                raise ClipError("corrupt", f"{entry.path}: unknown duration")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise ClipError("corrupt", f"{entry.path}: {e}") from None
    if width <= 0 or height <= 0:
        raise ClipError("corrupt", f"{entry.path}: frame size {width}x{height}")
    return SourceInfo(width, height, fps, duration)


def resize_crop(frame: av.VideoFrame, width: int, height: int) -> np.ndarray:
    """Scale so the frame covers width x height (keeping aspect), then centre-crop; uint8 [height, width, 3]."""
    scale = max(width / frame.width, height / frame.height)
    sw, sh = max(width, round(frame.width * scale)), max(height, round(frame.height * scale))
    rgb = frame.reformat(width=sw, height=sh, format="rgb24", interpolation="AREA").to_ndarray()
    top, left = (sh - height) // 2, (sw - width) // 2
    return rgb[top : top + height, left : left + width]


def decode_clip(path: str | Path, fps: float, frames: int, width: int, height: int) -> np.ndarray:
    """The first `frames` frames of `path` resampled to `fps` (nearest source frame), uint8 [frames, height, width, 3].

    Resampling keeps the clip's real-time speed whatever the source rate: frames are repeated or skipped as needed.
    """
    path = Path(path)
    if not path.exists():
        raise ClipError("missing", f"{path} does not exist")
    out: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipError("no_video", f"{path} has no video stream")
            stream = container.streams.video[0]
            src_fps = float(stream.average_rate or stream.guessed_rate or 0) or fps
            half = 0.5 / src_fps
            start = None
            for index, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else index / src_fps
                start = t if start is None else start
                while len(out) < frames and t - start + half >= len(out) / fps:
                    out.append(resize_crop(frame, width, height))
                if len(out) == frames:
                    break
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise ClipError("corrupt", f"{path}: {e}") from None
    if not out:
        raise ClipError("corrupt", f"{path}: no decodable frame")
    if len(out) < frames:
        raise ClipError("too_short", f"{path}: {len(out)} frames at {fps} fps, need {frames}")
    return np.stack(out)
