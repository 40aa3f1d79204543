"""Leases: the work in progress that gc must not touch (after containerd's leases).

A pull commits its blobs one by one and names the image only at the end; until then
no name protects them. So a pull first takes a **lease**: a file ``leases/<id>`` listing,
one per line, every digest the pull will reference (manifests, config, layers) and any
blob it commits under a digest it learns only at commit (a URL). The pulling process
holds an ``flock`` on the file for as long as the lease lives:

* Whatever deletes unreferenced blobs (``fetchd gc``, a failed pull's cleanup, the
  server's eviction) reads the leases holding the **gc lock** exclusively and keeps
  every digest of a live lease. A lease adds digests holding the gc lock shared, and
  the puller checks what is present only after adding: a digest is either seen by the
  deleter, or added after it finished (and then the puller finds the blob absent and
  fetches it).
* A lease is released (its file unlinked, by its holder) once the name is published,
  since index.json protects the blobs from then on, or when the pull failed.
* A process that died (even by kill -9) holds no lock: its lease is **dead**, protects
  nothing, and the next deleter removes the file. A lease appears under its final name
  already locked (it is written as a dot file, locked, then renamed), so a lease being
  created is never taken for a dead one.

Who may do what: anyone who can write the store can take a lease, and so keep blobs
from gc for as long as their process lives; that is the same trust as writing the store.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import secrets
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from fetchd.errors import FetchdError, StoreError
from fetchd.model import Digest
from fetchd.store.diskfull import writing
from fetchd.store.locks import locked

if TYPE_CHECKING:
    from fetchd.store.cas import Store

#: The lease of the pull running in this context (tasks and threads it starts inherit
#: it, as containerd passes a lease in a Go context): the store records what it commits.
current: contextvars.ContextVar[Lease | None] = contextvars.ContextVar("fetchd_lease", default=None)

#: A half-created lease file (a crash between create and rename) older than this is
#: debris; younger, it may be a lease being created right now.
_STALE_TEMP_SECONDS = 3600.0
_MAX_LEASE_BYTES = 64 << 20


class Lease:
    """A live lease, held by this process until :meth:`release`. Thread-safe."""

    def __init__(self, store: Store, lease_id: str, fd: int) -> None:
        self.store = store
        self.id = lease_id
        self.path = store.leases / lease_id
        self._fd = fd
        self._mutex = threading.Lock()
        #: every digest written to the lease file
        self.digests: set[Digest] = set()
        #: blobs that this lease's holder made visible itself (not found already there):
        #: what a failed pull removes again, if no name and no other lease uses them
        self.committed: set[Digest] = set()

    @classmethod
    def take(cls, store: Store, digests: Iterable[Digest] = ()) -> Lease:
        """A new live lease protecting ``digests``. Raises DiskFull on a full disk."""
        lease_id = f"{os.getpid()}-{secrets.token_hex(8)}"
        tmp = store.leases / f".{lease_id}.tmp"
        with writing("a lease", store.root):
            store.leases.mkdir(parents=True, exist_ok=True)
            # 0600: another user who could open it could flock it and keep it "live"
            flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
            fd = os.open(tmp, flags, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else can hold it
                os.rename(tmp, store.leases / lease_id)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
        lease = cls(store, lease_id, fd)
        try:
            lease.add(digests)
        except BaseException:
            lease.release()
            raise
        return lease

    def add(self, digests: Iterable[Digest]) -> None:
        """Protect ``digests`` too (before the caller looks for them or commits them)."""
        with self._mutex:
            new = [d for d in dict.fromkeys(digests) if d not in self.digests]
        if not new:
            return
        data = memoryview("".join(f"{d}\n" for d in new).encode())
        gc_lock = locked(self.store.gc_lock, shared=True)
        with gc_lock, writing("a lease", self.store.root), self._mutex:
            if self._fd < 0:
                raise StoreError(f"lease {self.id} was already released")
            while data:
                data = data[os.write(self._fd, data) :]
            self.digests.update(new)

    def mark_committed(self, digest: Digest) -> None:
        with self._mutex:
            self.committed.add(digest)

    def release(self) -> None:
        """Drop the lease (idempotent): its digests are no longer protected by it."""
        with self._mutex:
            if self._fd < 0:
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # the holder unlinks, then unlocks (locks.py)
            os.close(self._fd)
            self._fd = -1


def live_digests(store: Store) -> set[Digest]:
    """Every digest a live lease protects; dead leases are deleted on the way.

    The caller holds ``store.gc_lock`` exclusively (so no lease adds meanwhile)."""
    keep: set[Digest] = set()
    try:
        names = os.listdir(store.leases)
    except FileNotFoundError:
        return keep
    now = time.time()
    for name in names:
        path = store.leases / name
        if name.startswith("."):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > _STALE_TEMP_SECONDS:
                    path.unlink()
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # released just now
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                keep |= _read(fd)  # held: live
                continue
            # Nobody holds it: its process is gone. Still the file at the path (not
            # released and unlinked meanwhile)? Then it is ours to delete.
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
        except FileNotFoundError:
            continue
        finally:
            os.close(fd)
    return keep


def _read(fd: int) -> set[Digest]:
    data = os.pread(fd, _MAX_LEASE_BYTES, 0)
    out: set[Digest] = set()
    for line in data.decode(errors="replace").splitlines():
        try:
            out.add(Digest.parse(line))
        except FetchdError:
            continue  # a line cut by a full disk: that pull fails anyway
    return out
