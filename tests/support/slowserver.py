"""A gate in front of a real server: forwards every request, holds the answers a test names.

The cancellation tests must cancel a pull at a given await of the engine: while a request
is outstanding, or after some bytes of a body came. SlowProxy sits in front of the real
peer (the registry, nginx) on a free port of 127.0.0.1 and forwards each request to it
(method, path and query, headers with Host and Range, body) like faultproxy.py, so the
bytes and the protocol are the real server's. What it adds:

- ``hold(match, after=N, times=T)``: an answer to a request whose path contains
  ``match`` (the next T such answers, or all) stops after N body bytes (``after=None``:
  before the upstream is even asked, so the client waits for the response head). It
  stays held until :meth:`release`, the proxy stops, or the client goes away (seen at
  once: a held handler watches its socket), whichever comes first; a released answer
  goes on from where it stopped.
- every request is a :class:`Seen` in ``seen`` (arrival order), whose ``held`` event is
  set when its hold begins and ``done`` when the handler is finished with it; ``gone``
  tells that the client closed the connection while the answer was held.
- :meth:`wait_for` waits (bounded) until a predicate over the proxy holds, woken by each
  of these events: a test's cancel point is the server's signal, never a sleep.
- :attr:`live` counts the client connections open right now; :meth:`wait_closed` waits
  until there are none (nothing of the client is still talking to the server).
"""

from __future__ import annotations

import contextlib
import http.client
import io
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from .faultproxy import NOT_FORWARDED
from .servers import QuietHandler, ServerThread

CHUNK = 64 * 1024
UPSTREAM_TIMEOUT = 30.0
HOLD_LIMIT = 120.0  # a held answer is released at the latest after this
WATCH_INTERVAL = 0.02  # how often a held handler looks whether its client went away


@dataclass
class Seen:
    """One request and what the proxy did with it."""

    method: str
    path: str  # with the query string
    range: str | None  # the Range request header
    status: int | None = None  # the upstream's status, once known
    body_bytes: int = 0  # body bytes written to the client so far
    held: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    gone: bool = False  # the client closed the connection while the answer was held
    releases: int = 0  # release() calls before it arrived: a later one lets it go


@dataclass
class _Hold:
    match: str
    after: int | None
    times: int | None  # answers still to hold (None: every one)


