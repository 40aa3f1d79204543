"""Work in threads that must not be abandoned half-way by a cancelled task."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TypeVar

T = TypeVar("T")


async def finish(work: asyncio.Future[T]) -> T:
    """Await ``work`` (a thread's future) to its end even if the awaiting task is
    cancelled meanwhile; then re-raise the cancellation.

    A thread cannot be cancelled: without this, a cancelled caller would go on (clean
    up, retry, close files) while the thread still renames a blob or writes a file.
    """
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        while not work.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({work})
        if not work.cancelled():
            work.exception()  # retrieved: the cancellation is what the caller reports
        raise
