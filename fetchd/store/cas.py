"""The blob store: ingest → ``commit(expected digest, size)`` → visible in layout/blobs.

Contract (after containerd's content store):

* Bytes enter ``layout/blobs`` only through :meth:`Ingest.commit`, which checks the size
  and the digest of everything written and then makes the blob visible with one
  ``rename`` on the same filesystem. Nothing unverified is ever visible.
* "Already exists" is success: committing a blob that another writer committed first
  just discards the duplicate.
* An ingest is keyed by the expected digest and lives in ``ingest/<alg>-<hex>/``. One
  writer at a time holds it (an ``flock``; other processes wait, then usually find the
  blob committed). Its ``data`` file survives a crash or a kill -9, and the next writer
  resumes from its end after re-hashing what is there.
* Who verifies: the store, always. Callers hand it bytes; they need not hash anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

from fetchd.errors import DigestMismatch, SizeMismatch, StoreError
from fetchd.model import Digest
from fetchd.store.locks import alocked

_REHASH_CHUNK = 4 * 1024 * 1024


class ResumedDataBad(DigestMismatch):
    """A resumed blob failed verification; the ingest was reset to fetch it whole."""


class Store:
    """A fetchd store rooted at ``root`` (see DESIGN.md §3). Safe for many processes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.layout = root / "layout"
        self.blobs = self.layout / "blobs"
        self.ingests = root / "ingest"
        self.quarantine = root / "quarantine"
        self.index_path = self.layout / "index.json"
        self.index_lock = root / "index.lock"
        self.db_path = root / "fetchd.db"

    @classmethod
    def open(cls, root: Path) -> Store:
        """Open (creating if needed) the store at ``root``."""
        store = cls(root)
        try:
            for d in (store.blobs / "sha256", store.ingests):
                d.mkdir(parents=True, exist_ok=True)
            oci_layout = store.layout / "oci-layout"
            if not oci_layout.exists():
                atomic_write(oci_layout, b'{"imageLayoutVersion": "1.0.0"}')
            if not store.index_path.exists():
                doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json"}
                with contextlib.suppress(FileExistsError):
                    atomic_write(store.index_path, json.dumps(doc).encode(), exclusive=True)
        except OSError as exc:
            raise StoreError(f"cannot open the store at {root}: {exc.strerror or exc}") from exc
        return store

    # --- reading -------------------------------------------------------------------

    def blob_path(self, digest: Digest) -> Path:
        return self.blobs / digest.algorithm / digest.hex

    def has(self, digest: Digest) -> bool:
        return self.blob_path(digest).is_file()

    def blob_size(self, digest: Digest) -> int | None:
        try:
            return self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def read_blob(self, digest: Digest, limit: int) -> bytes:
        """Read a small committed blob (a manifest or config), at most ``limit`` bytes."""
        with open(self.blob_path(digest), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise StoreError(f"blob {digest.short} is larger than {limit} bytes")
        return data

    def iter_blobs(self) -> Iterator[tuple[Digest, Path]]:
        for alg_dir in sorted(self.blobs.iterdir()) if self.blobs.is_dir() else []:
            for p in sorted(alg_dir.iterdir()):
                try:
                    yield Digest.parse(f"{alg_dir.name}:{p.name}"), p
                except Exception:
                    continue  # not a blob name: fsck reports it separately

    # --- writing -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def ingest(self, digest: Digest, size: int | None) -> AsyncIterator[Ingest]:
        """Hold the ingest for ``digest``; resumes partial data a previous writer left.

        ``size`` (if known) is enforced: writing past it raises :class:`SizeMismatch`.
        Check :attr:`Ingest.exists` first: the blob may have been committed while we
        waited for the lock. Leaving the block without commit keeps the partial data.
        """
        path = self.ingests / f"{digest.algorithm}-{digest.hex}"
        async with alocked(path / "lock"):
            ing = Ingest(self, digest, size, path)
            try:
                if not ing.exists:
                    await asyncio.to_thread(ing.open)
                yield ing
            finally:
                await ing.close()

    def put(self, data: bytes, expected: Digest) -> bool:
        """Commit a small in-memory blob (a manifest) after verifying it.

        Returns False if it was already there.
        """
        actual = Digest.of(data, expected.algorithm)
        if actual != expected:
            raise DigestMismatch(f"blob {expected.short}", str(expected), str(actual))
        if self.has(expected):
            return False
        atomic_write(self.blob_path(expected), data)
        return True


class Ingest:
    """A partial blob being written, held by exactly one writer (see :meth:`Store.ingest`).

    :meth:`write` pipelines: it waits for the previous chunk, hands this one to a worker
    thread (hash + write) and returns, so reading the next chunk from the network overlaps
    hashing and writing this one, with at most two chunks in memory. Calls must not
    overlap.
    """

    def __init__(self, store: Store, digest: Digest, size: int | None, path: Path) -> None:
        self.store = store
        self.digest = digest
        self.size = size
        self.path = path
        self.data_path = path / "data"
        self.offset = 0
        self.resumed_from = 0
        self._fd = -1
        self._hasher: Any = None
        self._pending: asyncio.Future[None] | None = None
        self._done = False

    @property
    def exists(self) -> bool:
        """The blob is already committed (by us or by anyone)."""
        return self.store.has(self.digest)

    def open(self) -> None:
        """Open the data file and rebuild the hash state of what is already in it."""
        self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        length = os.fstat(self._fd).st_size
        if self.size is not None and length > self.size:
            length = 0  # cannot be a prefix of this blob: start over
        self._hasher = self.digest.hasher()
        done = 0
        while done < length:
            chunk = os.pread(self._fd, min(_REHASH_CHUNK, length - done), done)
            if not chunk:
                break
            self._hasher.update(chunk)
            done += len(chunk)
        os.ftruncate(self._fd, done)
        self.offset = self.resumed_from = done

    async def write(self, pieces: Sequence[bytes]) -> None:
        """Append ``pieces`` (in order). Raises :class:`SizeMismatch` before writing past
        ``size``. Taking a list lets the network side hand over what it read without
        joining it on the event loop: the worker hashes each piece and writes them all
        with one ``pwritev``.
        """
        if self._done:
            raise StoreError(f"ingest of {self.digest.short} is already finished")
        n = sum(len(p) for p in pieces)
        if self.size is not None and self.offset + n > self.size:
            # An endless or lying response: what came is not this blob. Drop it all.
            await self.discard()
            raise SizeMismatch(f"blob {self.digest.short}", self.size, self.offset + n)
        # Chunks must be hashed and written in order: wait for the previous one, then
        # hand this one over and return while it is processed.
        await self.flush()
        loop = asyncio.get_running_loop()
        self._pending = loop.run_in_executor(None, self._append, pieces, self.offset)
        self.offset += n

    async def flush(self) -> None:
        """Wait until every chunk handed to :meth:`write` is hashed and written."""
        pending, self._pending = self._pending, None
        if pending is not None:
            await pending

    def _append(self, pieces: Sequence[bytes], at: int) -> None:
        # Explicit offsets (pwritev): the fd's own position is not part of the state.
        for p in pieces:
            self._hasher.update(p)
        views = [memoryview(p) for p in pieces]
        while views:
            n = os.pwritev(self._fd, views, at)
            at += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]

    async def restart(self) -> None:
        """Throw away the partial data (the source cannot resume it)."""
        await self.flush()
        await asyncio.to_thread(os.ftruncate, self._fd, 0)
        self._hasher = self.digest.hasher()
        self.offset = self.resumed_from = 0

    async def commit(self) -> None:
        """Verify size and digest, then make the blob visible with one atomic rename.

        On a mismatch the partial data is deleted and the error raised; on success (or
        if the blob already exists) the ingest is removed.
        """
        await self.flush()
        await asyncio.to_thread(self._commit)

    def _commit(self) -> None:
        what = f"blob {self.digest.short}"
        if self.size is not None and self.offset != self.size:
            self._discard()
            raise SizeMismatch(what, self.size, self.offset)
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            if self.resumed_from:
                # The bad bytes may be an earlier run's: start over once, cleanly.
                os.ftruncate(self._fd, 0)
                self._hasher = self.digest.hasher()
                self.offset = self.resumed_from = 0
                raise ResumedDataBad(what, str(self.digest), f"{self.digest.algorithm}:{actual}")
            self._discard()
            raise DigestMismatch(what, str(self.digest), f"{self.digest.algorithm}:{actual}")
        target = self.store.blob_path(self.digest)
        if not target.exists():
            os.fsync(self._fd)
            os.chmod(self.data_path, 0o444)  # blobs are immutable
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.data_path, target)
            _fsync_dir(target.parent)
        self._done = True

    async def discard(self) -> None:
        """Drop the partial data (it cannot be the blob); the ingest starts empty again."""
        await self.restart()

    def _discard(self) -> None:
        os.ftruncate(self._fd, 0)
        self._done = True

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        empty = not self.data_path.exists() or self.data_path.stat().st_size == 0
        if self._done or empty or self.exists:
            await asyncio.to_thread(shutil.rmtree, self.path, True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` via a temporary file and one rename (or link)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    try:
        if exclusive:
            os.link(tmp, path)  # fails with FileExistsError instead of replacing
        else:
            os.rename(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
