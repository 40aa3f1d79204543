"""sqlite metadata beside the layout: when each name was pulled and last used.

The layout (index.json + blobs) is the truth about *what* the store holds; this
database only adds *when* (for ``images`` and LRU gc). Losing it loses no content.
Connections are short-lived and use WAL with a busy timeout, so CLI pulls and a
server can share it. Calls block briefly: call them from a thread on hot paths.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
"""


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


class Meta:
    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
            yield conn
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
        with self._db() as db:
            rows = db.execute("SELECT name, pulled_at, last_used FROM images").fetchall()
        return {r[0]: (r[1], r[2]) for r in rows}

    def forget(self, names: list[str]) -> None:
        with self._db() as db:
            db.executemany("DELETE FROM images WHERE name=?", [(n,) for n in names])

    # --- URLs (plain HTTP(S) blobs) ------------------------------------------------------

    def url(self, url: str) -> UrlRecord | None:
        with self._db() as db:
            row = db.execute(
                "SELECT url, digest, size, etag, last_modified, max_age, checked_at, last_used "
                "FROM urls WHERE url=?",
                (url,),
            ).fetchone()
        return UrlRecord(*row) if row else None

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
        with self._db() as db:
            rows = db.execute(
                "SELECT url, digest, size, etag, last_modified, max_age, checked_at, last_used "
                "FROM urls"
            ).fetchall()
        return [UrlRecord(*r) for r in rows]

    def forget_urls(self, urls: list[str]) -> None:
        with self._db() as db:
            db.executemany("DELETE FROM urls WHERE url=?", [(u,) for u in urls])

    # --- the cache server's manifests (fetchd serve) -----------------------------------

    def tag(self, repository: str, tag: str) -> tuple[str, float] | None:
        """(digest, checked_at) of a tag the server resolved before."""
        with self._db() as db:
            row = db.execute(
                "SELECT digest, checked_at FROM tags WHERE repository=? AND tag=?",
                (repository, tag),
            ).fetchone()
        return (row[0], row[1]) if row else None

    def tags_of(self, repository: str) -> list[str]:
        with self._db() as db:
            rows = db.execute(
                "SELECT tag FROM tags WHERE repository=? ORDER BY tag", (repository,)
            ).fetchall()
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
        with self._db() as db:
            return [
                (r[0], r[1], r[2], r[3])
                for r in db.execute(
                    "SELECT digest, repository, media_type, last_used FROM cached "
                    "ORDER BY last_used"
                )
            ]

    def forget_cached(self, digests: list[str]) -> None:
        with self._db() as db:
            db.executemany("DELETE FROM cached WHERE digest=?", [(d,) for d in digests])
            db.executemany("DELETE FROM tags WHERE digest=?", [(d,) for d in digests])
