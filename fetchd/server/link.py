"""The cache's link to one upstream: big blobs fetched one after another, in request order.

A cold image through ``fetchd serve`` is every client asking for every layer at once,
and one upstream transfer of each. All at once, the layers share the upstream link and
all end together, at the very end; one after another, each has the whole link, and the
first is done after a quarter of the time (four layers): the clients verify, fsync and
unpack each layer while the next one arrives (containerd and podman apply layers in
order), and the link carries the same bytes in the same time. Measured with
``benchmarks/lan_swarm.py --wan --image`` (8 skopeo clients, 4 × 64 MiB behind a
100 Mbit/s link; the origin's interface sampled every 20 ms): from the origin's last
byte to the last client's exit took 0.84–1.44 s with the layers at once (each skopeo
fsyncs its four layers then: 2 GiB of the 8 clients at once), 0.6–0.8 s with them one
after another; the whole pull, medians of 3 rounds, 24.08 s against 23.59 s.

Rules (:meth:`Link.turn`), for blobs of at least :data:`BIG` bytes (a smaller blob's
transfer is shorter than its requests' round trips: it never waits):

* they start in the order they were asked for, ``parallel`` at a time (``serve
  --upstream-blobs N``; 0: no queue);
* the next one starts early when a running one is about to end (its remaining bytes at
  its rate take less than :data:`OVERLAP` s: the new request's round trips and slow
  start overlap the old one's end), or has moved no byte for :data:`IDLE` s (a stalled
  or slow upstream connection does not hold up the others: the slot is the link's, not
  the transfer's);
* none waits more than :data:`MAX_WAIT` s: a client is waiting for its first byte
  (``FLIGHT_START_TIMEOUT``), and an upstream that serves each connection slowly is
  then used by several at once.

Only the order and the overlap are decided here; the transfers are the engine's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

#: blobs smaller than this never wait for the link
BIG = 16 << 20
#: seconds before a running transfer's expected end at which the next one starts
OVERLAP = 0.5
#: seconds without a byte after which a running transfer no longer holds the link
IDLE = 1.0
#: the most seconds a blob waits for the link
MAX_WAIT = 20.0
#: seconds over which a running transfer's rate is measured before its end is predicted
RATE_AFTER = 0.5
#: seconds between looks at the running transfers while a blob waits
LOOK = 0.1


@dataclass(eq=False)
class _Running:
    size: int
    placed: Callable[[], int]  # bytes of the blob on disk now
    since: float  # loop time it started
    seen: int = 0  # bytes at the last look ...
    moved: float = field(init=False)  # ... and when they last changed
    first: tuple[float, int] | None = field(default=None)  # the first look that saw bytes
    released: bool = False  # it let the next one start: it no longer counts

    def __post_init__(self) -> None:
        self.moved = self.since

    def releases(self, now: float) -> bool:
        """Whether this transfer gives its slot up now (about to end, or idle)."""
        placed = self.placed()
        if placed != self.seen:
            self.seen, self.moved = placed, now
        if placed and self.first is None:
            self.first = (now, placed)
        if now - self.moved >= IDLE:
            return True
        if self.first is None or now - self.first[0] < RATE_AFTER:
            return False
        rate = (placed - self.first[1]) / (now - self.first[0])
        return rate > 0 and (self.size - placed) / rate <= OVERLAP


class Link:
    """One upstream's queue for big blobs (see the module docstring). On the loop only."""

    def __init__(self, parallel: int = 1) -> None:
        self.parallel = parallel
        self._running: list[_Running] = []
        self._turns = asyncio.Lock()  # asyncio's locks are FIFO: the queue's order
        self._ended = asyncio.Event()

    @property
    def running(self) -> int:
        return len(self._running)

    @contextlib.asynccontextmanager
    async def turn(self, size: int, placed: Callable[[], int]) -> AsyncIterator[None]:
        """Wait for this blob's turn on the link, then hold it while the body runs.
        ``placed()``: the blob's bytes on disk so far (how fast it moves)."""
        if self.parallel <= 0 or size < BIG:
            yield
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAX_WAIT  # from the request, not from the queue's head
        async with self._turns:
            while self._held(loop.time()) >= self.parallel and loop.time() < deadline:
                self._ended.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(LOOK, max(0.0, deadline - loop.time()))):
                        await self._ended.wait()
            entry = _Running(size, placed, loop.time())
            self._running.append(entry)
        try:
            yield
        finally:
            self._running.remove(entry)
            self._ended.set()

    def _held(self, now: float) -> int:
        """How many running transfers hold the link now."""
        held = 0
        for r in self._running:
            if not r.released and r.releases(now):
                r.released = True
            held += not r.released
        return held
