"""Blocking work in threads: named executors sized for their job, and :func:`finish`.

asyncio's default executor (``asyncio.to_thread``) is shared by everything and sized
``min(32, cpus + 4)``: on 2 CPUs, 6 threads. Range transfers block for as long as a
body takes, so on it 8 connections ran 6 at a time, and every small job (a stat, a
lock, a state save) queued behind them. Each kind of work gets its own pool instead:

``transfer``  segment bodies on blocking sockets: one thread per connection
              (``Config.max_connections`` per download × ``max_parallel_blobs``)
``store``     ingest writes (hash + pwritev of a chunk): short, CPU and disk bound
``misc``      everything else (stat, locks, sqlite, index.json): asyncio's default

Threads are created on demand and named ``fetchd-<kind>_N`` (visible in a stack dump
and to the tests that check none is left behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

T = TypeVar("T")
P = ParamSpec("P")

#: most threads of each pool (created only as work arrives)
SIZES = {"transfer": 64, "store": max(4, (os.cpu_count() or 1) * 2)}
_POOLS: dict[str, ThreadPoolExecutor] = {}


def executor(kind: str) -> ThreadPoolExecutor:
    """The process's pool for ``kind`` (``transfer`` or ``store``), made on first use."""
    pool = _POOLS.get(kind)
    if pool is None:
        pool = _POOLS[kind] = ThreadPoolExecutor(SIZES[kind], thread_name_prefix=f"fetchd-{kind}")
    return pool


def run_in(kind: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> asyncio.Future[T]:
    """``fn(*args, **kwargs)`` on the ``kind`` pool, as an asyncio future (await it,
    or hand it to :func:`finish` when it must not be abandoned half-way)."""
    loop = asyncio.get_running_loop()
    return loop.run_in_executor(executor(kind), functools.partial(fn, *args, **kwargs))


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
