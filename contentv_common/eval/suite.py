"""VBench's prompt suite: which prompts each dimension is scored on, read from the `VBench_full_info.json` that VBench
ships (a list of {"prompt_en": PROMPT, "dimension": [NAME, ...]}; 946 prompts over 16 dimensions in VBench 0.1.5).

VBench scores each dimension on its own prompts' videos only, five videos per prompt in its standard suite.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from contentv_common.errors import ConfigError
from contentv_common.prompt_suite import video_name

VBENCH_SEEDS = 5  # videos per prompt in VBench's standard suite


def prompt_key(prompt: str) -> str:
    """The prompt as a clip's file name holds it (`{key}-{index}.mp4`: cut where VBench's naming cuts it)."""
    return video_name(prompt, 0).removesuffix("-0.mp4")


@dataclass(frozen=True)
class Suite:
    path: Path
    prompts: tuple[str, ...]  # every prompt, in the file's order
    by_dimension: dict[str, tuple[str, ...]]  # a dimension the file names -> its prompts, in the file's order

    def prompts_for(self, dimensions: list[str]) -> list[str]:
        """The prompts to sample for `dimensions`: those of the dimensions the suite names, every prompt for one it
        does not (a dimension of ours, such as clip_score, scores whatever is there); in the file's order."""
        if any(name not in self.by_dimension for name in dimensions):
            return list(self.prompts)
        wanted = {p for name in dimensions for p in self.by_dimension[name]}
        return [p for p in self.prompts if p in wanted]

    def scores(self, dimension: str, key: str) -> bool:
        """Whether `dimension` scores a clip whose file names prompt `key` (every clip for a dimension not named)."""
        prompts = self.by_dimension.get(dimension)
        return prompts is None or key in {prompt_key(p) for p in prompts}


def read_suite(path: Path) -> Suite:
    """The suite of a VBench_full_info.json; a missing file or a malformed entry is one ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"--suite {path}: no such file (VBench ships it as vbench/VBench_full_info.json)")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--suite {path}: not JSON ({e})") from None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"--suite {path}: expected a non-empty list of {{prompt_en, dimension}} objects")
    by_dimension: dict[str, list[str]] = {}
    for i, entry in enumerate(entries):
        prompt = entry.get("prompt_en") if isinstance(entry, dict) else None
        dims = entry.get("dimension") if isinstance(entry, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"--suite {path}: entry {i}: prompt_en: required string")
        if not isinstance(dims, list) or not all(isinstance(d, str) for d in dims):
            raise ConfigError(f"--suite {path}: entry {i}: dimension: required list of names")
        for name in dims:
            by_dimension.setdefault(name, []).append(prompt)
    prompts = tuple(dict.fromkeys(entry["prompt_en"] for entry in entries))
    return Suite(path, prompts, {k: tuple(dict.fromkeys(v)) for k, v in by_dimension.items()})
