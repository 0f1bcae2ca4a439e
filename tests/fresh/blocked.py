"""Run scripts in this fresh process as if some top-level packages were not installed.

    python tests/fresh/blocked.py jax,flax SCRIPT [ARGS ...] [--- SCRIPT [ARGS ...] ...]

Every meta-path finder is wrapped so that a blocked package is never found: `import torch` raises
ModuleNotFoundError(name="torch") and `importlib.util.find_spec("torch")` is None, exactly as on a machine without it
(transformers and diffusers then take their torch-free paths). Each SCRIPT runs as `__main__` with its own argv, in
order; the first non-zero exit status ends the run with that status. At the end no blocked module may be loaded.
"""

from __future__ import annotations

import os
import runpy
import sys

PRELOADED = sorted({"ml_dtypes", "jax", "torch"} & set(sys.modules))


class Hidden:
    """A meta-path finder that finds nothing under the blocked names and delegates everything else."""

    def __init__(self, finder, blocked: frozenset[str]):
        self.finder, self.blocked = finder, blocked

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.blocked:
            return None
        find = getattr(self.finder, "find_spec", None)
        return None if find is None else find(name, path, target)

    def __getattr__(self, attr):  # find_distributions, invalidate_caches, ...
        return getattr(self.finder, attr)


def main(argv: list[str]) -> int:
    blocked = frozenset(filter(None, argv[0].split(",")))
    assert not PRELOADED, f"the interpreter preloaded {PRELOADED}: not a fresh process"
    sys.meta_path[:] = [Hidden(f, blocked) for f in sys.meta_path]
    runs, current = [], []
    for arg in argv[1:]:
        if arg == "---":
            runs.append(current)
            current = []
        else:
            current.append(arg)
    runs.append(current)
    for script, *args in runs:
        sys.argv = [script, *args]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            if e.code not in (0, None):
                return e.code if isinstance(e.code, int) else 1
    loaded = sorted(m for m in sys.modules if m.partition(".")[0] in blocked)
    assert not loaded, f"blocked modules were loaded: {loaded}"
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
