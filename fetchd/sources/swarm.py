"""The BitTorrent swarm as one more :class:`~fetchd.sources.base.Fetcher` (issue 12).

For a layer blob of at least ``--torrent-min-size``, :class:`SwarmFetcher` asks a
``fetchd serve`` cache for the blob's torrent (``/fetchd/v1/torrents/sha256:HEX``),
refuses it unless it is exactly fetchd's canonical torrent for that digest and size
(:func:`fetchd.bt.metainfo.canonical`), and lets the process's one libtorrent session
(:class:`fetchd.bt.session.Swarm`) download it, announcing to that cache's tracker.

libtorrent never writes the ingest's data file. It downloads into a file of its own
beside it (``ingest/…/swarm``), and each piece it verified (SHA-1, from the torrent) is
copied into the sink, **only into the sink's gaps**. The data file is then written by the
sink alone, once per range: a peer's stray or hostile block can never change bytes the
store's hash follower already read. (libtorrent writes unrequested blocks it receives:
BITTORRENT.md §2.3.) The swarm file also lets a killed pull resume: libtorrent rechecks
it, and what verifies is copied in.

On a stall or repeated hash failures the session gives up (SwarmFailed) and the engine
hands the sink's gaps to the cache or the origin over HTTP ranges; the pieces already
copied stay and count. The torrent (from a plain-HTTP cache) is never trusted: the
engine's commit checks the sha256 of the whole file. Its announce URL is ignored; the
tracker asked is the cache's own ``/announce``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from fetchd.config import Config
from fetchd.errors import BadTorrent, BlobNotFound, FetchdError, SwarmFailed
from fetchd.model import Descriptor
from fetchd.sources.base import OnBytes, RangeFetcher, Sink
from fetchd.sources.http import redact
from fetchd.store.cas import SegmentedIngest
from fetchd.threads import finish, run_in

if TYPE_CHECKING:
    import aiohttp

    from fetchd.bt.metainfo import Torrent
    from fetchd.bt.session import Metainfo, Swarm
    from fetchd.store.meta import Meta

log = logging.getLogger(__name__)

#: media types whose blobs may come through the swarm (layers: the big ones)
_NOT_LAYERS = ("config", "manifest", "index")
#: the state of a sink is saved at most this often while pieces are copied in
SAVE_EVERY = 2.0
#: bound on a torrent's size (a canonical one is ~41 KB; a 1 TiB blob's ~1.3 MB)
MAX_TORRENT_BYTES = 8 << 20
#: pieces one slice may hold (the cache hands out a few MiB at a time)
MAX_SLICE = 256
#: seconds between two asks for a slice once the cache has none left in this round, and
#: how many such asks at most (the download's end stops them first)
SLICE_POLL = 2.0
MAX_SLICE_POLLS = 3600
#: seconds a pull waits, as it ends, for the caches it took slices from to hear it
DONE_BUDGET = 5.0
#: bytes/s below which a swarm download is handed to HTTP (as segments.py's floor), and
#: the windows it is measured over at most
SWARM_FLOOR = 64 << 10
MAX_WINDOWS = 100_000


def _client_error() -> type[Exception]:
    """aiohttp's ClientError, imported when first needed: a plain URL pull never loads
    aiohttp (0.14-0.24 s of CPU at every start)."""
    import aiohttp

    return aiohttp.ClientError


async def read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes (SwarmFailed beyond): aiohttp's read(n)
    returns what is buffered, which on a real network is a part of it."""
    chunks: list[bytes] = []
    total = 0
    while chunk := await resp.content.read(64 << 10):
        total += len(chunk)
        if total > limit:
            raise SwarmFailed(f"{redact(str(resp.url))} sent more than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class Swarms:
    """The process's one libtorrent session, started on first use (an engine owns it,
    or ``fetchd serve`` hands its own in). Its listen address is ``--bt-listen``, else
    the address this host uses to reach the first cache asked (never a wildcard)."""

    def __init__(self, config: Config, swarm: Swarm | None = None) -> None:
        self.config = config
        self._swarm = swarm
        self._own = swarm is None
        self._lock = asyncio.Lock()
        #: this process's name for itself when it takes a cache's slices (``?pull=``)
        self.pull = secrets.token_urlsafe(16)
        #: the slice URLs this process took from (with the session to tell them by)
        self._took: dict[str, aiohttp.ClientSession] = {}

    async def get(self, towards: str) -> Swarm:
        async with self._lock:
            if self._swarm is None:
                from fetchd.bt.session import Swarm

                listen = self.config.bt_listen
                if not listen:
                    listen = await asyncio.to_thread(_local_address, towards)
                swarm = Swarm(self.config, listen)
                await swarm.start()
                self._swarm = swarm
            return self._swarm

    @property
    def started(self) -> Swarm | None:
        return self._swarm

    async def close(self) -> None:
        if self._own and self._swarm is not None:
            swarm, self._swarm = self._swarm, None
            stats = swarm.stats()
            log.info(
                "BitTorrent: sent %s bytes to peers, received %s",
                stats.get("uploaded", 0),
                stats.get("downloaded", 0),
            )
            try:
                await swarm.close()
            finally:  # also when a SIGTERM cancels the close: the caches still hear it
                await self._done_slicing()

    def took(self, url: str, session: aiohttp.ClientSession) -> None:
        """This process takes slices at ``url`` (a cache's ``/fetchd/v1/slices/…?pull=``).
        Kept only when the session is this process's own: one handed in (``fetchd
        serve``'s) keeps seeding, and the cache's time rule is right for it."""
        if self._own:
            self._took.setdefault(url, session)

    async def _done_slicing(self) -> None:
        """Tell each cache this process took slices from that it neither takes nor seeds
        them any more (``DELETE``): once every pull of a round said so, the cache hands
        the next pull of the blob slices at once instead of SLICE_ROUND later. Best
        effort, bounded: a cache that does not hear it starts its next round by time."""
        took, self._took = self._took, {}

        async def tell(url: str, session: aiohttp.ClientSession) -> None:
            try:
                async with session.delete(url, allow_redirects=False):
                    pass
            except (_client_error(), OSError) as exc:
                log.debug("%s did not hear that the slices are done: %s", redact(url), exc)

        if took:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DONE_BUDGET):
                    await asyncio.gather(*(tell(u, s) for u, s in took.items()))


