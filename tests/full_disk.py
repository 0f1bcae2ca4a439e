"""A file system that is full for one process: its writes past a size limit fail with EFBIG ("File too large"), as
writes fail with ENOSPC on a full disk, whoever runs it (root included, where a read-only folder does not stop writes,
and where `chattr +i` may not be permitted). The limit is RLIMIT_FSIZE, which holds for every writer of the process
(Python, safetensors' Rust, tensorstore's C++); Python ignores SIGXFSZ, so a write over it raises instead of killing
the process. It is set in a fresh process only: orbax's writer threads log tracebacks while they fail, which must not
race with the test process's own traceback formatting (CPython 3.11 shares one AST recursion counter)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cli_args(overrides: dict[str, Any]) -> list[str]:
    """Dotted key=value arguments of tools/train.py for nested overrides ({"data": {"fps": 8}} -> data.fps=8)."""
    args = []
    for key, value in overrides.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        args += [f"{key}{'.' + k if k else ''}={json.dumps(v)}" for k, v in items]
    return args


def train_on_a_full_disk(args: list[str], max_file_bytes: int, timeout_s: int = 600) -> subprocess.CompletedProcess:
    """tools/train.py with `args` in a process none of whose files can grow past `max_file_bytes`."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--no-progress", "--sample-prompt", "", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env, preexec_fn=limit)
