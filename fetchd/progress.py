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


class Progress:
    """What is being transferred. Not thread-safe: call from the event loop."""

    def __init__(self) -> None:
        self.transfers: dict[str, Transfer] = {}

    def start(self, key: str, label: str, total: int, resumed: int = 0) -> None:
        self.transfers[key] = Transfer(label, total, resumed, resumed)

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
        now = time.monotonic()
        lines = []
        total = done = fresh = 0
        for t in self.progress.transfers.values():
            rate = (t.done - t.resumed) / max(now - t.started, 1e-3)
            label = f"{t.label} ×{t.connections}" if t.connections > 1 else t.label
            lines.append(_line(label, t.done, t.total, None if t.finished else rate))
            total += t.total
            done += t.done
            fresh += t.done - t.resumed
        if len(lines) > 1:
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
