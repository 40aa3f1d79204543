"""The engine's side of the seam: which fetcher fills an ingest, and what happens when
one fails or lies. Used by :class:`fetchd.engine.pull.Engine` for every blob, however it
was asked for (an image's layer, a URL, a server's pull-through).

For each blob the engine has an ordered list of fetchers (:class:`Sources`: mirrors
first, then the origin; a URL and its mirrors as equals):

* a fetcher that answers 404 is skipped for that blob only;
* one that fails (down, refused) or stalls while another remains is passed over at once
  (no retries): the next one continues from the bytes already on disk, which count;
* in a segmented download the scheduler (segments.py) does the same per connection, and
  races one far slower than the others with the next fetcher on the ranges missing;
* one whose bytes fail verification is dropped for the rest of the pull, its bytes are
  discarded and the blob is fetched again from the others. The fetcher the user named
  as the authority's own (the origin; for a URL, the URL) is never blamed for bytes it
  did not send alone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fetchd.config import Config
from fetchd.errors import (
    BlobNotFound,
    DigestMismatch,
    FetchdError,
    SizeMismatch,
    SourceError,
    TransferFailed,
)
from fetchd.model import Descriptor
from fetchd.sources.base import Fetcher, Location, RangeFetcher, Sink
from fetchd.sources.http import redact
from fetchd.store.cas import Ingest, ResumedDataBad, SegmentedIngest

log = logging.getLogger(__name__)

T = TypeVar("T")


class Sources:
    """The fetchers of one pull, in the order they are asked, and those it dropped.

    ``trusted`` is the authority's own fetcher (the origin registry; a URL itself): it is
    not dropped for bad bytes others may have sent too. ``peers``: the fetchers are
    equals (a URL and its mirrors) and share a segmented download's connections, where
    otherwise each is a tier of its own, asked in order. One pull's blobs share one
    ``Sources``; its methods run on the event loop only.
    """

    def __init__(
        self, fetchers: Sequence[Fetcher], trusted: Fetcher | None = None, *, peers: bool = False
    ) -> None:
        self.fetchers = list(fetchers)
        self.trusted = trusted
        self.peers = peers
        #: id(fetcher) → why it was dropped (by identity: two URLs that differ only in
        #: their query string have one label)
        self.dropped: dict[int, str] = {}

    def live(self) -> list[Fetcher]:
        return [f for f in self.fetchers if id(f) not in self.dropped]

    def drop(self, fetcher: Fetcher, why: str) -> None:
        if id(fetcher) not in self.dropped:
            self.dropped[id(fetcher)] = why
            log.warning("dropped %s for the rest of this pull: %s", fetcher.label, why)


async def fill_and_commit(
    desc: Descriptor,
    ingest: Ingest,
    sources: Sources,
    config: Config,
    on_bytes: Callable[[int], None],
    on_connections: Callable[[int], None],
    *,
    before_commit: Callable[[Ingest], Awaitable[None]] | None = None,
    one_stream: bool = False,
) -> None:
    """Fill ``ingest`` from ``sources`` and commit it (verified against ``desc``).

    ``one_stream``: a segmented ingest is filled over one connection, a request per gap
    (see :class:`~fetchd.sources.segments.SegmentedDownload`), not over several.

    ``before_commit`` is awaited once the ingest holds every byte, before each commit:
    checks of the content itself (an ACI's signature and structure). If it raises, the
    bytes are discarded (a retry must not resume them) and the error goes up — unless it
    is a :class:`SourceError` or a cancellation (the network failed, not the bytes: they
    stay for a resume, and are checked again then).

    Data an earlier run left that fails verification is fetched again once (only the
    resumed ranges, see ResumedDataBad). Bytes that fail verification after that drop
    the fetchers that sent them (never ``sources.trusted``) and the blob is fetched
    again, in this ingest, from the rest. Raises the last fetcher's error when none is
    left, or :class:`DigestMismatch` when the trusted source's own bytes are wrong.
    """
    what = f"blob {desc.digest.short}" if ingest.expected else "download"
    resumed_retry = True
    # Who placed the bytes the ingest holds now: across fills, until it is emptied (what
    # a lying mirror placed survives a fill of only the gaps a bad resume left).
    contributors: list[Fetcher] = []
    for _ in range(len(sources.fetchers) + 2):
        live = sources.live()
        if not live:
            raise TransferFailed(
                f"{what}: every source was dropped ({'; '.join(sources.dropped.values())})"
            )
        filled = await _fill(
            desc, ingest, sources, live, config, on_bytes, on_connections, one_stream
        )
        for f in filled:
            if f not in contributors:
                contributors.append(f)
        if before_commit is not None:
            try:
                await before_commit(ingest)
            except SourceError:
                raise
            except Exception:
                await ingest.discard()
                raise
        try:
            await ingest.commit()
            return
        except ResumedDataBad:
            if not resumed_retry:
                raise
            resumed_retry = False
            log.warning(
                "%s: the data an earlier run left did not verify; fetching those ranges again",
                what,
            )
            continue
        except DigestMismatch as exc:
            blamed = [f for f in contributors if f is not sources.trusted]
            if not blamed:
                raise
            for f in blamed:
                sources.drop(f, f"its bytes of {what} failed verification ({exc})")
            await ingest.restart()
            contributors.clear()
    raise TransferFailed(f"{what}: no source delivered bytes that verify")


async def _fill(
    desc: Descriptor,
    ingest: Ingest,
    sources: Sources,
    live: list[Fetcher],
    config: Config,
    on_bytes: Callable[[int], None],
    on_connections: Callable[[int], None],
    one_stream: bool = False,
) -> list[Fetcher]:
    """Every missing byte of ``ingest`` from ``live`` (in order); returns the fetchers
    that placed bytes in it now.

    Into a segmented ingest, fetchers that cannot serve ranges (the swarm) are asked
    first, each in turn, and the range fetchers after them share the gaps they leave
    over several connections (each a tier of its own unless ``sources.peers``)."""
    lead = 0
    while lead < len(live) and not isinstance(live[lead], RangeFetcher):
        lead += 1
    ranged = [f for f in live[lead:] if isinstance(f, RangeFetcher)]
    if not isinstance(ingest, SegmentedIngest) or not ranged or len(ranged) != len(live) - lead:
        return await _in_order(desc, ingest, sources, live, None, on_bytes)
    placed = (
        await _in_order(desc, ingest, sources, live[:lead], ranged[0], on_bytes) if lead else []
    )
    if not ingest.gaps():
        return placed
    from fetchd.sources.segments import RangeSource, SegmentedDownload

    def locator(f: RangeFetcher) -> Callable[[], Awaitable[Location]]:
        return lambda: f.locate(desc)

    ranges = [
        RangeSource(f.label, locator(f), tier=0 if sources.peers else i)
        for i, f in enumerate(ranged)
    ]
    try:
        await SegmentedDownload(
            ingest, ranges, config, on_bytes, on_connections, one_stream=one_stream
        ).run()
    finally:
        placed += [f for f, r in zip(ranged, ranges, strict=True) if r.wrote]
    return placed


async def _in_order(
    desc: Descriptor,
    ingest: Ingest,
    sources: Sources,
    fetchers: list[Fetcher],
    then: Fetcher | None,
    on_bytes: Callable[[int], None],
) -> list[Fetcher]:
    """Ask ``fetchers`` in order until one fills the ingest; ``then``: the fetcher that
    takes over after them (so the last of them is not the last resort, and its failure
    returns instead of raising)."""
    placed: list[Fetcher] = []
    for i, fetcher in enumerate(fetchers):
        nxt = fetchers[i + 1] if i + 1 < len(fetchers) else then
        last = nxt is None
        before = ingest.offset
        try:
            await fetcher.fetch(desc, ingest, on_bytes, last=last)
        except BlobNotFound as exc:
            if nxt is None:
                raise
            log.info(
                "%s: %s has no copy (%s); asking %s",
                desc.digest.short,
                fetcher.label,
                exc,
                nxt.label,
            )
            continue
        except SizeMismatch as exc:
            # Not this blob (a captive portal's page, the wrong blob, an endless body):
            # the ingest dropped it; the fetcher is not asked again in this pull.
            if nxt is None or fetcher is sources.trusted:
                raise
            sources.drop(fetcher, f"it sent blob {desc.digest.short} at the wrong size ({exc})")
            continue
        except SourceError as exc:
            if nxt is None:
                raise
            log.warning(
                "%s: %s failed (%s); continuing from %s at %d bytes",
                desc.digest.short,
                fetcher.label,
                exc,
                nxt.label,
                ingest.offset,
            )
            continue
        finally:
            if ingest.offset != before:
                placed.append(fetcher)
        return placed
    return placed


class UrlFetcher:
    """A plain http(s) URL serving a blob's bytes: a :class:`RangeFetcher` (no request
    to locate: the URL is where the bytes are). Never verifies, never commits."""

    def __init__(self, url: str, config: Config) -> None:
        self.url = url
        self.config = config
        self.label = redact(url)

    async def locate(self, desc: Descriptor) -> Location:
        return Location(self.url, {})

    async def fetch(
        self, desc: Descriptor, sink: Sink, on_bytes: Callable[[int], None], *, last: bool = True
    ) -> None:
        """One segmented download from this URL alone (``sink`` must be segmented)."""
        if not isinstance(sink, SegmentedIngest):
            raise TransferFailed(f"{self.label}: a URL is fetched into a segmented ingest only")
        from fetchd.sources.segments import RangeSource, SegmentedDownload

        async def here() -> Location:
            return Location(self.url, {})

        source = RangeSource(self.label, here)
        await SegmentedDownload(sink, [source], self.config, on_bytes).run()


class SingleFlight:
    """One piece of work per key at a time, however many ask: the first caller runs it,
    the others wait for its outcome. A success is theirs too; when it fails or is
    cancelled, a waiter runs the work itself (its own sources may succeed where the
    other pull's failed). On the event loop only."""

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future[Any]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._running

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> T:
        for _ in range(1000):
            waiting = self._running.get(key)
            if waiting is None:
                break
            await asyncio.wait({waiting})  # our own cancellation propagates from here
            if not waiting.cancelled() and waiting.exception() is None:
                result: T = waiting.result()
                return result
            # Cancelled, or failed with the other caller's sources (its mirrors, its
            # registry): ours may still work. Once: run it ourselves.
            if not waiting.cancelled():
                break
        else:
            raise FetchdError(f"{key}: its transfer was cancelled 1000 times")
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._running[key] = done
        try:
            result = await work()
            done.set_result(result)
            return result
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                done.cancel()
            else:
                done.set_exception(exc)
                done.exception()  # retrieved: the waiters re-raise it, if any
            raise
        finally:
            del self._running[key]
