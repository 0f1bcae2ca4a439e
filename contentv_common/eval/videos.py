"""The folder an evaluation scores: clips named `{prompt}-{index}.mp4` (VBench's naming), and which of VBench or
VBench-Long their length calls for."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import av

from contentv_common.errors import DataError

NAME = re.compile(r"(?P<prompt>.+)-(?P<index>\d+)\.mp4")
LONG_SECONDS = 5.0  # VBench's rule: clips of 5.0 s or longer are scored with VBench-Long, shorter ones with VBench


@dataclass(frozen=True)
class EvalVideo:
    path: Path
    prompt: str
    index: int


def list_videos(folder: Path) -> list[EvalVideo]:
    """Every mp4 of `folder` (not its subfolders), sorted by name; other files are ignored, a badly named mp4 is an
    error."""
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: not a folder")
    videos = []
    for path in sorted(folder.glob("*.mp4")):
        match = NAME.fullmatch(path.name)
        if match is None:
            raise DataError(f"{path}: not named {{prompt}}-{{index}}.mp4 (as VBench names its clips)")
        videos.append(EvalVideo(path, match["prompt"], int(match["index"])))
    if not videos:
        raise DataError(f"{folder}: no .mp4 videos")
    return videos


def probe(path: Path) -> tuple[int, float]:
    """(frame count, frames per second) from the container's header, without decoding."""
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
            frames = stream.frames or round(duration * fps)
    except (av.error.FFmpegError, IndexError) as e:
        raise DataError(f"{path}: not a readable video ({e})") from e
    if frames < 1 or fps <= 0:
        raise DataError(f"{path}: no video frames or no frame rate in its header")
    return frames, fps


def benchmark(seconds: list[float]) -> str:
    """Which benchmark VBench's rule assigns to clips of these lengths."""
    long = sum(s >= LONG_SECONDS for s in seconds)
    if long == 0:
        return f"VBench (every clip is shorter than {LONG_SECONDS} s)"
    whole = "; the scores here are VBench's, on whole clips: VBench-Long's clip splitting is not implemented"
    if long == len(seconds):
        return f"VBench-Long (every clip is {LONG_SECONDS} s or longer){whole}"
    share = f"{long} of {len(seconds)} clips are {LONG_SECONDS} s or longer"
    return f"mixed: {share} (VBench-Long), the others shorter (VBench){whole}"
