"""fetchd.server.link: the rules by which serve lets big blobs onto an upstream link.

The serve tests (test_serve.py) show the order with real clients and a real registry;
these check each rule on its own, on an event loop, with the bytes a transfer "placed"
driven by the test (the Link only ever reads that number). Times are shortened with
monkeypatch; every wait is bounded by asyncio.timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from fetchd.server import link
from fetchd.server.link import BIG, Link

BOUND = 10.0  # seconds any step of these tests may take at most


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link, "LOOK", 0.01)
    monkeypatch.setattr(link, "IDLE", 0.3)
    monkeypatch.setattr(link, "RATE_AFTER", 0.1)
    monkeypatch.setattr(link, "OVERLAP", 0.2)
    monkeypatch.setattr(link, "MAX_WAIT", 5.0)


class Transfer:
    """A blob on the link: ``placed`` bytes so far, moved by the test or by ``flow``."""

    def __init__(self, name: str, size: int = 100 * BIG) -> None:
        self.name, self.size, self.placed = name, size, 0
        self.entered = asyncio.Event()
        self.leave = asyncio.Event()

    def bytes(self) -> int:
        return self.placed

    async def hold(self, on: Link, order: list[str]) -> None:
        async with on.turn(self.size, self.bytes):
            order.append(self.name)
            self.entered.set()
            async with asyncio.timeout(BOUND):
                await self.leave.wait()


@contextlib.asynccontextmanager
async def flowing(t: Transfer, per_second: float) -> AsyncIterator[None]:
    """Move ``t`` at ``per_second`` bytes a second (in steps of 10 ms) while inside."""

    async def flow() -> None:
        while True:
            await asyncio.sleep(0.01)
            t.placed = min(t.size, t.placed + int(per_second / 100))

    task = asyncio.create_task(flow())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(4 * BOUND):
            await test()

    asyncio.run(bounded())


async def settle(seconds: float) -> None:
    """Let the link look a few times (what is checked after is a state, not a timing)."""
    await asyncio.sleep(seconds)


def test_big_blobs_take_turns_in_the_order_asked() -> None:
    async def test() -> None:
        on, order = Link(1), []
        a, b, c = Transfer("a"), Transfer("b"), Transfer("c")
        tasks = [asyncio.create_task(t.hold(on, order)) for t in (a, b, c)]
        # moving, far from their ends: each keeps the link until it leaves
        async with flowing(a, BIG), flowing(b, BIG):
            await a.entered.wait()
            await settle(0.2)
            assert order == ["a"]
            a.leave.set()
            await b.entered.wait()
            await settle(0.2)
            assert order == ["a", "b"]  # one at a time: c still waits for b
            b.leave.set()
        await c.entered.wait()
        c.leave.set()
        await asyncio.gather(*tasks)
        assert order == ["a", "b", "c"]
        assert on.running == 0

    run(test)


def test_a_small_blob_never_waits_and_zero_means_no_queue() -> None:
    async def test() -> None:
        for on, small in ((Link(1), True), (Link(0), False)):
            order: list[str] = []
            a = Transfer("a")
            b = Transfer("b", BIG - 1 if small else BIG)
            tasks = [asyncio.create_task(t.hold(on, order)) for t in (a, b)]
            async with flowing(a, BIG):
                await a.entered.wait()
                await b.entered.wait()  # at once, though a holds the link and moves
            a.leave.set()
            b.leave.set()
            await asyncio.gather(*tasks)

    run(test)


def test_an_idle_transfer_lets_the_next_one_start() -> None:
    async def test() -> None:
        on, order = Link(1), []
        a, b, c = Transfer("a"), Transfer("b"), Transfer("c")
        tasks = [asyncio.create_task(t.hold(on, order)) for t in (a, b, c)]
        await a.entered.wait()
        a.placed = 1000  # a byte or two, then nothing
        async with flowing(b, BIG):
            await b.entered.wait()  # after IDLE without a byte from a
            await settle(0.2)
            assert order == ["a", "b"]  # a gave its slot up once: c waits for b
            b.leave.set()
            await c.entered.wait()
        a.leave.set()
        c.leave.set()
        await asyncio.gather(*tasks)

    run(test)


def test_the_next_one_starts_as_the_running_one_nears_its_end() -> None:
    async def test() -> None:
        on, order = Link(1), []
        a, b = Transfer("a", 2 * BIG), Transfer("b")
        tasks = [asyncio.create_task(t.hold(on, order)) for t in (a, b)]
        async with flowing(a, BIG):  # 2 s for the whole of a
            await a.entered.wait()
            await b.entered.wait()
            # b began before a's last bytes, and no earlier than OVERLAP (+ a look)
            # of a's rate before its end
            assert a.placed < a.size
            assert a.size - a.placed <= BIG * (link.OVERLAP + 0.1)
        a.leave.set()
        b.leave.set()
        await asyncio.gather(*tasks)

    run(test)


def test_no_blob_waits_longer_than_max_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link, "MAX_WAIT", 0.5)

    async def test() -> None:
        on, order = Link(1), []
        a, b, c = Transfer("a"), Transfer("b"), Transfer("c")
        ta = asyncio.create_task(a.hold(on, order))
        # a and b move and are far from their ends: neither ever lets go
        async with flowing(a, BIG), flowing(b, BIG):
            await a.entered.wait()
            loop = asyncio.get_running_loop()
            start = loop.time()
            tb, tc = (asyncio.create_task(t.hold(on, order)) for t in (b, c))
            await b.entered.wait()
            assert loop.time() - start >= 0.5 - 0.05
            # c asked with b: it waits 0.5 s from then too, not 0.5 s after b's turn
            await c.entered.wait()
            assert loop.time() - start < 0.9, loop.time() - start
            assert order == ["a", "b", "c"]
        for t in (a, b, c):
            t.leave.set()
        await asyncio.gather(ta, tb, tc)

    run(test)


def test_a_cancelled_wait_leaves_the_queue() -> None:
    async def test() -> None:
        on, order = Link(1), []
        a, b, c = Transfer("a"), Transfer("b"), Transfer("c")
        ta = asyncio.create_task(a.hold(on, order))
        async with flowing(a, BIG):
            await a.entered.wait()
            tb = asyncio.create_task(b.hold(on, order))
            tc = asyncio.create_task(c.hold(on, order))
            await settle(0.1)
            tb.cancel()  # a client gone, a server stopping
            with contextlib.suppress(asyncio.CancelledError):
                await tb
            a.leave.set()
            await c.entered.wait()
        c.leave.set()
        await asyncio.gather(ta, tc)
        assert order == ["a", "c"]
        assert on.running == 0

    run(test)