def _local_address(url: str) -> str:
    """The local address a connection to ``url``'s host leaves from (a UDP connect
    sends nothing): the LAN address peers of that cache can reach, any free port."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    try:
        info = socket.getaddrinfo(host, parts.port or 80, type=socket.SOCK_DGRAM)
        family, _, _, _, addr = info[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            local = str(s.getsockname()[0])
    except OSError as exc:
        raise SwarmFailed(
            f"cannot tell which address reaches {parts.netloc} ({exc}); pass --bt-listen ADDR"
        ) from exc
    return f"[{local}]:0" if ":" in local else f"{local}:0"


class SwarmFetcher:
    """A blob's bytes from the swarm of a ``fetchd serve`` cache (``mirror``: its base
    URL); see the module's docstring. Not a RangeFetcher: the engine asks it first, and
    the range fetchers after it fill what it left. Calls may overlap (other blobs)."""

    def __init__(
        self,
        mirror: str,
        repository: str,
        session: aiohttp.ClientSession,
        config: Config,
        swarms: Swarms,
        meta: Meta,
        http: RangeFetcher | None = None,
    ) -> None:
        self.mirror = mirror.rstrip("/")
        #: the cache's own blob endpoint, for the slices it hands this host (see _take)
        self.http = http
        self.repository = repository
        self.session = session
        self.config = config
        self.swarms = swarms
        self.meta = meta
        self.label = f"swarm of {redact(self.mirror)}"
        #: hex digests this fetcher downloaded: seeded once committed
        self.fetched: set[str] = set()

    def wants(self, desc: Descriptor) -> bool:
        """Whether ``desc`` is one for the swarm: a layer of at least the minimum size."""
        kind = (desc.media_type or "").lower()
        return desc.size >= self.config.torrent_min_size and not any(k in kind for k in _NOT_LAYERS)

    async def fetch(
        self, desc: Descriptor, sink: Sink, on_bytes: OnBytes, *, last: bool = True
    ) -> None:
        if not self.wants(desc) or not isinstance(sink, SegmentedIngest):
            raise BlobNotFound(f"{desc.digest.short} is not for the swarm (small or not a layer)")
        torrent = await self._torrent(desc)
        swarm = await self.swarms.get(self.mirror)
        work = sink.data_path.parent / "swarm"
        copier = PieceCopier(sink, torrent, work, on_bytes)
        skip = torrent.pieces_within(list(sink.ranges))
        log.info(
            "%s: from the swarm of %s (%d of %d pieces missing)",
            desc.digest.short,
            redact(self.mirror),
            torrent.num_pieces - len(skip),
            torrent.num_pieces,
        )
        ok = False
        taker: asyncio.Task[None] | None = None
        if self.http is not None and len(skip) < torrent.num_pieces:
            taker = asyncio.ensure_future(self._take(desc, torrent, swarm, copier, self.http))
        download = asyncio.ensure_future(
            swarm.download(
                torrent,
                work.parent,
                work.name,
                trackers=[f"{self.mirror}/announce"],
                skip=skip,
                on_piece=copier.piece,
                stall_timeout=self.config.bt_stall_timeout,
                max_hash_failures=self.config.bt_max_hash_failures,
            )
        )
        floor = asyncio.ensure_future(self._floor(desc, copier))
        try:
            await asyncio.wait({download, floor}, return_when=asyncio.FIRST_COMPLETED)
            if not download.done():
                floor.result()  # raises: the swarm runs below the floor
            try:
                download.result()
            except BadTorrent as exc:  # libtorrent refused what metainfo accepted
                raise SwarmFailed(
                    f"libtorrent refused the torrent of {desc.digest.short}: {exc}"
                ) from exc
            ok = True
        finally:
            for task in (taker, floor, download):
                if task is not None:
                    task.cancel()
            # The download removes its torrent before it ends (shielded): wait for that.
            await asyncio.wait({t for t in (taker, floor, download) if t is not None})
            await copier.close()
            if ok or not sink.gaps():
                with contextlib.suppress(OSError):
                    work.unlink()
        if sink.gaps():
            raise SwarmFailed(
                f"the swarm finished {desc.digest.short} with {len(sink.gaps())} ranges missing"
            )
        self.fetched.add(desc.digest.hex)
        # Every piece came from the swarm and the cache's piece hashes held for all of them:
        # the torrent is proven (the commit will check the blob's sha256 too).
        await asyncio.to_thread(self.meta.put_torrent, str(desc.digest), torrent.raw)

    async def _floor(self, desc: Descriptor, copier: PieceCopier) -> None:
        """Raise SwarmFailed once the swarm delivers less than SWARM_FLOOR bytes/s over a
        window of 2 × the stall timeout: a peer that drips one piece just within every
        stall timeout would otherwise hold the blob for hours, HTTP never asked."""
        window = 2 * self.config.bt_stall_timeout
        for _ in range(MAX_WINDOWS):
            before = copier.copied
            await asyncio.sleep(window)
            rate = (copier.copied - before) / window
            if rate < SWARM_FLOOR:
                raise SwarmFailed(
                    f"the swarm delivered {desc.digest.short} at {rate / 1024:.0f} KiB/s over "
                    f"{window:.0f} s, below {SWARM_FLOOR >> 10} KiB/s"
                )
        raise SwarmFailed(f"the swarm download of {desc.digest.short} took too long")

    async def _take(
        self,
        desc: Descriptor,
        torrent: Torrent,
        swarm: Swarm,
        copier: PieceCopier,
        http: RangeFetcher,
    ) -> None:
        """While the swarm downloads, take the slices the cache hands this host: pieces
        nobody has taken yet (``/fetchd/v1/slices/``), fetched over HTTP ranges from the
        cache and given to libtorrent (``add_piece``: it checks them and announces them
        to the other hosts). So the cache sends each piece about once, and the hosts trade
        the rest among themselves. Anything going wrong here only ends the taking: the
        swarm and the engine's HTTP fallback still finish the blob."""
        digest = quote(str(desc.digest), safe=":")
        url = f"{self.mirror}/fetchd/v1/slices/{digest}?pull={self.swarms.pull}"
        self.swarms.took(url, self.session)
        try:
            for _ in range(torrent.num_pieces + MAX_SLICE_POLLS):
                async with asyncio.timeout(self.config.request_budget):
                    async with self.session.get(url, allow_redirects=False) as resp:
                        if resp.status == 204:
                            doc = None  # every piece handed out in this round, for now
                        elif resp.status == 200:
                            doc = json.loads(await read_body(resp, 4096))
                        else:
                            return  # 404: this cache hands out no slices
                if doc is None:
                    # A round starts over when nobody took a slice for a while: what the
                    # swarm still lacks then (a host that took slices and died) comes
                    # from the cache, pieces this host has are skipped.
                    await asyncio.sleep(SLICE_POLL)
                    continue
                first, end = int(doc["first"]), int(doc["end"])
                if not 0 <= first < end <= torrent.num_pieces or end - first > MAX_SLICE:
                    log.warning("%s: the cache handed out a bad slice %r", desc.digest.short, doc)
                    return
                await self._fetch_slice(desc, torrent, swarm, copier, http, first, end)
        except (_client_error(), TimeoutError, OSError, ValueError, KeyError, TypeError) as exc:
            log.info("%s: stopped taking slices from the cache: %s", desc.digest.short, exc)
        except FetchdError as exc:
            log.info("%s: stopped taking slices from the cache: %s", desc.digest.short, exc)

    async def _fetch_slice(
        self,
        desc: Descriptor,
        torrent: Torrent,
        swarm: Swarm,
        copier: PieceCopier,
        http: RangeFetcher,
        first: int,
        end: int,
    ) -> None:
        wanted = [i for i in range(first, end) if i not in copier.had]
        if not wanted:
            return
        start, stop = torrent.span(wanted[0])[0], torrent.span(wanted[-1])[1]
        where = await http.locate(desc)
        headers = {**where.headers, "Range": f"bytes={start}-{stop - 1}"}
        async with asyncio.timeout(self.config.request_budget + (stop - start) / (64 << 10)):
            async with self.session.get(where.url, headers=headers) as resp:
                if resp.status != 206:
                    raise SwarmFailed(f"the cache answered {resp.status} to a slice's range")
                for i in range(wanted[0], wanted[-1] + 1):
                    a, b = torrent.span(i)
                    data = await resp.content.readexactly(b - a)
                    if i not in copier.had:
                        await swarm.add_piece(torrent.hex, i, data)

    async def committed(self, desc: Descriptor, blob_dir: Path) -> None:
        """The engine committed ``desc``: seed it from the store (if this fetcher had it)."""
        if desc.digest.hex not in self.fetched:
            return
        swarm = self.swarms.started
        raw = await asyncio.to_thread(self.meta.torrent, str(desc.digest))
        if swarm is None or raw is None:
            return
        from fetchd.bt.metainfo import canonical

        try:
            await swarm.seed(
                canonical(raw, desc.digest.hex, desc.size),
                blob_dir,
                trackers=[f"{self.mirror}/announce"],
            )
        except FetchdError as exc:
            log.warning("%s: not seeded: %s", desc.digest.short, exc)

    async def _torrent(self, desc: Descriptor) -> Torrent:
        """The blob's torrent: the one this store validated before, else the cache's,
        accepted only in fetchd's canonical form (else: SwarmFailed, HTTP follows)."""
        from fetchd.bt.metainfo import canonical

        key = str(desc.digest)
        raw = await asyncio.to_thread(self.meta.torrent, key)
        if raw is not None:
            with contextlib.suppress(BadTorrent):
                return canonical(raw, desc.digest.hex, desc.size)
        # No ?name=: it only names the web seed in the url-list, which fetchd does not use
        # (its HTTP fallback is the engine's); the cache's default name always routes.
        url = f"{self.mirror}/fetchd/v1/torrents/{quote(key, safe=':')}"
        try:
            async with asyncio.timeout(self.config.request_budget):
                async with self.session.get(url, allow_redirects=False) as resp:
                    if resp.status == 404:
                        raise BlobNotFound(
                            f"{redact(self.mirror)} has no torrent for {desc.digest.short}"
                        )
                    if resp.status != 200:
                        raise SwarmFailed(
                            f"{redact(self.mirror)} answered {resp.status} for the torrent of "
                            f"{desc.digest.short}"
                        )
                    if (resp.content_length or 0) > MAX_TORRENT_BYTES:
                        raise SwarmFailed(f"the torrent of {desc.digest.short} is too big")
                    body = await read_body(resp, MAX_TORRENT_BYTES)
        except (_client_error(), TimeoutError, OSError) as exc:
            raise SwarmFailed(
                f"cannot get the torrent of {desc.digest.short} from {redact(self.mirror)}: "
                f"{exc or type(exc).__name__}"
            ) from exc
        try:
            torrent = canonical(body, desc.digest.hex, desc.size)
        except BadTorrent as exc:
            log.warning(
                "%s: refused the torrent from %s: %s; the blob comes over HTTP",
                desc.digest.short,
                redact(self.mirror),
                exc,
            )
            raise SwarmFailed(f"refused the torrent of {desc.digest.short}: {exc}") from exc
        return torrent  # stored once the swarm proved its piece hashes (see fetch)


