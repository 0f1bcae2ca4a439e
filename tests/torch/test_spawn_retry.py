"""The multi-process test helper retries a rank killed by a signal once, and never a failing assertion."""

import os
import signal

import pytest
import torch.multiprocessing as mp


def _abort_first_time(rank, marker):
    if rank == 0 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGABRT)


def _fail(rank):
    assert rank < 0, "a real failure"


def test_signal_death_is_retried_once(tmp_path, spawn_ranks):
    marker = str(tmp_path / "aborted")
    spawn_ranks(_abort_first_time, (marker,), 1)
    assert os.path.exists(marker)


def test_python_failure_is_not_retried(spawn_ranks):
    with pytest.raises(mp.ProcessRaisedException, match="a real failure"):
        spawn_ranks(_fail, (), 1)
