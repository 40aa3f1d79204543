"""Foreign torrents (issue 12): ``fetchd pull --torrent FILE.torrent|https://…/x.torrent
[--digest sha256:…]`` stores the single file that a torrent made by someone else (aria2,
qBittorrent, mktorrent, transmission-create) describes.

The torrent is read bounded (:data:`fetchd.bt.metainfo.MAX_TORRENT_BYTES`; a plain-HTTP
URL needs ``--insecure-options http``, TLS is verified) and parsed strictly
(:func:`~fetchd.bt.metainfo.parse_foreign`: single file, v1 or a hybrid's v1 part; a
multi-file, v2-only or malformed torrent is refused with BadTorrent before anything is
asked of the network). Its file then comes through the process's one libtorrent session
(:class:`~fetchd.sources.swarm.Swarms`), announcing to the torrent's own trackers and
using its web seeds (``url-list``), into a segmented ingest, by the engine's
:func:`~fetchd.engine.fetching.fill_and_commit`: the same single flight, lease, resume
and commit as every blob.

Who verifies: libtorrent checks every piece against the torrent's SHA-1 hashes (a peer's
bad piece is never copied into the ingest, see :class:`~fetchd.sources.swarm.PieceCopier`);
the commit checks ``--digest`` when given, else stores the file under the sha256 it
computes. The torrent itself is trusted as much as the place the user named: it is the
authority for what the file is, as a URL is for a URL pull.

The store records the pull as a URL named ``torrent:INFOHASH`` (v1 info-hash, 40 hex
digits), not the path or URL the torrent came from: the info-hash fixes the content
(every piece's hash), so the same torrent found again under another path or URL is the
same blob, and a second pull is answered from the store after reading only the torrent.
A path or URL would also clash with a plain ``fetchd pull https://…/x.torrent`` (without
``--torrent``), which stores the .torrent file itself under that URL.

``magnet:`` links are refused: their metadata comes only from the DHT or a peer, and
fetchd runs neither DHT nor a metadata exchange; it needs the .torrent file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urljoin, urlsplit

from fetchd.bt.metainfo import MAX_TORRENT_BYTES, Foreign, parse_foreign
from fetchd.config import Config
from fetchd.engine.fetching import Sources, fill_and_commit
from fetchd.engine.pull import Engine, PullResult, is_url
from fetchd.errors import (
    BadTorrent,
    FetchdError,
    ImageNotInStore,
    InsecureRefused,
    SwarmFailed,
    TransferFailed,
    UsageError,
)
from fetchd.model import Descriptor, Digest
from fetchd.sources.base import OnBytes, Sink
from fetchd.sources.http import redact, translate
from fetchd.sources.retry import retryable, status_error
from fetchd.sources.swarm import PieceCopier, Swarms, read_body
from fetchd.store import layout
from fetchd.store.cas import SegmentedIngest
from fetchd.store.maintenance import record_url
from fetchd.store.meta import UrlRecord
from fetchd.store.space import ensure_room

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

MAGNET = (
    "magnet links need DHT or a peer to get the metadata; fetchd needs the .torrent file "
    "(pull --torrent FILE.torrent or https://…/x.torrent)"
)
#: redirects followed when fetching a .torrent by URL (each one checked for http://)
MAX_REDIRECTS = 5
MEDIA_TYPE = "application/octet-stream"


def wanted(text: str, config: Config) -> bool:
    """Whether :meth:`Engine.pull` hands ``text`` to :func:`pull_torrent`: a ``magnet:``
    link (refused there, with the reason), a REF that is not a URL and ends in
    ``.torrent`` (a local file), and with ``--torrent`` an http(s) URL whose path ends in
    ``.torrent``. Without ``--torrent`` such a URL is an ordinary URL pull (the .torrent
    file itself is stored)."""
    if text.startswith("magnet:"):
        return True
    if is_url(text):
        return config.torrent and urlsplit(text).path.endswith(".torrent")
    return "://" not in text and text.endswith(".torrent")


@dataclass(frozen=True, slots=True)
class ForeignTorrent:
    """A foreign torrent as :class:`fetchd.bt.session.Metainfo` (what the session needs):
    filed under its v1 info-hash."""

    foreign: Foreign

    @property
    def raw(self) -> bytes:
        return self.foreign.raw  # whole: a hybrid's v2 part needs its piece layers

    @property
    def hex(self) -> str:
        return self.foreign.info_hash_hex

    @property
    def size(self) -> int:
        return self.foreign.length

    @property
    def num_pieces(self) -> int:
        return self.foreign.num_pieces

    def span(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_pieces:
            raise IndexError(f"piece {i} of {self.num_pieces}")
        start = i * self.foreign.piece_length
        return start, min(self.size, start + self.foreign.piece_length)

    def held(self, gaps: Sequence[tuple[int, int]]) -> set[int]:
        """The pieces no byte of which is in ``gaps`` (the sink holds them already)."""
        plen, n = self.foreign.piece_length, self.num_pieces
        missing: set[int] = set()
        for a, b in gaps:
            if a < b:
                missing.update(range(max(0, a) // plen, min(n, -(-b // plen))))
        return set(range(n)) - missing


class TorrentFetcher:
    """The file of a foreign torrent from its swarm (its trackers and web seeds), through
    the process's one libtorrent session. Like the swarm fetcher of a cache, libtorrent
    writes a file of its own beside the ingest's data (``ingest/…/swarm``: a killed pull
    resumes by recheck) and each piece it verified is copied into the sink's gaps only.
    Never verifies the whole file, never commits. Raises SwarmFailed (no new piece for
    ``stall_timeout`` s, too many hash failures, pieces missing). Calls may overlap
    (other torrents)."""

    def __init__(self, torrent: ForeignTorrent, swarms: Swarms, config: Config) -> None:
        self.torrent = torrent
        self.swarms = swarms
        self.config = config
        self.label = f"swarm of torrent {torrent.hex}"
        #: The swarm is this blob's only source (no cache or origin to hand it to), so a
        #: quiet swarm is given the general --stall-timeout, not the short swarm bound
        #: meant for an HTTP fallback: transmission, for one, unchokes a new peer only
        #: after 7-10 s (BITTORRENT.md §3.1).
        self.stall_timeout = max(config.bt_stall_timeout, config.stall_timeout)

    def towards(self) -> str:
        """Where the session's listen address is chosen towards (when no --bt-listen):
        the first tracker's host, else the first web seed's, else 127.0.0.1."""
        f = self.torrent.foreign
        for url in (*f.announce, *f.url_list):
            if urlsplit(url).hostname:
                return url
        return "http://127.0.0.1"

    async def fetch(
        self, desc: Descriptor, sink: Sink, on_bytes: OnBytes, *, last: bool = True
    ) -> None:
        if not isinstance(sink, SegmentedIngest):
            raise TransferFailed(f"{self.label}: a torrent is fetched into a segmented ingest only")
        t = self.torrent
        swarm = await self.swarms.get(self.towards())
        work = sink.data_path.parent / "swarm"
        copier = PieceCopier(sink, t, work, on_bytes)
        skip = t.held(sink.gaps())
        log.info(
            "torrent %s (%s): %d of %d pieces missing, trackers %s, web seeds %d",
            t.hex,
            t.foreign.name,
            t.num_pieces - len(skip),
            t.num_pieces,
            [redact(u) for u in t.foreign.announce] or "none",
            len(t.foreign.url_list),
        )
        ok = False
        try:
            await swarm.download(
                t,
                work.parent,
                work.name,
                trackers=t.foreign.announce,
                url_seeds=t.foreign.url_list,
                skip=skip,
                on_piece=copier.piece,
                stall_timeout=self.stall_timeout,
                max_hash_failures=self.config.bt_max_hash_failures,
            )
            ok = True
        finally:
            await copier.close()
            if ok or not sink.gaps():
                with contextlib.suppress(OSError):
                    work.unlink()
        if sink.gaps():
            raise SwarmFailed(f"the swarm of torrent {t.hex} ended with pieces missing")


async def pull_torrent(
    engine: Engine, ref: str, digest: Digest | None, mirrors: tuple[str, ...]
) -> PullResult:
    """Store the file the torrent at ``ref`` (a path or an http(s) URL) describes; see the
    module's docstring. ``digest`` pins its content (DigestMismatch at commit, nothing
    stored, when the swarm's verified file is another). Raises UsageError for a magnet
    link, ``--mirror``, or a .torrent given without ``--torrent``; BadTorrent for a torrent
    refused; SwarmFailed when the swarm cannot deliver. With ``--pull-policy new`` (and
    ``update``: a torrent's content cannot change) a file the store holds for this torrent
    is answered without the network beyond reading the torrent."""
    if ref.startswith("magnet:"):
        raise UsageError(MAGNET)
    if not engine.config.torrent:
        raise UsageError(f"{ref[:200]}: a .torrent file; pass --torrent to fetch what it describes")
    if mirrors:
        raise UsageError("--mirror does not apply to a torrent (its web seeds are in its url-list)")
    raw = await _read(engine, ref)
    t = ForeignTorrent(parse_foreign(raw))
    name = f"torrent:{t.hex}"
    if digest is not None and digest.algorithm != "sha256":
        raise UsageError(f"--digest {digest}: fetchd stores a torrent's file under its sha256")
    have = await asyncio.to_thread(_recorded, engine, name, digest, t.size)
    if have is not None:
        return PullResult(name, have, Descriptor(MEDIA_TYPE, have, t.size), False)
    if engine.config.pull_policy == "never":
        raise ImageNotInStore(
            f"{name} is not in the store and --pull-policy never forbids fetching it"
        )
    fetcher = TorrentFetcher(t, engine.swarms, engine.config)
    flight = str(digest) if digest is not None else name
    async with engine.leased([digest] if digest else []):
        for attempt in (1, 2):
            try:
                download = lambda: _download(engine, t, fetcher, digest)  # noqa: E731
                got = await engine.single.run(flight, download)
                if got is None:  # the flight was an image's blob of that digest
                    got = await download()
                break
            except layout.BlobsMissing:
                if attempt == 2:  # a gc deleted it between our commit and now: twice
                    raise
    return PullResult(name, got, Descriptor(MEDIA_TYPE, got, t.size), True)


async def _download(
    engine: Engine, t: ForeignTorrent, fetcher: TorrentFetcher, digest: Digest | None
) -> Digest:
    """Fetch, commit and record the torrent's file, holding its ingest (one writer across
    processes; one that finds the record made meanwhile by another takes it)."""
    name = f"torrent:{t.hex}"
    key = None if digest is not None else f"torrent-{t.hex}"
    store = engine.store
    async with store.ingest(digest, t.size, key=key, segmented=True) as ingest:
        assert isinstance(ingest, SegmentedIngest)
        have = await asyncio.to_thread(_recorded, engine, name, digest, t.size)
        if have is not None:
            return have
        if ingest.exists:  # a pinned digest another writer committed meanwhile
            got = ingest.digest
        else:
            label = f"torrent {t.hex[:12]}"
            # A torrent may claim up to ~50 TiB: refuse what this disk cannot hold first.
            ensure_room(store.ingests, t.size - ingest.offset, label, store.root)
            engine.progress.start(label, t.foreign.name[:22], t.size, ingest.offset)
            desc = Descriptor(MEDIA_TYPE, ingest.digest, t.size)
            try:
                await fill_and_commit(
                    desc,
                    ingest,
                    Sources([fetcher], fetcher),
                    engine.config,
                    lambda n: engine.progress.advance(label, n),
                    lambda n: engine.progress.connections(label, n),
                )
            except BaseException:
                engine.progress.drop(label)
                raise
            engine.progress.finish(label)
            got = ingest.digest
        assert got is not None
        now = time.time()
        rec = UrlRecord(name, str(got), t.size, None, None, None, now, now)
        await asyncio.to_thread(record_url, store, rec)
        return got


def _recorded(engine: Engine, name: str, digest: Digest | None, size: int) -> Digest | None:
    """The blob the store holds for torrent ``name`` (and ``digest``, if given), its use
    noted; None if there is none."""
    store = engine.store
    entry = layout.find_url(store, name)
    if entry is None:
        return None
    got = entry.blob.digest
    if (digest is not None and got != digest) or entry.blob.size != size or not store.has(got):
        return None
    try:
        rec = engine.meta.url(name)
        now = time.time()
        if rec is not None and rec.digest == str(got):
            engine.meta.put_url(replace(rec, last_used=now))
        else:
            record_url(store, UrlRecord(name, str(got), size, None, None, None, now, now))
    except (FetchdError, OSError) as exc:  # a store this user may only read still serves
        log.debug("%s: not recorded as used: %s", name, exc)
    return got


async def _read(engine: Engine, ref: str) -> bytes:
    """The .torrent at ``ref``: a local file, or an http(s) URL (plain HTTP only with
    ``--insecure-options http``, every redirect checked too); at most MAX_TORRENT_BYTES,
    within the request budget."""
    if not is_url(ref):
        return await asyncio.to_thread(_read_file, Path(ref))
    config = engine.config
    url = ref
    try:
        async with asyncio.timeout(config.request_budget):
            for _ in range(MAX_REDIRECTS + 1):
                if not is_url(url):
                    raise TransferFailed(f"{redact(ref)}: redirected to {redact(url)[:200]}")
                if url.startswith("http://") and "http" not in config.insecure:
                    raise InsecureRefused(
                        f"{redact(url)} is plain HTTP; pass --insecure-options http to allow it"
                    )
                async with engine.session().get(url, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                        url = urljoin(url, resp.headers["Location"])
                        continue
                    if resp.status != 200:
                        raise status_error(resp.status, f"torrent {redact(url)}")
                    if (resp.content_length or 0) > MAX_TORRENT_BYTES:
                        raise BadTorrent(_too_big(redact(url)))
                    body = await read_body(resp, MAX_TORRENT_BYTES)
                if len(body) > MAX_TORRENT_BYTES:
                    raise BadTorrent(_too_big(redact(url)))
                return body
    except retryable() as exc:
        raise translate(exc, f"torrent {redact(url)}", config) from exc
    raise TransferFailed(f"{redact(ref)}: more than {MAX_REDIRECTS} redirects")


def _read_file(path: Path) -> bytes:
    """A local .torrent (a regular file; never blocks on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise UsageError(f"cannot read the torrent {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise UsageError(f"{path} is not a regular file")
        try:
            data = f.read(MAX_TORRENT_BYTES + 1)
        except OSError as exc:
            raise UsageError(f"cannot read the torrent {path}: {exc.strerror}") from exc
    if len(data) > MAX_TORRENT_BYTES:
        raise BadTorrent(_too_big(str(path)))
    return data


def _too_big(where: str) -> str:
    return f"torrent refused: {where} is more than the {MAX_TORRENT_BYTES} bytes a torrent may be"
