"""Prepare the next training batches in a background thread while the accelerator computes (both trainers).

The thread takes items from the source in order and runs `prepare` on them (reading the cache, drawing the step's
noise, putting the arrays on the devices), at most `depth` items ahead; the loop takes them in the same order, so a
run sees exactly the batches it saw without prefetching. An error in the thread is raised by the `next()` that would
have returned that item. Leaving the `with` block stops the thread (it is a daemon: it never keeps a process alive).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher(Generic[T]):
    """An iterator over `prepare(item)` for the items of `source`, computed `depth` items ahead in a thread."""

    def __init__(self, source: Iterator[Any], prepare: Callable[[Any], T], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source, prepare), daemon=True, name="prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, source: Iterator[Any], prepare: Callable[[Any], T]) -> None:
        try:
            for item in source:
                if not self._put(prepare(item)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            self._put(_Failed(e))
            return
        self._put(_Failed(StopIteration()))

    def __iter__(self) -> Prefetcher[T]:
        return self

    def __next__(self) -> T:
        item = self._queue.get()
        if isinstance(item, _Failed):
            self._put(item)  # every later next() raises the same
            raise item.error
        return item

    def close(self) -> None:
        """Stop the thread and wait for it to finish the item it is preparing."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> Prefetcher[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
