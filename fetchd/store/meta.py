"""sqlite metadata beside the layout: an index of it, plus what only saves time.

The layout (index.json + blobs) is the one truth about *what* the store holds: every
name, and every URL pulled (an index.json entry with ``io.fetchd.url``, layout.py).
This database is an index that can be rebuilt from it (``fetchd fsck --rebuild-db``,
and on its own when a write finds the database missing or corrupt); it adds only what
saves time: *when* each name was pulled and used (``images``, LRU gc), a URL's
validators (ETag, Last-Modified, max-age), the cache server's tags and manifests, and
the canonical torrent of a blob (fetchd/bt/metainfo.py). Losing it loses no content and
no name: LRU times restart from the rebuild, a URL without validators is used as stored
under ``--pull-policy new`` and fetched again under ``update``, a cache server asks its
upstream again, and a torrent is built again from its blob (one SHA-1 pass).

Connections are short-lived and use WAL with a busy timeout, so CLI pulls and a
server can share it. Calls block briefly: call them from a thread on hot paths.

Reads never write: they open the database read-only (no schema, no journal change), so
``fetchd images`` and gc work on a full disk; a missing database or table reads as
empty. A write on a full disk raises :class:`~fetchd.errors.DiskFull`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fetchd.errors import DigestInvalid, StoreError
from fetchd.store.diskfull import is_full, is_read_only, writing

if TYPE_CHECKING:
    from fetchd.store.cas import Store

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    name      TEXT PRIMARY KEY,
    digest    TEXT NOT NULL,
    pulled_at REAL NOT NULL,
    last_used REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS tags (
    repository TEXT NOT NULL,
    tag        TEXT NOT NULL,
    digest     TEXT NOT NULL,
    checked_at REAL NOT NULL,
    PRIMARY KEY (repository, tag)
);
CREATE TABLE IF NOT EXISTS cached (
    digest     TEXT PRIMARY KEY,
    repository TEXT NOT NULL,
    media_type TEXT NOT NULL,
    last_used  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS urls (
    url           TEXT PRIMARY KEY,
    digest        TEXT NOT NULL,
    size          INTEGER NOT NULL,
    etag          TEXT,
    last_modified TEXT,
    max_age       REAL,
    checked_at    REAL NOT NULL,
    last_used     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS torrents (
    digest TEXT PRIMARY KEY,
    raw    BLOB NOT NULL
);
"""


_SETUP_TRIES = 20


@dataclass(frozen=True, slots=True)
class UrlRecord:
    """rkt's remote cache: what a URL gave last time and how long that stays fresh."""

    url: str
    digest: str
    size: int
    etag: str | None
    last_modified: str | None
    max_age: float | None
    checked_at: float
    last_used: float

    def fresh(self, now: float) -> bool:
        return self.max_age is not None and now - self.checked_at < self.max_age

    @classmethod
    def fetched(
        cls, url: str, digest: str, size: int, meta: Mapping[str, Any], now: float
    ) -> UrlRecord:
        """The record of a download of ``url`` that just ended: its validators from the
        ingest's ``meta`` (ETag, Last-Modified, max-age), checked and used ``now``."""
        return cls(
            url,
            digest,
            size,
            meta.get("etag"),
            meta.get("last_modified"),
            meta.get("max_age"),
            now,
            now,
        )


def _holds(store: Store, digest_text: str) -> bool:
    """Whether the store holds the blob a torrent row names (a malformed name: no)."""
    from fetchd.model import Digest

    try:
        return store.has(Digest.parse(digest_text))
    except DigestInvalid:
        return False


