"""The dataset manifest: one JSON object per line with `path` and `caption`, optionally fps/frames/width/height.

Relative paths are relative to the manifest's folder. The optional fields are hints that spare a probe of the file.
A line that is not a JSON object, lacks a string `path` or has a bad hint is fatal (the manifest is broken); an entry
whose caption is not a string is kept with `problem` set, so the cache build skips and counts it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from contentv_common.errors import ManifestError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ManifestEntry:
    path: Path
    caption: str
    fps: float | None = None
    frames: int | None = None
    width: int | None = None
    height: int | None = None
    problem: str | None = None  # why this entry cannot be used ("bad_caption"); the cache build skips it

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_SUFFIXES


_OPTIONAL = {"fps": (int, float), "frames": (int,), "width": (int,), "height": (int,)}


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """All entries of a JSONL manifest; a broken line raises ManifestError naming file:line and key."""
    path = Path(path)
    if not path.exists():
        raise ManifestError(f"{path}: manifest not found")
    entries = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{where}: must be a JSON object")
        unknown = sorted(set(row) - {"path", "caption", *_OPTIONAL})
        if unknown:
            raise ManifestError(f"{where}: {unknown[0]}: unknown key")
        if not isinstance(row.get("path"), str):
            raise ManifestError(f"{where}: path: required string")
        caption = row.get("caption")
        for key, types in _OPTIONAL.items():
            value = row.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, types) or value <= 0):
                raise ManifestError(f"{where}: {key}: must be a positive number, got {value!r}")
        file = Path(row["path"])
        entries.append(
            ManifestEntry(
                path=file if file.is_absolute() else path.parent / file,
                caption=caption if isinstance(caption, str) else "",
                **{k: row.get(k) for k in _OPTIONAL},
                problem=None if isinstance(caption, str) else "bad_caption",
            )
        )
    return entries


def write_manifest(path: str | Path, rows: list[dict]) -> Path:
    """Write rows as JSONL (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path
