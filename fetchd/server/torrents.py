"""The BitTorrent face of ``fetchd serve``: per-blob torrents, a tracker, seeding.

``GET /fetchd/v1/torrents/sha256:HEX[?name=REPO]`` hands out the blob's canonical
torrent (fetchd/bt/metainfo.py) with ``announce`` (this server's tracker) and a
``url-list`` web seed (BEP 19: the OCI blob URL of this server, which answers ``Range``),
for any committed blob a client asks for (the client decides by size whether a swarm is
worth it); 404 otherwise. ``GET /announce`` is a BEP 3 tracker with BEP 23 compact peers
and BEP 7 ``peers6``, for the info-hashes this server handed out only.

Who verifies: the torrent is built from the committed blob (whose bytes the store
verified at commit); a client checks it against the canonical rule for the digest and
size it resolved (``metainfo.canonical``) and the blob's sha256 at its own commit. The
server's seeding session is libtorrent in upload mode (fetchd/bt/session.py): it never
writes a blob. A piece that fails its hash while seeding means the stored blob is bad:
it is re-hashed and quarantined as ``fetchd fsck`` does (or, if it is good, the torrent
row was wrong and is forgotten).

Seeding: every blob of at least ``torrent_min_size`` gets a torrent (at start, one at a
time in the background, for blobs that have none yet; as pull-through commits them), and
is seeded *on demand*: libtorrent holds at most ``bt_seeds`` (``--bt-seeds``) of them at
once, least recently used out first. A blob is loaded into the session when a client asks
for its torrent, its slices, or announces its swarm to the tracker (the announce waits for
the load, so its answer lists this server's seed); one just committed is loaded too. Each
seed costs libtorrent memory (200 of them 3.4 MiB here), and a store of many thousand
blobs must not cost a session of many thousand torrents. gc unseeds a blob (and waits for
libtorrent to let go of it) before deleting it (:meth:`Torrents.before_delete`); a blob
deleted by another process (``fetchd gc``) is unseeded by a check every CHECK_INTERVAL
seconds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import ipaddress
import logging
import os
import random
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, unquote_to_bytes

from aiohttp import web

from fetchd.bt.metainfo import Torrent, TorrentBuilder, bencode, canonical
from fetchd.errors import (
    BadTorrent,
    BlobNotFound,
    DigestInvalid,
    FetchdError,
    ReferenceInvalid,
    StoreError,
)
from fetchd.model import Descriptor, Digest, is_valid_repository_name
from fetchd.store.cas import Store

if TYPE_CHECKING:
    from fetchd.bt.session import Swarm
    from fetchd.server.cache import Cache

log = logging.getLogger(__name__)

# --- the tracker -----------------------------------------------------------------------

#: Seconds between a peer's announces. Public trackers say 30 min (opentracker 1841 s) to
#: spare themselves; on a LAN an announce costs a few microseconds here, and a host that
#: joins a swarm late is found by the others only at their next announce, so it is short.
INTERVAL = 30
#: The least a client may wait between two announces (clients re-announce early when
#: they lack peers): enough to keep a looping client from hammering the server.
MIN_INTERVAL = 10
EXPIRY = 2 * INTERVAL  # a peer that stopped announcing is forgotten after this many seconds
NUMWANT_DEFAULT = 50
NUMWANT_MAX = 200
MAX_PEERS = 1000  # peers listed per swarm; a new one beyond this is answered, not listed
#: ports one address may list in one swarm (several fetchd on one host are fine; a host
#: announcing 1000 fake ports to crowd out the real peers is not)
MAX_PORTS_PER_ADDRESS = 8
MAX_SWARMS = 10_000  # swarms with peers at once
MAX_QUERY = 2048  # bytes of an announce's query string (clients send about 300)
MAX_PARAMS = 32  # parameters of an announce

CHECK_INTERVAL = 10.0  # seconds between two looks for seeded blobs that vanished
#: seconds an announce waits for its blob's seed to be loaded (then it is answered anyway)
LOAD_WAIT = 10.0
BUILD_CONCURRENCY = 2  # torrents built at once (each reads its blob whole)
DELETE_WAIT = 60.0  # seconds gc waits for the unseeding of the blobs it will delete
HASH_CHUNK = 1 << 20  # read into one buffer per build: 200 blobs at start cost 2 MiB of RSS
BITTORRENT = "application/x-bittorrent"
#: fetchd's own peers (their peer id starts with this): they take slices over HTTP
FETCHD_PEER_ID = b"-FD"
#: pieces in one slice at most (4 MiB at 256 KiB pieces), and slices per blob at least
SLICE_PIECES = 16
SLICES_PER_BLOB = 32
#: seconds after its last slice was handed out that a blob's slicing starts over (the
#: hosts that took them are done or gone; a new round of pulls gets slices again), unless
#: every pull that took one said it is done (then it starts over at once)
SLICE_ROUND = 8.0
#: pulls one round of a blob's slices keeps track of (more: the round ends by time only)
MAX_TAKERS = 1024
#: a pull's token in ``?pull=`` (the client's random name for itself)
_PULL_TOKEN = re.compile(r"[A-Za-z0-9_-]{8,64}")


class Slicer:
    """Hands out a blob's pieces in slices, each once per round, to the fetchd hosts
    pulling it (``GET /fetchd/v1/slices/``): they take their slices over HTTP and trade
    the rest among themselves, so the cache sends about one copy of the blob however
    many hosts pull it. The tracker does not list the cache's own seed to them (see
    :meth:`Tracker._announce`); third-party clients still get it."""

    def __init__(self, num_pieces: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.num_pieces = num_pieces
        self.size = max(1, min(SLICE_PIECES, -(-num_pieces // SLICES_PER_BLOB)))
        self.clock = clock
        self.next = 0
        self.last = 0.0
        self.handed = 0  # slices handed out in all (metrics)
        #: the pulls that took a slice in this round (their ``?pull=`` token) → done
        self.takers: dict[str, bool] = {}
        #: whether a slice of this round went to a pull that gave no token (or one past
        #: MAX_TAKERS): nobody can tell when that one is done, so the round ends by time
        self.untracked = False

    def take(self, pull: str | None = None) -> tuple[int, int] | None:
        """The next slice for the pull named ``pull`` (None: it gave no token), or None
        when every piece was handed out in this round.

        A round starts over once every piece was handed out and either SLICE_ROUND
        seconds passed since the last one, or a pull new to the round asks while every
        pull that took a slice said it is done (:meth:`done`): the next pull of the blob
        (a new rollout) gets slices at once, while a late host of a rollout still under
        way or still seeding gets its pieces from the swarm, not from the cache again."""
        now = self.clock()
        if self.next >= self.num_pieces and (now - self.last > SLICE_ROUND or self._finished(pull)):
            self.next = 0  # a new round
            self.takers.clear()
            self.untracked = False
        if self.next >= self.num_pieces:
            return None
        first = self.next
        self.next = min(self.num_pieces, first + self.size)
        self.last = now
        self.handed += 1
        if pull is not None and (pull in self.takers or len(self.takers) < MAX_TAKERS):
            self.takers[pull] = False
        else:
            self.untracked = True
        return first, self.next

    def done(self, pull: str) -> None:
        """The pull named ``pull`` neither takes slices of this blob nor seeds it any more
        (it ended): what it took is no longer in the swarm through it."""
        if pull in self.takers:
            self.takers[pull] = True

    def _finished(self, pull: str | None) -> bool:
        return (
            pull is not None
            and pull not in self.takers
            and bool(self.takers)
            and not self.untracked
            and all(self.takers.values())
        )


@dataclass(slots=True)
class _Peer:
    expires: float  # monotonic
    seed: bool


class Tracker:
    """BEP 3 announce state, in memory. Used from the event loop only.

    Accepts only the info-hashes given to :meth:`allow` (the torrents this server
    handed out) and peers whose address (taken from the connection, never from
    ``ip=``) is inside ``networks`` (``--bt-allow``). The server's own seeding
    session, given per swarm with :meth:`own`, is in every answer for that swarm.
    """

    def __init__(self, networks: Iterable[str], clock: Callable[[], float] = time.monotonic):
        self.networks = [ipaddress.ip_network(n, strict=False) for n in networks]
        self.clock = clock
        self.allowed: dict[bytes, str] = {}  # info-hash → hex
        self.seeds: dict[bytes, tuple[str, int]] = {}  # info-hash → this server's session
        self.swarms: dict[bytes, dict[tuple[str, int], _Peer]] = {}
        self.announces: collections.Counter[str] = collections.Counter()  # ok / refused

    def allow(self, info_hash: bytes, hex: str) -> None:
        self.allowed[info_hash] = hex

    def own(self, info_hash: bytes, address: tuple[str, int] | None) -> None:
        """This server's seeding session is (``address``) or is no longer (None) a peer."""
        if address is None:
            self.seeds.pop(info_hash, None)
        else:
            self.seeds[info_hash] = address

    def forget(self, info_hash: bytes) -> None:
        """The blob is gone: its swarm is refused from now on."""
        self.allowed.pop(info_hash, None)
        self.seeds.pop(info_hash, None)
        self.swarms.pop(info_hash, None)

    @property
    def peers(self) -> int:
        return sum(len(s) for s in self.swarms.values())

    def sweep(self) -> None:
        """Forget expired peers, and swarms left empty."""
        now = self.clock()
        for ih in list(self.swarms):
            swarm = self.swarms[ih]
            for key in [k for k, p in swarm.items() if p.expires < now]:
                del swarm[key]
            if not swarm:
                del self.swarms[ih]

    def announce(self, raw_query: str, remote: str | None) -> bytes:
        """The bencoded answer to one announce (a ``failure reason`` when refused)."""
        try:
            reply = self._announce(raw_query, remote)
        except _Refused as exc:
            self.announces["refused"] += 1
            return bencode({b"failure reason": str(exc).encode()})
        self.announces["ok"] += 1
        return bencode(reply)

    def _announce(self, raw_query: str, remote: str | None) -> dict[bytes, object]:
        q = _parse_query(raw_query)
        ih = q.get("info_hash", b"")
        if len(ih) != 20:
            raise _Refused("bad announce: info_hash is not 20 bytes")
        port_text = q.get("port", b"")
        if not (port_text.isdigit() and len(port_text) <= 5 and 0 < int(port_text) < 65536):
            raise _Refused("bad announce: port is not 1 to 65535")
        if ih not in self.allowed:
            raise _Refused("unknown info_hash: ask this server for the blob's torrent first")
        ip = _peer_address(remote)
        if ip is None or not any(ip in net for net in self.networks):
            raise _Refused("your address is outside the networks this tracker serves")
        me = (str(ip), int(port_text))
        now = self.clock()
        swarm = self.swarms.get(ih)
        if swarm is None:
            if len(self.swarms) >= MAX_SWARMS:
                self.sweep()
            if len(self.swarms) >= MAX_SWARMS:
                raise _Refused("the tracker is full; try again later")
            swarm = self.swarms[ih] = {}
        for key in [k for k, p in swarm.items() if p.expires < now]:
            del swarm[key]
        seed = q.get("left") == b"0"
        if q.get("event") == b"stopped":
            swarm.pop(me, None)
            if not swarm:
                del self.swarms[ih]
            return {b"interval": INTERVAL, b"min interval": MIN_INTERVAL, b"peers": b""}
        same_host = sum(1 for a, _ in swarm if a == me[0])
        if me in swarm or (len(swarm) < MAX_PEERS and same_host < MAX_PORTS_PER_ADDRESS):
            swarm[me] = _Peer(now + EXPIRY, seed)
        want_text = q.get("numwant", b"")
        want = int(want_text) if want_text.isdigit() and len(want_text) <= 6 else NUMWANT_DEFAULT
        want = min(want, NUMWANT_MAX)
        own = self.seeds.get(ih)
        chosen: list[tuple[str, int]] = []
        fetchd_peer = q.get("peer_id", b"").startswith(FETCHD_PEER_ID)
        if own is not None and own != me and not seed and want > 0 and not fetchd_peer:
            # The one peer that surely has every piece. fetchd hosts take their slices
            # over HTTP instead (Slicer): seeding to them too would send more copies.
            chosen.append(own)
        # A seed has nothing to get from other seeds: it is given leechers only.
        others = [k for k, p in swarm.items() if k != me and k != own and not (seed and p.seed)]
        chosen += random.sample(others, min(max(0, want - len(chosen)), len(others)))
        v4 = b"".join(_compact(a, p) for a, p in chosen if ":" not in a)
        v6 = b"".join(_compact(a, p) for a, p in chosen if ":" in a)
        seeds = sum(p.seed for p in swarm.values()) + (own is not None)
        reply: dict[bytes, object] = {
            b"interval": INTERVAL,
            b"min interval": MIN_INTERVAL,
            b"complete": seeds,
            b"incomplete": len(swarm) + (own is not None) - seeds,
            b"peers": v4,
        }
        if v6:
            reply[b"peers6"] = v6
        return reply


