"""Checkpoint integrity, the same for orbax (JAX) and safetensors (torch) checkpoints.

Every checkpoint folder gets `checksums.json` (size and sha256 of every other file) written last, atomically: it is
the commit marker, so a folder without it is an interrupted save. `newest_intact` verifies candidates newest first and
skips (with a one-line warning naming the file) any that is incomplete, truncated, damaged or missing files; when
checkpoints exist but none is intact it is an error, never a silent fresh start. Skipped folders are renamed aside
(`.damaged.<name>`), not deleted, so nothing is lost and the next save of that step has its name free.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from contentv_common.errors import CheckpointError

MANIFEST = "checksums.json"


def _digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # hashlib releases the GIL: threads hash in parallel


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: str | Path) -> Path:
    """Checksum every file under `folder` and write the manifest last (the checkpoint's commit marker)."""
    folder = Path(folder)
    names = _files(folder)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda n: _digest(folder / n), names))
    files = {n: {"size": (folder / n).stat().st_size, "sha256": d} for n, d in zip(names, digests, strict=True)}
    tmp = folder / (MANIFEST + ".tmp")
    with tmp.open("w") as f:
        json.dump({"format": 1, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    _fsync_dir(folder)
    return folder / MANIFEST


def verify(folder: str | Path) -> None:
    """CheckpointError naming the first problem: no manifest (interrupted save), a missing, resized or changed file."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.exists():
        raise CheckpointError(f"{manifest}: missing, the save of this checkpoint did not finish")
    try:
        files = json.loads(manifest.read_text())["files"]
        expected = {str(n): (int(v["size"]), str(v["sha256"])) for n, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{manifest}: unreadable ({type(e).__name__}: {e})") from None
    for name, (size, _) in expected.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST})")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"{path}: {actual} bytes, {MANIFEST} says {size} (truncated or overwritten)")
    names = sorted(expected)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for name, digest in zip(names, pool.map(lambda n: _digest(folder / n), names), strict=True):
            if digest != expected[name][1]:
                raise CheckpointError(f"{folder / name}: checksum differs from {MANIFEST} (the file is damaged)")


def set_aside(folder: Path, why: str) -> Path:
    """Rename a checkpoint out of the way (`.<why>.<name>`, numbered if taken); returns the new path."""
    target = folder.with_name(f".{why}.{folder.name}")
    n = 1
    while target.exists():
        n += 1
        target = folder.with_name(f".{why}{n}.{folder.name}")
    os.replace(folder, target)
    return target


def newest_intact(
    candidates: Sequence[tuple[int, Path]], *, writer: bool, warn: Callable[[str], None] | None = None
) -> tuple[int, Path] | None:
    """The newest (step, folder) that verifies; damaged ones are skipped with a warning (and, for the writing
    process, renamed aside). None only when there are no candidates; CheckpointError when none is intact."""
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    first_problem = None
    for step, folder in sorted(candidates, reverse=True):
        try:
            verify(folder)
            return step, folder
        except CheckpointError as e:
            first_problem = first_problem or str(e)
            moved = f"; moved to {set_aside(folder, 'damaged').name}" if writer else ""
            warn(f"warning: skipping checkpoint step {step}: {e}{moved}")
    if first_problem is not None:
        raise CheckpointError(f"no intact checkpoint among {len(candidates)} (newest: {first_problem})")
    return None


def remove_partial(root: str | Path, is_partial: Callable[[str], bool]) -> list[Path]:
    """Delete the temporary folders of saves that were killed (call only while holding the dir's run lock)."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for p in sorted(root.iterdir()):
            if is_partial(p.name):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def steps_to_delete(steps: Sequence[int], keep: int, pin_before: int | None = None) -> list[int]:
    """Old checkpoints beyond the `keep` newest; the newest one before step `pin_before` (a run's first skipped step:
    its resume point if it diverges) is kept too."""
    ordered = sorted(steps)
    kept = set(ordered[-keep:])
    if pin_before is not None:
        before = [s for s in ordered if s < pin_before]
        kept |= set(before[-1:])
    return [s for s in ordered if s not in kept]
