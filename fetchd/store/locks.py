"""Advisory file locks shared by every fetchd process on one store.

``flock`` locks belong to an open file description, so they are released when the
holder exits — even by kill -9 — and a crashed pull never leaves a store locked.

The protocol that makes a lock file safe to delete (an ingest's, a lease's): **only
the holder unlinks a lock file**, and a taker checks, once it holds the lock, that the
file it locked is still the one at the path (:func:`_take`). A lock on an unlinked
inode protects nothing, so the taker then tries again with the new file. A directory
holding a lock file is removed with ``rmdir`` only (it fails while anyone's lock file
is in it), never with ``rmtree``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from fetchd.errors import StoreError
from fetchd.store.diskfull import writing

_POLL = 0.05
#: Each retry means another process removed the lock (or its directory) just then, so
#: this bound is only reached by a bug; it keeps a loop from spinning forever.
_RETRIES = 1000


def _open(path: Path) -> int:
    """Open (creating) the lock file and its directory, which another process may be
    removing at this moment (its holder finished): then create them again."""
    for _ in range(_RETRIES):
        try:
            # (pathlib's exist_ok re-checks with is_dir() after EEXIST: a directory
            # removed in between raises FileExistsError)
            with writing(f"the lock {path.name}", path.parent):  # a read-only store: one line
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except (FileNotFoundError, FileExistsError):
            continue  # the directory went between mkdir and open
        else:
            # 0600, and an older 0644 one tightened: flock needs only a descriptor, so
            # another local user who could open it read-only could hold it and stall
            # every pull of the store (only its writers may lock it).
            with contextlib.suppress(OSError):
                if os.fstat(fd).st_mode & 0o077:
                    os.fchmod(fd, 0o600)
            return fd
    raise StoreError(f"cannot create the lock {path}: its directory keeps vanishing")


def _current(path: Path, fd: int) -> bool:
    """The locked ``fd`` is still the file at ``path`` (its holder did not unlink it)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _take(path: Path, flags: int) -> int | None:
    """The fd of ``path`` locked with ``flags``; None if LOCK_NB and someone holds it."""
    for _ in range(_RETRIES):
        fd = _open(path)
        try:
            fcntl.flock(fd, flags)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if _current(path, fd):
            return fd
        os.close(fd)
    raise StoreError(f"cannot lock {path}: it keeps being replaced")


@contextlib.contextmanager
def locked(path: Path, *, shared: bool = False) -> Iterator[None]:
    """Hold a lock on ``path`` (blocking; exclusive unless ``shared``). For short
    critical sections only."""
    fd = _take(path, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
    assert fd is not None
    try:
        yield
    finally:
        os.close(fd)  # closing the description releases the lock


@contextlib.contextmanager
def try_locked(path: Path) -> Iterator[bool]:
    """Hold the exclusive lock on ``path`` if nobody else does: yields whether we got it."""
    fd = _take(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        yield fd is not None
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.asynccontextmanager
async def alocked(path: Path) -> AsyncIterator[int]:
    """Hold an exclusive lock on ``path`` without blocking the event loop.

    Waits as long as another process holds it (that process is making progress or
    will die, which releases the lock); cancellable at every poll. Yields the fd.
    """
    while True:
        # On the loop: a few non-blocking syscalls, and a cancellation cannot strand a
        # locked fd in a thread.
        fd = _take(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is not None:
            break
        await asyncio.sleep(_POLL)
    try:
        yield fd
    finally:
        os.close(fd)


def remove_locked_dir(directory: Path, lock: Path) -> None:
    """Remove ``directory`` whose ``lock`` (inside it) the caller holds: every other
    entry, then the lock file, then the directory itself if nobody created a new lock
    in it meanwhile (a waiter that did then takes the new file's lock)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name != lock.name:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(lock)
    with contextlib.suppress(OSError):  # not empty: someone's new lock is in it
        os.rmdir(directory)