class Meta:
    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """A connection for writing (creating the database and its tables if needed)."""
        with writing(f"the metadata database {self.path.name}", self.path.parent):
            conn = self._setup()
            try:
                yield conn
            finally:
                conn.close()

    def _setup(self) -> sqlite3.Connection:
        # Switching a new database to WAL while another process does the same can fail
        # at once with "database is locked" (sqlite skips the busy timeout where
        # waiting could deadlock): a few tries, backing off, then the error.
        for attempt in range(_SETUP_TRIES):
            existed = self.path.exists()
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.executescript(_SCHEMA)
                if not existed:
                    self._fill(conn, prune=False, why="it was missing")
                return conn
            except sqlite3.OperationalError as exc:
                conn.close()
                if "locked" not in str(exc) or attempt == _SETUP_TRIES - 1:
                    raise
            except sqlite3.DatabaseError as exc:  # not a database, or a malformed one
                conn.close()
                if attempt == _SETUP_TRIES - 1:
                    raise StoreError(f"cannot repair {self.path}: {exc}") from exc
                self._set_aside(exc)
                continue
            except BaseException:
                conn.close()
                raise
            time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _set_aside(self, exc: sqlite3.DatabaseError) -> None:
        """Move a corrupt database to ``fetchd.db.corrupt`` (the next open rebuilds it).

        Under an flock on the corrupt file, and only if it is still the file at the path
        and still corrupt: two processes that both found it corrupt must not move the
        one the first rebuilt.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                return  # replaced meanwhile
            probe = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            try:
                probe.execute("PRAGMA schema_version").fetchall()
                return  # sound after all (another process repaired it)
            except sqlite3.OperationalError:
                return  # busy or similar: not corruption; the caller tries again
            except sqlite3.DatabaseError:
                pass
            finally:
                probe.close()
            aside = self.path.with_name(self.path.name + ".corrupt")
            os.replace(self.path, aside)
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path.with_name(self.path.name + suffix))
            log.warning(
                "%s was corrupt (%s): moved to %s and rebuilt from the layout; no content "
                "or name is lost (last-used times restart now, URL validators are gone)",
                self.path,
                exc,
                aside.name,
            )
        except FileNotFoundError:
            return
        finally:
            os.close(fd)

    def _fill(self, conn: sqlite3.Connection, *, prune: bool, why: str) -> tuple[int, int]:
        """Make the index agree with the layout: a row for every name and URL it holds
        (new rows used now); with ``prune``, no row for what it does not hold, nor a
        torrent row for a blob it does not hold. A row whose digest the layout
        contradicts takes the layout's (and loses a URL's validators, which were another
        content's). Returns (names, URLs) added."""
        from fetchd.store import layout
        from fetchd.store.cas import Store

        store = Store(self.path.parent)
        try:
            names = {e.name: str(e.top_digest) for e in layout.entries(store)}
            urls = {u.url: u.blob for u in layout.url_entries(store)}
        except StoreError as exc:
            log.warning("cannot rebuild %s from the layout (%s): %s", self.path, why, exc)
            return (0, 0)
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            had_names = {r[0] for r in conn.execute("SELECT name FROM images")}
            had_urls = {r[0] for r in conn.execute("SELECT url FROM urls")}
            had_torrents = [r[0] for r in conn.execute("SELECT digest FROM torrents")]
            for name, digest in names.items():
                conn.execute(
                    "INSERT INTO images VALUES (?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
                    "digest=excluded.digest WHERE digest != excluded.digest",
                    (name, digest, now, now),
                )
            for url, blob in urls.items():
                conn.execute(
                    "INSERT INTO urls VALUES (?,?,?,NULL,NULL,NULL,0,?) ON CONFLICT(url) DO "
                    "UPDATE SET digest=excluded.digest, size=excluded.size, etag=NULL, "
                    "last_modified=NULL, max_age=NULL WHERE digest != excluded.digest",
                    (url, str(blob.digest), blob.size, now),
                )
            if prune:
                conn.executemany(
                    "DELETE FROM images WHERE name=?", [(n,) for n in had_names - names.keys()]
                )
                conn.executemany(
                    "DELETE FROM urls WHERE url=?", [(u,) for u in had_urls - urls.keys()]
                )
                conn.executemany(
                    "DELETE FROM torrents WHERE digest=?",
                    [(d,) for d in had_torrents if not _holds(store, d)],
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        added = (len(names.keys() - had_names), len(urls.keys() - had_urls))
        if any(added):
            log.info("%s: indexed %d names and %d URLs (%s)", self.path, *added, why)
        return added

    def ensure(self) -> None:
        """Open the database for writing once: a missing or corrupt one is rebuilt."""
        with self._db():
            pass

    def rebuild(self) -> tuple[int, int]:
        """``fsck --rebuild-db``: the index made to agree with the layout (a corrupt
        database is set aside first). Returns (names, URLs) it had to add."""
        with self._db() as db:
            return self._fill(db, prune=True, why="fsck --rebuild-db")

    def _select(self, sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        """Rows of a query, read without writing anything (see the module docstring)."""
        if not self.path.exists():
            return []
        uri = f"file:{urllib.parse.quote(str(self.path))}?mode=ro"
        try:
            return self._query(uri, sql, args)
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            if not (is_full(exc) or is_read_only(exc)):
                raise StoreError(f"cannot read {self.path}: {exc}") from exc
            # A full disk, or a store this user may only read: sqlite could not create or
            # size the WAL index (-shm). Without a WAL holding changes, the main file is
            # the whole truth: read it as immutable.
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise StoreError(
                    f"cannot read {self.path} on a full disk (its write-ahead log is not "
                    "merged yet); free space or use fetchd gc"
                ) from exc
            try:
                return self._query(uri + "&immutable=1", sql, args)
            except sqlite3.Error as exc2:
                raise StoreError(f"cannot read {self.path}: {exc2}") from exc2
        except sqlite3.Error as exc:
            raise StoreError(
                f"cannot read {self.path}: {exc}; run fetchd fsck --rebuild-db (the database "
                "is an index of the layout: no content or name is lost)"
            ) from exc

    @staticmethod
    def _query(uri: str, sql: str, args: tuple[Any, ...]) -> list[Any]:
        conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def touch_image(self, name: str, digest: str, *, pulled: bool) -> None:
        now = time.time()
        with self._db() as db:
            if pulled:
                db.execute(
                    "INSERT INTO images(name, digest, pulled_at, last_used) VALUES (?,?,?,?) "
                    "ON CONFLICT(name) DO UPDATE SET digest=excluded.digest, "
                    "pulled_at=excluded.pulled_at, last_used=excluded.last_used",
                    (name, digest, now, now),
                )
            else:
                db.execute("UPDATE images SET last_used=? WHERE name=?", (now, name))

    def times(self) -> dict[str, tuple[float, float]]:
        """name → (pulled_at, last_used)."""
        rows = self._select("SELECT name, pulled_at, last_used FROM images")
        return {r[0]: (r[1], r[2]) for r in rows}

    def forget(self, names: list[str]) -> None:
        with self._db() as db:
            db.executemany("DELETE FROM images WHERE name=?", [(n,) for n in names])

    # --- URLs (plain HTTP(S) blobs) ------------------------------------------------------

    def url(self, url: str) -> UrlRecord | None:
        rows = self._select(
            "SELECT url, digest, size, etag, last_modified, max_age, checked_at, last_used "
            "FROM urls WHERE url=?",
            (url,),
        )
        return UrlRecord(*rows[0]) if rows else None

    def put_url(self, rec: UrlRecord) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO urls VALUES (?,?,?,?,?,?,?,?)",
                (
                    rec.url,
                    rec.digest,
                    rec.size,
                    rec.etag,
                    rec.last_modified,
                    rec.max_age,
                    rec.checked_at,
                    rec.last_used,
                ),
            )

    def urls(self) -> list[UrlRecord]:
        rows = self._select(
            "SELECT url, digest, size, etag, last_modified, max_age, checked_at, last_used "
            "FROM urls"
        )
        return [UrlRecord(*r) for r in rows]

    def forget_urls(self, urls: list[str]) -> None:
        with self._db() as db:
            db.executemany("DELETE FROM urls WHERE url=?", [(u,) for u in urls])

    # --- the cache server's manifests (fetchd serve) -----------------------------------

    def tag(self, repository: str, tag: str) -> tuple[str, float] | None:
        """(digest, checked_at) of a tag the server resolved before."""
        rows = self._select(
            "SELECT digest, checked_at FROM tags WHERE repository=? AND tag=?",
            (repository, tag),
        )
        return (rows[0][0], rows[0][1]) if rows else None

    def tags_of(self, repository: str) -> list[str]:
        rows = self._select("SELECT tag FROM tags WHERE repository=? ORDER BY tag", (repository,))
        return [r[0] for r in rows]

    def put_tag(self, repository: str, tag: str, digest: str) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO tags VALUES (?,?,?,?)",
                (repository, tag, digest, time.time()),
            )

    def cache_manifest(self, digest: str, repository: str, media_type: str) -> None:
        """A manifest the server holds: gc keeps it and what it references."""
        with self._db() as db:
            db.execute(
                "INSERT OR REPLACE INTO cached VALUES (?,?,?,?)",
                (digest, repository, media_type, time.time()),
            )

    def cached_manifests(self) -> list[tuple[str, str, str, float]]:
        """(digest, repository, media_type, last_used), least recently used first."""
        rows = self._select(
            "SELECT digest, repository, media_type, last_used FROM cached ORDER BY last_used"
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    def forget_cached(self, digests: list[str]) -> None:
        with self._db() as db:
            db.executemany("DELETE FROM cached WHERE digest=?", [(d,) for d in digests])
            db.executemany("DELETE FROM tags WHERE digest=?", [(d,) for d in digests])

    # --- torrents (fetchd/bt/metainfo.py) ----------------------------------------------

    def put_torrent(self, digest: str, raw: bytes) -> None:
        """Keep the canonical torrent (``Torrent.raw``) of blob ``digest`` ("sha256:HEX").

        Derived data: a torrent is a pure function of its blob's bytes, so a lost table
        (or row) only costs building it again. The caller has it from
        ``metainfo.build_from_file`` or ``metainfo.canonical``; nothing is checked here.
        A second call for the same digest replaces the row.
        """
        with self._db() as db:
            db.execute("INSERT OR REPLACE INTO torrents VALUES (?,?)", (digest, bytes(raw)))

    def torrent(self, digest: str) -> bytes | None:
        """The canonical torrent kept for ``digest``, or None (never kept, or forgotten)."""
        rows = self._select("SELECT raw FROM torrents WHERE digest=?", (digest,))
        return bytes(rows[0][0]) if rows else None

    def torrents(self) -> list[str]:
        """The digests that have a torrent row, sorted. A row may outlive its blob (a blob
        removed by something other than gc): check the blob before seeding it."""
        return [r[0] for r in self._select("SELECT digest FROM torrents ORDER BY digest")]

    def forget_torrents(self, digests: list[str]) -> None:
        """Drop the torrent rows of ``digests`` (gc does, for the blobs it removes)."""
        with self._db() as db:
            db.executemany("DELETE FROM torrents WHERE digest=?", [(d,) for d in digests])