class PieceCopier:
    """Copies the pieces libtorrent verified from its swarm file into the sink's gaps,
    one at a time, in the order they finished (on the store pool)."""

    def __init__(
        self, sink: SegmentedIngest, torrent: Metainfo, work: Path, on_bytes: OnBytes
    ) -> None:
        self.sink = sink
        self.torrent = torrent
        self.work = work
        self.on_bytes = on_bytes
        self._queue: asyncio.Queue[int | None] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._run())
        self._fd = -1
        #: pieces libtorrent reported (verified and in the swarm file)
        self.had: set[int] = set()
        #: bytes copied into the sink so far
        self.copied = 0
        self._saved = time.monotonic()
        self.error: BaseException | None = None

    def piece(self, index: int) -> None:
        self.had.add(index)
        self._queue.put_nowait(index)

    async def _run(self) -> None:
        stop = False
        while not stop:
            # every piece reported meanwhile in one job: one thread handoff, not one each
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            stop = None in batch
            spans = [self.torrent.span(i) for i in batch if i is not None]
            if spans:
                if self._fd < 0:
                    self._fd = os.open(self.work, os.O_RDONLY | os.O_CLOEXEC)
                n = await self.sink.copy_gaps(self._fd, spans)
                if n:
                    self.copied += n
                    self.on_bytes(n)
            if time.monotonic() - self._saved > SAVE_EVERY:
                self._saved = time.monotonic()
                await finish(run_in("store", self.sink.save_state))

    async def close(self) -> None:
        self._queue.put_nowait(None)
        try:
            await finish(self._task)  # to its end, even when cancelled again meanwhile
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            with contextlib.suppress(OSError):
                await finish(run_in("store", self.sink.save_state))
