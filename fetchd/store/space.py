"""Free space: the bound on every size a peer states for a blob.

A descriptor, a ``Content-Range`` or a ``Content-Length`` may claim any size (the OCI
spec allows int64, JSON any integer). Nothing is planned or allocated for such a size
before :func:`ensure_room` accepted it: a blob that cannot fit on the store's disk
(its free space, minus a small reserve so the store stays writable) is refused at once,
with the sizes in the message, instead of failing hours later with ``ENOSPC``.
"""

from __future__ import annotations

import os
from pathlib import Path

from fetchd.errors import NotEnoughSpace, StoreError

#: kept free so index.json, the metadata database and state files can still be written
RESERVE = 64 << 20

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human(n: int) -> str:
    """``4.0 EiB``, ``12 GiB``, ``512 B``: a size for a message."""
    value = float(n)
    for unit in _UNITS:
        if value < 1024 or unit == _UNITS[-1]:
            break
        value /= 1024
    if unit == "B":
        return f"{n} B"
    return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"


def free_bytes(directory: Path) -> int:
    """What an unprivileged writer may still put on the filesystem of ``directory``."""
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        raise StoreError(f"cannot read the free space of {directory}: {exc.strerror}") from exc
    return st.f_bavail * st.f_frsize


def room(directory: Path) -> int:
    """The bytes a blob may still take on the disk of ``directory``: free minus RESERVE."""
    return max(0, free_bytes(directory) - RESERVE)


def no_room(what: str, free: int, store: Path) -> NotEnoughSpace:
    """The error for ``what`` ("X is 4.0 EiB", "X runs on") past ``free`` bytes."""
    return NotEnoughSpace(
        f"{what}, more than the {human(free)} free in {store}; "
        "free space there or pull into a store on a bigger disk (--store)"
    )


def ensure_room(directory: Path, need: int, what: str, store: Path) -> None:
    """Raise :class:`NotEnoughSpace` if ``need`` more bytes for ``what`` cannot fit on the
    disk of ``directory`` (the ingests of the store at ``store``)."""
    if need <= 0:
        return
    free = room(directory)
    if need > free:
        raise no_room(f"{what} is {human(need)}", free, store)
