"""Score a folder of generated clips, `{prompt}-{index}.mp4` (VBench's naming), on the dimensions asked for.

    python tools/eval.py samples/ --dimensions temporal_flickering,caption_colour,caption_direction --json eval.json
    python tools/eval.py samples/ --dimensions clip_score,clip_consistency --clip /path/clip-vit-large-patch14 \
        --backend torch --json eval.json

    python tools/eval.py suite/ --dimensions temporal_flickering --json eval.json --generate \
        --suite VBench_full_info.json -- --pipeline ContentV-8B --dtype bfloat16 --mesh data=8

With `--suite` (VBench's VBench_full_info.json), each dimension the suite names scores only its own prompts' clips,
as VBench does. `--generate` first samples those prompts, `--seeds` videos each (VBench's standard suite: 5), into
the folder with tools/sample.py's suite sampler and the sampler arguments after `--` (the model, dtype, size, mesh;
launched as tools/sample.py is, several processes each take a share, files already there are kept), then process 0
scores the whole suite once every process's share is there.

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
import sys
import tempfile
import time
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
from contentv_common.eval.suite import VBENCH_SEEDS, Suite, read_suite
from contentv_common.eval.videos import EvalVideo, benchmark, list_videos, probe
from contentv_common.prompt_suite import Pair, pending, suite_pairs

SAMPLER_OWNS = ("--prompt", "--prompts-file", "--seeds", "--out")  # --generate sets these sampler arguments itself


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("video_dir", type=Path, help="folder of {prompt}-{index}.mp4 clips")
    ap.add_argument("--dimensions", required=True, help=f"NAME[,NAME...] of: {', '.join(SUPPORTED)}")
    ap.add_argument("--json", type=Path, required=True, help="where to write the scores")
    ap.add_argument("--clip", type=Path, help=f"local CLIPModel folder, for {', '.join(CLIP_DIMENSIONS)}")
    ap.add_argument("--backend", choices=["jax", "torch"], default="jax", help="what runs the CLIP model")
    ap.add_argument("--device", default="auto", help="torch device: auto, npu, cuda, cpu")
    ap.add_argument("--suite", type=Path, help="VBench's VBench_full_info.json: each dimension scores its prompts")
    ap.add_argument("--generate", action="store_true", help="sample --suite's prompts first (sampler args after --)")
    ap.add_argument("--seeds", type=int, default=VBENCH_SEEDS, help="with --generate: videos per prompt")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def split_sampler_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(eval's arguments, the sampler's after `--`)."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


def check_prompts(dimensions: list[str], prompts: list[str], where: str) -> None:
    """DataError naming `where` unless every dimension can read every prompt."""
    for dimension in dimensions:
        check = PROMPT_CHECKS.get(dimension)
        if check is None:
            continue
        for prompt in prompts:
            try:
                check(prompt)
            except ValueError as e:
                raise DataError(f"{where}: {dimension}: {e}") from e


def generation(args: argparse.Namespace, sampler_args: list[str], dimensions: list[str]) -> tuple[list[str], Suite]:
    """Check --generate's arguments (one line each, before any model loads); the prompts to sample."""
    if args.suite is None:
        raise ConfigError("--generate samples a prompt suite: give --suite VBench_full_info.json")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    owned = [a for a in sampler_args if a.split("=", 1)[0] in SAMPLER_OWNS]
    if owned:
        raise ConfigError(f"{owned[0]}: --generate sets the sampler's {', '.join(SAMPLER_OWNS)} itself; drop it")
    if not sampler_args:
        raise ConfigError("--generate: give the sampler's arguments after --, e.g. -- --pipeline ContentV-8B")
    suite = read_suite(args.suite)
    prompts = suite.prompts_for(dimensions)
    check_prompts(dimensions, prompts, str(args.suite))
    return prompts, suite


