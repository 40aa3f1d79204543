"""Progress of transfers: events from the engine, bars on a terminal.

The engine reports through :class:`Progress` (cheap, synchronous calls from the event
loop). :class:`TerminalBars` redraws per-blob and total bars on stderr a few times a
second when stderr is a terminal; otherwise nothing is drawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Transfer:
    label: str
    total: int
    done: int = 0
    resumed: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: bool = False
    connections: int = 0


#: Finished transfers kept by name (for the bars); older ones are only counted in
#: ``earlier``, so a 5,000-layer pull or a server's long life holds a bounded number.
KEEP_FINISHED = 32
#: Bars drawn at most (running ones first), besides the total.
MAX_BARS = 12


class Progress:
    """What is being transferred. Not thread-safe: call from the event loop.

    ``transfers`` holds the running ones and the last KEEP_FINISHED finished ones;
    ``earlier`` sums the finished ones no longer listed (``earlier_count`` of them)."""

    def __init__(self) -> None:
        self.transfers: dict[str, Transfer] = {}
        self.earlier = Transfer("earlier", 0, finished=True)
        self.earlier_count = 0

    def start(self, key: str, label: str, total: int, resumed: int = 0) -> None:
        self.transfers.pop(key, None)  # a retry of the same blob: listed once, at the end
        self.transfers[key] = Transfer(label, total, resumed, resumed)
        self._fold()

    def resize(self, key: str, total: int) -> None:
        """The size became known (a URL's first answer)."""
        t = self.transfers.get(key)
        if t:
            t.total = total

    def advance(self, key: str, n: int) -> None:
        t = self.transfers.get(key)
        if t:
            t.done += n

    def connections(self, key: str, n: int) -> None:
        t = self.transfers.get(key)
        if t:
            t.connections = n

    def finish(self, key: str) -> None:
        t = self.transfers.get(key)
        if t:
            t.done = t.total
            t.finished = True
            self._fold()

    def drop(self, key: str) -> None:
        """The transfer failed: no bar for it; the bytes it moved still count."""
        t = self.transfers.pop(key, None)
        if t:
            t.total = t.done
            self._count(t)

    def _fold(self) -> None:
        # O(len(transfers)), which is bounded: running ones + KEEP_FINISHED + 1.
        finished = [k for k, t in self.transfers.items() if t.finished]
        for k in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            self._count(self.transfers.pop(k))

    def _count(self, t: Transfer) -> None:
        self.earlier.total += t.total
        self.earlier.done += t.done
        self.earlier.resumed += t.resumed
        self.earlier_count += 1


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n:.0f} B"
        n /= 1024
    return f"{n:.1f} GiB"


def _bar(done: int, total: int, width: int = 24) -> str:
    frac = 1.0 if total <= 0 else min(1.0, done / total)
    full = int(frac * width)
    return "[" + "#" * full + "." * (width - full) + "]"


def _line(label: str, done: int, total: int, rate: float | None) -> str:
    """One bar; ``rate`` None means finished."""
    if rate is None:
        tail = "done"
    else:
        tail = f"{_size(rate)}/s"
        if rate > 0 and total > done:
            tail += f" ETA {int((total - done) / rate)}s"
    return f"{label:<22} {_bar(done, total)} {_size(done):>10} / {_size(total):<10} {tail}"


class TerminalBars:
    """Draws :class:`Progress` on a terminal; use :meth:`running` around the work."""

    def __init__(self, progress: Progress, out: TextIO = sys.stderr, hz: float = 8.0) -> None:
        self.progress = progress
        self.out = out
        self.interval = 1.0 / hz
        self._lines = 0
        self._start = time.monotonic()

    def render(self) -> list[str]:
        """At most MAX_BARS bars (running transfers first, in the order they started),
        and a total over every transfer, listed or not."""
        now = time.monotonic()
        lines = []
        listed = list(self.progress.transfers.values())
        running = [t for t in listed if not t.finished]
        shown = set(map(id, running[:MAX_BARS]))
        for t in reversed(listed):
            if len(shown) >= MAX_BARS:
                break
            shown.add(id(t))
        earlier = self.progress.earlier
        total, done, fresh = earlier.total, earlier.done, earlier.done - earlier.resumed
        for t in listed:
            total += t.total
            done += t.done
            fresh += t.done - t.resumed
            if id(t) not in shown:
                continue
            rate = (t.done - t.resumed) / max(now - t.started, 1e-3)
            label = f"{t.label} ×{t.connections}" if t.connections > 1 else t.label
            lines.append(_line(label, t.done, t.total, None if t.finished else rate))
        if len(listed) + self.progress.earlier_count > 1:
            lines.append(_line("total", done, total, fresh / max(now - self._start, 1e-3)))
        return lines

    def draw(self) -> None:
        lines = self.render()
        buf = []
        if self._lines:
            buf.append(f"\x1b[{self._lines}F")
        for line in lines:
            buf.append("\x1b[2K" + line + "\n")
        self.out.write("".join(buf))
        self.out.flush()
        self._lines = len(lines)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async def loop() -> None:
            while True:
                self.draw()
                await asyncio.sleep(self.interval)

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.draw()
