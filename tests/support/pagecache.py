"""Which pages of a file are in the page cache: mincore(2) on a mapping of it.

Mapping a file does not read it, and mincore only reports, so looking changes nothing.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_libc.mincore.restype = ctypes.c_int


def resident_pages(path: Path, start: int, end: int) -> int:
    """How many of the pages holding bytes ``[start, end)`` of ``path`` are cached."""
    page = mmap.PAGESIZE
    first, last = start // page, (end + page - 1) // page
    fd = os.open(path, os.O_RDWR)  # writable: mincore reports file pages to a writer
    try:
        with mmap.mmap(fd, (last - first) * page, offset=first * page) as mapped:
            # (the temporary c_char's export of the buffer ends with this statement)
            address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
            vec = (ctypes.c_ubyte * (last - first))()
            if _libc.mincore(address, (last - first) * page, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            return sum(b & 1 for b in vec)
    finally:
        os.close(fd)