def generate(args: argparse.Namespace, sampler_args: list[str], prompts: list[str]) -> bool:
    """Sample this process's share of `prompts` x `--seeds` into the folder; True on process 0, after it has waited
    for every other share."""
    from contentv_common.cli import sample

    argv = [
        *sampler_args,
        *(f"--prompt={p}" for p in prompts),
        "--seeds",
        str(args.seeds),
        "--out",
        str(args.video_dir),
    ]
    _, groups = sample.run(argv)
    if groups.process != 0:
        print(f"process {groups.process}: its share of the suite is written; process 0 scores the suite")
        return False
    wait_for(suite_pairs(prompts, args.seeds), args.video_dir)
    return True


def wait_for(pairs: list[Pair], folder: Path, poll_s: float = 2.0) -> None:
    """Until every pair's clip is in `folder` (the other processes' shares), saying what it waits for."""
    shown = None
    while left := pending(pairs, folder):
        if len(left) != shown:
            print(f"waiting for {len(left)} clips of the other processes' shares, e.g. {left[0].name}", flush=True)
            shown = len(left)
        time.sleep(poll_s)


def check_videos(chosen: dict[str, list[EvalVideo]]) -> dict[Path, tuple[int, float]]:
    """Every dimension has clips, each with a prompt it can read, readable and long enough; (frames, fps) per clip."""
    for dimension, videos in chosen.items():
        if not videos:
            raise DataError(f"{dimension}: no clip of its prompts in the folder (--suite names them)")
        for video in videos:
            check_prompts([dimension], [video.prompt], str(video.path))
    headers = {video.path: probe(video.path) for videos in chosen.values() for video in videos}
    for dimension, videos in chosen.items():
        for video in videos:
            if dimension in TWO_FRAMES and headers[video.path][0] < 2:
                raise DataError(f"{video.path}: {headers[video.path][0]} frame(s); {dimension} needs 2 or more")
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


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Score the folder (first sampling the suite, with --generate); the result, None on a process that only
    sampled its share."""
    ours, sampler_args = split_sampler_args(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(ours)
    if sampler_args and not args.generate:
        raise ConfigError("arguments after -- are the sampler's: give --generate, or drop them")
    dimensions = parse_dimensions(args.dimensions)
    needs_clip = any(name in CLIP_DIMENSIONS for name in dimensions)
    if needs_clip:
        if args.clip is None:
            raise ConfigError(f"--clip DIR (a local CLIPModel folder) is needed for {', '.join(CLIP_DIMENSIONS)}")
        from contentv_common.reward.clip_table import read_clip_config  # here: checkpoint I/O loads ml_dtypes

        read_clip_config(args.clip)  # a missing or broken folder is one line before any weight loads
    suite = None
    if args.generate:
        prompts, suite = generation(args, sampler_args, dimensions)
        if not generate(args, sampler_args, prompts):
            return None
    elif args.suite is not None:
        suite = read_suite(args.suite)
    videos = list_videos(args.video_dir)
    chosen = {name: [v for v in videos if suite is None or suite.scores(name, v.prompt)] for name in dimensions}
    headers = check_videos(chosen)
    scorers: dict[str, Scorer] = dict(DIMENSIONS)
    if needs_clip:
        scorers |= clip_scorers(get(args.backend).clip_embeddings(args.clip, args.device))
    per_video: dict[str, dict[str, float]] = {name: {} for name in dimensions}
    clips = []
    scored = [v for v in videos if v.path in headers]
    for video in tqdm(scored, desc="scoring", disable=args.no_progress):
        frames, _ = read_video(video.path)
        names = [name for name in dimensions if video in chosen[name]]
        scores = {name: scorers[name](frames, video.prompt) for name in names}
        for name, score in scores.items():
            per_video[name][video.path.name] = score
        fps = headers[video.path][1]
        seconds = len(frames) / fps
        clips.append({"file": video.path.name, "prompt": video.prompt, "index": video.index, "frames": len(frames),
                      "fps": fps, "seconds": seconds, "scores": scores})  # fmt: skip
    overall = {name: float(np.mean(list(scores.values()))) for name, scores in per_video.items()}
    composed = composite(overall)
    result = {
        "video_dir": str(args.video_dir),
        "suite": None if suite is None else str(suite.path),
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
