"""The segment scheduler: one blob from several range sources into one ingest, aria2-style.

The bytes of one blob may come from several :class:`RangeSource` (a mirror, the origin
registry, a plain URL and its ``--mirror`` URLs) that serve the same content. Each is
reached through the one transport (:mod:`fetchd.sources.transport`) on transfer threads.

* The first request (the probe) asks the best source for the first missing segment with
  ``Range``; its answer tells whether ranges work, the size and the validators (ETag,
  Last-Modified, max-age, kept in ``sink.meta``), and its body is the first segment. A
  resumed ingest whose validators differ from the answer's starts over.
* The missing ranges are cut into segments of :data:`SEGMENT` bytes lazily (:class:`_Plan`),
  handed out in order, so the ingest's hash follower keeps up with the front; what a
  download holds is bounded by its connections and gaps, not by the size a server claims
  (:func:`~fetchd.store.space.ensure_room` checked that first).
* Connections are added while they raise throughput and the ingest's hash follower keeps
  up (up to ``max_connections``): where the CPU is the limit, another connection only
  takes CPU from hashing. A connection waits before its next segment while the follower
  is more than :data:`HASH_AHEAD` behind, so the hash ends with the last byte. One that
  runs out of segments takes half of the largest one still running (work stealing).
* **Tiers.** Sources of the lowest ``tier`` share the connections (round robin). A source
  answering 404 is dead for this download; so is one that stalls (no byte for
  ``stall_timeout``) or refuses connections while another source is alive: its running
  transfers are cut at once and continue, from their cursors, on the next source. A
  connection running far below its peers (< median/8 for :data:`SLOW_FOR` s, counting only
  transfers whose bytes flow) is cut and its remainder goes to another source; its
  source is demoted behind every other live source for :data:`DEMOTED_FOR` s (the next
  tier races it on what is missing). So is a source whose connections together stay
  below :data:`LOWEST_SPEED` for :data:`FLOOR_FOR` s (one plain stream too) while a live
  source of a later tier exists; the only source, or the last tier, is kept however
  slow. With one source left, a failure is retried as :mod:`fetchd.sources.retry` says
  (``Config.attempts``, Retry-After).
* **Changed content.** A source whose ETag or size changes between answers, or that
  answers a resume with 416, 200 or a wrong ``Content-Range``, is dropped while another
  source is alive; the download starts over only when it is the only source, or when
  it validated the resumed bytes and no descriptor fixes the blob (a republished URL:
  the restart goes back to the size the sink was created with). With the digest known,
  an ETag is no validator at all (mirror nodes differ; the commit verifies).
* Which ranges are on disk is saved after each segment, every :data:`STATE_INTERVAL` s
  and on exit (``sink.save_state``): a kill -9 loses at most what was in flight.
* The only source ignoring ``Range`` on the probe (200), or answering a wrong
  ``Content-Range``, gives one plain stream instead (its length, or at most the free disk).
* ``one_stream``: one connection, and one request for each gap (not one per
  :data:`SEGMENT`), for a blob fetched beside others that already fill the connections.
  A registry served 1 GiB in 8 MiB ranges on 2.0 times the CPU it took for four whole
  GETs (1.35 s against 0.65 s), on the machine it shares with the client.

Who verifies: the ingest's commit, always. This module only places bytes, and counts
what each source placed (:attr:`RangeSource.wrote`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

from fetchd.config import Config
from fetchd.errors import (
    BlobNotFound,
    FetchdError,
    NotEnoughSpace,
    SizeMismatch,
    StoreError,
    TransferFailed,
    unwrap,
)
from fetchd.sources.base import Location
from fetchd.sources.http import (
    cache_max_age,
    content_range,
    origin,
    translate,
    unsatisfied_length,
)
from fetchd.sources.retry import backoff, retry_delay, retryable, should_retry_status, status_error
from fetchd.sources.transport import Head, Interrupted, Response, Stalled, Transfer, Transport
from fetchd.store.cas import SegmentedIngest
from fetchd.store.space import ensure_room, no_room, room
from fetchd.threads import finish, run_in

log = logging.getLogger(__name__)

SEGMENT = 8 << 20
#: a segment that is never cut: one_stream asks for each gap whole
UNCUT = 1 << 62
MIN_SPLIT = 1 << 20
STATE_INTERVAL = 2.0
CONTROL_INTERVAL = 0.25
INITIAL_CONNECTIONS = 2
SLOW_FOR = 2.0  # seconds a connection may lag far behind its peers before it is cut
#: a source whose connections together move less than this (B/s) for FLOOR_FOR s is
#: raced by a live source of a later tier (aria2's --lowest-speed-limit, per source):
#: at this rate a 256 MiB layer takes over an hour, which any working origin beats, and
#: a mirror on a working path sends more than this within a second of its first byte
LOWEST_SPEED = 64 << 10
#: seconds below LOWEST_SPEED before the race: a few control windows, longer than a
#: TCP slow start or a brief hiccup, far shorter than a stall timeout
FLOOR_FOR = 4.0
#: seconds a demoted source stays behind the others: long enough for the next tier to
#: take the download over, short enough that a mirror that had a bad moment is asked
#: again in a long download
DEMOTED_FOR = 30.0
ADD_WINDOW = 0.5  # seconds of throughput measured before another connection is added
#: the hash follower "keeps up" while its lag grows by at most 1/HASH_BEHIND of what
#: arrived (+ HASH_SLACK: it hashes 4 MiB reads, so its progress comes in steps)
HASH_BEHIND = 8
HASH_SLACK = 8 << 20
HASH_AHEAD = 32 << 20  # the most bytes in order that may wait for the hash follower...
HASH_WAIT = 1.0  # ...while a connection waits at most this long (s) for it to catch up
HASH_POLL = 0.005  # seconds between looks at the follower's progress while waiting
HASH_STUCK = 0.2  # seconds without progress after which the follower is not waited for

T = TypeVar("T")


def _ignore(n: int) -> None:
    pass


@dataclass(eq=False)  # identity: sources are compared and kept in sets by identity
class RangeSource:
    """One place a blob's ranges come from, and its state within one download."""

    #: for logs and errors (redacted: no credentials, no query)
    label: str
    #: where the ranges are; may raise BlobNotFound / SourceError. Called again (at most
    #: once per failure) after a 401/403, when a token or a signed URL may have expired
    locate: Callable[[], Awaitable[Location]]
    #: lower tiers first; sources of one tier share the connections
    tier: int = 0
    #: bytes this source placed in this download
    wrote: int = 0
    failures: int = 0  # consecutive failures (reset by a transfer that completes)
    not_before: float = 0.0  # monotonic: no request before this (Retry-After, backoff)
    dead: bool = False  # no more requests in this download
    #: monotonic: demoted until then (it ran far below its peers, or below LOWEST_SPEED)
    slow_until: float = 0.0
    below_since: float | None = None  # monotonic: since when it runs below LOWEST_SPEED
    error: FetchdError | None = None  # why it is dead
    location: Location | None = None  # located (and where a redirect led)
    relocated: bool = False  # located again after a 401/403, not yet successful
    etag: str | None = None  # the ETag its first answer in this download had
    etag_seen: bool = False
    _locating: asyncio.Lock | None = field(default=None, repr=False)

    @property
    def slow(self) -> bool:
        """Demoted now: asked after every other live source."""
        return time.monotonic() < self.slow_until

    def demote(self) -> None:
        """Behind every other live source for :data:`DEMOTED_FOR` s."""
        self.slow_until = time.monotonic() + DEMOTED_FOR


