"""The one libtorrent session of a process, bridged to asyncio: the only module of fetchd
that imports libtorrent.

libtorrent runs its own threads (network, disk, hashing). Python never blocks on them:
every call made here on the event loop only posts work to libtorrent's network thread
(``async_add_torrent``, ``remove_torrent``, ``flush_cache``, ``post_torrent_updates``),
and everything libtorrent has to say comes back as alerts. ``set_alert_fd`` makes
libtorrent write a byte to a non-blocking pipe when its alert queue becomes non-empty;
``loop.add_reader`` then drains the pipe and ``pop_alerts()`` (which does not block)
on the loop thread. No Python thread, no polling (BITTORRENT.md §4, prototype
../shared/peers/bt/ltbridge.py).

Lifetime rule (learnt by crashing: "pure virtual method called"): a Python alert object
points into libtorrent's alert buffer, valid only until the next ``pop_alerts()``. So
:meth:`Swarm._dispatch` copies plain values (ints, strings, handle copies) out of each
alert, and no alert object is stored, put in a future, or handed to a callback.

Safety (BITTORRENT.md §6.3): the session is built from :func:`_settings` and nothing
else: it listens on exactly one address (never a wildcard), TCP only, no DHT, UPnP or
NAT-PMP, LSD only when ``config.lsd``, never connects to privileged ports, and refuses
every peer outside ``config.bt_allow`` (an ip_filter that blocks everything else).
Torrents are never auto-managed (the auto-manage trap: queued seeds serve nothing) and
keep ``apply_ip_filter`` (their flags are built on libtorrent's ``default_flags``).

Seeding never writes: seeds are ``seed_mode | upload_mode`` (``seed_mode`` alone lets
libtorrent re-download a piece that fails its hash INTO the committed blob, measured
in BITTORRENT.md §2.2). A piece that fails its hash while seeding means the stored blob
is corrupt: the torrent is removed and ``on_corrupt(hex)`` tells the owner, who
quarantines the blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import libtorrent as lt

from fetchd import __version__
from fetchd.errors import BadTorrent, SwarmFailed, UsageError
from fetchd.threads import finish

if TYPE_CHECKING:
    from fetchd.bt.metainfo import Torrent
    from fetchd.config import Config

log = logging.getLogger(__name__)

#: seconds to wait for libtorrent to confirm an add, a removal or the listen socket
#: (all are immediate in practice: < 10 ms; the bound only keeps a wedged session from
#: hanging a pull)
CONFIRM_TIMEOUT = 30.0
#: seconds between two refreshes of :meth:`Swarm.stats`
STATS_INTERVAL = 1.0
#: alerts libtorrent queues before it drops some (one piece_finished per piece of every
#: download, a few per seed: 200 seeds and 8 downloads of 2048 pieces fit)
ALERT_QUEUE_SIZE = 20000
#: seconds a session close waits for trackers to take the "stopped" announce
STOP_TRACKER_TIMEOUT = 2


class Metainfo(Protocol):
    """What the session needs of a torrent: fetchd's canonical
    :class:`fetchd.bt.metainfo.Torrent`, or a torrent made by someone else.

    ``raw`` is the whole .torrent file (libtorrent parses it; only its info dict matters:
    trackers and web seeds in it are never used, see :meth:`Swarm.download`). ``hex`` is
    the key the session files the torrent under and names it by: a canonical torrent's
    blob digest (sha256 hex), a foreign torrent's v1 info-hash (40 hex digits).
    ``span(i)`` is [start, end) of piece ``i`` in the file."""

    @property
    def raw(self) -> bytes: ...
    @property
    def hex(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def num_pieces(self) -> int: ...
    def span(self, i: int) -> tuple[int, int]: ...


def _name(hex: str) -> str:
    """A torrent's key for a message: ``sha256:HEX`` for a blob's digest, ``torrent HEX``
    for a foreign torrent's info-hash."""
    if len(hex) == 40:
        return f"torrent {hex}"
    return f"{'sha512' if len(hex) == 128 else 'sha256'}:{hex}"


