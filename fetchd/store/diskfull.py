"""ENOSPC at the store's seam: a full disk becomes one clear :class:`DiskFull`, and a
store this user may only read one clear :class:`StoreReadOnly`.

Every write into a store goes through :func:`writing`, which names what was being
written, so the user reads ``no space left on device while writing layout/index.json in
/var/lib/fetchd; free space or use fetchd gc`` instead of an internal error.
"""

from __future__ import annotations

import contextlib
import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from fetchd.errors import DiskFull, StoreReadOnly

_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
#: sqlite's codes for a full disk: SQLITE_FULL, and SQLITE_IOERR_SHMSIZE (it could not
#: grow the WAL index) — sqlite reports ENOSPC as one of these, never as OSError.
_SQLITE_FULL = frozenset({13, 4874})


def is_full(exc: BaseException) -> bool:
    """``exc`` says the disk (or the user's quota) is full."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) in _SQLITE_FULL
    return False


_DENIED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
_SQLITE_READONLY = 8  # the primary code; extended ones (READONLY_DIRECTORY…) share it


def is_read_only(exc: BaseException) -> bool:
    """``exc`` says this user may not write there (permissions, a read-only mount)."""
    if isinstance(exc, OSError):
        return exc.errno in _DENIED
    if isinstance(exc, sqlite3.Error):
        return (getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF == _SQLITE_READONLY
    return False


@contextlib.contextmanager
def writing(what: str, store: Path) -> Iterator[None]:
    """Translate a full disk, or a store this user may not write, while writing ``what``
    into the store at ``store``."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        if is_full(exc):
            raise DiskFull(what, store) from exc
        if is_read_only(exc):
            reason = "read-only file system" if getattr(exc, "errno", 0) == errno.EROFS else None
            raise StoreReadOnly(what, store, reason or "permission denied") from exc
        raise
