"""A lock that counts how often it was held: put in place of a sink's ``write_lock``, it
shows whether every write into the sink's file took it."""

from __future__ import annotations

import threading


class CountingLock:
    """A ``threading.Lock`` as a context manager that counts its entries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.entries = 0

    def __enter__(self) -> None:
        self._lock.acquire()
        self.entries += 1

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