def _web_seeds(urls: Sequence[str]) -> list[str]:
    """The http(s) URLs of ``urls``; anything else is dropped (with a warning)."""
    kept = []
    for url in urls:
        if urlsplit(url).scheme.lower() in ("http", "https"):
            kept.append(url)
        else:
            log.warning("web seed %r dropped: only http and https web seeds are used", url)
    return kept


def _parse_listen(listen: str) -> tuple[str, int]:
    """``ADDR:PORT``, ``[V6]:PORT`` or ``ADDR`` (port 0) -> (address, port); never a
    wildcard, never a host name (UsageError)."""
    text = listen.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"BitTorrent listen address {listen!r} is not [ADDR]:PORT")
        port_text = rest[1:] if rest else "0"
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, "0"  # a bare IPv4 or IPv6 address
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(
            f"BitTorrent listen address {listen!r}: {host!r} is not an IP address"
        ) from None
    if not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"BitTorrent listen address {listen!r}: bad port {port_text!r}")
    if addr.is_unspecified:
        raise UsageError(
            f"BitTorrent listen address {listen!r} is a wildcard; give the one address "
            "peers should reach (fetchd never listens on every interface)"
        )
    return str(addr), int(port_text)


def _ip_filter(allow: Sequence[str]) -> Any:
    """libtorrent's ip_filter: every address blocked except the networks in ``allow``."""
    f = lt.ip_filter()
    f.add_rule("0.0.0.0", "255.255.255.255", 1)
    f.add_rule("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 1)
    for cidr in allow:
        try:
            net = ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise UsageError(f"--bt-allow {cidr!r} is not a network (CIDR)") from None
        f.add_rule(str(net[0]), str(net[-1]), 0)
    return f


def _settings(host: str, port: int, lsd: bool) -> dict[str, object]:
    """Every setting fetchd's session starts with (BITTORRENT.md §6.3 and
    ../shared/peers/bt/btcommon.py safe_settings)."""
    cat = lt.alert.category_t
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    settings: dict[str, object] = {
        "listen_interfaces": listen,
        # outgoing connections leave from the listen address too: peers and the tracker
        # see one address, and nothing else of this host is used
        "outgoing_interfaces": host,
        "listen_system_port_fallback": False,
        "enable_ip_notifier": False,
        "enable_dht": False,
        "dht_bootstrap_nodes": "",
        "enable_lsd": lsd,
        "enable_upnp": False,
        "enable_natpmp": False,
        "enable_incoming_utp": False,
        "enable_outgoing_utp": False,
        "enable_incoming_tcp": True,
        "enable_outgoing_tcp": True,
        # several fetchd nodes may share an address (tests, containers behind one NAT)
        "allow_multiple_connections_per_ip": True,
        # a tracker or PEX must not turn us into a port scanner of the LAN's services
        "no_connect_privileged_ports": True,
        # plain handshakes out (MSE is obfuscation, not security); obfuscated ones in
        "out_enc_policy": int(lt.enc_policy.disabled),
        "in_enc_policy": int(lt.enc_policy.enabled),
        "user_agent": f"fetchd/{__version__.rsplit('.', 1)[0]}",
        "stop_tracker_timeout": STOP_TRACKER_TIMEOUT,
        "alert_queue_size": ALERT_QUEUE_SIZE,
        # LAN swarms (BITTORRENT.md §8, benchmarks/lan_swarm.py): ask for what a peer can
        # send in 1 s, not 3, and unchoke the peers that send fastest
        "request_queue_time": 1,
        "choking_algorithm": 2,
        "alert_mask": int(
            cat.error_notification
            | cat.status_notification
            | cat.storage_notification
            | cat.peer_notification
            | cat.ip_block_notification
            | cat.tracker_notification
            | cat.piece_progress_notification
        ),
    }
    if hasattr(lt, "generate_fingerprint"):
        settings["peer_fingerprint"] = lt.generate_fingerprint("FD", 0, 1, 0, 0)
    return settings


#: flags that make the add_torrent_params' trackers and web seeds the only ones: without
#: them libtorrent also uses those written in the .torrent file (a foreign torrent's
#: announce and url-list would be contacted whatever the caller passed)
_OVERRIDE = ("override_trackers", "override_web_seeds")


def _flags(*add: str) -> int:
    """Torrent flags: libtorrent's ``default_flags`` (which carry ``apply_ip_filter`` and
    ``update_subscribe``) without ``auto_managed`` and ``paused``, plus ``add``."""
    tf = lt.torrent_flags
    flags = int(tf.default_flags) & ~int(tf.auto_managed) & ~int(tf.paused)
    for name in add:
        flags |= int(getattr(tf, name))
    return flags


def _torrent_info(t: Metainfo) -> Any:
    try:
        return lt.torrent_info(t.raw)
    except RuntimeError as exc:  # libtorrent's parse errors
        raise BadTorrent(f"libtorrent refused the torrent of {_name(t.hex)}: {exc}") from exc


def _v1(info_hashes: Any) -> str:
    """The v1 info-hash (hex) of a libtorrent info_hash_t: the key of alerts."""
    return str(info_hashes.v1)


@dataclass(eq=False)
class _Entry:
    """What the session knows of one torrent (plain values only)."""

    hex: str
    ih: str  # v1 info-hash hex: how alerts find the entry
    role: str  # "seed" | "download"
    added: asyncio.Future[None]
    removed: asyncio.Future[None]
    handle: Any = None
    removing: bool = False
    # --- downloads ---
    torrent: Metainfo | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    checked: asyncio.Event = field(default_factory=asyncio.Event)
    reported: set[int] = field(default_factory=set)  # given to on_piece
    adding: dict[int, asyncio.Future[None]] = field(default_factory=dict)  # add_piece waiters
    finished: list[int] = field(default_factory=list)  # piece_finished, not flushed yet
    flushing: list[int] | None = None  # pieces the flush in flight covers
    ready: list[int] = field(default_factory=list)  # flushed, not yet given to on_piece
    hash_failures: int = 0
    max_hash_failures: int = 0
    failure: str | None = None
    banned: list[str] = field(default_factory=list)
    last_progress: float = 0.0


class Swarm:
    """One libtorrent session: seeds committed blobs and downloads blobs into ingest.

    Lifecycle: ``await start()`` … ``await close()`` on one event loop; every method is
    called on that loop. :meth:`seed`, :meth:`unseed` and :meth:`download` may overlap
    (for different blobs). Nothing here verifies a blob as a whole: libtorrent checks
    each piece against the torrent's SHA-1, and the engine's commit (sha256 of the whole
    file) stays the final gate.
    """

    def __init__(
        self,
        config: Config,
        listen: str,
        *,
        on_corrupt: Callable[[str], None] | None = None,
    ) -> None:
        self._host, self._port = _parse_listen(listen)
        self._config = config
        self._allow = _ip_filter(config.bt_allow)  # UsageError on a bad CIDR, before start
        self._on_corrupt = on_corrupt
        self._ses: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pipe: tuple[int, int] | None = None
        self._listening: asyncio.Future[tuple[str, int]] | None = None
        self._address: tuple[str, int] | None = None
        self._torrents: dict[str, _Entry] = {}  # by hex (the caller's key)
        self._by_ih: dict[str, _Entry] = {}  # by v1 info-hash (the alerts' key)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stats_timer: asyncio.TimerHandle | None = None
        self._swarms: dict[str, dict[str, object]] = {}
        self._totals = {"uploaded": 0, "downloaded": 0}
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Create the session and wait until it listens on the configured address.
        Raises SwarmFailed if it cannot (address not on this host, port taken)."""
        self._loop = loop = asyncio.get_running_loop()
        try:
            settings: Any = _settings(self._host, self._port, self._config.lsd)
            self._ses = lt.session(settings)
        except (RuntimeError, KeyError, TypeError) as exc:
            raise SwarmFailed(f"cannot start the BitTorrent session: {exc}") from exc
        self._ses.set_ip_filter(self._allow)
        self._listening = loop.create_future()
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)  # libtorrent's thread must never block on it
        self._pipe = (r, w)
        loop.add_reader(r, self._on_readable)
        self._ses.set_alert_fd(w)
        self._on_readable()  # alerts queued before the fd was set
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                self._address = await self._listening
        except TimeoutError:
            await self.close()
            raise SwarmFailed(
                f"the BitTorrent session did not report listening on "
                f"{self._host}:{self._port} within {CONFIRM_TIMEOUT:g} s"
            ) from None
        except SwarmFailed:
            await self.close()
            raise
        log.info("BitTorrent session listening on %s:%d", *self._address)
        self._stats_timer = loop.call_later(STATS_INTERVAL, self._tick)

    async def close(self) -> None:
        """Remove every torrent (waiting for libtorrent to confirm each), then destroy the
        session (on a thread: it may wait for trackers' "stopped" announces). Idempotent.
        Downloads still running fail with SwarmFailed("session closed")."""
        if self._closed:
            return
        self._closed = True
        for e in list(self._torrents.values()):
            if e.role == "download" and e.failure is None:
                e.failure = "the BitTorrent session was closed"
                e.wake.set()
        removals = [self._remove(e) for e in list(self._torrents.values())]
        if removals:
            await asyncio.gather(*removals, return_exceptions=True)
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._stats_timer is not None:
            self._stats_timer.cancel()
        if self._ses is not None:
            # the last reference dies on a thread: the session's destructor blocks
            holder, self._ses = [self._ses], None
            await finish(asyncio.get_running_loop().run_in_executor(None, _destroy, holder))
        if self._pipe is not None and self._loop is not None:
            # the pipe stays open until the session is gone: libtorrent writes to it
            self._loop.remove_reader(self._pipe[0])
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound listen address (the real port when 0 was asked for)."""
        if self._address is None:
            raise RuntimeError("Swarm.address before start()")
        return self._address

    # ------------------------------------------------------------------ seeding
    async def seed(self, t: Metainfo, blob_dir: Path, trackers: Sequence[str] = ()) -> None:
        """Seed ``blob_dir/t.hex`` (the store's layout/blobs/sha256) without a copy.
        Idempotent. The torrent is ``seed_mode | upload_mode``: libtorrent checks each
        piece the first time a peer asks for it and can never write the file. A piece
        that fails that check removes the torrent and calls ``on_corrupt(t.hex)``.
        Only ``trackers`` are announced to, never the ones in ``t.raw``; no web seeds.
        Raises SwarmFailed when the blob is missing, has the wrong size, or is being
        downloaded by this session."""
        self._check_open()
        old = self._torrents.get(t.hex)
        if old is not None:
            if old.role != "seed":
                raise SwarmFailed(f"cannot seed {_name(t.hex)}: this session is downloading it")
            await asyncio.shield(old.added)
            return
        path = blob_dir / t.hex
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise SwarmFailed(f"cannot seed {path}: {exc.strerror or exc}") from exc
        if size != t.size:
            raise SwarmFailed(f"cannot seed {path}: {size} bytes, the torrent says {t.size}")
        atp = lt.add_torrent_params()
        atp.ti = _torrent_info(t)
        atp.save_path = str(blob_dir)
        atp.renamed_files = {0: t.hex}
        atp.flags = _flags("seed_mode", "upload_mode", *_OVERRIDE)
        atp.trackers = list(trackers)
        atp.url_seeds = []
        e = self._add(t.hex, "seed", atp)
        try:
            await self._confirm_add(e)
        except BaseException:
            await finish(asyncio.ensure_future(self._remove(e)))
            raise
        log.info("seeding %s from %s", _name(t.hex), blob_dir)

    async def unseed(self, hex: str) -> None:
        """Stop seeding ``hex`` and wait until libtorrent has let go of the file (then gc
        may delete it). Never deletes anything. A no-op for a blob not seeded."""
        e = self._torrents.get(hex)
        if e is None or e.role != "seed":
            return
        await finish(asyncio.ensure_future(self._remove(e)))

    def seeding(self) -> frozenset[str]:
        """The hex digests this session seeds now."""
        return frozenset(
            h for h, e in self._torrents.items() if e.role == "seed" and not e.removing
        )

    # ------------------------------------------------------------------ downloading
    async def download(
        self,
        t: Metainfo,
        save_dir: Path,
        file_name: str,
        *,
        trackers: Sequence[str] = (),
        peers: Sequence[tuple[str, int]] = (),
        url_seeds: Sequence[str] = (),
        skip: Collection[int] = (),
        on_piece: Callable[[int], None],
        stall_timeout: float,
        max_hash_failures: int,
    ) -> None:
        """Download the blob of ``t`` into ``save_dir/file_name`` from the swarm.

        libtorrent first checks what the file already holds; ``on_piece(i)`` is then
        called (on the loop) for every piece it has, and for each piece as it passes its
        SHA-1 check, once libtorrent has written and flushed it (a ``flush_cache`` whose
        ``cache_flushed`` came back after the piece: the bytes are in the file).
        Pieces in ``skip`` are never requested (the caller has them). Returns once every
        other piece is had. Raises SwarmFailed (with the cause) after ``stall_timeout``
        seconds without a new piece, after ``max_hash_failures`` pieces failed their
        hash check, on a file or torrent error, or when this session already holds the
        blob (seeding or downloading it). Whatever the outcome, also when cancelled, the
        torrent is removed and libtorrent's confirmation awaited before this returns,
        so nothing writes the file afterwards. Exceptions of ``on_piece`` propagate.
        Calls may overlap for different blobs.

        ``t`` may be a foreign torrent (any :class:`Metainfo`: its file name, piece length
        and extra keys do not matter). Only ``trackers``, ``peers`` and ``url_seeds`` are
        used: the trackers and web seeds written in ``t.raw`` never are. ``url_seeds``
        (BEP 19 web seeds; http and https only, others are dropped) are for a foreign
        torrent's web seeds; fetchd's own downloads pass none (the engine's HTTP
        fallback does that job). Web seeds pass the same ip_filter as peers.
        :meth:`add_piece` hands this download pieces fetched some other way."""
        self._check_open()
        ti = _torrent_info(t)
        ih = _v1(ti.info_hashes())
        old = self._torrents.get(t.hex) or self._by_ih.get(ih)
        if old is not None:
            raise SwarmFailed(
                f"{_name(t.hex)} is already "
                f"{'seeded' if old.role == 'seed' else 'downloaded'} by this BitTorrent session"
            )
        n = t.num_pieces
        skipped = {i for i in skip if 0 <= i < n}
        wanted = set(range(n)) - skipped
        if not wanted:
            return
        atp = lt.add_torrent_params()
        atp.ti = ti
        atp.save_path = str(save_dir)
        atp.renamed_files = {0: file_name}
        atp.flags = _flags(*_OVERRIDE)
        atp.trackers = list(trackers)
        atp.url_seeds = _web_seeds(url_seeds)
        atp.peers = [(host, port) for host, port in peers]
        if skipped:
            atp.piece_priorities = [0 if i in skipped else 4 for i in range(n)]
        e = self._add(t.hex, "download", atp, ih)
        e.torrent = t
        e.max_hash_failures = max_hash_failures
        e.last_progress = time.monotonic()
        reported = e.reported
        try:
            await self._confirm_add(e)
            while True:
                for i in e.ready:
                    if i not in reported:
                        reported.add(i)
                        on_piece(i)
                    waiter = e.adding.pop(i, None)
                    if waiter is not None and not waiter.done():
                        waiter.set_result(None)
                e.ready.clear()
                if wanted <= reported:
                    return
                if e.failure is not None:
                    raise SwarmFailed(f"swarm download of {_name(t.hex)}: {e.failure}")
                left = e.last_progress + stall_timeout - time.monotonic()
                if left <= 0:
                    raise SwarmFailed(
                        f"swarm download of {_name(t.hex)} stalled: no new piece for "
                        f"{stall_timeout:g} s ({len(reported & wanted)} of {len(wanted)} "
                        f"wanted pieces had, {self._peers_of(t.hex)} peers connected"
                        f"{_banned(e)})"
                    )
                e.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await e.wake.wait()
        finally:
            await finish(asyncio.ensure_future(self._remove(e)))

    async def add_piece(self, hex: str, index: int, data: bytes | bytearray | memoryview) -> None:
        """Hand piece ``index`` of the download ``hex`` (running in :meth:`download`), got
        some other way (over HTTP from a cache), to libtorrent.

        libtorrent checks it against the torrent's SHA-1 of the piece, writes it and
        announces it (HAVE) to the peers at once: it is seeded from then on. Returns
        once the piece is had and flushed, after the download's ``on_piece(index)`` ran
        (at once if it had been already). Raises SwarmFailed when ``data`` failed its
        hash check (a hash_failed for this piece after the call: the caller's problem,
        never counted toward the download's ``max_hash_failures``), or when ``hex`` is
        not being downloaded by this session, or the download ends first. ValueError
        when ``index`` is not a piece or ``data`` is not exactly its size. Calls may
        overlap; a second call for a piece in flight waits for the first one's data."""
        e = self._torrents.get(hex)
        if e is None or e.role != "download" or e.torrent is None:
            raise SwarmFailed(f"cannot add a piece to {_name(hex)}: it is not being downloaded")
        if not 0 <= index < e.torrent.num_pieces:
            raise ValueError(f"{_name(hex)} has no piece {index}")
        start, end = e.torrent.span(index)
        if len(data) != end - start:
            raise ValueError(
                f"piece {index} of {_name(hex)} is {end - start} bytes, not {len(data)}"
            )
        if index in e.reported:
            return
        waiter = e.adding.get(index)
        if waiter is None:
            await self._confirm_add(e)
            # libtorrent silently drops a piece added while it checks the file
            # (_forget sets ``checked`` too: a removal ends this wait)
            await e.checked.wait()
            if e.removing or e.failure is not None or e.handle is None:
                raise SwarmFailed(f"cannot add a piece to {_name(hex)}: the download ended")
            if index in e.reported:
                return
            waiter = e.adding.get(index)
            if waiter is None:
                assert self._loop is not None
                e.adding[index] = waiter = self._loop.create_future()
                e.handle.add_piece(index, bytes(data), 0)
        await asyncio.shield(waiter)

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict[str, object]:
        """Counters for /metrics and the status page, refreshed about once a second from
        libtorrent's state updates (never a synchronous status call)::

            {"listen": "ADDR:PORT", "torrents": n, "uploaded": bytes, "downloaded": bytes,
             "peers": n, "swarms": [{"hex", "state", "peers", "seeds", "uploaded",
             "downloaded", "progress"}]}

        ``peers`` counts the connected peers, ``seeds`` those of them that have every
        piece; a swarm appears after its first refresh."""
        swarms = [dict(s) for h, s in sorted(self._swarms.items()) if h in self._torrents]
        host, port = self._address or (self._host, self._port)
        return {
            "listen": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            "torrents": len(self._torrents),
            "uploaded": self._totals["uploaded"],
            "downloaded": self._totals["downloaded"],
            "peers": sum(int(str(s["peers"])) for s in swarms),
            "swarms": swarms,
        }

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._ses is None or self._closed:
            raise SwarmFailed("the BitTorrent session is not running")

    def _peers_of(self, hex: str) -> int:
        s = self._swarms.get(hex)
        return int(str(s["peers"])) if s else 0

    def _add(self, hex: str, role: str, atp: Any, ih: str | None = None) -> _Entry:
        assert self._loop is not None
        ih = ih or _v1(atp.ti.info_hashes())
        if ih in self._by_ih:  # the same torrent under another key
            raise SwarmFailed(f"{_name(hex)}: this session already holds its torrent")
        e = _Entry(hex, ih, role, self._loop.create_future(), self._loop.create_future())
        self._torrents[hex] = e
        self._by_ih[ih] = e
        self._ses.async_add_torrent(atp)
        return e

    def _entry(self, a: Any) -> _Entry | None:
        """The entry a torrent alert is about (None once it is gone)."""
        return self._by_ih.get(_v1(a.handle.info_hashes()))

    async def _confirm_add(self, e: _Entry) -> None:
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                await asyncio.shield(e.added)
        except TimeoutError:
            raise SwarmFailed(
                f"libtorrent did not add the torrent of {_name(e.hex)} within {CONFIRM_TIMEOUT:g} s"
            ) from None

    async def _remove(self, e: _Entry) -> None:
        """remove_torrent (never delete_files) and wait for torrent_removed."""
        if not e.removing:
            e.removing = True
            with contextlib.suppress(TimeoutError, SwarmFailed):
                async with asyncio.timeout(CONFIRM_TIMEOUT):
                    await asyncio.shield(e.added)
            if e.handle is None:  # never added
                self._forget(e)
                return
            if self._ses is not None:
                self._ses.remove_torrent(e.handle)
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUT):
                await asyncio.shield(e.removed)
        except TimeoutError:
            log.error("libtorrent did not remove %s within %g s", _name(e.hex), CONFIRM_TIMEOUT)
            self._forget(e)
            raise SwarmFailed(
                f"libtorrent did not confirm removing the torrent of {_name(e.hex)}"
            ) from None

    def _forget(self, e: _Entry) -> None:
        if self._torrents.get(e.hex) is e:
            del self._torrents[e.hex]
        if self._by_ih.get(e.ih) is e:
            del self._by_ih[e.ih]
        self._swarms.pop(e.hex, None)
        if not e.removed.done():
            e.removed.set_result(None)
        if not e.added.done():
            e.added.set_exception(SwarmFailed(f"{_name(e.hex)} was removed"))
            e.added.exception()  # retrieved: the waiter gets its own error
        for i, waiter in e.adding.items():
            _fail(waiter, f"piece {i} of {_name(e.hex)} was added, but the download ended")
        e.adding.clear()
        e.checked.set()

    def _tick(self) -> None:
        if self._ses is None or self._closed or self._loop is None:
            return
        self._ses.post_torrent_updates()
        self._ses.post_session_stats()
        self._stats_timer = self._loop.call_later(STATS_INTERVAL, self._tick)

    def _flush(self, e: _Entry) -> None:
        """One flush_cache in flight per download: it covers the pieces finished so far."""
        if e.flushing is None and e.finished and e.handle is not None and not e.removing:
            e.flushing, e.finished = e.finished, []
            e.handle.flush_cache()

    def _on_readable(self) -> None:
        if self._pipe is None or self._ses is None:
            return
        with contextlib.suppress(BlockingIOError):
            while os.read(self._pipe[0], 4096):
                pass
        self._dispatch(self._ses.pop_alerts())

    def _dispatch(self, alerts: list[Any]) -> None:
        """Handle one batch of alerts. Copies values out; no alert survives this call."""
        for a in alerts:
            what = a.what()
            handler = _HANDLERS.get(what)
            if handler is not None:
                try:
                    handler(self, a)
                except Exception:  # one bad alert must not kill the bridge
                    log.exception("handling libtorrent alert %s", what)

    # one method per alert kind; each gets the alert for the duration of the call only
    def _a_listen_succeeded(self, a: Any) -> None:
        tcp = a.socket_type == lt.socket_type_t.tcp
        if tcp and self._listening is not None and not self._listening.done():
            self._listening.set_result((str(a.address), int(a.port)))

    def _a_listen_failed(self, a: Any) -> None:
        if self._listening is not None and not self._listening.done():
            self._listening.set_exception(
                SwarmFailed(
                    f"the BitTorrent session cannot listen on {self._host}:{self._port}: "
                    f"{a.error.message()}"
                )
            )

    def _a_add_torrent(self, a: Any) -> None:
        failed = bool(a.error.value())
        ti = a.params.ti if failed else None
        ih = _v1(ti.info_hashes()) if ti is not None else _v1(a.handle.info_hashes())
        e = self._by_ih.get(ih)
        if e is None or e.added.done():
            return
        if failed:
            e.added.set_exception(
                SwarmFailed(f"libtorrent refused {_name(e.hex)}: {a.error.message()}")
            )
            self._forget(e)
        else:
            e.handle = a.handle
            e.added.set_result(None)

    def _a_torrent_removed(self, a: Any) -> None:
        e = self._by_ih.get(_v1(a.info_hashes))
        if e is not None and e.removing:
            self._forget(e)

    def _a_piece_finished(self, a: Any) -> None:
        e = self._entry(a)
        if e is None or e.role != "download":
            return
        e.finished.append(int(a.piece_index))
        e.last_progress = time.monotonic()
        self._flush(e)

    def _a_cache_flushed(self, a: Any) -> None:
        e = self._entry(a)
        if e is None or e.role != "download" or e.flushing is None:
            return
        e.ready.extend(e.flushing)
        e.flushing = None
        e.wake.set()
        self._flush(e)

    def _a_torrent_checked(self, a: Any) -> None:
        e = self._entry(a)
        if e is not None:
            e.last_progress = time.monotonic()  # checking a big file is progress too
            e.checked.set()

    def _a_hash_failed(self, a: Any) -> None:
        e = self._entry(a)
        if e is None:
            return
        piece = int(a.piece_index)
        if e.role == "seed":
            if not e.removing:
                log.error(
                    "%s: stored piece %d fails its hash check; the blob is corrupt: "
                    "no longer seeded",
                    _name(e.hex),
                    piece,
                )
                self._spawn(self._corrupt(e))
            return
        waiter = e.adding.pop(piece, None)
        if waiter is not None:  # add_piece's data: the caller's problem, not a peer's
            log.warning("%s: piece %d given by add_piece fails its hash check", _name(e.hex), piece)
            _fail(waiter, f"piece {piece} of {_name(e.hex)} failed its hash check")
            return
        e.hash_failures += 1
        log.warning("%s: piece %d failed its hash check (%d)", _name(e.hex), piece, e.hash_failures)
        if e.hash_failures >= e.max_hash_failures and e.failure is None:
            e.failure = f"{e.hash_failures} pieces failed their hash check{_banned(e)}"
            e.wake.set()

    def _a_file_error(self, a: Any) -> None:
        self._error(self._entry(a), f"file error on {a.filename()}: {a.error.message()}")

    def _a_torrent_error(self, a: Any) -> None:
        self._error(self._entry(a), f"libtorrent error: {a.error.message()}")

    def _error(self, e: _Entry | None, msg: str) -> None:
        """A seed's error is logged; a download's ends it (its first error is the one)."""
        if e is None:
            return
        if e.role == "seed":
            log.error("seeding %s: %s", _name(e.hex), msg)
        elif e.failure is None:
            e.failure = msg
            e.wake.set()

    def _a_peer_ban(self, a: Any) -> None:
        host, port = a.endpoint
        e = self._entry(a)
        log.info(
            "%s: banned peer %s:%d (sent data that failed the hash check)",
            _name(e.hex) if e is not None else a.torrent_name,
            host,
            port,
        )
        if e is not None and f"{host}:{port}" not in e.banned:
            e.banned.append(f"{host}:{port}")

    def _a_state_update(self, a: Any) -> None:
        for st in a.status:
            e = self._by_ih.get(_v1(st.info_hashes))
            if e is not None and self._torrents.get(e.hex) is e:
                self._swarms[e.hex] = {
                    "hex": e.hex,
                    "state": str(st.state),
                    "peers": int(st.num_peers),
                    "seeds": int(st.num_seeds),
                    "uploaded": int(st.total_payload_upload),
                    "downloaded": int(st.total_payload_download),
                    "progress": float(st.progress),
                }

    def _a_session_stats(self, a: Any) -> None:
        values = a.values
        self._totals["uploaded"] = int(values.get("net.sent_payload_bytes", 0))
        self._totals["downloaded"] = int(values.get("net.recv_payload_bytes", 0))

    def _a_alerts_dropped(self, a: Any) -> None:
        log.warning("libtorrent dropped alerts: %s", a.message())

    def _a_tracker_error(self, a: Any) -> None:
        log.debug("%s", a.message())

    # ------------------------------------------------------------------ tasks
    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _corrupt(self, e: _Entry) -> None:
        await self._remove(e)
        if self._on_corrupt is not None:
            self._on_corrupt(e.hex)


def _fail(waiter: asyncio.Future[None], message: str) -> None:
    if not waiter.done():
        waiter.set_exception(SwarmFailed(message))
        waiter.exception()  # retrieved: the awaiting add_piece (if any) still gets it


def _banned(e: _Entry) -> str:
    return f"; banned peers: {', '.join(e.banned)}" if e.banned else ""


def _destroy(holder: list[Any]) -> None:
    """Drop the last reference to a session: its destructor stops libtorrent's threads
    and waits for them (and for trackers' "stopped" announces, bounded by
    STOP_TRACKER_TIMEOUT). Blocks: run on a thread."""
    holder.clear()


if TYPE_CHECKING:
    # mypy --strict proves fetchd's canonical torrent is a Metainfo as it stands.
    _METAINFO: tuple[type[Metainfo], ...] = (Torrent,)

_HANDLERS: dict[str, Callable[[Swarm, Any], None]] = {
    name[3:]: getattr(Swarm, name) for name in dir(Swarm) if name.startswith("_a_")
}