class Segment(Transfer):
    """A transfer of the scheduler: its source, rate, and the sources it should avoid."""

    def __init__(
        self, start: int, end: int, cursor: int | None = None, avoid: frozenset[Any] = frozenset()
    ) -> None:
        super().__init__(start, end, cursor)
        self.first_byte: float | None = None  # monotonic: when _control first saw bytes
        self.rate = 0.0
        self.measured = 0  # ``received`` at the last measure
        self.slow_windows = 0
        self.cut_slow = False
        self.source: RangeSource | None = None
        self.avoid = avoid

    @property
    def flowing(self) -> bool:
        """On a socket, with bytes arriving (not waiting for a Retry-After, a locate, a
        transfer thread, or a first byte): only such transfers have a rate to judge."""
        return self.attached and self.first_byte is not None


class _Plan:
    """The segments still to fetch: the gaps, cut into SEGMENT-sized pieces lazily (when
    a connection asks), after any segment given back. Memory is O(gaps + given back),
    never O(size / SEGMENT): a server may claim 2^62 bytes."""

    def __init__(self, segment: int = SEGMENT) -> None:
        self._segment = segment
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
        e = min(b, a + self._segment)
        if e < b:
            self._gaps.appendleft((e, b))
        return Segment(a, e)


class _Growth:
    """When one more connection is worth it: the throughput since the last one was added
    (over at least :data:`ADD_WINDOW` s) beats the window before by 10 %, and the hash
    follower keeps up. A follower falling behind means the CPU, not the network, is the
    limit: another connection would only take CPU from hashing (and the hash still to do
    when the last byte arrives is time the download waits)."""

    def __init__(self, now: float, done: int, lag: int) -> None:
        self.start, self.done, self.lag = now, done, lag
        self.rate = 0.0  # throughput of the window before the last add

    def another(self, now: float, done: int, lag: int, connections: int) -> bool:
        """Whether to add a connection now; if so, a new window starts."""
        elapsed = now - self.start
        if elapsed < ADD_WINDOW:
            return False
        arrived = done - self.done
        rate = arrived / elapsed
        keeps_up = lag - self.lag <= arrived // HASH_BEHIND + HASH_SLACK
        if connections >= INITIAL_CONNECTIONS and not (rate > self.rate * 1.1 and keeps_up):
            return False
        self.start, self.done, self.lag, self.rate = now, done, lag, rate
        return True