class _Refused(Exception):
    """An announce answered with a ``failure reason``."""


def _pull_token(request: web.Request) -> str | None:
    """The ``?pull=`` token of a slice request, None when absent or not a token."""
    pull = request.query.get("pull")
    return pull if pull is not None and _PULL_TOKEN.fullmatch(pull) else None


def _parse_query(raw: str) -> dict[str, bytes]:
    """An announce's query string, still percent-encoded (``info_hash`` and ``peer_id``
    are raw bytes: aiohttp's ``request.query`` would decode them as UTF-8). The first
    value of a repeated parameter counts."""
    if len(raw) > MAX_QUERY:
        raise _Refused(f"the announce's query is over {MAX_QUERY} bytes")
    parts = raw.split("&")
    if len(parts) > MAX_PARAMS:
        raise _Refused(f"the announce has over {MAX_PARAMS} parameters")
    q: dict[str, bytes] = {}
    for part in parts:
        k, _, v = part.partition("=")
        q.setdefault(unquote(k), unquote_to_bytes(v.replace("+", " ")))
    return q


def _peer_address(remote: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not remote:
        return None
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _compact(address: str, port: int) -> bytes:
    """BEP 23 (IPv4, 6 bytes) or BEP 7 (IPv6, 18 bytes) form of one peer."""
    return ipaddress.ip_address(address).packed + port.to_bytes(2, "big")


# --- torrents and seeding --------------------------------------------------------------

_HOST = re.compile(r"(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")


class Torrents:
    """The server's torrents, tracker and seeding session (``swarm``: None when
    libtorrent is not there; torrents and the tracker still work, web seed included).

    Use :meth:`running` around the server's life. Methods run on the event loop, except
    :meth:`before_delete` and :meth:`after_delete`, which gc's thread calls, and
    :meth:`corrupt`, which may be called from any thread. Calls may overlap: one build
    per blob however many clients ask (single flight)."""

    def __init__(self, cache: Cache, swarm: Swarm | None) -> None:
        self.cache = cache
        self.store: Store = cache.store
        self.meta = cache.meta
        self.min_size = cache.config.torrent_min_size
        self.swarm = swarm
        self.tracker = Tracker(cache.config.bt_allow)
        self._hashes: dict[str, bytes] = {}  # hex → info-hash of every torrent known
        self._seedable: set[str] = set()  # hexes of those at least min_size: seeded on demand
        self.max_seeds = max(1, cache.config.bt_seeds)
        self._loaded: collections.OrderedDict[str, None] = collections.OrderedDict()  # LRU first
        self._loading = asyncio.Lock()  # one eviction + load at a time: the bound holds
        self._slicers: dict[str, Slicer] = {}  # hex → its slices (handle_slice)
        self.slices_handed = 0  # by slicers cleared since
        self._building: dict[str, asyncio.Future[Torrent]] = {}
        self._build_slots = asyncio.Semaphore(BUILD_CONCURRENCY)
        self._doomed: set[str] = set()  # blobs gc is deleting: never seeded again meanwhile
        self._tg: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # what _spawn started, cancelled at exit
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifetime -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Torrents]:
        """Start the session (SwarmFailed if it cannot listen), seed what the store has,
        and on exit stop every task and close the session."""
        async with asyncio.TaskGroup() as tg:
            self._tg, self._loop = tg, asyncio.get_running_loop()
            try:
                if self.swarm is not None:
                    await self.swarm.start()
                    log.info("BitTorrent: seeding from %s:%d", *self.swarm.address)
                self._spawn(self._start_seeding(), "start")
                self._spawn(self._watch(), "watch")
                yield self
            finally:
                self._tg = None
                for task in list(self._tasks):
                    task.cancel()
                if self.swarm is not None:
                    await self.swarm.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """A task of the server's (cancelled when it stops); none once it is stopping."""
        if self._tg is None:
            coro.close()
            return
        task = self._tg.create_task(_logged(coro, name), name=f"fetchd-torrent-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_seeding(self) -> None:
        """Know every blob with a torrent row (the rows of vanished blobs are dropped;
        the others are seeded on demand), then build the torrents of blobs of at least
        min_size that have none, one by one (each is one pass over the blob)."""
        loaded, missing = await asyncio.to_thread(self._load_rows)
        for t in loaded:
            self._know(t)
        if loaded:
            log.info("BitTorrent: %d torrents from the store", len(loaded))
        if self.swarm is None:
            return
        for digest in missing:
            try:
                await self.torrent(digest, load=False)
            except FetchdError as exc:
                log.warning("BitTorrent: no torrent for %s: %s", digest.short, exc)

    def _load_rows(self) -> tuple[list[Torrent], list[Digest]]:
        loaded: list[Torrent] = []
        gone: list[str] = []
        rows = set(self.meta.torrents())
        for text in sorted(rows):
            digest = Digest.parse(text)
            size = self.store.blob_size(digest)
            raw = self.meta.torrent(text) if size is not None else None
            if size is None or raw is None:
                gone.append(text)
                continue
            try:
                loaded.append(canonical(raw, digest.hex, size))
            except BadTorrent as exc:
                log.warning("BitTorrent: the stored torrent of %s is refused: %s", text, exc)
                gone.append(text)
        if gone:
            self.meta.forget_torrents(gone)
        missing = [
            d
            for d, p in self.store.iter_blobs()
            if d.algorithm == "sha256" and str(d) not in rows and _size(p) >= self.min_size
        ]
        return loaded, missing

    async def _watch(self) -> None:
        """Every CHECK_INTERVAL: forget expired tracker peers; unseed blobs gone from the
        store behind the server's back (another process's gc)."""
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            self.tracker.sweep()
            if self.swarm is None:
                continue
            seeded = sorted(self.swarm.seeding() - self._doomed)
            gone = await asyncio.to_thread(self._vanished, seeded)
            for hex in gone:
                log.info("BitTorrent: blob %s left the store: unseeded", hex[:12])
                await self._drop(hex)
            if gone:
                await asyncio.to_thread(self.meta.forget_torrents, [f"sha256:{h}" for h in gone])

    def _vanished(self, hexes: Iterable[str]) -> list[str]:
        return [h for h in hexes if not self.store.has(Digest("sha256", h))]

    # --- torrents -------------------------------------------------------------------------

    async def torrent(self, digest: Digest, *, load: bool = True) -> Torrent:
        """The blob's canonical torrent (from fetchd.db, else built from the blob on a
        thread and stored), allowed at the tracker, and (``load``) loaded into the
        seeding session. BlobNotFound when the blob is not committed. One build per blob
        at a time, and the load, owned by the server: a client that goes away does not
        stop them."""
        fut = self._building.get(digest.hex)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(_retrieve)
            if self._tg is None:
                raise FetchdError("the server is shutting down")
            self._building[digest.hex] = fut
            self._spawn(self._make(digest, fut), f"build-{digest.hex}")
        t = await asyncio.shield(fut)
        if load and self.swarm is not None and self._tg is not None:
            # _logged: an unexpected error while loading must not stop the server
            seeding = self._tg.create_task(
                _logged(self._seed(t), f"load-{t.hex[:12]}"), name=f"fetchd-torrent-load-{t.hex}"
            )
            self._tasks.add(seeding)
            seeding.add_done_callback(self._tasks.discard)
            await asyncio.shield(seeding)
        return t

    async def _make(self, digest: Digest, fut: asyncio.Future[Torrent]) -> None:
        try:
            async with self._build_slots:
                t = await asyncio.to_thread(self._load_or_build, digest)
            self._know(t)
            fut.set_result(t)
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except Exception as exc:
            fut.set_exception(exc)
        finally:
            if self._building.get(digest.hex) is fut:
                del self._building[digest.hex]

    def _load_or_build(self, digest: Digest) -> Torrent:
        """:meth:`_build` with the store's failures (a disk error, fetchd.db) as StoreError."""
        try:
            return self._build(digest)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot make the torrent of blob {digest.short}: {exc}") from exc

    def _build(self, digest: Digest) -> Torrent:
        path = self.store.blob_path(digest)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest.short} is not in this cache") from None
        raw = self.meta.torrent(str(digest))
        if raw is not None:
            try:
                return canonical(raw, digest.hex, size)
            except BadTorrent as exc:
                log.warning("BitTorrent: the stored torrent of %s is refused: %s", digest, exc)
        log.info("BitTorrent: building the torrent of %s from the stored blob", digest.short)
        try:
            t = build_checked(path, digest, size)
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest.short} left the store meanwhile") from None
        except _Corrupt:
            if quarantine_if_corrupt(self.store, digest):
                log.warning("BitTorrent: blob %s is corrupt: moved to quarantine/", digest)
            raise BlobNotFound(f"blob {digest.short} is corrupt (quarantined)") from None
        self.meta.put_torrent(str(digest), t.raw)
        return t

    def _know(self, t: Torrent) -> None:
        self._hashes[t.hex] = t.info_hash
        self.tracker.allow(t.info_hash, t.hex)
        if t.size >= self.min_size:
            self._seedable.add(t.hex)

    async def _seed(self, t: Torrent) -> None:
        """Load ``t`` into the seeding session unless it is below min_size: anyone may
        ask for any blob's torrent (its web seed works for every client), but only the
        big ones cost a seed's memory and a read of the whole blob. At most ``max_seeds``
        are loaded: the least recently used one is unseeded first."""
        if self.swarm is None or t.hex in self._doomed or t.size < self.min_size:
            return
        async with self._loading:
            if self._touch(t.hex):
                return
            self._loaded.pop(t.hex, None)
            while len(self._loaded) >= self.max_seeds:
                old, _ = self._loaded.popitem(last=False)
                await self._unload(old)
            try:
                await self.swarm.seed(t, self.store.blob_path(Digest("sha256", t.hex)).parent)
            except FetchdError as exc:
                log.warning("BitTorrent: cannot seed %s: %s", t.hex[:12], exc)
                return
            self._loaded[t.hex] = None
            self.tracker.own(t.info_hash, self.swarm.address)

    def _touch(self, hex: str) -> bool:
        """Whether ``hex`` is loaded now (then it becomes the most recently used)."""
        if hex in self._loaded and self.swarm is not None and hex in self.swarm.seeding():
            self._loaded.move_to_end(hex)
            return True
        return False

    async def _unload(self, hex: str) -> None:
        """Take ``hex`` out of the session (it stays known: loaded again on demand)."""
        ih = self._hashes.get(hex)
        if ih is not None:
            self.tracker.own(ih, None)
        if self.swarm is not None and hex in self.swarm.seeding():
            await self.swarm.unseed(hex)

    async def _load_for(self, raw_query: str, remote: str | None) -> None:
        """Before an announce is answered: load the seed of the swarm it names if this
        server holds the blob but has not loaded it (at most LOAD_WAIT seconds; a failure
        is logged and the announce answered without it). Only for peers the tracker
        serves (``--bt-allow``: others must not churn the loaded seeds); not for fetchd's
        own hosts, which take slices over HTTP instead, nor for seeds, nor ``stopped``."""
        if self.swarm is None:
            return
        ip = _peer_address(remote)
        if ip is None or not any(ip in net for net in self.tracker.networks):
            return  # the tracker refuses it with the reason
        try:
            q = _parse_query(raw_query)
        except _Refused:
            return  # the tracker answers it with the reason
        hex = self.tracker.allowed.get(q.get("info_hash", b""))
        if (
            hex is None
            or hex not in self._seedable
            or q.get("left") == b"0"
            or q.get("event") == b"stopped"
            or q.get("peer_id", b"").startswith(FETCHD_PEER_ID)
        ):
            return
        if self._touch(hex):
            return
        try:
            async with asyncio.timeout(LOAD_WAIT):
                await self.torrent(Digest("sha256", hex))
        except (FetchdError, TimeoutError) as exc:
            log.warning("BitTorrent: cannot load the seed of %s: %s", hex[:12], exc or "timeout")

    async def _drop(self, hex: str) -> None:
        """Stop seeding ``hex`` (waits until libtorrent let go) and refuse its swarm."""
        self._loaded.pop(hex, None)
        self._seedable.discard(hex)
        if self.swarm is not None and hex in self.swarm.seeding():
            await self.swarm.unseed(hex)
        ih = self._hashes.pop(hex, None)
        if ih is not None:
            self.tracker.forget(ih)

    def committed(self, desc: Descriptor) -> None:
        """Pull-through committed ``desc``: one of at least min_size gets its torrent
        and is seeded (in the background; a failure is logged)."""
        if self.swarm is None or desc.size < self.min_size or desc.digest.algorithm != "sha256":
            return
        self._spawn(self._quietly(desc.digest), f"commit-{desc.digest.hex}")

    async def _quietly(self, digest: Digest) -> None:
        try:
            await self.torrent(digest)
        except FetchdError as exc:
            log.warning("BitTorrent: no torrent for %s: %s", digest.short, exc)

    # --- a bad blob, gc --------------------------------------------------------------------

    def corrupt(self, hex: str) -> None:
        """The seeding session found a piece of ``hex`` that does not match its torrent
        (and removed the torrent). Re-hash the blob: quarantined if bad, as fsck does;
        if it is good, the torrent row was wrong and is forgotten. Any thread."""
        loop = self._loop
        if loop is None:
            return
        loop.call_soon_threadsafe(self._spawn, self._check(hex), f"check-{hex}")

    async def _check(self, hex: str) -> None:
        await self._drop(hex)
        digest = Digest("sha256", hex)
        bad = await asyncio.to_thread(quarantine_if_corrupt, self.store, digest)
        await asyncio.to_thread(self.meta.forget_torrents, [str(digest)])
        if bad:
            log.warning("BitTorrent: blob %s is corrupt: moved to quarantine/", digest)
        else:
            log.warning("BitTorrent: blob %s is good but its torrent was not: forgotten", digest)

    def before_delete(self, doomed: set[Digest]) -> None:
        """gc (on a thread) is about to delete ``doomed``: unseed them, and return once
        libtorrent let go of each file (a blob deleted under a live torrent is served
        from its open descriptor and its space is not freed). Call :meth:`after_delete`
        with what was deleted once done."""
        if self._loop is None or self.swarm is None:
            return
        work = asyncio.run_coroutine_threadsafe(self._before_delete(doomed), self._loop)
        work.result(timeout=DELETE_WAIT)

    async def _before_delete(self, doomed: set[Digest]) -> None:
        hexes = {d.hex for d in doomed if d.algorithm == "sha256"}
        self._doomed |= hexes
        assert self.swarm is not None
        for hex in hexes:
            self._loaded.pop(hex, None)
        for hex in sorted(hexes & self.swarm.seeding()):
            await self.swarm.unseed(hex)
            ih = self._hashes.get(hex)
            if ih is not None:
                self.tracker.own(ih, None)

    def after_delete(self, doomed: set[Digest], removed: Iterable[Digest]) -> None:
        """gc deleted ``removed`` of ``doomed``: their swarms are refused; the rest
        (referenced again meanwhile) are seeded again. From gc's thread."""
        if self._loop is None or self.swarm is None:
            return
        work = asyncio.run_coroutine_threadsafe(
            self._after_delete(doomed, set(removed)), self._loop
        )
        work.result(timeout=DELETE_WAIT)

    async def _after_delete(self, doomed: set[Digest], removed: set[Digest]) -> None:
        for d in removed:  # (remove_unreferenced forgot their torrent rows)
            await self._drop(d.hex)
        self._doomed -= {d.hex for d in doomed}
        for d in doomed - removed:
            if d.hex in self._hashes:
                self._spawn(self._quietly(d), f"reseed-{d.hex}")

    # --- HTTP -------------------------------------------------------------------------------

    async def handle_torrent(self, request: web.Request) -> web.Response:
        """``GET /fetchd/v1/torrents/sha256:HEX[?name=REPO]``. Errors are fetchd's (the
        server's table makes them OCI error bodies)."""
        digest = Digest.parse(request.match_info["digest"])
        if digest.algorithm != "sha256":
            raise DigestInvalid("torrents are made for sha256 blobs only")
        name = request.query.get("name")
        if name is None:
            name = self.default_name()
        elif not is_valid_repository_name(name) or self.cache.upstreams.route(name, None) is None:
            raise ReferenceInvalid(f"name={name[:100]!r} is no repository this cache serves")
        if not await self.cache.committed(digest):
            raise BlobNotFound(f"blob {digest.short} is not in this cache")
        t = await self.torrent(digest)
        base = _base(request)
        body = t.served(f"{base}/announce", [f"{base}/v2/{name}/blobs/{digest}"])
        return web.Response(body=body, content_type=BITTORRENT)

    async def handle_slice(self, request: web.Request) -> web.Response:
        """``GET /fetchd/v1/slices/sha256:HEX``: the next pieces of the blob nobody took in
        this round, as ``{"first": i, "end": j}`` (piece indices of its canonical torrent),
        or 204 when every piece was handed out; 404 when the blob is not committed.
        ``?pull=TOKEN`` names the asking pull (see :meth:`Slicer.take`)."""
        digest = Digest.parse(request.match_info["digest"])
        if digest.algorithm != "sha256":
            raise DigestInvalid("slices are made for sha256 blobs only")
        if not await self.cache.committed(digest):
            raise BlobNotFound(f"blob {digest.short} is not in this cache")
        slicer = self._slicers.get(digest.hex)
        if slicer is None:
            t = await self.torrent(digest)
            if len(self._slicers) >= MAX_SWARMS:
                self.slices_handed += sum(x.handed for x in self._slicers.values())
                self._slicers.clear()
            slicer = self._slicers.setdefault(digest.hex, Slicer(t.num_pieces))
        got = slicer.take(_pull_token(request))
        if got is None:
            return web.Response(status=204)
        return web.json_response({"first": got[0], "end": got[1]})

    async def handle_slice_done(self, request: web.Request) -> web.Response:
        """``DELETE /fetchd/v1/slices/sha256:HEX?pull=TOKEN``: that pull ended, it neither
        takes nor seeds the blob any more (204; also when the cache knows nothing of it)."""
        digest = Digest.parse(request.match_info["digest"])
        pull = _pull_token(request)
        if pull is None:
            return web.Response(
                status=400, text="?pull= must name the pull (8 to 64 of A-Z a-z 0-9 _ -)\n"
            )
        slicer = self._slicers.get(digest.hex)
        if slicer is not None:
            slicer.done(pull)
        return web.Response(status=204)

    def default_name(self) -> str:
        """A repository name the /v2/ blob route answers for any committed blob: one the
        default upstream takes, else one under the first upstream's prefix (a committed
        blob is served from the store whatever the name routes to)."""
        ups = self.cache.upstreams
        if ups.default is not None:
            return "fetchd"
        return f"{ups.all[0].prefix}/fetchd"

    async def handle_announce(self, request: web.Request) -> web.Response:
        """``GET /announce``: always 200 with a bencoded body, as trackers answer."""
        raw = request.rel_url.raw_query_string
        await self._load_for(raw, request.remote)
        body = self.tracker.announce(raw, request.remote)
        return web.Response(body=body, content_type="text/plain")

    # --- metrics and status -------------------------------------------------------------

    def _swarms(self) -> list[dict[str, Any]]:
        if self.swarm is None:
            return []
        swarms = self.swarm.stats().get("swarms", [])
        return list(swarms) if isinstance(swarms, list) else []

    def uploaded(self) -> int:
        """Payload bytes the session sent since the server started (libtorrent's
        ``net.sent_payload_bytes``: it only grows)."""
        if self.swarm is None:
            return 0
        n = self.swarm.stats().get("uploaded", 0)
        return n if isinstance(n, int) else 0

    def metrics(self) -> list[str]:
        """Prometheus text lines."""
        seeded = len(self._seedable) if self.swarm is not None else 0
        loaded = len(self.swarm.seeding()) if self.swarm is not None else 0
        lines: list[str] = []
        for name, kind, value, text in (
            (
                "fetchd_torrents",
                "gauge",
                seeded,
                "Blobs seeded over BitTorrent (on demand: at most --bt-seeds loaded at once).",
            ),
            ("fetchd_bt_seeds_loaded", "gauge", loaded, "Seeds in the BitTorrent session now."),
            (
                "fetchd_bt_uploaded_bytes_total",
                "counter",
                self.uploaded(),
                "BitTorrent payload sent.",
            ),
            ("fetchd_tracker_peers", "gauge", self.tracker.peers, "Peers the tracker lists."),
            (
                "fetchd_bt_slices_total",
                "counter",
                self.slices_handed + sum(x.handed for x in self._slicers.values()),
                "Slices of blobs handed to fetchd hosts to take over HTTP.",
            ),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        lines += [
            "# HELP fetchd_tracker_announces_total Announces by result (ok or refused).",
            "# TYPE fetchd_tracker_announces_total counter",
        ]
        for result in ("ok", "refused"):
            n = self.tracker.announces[result]
            lines.append(f'fetchd_tracker_announces_total{{result="{result}"}} {n}')
        return lines

    def status(self, full: bool) -> dict[str, Any]:
        """For the status JSON: counters for everyone; the swarms (which name blobs this
        cache holds) only for those who may see what it holds."""
        doc: dict[str, Any] = {
            "torrents": len(self._seedable) if self.swarm is not None else 0,
            "seeds_loaded": len(self.swarm.seeding()) if self.swarm is not None else 0,
            "bt_uploaded": self.uploaded(),
            "tracker_peers": self.tracker.peers,
        }
        if full:
            listed = {self.tracker.allowed.get(ih): len(s) for ih, s in self.tracker.swarms.items()}
            doc["swarms"] = [
                {
                    "hex": str(s.get("hex"))[:12],
                    "peers": int(s.get("peers") or 0),
                    "tracker_peers": listed.get(str(s.get("hex")), 0),
                    "uploaded": int(s.get("uploaded") or 0),
                }
                for s in self._swarms()[:100]
            ]
        return doc


class _Corrupt(Exception):
    """A stored blob whose bytes do not hash to its digest."""


def build_checked(path: Path, digest: Digest, size: int) -> Torrent:
    """metainfo.build_from_file's torrent, and the blob's sha256 checked in the same pass
    (the blob is read once either way): a blob that rotted on disk must not get a
    torrent that every peer would download in vain. Raises _Corrupt, or OSError."""
    builder = TorrentBuilder(digest.hex, size)
    h = hashlib.new(digest.algorithm)
    buf = memoryview(bytearray(HASH_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            builder.feed(buf[:n])
            h.update(buf[:n])
    if h.hexdigest() != digest.hex:
        raise _Corrupt(str(digest))
    return builder.finish()


def quarantine_if_corrupt(store: Store, digest: Digest) -> bool:
    """Re-hash one stored blob; if it does not match its digest, move it to quarantine/
    under the name ``fetchd fsck`` gives it. True if it was moved."""
    path = store.blob_path(digest)
    h = hashlib.new(digest.algorithm)
    buf = memoryview(bytearray(HASH_CHUNK))
    try:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(buf[:n])
    except FileNotFoundError:
        return False
    if h.hexdigest() == digest.hex:
        return False
    store.quarantine.mkdir(parents=True, exist_ok=True)
    os.replace(path, store.quarantine / f"{digest.algorithm}-{digest.hex}")
    return True


def _base(request: web.Request) -> str:
    """scheme://host[:port] the client reached this server at (its Host header, if
    well-formed; else the socket's own address)."""
    host = request.host
    if not _HOST.fullmatch(host):
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        addr, port = (sock[0], sock[1]) if sock else ("127.0.0.1", 80)
        host = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    return f"{request.scheme}://{host}"


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _retrieve(fut: asyncio.Future[Torrent]) -> None:
    """A build nobody waits for any more must not log "exception never retrieved"."""
    if not fut.cancelled():
        fut.exception()


async def _logged(coro: Coroutine[Any, Any, None], name: str) -> None:
    """A background task of the server's: whatever it raises (a disk error, a bug) is
    logged, never allowed to stop the server (its task group would cancel everything)."""
    try:
        await coro
    except Exception as exc:
        why = str(exc) if isinstance(exc, FetchdError) else f"{type(exc).__name__}: {exc}"
        log.warning("BitTorrent: %s failed: %s", name, why)
        log.debug("BitTorrent: %s failed", name, exc_info=True)
