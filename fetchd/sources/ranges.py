"""Segmented HTTP(S) downloads into one ingest: an aria2-class engine for one blob.

One blob comes from one or more sources (URLs, or a registry's blob endpoint) that
serve the same bytes. The first request (the probe) asks for the first segment with
``Range``; its answer tells whether ranges work, the size and the validators (ETag,
Last-Modified), and its body is the first segment. Then:

* the missing byte ranges are cut into segments of ``SEGMENT`` bytes, handed out in
  order, so the ingest's hash follower can keep up with the front; they are cut as
  connections ask for them, so what a download holds is bounded by its connections
  and gaps, not by the size a server claims (which :func:`ensure_room` checked first);
* connections are added while they raise throughput (up to ``max_connections``);
* a connection that runs out of segments takes half of the largest remaining one
  (work stealing), so the tail does not wait for one slow connection;
* each connection retries with backoff and jitter, honouring ``Retry-After``; a
  stalled connection (no byte for ``stall_timeout``) or one far slower than its peers
  is cut and its segment goes back to the queue;
* which ranges are on disk is saved every few seconds and on exit (the ingest's
  state), with the validators: a later run resumes only while they still match;
* a server that ignores ``Range`` (200) or answers a wrong ``Content-Range`` gets one
  plain stream instead.

Who verifies: the ingest (its commit), always. This module only places bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import re
import socket
import ssl
import statistics
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn, Protocol
from urllib.parse import urlsplit

from fetchd.config import Config
from fetchd.errors import (
    BlobNotFound,
    FetchdError,
    SizeMismatch,
    SourceError,
    TransferFailed,
    unwrap,
)
from fetchd.sources.http import (
    USER_AGENT,
    backoff,
    cache_max_age,
    pump,
    retry_after,
    retryable,
    ssl_context,
    translate,
)
from fetchd.store.cas import WRITE_CHUNK, SegmentedIngest, pwrite_all
from fetchd.store.space import ensure_room, no_room, room
from fetchd.threads import finish

log = logging.getLogger(__name__)

SEGMENT = 8 << 20
MIN_SPLIT = 1 << 20
STATE_INTERVAL = 2.0
CONTROL_INTERVAL = 0.25
INITIAL_CONNECTIONS = 2
SLOW_FOR = 2.0  # seconds a connection may lag far behind its peers before it is cut
# ASCII digits, at most 19 (int64): "\d" takes any Unicode digit, and int() of a
# 5000-digit position raises ValueError; \Z, as "$" also matches before a newline
_CONTENT_RANGE = re.compile(r"^bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)\Z")

if TYPE_CHECKING:
    import aiohttp

Opener = Callable[[dict[str, str]], Awaitable["aiohttp.ClientResponse"]]


class Headers(Protocol):
    """Response headers, from aiohttp or http.client (both look names up case-blind)."""

    def get(self, name: str, /) -> str | None: ...


@dataclass
class Source:
    """Where the bytes come from: ``open(headers)`` sends one GET, the caller releases it."""

    label: str
    open: Opener
    threaded: ThreadedRanges | None = None
    failures: int = 0
    not_before: float = 0.0  # Retry-After: no request before this (monotonic)
    dead: bool = False


@dataclass(eq=False)  # identity: segments live in a set while they run
class Segment:
    start: int
    end: int  # exclusive; shrinks when another connection steals the back half
    cursor: int
    started: float = field(default_factory=time.monotonic)
    window_bytes: int = 0
    rate: float = 0.0
    slow_windows: int = 0
    cut: asyncio.Timeout | None = None  # fires to abandon a slow or stalled transfer
    stop: bool = False  # the same, for a transfer in a thread ...
    sock: socket.socket | None = None  # ... whose blocked read interrupt() breaks

    def interrupt(self) -> None:
        """Abandon this transfer: at once on the event loop (``cut``), and in a thread by
        shutting its socket down (a blocked read returns) and raising ``stop``."""
        self.stop = True
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
        if self.cut is not None:
            self.cut.reschedule(asyncio.get_running_loop().time())

    @property
    def remaining(self) -> int:
        return self.end - self.cursor


class _Plan:
    """The segments still to fetch: the gaps, cut into SEGMENT-sized pieces lazily (when
    a connection asks), after any segment given back. Memory is O(gaps + given back),
    never O(size / SEGMENT): a server may claim 2^62 bytes."""

    def __init__(self) -> None:
        self._returned: deque[Segment] = deque()
        self._gaps: deque[tuple[int, int]] = deque()

    def __bool__(self) -> bool:
        return bool(self._returned or self._gaps)

    def clear(self) -> None:
        self._returned.clear()
        self._gaps.clear()

    def add_gap(self, start: int, end: int) -> None:
        if start < end:
            self._gaps.append((start, end))

    def appendleft(self, seg: Segment) -> None:
        """Give ``seg`` back: it is the next one handed out."""
        self._returned.appendleft(seg)

    def popleft(self) -> Segment:
        if self._returned:
            return self._returned.popleft()
        a, b = self._gaps.popleft()
        e = min(b, a + SEGMENT)
        if e < b:
            self._gaps.appendleft((e, b))
        return Segment(a, e, a)


class _Restart(Exception):
    """The content changed under us (validators differ): start over from nothing."""


class _RangeIgnored(Exception):
    """A source answered 200 to a Range request."""


class _Busy(Exception):
    def __init__(self, message: str, delay: float = 0.0) -> None:
        super().__init__(message)
        self.delay = delay


class _NoThreads(Exception):
    """The threaded path cannot serve this source (a redirect): use aiohttp for it."""


class _Short(Exception):
    pass


class SegmentedDownload:
    """Fill ``ingest`` from ``sources`` (see the module docstring). One use only."""

    def __init__(
        self,
        ingest: SegmentedIngest,
        sources: list[Source],
        config: Config,
        on_bytes: Callable[[int], None] = lambda n: None,
        on_connections: Callable[[int], None] = lambda n: None,
    ) -> None:
        if not sources:
            raise ValueError("no sources")
        self.ingest = ingest
        self.sources = sources
        self.config = config
        self.on_bytes = on_bytes
        self.on_connections = on_connections
        self.size: int | None = ingest.size
        self.queue = _Plan()
        self.active: set[Segment] = set()
        self.connections = 0  # transfers running now
        self._next_source = 0
        self._errors: list[FetchdError] = []
        self._saving = False
        self._save_again = False
        self._closing = False  # tells worker threads to stop at their next read
        self._moved = 0  # bytes worker threads wrote and on_bytes has not heard of
        self._moved_lock = threading.Lock()

    # --- entry -------------------------------------------------------------------------

    async def run(self) -> None:
        """Download every missing byte; raises a FetchdError if that cannot be done."""
        for _ in range(2):  # a second time only after the content changed under us
            self.queue.clear()
            self.active.clear()
            self._errors.clear()
            self._closing = False
            try:
                await self._run_once()
                return
            except _Restart:
                log.warning(
                    "%s changed since the partial download; starting over", self.sources[0].label
                )
                await self.ingest.restart()
                self.size = self.ingest.size
        raise TransferFailed(f"{self.sources[0].label}: the content keeps changing")

    async def _run_once(self) -> None:
        known = self.size if self.size is not None else self.ingest.meta.get("size")
        if isinstance(known, int) and known > 0 and not self.ingest.missing(known):
            # Every byte is on disk already (a kill between the last segment and the
            # commit): nothing to ask for. A probe would ask for bytes=SIZE-, whose 416
            # reads as "changed under us" and would throw the whole download away. The
            # engine's commit verifies the bytes against a pinned digest; an unpinned
            # URL keeps the validators its download had, so `update` revalidates it.
            self._set_size(known)
            return
        first = self._first_gap()
        probe = Segment(first, first + SEGMENT, first)
        if self.size is not None:
            probe.end = min(probe.end, self.size)
        resp: aiohttp.ClientResponse | None = None
        held = await self._threaded_probe(probe)
        if held is not None and held.resp.status == 200:
            await self._threaded_single_stream(held)
            return
        if held is not None:
            source = self.sources[0]
        else:
            resp, source = await self._probe(probe)
            if resp is None:
                return  # nothing left to fetch
            if resp.status == 200:
                await self._single_stream(resp)
                return
            if source.threaded is None:
                source.threaded = ThreadedRanges.following(resp, self.config, source.label)
        self._plan(skip=probe)
        self.active.add(probe)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._worker(source, probe, resp, held))
                # Start with a few connections at once (enough for a fast LAN or
                # loopback); _control adds more while they help.
                for _ in range(min(INITIAL_CONNECTIONS, self.config.max_connections) - 1):
                    if self.queue:
                        tg.create_task(self._worker(None, None, None))
                tg.create_task(self._control(tg))
        except BaseExceptionGroup as group:
            if group.subgroup(_Restart):
                raise _Restart() from None
            raise unwrap(group) from None
        finally:
            self._closing = True
            self._report_moved()
            self.on_connections(0)
            await asyncio.to_thread(self.ingest.save_state)
        if self.queue or self.active:
            raise (
                self._errors[-1]
                if self._errors
                else TransferFailed(f"{self.sources[0].label}: every connection failed")
            )

    def _first_gap(self) -> int:
        gaps = self.ingest.missing(self.size if self.size is not None else 1 << 62)
        return gaps[0][0] if gaps else (self.size or 0)

    def _plan(self, skip: Segment) -> None:
        """Queue every gap but the probe's segment ``skip``."""
        assert self.size is not None
        for a, b in self.ingest.missing(self.size):
            a = max(a, skip.end) if a < skip.end and b > skip.start else a
            self.queue.add_gap(a, b)

    # --- the probe -----------------------------------------------------------------------

    async def _threaded_probe(self, seg: Segment) -> _Held | None:
        """The probe on a worker thread, for a source that has one: the common case (a
        206 with a sane Content-Range) without aiohttp. Anything else (no thread for the
        source, an error, another status, a redirect) returns None, and :meth:`_probe`
        asks again on aiohttp, with its retries, redirects and error reports."""
        threaded = self.sources[0].threaded
        if threaded is None:
            return None
        try:
            held = await asyncio.to_thread(threaded.open_range, seg.start, seg.end)
        except _Busy as exc:
            self.sources[0].not_before = time.monotonic() + exc.delay  # _probe waits for it
            log.debug("%s: %s on the threaded probe; asking on aiohttp", threaded.label, exc)
            return None
        except (OSError, http.client.HTTPException) as exc:
            log.debug("%s: threaded probe failed (%s); asking on aiohttp", threaded.label, exc)
            return None
        if held is None:
            return None
        try:
            if held.resp.status == 200:  # Range ignored: this is the one stream
                self._check_validators(held.resp.headers)
                return held
            total = self._content_range(held.resp.headers, seg)
            if total is None:
                held.close()
                return None
            self._check_validators(held.resp.headers)
            self._set_size(total)
        except BaseException:
            held.close()
            raise
        seg.end = min(seg.end, total)
        return held

    async def _threaded_single_stream(self, held: _Held) -> None:
        """:meth:`_single_stream` for the threaded probe's 200: its body, whole, on a
        worker thread."""
        source = self.sources[0]
        assert source.threaded is not None
        try:
            if self.ingest.offset:
                await self.ingest.restart()
                self._check_validators(held.resp.headers)  # the restart cleared them
            length = None if held.resp.chunked else held.resp.length
            if length is not None:
                self._set_size(length)
        except BaseException:
            held.close()
            raise
        # A body of no stated length may go on for ever: at most what the disk can hold.
        budget = await asyncio.to_thread(room, self.ingest.store.ingests)
        seg = Segment(0, length if length is not None else budget + 1, 0)
        self.on_connections(1)
        try:
            await self._threaded(source, source.threaded, seg, held)
            if length is None:
                await self._endless(budget)
        except _Short:
            if length is not None:
                raise SizeMismatch(self.ingest._what, length, seg.cursor) from None
            self._set_size(seg.cursor)  # no length given: the body ended where it ended
        except retryable() as exc:
            raise translate(exc, source.label, self.config) from exc
        finally:
            self._report_moved()
            self.on_connections(0)

    async def _probe(self, seg: Segment) -> tuple[aiohttp.ClientResponse | None, Source]:
        """Send the first request; sets the size and validators; handles 416 and resumes."""
        source = self.sources[0]
        attempt = 0
        while True:
            attempt += 1
            headers = {"Range": f"bytes={seg.start}-{seg.end - 1}"}
            try:
                resp = await self._request(source, headers)
            except retryable(_Busy, SourceError) as exc:
                if attempt >= self.config.attempts or isinstance(exc, BlobNotFound):
                    if len(self.sources) > 1 and source is self.sources[0]:
                        source, attempt = self.sources[1], 0
                        continue
                    raise self._error(exc, source) from exc
                await asyncio.sleep(max(backoff(attempt), source.not_before - time.monotonic()))
                continue
            if resp.status == 416:
                resp.release()
                if self.ingest.offset:
                    raise _Restart()
                m = re.match(r"bytes \*/([0-9]{1,19})\Z", resp.headers.get("Content-Range", ""))
                if m and int(m.group(1)) == 0:
                    self._set_size(0)
                    return None, source
                raise TransferFailed(f"{source.label}: range {headers['Range']} not satisfiable")
            try:
                self._check_validators(resp.headers)
            except _Restart:
                resp.release()
                raise
            if resp.status == 200:
                return resp, source
            total = self._content_range(resp.headers, seg)
            if total is None:
                # a wrong Content-Range: trust nothing but a plain stream
                resp.release()
                return await self._plain(source), source
            self._set_size(total)
            seg.end = min(seg.end, total)
            return resp, source

    async def _plain(self, source: Source) -> aiohttp.ClientResponse:
        resp = await self._request(source, {})
        if resp.status != 200:
            resp.release()
            raise TransferFailed(f"{source.label}: answered HTTP {resp.status} to a plain GET")
        return resp

    def _set_size(self, total: int) -> None:
        if self.size is not None and total != self.size:
            raise SizeMismatch(self.ingest._what, self.size, total)
        if self.size is None:  # a size the server states: bounded before it is planned
            store = self.ingest.store
            need = total - self.ingest.offset
            ensure_room(store.ingests, need, self.sources[0].label, store.root)
        self.size = total
        self.ingest.size = total
        self.ingest.meta["size"] = total

    async def _endless(self, budget: int) -> NoReturn:
        """A body of no stated length ran past ``budget``: drop it (it would fill the
        disk) and fail."""
        await self.ingest.discard()
        raise no_room(f"{self.sources[0].label} runs on", budget, self.ingest.store.root)

    def _check_validators(self, headers: Headers) -> None:
        """Record the validators; raises _Restart if they differ from a resumed ingest's."""
        etag = headers.get("ETag")
        modified = headers.get("Last-Modified")
        meta = self.ingest.meta
        known = (meta.get("etag") or None, meta.get("last_modified") or None)
        if self.ingest.offset and meta and known != (etag, modified):
            raise _Restart()
        meta["etag"], meta["last_modified"] = etag, modified
        meta["max_age"] = cache_max_age(headers.get("Cache-Control"))

    def _content_range(self, headers: Headers, seg: Segment) -> int | None:
        m = _CONTENT_RANGE.match(headers.get("Content-Range") or "")
        if not m or int(m.group(1)) != seg.cursor or m.group(3) == "*":
            return None
        if int(m.group(2)) < seg.cursor:
            return None
        return int(m.group(3))

    # --- one plain stream ----------------------------------------------------------------

    async def _single_stream(self, resp: aiohttp.ClientResponse) -> None:
        """The server ignores Range: take the body whole, from its start."""
        if self.ingest.offset:
            await self.ingest.restart()
            self._check_validators(resp.headers)  # the restart cleared them
        length = resp.content_length
        if length is not None:
            self._set_size(length)
        # A body of no stated length may go on for ever: at most what the disk can hold.
        budget = await asyncio.to_thread(room, self.ingest.store.ingests)
        self.on_connections(1)
        offset = 0

        async def sink(pieces: list[bytes], n: int) -> None:
            nonlocal offset
            if self.size is None and offset + n > budget:
                await self._endless(budget)
            await self.ingest.write_at(offset, pieces)
            offset += n
            self.on_bytes(n)

        async with resp:
            try:
                await pump(resp, sink)
            except retryable() as exc:
                raise translate(exc, self.sources[0].label, self.config) from exc
            finally:
                self.on_connections(0)
        if self.size is None:
            self._set_size(offset)
        elif offset != self.size:
            raise SizeMismatch(self.ingest._what, self.size, offset)

    # --- connections ---------------------------------------------------------------------

    def _pick_source(self) -> Source | None:
        live = [s for s in self.sources if not s.dead]
        if not live:
            return None
        self._next_source += 1
        return live[self._next_source % len(live)]

    def _next_segment(self) -> Segment | None:
        if self.queue:
            seg = self.queue.popleft()
            self.active.add(seg)
            return seg
        # Steal the back half of the largest transfer still running.
        victim = max(self.active, key=lambda s: s.remaining, default=None)
        if victim is None or victim.remaining < 2 * MIN_SPLIT:
            return None
        mid = victim.cursor + victim.remaining // 2
        seg = Segment(mid, victim.end, mid)
        victim.end = mid
        self.active.add(seg)
        return seg

    async def _worker(
        self,
        source: Source | None,
        seg: Segment | None,
        resp: aiohttp.ClientResponse | None,
        held: _Held | None = None,
    ) -> None:
        self.connections += 1
        self.on_connections(self.connections)
        try:
            while True:
                if seg is None:
                    seg = self._next_segment()
                    if seg is None:
                        return
                if source is None or source.dead:
                    source = self._pick_source()
                    if source is None:
                        self._requeue(seg)
                        return
                try:
                    await self._transfer(source, seg, resp, held)
                    source.failures = 0
                    self.active.discard(seg)
                    seg = None
                    await self._save_state()
                except retryable(_Busy, _Short, _RangeIgnored, SourceError) as exc:
                    if seg is not None:
                        self._requeue(seg)
                    seg = None
                    source.failures += 1
                    if isinstance(exc, _RangeIgnored | BlobNotFound) or (
                        source.failures >= self.config.attempts
                    ):
                        source.dead = True
                        self._errors.append(self._error(exc, source))
                        log.info("%s: giving up on this source: %s", source.label, exc)
                        source = None
                        continue
                    delay = max(backoff(source.failures), source.not_before - time.monotonic())
                    await asyncio.sleep(delay)
                finally:
                    resp = held = None
        finally:
            if held is not None:
                held.close()  # never used (no source left)
            self.connections -= 1
            self.on_connections(self.connections)

    async def _save_state(self) -> None:
        """Record the ranges on disk: after each segment, so a kill -9 loses at most the
        segments in flight. Saves do not queue up: one at a time, the latest wins."""
        if self._saving:
            self._save_again = True
            return
        self._saving = True
        try:
            self._save_again = True
            while self._save_again:
                self._save_again = False
                await asyncio.to_thread(self.ingest.save_state)
        finally:
            self._saving = False

    def _requeue(self, seg: Segment) -> None:
        self.active.discard(seg)
        if seg.remaining > 0:
            self.queue.appendleft(Segment(seg.cursor, seg.end, seg.cursor))

    async def _request(self, source: Source, headers: dict[str, str]) -> aiohttp.ClientResponse:
        wait = source.not_before - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        resp = await source.open(headers)
        if resp.status in (429, 502, 503, 504):
            delay = retry_after(resp.headers, 1.0)
            resp.release()
            if delay > self.config.max_retry_after:
                raise TransferFailed(
                    f"{source.label}: HTTP {resp.status}, retry after {delay:.0f} s; try later"
                )
            source.not_before = time.monotonic() + delay
            raise _Busy(f"HTTP {resp.status}")
        if resp.status == 404:
            resp.release()
            raise BlobNotFound(f"{source.label}: not found (HTTP 404)")
        if resp.status not in (200, 206, 416):
            resp.release()
            raise TransferFailed(f"{source.label}: HTTP {resp.status}")
        return resp

    async def _transfer(
        self,
        source: Source,
        seg: Segment,
        resp: aiohttp.ClientResponse | None,
        held: _Held | None = None,
    ) -> None:
        if resp is None and source.threaded is not None:
            await self._threaded(source, source.threaded, seg, held)
            return
        if resp is None:
            resp = await self._request(source, {"Range": f"bytes={seg.cursor}-{seg.end - 1}"})
            if resp.status == 200:
                resp.release()
                raise _RangeIgnored(f"{source.label} ignores Range")
            if resp.status == 416 or self._content_range(resp.headers, seg) != self.size:
                resp.release()
                raise _Short(f"{source.label}: wrong Content-Range")
            etag = resp.headers.get("ETag")
            if self.ingest.meta.get("etag") and etag != self.ingest.meta["etag"]:
                resp.release()
                raise _Restart()

        async def sink(pieces: list[bytes], n: int) -> None:
            await self.ingest.write_at(seg.cursor, pieces)
            seg.cursor += n
            seg.window_bytes += n
            self.on_bytes(n)

        async with resp, asyncio.timeout(None) as cut:
            seg.cut = cut
            try:
                await pump(resp, sink, lambda: seg.end - seg.cursor)
            finally:
                seg.cut = None
        if seg.cursor < seg.end:
            raise _Short(f"{source.label}: body ended at {seg.cursor} of {seg.end}")

    async def _threaded(
        self, source: Source, threaded: ThreadedRanges, seg: Segment, held: _Held | None = None
    ) -> None:
        wait = source.not_before - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        # Unknown only for the one stream of a body without a length (its held answer
        # needs no Content-Range check): its segment's end is the bound.
        size = self.size if self.size is not None else seg.end

        def moved(n: int) -> None:
            # From a worker thread: counted here, reported by _control (waking the
            # event loop once per MiB per connection cost more than the reporting).
            with self._moved_lock:
                self._moved += n

        thread = asyncio.get_running_loop().run_in_executor(
            None,
            threaded.fetch,
            seg,
            self.ingest,
            size,
            self.ingest.meta.get("etag"),
            moved,
            lambda: self._closing,
            held,
        )
        try:
            try:
                await asyncio.shield(thread)
            except asyncio.CancelledError:
                # Stop the thread first (its socket is shut down), then wait until it has:
                # no thread may write into an ingest after its download gave it up.
                seg.interrupt()
                with contextlib.suppress(BaseException):
                    await finish(thread)
                raise
        except _Busy as exc:
            source.not_before = time.monotonic() + exc.delay
            raise
        except _NoThreads:
            source.threaded = None
            raise _Short("redirected: continuing on aiohttp") from None
        finally:
            seg.stop = False

    # --- control: more connections, cut slow ones, save state ------------------------------

    async def _control(self, tg: asyncio.TaskGroup) -> None:
        """Add connections while they help; cut far-slower ones; save progress."""
        limit = max(1, self.config.max_connections)
        last_save = last_add = time.monotonic()
        rate_at_add = 0.0
        total_before = self.ingest.offset
        while self.queue or self.active:
            await asyncio.sleep(CONTROL_INTERVAL)
            if all(src.dead for src in self.sources):
                # Nothing left to fetch from: fail now, with the last source's error.
                raise (
                    self._errors[-1]
                    if self._errors
                    else TransferFailed(f"{self.sources[0].label}: every source failed")
                )
            self._report_moved()
            now = time.monotonic()
            done = self.ingest.offset
            rate = (done - total_before) / CONTROL_INTERVAL
            total_before = done
            for s in list(self.active):
                s.rate = s.window_bytes / CONTROL_INTERVAL
                s.window_bytes = 0
            # Add a connection while the last one raised throughput (or at the start).
            if (
                self.queue
                and self.connections < limit
                and now - last_add >= 2 * CONTROL_INTERVAL
                and (self.connections < 2 or rate > rate_at_add * 1.1)
            ):
                tg.create_task(self._worker(None, None, None))
                last_add, rate_at_add = now, rate
            self._cut_slow(now)
            if now - last_save >= STATE_INTERVAL:
                await self._save_state()
                last_save = now

    def _report_moved(self) -> None:
        with self._moved_lock:
            moved, self._moved = self._moved, 0
        if moved:
            self.on_bytes(moved)

    def _cut_slow(self, now: float) -> None:
        running = [s for s in self.active if now - s.started > 1.0]
        if len(running) < 2:
            return
        median = statistics.median(s.rate for s in running)
        for s in running:
            # Far slower than its peers for a while (a stall, a bad path): cut it; its
            # remainder goes back to the queue for a fresh connection.
            s.slow_windows = s.slow_windows + 1 if median > 0 and s.rate < median / 8 else 0
            if s.slow_windows * CONTROL_INTERVAL >= SLOW_FOR and not s.stop:
                log.info("cutting a connection at %.0f B/s (median %.0f)", s.rate, median)
                s.interrupt()

    def _error(self, exc: BaseException, source: Source) -> FetchdError:
        if isinstance(exc, FetchdError):
            return exc
        if isinstance(exc, _RangeIgnored | _Short | _Busy):
            return TransferFailed(f"{source.label}: {exc}")
        return translate(exc, source.label, self.config)


