"""Framework-free reliability pieces: the run lock, checkpoint manifests with fallback, the divergence guard."""

import math
import os
import signal
import socket
import subprocess
import sys

import pytest

from contentv_common.checkpoint import integrity
from contentv_common.checkpoint.run_lock import LOCK_FILE, RunLock, check_unlocked
from contentv_common.config.recipe import DivergenceConfig
from contentv_common.errors import CheckpointError, RunLockedError
from contentv_common.training.divergence import DivergenceGuard

HOLD = """
import os, sys, time
sys.path.insert(0, {root!r})
from contentv_common.checkpoint.run_lock import RunLock
RunLock.acquire({folder!r})
child = os.fork() if {fork} else 1
if child == 0:  # a child that inherits the flock and outlives its parent
    time.sleep(60)
    os._exit(0)
print("locked", child if {fork} else 0, flush=True)
time.sleep(60)
"""


def _holder(folder, fork=False) -> tuple[subprocess.Popen, int]:
    """A process holding the lock of `folder` (and the pid of its flock-inheriting child when `fork`)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = HOLD.format(root=root, folder=str(folder), fork=fork)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    word, child = proc.stdout.readline().split()
    assert word == "locked"
    return proc, int(child)


def test_second_writer_is_refused_naming_the_holder_then_a_killed_holder_is_taken_over(tmp_path, capsys):
    holder, _ = _holder(tmp_path / "ckpt")
    try:
        with pytest.raises(RunLockedError, match=rf"in use by pid {holder.pid} on {socket.gethostname()}"):
            RunLock.acquire(tmp_path / "ckpt")
        with pytest.raises(RunLockedError):
            check_unlocked(tmp_path / "ckpt")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock.acquire(tmp_path / "ckpt")  # the kernel dropped the dead holder's flock
    assert f"taking over the lock of pid {holder.pid}" in capsys.readouterr().err
    assert RunLock.acquire(tmp_path / "ckpt") is lock  # re-entrant within a process
    lock.release()
    lock.release()
    assert (tmp_path / "ckpt" / LOCK_FILE).read_text() == ""  # a clean release leaves no stale record


def test_stale_lock_held_by_an_orphaned_child_is_taken_over(tmp_path, capsys):
    holder, child = _holder(tmp_path / "ckpt", fork=True)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    try:
        lock = RunLock.acquire(tmp_path / "ckpt")  # the child still holds the old file's flock
        assert f"pid {holder.pid}" in capsys.readouterr().err
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


def _checkpoint(folder, step, payload=b"x" * 1000):
    d = folder / str(step)
    (d / "state").mkdir(parents=True)
    (d / "state" / "params.bin").write_bytes(payload)
    (d / "optimizer.bin").write_bytes(payload[::-1])
    (d / "ema").mkdir()
    (d / "ema" / "weights.bin").write_bytes(payload + b"e")
    integrity.write_manifest(d)
    return d


def _damage(path, how):
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:-7])
    elif how == "flip":
        data = bytearray(path.read_bytes())
        data[100:116] = bytes(b ^ 0xFF for b in data[100:116])
        path.write_bytes(bytes(data))
    else:
        path.unlink()


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("part", ["state/params.bin", "optimizer.bin", "ema/weights.bin"])
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one(tmp_path, capsys, how, part):
    steps = [(s, _checkpoint(tmp_path, s)) for s in (2, 4)]
    _damage(tmp_path / "4" / part, how)
    assert integrity.newest_intact(steps, writer=True) == (2, tmp_path / "2")
    warning = capsys.readouterr().err
    assert warning.count("\n") == 1 and f"skipping checkpoint step 4: {tmp_path / '4' / part}" in warning
    assert not (tmp_path / "4").exists() and (tmp_path / ".damaged.4" / "state").is_dir()  # set aside, not deleted


def test_incomplete_and_all_damaged(tmp_path, capsys):
    first = _checkpoint(tmp_path, 2)
    second = _checkpoint(tmp_path, 4)
    (second / integrity.MANIFEST).unlink()  # killed before the commit marker
    with pytest.raises(CheckpointError, match="save of this checkpoint did not finish"):
        integrity.verify(second)
    _damage(first / "optimizer.bin", "flip")
    with pytest.raises(CheckpointError, match=r"no intact checkpoint among 2 .*4/checksums.json"):
        integrity.newest_intact([(2, first), (4, second)], writer=False)
    assert first.exists() and second.exists()  # a reader renames nothing
    assert integrity.newest_intact([], writer=True) is None


def test_partial_folders_and_retention(tmp_path):
    (tmp_path / "3.orbax-checkpoint-tmp-17").mkdir()
    (tmp_path / "2").mkdir()
    removed = integrity.remove_partial(tmp_path, lambda name: ".orbax-checkpoint-tmp" in name)
    assert removed == [tmp_path / "3.orbax-checkpoint-tmp-17"] and (tmp_path / "2").exists()
    assert integrity.steps_to_delete([2, 4, 6, 8], keep=2) == [2, 4]
    assert integrity.steps_to_delete([2, 4, 6, 8], keep=2, pin_before=5) == [2]  # 4 is the resume point
    assert integrity.steps_to_delete([2, 4, 6, 8], keep=2, pin_before=4) == [4]
    assert integrity.steps_to_delete([2, 4, 6, 8], keep=2, pin_before=2) == [2, 4]


def test_divergence_guard_skips_non_finite_and_spikes_and_round_trips():
    guard = DivergenceGuard(DivergenceConfig(spike_factor=10.0, window=3), limit=2)
    assert guard.limits() == (math.inf, math.inf)  # no spike check until the window is full
    for step, (loss, norm) in enumerate([(1.0, 2.0), (1.2, 2.2), (0.8, 1.8)]):
        assert not guard.is_bad(loss, norm)
        guard.record(step, loss, norm, applied=True)
    assert guard.limits() == pytest.approx((10.0, 20.0))  # 10 x the medians
    assert guard.is_bad(10.5, 1.0) and guard.is_bad(1.0, 25.0) and guard.is_bad(math.nan, 1.0)
    assert not guard.is_bad(9.5, 19.0)
    guard.record(3, 50.0, 1.0, applied=False)
    again = DivergenceGuard(DivergenceConfig(spike_factor=10.0, window=3), limit=2, state=guard.state())
    assert again.state() == guard.state() and again.limits() == guard.limits()
    assert (again.skipped, again.first_bad_step, again.stopped) == (1, 3, False)
    again.record(4, math.inf, 1.0, applied=False)
    again.record(5, math.nan, 1.0, applied=False)
    assert again.stopped and again.first_bad_step == 3
    assert "3 skipped steps" in again.stop_message("x") and "first at step 3" in again.stop_message("x")
    off = DivergenceGuard(DivergenceConfig(), limit=0)
    for step in range(30):
        off.record(step, 1.0, 1.0, applied=True)
    assert off.limits() == (math.inf, math.inf) and not off.is_bad(1e30, 1e30)
