"""One writer per checkpoint dir: an exclusive `flock` on `<dir>/.run.lock` plus a record of who holds it.

The kernel drops a flock when its holder exits or is killed, so a crashed run never leaves the dir locked. The
record (pid, host, start time) names the holder in the error a second run gets; a record whose pid no longer runs on
this host is stale (a killed run): the flock may then still be held by a forked child that outlived it, so the lock
file is replaced and taken over. Locks are re-entrant within a process (stages and exports reuse the one held).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from contentv_common.errors import ConfigError, RunLockedError

LOCK_FILE = ".run.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped) holds nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_record(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(record: dict) -> str:
    if not record:
        return "an unknown process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("started", 0)))
    return f"pid {record.get('pid')} on {record.get('host')} (since {since})"


class RunLock:
    """The exclusive lock of one checkpoint dir, held until `release` (or process exit)."""

    _held: dict[Path, RunLock] = {}

    def __init__(self, folder: Path):
        self.folder, self.path, self.fd, self.users = folder, folder / LOCK_FILE, -1, 0

    @classmethod
    def acquire(cls, folder: str | Path) -> RunLock:
        """Lock `folder` (created if missing) for this process; RunLockedError names the live holder."""
        folder = Path(folder).resolve()
        lock = cls._held.get(folder)
        if lock is None:
            lock = cls(folder)
            lock._take()
            cls._held[folder] = lock
        lock.users += 1
        return lock

    def _take(self) -> None:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock_file()
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST):
                raise
            raise ConfigError(f"checkpoint.dir: {self.folder}: cannot write there ({e.strerror})") from None

    def _lock_file(self) -> None:
        host = socket.gethostname()
        for attempt in range(2):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            record = _read_record(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                stale = record.get("host") == host and isinstance(record.get("pid"), int)
                if stale and not _pid_alive(record["pid"]) and attempt == 0:
                    print(f"taking over the lock of {_describe(record)}, which is no longer running (a process it "
                          "started still held the lock)", file=sys.stderr)  # fmt: skip
                    self.path.unlink(missing_ok=True)  # the orphan keeps the old file's flock: start a new file
                    continue
                raise RunLockedError(
                    f"{self.folder}: checkpoint dir is in use by {_describe(record)}; stop that run or use another "
                    "checkpoint.dir"
                ) from None
            if not self.path.exists() or os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                os.close(fd)  # replaced while we opened it: lock the new file
                continue
            if record.get("pid") and not _pid_alive(record["pid"]):
                print(f"taking over the lock of {_describe(record)}, which is no longer running", file=sys.stderr)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": host, "started": time.time()}).encode(), 0)
            self.fd = fd
            return
        raise RunLockedError(f"{self.path}: could not take the lock (the lock file keeps changing)")

    def release(self) -> None:
        """Drop one use; the last one clears the record (a clean exit is not a stale lock) and unlocks."""
        self.users -= 1
        if self.users > 0 or self.fd < 0:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = -1
        self._held.pop(self.folder, None)


def check_unlocked(folder: str | Path) -> None:
    """Fail fast (before expensive set-up) when `folder` cannot be written or another live process holds it; the
    lock is not kept."""
    RunLock.acquire(folder).release()