class ThreadedRanges:
    """Range GETs of one http(s) URL on blocking keep-alive connections, one per worker
    thread (Python's ``http.client`` and ``ssl``).

    Why: on the event loop, TLS decryption and the copies around it ran on one core and
    capped a download at ~350 MiB/s here; ``SSLSocket.recv_into`` releases the GIL, so
    in threads the decryption runs on every core and lands straight in a reused buffer.
    The probe and registry sources stay on aiohttp (redirects, auth); a redirect here
    makes the download fall back to aiohttp for this source.

    Each thread writes with a file descriptor of its own, so a straggler that outlives a
    cancelled download can never write into a reused descriptor number.
    """

    BUFFER = WRITE_CHUNK  # one read, one write (see WRITE_CHUNK)

    def __init__(
        self, url: str, config: Config, label: str, headers: Mapping[str, str] | None = None
    ) -> None:
        parts = urlsplit(url)
        self.headers = dict(headers or {})  # sent with every request (a registry's token)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.target = parts.path or "/"
        if parts.query:
            self.target += f"?{parts.query}"
        self.label = label
        self.address = config.resolve.get((self.host.lower(), self.port), self.host)
        self.timeout = config.stall_timeout
        ctx = ssl_context(config)
        self.context: ssl.SSLContext | None = None
        if self.https:
            self.context = ctx if isinstance(ctx, ssl.SSLContext) else _unverified()
        self._local = threading.local()

    @classmethod
    def following(
        cls, resp: aiohttp.ClientResponse, config: Config, label: str
    ) -> ThreadedRanges | None:
        """Threads for the rest of a download whose probe ``resp`` came over aiohttp (a
        registry blob): the URL it was finally served from (after redirects), with the
        Authorization header that request carried, if any."""
        url = resp.url
        if url.scheme not in ("http", "https") or not url.host:
            return None
        sent = resp.request_info.headers.get("Authorization")
        return cls(str(url), config, label, {"Authorization": sent} if sent else None)

    def _connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._new_connection()
        return conn

    def _new_connection(self) -> http.client.HTTPConnection:
        if self.context is not None:
            return _PinnedHTTPS(self.host, self.port, self.address, self.context, self.timeout)
        return http.client.HTTPConnection(self.address, self.port, timeout=self.timeout)

    def _send(
        self, conn: http.client.HTTPConnection, start: int, end: int
    ) -> tuple[http.client.HTTPResponse, socket.socket]:
        """The response to a GET of bytes [start, end), and the socket its body arrives
        on: taken before ``getresponse``, which for a ``Connection: close`` answer hands
        the socket to the response and leaves ``conn.sock`` None."""
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        if self.port != (443 if self.https else 80):
            host = f"{host}:{self.port}"
        conn.request(
            "GET",
            self.target,
            headers={
                **self.headers,
                "Host": host,
                "Range": f"bytes={start}-{end - 1}",
                "User-Agent": USER_AGENT,
            },
        )
        sock = conn.sock
        assert sock is not None  # request() connected
        return conn.getresponse(), sock

    def open_range(self, start: int, end: int) -> _Held | None:
        """Ask for bytes [start, end) on a new connection (blocking): the held response if
        the answer is a 206 (or a 200: the server ignores Range), else None (closed)."""
        conn = self._new_connection()
        try:
            resp, sock = self._send(conn, start, end)
        except BaseException:
            conn.close()
            raise
        if resp.status not in (200, 206):
            conn.close()
            if resp.status in (429, 502, 503, 504):
                raise _Busy(f"HTTP {resp.status}", retry_after(dict(resp.headers), 1.0))
            return None
        return _Held(conn, resp, sock)

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def fetch(
        self,
        seg: Segment,
        ingest: SegmentedIngest,
        size: int,
        etag: str | None,
        moved: Callable[[int], None],
        closing: Callable[[], bool],
        held: _Held | None = None,
    ) -> None:
        """Fill ``seg`` (blocking). ``moved(n)`` reports bytes written; stops early when
        ``seg.stop`` or ``closing()``; raises the same errors as the aiohttp path. With
        ``held`` (the probe's checked response), its body is read instead of a new GET,
        and its connection becomes this thread's."""
        if held is not None:
            self._drop()
            conn, resp, sock = held.conn, held.resp, held.sock
            self._local.conn = conn
        else:
            conn = self._connection()
            try:
                resp, sock = self._send(conn, seg.cursor, seg.end)
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                raise ConnectionError(f"{self.label}: {exc}") from exc
        try:
            if held is None:
                self._check(resp, seg, size, etag)
            fd = os.open(ingest.data_path, os.O_WRONLY | os.O_CLOEXEC)
            seg.sock = sock
            try:
                if not seg.stop:  # interrupted before the socket was known
                    self._copy(resp, sock, fd, seg, ingest, moved, closing)
            finally:
                seg.sock = None
                os.close(fd)
        except BaseException:
            self._drop()
            raise
        if seg.cursor < seg.end or not resp.isclosed():
            self._drop()  # stopped early (stolen, cut): the rest of the body is unread
        if seg.cursor < seg.end:
            raise _Short(f"{self.label}: stopped at {seg.cursor} of {seg.end}")

    def _check(
        self, resp: http.client.HTTPResponse, seg: Segment, size: int, etag: str | None
    ) -> None:
        status = resp.status
        if status in (301, 302, 303, 307, 308):
            raise _NoThreads(f"{self.label} redirects")
        if status in (401, 403):  # a token expired: aiohttp's path authenticates again
            raise _NoThreads(f"{self.label}: HTTP {status}")
        if status in (429, 502, 503, 504):
            raise _Busy(f"HTTP {status}", retry_after(dict(resp.headers), 1.0))
        if status == 404:
            raise BlobNotFound(f"{self.label}: not found (HTTP 404)")
        if status == 200:
            raise _RangeIgnored(f"{self.label} ignores Range")
        if status != 206:
            raise TransferFailed(f"{self.label}: HTTP {status}")
        m = _CONTENT_RANGE.match(resp.getheader("Content-Range") or "")
        if not m or int(m.group(1)) != seg.cursor or m.group(3) != str(size):
            raise _Short(f"{self.label}: wrong Content-Range")
        if etag and resp.getheader("ETag") != etag:
            raise _Restart()

    def _copy(
        self,
        resp: http.client.HTTPResponse,
        sock: socket.socket,
        fd: int,
        seg: Segment,
        ingest: SegmentedIngest,
        moved: Callable[[int], None],
        closing: Callable[[], bool],
    ) -> None:
        """Copy the body into the file.

        A body with a Content-Length is read, past what ``http.client`` buffered with
        the headers, straight from the socket (``recv_into``, which for TLS decrypts
        into our buffer): one call per TLS record instead of the three Python layers
        under ``HTTPResponse.readinto`` (measured: 0.1 s of CPU per GiB). Chunked or
        unsized bodies go through ``http.client``."""
        buf = bytearray(self.BUFFER)
        view = memoryview(buf)
        body = None if resp.chunked else resp.length  # what the response still holds
        consumed = 0  # of it, taken from the connection here
        # For TLS, SSLSocket.recv_into is two Python frames over the C object that does
        # the work (it releases the GIL and honours the socket's timeout): call that.
        # An EOF then raises SSLEOFError (an OSError: a failed, retried transfer).
        sslobj = getattr(sock, "_sslobj", None)
        decrypt: Callable[[int, memoryview], int] | None = sslobj.read if sslobj else None

        def read(into: memoryview) -> int:
            nonlocal consumed
            if body is None:
                return resp.readinto(into)
            into = into[: body - consumed]
            if not into:
                return 0
            n = decrypt(len(into), into) if decrypt is not None else sock.recv_into(into)
            consumed += n
            return n

        try:
            if body is not None and resp.fp is not None:
                # What came in with the headers: peek returns only buffered bytes (or
                # fills the empty buffer once), read() then takes them from the buffer.
                head = resp.fp.peek(0)[: min(body, seg.end - seg.cursor)]
                if head:
                    consumed = len(head)
                    self._place(fd, memoryview(resp.fp.read(consumed)), seg, ingest, moved)
            while seg.cursor < seg.end and not seg.stop and not closing():
                want = min(self.BUFFER, seg.end - seg.cursor)
                got = 0
                while got < want:
                    n = read(view[got:want])
                    if not n:
                        break
                    got += n
                if got:
                    self._place(fd, view[: min(got, seg.end - seg.cursor)], seg, ingest, moved)
                if got < want:
                    return  # the body ended early
        except (OSError, http.client.HTTPException) as exc:
            raise ConnectionError(f"{self.label}: {exc}") from exc
        finally:
            if body is not None:
                resp.length = body - consumed
                if not resp.length:
                    resp.read(0)  # the whole body was read: http.client may reuse the link

    @staticmethod
    def _place(
        fd: int,
        data: memoryview,
        seg: Segment,
        ingest: SegmentedIngest,
        moved: Callable[[int], None],
    ) -> None:
        if not data:  # the end moved (stolen) under us
            return
        at = seg.cursor
        pwrite_all(fd, [data], at)
        seg.cursor = at + len(data)
        seg.window_bytes += len(data)
        ingest.record(at, len(data))
        moved(len(data))


@dataclass
class _Held:
    """A request sent on a connection of its own whose body is not read yet (the probe's):
    a worker thread reads it with :meth:`ThreadedRanges.fetch`, or it is closed."""

    conn: http.client.HTTPConnection
    resp: http.client.HTTPResponse
    sock: socket.socket  # the body's (conn.sock is None after a Connection: close)

    def close(self) -> None:
        self.resp.close()
        self.conn.close()


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to ``address`` while verifying (and sending SNI for) ``host``: --resolve."""

    def __init__(
        self, host: str, port: int, address: str, context: ssl.SSLContext, timeout: float
    ) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address
        self._ctx = context

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)


def _unverified() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # --insecure-options tls, as the user asked
    return ctx
