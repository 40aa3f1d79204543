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
* Both kinds of ingest are a :class:`~fetchd.sources.base.Sink`, the face fetchers see.
* Bad resumed data: when the digest does not match and some of the bytes came from an
  earlier writer, commit drops those (a sequential ingest: everything, since its resumed
  part is a prefix of the rest) and raises :class:`ResumedDataBad`; the caller fetches
  ``gaps()`` again and commits once more. A mismatch with nothing resumed discards all.
* An ingest's directory and lock file are removed only by the writer holding the lock
  (see locks.py), so a waiter never locks a file that is being deleted under it.
* Inside a lease (:data:`leases.current`), every blob committed is first added to the
  lease, and recorded as committed by it if this writer made it visible.
* A full disk raises :class:`~fetchd.errors.DiskFull` naming what was being written, and
  leaves no temporary file behind.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import mmap
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fetchd.errors import DigestMismatch, DiskFull, SizeMismatch, StoreError
from fetchd.model import Digest
from fetchd.store import leases
from fetchd.store.diskfull import is_full, is_read_only, writing
from fetchd.store.locks import alocked, remove_locked_dir
from fetchd.threads import finish, run_in

if TYPE_CHECKING:
    from fetchd.sources.base import Sink

log = logging.getLogger(__name__)

_REHASH_CHUNK = 4 * 1024 * 1024


#: The end of the gaps of an ingest whose size is unknown (a URL not probed yet).
UNKNOWN_END = 1 << 62


class ResumedDataBad(DigestMismatch):
    """A resumed blob failed verification: the resumed ranges were dropped; fetch the
    gaps again and commit once more.

    A :class:`SegmentedIngest` keeps the ranges written since it was opened and drops
    only those an earlier writer left (the suspect ones); a sequential :class:`Ingest`
    drops everything (its resumed part is a prefix and the rest follows it). Raised
    at most once per resume: a second mismatch, with nothing resumed left, is a plain
    :class:`DigestMismatch` and discards everything.
    """


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
        #: held shared while a lease adds digests, exclusively while blobs are deleted
        self.gc_lock = root / "gc.lock"
        self.leases = root / "leases"
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
            if is_full(exc):
                raise DiskFull("the store's layout", root) from exc
            advice = (
                "; use --store DIR with a directory you may create or write, or run as its owner"
                if is_read_only(exc)
                else "; --store (or $FETCHD_STORE) must name a directory"
                if exc.errno in (errno.ENOTDIR, errno.EEXIST)
                else ""
            )
            raise StoreError(
                f"cannot open the store at {root}: {exc.strerror or exc}{advice}"
            ) from exc
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
    async def ingest(
        self,
        digest: Digest | None,
        size: int | None,
        *,
        key: str | None = None,
        segmented: bool = False,
        also: Callable[[], Feeder] | None = None,
    ) -> AsyncIterator[Ingest]:
        """Hold the ingest for ``digest``; resumes partial data a previous writer left.

        ``size`` (if known) is enforced: writing past it raises :class:`SizeMismatch`.
        Check :attr:`Ingest.exists` first: the blob may have been committed while we
        waited for the lock. Leaving the block without commit keeps the partial data.
        With ``digest`` None (a URL whose digest nobody gave), ``key`` names the ingest
        and commit stores the blob under the sha256 it computed. ``segmented`` gives a
        :class:`SegmentedIngest`, written at any offset by several connections.
        ``also`` makes a :class:`Feeder` given every byte in order, as it is hashed (one
        pass for the digest and, say, the blob's torrent); a new one each time hashing
        starts over (a resume rehashes what is there; bad data is dropped).
        """
        if digest is not None:
            key = f"{digest.algorithm}-{digest.hex}"
        if not key or "/" in key or key.startswith("."):
            raise StoreError(f"bad ingest key {key!r}")
        path = self.ingests / key
        cls = SegmentedIngest if segmented else Ingest
        async with alocked(path / "lock"):
            ing = cls(self, digest, size, path)
            ing.also = also
            ing.lease = leases.current.get()
            try:
                if not ing.exists:
                    with writing(ing._what, self.root):
                        await asyncio.to_thread(ing.open)
                yield ing
            finally:
                await ing.close()

    def put(self, data: bytes, expected: Digest) -> None:
        """Commit a small in-memory blob (a manifest) after verifying it."""
        actual = Digest.of(data, expected.algorithm)
        if actual != expected:
            raise DigestMismatch(f"blob {expected.short}", str(expected), str(actual))
        if self.has(expected):
            return
        lease = leases.current.get()
        if lease is not None:
            lease.add([expected])
        with writing(f"blob {expected.short}", self.root):
            atomic_write(self.blob_path(expected), data)
        if lease is not None:
            lease.mark_committed(expected)


