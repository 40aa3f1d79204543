"""Progress of transfers: events from the engine, bars on a terminal.

The engine reports through :class:`Progress` (cheap, synchronous calls from the event
loop). :class:`TerminalBars` redraws per-blob and total bars on stderr a few times a
second when stderr is a terminal; otherwise nothing is drawn.

Each row says which image it is for and what it is (``busybox:1.36 layer 3f2a…``, …
``config``, … ``manifest``): the image is the one :data:`current_image` names in the
task that started the transfer (the CLI sets it per REF; tasks inherit it). A blob two
pulls share moves once and is counted for the image whose pull started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TextIO

#: The image (as the user named it) the transfers started in this task are for.
current_image: contextvars.ContextVar[str] = contextvars.ContextVar("current_image", default="")

#: Config media types (OCI, Docker); any other blob of an image is a layer.
_CONFIG_TYPES = frozenset(
    {"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"}
)


def blob_kind(media_type: str) -> str:
    """``config`` or ``layer``: what a progress row calls a blob of an image."""
    return "config" if media_type in _CONFIG_TYPES else "layer"


@dataclass
class Transfer:
    label: str
    total: int
    done: int = 0
    resumed: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: bool = False
    connections: int = 0
    image: str = ""


#: Finished transfers kept by name (for the bars); older ones are only counted in
#: ``earlier``, so a 5,000-layer pull or a server's long life holds a bounded number.
KEEP_FINISHED = 32
#: Bars drawn at most (running ones first), besides the total.
MAX_BARS = 12
#: The widest label column (image, kind, digest): the bars stay on an 80-column line
#: up to about 40.
LABEL_WIDTH = 48


class Progress:
    """What is being transferred. Not thread-safe: call from the event loop.

    ``transfers`` holds the running ones and the last KEEP_FINISHED finished ones;
    ``earlier`` sums the finished ones no longer listed (``earlier_count`` of them)."""

    def __init__(self, count_images: bool = False) -> None:
        self.transfers: dict[str, Transfer] = {}
        self.earlier = Transfer("earlier", 0, finished=True)
        self.earlier_count = 0
        #: bytes received per image (:data:`current_image`), kept only with
        #: ``count_images`` (the CLI's one run; a server's images are unbounded)
        self.count_images = count_images
        self.received: dict[str, int] = {}

    def start(self, key: str, label: str, total: int, resumed: int = 0, kind: str = "") -> None:
        """A transfer of ``total`` bytes (``resumed`` of them already there); ``kind``
        (layer, config, …) and the current image go before ``label`` in its row."""
        image = current_image.get()
        name = "" if label and label in image else _short_name(image)  # a URL's own row
        label = " ".join(p for p in (name, kind, label) if p)
        self.transfers.pop(key, None)  # a retry of the same blob: listed once, at the end
        self.transfers[key] = Transfer(label, total, resumed, resumed, image=image)
        self._fold()

    def fetched(self, label: str, size: int, kind: str = "manifest") -> None:
        """Something small that came whole (a manifest): a finished row, and its bytes."""
        key = f"{kind}:{current_image.get()}:{label}"
        self.start(key, label, size, kind=kind)
        self.advance(key, size)
        self.finish(key)

    def received_for(self, image: str) -> int:
        """Bytes received for ``image`` so far (``count_images`` only)."""
        return self.received.get(image, 0)

    def resize(self, key: str, total: int) -> None:
        """The size became known (a URL's first answer)."""
        t = self.transfers.get(key)
        if t:
            t.total = total

    def advance(self, key: str, n: int) -> None:
        t = self.transfers.get(key)
        if t:
            t.done += n
            if self.count_images:
                self.received[t.image] = self.received.get(t.image, 0) + n

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


def _short_name(image: str) -> str:
    """The last path part of an image's name (``docker://r:5000/lib/busybox:1`` →
    ``busybox:1``), or of a URL; at most 24 characters."""
    name = image.split("://", 1)[-1].rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
    return name if len(name) <= 24 else name[:11] + "…" + name[-12:]


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


def _line(label: str, done: int, total: int, rate: float | None, width: int = 22) -> str:
    """One bar; ``rate`` None means finished; ``label`` padded to ``width``."""
    if rate is None:
        tail = "done"
    else:
        tail = f"{_size(rate)}/s"
        if rate > 0 and total > done:
            tail += f" ETA {int((total - done) / rate)}s"
    return f"{label:<{width}} {_bar(done, total)} {_size(done):>10} / {_size(total):<10} {tail}"


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
        rows: list[tuple[str, Transfer, float | None]] = []
        for t in listed:
            total += t.total
            done += t.done
            fresh += t.done - t.resumed
            if id(t) not in shown:
                continue
            rate = (t.done - t.resumed) / max(now - t.started, 1e-3)
            label = f"{t.label} ×{t.connections}" if t.connections > 1 else t.label
            rows.append((label, t, None if t.finished else rate))
        width = min(LABEL_WIDTH, max([22, *(len(label) for label, _, _ in rows)]))
        for label, t, row_rate in rows:
            lines.append(_line(label[:width], t.done, t.total, row_rate, width))
        if len(listed) + self.progress.earlier_count > 1:
            rate = fresh / max(now - self._start, 1e-3)
            lines.append(_line("total", done, total, rate, width))
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
