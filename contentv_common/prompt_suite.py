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

from contentv_common.sample_mesh import SampleMesh
from contentv_common.sampling import ClipSettings, initial_noise, latent_shape, sample_latents

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


@dataclass(frozen=True)
class SamplingGroups:
    """A suite's data groups from one process (Backend.join_sampling): `owners[g]` is the process that writes group
    g's videos. `together`: one program over every process's devices (a sampling mesh), which denoises every
    group's pairs in each forward; else each process is its own group and samples alone."""

    process: int
    processes: int
    owners: tuple[int, ...]
    together: bool = False

    @property
    def sampled(self) -> list[int]:
        """The groups whose pairs this process's forwards denoise."""
        return list(range(len(self.owners))) if self.together else [self.process]

    @property
    def written(self) -> list[int]:
        """The groups whose videos this process writes."""
        return [g for g, owner in enumerate(self.owners) if owner == self.process]


def suite_rows(todo: list[list[Pair]], per: int) -> list[list[tuple[Pair, int | None]]]:
    """The rows of each forward: `per` pairs of every group's `todo` (a list per group, in group order), so data
    group g's rows land on its data shard; a group short of pairs repeats one, marked None (sampled, not written).
    Each row is (pair, group), group None for a repeat. One group alone is never padded."""
    filler = next(pair for pairs in todo for pair in pairs)
    steps = max(-(-len(pairs) // per) for pairs in todo)
    batches = []
    for k in range(steps):
        rows: list[tuple[Pair, int | None]] = []
        for g, pairs in enumerate(todo):
            chunk = pairs[k * per : (k + 1) * per]
            rows += [(pair, g) for pair in chunk]
            if len(todo) > 1:
                rows += [((chunk or [filler])[-1], None)] * (per - len(chunk))
        batches.append(rows)
    return batches


def sample_suite(
    backend: Backend,
    model: Any,
    encoders: Any,
    decode: Callable[[np.ndarray], np.ndarray],
    todo: list[list[Pair]],
    out: Path,
    settings: ClipSettings,
    progress: bool = True,
    done: int = 0,
    mesh: SampleMesh | None = None,
    write: Callable[[int], bool] = lambda group: True,
) -> list[Path]:
    """Sample the pairs `todo` (one list per sampled group) into `out`: each forward holds `batch_size` pairs, split
    evenly over the groups (`suite_rows`); the videos of the groups `write` accepts are decoded and written here. The
    progress bar counts `done` (the share's pairs already there) as finished."""
    from contentv_common.data.video_io import write_video

    shape = latent_shape(model.cfg.in_channels, settings.frames, settings.height, settings.width)
    per = max(1, settings.batch_size // len(todo))
    mine = sum(len(pairs) for g, pairs in enumerate(todo) if write(g))
    written = []
    with tqdm(total=done + mine, initial=done, desc="suite", unit="video", disable=not progress) as bar:
        for rows in suite_rows(todo, per):
            seeds = [pair_seed(settings.seed, pair.index) for pair, _ in rows]
            noise = np.concatenate([initial_noise(settings.noise, s, shape, 1, settings.dtype) for s in seeds])
            prompts = [pair.prompt for pair, _ in rows]
            latents = sample_latents(backend, model, encoders, prompts, noise, settings, progress, mesh)
            keep = [i for i, (_, group) in enumerate(rows) if group is not None and write(group)]
            if not keep:
                continue
            for i, video in zip(keep, decode(latents[keep]), strict=True):
                written.append(write_video(out / rows[i][0].name, video, fps=settings.fps))
                bar.update()
    return written