class _Restart(Exception):
    """The content changed under us (validators differ): start over from nothing."""


class _Changed(Exception):
    """A source's answer says the content changed (its ETag or its size did): start over
    or drop the source, as :meth:`SegmentedDownload._starts_over` decides."""


class _RangeIgnored(Exception):
    """A source answered 200 to a Range request for a segment."""


class _Short(Exception):
    """A transfer ended before its segment did, or its Content-Range was wrong."""


class _Status(Exception):
    """An answer the worker must act on (404, 401/403, 429/5xx, another status)."""

    def __init__(self, head: Head) -> None:
        super().__init__(f"HTTP {head.status}")
        self.status = head.status
        self.headers = {k: str(v) for k, v in head.headers.items()}


@dataclass
class _Probe:
    source: RangeSource
    resp: Response
    single: bool  # a 200: the body is the whole blob, one stream


class SegmentedDownload:
    """Fill ``sink`` from ``sources`` (see the module docstring). One use only.

    :meth:`run` raises :class:`~fetchd.errors.BlobNotFound` if every source answered 404,
    :class:`~fetchd.errors.SizeMismatch` when the answers cannot be the blob, another
    :class:`~fetchd.errors.SourceError` when no source can deliver, StoreError/DiskFull/
    NotEnoughSpace for the disk. Bytes placed stay in the sink (and in its state) on every
    exit, a cancellation included: it returns only once no transfer thread writes any more.
    """

    def __init__(
        self,
        sink: SegmentedIngest,
        sources: Sequence[RangeSource],
        config: Config,
        on_bytes: Callable[[int], None] = _ignore,
        on_connections: Callable[[int], None] = _ignore,
        *,
        one_stream: bool = False,
    ) -> None:
        if not sources:
            raise ValueError("no sources")
        #: the longest request: SEGMENT, or (one_stream) a whole gap
        self.segment = UNCUT if one_stream else SEGMENT
        self.max_connections = 1 if one_stream else max(1, config.max_connections)
        self.sink = sink
        self.sources = sorted(sources, key=lambda s: s.tier)  # stable: order within a tier
        self.config = config
        self.on_bytes = on_bytes
        self.on_connections = on_connections
        self.label = self.sources[0].label
        self.size: int | None = sink.size
        #: the size the sink was created with (a descriptor's; None for a plain URL):
        #: what a restart goes back to (a first answer's total is the old content's)
        self._given_size = sink.size
        self.queue = _Plan(self.segment)
        self.active: set[Segment] = set()
        self.connections = 0
        self.transport = Transport(config)
        self._turn = 0
        self._errors: list[FetchdError] = []
        self._saving = False
        self._save_again = False
        self._moved = 0  # bytes threads wrote that on_bytes has not heard of
        self._unsaved = 0  # bytes threads wrote since a transfer thread saved the state
        self._moved_lock = threading.Lock()
        #: set when a connection ends: the control loop looks whether work is left
        self._ended = asyncio.Event()
        #: the follower's progress when last looked at, and when it last moved
        self._hashed_seen, self._hashed_moved = sink.hashed, time.monotonic()

    # --- entry -------------------------------------------------------------------------

    async def run(self) -> None:
        """Download every missing byte; raises a FetchdError if that cannot be done."""
        try:
            for _ in range(2):  # a second time only after the content changed under us
                self.queue.clear()
                self.active.clear()
                try:
                    await self._run_once()
                    return
                except _Restart:
                    log.warning("%s changed since the partial download; starting over", self.label)
                    await self.sink.restart()
                    self.size = self.sink.size = self._given_size
                    for s in self.sources:
                        s.etag_seen = False
            raise TransferFailed(f"{self.label}: the content keeps changing")
        finally:
            self.transport.close()

    async def _run_once(self) -> None:
        known = self.size if self.size is not None else self.sink.meta.get("size")
        if isinstance(known, int) and known > 0 and not self.sink.missing(known):
            # Every byte is on disk already (a kill between the last segment and the
            # commit): nothing to ask for. A probe would ask for bytes=SIZE-, whose 416
            # reads as "changed under us" and would throw the whole download away.
            self._set_size(known)
            return
        while True:
            first = self._first_gap()
            probe = Segment(first, first + self.segment)
            if self.size is not None:
                probe.end = min(probe.end, self._gap_end(first))
            got = await self._probe(probe)
            if got is None:
                return  # nothing to fetch (an empty blob)
            if not got.single:
                break
            try:
                await self._single_stream(got.source, got.resp)
                return
            except _Restart:
                raise
            except (NotEnoughSpace, StoreError):
                raise
            except Exception as exc:
                if not _expected(exc):
                    raise
                self._kill(got.source, self._error(exc, got.source))
                if not self._live():
                    raise self._failure() from None
        probe.source = got.source
        self._plan(skip=probe)
        self.active.add(probe)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._worker((got.source, probe, got.resp)))
                for _ in range(min(INITIAL_CONNECTIONS, self.max_connections) - 1):
                    if self.queue:
                        tg.create_task(self._worker(None))
                tg.create_task(self._control(tg))
        except BaseExceptionGroup as group:
            if group.subgroup(_Restart):
                raise _Restart() from None
            raise unwrap(group) from None
        finally:
            self._report_moved()
            self.on_connections(0)
            await asyncio.to_thread(self.sink.save_state)
        if self.queue or self.active:
            raise self._failure()

    def _first_gap(self) -> int:
        gaps = self.sink.missing(self.size if self.size is not None else 1 << 62)
        return gaps[0][0] if gaps else (self.size or 0)

    def _gap_end(self, at: int) -> int:
        """The end of the gap that starts at ``at`` (the size is known)."""
        assert self.size is not None
        return next((b for a, b in self.sink.missing(self.size) if a == at), self.size)

    def _plan(self, skip: Segment) -> None:
        """Queue every gap but the probe's segment ``skip``."""
        assert self.size is not None
        for a, b in self.sink.missing(self.size):
            a = max(a, skip.end) if a < skip.end and b > skip.start else a
            self.queue.add_gap(a, b)

    # --- threads -----------------------------------------------------------------------

    async def _in_thread(self, seg: Segment, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on a transfer thread. Cancelled, the transfer is interrupted and
        the thread waited for: no thread writes into the sink after the download gave up."""
        work = run_in("transfer", fn, *args)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            seg.interrupt()
            with contextlib.suppress(BaseException):
                await finish(work)
            if work.done() and not work.cancelled() and work.exception() is None:
                leftover = work.result()
                if isinstance(leftover, Response):
                    leftover.close()
            raise

    def _moved_by(self, source: RangeSource) -> Callable[[int], None]:
        def moved(n: int) -> None:
            # From a transfer thread: counted here, reported by _control (waking the event
            # loop once per buffer per connection would cost more than the reporting).
            with self._moved_lock:
                self._moved += n
                source.wrote += n
                self._unsaved += n
                save = self._unsaved >= SEGMENT and self.segment > SEGMENT
                if save:
                    self._unsaved = 0
            if save:
                # A request longer than a segment: its state is saved as often as after
                # each segment (a kill -9 loses at most about SEGMENT), from this thread.
                self.sink.save_state()

        return moved

    def _report_moved(self) -> None:
        with self._moved_lock:
            moved, self._moved = self._moved, 0
        if moved:
            self.on_bytes(moved)

    # --- sources -----------------------------------------------------------------------

    def _live(self, but: RangeSource | None = None) -> list[RangeSource]:
        return [s for s in self.sources if not s.dead and s is not but]

    def _pick(self, seg: Segment) -> RangeSource | None:
        """The source for ``seg``: of the best rank (tier, not demoted) among the live ones
        it need not avoid, preferring one that may be asked now; round robin among equals."""
        live = self._live()
        if not live:
            return None
        candidates = [s for s in live if s not in seg.avoid] or live
        best = min((s.slow, s.tier) for s in candidates)
        ranked = [s for s in candidates if (s.slow, s.tier) == best]
        now = time.monotonic()
        ready = [s for s in ranked if s.not_before <= now] or ranked
        self._turn += 1
        return ready[self._turn % len(ready)]

    async def _location(self, source: RangeSource) -> Location:
        if source.location is None:
            if source._locating is None:
                source._locating = asyncio.Lock()
            async with source._locating:
                if source.location is None:
                    source.location = await source.locate()
        return source.location

    async def _wait_for(self, source: RangeSource) -> None:
        wait = source.not_before - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def _kill(self, source: RangeSource, error: FetchdError) -> None:
        """``source`` is dead for this download: its running transfers are cut now, and
        go on from their cursors elsewhere."""
        if source.dead:
            return
        source.dead = True
        source.error = error
        self._errors.append(error)
        text = str(error)
        if not text.startswith(source.label):
            text = f"{source.label}: {text}"
        if self._live():
            log.warning("%s; going on with the other sources", text)
        else:
            log.info("giving up on this source: %s", text)
        for seg in list(self.active):
            if seg.source is source:
                seg.interrupt()

    def _failure(self) -> FetchdError:
        """The error to raise when no source can deliver any more."""
        errors = [s.error for s in self.sources if s.error is not None]
        if len(errors) == len(self.sources) and all(isinstance(e, BlobNotFound) for e in errors):
            return errors[0]
        others = [e for e in self._errors if not isinstance(e, BlobNotFound)]
        if others:
            return others[-1]
        if self._errors:
            return self._errors[-1]
        return TransferFailed(f"{self.label}: every connection failed")

    def _error(self, exc: BaseException, source: RangeSource) -> FetchdError:
        if isinstance(exc, FetchdError):
            return exc
        if isinstance(exc, _Status):
            return status_error(exc.status, source.label)
        if isinstance(exc, _RangeIgnored | _Short | _Changed | Interrupted):
            return TransferFailed(f"{source.label}: {exc or type(exc).__name__}")
        return translate(exc, source.label, self.config)

    async def _setback(self, source: RangeSource, exc: BaseException) -> None:
        """A request to ``source`` failed with ``exc``: mark it dead, or set when it may be
        asked again (the decisions of fetchd.sources.retry)."""
        if source.dead:
            return
        others = bool(self._live(but=source))
        if isinstance(exc, _Status):
            status = exc.status
            if status in (401, 403) and not source.relocated:
                source.relocated = True  # a token or a signed URL expired: locate again
                source.location = None
                return
            if should_retry_status(status):
                try:
                    delay = retry_delay(
                        status, exc.headers, source.failures + 1, self.config, source.label
                    )
                except TransferFailed as final:
                    self._kill(source, final)
                    return
                source.failures += 1
                if source.failures >= self.config.attempts:
                    self._kill(source, self._error(exc, source))
                    return
                source.not_before = max(source.not_before, time.monotonic() + delay)
                return
            self._kill(source, self._error(exc, source))
            return
        if isinstance(exc, _RangeIgnored | _Changed) or (
            isinstance(exc, FetchdError) and not isinstance(exc, retryable())
        ):
            self._kill(source, self._error(exc, source))
            return
        # A stall or a refusal: with another source alive, this one is dead at once (no
        # attempts x stall waits); alone, it is retried like any other failure.
        refused = isinstance(exc.__cause__, ConnectionRefusedError)
        if others and (isinstance(exc, Stalled) or refused):
            self._kill(source, self._error(exc, source))
            return
        source.failures += 1
        if source.failures >= self.config.attempts:
            self._kill(source, self._error(exc, source))
            return
        source.not_before = max(source.not_before, time.monotonic() + backoff(source.failures))

    # --- the probe ---------------------------------------------------------------------

    async def _probe(self, seg: Segment) -> _Probe | None:
        """Ask the best live source for the first segment until one answers usably."""
        for _ in range(len(self.sources) * (self.config.attempts + 2) + 2):
            source = self._pick(seg)
            if source is None:
                break
            await self._wait_for(source)
            try:
                loc = await self._location(source)
                resp = await self._in_thread(seg, self.transport.open, loc, seg.start, seg.end, seg)
            except (_Restart, NotEnoughSpace, StoreError):
                raise
            except Exception as exc:
                if not _expected(exc):
                    raise
                await self._setback(source, exc)
                continue
            try:
                got = await self._probe_answer(source, loc, resp, seg)
            except (_Restart, NotEnoughSpace, StoreError):
                raise
            except Exception as exc:
                if not _expected(exc):
                    raise
                await self._setback(source, exc)
                continue
            return got
        raise self._failure()

    async def _probe_answer(
        self, source: RangeSource, loc: Location, resp: Response, seg: Segment
    ) -> _Probe | None:
        """What the probe's answer means: a probe to go on with, or None (nothing to
        fetch); raises to ask again. Closes ``resp`` unless it is returned."""
        head = resp.head
        try:
            if head.status == 416:
                resp.drain()
                resp.release()
                if self.sink.offset and self._starts_over(source):
                    raise _Restart()
                if self.sink.offset:
                    raise TransferFailed(
                        f"{source.label}: the range bytes={seg.start}-{seg.end - 1} of a "
                        "resumed download is not satisfiable there"
                    )
                if unsatisfied_length(head.get("Content-Range")) == 0:
                    self._set_size(0)
                    return None
                raise TransferFailed(
                    f"{source.label}: range bytes={seg.start}-{seg.end - 1} not satisfiable"
                )
            if head.status not in (200, 206):
                resp.drain()
                resp.release()
                raise _Status(head)
            if head.status == 200 and self.sink.offset and self._live(but=source):
                # A plain stream would throw the resumed bytes away: others serve ranges.
                raise _RangeIgnored("ignores Range")
            self._check_validators(head, source)
            if head.status == 200:
                return _Probe(source, resp, True)
            total = self._content_range(head, seg)
            if total is None and self._live(but=source):
                raise TransferFailed(
                    f"{source.label}: answered bytes={seg.start}-{seg.end - 1} with "
                    f"Content-Range {head.get('Content-Range')!r}"
                )
            if total is None:
                # A wrong Content-Range from the only source: trust nothing but a plain stream.
                resp.close()
                plain = await self._in_thread(seg, self.transport.open, loc, None, None, seg)
                if plain.head.status != 200:
                    plain.drain()
                    plain.release()
                    raise TransferFailed(
                        f"{source.label}: answered HTTP {plain.head.status} to a plain GET"
                    )
                return _Probe(source, plain, True)
            self._note_redirect(source, loc, head)
            self._set_size(total)
        except BaseException:
            resp.close()
            raise
        seg.end = min(seg.end, total)
        return _Probe(source, resp, False)

    def _starts_over(self, source: RangeSource) -> bool:
        """Whether ``source`` saying the content changed (a 416 on resume, a new ETag or
        size) means starting over; otherwise only ``source`` is dropped. Yes when it is
        the only live source, or when it validated the resumed bytes and no descriptor
        fixes the blob (a plain URL, republished); with a digest or a size given, and
        another source alive, the others complete what is there."""
        if not self._live(but=source):
            return True
        fixed = self.sink.expected is not None or self._given_size is not None
        return not fixed and self.sink.meta.get("validated_by") == source.label

    def _set_size(self, total: int) -> None:
        if self.size is not None and total != self.size:
            raise SizeMismatch(self._what, self.size, total)
        if self.size is None:  # a size the server states: bounded before it is planned
            store = self.sink.store
            ensure_room(store.ingests, total - self.sink.offset, self.label, store.root)
        self.size = total
        self.sink.size = total
        self.sink.meta["size"] = total

    @property
    def _what(self) -> str:
        return f"blob {self.sink.expected.short}" if self.sink.expected else "download"

    def _check_validators(self, head: Head, source: RangeSource) -> None:
        """Record the validators; raises _Restart if they differ from a resumed ingest's
        (those another source recorded are not compared: mirrors' ETags differ)."""
        etag, modified = head.get("ETag"), head.get("Last-Modified")
        meta = self.sink.meta
        known = (meta.get("etag") or None, meta.get("last_modified") or None)
        same_source = meta.get("validated_by", source.label) == source.label
        if self.sink.offset and meta and same_source and known != (etag, modified):
            raise _Restart()
        meta["etag"], meta["last_modified"] = etag, modified
        meta["max_age"] = cache_max_age(head.get("Cache-Control"))
        meta["validated_by"] = source.label
        source.etag, source.etag_seen = etag, True

    def _content_range(self, head: Head, seg: Segment) -> int | None:
        parsed = content_range(head.get("Content-Range"))
        if parsed is None:
            return None
        first, last, total = parsed
        if first != seg.cursor or total is None or last < seg.cursor:
            return None
        return total

    def _note_redirect(self, source: RangeSource, loc: Location, head: Head) -> None:
        """Ask where a redirect led directly from now on (with the location's headers only
        on the same origin); a 401/403 there locates again."""
        if head.url != loc.url:
            same = origin(head.url) == origin(loc.url)
            source.location = Location(head.url, loc.headers if same else {})

    # --- one plain stream ------------------------------------------------------------------

    async def _single_stream(self, source: RangeSource, resp: Response) -> None:
        """The source ignores Range: take the body whole, from its start."""
        try:
            if self.sink.offset:
                await self.sink.restart()
                self._check_validators(resp.head, source)  # the restart cleared them
            length = resp.head.length
            if length is not None:
                self._set_size(length)
            # A body of no stated length may go on for ever: at most what the disk holds.
            budget = await asyncio.to_thread(room, self.sink.store.ingests)
        except BaseException:
            resp.close()
            raise
        seg = Segment(0, length if length is not None else budget + 1)
        seg.source = source
        self.on_connections(1)
        watch = asyncio.create_task(self._watch_stream(seg))
        try:
            await self._in_thread(seg, self._read_body, source, resp, seg)
        except Interrupted:
            if not seg.cut_slow:
                raise
            raise TransferFailed(
                f"{source.label}: below {LOWEST_SPEED >> 10} KiB/s for {FLOOR_FOR:g} s"
            ) from None
        finally:
            watch.cancel()
            await asyncio.wait({watch})
            self._report_moved()
            self.on_connections(0)
        if length is None:
            if seg.cursor > budget:
                await self._endless(budget)
            self._set_size(seg.cursor)  # no length given: the body ended where it ended
        elif seg.cursor != length:
            raise SizeMismatch(self._what, length, seg.cursor)

    async def _watch_stream(self, seg: Segment) -> None:
        """While one plain stream runs: report its bytes, and cut it when it runs below
        the speed floor while a source of a later tier could race it (see
        :meth:`_race_slow_sources`). Ends when cancelled."""
        while not seg.stop:
            await asyncio.sleep(CONTROL_INTERVAL)
            self._report_moved()
            self._measure([seg], time.monotonic())
            self._race_slow_sources(time.monotonic(), [seg])

    def _read_body(self, source: RangeSource, resp: Response, seg: Segment) -> None:
        try:
            resp.read_into(seg, self.sink, self._moved_by(source))
        finally:
            resp.release()

    async def _endless(self, budget: int) -> NoReturn:
        """A body of no stated length ran past ``budget``: drop it (it would fill the
        disk) and fail."""
        await self.sink.discard()
        raise no_room(f"{self.label} runs on", budget, self.sink.store.root)

    # --- connections -------------------------------------------------------------------

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
        seg = Segment(mid, victim.end)
        victim.end = mid
        self.active.add(seg)
        return seg

    def _requeue(self, seg: Segment, avoid: frozenset[Any] = frozenset()) -> None:
        self.active.discard(seg)
        if seg.remaining > 0:
            self.queue.appendleft(Segment(seg.cursor, seg.end, avoid=avoid))

    async def _worker(self, held: tuple[RangeSource, Segment, Response] | None) -> None:
        self.connections += 1
        self.on_connections(self.connections)
        try:
            while True:
                resp: Response | None = None
                if held is not None:
                    source, seg, resp = held
                    held = None
                else:
                    await self._hash_room()
                    got = self._next_segment()
                    if got is None:
                        return
                    seg = got
                    picked = self._pick(seg)
                    if picked is None:
                        self._requeue(seg)
                        return
                    source = picked
                    seg.source = source
                    await self._wait_for(source)
                    if source.dead:
                        self._requeue(seg)
                        continue
                try:
                    loc = source.location if resp is not None else await self._location(source)
                    assert loc is not None
                    await self._in_thread(seg, self._transfer, source, loc, seg, resp)
                    source.failures = 0
                    source.relocated = False
                    self.active.discard(seg)
                    await self._save_state()
                except (_Restart, NotEnoughSpace, StoreError):
                    raise
                except Interrupted:
                    avoid = frozenset({source}) if seg.cut_slow else seg.avoid
                    if seg.cut_slow and self._live(but=source):
                        source.demote()  # the next tier races it
                    self._requeue(seg, avoid)
                except _Changed as exc:
                    self._requeue(seg, seg.avoid)
                    if self._starts_over(source):
                        raise _Restart() from None
                    await self._setback(source, exc)
                except Exception as exc:
                    if not _expected(exc):
                        raise
                    self._requeue(seg, seg.avoid)
                    await self._setback(source, exc)
                finally:
                    resp = None
        finally:
            if held is not None:
                held[2].close()  # never used
            self.connections -= 1
            self.on_connections(self.connections)
            self._ended.set()

    def _transfer(
        self, source: RangeSource, loc: Location, seg: Segment, resp: Response | None
    ) -> None:
        """One segment, on a transfer thread: the request (unless the probe's answer is
        given), the checks of its head, the body into the sink."""
        if resp is None:
            resp = self.transport.open(loc, seg.cursor, seg.end, seg)
            seg.first_byte = None  # a new request: its body has not begun
            try:
                self._check_segment(source, loc, resp, seg)
            except BaseException:
                resp.close()
                raise
        try:
            resp.read_into(seg, self.sink, self._moved_by(source))
        finally:
            resp.release()
        if seg.cursor < seg.end:
            raise _Short(f"the body ended at {seg.cursor} of {seg.end}")

    def _check_segment(
        self, source: RangeSource, loc: Location, resp: Response, seg: Segment
    ) -> None:
        head = resp.head
        if head.status == 200:
            raise _RangeIgnored("ignores Range")
        if head.status == 416:
            raise _Short("range not satisfiable (HTTP 416)")
        if head.status != 206:
            resp.drain()
            resp.release()
            raise _Status(head)
        # The validator first: a republished URL's new size is no wrong Content-Range.
        # With the digest known, the digest is the validator: one mirror node's ETag
        # differing from another's changes nothing (the commit verifies the bytes).
        etag = head.get("ETag")
        if source.etag_seen and etag != source.etag and self.sink.expected is None:
            raise _Changed(f"its ETag changed from {source.etag} to {etag}")
        if not source.etag_seen:
            source.etag, source.etag_seen = etag, True
        total = self._content_range(head, seg)
        if total is None:
            raise _Short(f"wrong Content-Range {head.get('Content-Range')!r}")
        if total != self.size:
            if self.sink.expected is None and self._given_size is None:
                raise _Changed(f"its size changed from {self.size} to {total}")
            raise _Short(f"Content-Range {head.get('Content-Range')!r}: not {self.size} bytes")
        self._note_redirect(source, loc, head)

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
                await asyncio.to_thread(self.sink.save_state)
        finally:
            self._saving = False

    # --- control: more connections, cut slow ones, save state ----------------------------

    async def _control(self, tg: asyncio.TaskGroup) -> None:
        """Add connections while they help; cut far-slower ones; save progress."""
        limit = self.max_connections
        last_save = time.monotonic()
        growth = _Growth(last_save, self.sink.offset, self._hash_lag())
        while await self._tick():
            if not self._live():
                raise self._failure()
            self._report_moved()
            now = time.monotonic()
            self._measure(list(self.active), now)
            if (
                self.queue
                and self.connections < limit
                and growth.another(now, self.sink.offset, self._hash_lag(), self.connections)
            ):
                tg.create_task(self._worker(None))
            self._cut_slow(now)
            self._race_slow_sources(now, list(self.active))
            if now - last_save >= STATE_INTERVAL:
                await self._save_state()
                last_save = now

    async def _tick(self) -> bool:
        """Wait :data:`CONTROL_INTERVAL` s; False (at once) when no work is left: the
        download ends when its last transfer does, not at the next tick."""
        deadline = asyncio.get_running_loop().time() + CONTROL_INTERVAL
        while self.queue or self.active:
            self._ended.clear()
            try:
                async with asyncio.timeout_at(deadline):
                    await self._ended.wait()
            except TimeoutError:
                return True
        return False

    def _hash_lag(self) -> int:
        """Bytes in order on disk that the ingest's hash follower has not hashed yet."""
        return max(0, self.sink.contiguous - self.sink.hashed)

    async def _hash_room(self) -> None:
        """Before a connection takes its next segment: wait while the hash follower is more
        than :data:`HASH_AHEAD` behind and moving (at most :data:`HASH_WAIT` s; not when
        it did not move for :data:`HASH_STUCK` s: a follower that failed or is starved
        must not slow the download down). Where the CPU is the limit, the follower falls
        behind the network; what it has not hashed when the last byte arrives is time
        the download waits with the other cores idle. Held back here, the transfers
        leave it the CPU while there is still work for them, and the verification ends
        with the download. Not in the end game (nothing queued): the steals that finish
        the download never wait."""
        deadline = time.monotonic() + HASH_WAIT
        for _ in range(int(HASH_WAIT / HASH_POLL) + 1):
            if not self.queue or self._hash_lag() <= HASH_AHEAD:
                return
            now = time.monotonic()
            if self.sink.hashed != self._hashed_seen:
                self._hashed_seen, self._hashed_moved = self.sink.hashed, now
            if now > deadline or now - self._hashed_moved > HASH_STUCK:
                return
            await asyncio.sleep(HASH_POLL)

    @staticmethod
    def _measure(segs: list[Segment], now: float) -> None:
        """The rate of each transfer over the last control window."""
        for s in segs:
            received = s.received
            s.rate = (received - s.measured) / CONTROL_INTERVAL
            s.measured = received
            if s.first_byte is None and s.rate > 0:
                s.first_byte = now

    def _race_slow_sources(self, now: float, segs: list[Segment]) -> None:
        """A source whose flowing transfers together stay below :data:`LOWEST_SPEED` for
        :data:`FLOOR_FOR` s, while a live source of a later tier exists, is demoted and
        its transfers cut: they go on from their cursors there. (_cut_slow compares
        connections with their median, and a source slow on all of them is its own
        median.) The only source, or the last tier, is kept however slow: there is
        nothing to race it with, and the stall timeout still ends a silent one."""
        for source in self._live():
            flowing = [s for s in segs if s.source is source and s.flowing and not s.stop]
            if not flowing or sum(s.rate for s in flowing) >= LOWEST_SPEED:
                source.below_since = None
                continue
            if source.below_since is None:
                source.below_since = now
            if now - source.below_since < FLOOR_FOR:
                continue
            if not any(o.tier > source.tier and not o.slow for o in self._live(but=source)):
                continue
            log.warning(
                "%s: below %d KiB/s for %g s; racing the next tier",
                source.label,
                LOWEST_SPEED >> 10,
                FLOOR_FOR,
            )
            source.below_since = None
            source.demote()
            for s in segs:  # all of them: one whose bytes have not begun would go on
                if s.source is source and not s.stop:
                    s.cut_slow = True
                    s.interrupt()

    def _cut_slow(self, now: float) -> None:
        # Only transfers with bytes flowing for a second: one waiting (a Retry-After, a
        # locate, a free transfer thread, a first byte) has no rate to judge yet.
        running = [
            s
            for s in self.active
            if s.flowing and s.first_byte is not None and now - s.first_byte > 1.0
        ]
        if len(running) < 2:
            return
        median = _median([s.rate for s in running])
        for s in running:
            # Far slower than its peers for a while (a stall, a bad path): cut it; its
            # remainder goes back to the queue, for another source if there is one.
            s.slow_windows = s.slow_windows + 1 if median > 0 and s.rate < median / 8 else 0
            if s.slow_windows * CONTROL_INTERVAL >= SLOW_FOR and not s.stop:
                label = s.source.label if s.source else self.label
                log.info(
                    "%s: cutting a connection at %.0f B/s (median %.0f)", label, s.rate, median
                )
                s.cut_slow = True
                s.interrupt()


def _median(values: list[float]) -> float:
    """The median of ``values`` (not empty); statistics.median, without importing
    statistics (and fractions, decimal, random) at every start."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _expected(exc: BaseException) -> bool:
    """Whether ``exc`` is a source's failure (handled by _setback), not a bug or the disk."""
    ours = (FetchdError, _Status, _Short, _RangeIgnored, _Changed, Interrupted)
    return isinstance(exc, (*ours, *retryable()))
