"""The seam between the engine and its sources (after containerd's Resolver/Fetcher
split, with go-containerregistry's optional capabilities as separate small protocols).

* A :class:`Resolver` is an **authority**: it turns a reference into the verified top
  descriptor and the manifest's bytes. Today the origin registry over TLS (or a mirror
  the user told to resolve tags, ``--pull-from-mirror all``); next, appc discovery with
  a signature made by a trusted key.
* A :class:`Fetcher` puts one blob's bytes, known by digest, into a :class:`Sink`. Any
  fetcher may be asked for any digest, because nothing it writes is trusted: the
  engine's ``commit(expected digest, size)`` verifies every byte. A fetcher **never
  verifies and never commits**; it only places bytes.
* :class:`RangeFetcher` is the optional capability of fetching byte ranges (several
  connections at once; the scheduler in :mod:`fetchd.sources.segments` drives it).

The engine owns everything around them: single flight per digest, the ingest, the
commit, the one retry of bad resumed data, and the order in which fetchers are asked
(mirrors first, then the origin; a fetcher that sent bytes failing verification is
dropped for the rest of the pull).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fetchd.model import Descriptor, Reference


class Sink(Protocol):
    """Where a fetcher puts a blob's bytes: the narrow face of an ingest.

    ``size`` is the expected size (None for a URL whose size the first answer tells);
    ``data_path`` is the file the bytes end up in (a writer on a thread of its own opens
    it and writes at offsets; see :meth:`record`). Calls to :meth:`write_at` may overlap
    for different ranges on a segmented ingest; a sequential one takes only ``offset ==
    sink.offset``. Nothing written is visible to anyone until the engine commits it.
    """

    size: int | None
    offset: int
    data_path: Path
    #: validators of the content being written (ETag, Last-Modified, max-age, size)
    meta: dict[str, Any]

    @property
    def write_lock(self) -> AbstractContextManager[Any]:
        """Held around each write into ``data_path`` by a writer with an fd of its own (the
        sink's own writes hold it too): concurrent buffered writes to one file otherwise
        spin on the kernel's inode lock."""
        ...

    def gaps(self) -> list[tuple[int, int]]:
        """The ``[start, end)`` ranges still missing (of ``size``; unknown size: from the
        end of what is there to 2^62)."""
        ...

    async def write_at(self, offset: int, pieces: Sequence[bytes]) -> None:
        """Write ``pieces`` at ``offset``. Raises :class:`~fetchd.errors.SizeMismatch`
        (and drops everything) rather than write past ``size``."""
        ...

    def record(
        self, offset: int, n: int, pieces: Sequence[bytes | memoryview] | None = None
    ) -> None:
        """``n`` bytes at ``offset`` were placed in ``data_path`` by another writer (a
        thread with an fd of its own, or a BitTorrent session): count them as written.
        ``pieces``: those bytes, if the writer still holds them (valid only during the
        call): the sink may hash them from there instead of reading the file again."""
        ...

    def hashes_at(self, offset: int) -> bool:
        """Whether bytes placed at ``offset`` now (then :meth:`record` with ``pieces``)
        would be hashed from the writer's buffer, so nobody reads them back from the file
        soon: a hint that the writer may write them around the page cache."""
        ...

    async def restart(self) -> None:
        """Throw away what is there: the source cannot resume it (the content changed)."""
        ...


OnBytes = Callable[[int], None]


@runtime_checkable
class Fetcher(Protocol):
    """Delivers a blob's bytes by digest into a sink; never verifies, never commits.

    ``label`` names the fetcher in logs and errors (no credentials, no query string).
    :meth:`fetch` fills the sink's gaps. It raises:

    * :class:`~fetchd.errors.BlobNotFound` when this source does not have the blob (the
      engine skips it for this blob only);
    * another :class:`~fetchd.errors.SourceError` when it cannot deliver (down, stalled,
      refused): the bytes it placed stay in the sink and count for the next fetcher;
    * :class:`~fetchd.errors.SizeMismatch` when the source's answer cannot be the blob.

    With ``last`` False another fetcher follows, so a stall or a refusal fails at once
    instead of after ``Config.attempts`` retries. Calls may overlap (different blobs).
    """

    label: str

    async def fetch(
        self, desc: Descriptor, sink: Sink, on_bytes: OnBytes, *, last: bool = True
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class Location:
    """Where a blob's bytes can be had by plain range GETs, as found by
    :meth:`RangeFetcher.locate` (authentication and redirects already done)."""

    url: str
    #: sent with every request (a registry's bearer token); never to another origin
    headers: Mapping[str, str]


@runtime_checkable
class RangeFetcher(Fetcher, Protocol):
    """The optional capability of serving byte ranges of a blob: the segment scheduler
    then fetches it over several connections, from several such fetchers at once."""

    async def locate(self, desc: Descriptor) -> Location:
        """Where the blob's ranges come from; raises as :meth:`Fetcher.fetch` does.
        Called again when the transport meets a redirect or an expired token."""
        ...


@dataclass(frozen=True, slots=True)
class Resolved:
    """What an authority says a reference is: the top descriptor (digest, media type,
    size) and the manifest's bytes, already checked against that digest."""

    descriptor: Descriptor
    raw: bytes
    #: the authority, for messages ("registry 127.0.0.1:5000")
    authority: str


class Resolver(Protocol):
    """An authority: a name becomes a digest only through one of these.

    :meth:`resolve` returns the top manifest (an index or an image manifest) verified
    against the digest asked for (a by-digest reference) or reported by the authority
    over a channel it trusts; :meth:`child` returns a manifest an index lists, by digest,
    verified against it. Both raise :class:`~fetchd.errors.ManifestNotFound` or another
    :class:`~fetchd.errors.SourceError`. Calls may overlap.
    """

    async def resolve(self, ref: Reference) -> Resolved: ...

    async def child(self, ref: Reference, desc: Descriptor) -> bytes: ...
