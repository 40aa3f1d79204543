"""The pull-through cache behind ``fetchd serve``: manifests and blobs, single flight.

Who verifies: manifests are checked against their digest by the registry source
before they are stored; blobs are verified by the store's ingest before commit.
A blob that is still arriving is streamed to clients from the ingest's data file as
its bytes land, except the very last byte, which is sent only after the blob verified
— so a client never receives a complete bad blob: on a failure its connection is
broken instead.

One upstream fetch per digest however many clients ask (the engine's single flight),
and a fetch belongs to the server, not to the client that caused it: a client that
disconnects never cancels what others wait for.

Trusted publishers (issue 13): for a repository under a ``docker://HOST/REPO`` prefix with
keys in the keystore (``serve --trust-dir``; the pull name is the upstream's ``HOST`` —
its prefix, else its URL's host:port — and the repository), a manifest the upstream
resolved is checked by :func:`fetchd.trust.oci.check_publisher` before it is stored, its
tag moved, its blob sizes learnt or it is served: a tag is checked each time it is resolved
at the upstream (a miss, or a revalidation after ``tag_ttl``), over the digest it resolved
to; a digest is checked over itself, unless this process already verified it for this
repository — the top digest of a tag that passed, or a platform manifest of an index that
passed (signatures cover the top digest, as for ``fetchd pull``). A refusal is
:class:`~fetchd.errors.NotTrusted` (the OCI ``DENIED``, naming each place looked): nothing
is stored, the tag keeps its old digest, and the next request asks again. Tags shaped like
cosign's attachments (``sha256-<hex>.sig``) get no exemption: their real manifests are not
images serve parses, and an image pushed under such a tag is checked like any other.

Cached copies: within ``tag_ttl`` a tag of a trusted repository is served from the store
without asking again only if this process verified its digest for that repository (at most
MAX_VOUCHED such pairs are remembered, least recently used forgotten); so after a restart,
or once keys were added for a prefix whose images were cached before, the first request
of each tag is checked at the upstream. A verified copy is kept for ``tag_ttl`` even if
its key is removed meanwhile (the keystore is read again at the next resolution). When
the upstream cannot answer, a trusted repository's last digest is served only if this
process verified it; otherwise the upstream's error is the answer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from fetchd.bt.metainfo import TorrentBuilder
from fetchd.config import Config
from fetchd.engine.fetching import Sources
from fetchd.engine.pull import Engine, Flight
from fetchd.errors import (
    BadTorrent,
    BlobNotFound,
    FetchdError,
    ManifestInvalid,
    ManifestNotFound,
    NotTrusted,
    SignatureInvalid,
    StoreError,
    TransferFailed,
    TransferTimeout,
    TrustError,
    UnsupportedMediaType,
    unwrap,
)
from fetchd.manifest import ImageIndex, ImageManifest, parse_manifest
from fetchd.model import MAX_MANIFEST_SIZE, Descriptor, Digest, Platform, Reference
from fetchd.progress import Progress
from fetchd.server.link import Link
from fetchd.server.upstreams import Route, Upstream, Upstreams
from fetchd.sources.base import Fetcher
from fetchd.sources.registry import Registry
from fetchd.sources.swarm import SwarmFetcher
from fetchd.store.cas import Store
from fetchd.store.meta import Meta
from fetchd.trust import oci
from fetchd.trust.keystore import Keystore

if TYPE_CHECKING:
    from fetchd.bt.session import Swarm

log = logging.getLogger(__name__)

T = TypeVar("T")

FLIGHT_START_TIMEOUT = 60.0
#: the most seconds a request waits for a verified blob's commit (fsync, rename) to end
COMMIT_WAIT = 30.0
#: seconds between looks for a blob's first bytes: at first, and at most
FIRST_LOOK = 0.01
LAST_LOOK = 0.1
# Seconds a cached tag waits for the upstream to confirm it before the cached digest is
# served: a miss gets the whole retry budget, a hit only this (an upstream that accepts
# connections and never answers cost 5 attempts × 30 s per request).
REVALIDATE_TIMEOUT = 2.0
# After an upstream failed to revalidate a tag, its cached tags are served without
# asking it for this long, so that every client does not wait REVALIDATE_TIMEOUT.
REVALIDATE_BACKOFF = 10.0
JOB_CONCURRENCY = 8  # references of one prefetch job resolved at once
STREAM_WAIT = 1.0
STREAM_BATCH = 4 << 20  # bytes a client of a blob still arriving is sent at once ...
STREAM_FLUSH = 0.2  # ... or what arrived, once this many seconds passed since the last send
#: (repository, digest) pairs this process verified a publisher's signature for (or a
#: platform manifest of a verified index), remembered so that a cached tag or a child
#: manifest is not checked again on every request
MAX_VOUCHED = 16384


@dataclass
class Stats:
    """What /metrics and the status page show. Counters only grow."""

    hits: int = 0
    misses: int = 0
    bytes_served: int = 0
    bytes_upstream: int = 0
    requests: collections.Counter[tuple[str, int]] = field(default_factory=collections.Counter)
    recent: collections.deque[dict[str, object]] = field(
        default_factory=lambda: collections.deque(maxlen=20)
    )


class _CountingProgress(Progress):
    def __init__(self, stats: Stats) -> None:
        super().__init__()
        self.stats = stats

    def advance(self, key: str, n: int) -> None:
        super().advance(key, n)
        self.stats.bytes_upstream += n


@dataclass(frozen=True, slots=True)
class Manifest:
    data: bytes
    media_type: str
    digest: Digest


class Cache:
    """Use as ``async with Cache(...)``: it owns the background fetches."""

    def __init__(
        self,
        store: Store,
        config: Config,
        upstreams: Upstreams,
        tag_ttl: float,
        swarm: Swarm | None = None,
        upstream_blobs: int = 1,
    ) -> None:
        self.store = store
        self.config = config
        self.upstreams = upstreams
        self.tag_ttl = tag_ttl
        self.stats = Stats()
        self.meta = Meta(store.db_path)
        # The server's seeding session is the engine's too (one per process): a blob
        # pulled through with --torrent comes from the upstream cache's swarm into it.
        self.engine = Engine(store, config, _CountingProgress(self.stats), swarm)
        #: blob sizes learnt from manifests served (so a blob GET needs no HEAD upstream)
        self.sizes: dict[Digest, int] = {}
        #: how many responses are reading each blob now (LRU eviction spares them)
        self.serving: collections.Counter[Digest] = collections.Counter()
        self._fetches: dict[Digest, asyncio.Future[BaseException | None]] = {}
        self._fetch_tasks: set[asyncio.Task[Any]] = set()
        #: a manifest being asked upstream (a tag again, or one not stored), one task per
        #: reference; a revalidation goes on past the REVALIDATE_TIMEOUT after which the
        #: cached copy is served
        self._revalidations: dict[tuple[str, str], asyncio.Task[Manifest | Exception]] = {}
        self._registries: dict[Upstream, Registry] = {}
        #: each upstream's queue of big blobs (link.py), ``upstream_blobs`` at a time
        self._links: collections.defaultdict[Upstream, Link] = collections.defaultdict(
            lambda: Link(upstream_blobs)
        )
        self._tg: asyncio.TaskGroup | None = None
        #: when each upstream last failed to revalidate a tag (monotonic)
        self._dark_since: dict[Upstream, float] = {}
        #: see MAX_VOUCHED; the order is least recently used first
        self._vouched: collections.OrderedDict[tuple[str, Digest], None] = collections.OrderedDict()
        self.job_slots = asyncio.Semaphore(JOB_CONCURRENCY)
        #: called (on the loop) with each blob a pull-through fetch committed: the server
        #: builds and seeds its torrent; must not raise
        self.on_commit: Callable[[Descriptor], None] | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Cache]:
        async with self.engine, asyncio.TaskGroup() as tg:
            self._tg = tg
            try:
                yield self
            finally:
                self._tg = None
                # Shutting down: fetches still running stop (their partial data stays,
                # resumable); the task group then has nothing left to wait for.
                for task in list(self._fetch_tasks):
                    task.cancel()

    def registry(self, upstream: Upstream) -> Registry:
        reg = self._registries.get(upstream)
        if reg is None:
            session = self.engine.session()
            reg = Registry(session, self.config, upstream.host, base=upstream.url)
            self._registries[upstream] = reg
        return reg

    # --- manifests -----------------------------------------------------------------------

    async def manifest(self, route: Route, reference: str) -> Manifest:
        """The manifest for ``route`` at a tag or digest: from the store, else upstream.

        A tag is trusted for ``tag_ttl`` seconds, then asked again; when the upstream
        cannot answer, the last known digest is served. Under a trusted publisher's prefix,
        only what this process verified is served without a check (the module docstring).
        """
        # No exemption for tags shaped like cosign attachments (sha256-HEX.sig): their
        # manifests are not images serve can parse anyway, and an image pushed under such
        # a tag would otherwise pass unsigned (review finding).
        checked = await self._publisher_checked(route)
        if reference.startswith(("sha256:", "sha512:")):
            digest = Digest.parse(reference)
            if self.store.has(digest) and (not checked or self._is_vouched(route, digest)):
                self.stats.hits += 1
                return await asyncio.to_thread(self._stored, digest, route)
            self.stats.misses += 1
            ref = Reference(route.upstream.host, route.repository, None, digest)
            return await self._fetch_once(route, ref, reference, None, checked)
        known = await asyncio.to_thread(self.meta.tag, route.key, reference)
        stored: Manifest | None = None
        last = Digest.parse(known[0]) if known else None
        # A trusted repository's digest this process never verified: resolved as a miss.
        if last and self.store.has(last) and (not checked or self._is_vouched(route, last)):
            stored = await asyncio.to_thread(self._stored, last, route)
        if stored is not None and known is not None:
            dark = self._dark_since.get(route.upstream)
            recently_dark = dark is not None and time.monotonic() - dark < REVALIDATE_BACKOFF
            if time.time() - known[1] < self.tag_ttl or recently_dark:
                self.stats.hits += 1
                self._recent(f"{route.key}:{reference}", stored.digest)
                return stored
        self.stats.misses += 1
        ref = Reference(route.upstream.host, route.repository, reference, None)
        if stored is None:
            return await self._fetch_once(route, ref, reference, reference, checked)
        task = self._upstream_task(route, ref, reference, reference, checked)
        outcome: Manifest | Exception
        try:
            async with asyncio.timeout(REVALIDATE_TIMEOUT):
                # Shielded: a slow upstream still gets to answer (and move the tag) for
                # the next client, while this one is served the cached copy now.
                outcome = await asyncio.shield(task)
        except TimeoutError as timeout:
            outcome = timeout
        if isinstance(outcome, Exception):
            exc = outcome
            # A tag now resolving to an image its publisher did not sign is refused, not
            # answered with the older verified copy (as a tag that is gone).
            # Any trust-class failure (a refused key, an unreadable keystore) is refused
            # too: serving the stale copy would hide it for as long as it lasts.
            if isinstance(exc, ManifestNotFound | SignatureInvalid | TrustError) or not isinstance(
                exc, FetchdError | TimeoutError
            ):
                raise exc
            why = (
                f"no answer within {REVALIDATE_TIMEOUT:g} s"
                if isinstance(exc, TimeoutError)
                else str(exc)
            )
            log.warning(
                "%s:%s: upstream failed (%s); serving the cached copy",
                route.key,
                reference,
                why,
            )
            self._dark_since[route.upstream] = time.monotonic()
            return stored
        return outcome

    async def _publisher_checked(self, route: Route) -> bool:
        """Whether manifests of ``route`` need a trusted publisher's signature."""
        if "image" in self.config.insecure:
            return False  # check_publisher warns when it is asked (at each resolution)
        keystore = Keystore.default(self.config.trust_dir)
        gpg, cosign = await asyncio.to_thread(
            keystore.oci_keys_for, route.upstream.host, route.repository
        )
        return bool(gpg or cosign)

    def _is_vouched(self, route: Route, digest: Digest) -> bool:
        key = (route.key, digest)
        if key not in self._vouched:
            return False
        self._vouched.move_to_end(key)
        return True

    def _vouch(self, route: Route, digests: list[Digest]) -> None:
        for digest in digests:
            self._vouched[(route.key, digest)] = None
            self._vouched.move_to_end((route.key, digest))
        while len(self._vouched) > MAX_VOUCHED:
            self._vouched.popitem(last=False)

    def _upstream_task(
        self, route: Route, ref: Reference, reference: str, tag: str | None, checked: bool
    ) -> asyncio.Task[Manifest | Exception]:
        """The one upstream request for ``reference`` of ``route`` now: a new one, or the
        one clients already wait for (single flight, as for blobs: 8 cold clients of one
        tag asked upstream 8 times). The server's task: a client that goes away does not
        stop it."""
        key = (route.key, reference)
        task = self._revalidations.get(key)
        if task is None:
            assert self._tg is not None, "Cache used outside running()"
            task = self._tg.create_task(self._revalidate(route, ref, tag, checked))
            self._revalidations[key] = task
            self._fetch_tasks.add(task)
            task.add_done_callback(lambda t: self._revalidated(key, t))
        return task

    async def _fetch_once(
        self, route: Route, ref: Reference, reference: str, tag: str | None, checked: bool
    ) -> Manifest:
        """A manifest the store does not hold, from upstream: one request however many
        clients ask at once; its error reaches each of them."""
        outcome = await asyncio.shield(self._upstream_task(route, ref, reference, tag, checked))
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def _revalidate(
        self, route: Route, ref: Reference, tag: str | None, checked: bool
    ) -> Manifest | Exception:
        """Ask upstream for a manifest (a tag again, or one not stored), with the full
        retry budget; the error is returned, not raised (this task belongs to the server's
        task group, not to one request)."""
        try:
            fetched = await self._fetch_manifest(route, ref, tag, checked)
        except Exception as exc:
            return exc
        self._dark_since.pop(route.upstream, None)
        return fetched

    def _revalidated(self, key: tuple[str, str], task: asyncio.Task[Manifest | Exception]) -> None:
        self._fetch_tasks.discard(task)
        if self._revalidations.get(key) is task:
            del self._revalidations[key]

    async def tags(self, route: Route) -> list[str]:
        """The upstream's tag list; the tags this cache knows when upstream is away."""
        try:
            return await self._ask(route, self.registry(route.upstream).tags(route.repository))
        except FetchdError:
            known = await asyncio.to_thread(self.meta.tags_of, route.key)
            if not known:
                raise
            return known

    def _stored(self, digest: Digest, route: Route) -> Manifest:
        """A manifest from the store. A digest of a layer or config is a blob the store
        holds, not a manifest: MANIFEST_UNKNOWN, as distribution/registry answers."""
        size = self.store.blob_size(digest)
        not_one = ManifestNotFound(f"{digest.short} is not a manifest this cache knows")
        if size is None or size > MAX_MANIFEST_SIZE:
            raise not_one
        data = self.store.read_blob(digest, MAX_MANIFEST_SIZE)
        try:
            parsed = _parse(data, None, f"{route.key}@{digest.short}")
        except (ManifestInvalid, UnsupportedMediaType):
            raise not_one from None
        self._learn(parsed)
        self.meta.cache_manifest(str(digest), route.key, parsed.media_type)
        return Manifest(data, parsed.media_type, digest)

    async def _ask(self, route: Route, answer: Awaitable[T]) -> T:
        """An upstream call, with what the registry source leaves untranslated mapped."""
        try:
            return await answer
        except RecursionError:
            raise TransferFailed(
                f"{route.upstream.host}: the upstream answered with JSON nested too deeply to read"
            ) from None

    async def _fetch_manifest(
        self, route: Route, ref: Reference, tag: str | None, checked: bool
    ) -> Manifest:
        """The manifest from the upstream, stored (and ``tag`` moved to it) once it parsed
        and, when ``checked``, its publisher's signature verified (a tag: every time; a
        digest: unless this process verified it already)."""
        registry = self.registry(route.upstream)
        raw, ctype, digest = await self._ask(route, registry.manifest(ref))
        parsed = _parse(raw, ctype, f"{route.key}@{digest.short} from the upstream")
        if checked and (tag is not None or not self._is_vouched(route, digest)):
            try:
                await oci.check_publisher(self.engine, ref, digest, registry)
            except NotTrusted as exc:
                log.warning("%s: refused: %s", route.key, exc)
                raise
            children = parsed.manifests if isinstance(parsed, ImageIndex) else []
            self._vouch(route, [digest, *(d.digest for d in children)])
        media_type = parsed.media_type
        self._learn(parsed)
        await asyncio.to_thread(self.store.put, raw, digest)
        await asyncio.to_thread(self.meta.cache_manifest, str(digest), route.key, media_type)
        if tag is not None:
            await asyncio.to_thread(self.meta.put_tag, route.key, tag, str(digest))
        if tag is not None:
            self._recent(f"{route.key}:{tag}", digest)
        return Manifest(raw, media_type, digest)

    def _recent(self, name: str, digest: Digest) -> None:
        self.stats.recent.appendleft({"name": name, "digest": str(digest), "at": time.time()})

    def _learn(self, parsed: ImageManifest | ImageIndex) -> None:
        children = parsed.manifests if isinstance(parsed, ImageIndex) else parsed.blobs()
        for d in children:
            self.sizes[d.digest] = d.size

    # --- blobs ---------------------------------------------------------------------------

    async def blob_size(self, route: Route, digest: Digest) -> int:
        size = self.store.blob_size(digest)
        if size is not None:
            return size
        size = self.sizes.get(digest)
        if size is None:
            size = await self._ask(
                route, self.registry(route.upstream).blob_size(route.repository, digest)
            )
            self.sizes[digest] = size
        return size

    async def committed(self, digest: Digest) -> bool:
        """Whether the store holds ``digest``, once a commit under way ended: a blob whose
        bytes verified was sent whole to its clients before its fsync and rename, and a
        client that read it may ask for its torrent at once (a 404 for that was a race
        CI caught: test_aria2c_leeches_from_the_servers_seed_through_announce)."""
        if self.store.has(digest):
            return True
        flight = self.engine.flights.get(digest)
        if flight is not None and flight.ingest.verified:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(COMMIT_WAIT):
                    await asyncio.shield(flight.done)
        return self.store.has(digest)

    async def blob(self, route: Route, digest: Digest) -> Flight | None:
        """None if the blob is in the store (now, or after a fetch that ended while we
        waited); else the flight bringing it, once its first bytes are on disk — so a
        fetch that fails before its first byte raises here (an OCI error for the
        client), not in the middle of a 200."""
        if self.store.has(digest):
            self.stats.hits += 1
            return None
        self.stats.misses += 1
        size = await self.blob_size(route, digest)
        for attempt in (1, 2):
            fetch = self._fetches.get(digest)
            joined = fetch is not None
            if fetch is None:
                assert self._tg is not None, "Cache used outside running()"
                fetch = asyncio.get_running_loop().create_future()
                self._fetches[digest] = fetch
                desc = Descriptor("application/octet-stream", digest, size)
                task = self._tg.create_task(self._fetch_blob(route, desc, fetch))
                self._fetch_tasks.add(task)
                task.add_done_callback(self._fetch_tasks.discard)
            try:
                return await self._first_bytes(digest, fetch)
            except TimeoutError:
                raise TransferTimeout(
                    f"blob {digest.short}: no byte from {route.upstream.host} within "
                    f"{FLIGHT_START_TIMEOUT:g} s"
                ) from None
            except FetchdError:
                # A fetch we joined failed (it may have been ending as we arrived):
                # try once with a fetch of our own before giving the client an error.
                if not joined or attempt == 2:
                    raise
                if self._fetches.get(digest) is fetch:
                    del self._fetches[digest]
        raise AssertionError("unreachable")

    async def _first_bytes(
        self, digest: Digest, fetch: asyncio.Future[BaseException | None]
    ) -> Flight | None:
        pause = FIRST_LOOK
        async with asyncio.timeout(FLIGHT_START_TIMEOUT):
            while True:
                flight = self.engine.flights.get(digest)
                if flight is not None and (flight.contiguous > 0 or flight.done.done()):
                    outcome = flight.done.result() if flight.done.done() else None
                    if outcome is not None:
                        raise _as_fetchd_error(outcome)
                    return None if flight.done.done() else flight
                if fetch.done():
                    failure = fetch.result()
                    if failure is not None:
                        raise _as_fetchd_error(failure)
                    if self.store.has(digest):
                        return None
                    raise BlobNotFound(f"blob {digest.short} vanished after its fetch")
                if flight is not None:  # started: its first bytes wake us
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(LAST_LOOK):
                            await flight.wait()
                    continue
                # Not started yet (its upstream's queue, a slow request): looked at less
                # and less often, so that 24 requests waiting for their layers' turn do
                # not wake 100 times a second each (2 s of serve's CPU in lan_swarm.py).
                await asyncio.sleep(pause)
                pause = min(LAST_LOOK, pause * 1.5)

    async def _fetch_blob(
        self, route: Route, desc: Descriptor, outcome: asyncio.Future[BaseException | None]
    ) -> None:
        """One upstream fetch, owned by the server. Never raises into the server's task
        group (a failed fetch must not stop the server): the outcome goes to ``outcome``."""
        try:
            upstream = self.registry(route.upstream).blobs(route.repository)
            fetchers: list[Fetcher] = [upstream]
            swarm = self.config.torrent and desc.size >= self.config.torrent_min_size
            if swarm:
                # serve --torrent: the upstream is another fetchd serve; its swarm first
                # (the hosts that hold the blob), its HTTP after (issue 12).
                fetchers.insert(
                    0,
                    SwarmFetcher(
                        route.upstream.url,
                        route.repository,
                        self.engine.session(),
                        self.config,
                        self.engine.swarms,
                        self.engine.meta,
                        http=upstream,
                    ),
                )
            # A blob this server will seed gets its torrent's pieces hashed as it streams in,
            # in the pass that checks its digest (no second read of the blob).
            builders: list[TorrentBuilder] = []
            also: Callable[[], TorrentBuilder] | None = None
            if (
                self.on_commit is not None
                and desc.size >= self.config.torrent_min_size
                and desc.digest.algorithm == "sha256"
            ):

                def also() -> TorrentBuilder:
                    builders.append(TorrentBuilder(desc.digest.hex, desc.size))
                    return builders[-1]

            def placed() -> int:
                flight = self.engine.flights.get(desc.digest)
                return flight.contiguous if flight is not None else 0

            # A swarm's pieces come from many hosts, not over this upstream link.
            link = self._links[route.upstream]
            async with contextlib.nullcontext() if swarm else link.turn(desc.size, placed):
                await self.engine.ensure_blob(
                    desc, Sources(fetchers, upstream), segmented=swarm, also=also
                )
            outcome.set_result(None)
            if builders:
                await self._keep_torrent(desc, builders[-1])
            if self.on_commit is not None:
                self.on_commit(desc)
        except asyncio.CancelledError:
            outcome.cancel()
            raise
        except Exception as exc:
            log.warning("%s: fetching %s failed: %s", route.key, desc.digest.short, exc)
            outcome.set_result(exc)
        finally:
            if self._fetches.get(desc.digest) is outcome:  # not a newer fetch's
                del self._fetches[desc.digest]

    async def _keep_torrent(self, desc: Descriptor, builder: TorrentBuilder) -> None:
        """Store the torrent built while ``desc`` streamed in (the bytes the commit checked),
        unless this transfer did not see the whole blob (another writer committed it)."""
        try:
            torrent = builder.finish()
            await asyncio.to_thread(self.engine.meta.put_torrent, str(desc.digest), torrent.raw)
        except BadTorrent:
            return  # not fed whole: the torrent is built from the stored blob instead
        except (OSError, sqlite3.Error) as exc:
            log.warning("%s: its torrent was not kept: %s", desc.digest.short, exc)

    # --- prefetch (the admin API) ----------------------------------------------------------

    async def prefetch(self, text: str, platforms: list[Platform]) -> Digest:
        """Warm the cache with an image: its manifest(s) and every blob, for ``platforms``
        of an index (default: this machine's)."""
        ref = Reference.parse(text)
        upstream = next((u for u in self.upstreams.all if u.host == ref.host), None)
        if upstream is None:
            raise FetchdError(f"{text!r}: no upstream of this server serves {ref.host!r}")
        route = Route(upstream, ref.name)
        top = await self.manifest(route, str(ref.digest or ref.tag))
        parsed = _parse(top.data, top.media_type, text)
        manifests = [top]
        if isinstance(parsed, ImageIndex):
            for p in platforms or [Platform.host()]:
                chosen = parsed.select(p, text)
                manifests.append(await self.manifest(route, str(chosen.digest)))
        try:
            async with asyncio.TaskGroup() as tg:
                for m in manifests:
                    inner = _parse(m.data, m.media_type, text)
                    if isinstance(inner, ImageIndex):
                        continue
                    for d in inner.blobs():
                        tg.create_task(self._prefetch_blob(route, d.digest))
        except BaseExceptionGroup as group:
            raise _as_fetchd_error(unwrap(group)) from None
        return top.digest

    async def _prefetch_blob(self, route: Route, digest: Digest) -> None:
        flight = await self.blob(route, digest)
        if flight is not None:
            result = await asyncio.shield(flight.done)
            if result is not None:
                raise _as_fetchd_error(result)

    # --- reading a blob that is still arriving -----------------------------------------

    async def stream(
        self,
        flight: Flight,
        send: Callable[[BinaryIO, int, int], Awaitable[None]],
        start: int = 0,
    ) -> int:
        """Send ``flight``'s bytes from ``start`` as they land, with ``send(file, offset,
        count)`` (sendfile: no copy through Python); the last byte only once the blob
        verified. Returns the bytes sent; raises StoreError if the fetch failed.

        Bytes go out in batches of STREAM_BATCH, or whatever has arrived once
        STREAM_FLUSH passed since the last send: a send for every MiB that lands woke
        every client for every MiB, and 8 skopeo clients fed that way spent 40 % more CPU
        than the same clients reading from a registry (serve_cache.py, 8 × 1 GiB)."""
        loop = asyncio.get_running_loop()
        sent = start
        flushed = loop.time()
        # Only a reset after this stream began matters: one before it (bad resumed data,
        # a lying mirror) left nothing this client was sent.
        generation = flight.ingest.generation
        f = await asyncio.to_thread(_open_ingest, flight, self.store)
        try:
            while sent < flight.size:
                if flight.ingest.generation != generation:
                    raise StoreError(f"blob {flight.digest.short} was refetched mid-stream")
                outcome = flight.done.result() if flight.done.done() else False
                if outcome is not None and outcome is not False:
                    raise StoreError(f"blob {flight.digest.short} failed: {outcome}")
                # Verified (size and digest checked) is enough for the last byte: the
                # store's own fsync and rename need not hold up the clients.
                whole = outcome is None or (
                    flight.ingest.verified and flight.contiguous >= flight.size
                )
                limit = flight.size if whole else min(flight.contiguous, flight.size - 1)
                ready = limit - sent
                now = loop.time()
                if ready > 0 and (ready >= STREAM_BATCH or whole or now - flushed >= STREAM_FLUSH):
                    await send(f, sent, ready)
                    self.stats.bytes_served += ready
                    sent = limit
                    flushed = loop.time()
                    continue
                # More bytes, the end, or (with bytes waiting) the flush time, first.
                wait = STREAM_WAIT if ready <= 0 else max(0.0, flushed + STREAM_FLUSH - now)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await flight.wait()
        finally:
            f.close()
        return sent


def _parse(raw: bytes, media_type: str | None, where: str) -> ImageManifest | ImageIndex:
    """parse_manifest, with a too deeply nested document a ManifestInvalid too."""
    try:
        return parse_manifest(raw, media_type, where)
    except RecursionError:
        raise ManifestInvalid(f"{where}: the manifest is JSON nested too deeply to read") from None


def _as_fetchd_error(exc: BaseException) -> FetchdError:
    if isinstance(exc, FetchdError):
        return exc
    return TransferFailed(f"{type(exc).__name__}: {exc}")


def _open_ingest(flight: Flight, store: Store) -> BinaryIO:
    """The data file the flight writes to, or (committed meanwhile) the blob itself."""
    try:
        return open(flight.path, "rb")
    except FileNotFoundError:
        return open(store.blob_path(flight.digest), "rb")