class _Handler(QuietHandler):
    def do_GET(self) -> None:
        proxy: SlowProxy = self.owner
        seen = proxy._arrived(self)
        try:
            self._forward(proxy, seen)
        finally:
            seen.done.set()
            proxy._changed()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _forward(self, proxy: SlowProxy, seen: Seen) -> None:
        hold = proxy._hold_for(seen.path)
        if hold is not None and hold.after is None and not self._held(proxy, seen):
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in NOT_FORWARDED}
        upstream = proxy._connect()
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            seen.status = resp.status
            self._relay(proxy, seen, resp, hold.after if hold is not None else None)
        finally:
            upstream.close()

    def _relay(
        self, proxy: SlowProxy, seen: Seen, resp: http.client.HTTPResponse, after: int | None
    ) -> None:
        length_header = resp.getheader("Content-Length")
        buffered = resp.read() if length_header is None and self.command != "HEAD" else None
        if buffered is not None:
            length_header = str(len(buffered))
        self.send_response(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in NOT_FORWARDED:
                self.send_header(name, value)
        if length_header is not None:
            self.send_header("Content-Length", length_header)
        self.end_headers()
        if self.command == "HEAD" or length_header is None:
            return
        length = int(length_header)
        source = io.BytesIO(buffered).read if buffered is not None else resp.read
        stop_at = min(after, length) if after is not None else None
        try:
            while seen.body_bytes < length:
                if seen.body_bytes == stop_at:
                    self.wfile.flush()
                    if not self._held(proxy, seen):
                        return
                    stop_at = None
                upto = stop_at if stop_at is not None else length
                chunk = source(min(CHUNK, upto - seen.body_bytes))
                if not chunk:
                    break
                self.wfile.write(chunk)
                seen.body_bytes += len(chunk)
                proxy._changed()
        except OSError:  # the client went away
            self.close_connection = True

    def _held(self, proxy: SlowProxy, seen: Seen) -> bool:
        """Hold until released (True) or until the client went away or the proxy stops
        (False: the connection is then closed)."""
        seen.held.set()
        proxy._changed()
        deadline = time.monotonic() + HOLD_LIMIT
        while not proxy._released(seen) and time.monotonic() < deadline:
            if proxy.stopping.is_set() or self._client_gone():
                seen.gone = not proxy.stopping.is_set()
                self.close_connection = True
                proxy._changed()
                return False
        return True

    def _client_gone(self) -> bool:
        """Whether the client closed its end (or reset it) within WATCH_INTERVAL."""
        readable, _, _ = select.select([self.connection], [], [], WATCH_INTERVAL)
        if not readable:
            return False
        try:
            return not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True


class SlowProxy(ServerThread):
    """The gate on a free port of 127.0.0.1 in front of ``upstream`` ("http://host:port").

    A context manager. Its methods may be called from any thread.
    """

    def __init__(self, upstream: str) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self._upstream_host = parts.hostname or "127.0.0.1"
        self._upstream_port = parts.port
        self._cond = threading.Condition()
        self._holds: list[_Hold] = []
        self._releases = 0
        self.seen: list[Seen] = []
        super().__init__(_Handler)

    # --- what the test sets -----------------------------------------------------------

    def hold(self, match: str, *, after: int | None = None, times: int | None = None) -> None:
        """Hold the later answers to requests whose path contains ``match`` (the next
        ``times`` of them, or every one): before the head (``after=None``), or after
        ``after`` body bytes."""
        with self._cond:
            self._holds.append(_Hold(match, after, times))

    def release(self) -> None:
        """Drop every hold and let the answers held now go on."""
        with self._cond:
            self._holds.clear()
            self._releases += 1
            self._cond.notify_all()

    # --- what the test observes -------------------------------------------------------

    def requests(self, match: str = "", method: str | None = None) -> list[Seen]:
        """The requests so far whose path contains ``match`` (of ``method``, if given)."""
        with self._cond:
            return [
                s for s in self.seen if match in s.path and (method is None or s.method == method)
            ]

    @property
    def live(self) -> int:
        """Client connections open now."""
        with self._connections_lock:
            return len(self._connections)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Until ``predicate()`` is true (checked at each request, byte, hold and
        connection change); AssertionError naming ``what`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
                self._cond.wait(min(left, 0.5))

    def wait_held(self, match: str, count: int = 1, timeout: float = 10.0) -> list[Seen]:
        """Until ``count`` answers to requests matching ``match`` are held; returns them."""
        self.wait_for(
            lambda: sum(s.held.is_set() for s in self.requests(match)) >= count,
            timeout,
            f"{count} held answer(s) to {match!r}",
        )
        return [s for s in self.requests(match) if s.held.is_set()]

    def wait_closed(self, timeout: float = 10.0) -> None:
        """Until no client connection is open (every handler saw its client go)."""
        self.wait_for(lambda: self.live == 0, timeout, "every client connection to close")

    # --- the handlers' side -----------------------------------------------------------

    def _arrived(self, handler: QuietHandler) -> Seen:
        with self._cond:
            seen = Seen(handler.command, handler.path, handler.headers.get("Range"))
            seen.releases = self._releases
            self.seen.append(seen)
            self._cond.notify_all()
        return seen

    def _hold_for(self, path: str) -> _Hold | None:
        with self._cond:
            hold = next((h for h in self._holds if h.match in path and h.times != 0), None)
            if hold is not None and hold.times is not None:
                hold.times -= 1
            return hold

    def _released(self, seen: Seen) -> bool:
        with self._cond:
            return self._releases != seen.releases

    def _changed(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _opened(self, conn: socket.socket) -> None:
        super()._opened(conn)
        self._changed()

    def _closed(self, conn: socket.socket) -> None:
        super()._closed(conn)
        self._changed()

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(
            self._upstream_host, self._upstream_port, timeout=UPSTREAM_TIMEOUT
        )

    def stop(self) -> None:
        super().stop()
        with contextlib.suppress(Exception):
            self._changed()
