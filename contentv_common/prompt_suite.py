"""Prompt suites: every prompt x seed index as `{prompt}-{index}.mp4`, spread over processes, resumable.

A benchmark (VBench: 946 prompts x 5 videos) is thousands of videos. Each (prompt, index) pair is one file whose
name VBench reads its prompt from, whose noise depends on nothing but `seed + index`, and which is written atomically,
so a suite can be split over any number of processes (each takes a fixed, disjoint share of the pairs) and a killed
suite resumes by skipping the files already there: the videos are the same however the pairs were spread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from contentv_common.sampling import ClipSettings, initial_noise, latent_shape, sample_videos

if TYPE_CHECKING:
    from contentv_common.backend import Backend

NAME_BYTES = 255  # the longest file name Linux file systems (ext4, xfs, NFS) and macOS take
CUT_CHARS = 180  # VBench-2.0 names a prompt whose full name is too long by its first 180 characters


def video_name(prompt: str, index: int) -> str:
    """VBench's name for video `index` of `prompt`: `{prompt}-{index}.mp4`, the prompt verbatim (VBench's standard
    mode looks the exact name up). A name over NAME_BYTES in UTF-8 uses the prompt's first CUT_CHARS characters, as
    VBench-2.0 does (its long prompts are all over 245 characters; VBench's own are at most 210, kept whole).
    ValueError for a prompt no file name can hold: one with '/' or NUL, or still too long once cut."""
    if "/" in prompt or "\0" in prompt:
        raise ValueError(f"prompt {prompt!r} holds '/' or NUL, which no file name can (VBench names files by prompt)")
    name = f"{prompt}-{index}.mp4"
    if len(name.encode()) > NAME_BYTES:
        name = f"{prompt[:CUT_CHARS]}-{index}.mp4"
    if len(name.encode()) > NAME_BYTES:
        raise ValueError(f"prompt {prompt[:40]!r}...: its first {CUT_CHARS} characters are over {NAME_BYTES} bytes")
    return name


@dataclass(frozen=True)
class Pair:
    """One video of a suite: `prompt`'s seed index `index` (noise seed: the suite's seed + index), file `name`."""

    prompt: str
    index: int
    name: str


def suite_pairs(prompts: list[str], seeds: int) -> list[Pair]:
    """Every prompt x seed index 0..seeds-1, prompt by prompt. A repeated prompt is sampled once (same name, same
    noise: the same video; VBench's all_dimension.txt repeats two); two prompts that would share a file name (cut
    to the same first characters) are a ValueError naming both."""
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    owner: dict[str, str] = {}
    pairs = []
    for prompt in dict.fromkeys(prompts):
        for index in range(seeds):
            name = video_name(prompt, index)
            if owner.setdefault(name, prompt) != prompt:
                raise ValueError(f"prompts {owner[name][:60]!r}... and {prompt[:60]!r}... would both be {name!r}")
            pairs.append(Pair(prompt, index, name))
    return pairs


def share(pairs: list[Pair], group: int, groups: int) -> list[Pair]:
    """Data group `group` of `groups`: every groups-th pair from the group-th. Disjoint, together all of them, sizes
    within one of each other; fixed by the list alone, never by which files exist (processes see them at different
    times), so the groups can neither miss nor repeat a pair."""
    if not 0 <= group < groups:
        raise ValueError(f"group {group} is not one of {groups} groups")
    return pairs[group::groups]


def pair_seed(seed: int, index: int) -> int:
    """The noise seed of seed index `index`: `seed + index`, whichever prompt, batch or process samples it, so pair
    (prompt, i) is exactly `tools/sample.py --prompt PROMPT --seed SEED+i` (and, with `--noise torch`, the official
    demo's latents for that seed)."""
    return seed + index


def pending(pairs: list[Pair], out: Path) -> list[Pair]:
    """The pairs whose file is not in `out` yet. A file there is a whole video: write_video writes under a temporary
    name (not *.mp4) and renames, so a killed write leaves no file of the final name."""
    return [pair for pair in pairs if not (out / pair.name).exists()]


def sample_suite(
    backend: Backend,
    model: Any,
    encoders: Any,
    decode: Callable[[np.ndarray], np.ndarray],
    todo: list[Pair],
    out: Path,
    settings: ClipSettings,
    progress: bool = True,
    done: int = 0,
) -> list[Path]:
    """Sample the pairs `todo` into `out`, `batch_size` at a time; the progress bar counts `done` (the share's pairs
    already there) as finished."""
    from contentv_common.data.video_io import write_video

    shape = latent_shape(model.cfg.in_channels, settings.frames, settings.height, settings.width)
    written = []
    with tqdm(total=done + len(todo), initial=done, desc="suite", unit="video", disable=not progress) as bar:
        for start in range(0, len(todo), settings.batch_size):
            batch = todo[start : start + settings.batch_size]
            seeds = [pair_seed(settings.seed, pair.index) for pair in batch]
            noise = np.concatenate([initial_noise(settings.noise, s, shape, 1, settings.dtype) for s in seeds])
            prompts = [pair.prompt for pair in batch]
            videos = sample_videos(backend, model, encoders, decode, prompts, noise, settings, progress)
            for pair, video in zip(batch, videos, strict=True):
                written.append(write_video(out / pair.name, video, fps=settings.fps))
                bar.update()
    return written
