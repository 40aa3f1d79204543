"""The one HTTP transport for segment bodies: blocking HTTP/1.1 GETs on keep-alive sockets.

Every call here blocks, and runs on the ``transfer`` executor (:func:`fetchd.threads.run_in`):
one thread per transfer, each on a connection of its own (taken from this transport's
idle keep-alive connections, or a new one). The response head is read by a small parser
of our own (the status line, then :func:`http.client.parse_headers`, which is public);
the body then goes from ``recv_into`` straight into a page-aligned buffer and from there
into the sink's data file through file descriptors of the thread's own: around the page
cache where the sink hashes the bytes from the buffer, through it otherwise (``_Writer``).

Why this and not another stack (``benchmarks/transport_choice.py``, 1 GiB over HTTPS from a
local nginx, 8 connections, CPU seconds of this process per GiB, medians of 5 rounds): the
old ``ThreadedRanges`` (which called ``sock._sslobj.read``) 1.40; this parser with the public
``SSLSocket.recv_into`` 1.44; ``http.client`` with the public ``HTTPResponse.readinto``
2.31; aiohttp on the event loop 1.76, all on one core (wall = CPU); h11 over the same
sockets 3.67 (its pure-Python buffer copies every byte twice). TLS decryption in
``recv_into`` releases the GIL, so on threads it runs on every core.

No private attribute of ``ssl``, ``socket`` or ``http.client`` is read or written.

Contract:

* :meth:`Transport.open` sends ``GET`` (with ``Range: bytes=A-B`` for ``[start, end)``, the
  location's headers and ``User-Agent``) and returns a :class:`Response` whose head is read
  and whose body is not. Redirects (at most :data:`MAX_REDIRECTS`) are followed here; the
  location's headers (a registry's ``Authorization``) are dropped when the origin changes,
  and a redirect from https to plain http needs ``--insecure-options http``.
* ``--resolve`` pins (``Config.resolve``) choose the address connected to; TLS still
  verifies, and sends SNI for, the URL's host name. ``tls`` in ``--insecure-options``
  turns verification off. An IPv6 literal is sent as ``Host: [::1]:PORT``.
* A socket waits at most ``Config.stall_timeout`` for a byte: then :class:`Stalled`
  (a ``TimeoutError``). :meth:`Transport.open` as a whole (connects, redirects, up to
  the final response head; a TLS handshake is bounded by the stall timeout only) takes
  at most ``Config.request_budget``, and accepts at most
  :data:`MAX_INTERIM` 1xx answers: a head dripped byte by byte, or 1xx for ever, is a
  stall too. A connect is watched in slices, so :meth:`Transfer.interrupt` ends it.
  Connection failures, short bodies and malformed answers raise
  :class:`ConnectionLost` (a ``ConnectionError``): both are retryable in the sense of
  :func:`fetchd.sources.retry.retryable`. An untrusted certificate raises
  :class:`~fetchd.errors.TransferFailed` (final). A transfer cut by
  :meth:`Transfer.interrupt` (from any thread) raises :class:`Interrupted`.
* A connection goes back to the idle pool only when its body was read whole and
  nothing was read past it (the transfer it carried no longer holds it); a stale pooled
  connection is retried once, on a new connection.
* :meth:`Response.read_into` writes body bytes at ``transfer.cursor`` onwards, up to
  ``transfer.end`` (which another thread may lower meanwhile: work stealing), calling
  ``sink.record(offset, n)`` for each write. It never writes at or past ``end`` as read
  after the bytes arrived, and never writes after :meth:`Transfer.interrupt` returned
  with the transfer's socket shut down... except the one buffer being written at that
  moment: callers wait for the thread (:func:`fetchd.threads.finish`) before they give
  the sink up.

Who verifies: nobody here; the ingest's commit does.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import io
import mmap
import os
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import urljoin, urlsplit

from fetchd.config import Config
from fetchd.errors import InsecureRefused, TransferFailed
from fetchd.sources.base import Location
from fetchd.sources.http import USER_AGENT, redact, ssl_context
from fetchd.sources.retry import REDIRECT_STATUSES
from fetchd.store.cas import DIRECT_ALIGN, pwrite_all, pwrite_direct

#: bytes read from a connection before they are written (around the page cache in one
#: write, or through it in pieces of fetchd.store.cas.WRITE_CHUNK): fewer, larger
#: hand-overs to the sink. 1 MiB: 4 x 256 MiB layers from docker-registry, written
#: around the page cache, took 1.53-1.89 s (5 rounds) against 1.76-1.99 s in 256 KiB
#: writes, and 1.6-1.9 s of CPU against 2.0-2.3 s
BUFFER = 1 << 20
#: redirects followed for one request
MAX_REDIRECTS = 5
#: the longest response head accepted
HEAD_LIMIT = 64 << 10
#: a body up to this size (a redirect's, an error's) is read and dropped to keep the connection
DRAIN_LIMIT = 64 << 10
#: interim (1xx) answers accepted before the final one: RFC 9110 allows several (a 103
#: then a 100), none sends ten; a server that sends them for ever would never time out
#: (each one resets the per-recv stall timeout)
MAX_INTERIM = 10
#: seconds between looks at Transfer.stop while a connect is in progress: short enough
#: that an interrupt (a cancel, a cut) ends a connect to a silent address at once, long
#: enough that the polling costs nothing
CONNECT_SLICE = 0.1
#: blank lines skipped before a status line (RFC 9112 §2.2 asks a client to ignore at
#: least one: a server's stray CRLF after a body); more is not HTTP
MAX_BLANK_LINES = 4
#: a chunk size is hex digits only (RFC 9112 §7.1), at most 16 of them (2^64)
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")


class Stalled(TimeoutError):
    """No byte arrived for ``Config.stall_timeout`` seconds."""


class ConnectionLost(ConnectionError):
    """The connection failed, closed early, or carried something that is not HTTP/1.1."""


class Interrupted(Exception):
    """:meth:`Transfer.interrupt` cut the transfer (the scheduler's decision, no failure)."""


class RecordingSink(Protocol):
    """What :meth:`Response.read_into` needs of a sink (fetchd.sources.base.Sink has it)."""

    @property
    def data_path(self) -> os.PathLike[str] | str: ...

    @property
    def write_lock(self) -> contextlib.AbstractContextManager[Any]: ...

    def hashes_at(self, offset: int) -> bool: ...

    def record(
        self, offset: int, n: int, pieces: Sequence[bytes | memoryview] | None = None
    ) -> None: ...


class _Writer:
    """Writes a transfer's buffers into its sink's data file, through a file descriptor of
    its own: around the page cache (O_DIRECT) where the sink hashes the bytes from the
    buffer (:meth:`RecordingSink.hashes_at`: nobody reads them back soon) and the write
    is whole aligned blocks; through the page cache otherwise (a part of a block, bytes
    the hash follower will re-read, a file system that refuses O_DIRECT).

    Why: on this VM a buffered write of fresh data costs 0.25-2.6 s of system time per
    GiB, depending on whether the host has taken the free pages back
    (``benchmarks/pull_registry.py``: fetchd's pulls of 4 x 256 MiB took 1.4-1.9 s or
    2.6-3.2 s, 28 % of the slow ones' samples in copy_folio_from_iter_atomic); around
    the cache 0.1-0.2 s, every time. Bytes that are hashed from the buffer and then
    only read again at unpack gain nothing from the page cache (BitTorrent clients
    offer the same: libtorrent's disable_os_cache, qBittorrent's "Disable OS cache").

    A block is written around the cache only whole, by one write, while none of its
    bytes is recorded; the hash follower maps only pages with recorded bytes. So no
    mapped page is ever overwritten by a direct write.
    """

    def __init__(self, sink: RecordingSink) -> None:
        self._sink = sink
        self._fd = os.open(sink.data_path, os.O_WRONLY | os.O_CLOEXEC)
        self._direct = -1
        self._direct_ok = True  # until the file system refuses

    def write(self, view: memoryview, at: int) -> None:
        sink = self._sink
        with sink.write_lock:
            done = 0
            if (
                self._direct_ok
                and at % DIRECT_ALIGN == 0
                and len(view) >= DIRECT_ALIGN
                and sink.hashes_at(at)
            ):
                done = self._write_direct(view, at)
            if done < len(view):
                pwrite_all(self._fd, [view[done:]], at + done)

    def _write_direct(self, view: memoryview, at: int) -> int:
        """The whole blocks of ``view`` written around the page cache: how many bytes.
        0, and never again for this writer, where the file system refuses (EINVAL or
        EOPNOTSUPP at the open or at the write: no O_DIRECT, another alignment)."""
        try:
            if self._direct < 0:
                flags = os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT
                self._direct = os.open(self._sink.data_path, flags)
            return pwrite_direct(self._direct, view, at)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            self._direct_ok = False  # the page cache it is, for the rest of the transfer
            return 0

    def close(self) -> None:
        os.close(self._fd)
        if self._direct >= 0:
            os.close(self._direct)


class Transfer:
    """One transfer's progress: bytes ``[start, end)``, written up to ``cursor``.

    The thread running it moves ``cursor`` and counts the body bytes it reads in
    ``received`` (at each read, before they are placed: a slow transfer's rate shows
    before its first buffer is full); the scheduler may lower ``end`` (stealing the
    back part) and may call :meth:`interrupt` from any thread.
    """

    def __init__(self, start: int, end: int, cursor: int | None = None) -> None:
        self.start = start
        self.end = end
        self.cursor = start if cursor is None else cursor
        self.received = 0
        self.stop = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def remaining(self) -> int:
        return self.end - self.cursor

    def interrupt(self) -> None:
        """Cut this transfer: a blocked read on its socket returns at once (the socket is
        shut down), and the thread raises :class:`Interrupted` at its next step."""
        with self._lock:
            self.stop = True
            sock = self._socket
        if sock is not None:
            # The plain socket's shutdown(2), also for a TLS socket: SSLSocket.shutdown
            # would first detach its SSL object, and a read racing it would then take
            # the kernel's queued ciphertext as body bytes. The SSL layer stays; its
            # next read fails (EOF) and the thread sees the stop.
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)

    def attach(self, sock: socket.socket | None) -> None:
        """The socket the transfer runs on now (None: none). Raises :class:`Interrupted`
        if it was cut meanwhile."""
        with self._lock:
            self._socket = sock
            if self.stop:
                raise Interrupted()

    def detach(self, sock: socket.socket) -> None:
        """``sock`` no longer carries this transfer (it goes back to the idle pool, where
        another transfer may take it): a later :meth:`interrupt` must not shut it down."""
        with self._lock:
            if self._socket is sock:
                self._socket = None

    @property
    def attached(self) -> bool:
        """Whether a socket carries the transfer now (it is not waiting to be sent)."""
        return self._socket is not None


