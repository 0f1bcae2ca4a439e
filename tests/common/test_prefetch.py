"""The trainers' background batch preparation: the same items in order, errors where they belong, no thread left."""

import threading
import time

import pytest

from contentv_common.prefetch import Prefetcher


def test_items_come_in_order_prepared_ahead_and_the_thread_stops():
    prepared = []

    def prepare(i):
        prepared.append(i)
        return i * i

    with Prefetcher(iter(range(100)), prepare, depth=3) as items:
        assert [next(items) for _ in range(5)] == [0, 1, 4, 9, 16]
        deadline = time.monotonic() + 5
        while len(prepared) < 8 and time.monotonic() < deadline:  # the thread runs ahead of the consumer
            time.sleep(0.01)
        assert 8 <= len(prepared) <= 9  # 5 taken + 3 queued (+ 1 being put)
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
    assert list(Prefetcher(iter(range(4)), str)) == ["0", "1", "2", "3"]


def test_an_error_in_the_thread_is_raised_by_next_in_order():
    def prepare(i):
        if i == 2:
            raise ValueError("bad sample 2")
        return i

    with Prefetcher(iter(range(5)), prepare) as items:
        assert next(items) == 0 and next(items) == 1
        for _ in range(2):  # and again: the error does not turn into a hang
            with pytest.raises(ValueError, match="bad sample 2"):
                next(items)
