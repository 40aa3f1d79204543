"""Advisory file locks shared by every fetchd process on one store.

``flock`` locks belong to an open file description, so they are released when the
holder exits — even by kill -9 — and a crashed pull never leaves a store locked.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

_POLL = 0.05


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (blocking). For short critical sections only."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the description releases the lock


@contextlib.asynccontextmanager
async def alocked(path: Path) -> AsyncIterator[int]:
    """Hold an exclusive lock on ``path`` without blocking the event loop.

    Waits as long as another process holds it (that process is making progress or
    will die, which releases the lock); cancellable at every poll. Yields the fd.
    """
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            await asyncio.sleep(_POLL)
            continue
        except BaseException:
            os.close(fd)
            raise
        # The holder before us may have removed the lock file (an ingest it finished):
        # a lock on an unlinked inode protects nothing, so take the new file's.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield fd
    finally:
        os.close(fd)


def is_locked(path: Path) -> bool:
    """True if some process holds the lock on ``path`` right now."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
