"""One top-level error handler for every CLI: bad input is one line and exit status 2, a stopped run one line and 1.

`run_cli(main)` is the only place that turns exceptions into exit statuses, so the tools raise (ConfigError,
CheckpointError, DataError, RunLockedError, a missing file) instead of catching errors themselves. After an error it
leaves with `os._exit`, so threads that never finish (orbax's signalling threads after a failed save) cannot keep a
stopped run alive.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from contentv_common.errors import CheckpointError, ConfigError, DataError, RunLockedError, RunStopped
from contentv_common.extras import missing_extra

BAD_INPUT = (
    ConfigError,
    CheckpointError,
    DataError,
    RunLockedError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
)
EXIT_BAD_INPUT = 2


def one_line(e: BaseException) -> str:
    """The exception's message on one line (multi-line messages are joined with '; ')."""
    text = str(e) or type(e).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _leave(code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Run `main(argv)` and exit with its status; errors become one line on stderr (no traceback for known ones)."""
    prog = Path(sys.argv[0]).stem
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors (status 2) and explicit exits
        sys.exit(e.code)
    except BAD_INPUT as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        _leave(EXIT_BAD_INPUT)
    except ModuleNotFoundError as e:  # a backend extra not installed: name it (any other missing module is a bug)
        if missing_extra(e) is None:
            traceback.print_exc()
            _leave(1)
        print(f"{prog}: error: {missing_extra(e)}", file=sys.stderr)
        _leave(EXIT_BAD_INPUT)
    except (RunStopped, OSError) as e:
        print(f"{prog}: stopped: {one_line(e)}", file=sys.stderr)
        _leave(1)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        _leave(130)
    except BaseException:
        traceback.print_exc()
        _leave(1)
    sys.exit(code or 0)
