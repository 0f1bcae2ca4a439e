"""Score a folder of generated clips, `{prompt}-{index}.mp4` (VBench's naming), on the dimensions asked for.

    python tools/eval.py samples/ --dimensions temporal_flickering,caption_colour,caption_direction --json eval.json
    python tools/eval.py samples/ --dimensions clip_score,clip_consistency --clip /path/clip-vit-large-patch14 \
        --backend torch --json eval.json

Writes each dimension's score per clip and over the folder (the mean over clips, as VBench reports it) to the JSON
file and prints a markdown table; VBench's Quality, Semantic and Total (`contentv_common/eval/composition.py`) are
computed once every dimension of their group is scored, and the missing ones are named otherwise. Says which of VBench
or VBench-Long the clips' length calls for. Bad input (an unsupported dimension, a missing folder, no clips, a badly
named clip, a prompt a dimension cannot read, a CLIP folder that is missing or incomplete) is one line and exit status
2 before any clip is decoded.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from contentv_common.backend import get
from contentv_common.cli import run_cli
from contentv_common.data.video_io import read_video
from contentv_common.errors import ConfigError, DataError
from contentv_common.eval.composition import NORMALISATION, composite, normalised
from contentv_common.eval.dimensions import (
    CLIP_DIMENSIONS,
    DIMENSIONS,
    PROMPT_CHECKS,
    SUPPORTED,
    TWO_FRAMES,
    Scorer,
    clip_scorers,
    parse_dimensions,
)
from contentv_common.eval.videos import EvalVideo, benchmark, list_videos, probe


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("video_dir", type=Path, help="folder of {prompt}-{index}.mp4 clips")
    ap.add_argument("--dimensions", required=True, help=f"NAME[,NAME...] of: {', '.join(SUPPORTED)}")
    ap.add_argument("--json", type=Path, required=True, help="where to write the scores")
    ap.add_argument("--clip", type=Path, help=f"local CLIPModel folder, for {', '.join(CLIP_DIMENSIONS)}")
    ap.add_argument("--backend", choices=["jax", "torch"], default="jax", help="what runs the CLIP model")
    ap.add_argument("--device", default="auto", help="torch device: auto, npu, cuda, cpu")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def check_videos(videos: list[EvalVideo], dimensions: list[str]) -> list[tuple[int, float]]:
    """Every clip readable, long enough and with a prompt each dimension can read; returns (frames, fps) per clip."""
    for dimension in dimensions:
        check = PROMPT_CHECKS.get(dimension)
        if check is None:
            continue
        for video in videos:
            try:
                check(video.prompt)
            except ValueError as e:
                raise DataError(f"{video.path}: {dimension}: {e}") from e
    headers = [probe(video.path) for video in videos]
    for video, (frames, _) in zip(videos, headers, strict=True):
        short = [name for name in dimensions if name in TWO_FRAMES and frames < 2]
        if short:
            raise DataError(f"{video.path}: {frames} frame(s); {', '.join(short)} need 2 or more")
    return headers


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a stopped run never leaves a truncated file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def markdown(result: dict[str, Any]) -> str:
    """The table of per-dimension scores (percent, as VBench's leaderboard shows them) and the composed scores."""
    lines = ["| dimension | score (%) | VBench-normalised (%) | clips |", "| --- | --- | --- | --- |"]
    for name, entry in result["dimensions"].items():
        norm = "" if entry["normalised"] is None else f"{100 * entry['normalised']:.2f}"
        lines.append(f"| {name} | {100 * entry['score']:.2f} | {norm} | {len(entry['per_video'])} |")
    for group in ("quality", "semantic", "total"):
        value = result[group]
        if value is not None:
            lines.append(f"| **{group.title()}** | {100 * value:.2f} | | |")
    for group, names in result["missing"].items():
        if names:
            lines.append(f"\n{group.title()} (and Total) not computed: missing {', '.join(names)}")
    lines.append(f"\nbenchmark for these clips' length: {result['benchmark']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    dimensions = parse_dimensions(args.dimensions)
    needs_clip = any(name in CLIP_DIMENSIONS for name in dimensions)
    if needs_clip:
        if args.clip is None:
            raise ConfigError(f"--clip DIR (a local CLIPModel folder) is needed for {', '.join(CLIP_DIMENSIONS)}")
        from contentv_common.reward.clip_table import read_clip_config  # here: checkpoint I/O loads ml_dtypes

        read_clip_config(args.clip)  # a missing or broken folder is one line before any weight loads
    videos = list_videos(args.video_dir)
    headers = check_videos(videos, dimensions)
    scorers: dict[str, Scorer] = dict(DIMENSIONS)
    if needs_clip:
        scorers |= clip_scorers(get(args.backend).clip_embeddings(args.clip, args.device))
    per_video: dict[str, dict[str, float]] = {name: {} for name in dimensions}
    clips = []
    for video, (_, fps) in tqdm(list(zip(videos, headers, strict=True)), desc="scoring", disable=args.no_progress):
        frames, _ = read_video(video.path)
        scores = {name: scorers[name](frames, video.prompt) for name in dimensions}
        for name, score in scores.items():
            per_video[name][video.path.name] = score
        seconds = len(frames) / fps
        clips.append({"file": video.path.name, "prompt": video.prompt, "index": video.index, "frames": len(frames),
                      "fps": fps, "seconds": seconds, "scores": scores})  # fmt: skip
    overall = {name: float(np.mean(list(scores.values()))) for name, scores in per_video.items()}
    composed = composite(overall)
    result = {
        "video_dir": str(args.video_dir),
        "benchmark": benchmark([clip["seconds"] for clip in clips]),
        "dimensions": {
            name: {
                "score": overall[name],
                "normalised": normalised(name, overall[name]) if name in NORMALISATION else None,
                "per_video": per_video[name],
            }
            for name in dimensions
        },
        "quality": composed.quality,
        "semantic": composed.semantic,
        "total": composed.total,
        "missing": composed.missing,
        "videos": clips,
    }
    write_json(args.json, result)
    print(markdown(result))
    print(f"scores of {len(clips)} clips in {args.json}")
    return result


def cli(argv: list[str] | None = None) -> int:
    main(argv)
    return 0


def entry() -> None:
    """The `contentv-eval` command."""
    run_cli(cli)


if __name__ == "__main__":
    entry()