@dataclass(frozen=True)
class Head:
    """A response's status line and headers (names looked up case-blind)."""

    status: int
    reason: str
    headers: http.client.HTTPMessage
    #: the URL this answer came from (after redirects)
    url: str
    #: body bytes announced by Content-Length; None for chunked or close-delimited bodies
    length: int | None

    def get(self, name: str) -> str | None:
        value = self.headers.get(name)
        return None if value is None else str(value)


Origin = tuple[str, str, int]  # scheme, host (lower case), port


def _origin(url: str) -> Origin:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TransferFailed(f"{redact(url)}: not an http(s) URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise TransferFailed(f"{redact(url)}: bad port ({exc})") from exc
    return parts.scheme, parts.hostname.lower(), port


class _Connection:
    """One socket (TLS or not) and what was read from it past the last response's head."""

    def __init__(self, sock: socket.socket, origin: Origin) -> None:
        self.sock = sock
        self.origin = origin
        self.pending = bytearray()  # read from the socket, not yet consumed
        self.used = False  # carried a response before (a stale keep-alive may close)
        #: ``read(n, buffer)``: up to n bytes into buffer, straight from the socket (what
        #: is pending is not looked at); 0 at the end of the stream
        self.read: Callable[[int, memoryview], int]
        if isinstance(sock, ssl.SSLSocket):
            # SSLSocket.read(len, buffer) returns the count (typeshed says bytes); it is
            # what SSLSocket.recv_into calls, one Python call less for each TLS record.
            self.read = cast("Callable[[int, memoryview], int]", sock.read)
        else:
            self.read = lambda n, buffer: sock.recv_into(buffer, n)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def recv_into(self, view: memoryview) -> int:
        """Bytes into ``view``: what is pending first, then from the socket."""
        if self.pending:
            n = min(len(view), len(self.pending))
            view[:n] = self.pending[:n]
            del self.pending[:n]
            return n
        try:
            return self.sock.recv_into(view)
        except TimeoutError as exc:
            raise Stalled("no data within the stall timeout") from exc
        except (OSError, ValueError) as exc:  # ValueError: a socket shut down under SSL
            raise ConnectionLost(f"{type(exc).__name__}: {exc}") from exc

    def fill(self, deadline: float | None = None) -> int:
        """Read more into ``pending``; 0 at the end of the stream. With ``deadline`` (a
        monotonic time) the wait ends there too: :class:`Stalled`."""
        chunk = bytearray(16 << 10)
        stall = self.sock.gettimeout()
        try:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("past the deadline")
                self.sock.settimeout(left if stall is None else min(stall, left))
            try:
                n = self.sock.recv_into(chunk)
            finally:
                if deadline is not None:
                    self.sock.settimeout(stall)
        except TimeoutError as exc:
            raise Stalled("no data within the stall timeout") from exc
        except (OSError, ValueError) as exc:
            raise ConnectionLost(f"{type(exc).__name__}: {exc}") from exc
        self.pending += memoryview(chunk)[:n]
        return n

    def readline(self) -> bytes:
        """One CRLF-terminated line (of a chunked body's framing)."""
        for _ in range(HEAD_LIMIT):
            end = self.pending.find(b"\n")
            if end >= 0:
                line = bytes(self.pending[: end + 1])
                del self.pending[: end + 1]
                return line
            if len(self.pending) > HEAD_LIMIT or not self.fill():
                break
        raise ConnectionLost("the chunked body's framing is broken or cut short")

    def read_head(self, deadline: float) -> tuple[int, str, bytes, http.client.HTTPMessage]:
        """The next response head: status, reason, HTTP version, headers. Raises
        :class:`Stalled` when the final head is not in by ``deadline`` (monotonic) or
        after :data:`MAX_INTERIM` interim answers: a head dripped byte by byte, or 1xx
        answers sent for ever, never trip the per-recv stall timeout."""
        for _ in range(MAX_INTERIM + 1):
            for _ in range(HEAD_LIMIT):
                for _ in range(MAX_BLANK_LINES):
                    if self.pending.startswith(b"\r\n"):
                        del self.pending[:2]
                    elif self.pending.startswith(b"\n"):
                        del self.pending[:1]
                    else:
                        break
                end = self.pending.find(b"\r\n\r\n")
                if end >= 0:
                    break
                if len(self.pending) > HEAD_LIMIT:
                    raise ConnectionLost("the response head is too large")
                try:
                    more = self.fill(deadline)
                except Stalled:
                    if time.monotonic() >= deadline:
                        raise Stalled("no whole response head within the request budget") from None
                    raise
                if not more:
                    what = "before answering" if not self.pending else "inside the response head"
                    raise ConnectionLost(f"the server closed the connection {what}")
            else:
                raise ConnectionLost("the response head is too large")
            head = bytes(self.pending[: end + 4])
            del self.pending[: end + 4]
            line, _, fields = head.partition(b"\r\n")
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
                raise ConnectionLost(f"not an HTTP/1.x answer: {line[:80]!r}")
            status = int(parts[1])
            try:
                headers = http.client.parse_headers(io.BytesIO(fields))
            except http.client.HTTPException as exc:
                raise ConnectionLost(f"malformed response headers: {exc}") from exc
            if 100 <= status < 200 and status != 101:
                continue  # an interim answer (100 Continue, 103 Early Hints): the next
            reason = parts[2].decode("latin-1").strip() if len(parts) > 2 else ""
            return status, reason, parts[0], headers
        raise Stalled(f"no final answer after {MAX_INTERIM} interim (1xx) answers")


class Response:
    """A response whose head is read and whose body is not (yet). Used by one thread at a
    time (it may be handed from the thread that opened it to another); end it with
    :meth:`release` (keeps the connection when the body was read whole) or :meth:`close`."""

    def __init__(
        self,
        transport: Transport,
        conn: _Connection,
        head: Head,
        chunked: bool,
        keep: bool,
        transfer: Transfer,
    ) -> None:
        self._transport = transport
        self._conn: _Connection | None = conn
        self._transfer = transfer  # the one it was opened for (its socket is attached)
        self.head = head
        self._chunked = chunked
        self._chunk_left = 0
        self._body_left = head.length  # None: chunked or until the connection closes
        self._keep = keep
        self._done = head.length == 0

    def _read(self, view: memoryview) -> int:
        """Body bytes into ``view``; 0 at the body's end."""
        conn = self._conn
        assert conn is not None
        if self._done:
            return 0
        if self._chunked:
            if not self._chunk_left:
                size_line = conn.readline().split(b";", 1)[0].strip()
                if not _CHUNK_SIZE.fullmatch(size_line):  # int(x, 16) takes -5, 0x10, 1_0
                    raise ConnectionLost(f"bad chunk size {size_line[:20]!r}")
                self._chunk_left = int(size_line, 16)
                if not self._chunk_left:
                    for _ in range(100):  # trailers, up to the empty line
                        if conn.readline() in (b"\r\n", b"\n"):
                            break
                    self._done = True
                    return 0
            n = conn.recv_into(view[: self._chunk_left])
            if not n:
                raise ConnectionLost("the chunked body ended early")
            self._chunk_left -= n
            if not self._chunk_left and conn.readline() not in (b"\r\n", b"\n"):
                raise ConnectionLost("a chunk did not end with CRLF")
            return n
        if self._body_left is None:  # close-delimited: the end of the stream ends it
            n = conn.recv_into(view)
            if not n:
                self._done = True
            return n
        n = conn.recv_into(view[: self._body_left])
        if not n:
            raise ConnectionLost(f"the body ended {self._body_left} bytes early")
        self._body_left -= n
        if not self._body_left:
            self._done = True
        return n

    def read_into(
        self, transfer: Transfer, sink: RecordingSink, moved: Callable[[int], None]
    ) -> None:
        """Write the body at ``transfer.cursor`` onwards until ``transfer.end``, the body's
        end or an :meth:`Transfer.interrupt`; ``moved(n)`` after each write. Raises
        :class:`Stalled`, :class:`ConnectionLost`, :class:`Interrupted`, OSError (the disk)."""
        conn = self._conn
        assert conn is not None
        transfer.attach(conn.sock)
        buf = mmap.mmap(-1, BUFFER)  # page-aligned, as a write around the page cache needs
        view = memoryview(buf)
        writer = _Writer(sink)
        try:
            while not self._done:
                at = transfer.cursor
                want = min(BUFFER, transfer.end - at)
                if at % DIRECT_ALIGN:  # first up to a block boundary: then whole blocks
                    want = min(want, DIRECT_ALIGN - at % DIRECT_ALIGN)
                if want <= 0 or transfer.stop:
                    break
                got = 0
                try:
                    if self._chunked or self._body_left is None or conn.pending:
                        while got < want and not transfer.stop:
                            n = self._read(view[got:want])
                            if not n:
                                break
                            got += n
                            transfer.received += n
                    else:
                        got, failed = self._read_sized(view, want, transfer)
                        if failed is not None:
                            raise failed
                except (Stalled, ConnectionLost):
                    if transfer.stop:
                        raise Interrupted() from None
                    if not got:
                        raise
                    # What arrived before the failure is good: keep it, then fail.
                    self._place(writer, view, got, transfer, sink, moved)
                    raise
                self._place(writer, view, got, transfer, sink, moved)
        finally:
            writer.close()
            with contextlib.suppress(Interrupted):
                transfer.attach(None)
        if transfer.stop and not self._done and transfer.cursor < transfer.end:
            raise Interrupted()

    def _read_sized(
        self, view: memoryview, want: int, transfer: Transfer
    ) -> tuple[int, Stalled | ConnectionLost | None]:
        """Up to ``want`` bytes of a body of known length into ``view``, straight from the
        socket (nothing may be pending): the loop every byte of a download goes through,
        one call per TLS record. Returns how many bytes came (fewer only at a stop or a
        failure) and the failure that ended it early, if one did."""
        conn = self._conn
        assert conn is not None and self._body_left is not None
        want = min(want, self._body_left)
        read = conn.read
        got = 0
        failed: Stalled | ConnectionLost | None = None
        try:
            while got < want and not transfer.stop:
                n = read(want - got, view[got:want])
                if not n:
                    failed = ConnectionLost(f"the body ended {self._body_left - got} bytes early")
                    break
                got += n
                transfer.received += n  # the scheduler's rate: per read, not per buffer
        except TimeoutError as exc:
            failed = Stalled("no data within the stall timeout")
            failed.__cause__ = exc
        except (OSError, ValueError) as exc:  # ValueError: a socket shut down under SSL
            failed = ConnectionLost(f"{type(exc).__name__}: {exc}")
            failed.__cause__ = exc
        self._body_left -= got
        if not self._body_left:
            self._done = True
        return got, failed

    @staticmethod
    def _place(
        writer: _Writer,
        view: memoryview,
        got: int,
        transfer: Transfer,
        sink: RecordingSink,
        moved: Callable[[int], None],
    ) -> None:
        at = transfer.cursor
        take = min(got, transfer.end - at)  # end as it is now: stolen meanwhile?
        if take <= 0:
            return
        placed = view[:take]
        writer.write(placed, at)
        transfer.cursor = at + take
        sink.record(at, take, [placed])  # the sink may hash them from here
        moved(take)

    def drain(self) -> None:
        """Read and drop a small body (a redirect's, an error page), so the connection can
        carry the next request; a large or unsized one is not read (release closes)."""
        if self._done or self._conn is None:
            return
        if self._body_left is None or self._body_left > DRAIN_LIMIT:
            return
        scratch = memoryview(bytearray(self._body_left))
        with contextlib.suppress(Stalled, ConnectionLost):
            for _ in range(DRAIN_LIMIT):
                if not self._read(scratch):
                    break

    def release(self) -> None:
        """Done with this response: its connection goes back for reuse if the body was
        read whole and the server keeps it alive, else it is closed. Idempotent."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # Bytes past the body (a stray CRLF, garbage) would be read as the next head.
        if self._done and self._keep and not conn.pending:
            self._transfer.detach(conn.sock)  # a late interrupt must not cut its next user
            self._transport._put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the response and its connection (the body may be unread). Idempotent."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class Transport:
    """Range GETs for one download (see the module docstring). Thread-safe: each call of
    :meth:`open` uses a connection no other thread uses meanwhile. :meth:`close` closes the
    idle connections; call it once no thread uses the transport any more."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._idle: dict[Origin, list[_Connection]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._context: ssl.SSLContext | None = None

    def _tls(self) -> ssl.SSLContext:
        if self._context is None:
            ctx = ssl_context(self.config)
            if not isinstance(ctx, ssl.SSLContext):
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE  # --insecure-options tls, as the user asked
            self._context = ctx
        return self._context

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def _put(self, conn: _Connection) -> None:
        conn.used = True
        with self._lock:
            if not self._closed:
                self._idle.setdefault(conn.origin, []).append(conn)
                return
        conn.close()

    def _take(self, origin: Origin) -> _Connection | None:
        with self._lock:
            conns = self._idle.get(origin)
            return conns.pop() if conns else None

    def _dial(self, host: str, port: int, transfer: Transfer, deadline: float) -> socket.socket:
        """A connected TCP socket to ``host``'s addresses, one after the other, each by a
        non-blocking connect watched in slices of :data:`CONNECT_SLICE` s, so that
        :meth:`Transfer.interrupt` ends it at once (a blocking connect cannot be woken).
        The name lookup itself (getaddrinfo) still blocks. Raises :class:`Stalled` past
        ``deadline``, :class:`ConnectionLost` when every address refuses,
        :class:`Interrupted`."""
        address = self.config.resolve.get((host, port), host)
        try:
            infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectionLost(f"cannot connect to {host}:{port} ({exc})") from exc
        error: OSError | None = None
        for family, kind, proto, _, addr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                transfer.attach(sock)
                sock.setblocking(False)
                code = sock.connect_ex(addr)
                for _ in range(int(self.config.connect_timeout / CONNECT_SLICE) + 2):
                    if code not in (errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK):
                        break
                    if transfer.stop:
                        raise Interrupted()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise Stalled(f"cannot connect to {host}:{port} (timed out)")
                    _, writable, _ = select.select([], [sock], [], min(CONNECT_SLICE, left))
                    if writable:
                        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        break
                if code:
                    raise OSError(code, os.strerror(code))
                if transfer.stop:
                    raise Interrupted()
                sock.setblocking(True)
                return sock
            except OSError as exc:
                sock.close()
                if transfer.stop:
                    raise Interrupted() from exc
                error = exc
            except BaseException:
                sock.close()
                raise
        raise ConnectionLost(f"cannot connect to {host}:{port} ({error})") from error

    def _connect(self, origin: Origin, transfer: Transfer, deadline: float) -> _Connection:
        scheme, host, port = origin
        timeout = self.config.stall_timeout
        started = time.monotonic()
        connect = min(self.config.connect_timeout, timeout)
        raw = self._dial(host, port, transfer, min(deadline, started + connect))
        try:
            raw.settimeout(timeout)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme != "https":
                transfer.attach(raw)
                return _Connection(raw, origin)
            sock = self._tls().wrap_socket(raw, server_hostname=host, do_handshake_on_connect=False)
        except BaseException:
            raw.close()
            raise
        try:
            transfer.attach(sock)
            sock.do_handshake()
        except ssl.SSLCertVerificationError as exc:
            sock.close()
            raise TransferFailed(
                f"{host}:{port}: the TLS certificate is not trusted "
                f"({exc.verify_message or exc}); add its CA to the system store or "
                "SSL_CERT_FILE, or pass --insecure-options tls"
            ) from exc
        except TimeoutError as exc:
            sock.close()
            raise Stalled(f"{host}:{port}: no TLS handshake within the stall timeout") from exc
        except (OSError, ValueError) as exc:
            sock.close()
            if transfer.stop:
                raise Interrupted() from exc
            raise ConnectionLost(f"{host}:{port}: TLS handshake failed ({exc})") from exc
        except BaseException:
            sock.close()
            raise
        return _Connection(sock, origin)

    def open(
        self,
        location: Location,
        start: int | None,
        end: int | None,
        transfer: Transfer,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """``GET location.url`` (bytes ``[start, end)`` if ``start`` is given; ``end`` None:
        to the end), following redirects. Blocking. Raises as the module docstring says."""
        url = location.url
        sent = {**location.headers, **(headers or {})}
        first = _origin(url)
        # The whole request, redirects and connects included, up to the response head:
        # a server dripping its head, or sending 1xx for ever, does not hold it longer.
        deadline = time.monotonic() + self.config.request_budget
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._exchange(url, sent, start, end, transfer, deadline)
            target = resp.head.get("Location")
            if resp.head.status not in REDIRECT_STATUSES or not target:
                return resp
            resp.drain()
            resp.release()
            new = urljoin(url, target.strip())
            origin = _origin(new)
            if origin[0] == "http" and first[0] == "https" and "http" not in self.config.insecure:
                raise InsecureRefused(
                    f"{redact(url)} redirects to plain HTTP ({redact(new)}); "
                    "pass --insecure-options http to allow it"
                )
            if origin != first:
                sent = dict(headers or {})  # Authorization never crosses origins
            url = new
        raise TransferFailed(f"{redact(location.url)}: more than {MAX_REDIRECTS} redirects")

    def _exchange(
        self,
        url: str,
        headers: Mapping[str, str],
        start: int | None,
        end: int | None,
        transfer: Transfer,
        deadline: float,
    ) -> Response:
        origin = _origin(url)
        request = _request(url, origin, headers, start, end)
        for attempt in range(2):  # once more only when a reused keep-alive one was stale
            # The retry connects afresh: another idle connection may be as stale.
            conn = self._take(origin) if attempt == 0 else None
            if conn is None:
                conn = self._connect(origin, transfer, deadline)
            try:
                transfer.attach(conn.sock)
                try:
                    conn.sock.sendall(request)
                except TimeoutError as exc:
                    raise Stalled("the request could not be sent") from exc
                except OSError as exc:
                    raise ConnectionLost(f"sending the request failed ({exc})") from exc
                status, reason, version, fields = conn.read_head(deadline)
            except (Stalled, ConnectionLost) as exc:
                stale = conn.used and not conn.pending and not isinstance(exc, Stalled)
                conn.close()
                if transfer.stop:
                    raise Interrupted() from exc
                if stale:
                    continue
                raise
            except BaseException:
                conn.close()
                raise
            return _response(self, conn, url, status, reason, version, fields, transfer)
        raise ConnectionLost("the server closed two connections before answering")


def _request(
    url: str, origin: Origin, headers: Mapping[str, str], start: int | None, end: int | None
) -> bytes:
    scheme, host, port = origin
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    shown = f"[{host}]" if ":" in host else host  # an IPv6 literal
    if port != (443 if scheme == "https" else 80):
        shown = f"{shown}:{port}"
    lines = [f"GET {target} HTTP/1.1", f"Host: {shown}", f"User-Agent: {USER_AGENT}"]
    lines.append("Accept-Encoding: identity")
    if start is not None:
        lines.append(f"Range: bytes={start}-{'' if end is None else end - 1}")
    skip = {"host", "user-agent", "range", "accept-encoding", "connection", "content-length"}
    for name, value in headers.items():
        if name.lower() in skip:
            continue
        if any(c in f"{name}{value}" for c in "\r\n\0") or not name.isascii():
            raise TransferFailed(f"{redact(url)}: header {name!r} cannot be sent")
        lines.append(f"{name}: {value}")
    text = "\r\n".join(lines) + "\r\n\r\n"
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise TransferFailed(f"{redact(url)}: the request is not ASCII") from None


def _response(
    transport: Transport,
    conn: _Connection,
    url: str,
    status: int,
    reason: str,
    version: bytes,
    headers: http.client.HTTPMessage,
    transfer: Transfer,
) -> Response:
    codings = ",".join(headers.get_all("Transfer-Encoding") or []).lower()
    chunked = codings.replace(" ", "").endswith("chunked")
    length: int | None = None
    if not chunked:
        values = {v.strip() for v in headers.get_all("Content-Length") or []}
        if len(values) > 1 or any(not v.isdigit() or len(v) > 19 for v in values):
            conn.close()
            raise ConnectionLost(f"bad Content-Length {sorted(values)!r}")
        if values:
            length = int(values.pop())
        elif status in (204, 304):
            length = 0
    tokens = {t.strip().lower() for t in ",".join(headers.get_all("Connection") or []).split(",")}
    keep = (version == b"HTTP/1.1" and "close" not in tokens) or "keep-alive" in tokens
    keep = keep and (chunked or length is not None)
    head = Head(status, reason, headers, url, length)
    return Response(transport, conn, head, chunked, keep, transfer)