class Ingest:
    """A partial blob being written, held by exactly one writer (see :meth:`Store.ingest`).

    :meth:`write` pipelines: it waits for the previous chunk, hands this one to a worker
    thread of the ``store`` pool (hash + write) and returns, so reading the next chunk
    from the network overlaps hashing and writing this one, with at most two chunks in
    memory. Calls must not overlap.

    As a :class:`~fetchd.sources.base.Sink`: :meth:`write_at` takes only ``offset ==
    self.offset`` (the bytes are hashed as they come, so they must come in order) and
    :meth:`record` is refused; :meth:`gaps` is everything after ``offset``.
    """

    def __init__(self, store: Store, digest: Digest | None, size: int | None, path: Path) -> None:
        self.store = store
        self.expected = digest
        self.algorithm = digest.algorithm if digest else "sha256"
        #: the blob's digest once known: the expected one, or what commit computed
        self.digest = digest or Digest("sha256", "0" * 64)
        #: set by commit once size and digest checked, before its fsync and rename (a
        #: reader streaming the data may send the last byte then); ``on_verified`` is
        #: called then, on commit's thread
        self.verified = False
        self.on_verified: Callable[[], None] | None = None
        self.size = size
        self.path = path
        self.data_path = path / "data"
        self.offset = 0
        self.resumed_from = 0
        self._fd = -1
        #: held around every write into the data file, by whichever thread writes (each
        #: with an fd of its own may take it too): ext4 serializes buffered writes to one
        #: inode on its i_rwsem, and writers waiting there spin on the CPU
        #: (rwsem_spin_on_owner was 6-15 % of all CPU samples with the range connections
        #: of one download on 2 cores, most when the holder's copy faulted on the host);
        #: here they sleep
        self.write_lock = threading.Lock()
        self._hasher: Any = None
        self._pending: asyncio.Future[None] | None = None
        self._done = False
        self._written = 0
        #: bumped whenever the data is thrown away: readers of the old data must stop
        self.generation = 0
        #: the lease of the pull this ingest serves (see leases.py), if any
        self.lease: leases.Lease | None = None
        #: validators of the content (a segmented ingest keeps them in its state)
        self.meta: dict[str, Any] = {}
        #: makes a reader fed every byte in order as it is hashed (a new one whenever
        #: hashing starts over): what ``Store.ingest(also=)`` gave, e.g. a torrent builder
        self.also: Callable[[], Feeder] | None = None

    @property
    def exists(self) -> bool:
        """The blob is already committed (by us or by anyone)."""
        return (self.expected is not None or self._done) and self.store.has(self.digest)

    def _new_hasher(self) -> Any:
        hasher = hashlib.new(self.algorithm)
        return hasher if self.also is None else _Tee(hasher, self.also())

    def open(self) -> None:
        """Open the data file and rebuild the hash state of what is already in it."""
        self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        length = os.fstat(self._fd).st_size
        length = min(length, _prefix_of_segmented(self.path / "state.json", length))
        if self.size is not None and length > self.size:
            length = 0  # cannot be a prefix of this blob: start over
        self._hasher = self._new_hasher()
        done = 0
        while done < length:
            chunk = os.pread(self._fd, min(_REHASH_CHUNK, length - done), done)
            if not chunk:
                break
            self._hasher.update(chunk)
            done += len(chunk)
        os.ftruncate(self._fd, done)
        self.offset = self.resumed_from = self._written = done

    async def write(self, pieces: Sequence[bytes]) -> None:
        """Append ``pieces`` (in order). Raises :class:`SizeMismatch` before writing past
        ``size``. Taking a list lets the network side hand over what it read without
        joining it on the event loop: the worker hashes each piece and writes them all
        with one ``pwritev``.
        """
        n = self._check_room(self.offset, pieces)
        if n < 0:
            sent = self.offset - n  # before discard() sets the offset back to 0
            await self.discard()
            raise SizeMismatch(self._what, self.size or 0, sent)
        # Chunks must be hashed and written in order: wait for the previous one, then
        # hand this one over and return while it is processed.
        await self.flush()
        self._pending = run_in("store", self._append, pieces, self.offset)
        self.offset += n

    async def write_at(self, offset: int, pieces: Sequence[bytes]) -> None:
        """:meth:`write`, for a caller that names the offset: only ``self.offset`` is
        allowed (anything else raises :class:`StoreError`; nothing is written)."""
        if offset != self.offset:
            raise StoreError(
                f"{self._what}: a sequential ingest is written in order: asked to write at "
                f"{offset}, but {self.offset} bytes are there (use a segmented ingest)"
            )
        await self.write(pieces)

    def record(
        self, offset: int, n: int, pieces: Sequence[bytes | memoryview] | None = None
    ) -> None:
        """Refused (:class:`StoreError`): a sequential ingest hashes what it writes, so
        bytes another writer placed in the file cannot be counted."""
        raise StoreError(
            f"{self._what}: a sequential ingest cannot count bytes written by another "
            f"writer ({n} at {offset}); use a segmented ingest"
        )

    def hashes_at(self, offset: int) -> bool:
        """False: no other writer's bytes are taken (see :meth:`record`)."""
        return False

    def gaps(self) -> list[tuple[int, int]]:
        """What is still missing: ``[offset, size)`` (to :data:`UNKNOWN_END` if the size
        is unknown), or nothing."""
        end = self.size if self.size is not None else UNKNOWN_END
        return [(self.offset, end)] if self.offset < end else []

    @property
    def _what(self) -> str:
        return f"blob {self.expected.short}" if self.expected else "download"

    def _check_room(self, offset: int, pieces: Sequence[bytes]) -> int:
        """Bytes in ``pieces``, or minus that if they would run past ``size``."""
        if self._done:
            raise StoreError(f"{self._what}: the ingest is already finished")
        n = sum(len(p) for p in pieces)
        if self.size is not None and offset + n > self.size:
            return -n  # an endless or lying response: what came is not this blob
        return n

    async def flush(self) -> None:
        """Wait until every chunk handed to :meth:`write` is hashed and written."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with writing(self._what, self.store.root):
                # to its end even if cancelled: close() must not close the fd under it
                await finish(pending)
        self._written = self.offset

    @property
    def contiguous(self) -> int:
        """Bytes from the start that are in the data file now (readable by others)."""
        return self._written

    def _append(self, pieces: Sequence[bytes], at: int) -> None:
        # Explicit offsets (pwritev): the fd's own position is not part of the state.
        for p in pieces:
            self._hasher.update(p)
        with self.write_lock:
            pwrite_all(self._fd, pieces, at)
        start_writeback(self._fd, at, sum(len(p) for p in pieces))

    async def restart(self) -> None:
        """Throw away the partial data (the source cannot resume it)."""
        await self.flush()
        await asyncio.to_thread(self._reset)

    async def commit(self) -> None:
        """Verify size and digest, then make the blob visible with one atomic rename.

        On a mismatch the partial data is deleted and the error raised; on success (or
        if the blob already exists) the ingest is removed.
        """
        await self.flush()
        with writing(self._what, self.store.root):
            await finish(asyncio.ensure_future(asyncio.to_thread(self._commit)))

    def _commit(self) -> None:
        what = f"blob {self.expected.short}" if self.expected else "download"
        if self.size is not None and self.offset != self.size:
            got = self.offset
            self._discard()
            raise SizeMismatch(what, self.size, got)
        actual = Digest(self.algorithm, self._hasher.hexdigest())
        if self.expected is not None and actual != self.expected:
            if self.resumed_from:
                # The bad bytes may be an earlier run's: drop those, once.
                self._drop_resumed()
                raise ResumedDataBad(what, str(self.expected), str(actual))
            self._discard()
            raise DigestMismatch(what, str(self.expected), str(actual))
        self.digest = actual
        self.verified = True
        if self.on_verified is not None:
            self.on_verified()
        target = self.store.blob_path(actual)
        if not target.exists():
            os.fsync(self._fd)
            if self.lease is not None:
                self.lease.add([actual])  # before it is visible: gc must see it leased
            os.chmod(self.data_path, 0o444)  # blobs are immutable
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self.data_path, target)
            if self.lease is not None:
                self.lease.mark_committed(actual)
            _fsync_dir(target.parent)
        self._done = True

    def _reset(self) -> None:
        os.ftruncate(self._fd, 0)
        self._hasher = self._new_hasher()
        self.offset = self.resumed_from = self._written = 0
        self.generation += 1

    def _drop_resumed(self) -> None:
        """Forget what an earlier writer left (here: everything, it is a prefix)."""
        self._reset()

    async def discard(self) -> None:
        """Drop the partial data (it cannot be the blob); the ingest starts empty again."""
        await self.restart()

    def _discard(self) -> None:
        """Drop every byte; the ingest stays open, empty, for another source to fill
        (the engine fetches a blob again, in the same ingest, when a mirror lied)."""
        self._reset()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        empty = not self.data_path.exists() or self.data_path.stat().st_size == 0
        if self._done or empty or self.exists:
            # We hold the lock (Store.ingest): the protocol of locks.py, never rmtree,
            # which would delete the lock file of a waiter that just re-created it.
            await asyncio.to_thread(remove_locked_dir, self.path, self.path / "lock")


class Feeder(Protocol):
    """Takes a blob's bytes in order (see ``Store.ingest(also=)``); must not keep the
    buffer it is given (it may be a window mapped from the page cache)."""

    def feed(self, chunk: bytes | memoryview) -> None: ...


class _Tee:
    """A hash object that also feeds a :class:`Feeder` (on the hashing thread)."""

    def __init__(self, hasher: Any, feeder: Feeder) -> None:
        self.hasher = hasher
        self.feeder = feeder

    def update(self, data: bytes | memoryview) -> None:
        self.hasher.update(data)
        self.feeder.feed(data)

    def hexdigest(self) -> str:
        return str(self.hasher.hexdigest())


def _prefix_of_segmented(state_path: Path, length: int) -> int:
    """A segmented writer left this data (its state.json is there): the bytes a
    sequential writer may resume are its range from 0 only, not the holes after it.
    The state is removed (this writer's data is a prefix from now on)."""
    try:
        ranges = json.loads(state_path.read_bytes()).get("ranges", [])
        first = [int(b) for a, b in ranges if int(a) == 0]
    except FileNotFoundError:
        return length
    except (OSError, ValueError, TypeError, AttributeError):
        first = []
    with contextlib.suppress(OSError):
        state_path.unlink()
    return min(first[0], length) if first else 0


def _load_sync_file_range() -> Callable[[int, int, int], None]:
    """Linux's sync_file_range(2), to start writeback of what was written (no waiting)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return lambda fd, offset, n: None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, n: int) -> None:
        fn(fd, offset, n, _SYNC_FILE_RANGE_WRITE)  # best effort: an error changes nothing

    return start


_SYNC_FILE_RANGE_WRITE = 2
#: Start writing ``n`` bytes at ``offset`` of ``fd`` to disk now, without waiting, so the
#: fsync before commit finds less left to do (the disk works during the download).
start_writeback = _load_sync_file_range()


#: The most bytes one write call carries. The kernel sizes new page-cache folios by the
#: write, and on a VM with free page reporting (virtio-balloon, reporting order 5 here:
#: free blocks of 128 KiB and more go back to the host after 2 s) a large folio comes
#: from memory the host has taken back, so every page of it faults on the host too.
#: Measured here (1 GiB from one thread, 2-8 s after the previous GiB was freed): 256 KiB
#: writes took 1.4-2.9 s of system time, 16 KiB writes 0.8-1.9 s. fetchd's HTTPS range
#: download of 1 GiB took 3.5 s (median of 6) in 256 KiB writes and 2.7 s in 64 KiB ones,
#: alternating on one machine (aria2c and curl write 16 KiB).
WRITE_CHUNK = 64 << 10


def pwrite_all(fd: int, pieces: Sequence[bytes | memoryview | bytearray], at: int) -> None:
    """Write ``pieces`` at offset ``at``: ``pwritev`` calls of at most WRITE_CHUNK bytes."""
    batch: list[memoryview] = []
    size = 0
    for piece in pieces:
        view = memoryview(piece)
        while view:
            take = view[: WRITE_CHUNK - size]
            batch.append(take)
            size += len(take)
            view = view[len(take) :]
            if size == WRITE_CHUNK:
                at = _pwritev_full(fd, batch, at)
                batch, size = [], 0
    if batch:
        _pwritev_full(fd, batch, at)


#: Alignment of a write that goes around the page cache (O_DIRECT): of its file offset,
#: its length and its buffer's address. 4096 serves disks of 512-byte and of 4 KiB
#: sectors; a file system that wants more, or takes no O_DIRECT at all, answers EINVAL,
#: and the writer goes on through the page cache.
DIRECT_ALIGN = 4096


def pwrite_direct(fd: int, view: memoryview, at: int) -> int:
    """Write the whole :data:`DIRECT_ALIGN` blocks at the head of ``view`` at ``at``
    through ``fd`` (open with O_DIRECT; ``at`` and ``view``'s address aligned);
    returns how many bytes that was (0: ``view`` is shorter than a block). The rest, a
    part of a block, is the caller's to write through the page cache. Raises OSError
    (EINVAL: the file system wants another alignment) only if nothing was written."""
    whole = len(view) - len(view) % DIRECT_ALIGN
    done = 0
    while done < whole:
        try:
            done += os.pwrite(fd, view[done:whole], at + done)
        except OSError:
            if done:
                return done  # the caller writes the rest; its next call fails at once
            raise
    return done


def _pwritev_full(fd: int, views: list[memoryview], at: int) -> int:
    """One batch, retried until the kernel took all of it; returns the offset after it."""
    while views:
        n = os.pwritev(fd, views, at)
        at += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return at


class SegmentedIngest(Ingest):
    """An ingest written at any offset, by several connections at once.

    Which byte ranges are on disk is kept in ``state.json`` beside the data (written
    atomically by :meth:`save_state`, which the downloader calls every few seconds and
    on exit), so a kill -9 loses at most what was in flight. ``meta`` holds what the
    downloader needs to decide whether a resume is valid (size, ETag, Last-Modified).

    Hashing needs the bytes in order. A write that lands where hashing has reached is
    hashed there and then, from the writer's own buffer (:meth:`record` with
    ``pieces``), on the writer's thread; what lands ahead of that waits, and a follower
    in a thread of its own hashes it once the contiguous prefix reaches it (re-reading
    it from the page cache). So verification ends moments after the last byte arrives
    when segments are fetched roughly in order. Calls to :meth:`write_at` may overlap
    (for different ranges).

    It remembers which ranges it resumed (found on disk at :meth:`open`) apart from
    those written since: on a digest mismatch, commit drops only the resumed ones (see
    :class:`ResumedDataBad`), and the gaps they leave are fetched again.
    """

    def __init__(self, store: Store, digest: Digest | None, size: int | None, path: Path) -> None:
        super().__init__(store, digest, size, path)
        self.state_path = path / "state.json"
        self.ranges: list[tuple[int, int]] = []  # merged, sorted [start, end)
        #: what this writer placed since open (merged): kept when resumed data is bad
        self._fresh: list[tuple[int, int]] = []
        self.hashed = 0
        #: where writeback was last started (see _writeback_to)
        self._written_back = 0
        self._lock = threading.Lock()
        self._follower = ThreadPoolExecutor(1, thread_name_prefix="fetchd-hash")
        #: held by the follower while it maps and hashes a window, and by _reset around
        #: its truncation: a mapped page past the end of the file would be a SIGBUS
        self._mapping = threading.Lock()
        self._last_follow: Future[None] | None = None
        self._following = False

    def open(self) -> None:
        self._fd = os.open(self.data_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        length = os.fstat(self._fd).st_size
        self._hasher = self._new_hasher()
        try:
            state = json.loads(self.state_path.read_bytes())
            self.meta = dict(state.get("meta", {}))
            ranges = [(int(a), int(b)) for a, b in state.get("ranges", [])]
        except (OSError, ValueError, TypeError):
            # No state: a sequential ingest (or none) was here; its data is a prefix.
            # (A segmented ingest writes its state before any data: see below.)
            ranges = [(0, length)] if length else []
        self.ranges = _merge([(a, min(b, length)) for a, b in ranges if a < min(b, length)])
        if self.size is not None and self.ranges and self.ranges[-1][1] > self.size:
            self.ranges = []
        self.offset = self.resumed_from = sum(b - a for a, b in self.ranges)
        self._fresh = []
        self.save_state()  # from here on, data without a range in the state is not data

    def missing(self, size: int) -> list[tuple[int, int]]:
        """The gaps in [0, size) not yet on disk."""
        gaps, at = [], 0
        for a, b in self.ranges:
            if a > at:
                gaps.append((at, min(a, size)))
            at = max(at, b)
        if at < size:
            gaps.append((at, size))
        return [(a, b) for a, b in gaps if a < b]

    def gaps(self) -> list[tuple[int, int]]:
        """The ranges not yet on disk, of ``size`` (unknown: up to :data:`UNKNOWN_END`)."""
        with self._lock:
            return self.missing(self.size if self.size is not None else UNKNOWN_END)

    async def write(self, pieces: Sequence[bytes]) -> None:
        await self.write_at(self.ranges[-1][1] if self.ranges else 0, pieces)

    @property
    def contiguous(self) -> int:
        with self._lock:
            return self.ranges[0][1] if self.ranges and self.ranges[0][0] == 0 else 0

    async def write_at(self, offset: int, pieces: Sequence[bytes]) -> None:
        """Write ``pieces`` at ``offset`` on the ``store`` pool; the hash follower takes
        them when in order. Past ``size``: everything is dropped and
        :class:`SizeMismatch` raised. A cancelled call returns once the write is done
        (the fd must outlive it)."""
        n = self._check_room(offset, pieces)
        if n < 0:
            await self.discard()
            raise SizeMismatch(self._what, self.size or 0, offset - n)
        with writing(self._what, self.store.root):
            await finish(run_in("store", self.write_at_sync, offset, pieces))

    async def copy_at(self, src: int, offset: int, n: int) -> None:
        """Copy ``n`` bytes at ``offset`` of the file open as ``src`` to the same offset of
        the data file, in the kernel (copy_file_range: no pass through user space), on
        the ``store`` pool; then as :meth:`write_at` (SizeMismatch past ``size``)."""
        if self._done:
            raise StoreError(f"{self._what}: the ingest is already finished")
        if self.size is not None and offset + n > self.size:
            await self.discard()
            raise SizeMismatch(self._what, self.size, offset + n)
        with writing(self._what, self.store.root):
            await finish(run_in("store", self._copy_sync, src, offset, n))

    async def copy_gaps(self, src: int, spans: Sequence[tuple[int, int]]) -> int:
        """Copy what is still missing of each ``[start, end)`` in ``spans`` from the file
        open as ``src`` (same offsets) into the data file, in the kernel, as one job on the
        ``store`` pool (a swarm's pieces, batched: a job per piece cost a thread handoff
        each); the gaps are looked at just before each copy. Returns the bytes copied.
        SizeMismatch past ``size``, as :meth:`copy_at`."""
        if self._done:
            raise StoreError(f"{self._what}: the ingest is already finished")
        end = max((b for _, b in spans), default=0)
        if self.size is not None and end > self.size:
            await self.discard()
            raise SizeMismatch(self._what, self.size, end)
        with writing(self._what, self.store.root):
            return await finish(run_in("store", self._copy_gaps_sync, src, spans))

    def _copy_gaps_sync(self, src: int, spans: Sequence[tuple[int, int]]) -> int:
        copied = 0
        for start, end in spans:
            for a, b in self.gaps():
                lo, hi = max(a, start), min(b, end)
                if lo < hi:
                    self._copy_sync(src, lo, hi - lo)
                    copied += hi - lo
        return copied

    def _copy_sync(self, src: int, offset: int, n: int) -> None:
        done = 0
        while done < n:
            with self.write_lock:
                got = os.copy_file_range(src, self._fd, n - done, offset + done, offset + done)
            if got == 0:
                raise StoreError(f"{self._what}: the source file ends at {offset + done}")
            done += got
        self.record(offset, n)

    def write_at_sync(self, offset: int, pieces: Sequence[bytes | memoryview]) -> None:
        """:meth:`write_at` for a worker thread (callers check the room themselves)."""
        with self.write_lock:
            pwrite_all(self._fd, pieces, offset)
        self.record(offset, sum(len(p) for p in pieces), pieces)

    def record(
        self, offset: int, n: int, pieces: Sequence[bytes | memoryview] | None = None
    ) -> None:
        """``n`` bytes at ``offset`` are in the data file (written by a thread with an fd
        of its own): count them. ``pieces``: those bytes, still in the caller's hands.
        If hashing has reached ``offset`` and no follower runs, they are hashed now, on
        the caller's thread (the GIL is released while it hashes); otherwise the
        follower takes them from the file once they are in order.

        Hashing what was just written where it is saved re-reading it from the page
        cache, and a thread handoff for each write: a range download of 1 GiB made
        14-24 k voluntary context switches with the follower doing all the hashing."""
        if n <= 0:
            return
        with self._lock:
            # in place, O(log n) to find the neighbours: a swarm's pieces arrive in any
            # order, and re-sorting hundreds of ranges for each of them showed in profiles
            self.offset += _add_range(self.ranges, offset, offset + n)
            _add_range(self._fresh, offset, offset + n)
            here = (
                pieces is not None
                and not self._following
                and offset == self.hashed
                and sum(len(p) for p in pieces) == n
            )
            if not here:
                self._follow()
                return
            self._following = True  # the follower's turn is ours while we hash
            generation = self.generation
        assert pieces is not None
        try:
            with self._mapping:
                if generation == self.generation:  # not reset meanwhile
                    for piece in pieces:
                        self._hasher.update(piece)
                    self.hashed = offset + n
                    self._writeback_to(self.hashed)
        finally:
            with self._lock:
                self._following = False
                self._follow()  # what others placed in order after ours, if anything

    def hashes_at(self, offset: int) -> bool:
        """Whether bytes placed at ``offset`` now would be hashed by :meth:`record` from
        the writer's own buffer (hashing stands at ``offset`` and no follower runs): then
        nobody reads them back from the file soon, and the writer may write them around
        the page cache. A hint, read without the lock: a wrong answer costs time (the
        follower reads the bytes from the disk, or they take the page cache for
        nothing), never bytes."""
        return offset == self.hashed and not self._following

    def _follow(self) -> None:
        """Start the hash follower if the in-order prefix is ahead of the hash and it does
        not run (one job at a time: it runs to the frontier). Called with ``_lock`` held."""
        frontier = self.ranges[0][1] if self.ranges and self.ranges[0][0] == 0 else 0
        if not self._following and frontier > self.hashed:
            self._following = True
            self._last_follow = self._follower.submit(self._hash_prefix)

    def _writeback_to(self, upto: int) -> None:
        """Hashing reached ``upto``: start writeback of what it passed, in steps of
        :data:`_REHASH_CHUNK` (and the last step), not a syscall for every write."""
        if upto - self._written_back >= _REHASH_CHUNK or upto == self.size:
            start_writeback(self._fd, self._written_back, upto - self._written_back)
            self._written_back = upto

    def room(self, offset: int, n: int) -> bool:
        """Whether ``n`` bytes at ``offset`` stay within the expected size."""
        return not self._done and (self.size is None or offset + n <= self.size)

    def _hash_prefix(self) -> None:
        """The follower's job: hash the prefix in order up to the frontier, in windows of
        :data:`_REHASH_CHUNK` mapped from the page cache (hashed where they are: a read
        into a buffer copied every byte once more, 0.1-0.15 s of system time per GiB)."""
        try:
            while True:
                with self._lock:
                    frontier = self.ranges[0][1] if self.ranges and self.ranges[0][0] == 0 else 0
                    if frontier <= self.hashed:
                        self._following = False  # the next record() starts a new job
                        return
                    generation = self.generation
                at = self.hashed
                n = min(_REHASH_CHUNK, frontier - at)
                with self._mapping:
                    if generation != self.generation:
                        continue  # reset meanwhile: look at the ranges again
                    self._hash_window(at, n)
                    self.hashed = at + n
                    self._writeback_to(self.hashed)
        except BaseException:
            with self._lock:
                self._following = False
            raise

    def _hash_window(self, at: int, n: int) -> None:
        """Hash ``n`` bytes at ``at`` of the data file (called with ``_mapping`` held:
        nothing truncates the file meanwhile). StoreError if the file is shorter."""
        if os.fstat(self._fd).st_size < at + n:
            raise StoreError(f"{self._what}: the data file ends before its ranges")
        skip = at % mmap.ALLOCATIONGRANULARITY
        flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
        window = mmap.mmap(self._fd, skip + n, flags, mmap.PROT_READ, offset=at - skip)
        try:
            with memoryview(window) as view, view[skip:] as data:
                self._hasher.update(data)
        finally:
            window.close()

    async def flush(self) -> None:
        with self._lock:
            last, self._last_follow = self._last_follow, None
        if last is not None:
            await asyncio.wrap_future(last)

    async def commit(self) -> None:
        started = time.monotonic()
        behind = self.offset - self.hashed
        with self._lock:
            self._last_follow = self._follower.submit(self._hash_prefix)
        await self.flush()
        log.debug(
            "%s: hash follower was %d bytes behind the last write; caught up in %.3f s",
            self._what,
            behind,
            time.monotonic() - started,
        )
        if self.hashed != self.offset:
            raise StoreError(f"{self._what}: {self.offset - self.hashed} bytes are not in order")
        with writing(self._what, self.store.root):
            await finish(asyncio.ensure_future(asyncio.to_thread(self._commit)))

    def _reset(self) -> None:
        with self._mapping, self._lock:
            self.generation += 1
            os.ftruncate(self._fd, 0)
            self._hasher = self._new_hasher()
            self.offset = self.resumed_from = self.hashed = self._written_back = 0
            self.ranges = []
            self._fresh = []
            self.meta = {}
        with contextlib.suppress(FileNotFoundError):
            self.state_path.unlink()

    def _drop_resumed(self) -> None:
        """Keep only the ranges written since open (the resumed ones are the suspects:
        an earlier run's, or tampered with) and hash again from the start: the
        follower re-reads what is kept. Readers of the old data see a new generation.
        (Called by commit's thread, once the follower has caught up.)"""
        if not self._fresh:
            self._reset()  # nothing of ours to keep
            return
        with self._lock:
            self.generation += 1
            self.ranges = list(self._fresh)
            self.offset = sum(b - a for a, b in self.ranges)
            self.resumed_from = self.hashed = self._written_back = 0
            self._hasher = self._new_hasher()
        log.warning(
            "%s: resumed data did not verify; kept the %d bytes written since, dropped the rest",
            self._what,
            self.offset,
        )
        self.save_state()
        with self._lock:
            self._follow()

    def save_state(self) -> None:
        """Record which ranges are on disk (data first: pwrite completed before this)."""
        if self._done or self._fd < 0:
            return
        with self._lock:
            state = {"meta": self.meta, "ranges": [list(r) for r in self.ranges]}
        with writing(f"the state of {self._what}", self.store.root):
            atomic_write(self.state_path, json.dumps(state).encode(), sync=False)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.flush()
        if not self._done and self._fd >= 0:
            with contextlib.suppress(OSError, StoreError):
                self.save_state()
        self._follower.shutdown(wait=True)
        await super().close()


if TYPE_CHECKING:
    # mypy --strict proves both kinds of ingest are the Sink fetchers write into.
    _SINKS: tuple[type[Sink], ...] = (Ingest, SegmentedIngest)


def _add_range(ranges: list[tuple[int, int]], a: int, b: int) -> int:
    """Add ``[a, b)`` to ``ranges`` (sorted, disjoint, not touching: what :func:`_merge`
    returns), in place, merging it with those it overlaps or touches; returns how many
    bytes it added that were not covered yet."""
    i = bisect.bisect_left(ranges, a, key=lambda r: r[1])  # first that ends at a or later
    j = bisect.bisect_right(ranges, b, key=lambda r: r[0])  # first that starts after b
    if i < j:
        covered = sum(y - x for x, y in ranges[i:j])
        lo, hi = min(a, ranges[i][0]), max(b, ranges[j - 1][1])
    else:
        covered, lo, hi = 0, a, b
    ranges[i:j] = [(lo, hi)]
    return (hi - lo) - covered


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, exclusive: bool = False, sync: bool = True) -> None:
    """Write ``data`` to ``path`` via a temporary file and one rename (or link).

    On any failure (a full disk) the temporary file is removed and ``path`` unchanged."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique per thread too: a transfer thread and the event loop's may save one state
    tmp = path.with_name(
        f".{path.name}.{os.getpid()}.{threading.get_ident()}.{time.monotonic_ns()}.tmp"
    )
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # fails with FileExistsError instead of replacing
        else:
            os.rename(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    if sync:
        _fsync_dir(path.parent)
