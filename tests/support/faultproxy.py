"""A fault-injecting HTTP proxy in front of a registry: a test double for a misbehaving server.

Every request is forwarded to the upstream (method, path and query, headers including
Authorization and Range, body); the client's Host header is kept, so the registry's
Location headers point back at the proxy. Faults apply to successful (200/206) GETs of
/v2/NAME/blobs/DIGEST only ("slow" to every successful GET), according to the mode set
with set_mode():

- "pass": forward untouched;
- "cut": send half the body, then close the connection; only the first time per digest,
  so that a resume can succeed;
- "corrupt": the body with its length kept and the first byte of every 64 KiB flipped;
- "stall": send the headers and the first bytes, then nothing until the proxy stops;
- "busy": answer the next `count` blob GETs with `status` (503 or 429) and Retry-After: 1,
  without asking the upstream; then pass;
- "stall-after": the first `after` body bytes of a blob, summed over every connection and
  request (ranged or not), are sent; then every response of that blob stalls: it sends
  what is left of the allowance, then nothing until the proxy stops (a mirror that goes
  silent half-way through a layer, whichever segments were asked for). `stalled` is set
  (and `stalled_at`, time.monotonic()) when the first stall begins. The allowance starts
  afresh at each set_mode();
- "slow": every successful GET body, of any path (not only blobs), is sent at `rate`
  bytes per second at most, summed over all connections (a slow link, so that a test can
  act while a download is under way).

`digests`, given to set_mode(), limits a blob fault to those blobs: the others pass (for
"busy", only GETs of those blobs are answered busy). Without it a fault applies to every blob.

`bytes_sent(digest=…)` / `bytes_sent(path=…)` count the body bytes the proxy wrote to its
clients (all statuses, every fault), for a blob under any repository name or for one path
(without the query string): what a counting proxy in front of an origin reports. A chunk
is counted just before it is written, so a client that has read it finds it counted (a
write that fails, the client gone, still counts).

Request bodies must carry a Content-Length (chunked uploads get 501).
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from .servers import QuietHandler, ServerThread

Mode = Literal["pass", "cut", "corrupt", "stall", "busy", "stall-after", "slow"]

CHUNK = 64 * 1024
UPSTREAM_TIMEOUT = 30.0
STALL_LIMIT = 600.0  # a stalled response is released at the latest after this
# Hop-by-hop headers, and Content-Length, which the proxy sets itself.
NOT_FORWARDED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
_BLOB_PATH = re.compile(r"/v2/.+/blobs/([a-z0-9]+:[a-f0-9]+)")


@dataclass(frozen=True)
class Seen:
    """One request the proxy answered: what it asked and what it got."""

    method: str
    path: str  # with the query string
    range: str | None  # the Range request header
    status: int  # the status the proxy returned
    fault: Mode  # the fault applied to this response ("pass" for none)


class _ProxyHandler(QuietHandler):
    def handle(self) -> None:
        # A client that resets a kept-alive connection (fetchd cancelling a transfer, a
        # killed pull) ends it; socketserver would print a traceback for each.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().handle()

    def do_GET(self) -> None:
        proxy: FaultProxy = self.owner
        match = _BLOB_PATH.fullmatch(urllib.parse.urlsplit(self.path).path)
        digest = match.group(1) if match and self.command == "GET" else None
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._reply(501, "pass")
            return
        if digest is not None and proxy.take_busy(digest):
            self._reply(proxy.busy_status, "busy")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in NOT_FORWARDED}
        upstream = proxy.connect()
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            fault: Mode = "pass"
            if self.command == "GET" and resp.status in (200, 206):
                fault = proxy.fault_for(digest) if digest else proxy.fault_for_other()
            self._relay(resp, fault, digest)
        finally:
            upstream.close()

    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _record(self, status: int, fault: Mode) -> None:
        seen = Seen(self.command, self.path, self.headers.get("Range"), status, fault)
        self.owner.seen.append(seen)

    def _reply(self, status: int, fault: Mode) -> None:
        self._record(status, fault)
        self.send_response(status)
        if fault == "busy":
            self.send_header("Retry-After", "1")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _relay(self, resp: http.client.HTTPResponse, fault: Mode, digest: str | None) -> None:
        length_header = resp.getheader("Content-Length")
        # A chunked upstream answer (small JSON errors) is forwarded whole, with a length.
        buffered = resp.read() if length_header is None and self.command != "HEAD" else None
        if buffered is not None:
            length_header = str(len(buffered))
        self._record(resp.status, fault)
        self.send_response(resp.status, resp.reason)
        for name, value in resp.getheaders():
            if name.lower() not in NOT_FORWARDED:
                self.send_header(name, value)
        if length_header is not None:
            self.send_header("Content-Length", length_header)
        self.end_headers()
        proxy: FaultProxy = self.owner
        path = urllib.parse.urlsplit(self.path).path
        if buffered is not None:
            proxy.count(path, len(buffered))
            self.wfile.write(buffered)
            return
        if self.command == "HEAD" or length_header is None:
            return
        length = int(length_header)
        # How much of the body to send: all of it, unless the fault cuts or stalls it.
        limit = {"cut": length // 2, "stall": min(CHUNK, length // 2)}.get(fault, length)
        try:
            stalled = self._send_body(resp, fault, digest, path, limit)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away: nothing more to do
            return
        if stalled:
            if fault == "stall-after":
                proxy.stall_began()
            proxy.stopping.wait(STALL_LIMIT)
        if fault == "cut" or stalled:
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client may have gone already
                self.connection.shutdown(socket.SHUT_RDWR)

    def _send_body(
        self, resp: http.client.HTTPResponse, fault: Mode, digest: str | None, path: str, limit: int
    ) -> bool:
        """Relay up to `limit` body bytes under the fault; whether the response stalls now."""
        proxy: FaultProxy = self.owner
        sent = 0
        stalled = fault == "stall"
        while sent < limit:
            want = min(CHUNK, limit - sent)
            if fault == "stall-after":
                assert digest is not None
                want = proxy.take_allowance(digest, want)
                if not want:
                    stalled = True
                    break
            chunk = resp.read(want)
            if not chunk:
                break
            if fault == "corrupt":
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            if fault == "slow":
                proxy.throttle(len(chunk))
            proxy.count(path, len(chunk))  # before: once a client has it, it is counted
            self.wfile.write(chunk)
            sent += len(chunk)
        return stalled


class FaultProxy(ServerThread):
    """The proxy on a free port of 127.0.0.1 in front of `upstream` ("http(s)://host:port").

    `seen` lists every request answered, in order. A context manager.
    """

    def __init__(self, upstream: str, *, ssl_context: ssl.SSLContext | None = None) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self._upstream = parts
        self._upstream_context = ssl_context
        self._lock = threading.Lock()
        self._mode: Mode = "pass"
        self._busy_left = 0
        self._cut_digests: set[str] = set()
        self._digests: frozenset[str] | None = None
        self._allowance: dict[str, int] = {}
        self._after = 0
        self._rate = 0.0
        self._slow_next = 0.0
        self._sent: dict[str, int] = {}
        self.busy_status = 503
        self.seen: list[Seen] = []
        self.stalled = threading.Event()
        self.stalled_at: float | None = None  # time.monotonic() when `stalled` was set
        super().__init__(_ProxyHandler)

    def set_mode(
        self,
        mode: Mode,
        *,
        count: int = 1,
        status: int = 503,
        digests: Iterable[str] | None = None,
        after: int = 0,
        rate: float = 0.0,
    ) -> None:
        """Switch the fault; for "busy", `count` requests get `status` (503 or 429); for
        "stall-after", each blob's allowance is `after` bytes; for "slow", `rate` bytes per
        second (> 0). `digests` limits the fault to those blobs."""
        if mode == "slow" and rate <= 0:
            raise ValueError("mode 'slow' needs a rate > 0")
        with self._lock:
            self._mode = mode
            self._busy_left = count if mode == "busy" else 0
            self.busy_status = status
            self._digests = None if digests is None else frozenset(digests)
            self._after = after
            self._allowance = {}
            self._rate = rate
            self._slow_next = 0.0
            self.stalled.clear()
            self.stalled_at = None

    def _applies(self, digest: str | None) -> bool:
        return digest is None or self._digests is None or digest in self._digests

    def take_busy(self, digest: str | None = None) -> bool:
        """Whether this blob GET is answered "busy" (and one fewer after it)."""
        with self._lock:
            if self._mode != "busy" or self._busy_left <= 0 or not self._applies(digest):
                return False
            self._busy_left -= 1
            return True

    def fault_for_other(self) -> Mode:
        """The fault for a successful GET of anything but a blob: only "slow" applies."""
        with self._lock:
            return "slow" if self._mode == "slow" else "pass"

    def take_allowance(self, digest: str, want: int) -> int:
        """Up to `want` bytes of this blob's "stall-after" allowance (0: stall now)."""
        with self._lock:
            left = self._allowance.setdefault(digest, self._after)
            granted = min(left, want)
            self._allowance[digest] = left - granted
            return granted

    def stall_began(self) -> None:
        """Note the first "stall-after" stall since set_mode(): `stalled_at`, `stalled`."""
        with self._lock:
            if self.stalled_at is None:
                self.stalled_at = time.monotonic()
        self.stalled.set()

    def throttle(self, size: int) -> None:
        """Wait for the moment `size` more bytes may go out under the "slow" rate (shared
        by every connection); returns at once when the proxy stops."""
        with self._lock:
            now = time.monotonic()
            start = max(now, self._slow_next)
            self._slow_next = start + size / self._rate if self._rate > 0 else now
        if start > now:
            self.stopping.wait(start - now)

    def count(self, path: str, size: int) -> None:
        with self._lock:
            self._sent[path] = self._sent.get(path, 0) + size

    def bytes_sent(self, *, digest: str | None = None, path: str | None = None) -> int:
        """Body bytes written to clients so far: for GETs of blob `digest` (any name), of
        `path` (no query string), or of everything."""
        with self._lock:
            sent = dict(self._sent)
        total = 0
        for p, n in sent.items():
            match = _BLOB_PATH.fullmatch(p)
            if digest is not None and not (match and match.group(1) == digest):
                continue
            if path is not None and p != path:
                continue
            total += n
        return total

    def fault_for(self, digest: str) -> Mode:
        """The fault for a successful GET of this blob under the current mode."""
        with self._lock:
            if self._mode == "busy" or not self._applies(digest):
                return "pass"
            if self._mode == "cut":
                if digest in self._cut_digests:
                    return "pass"
                self._cut_digests.add(digest)
            return self._mode

    def connect(self) -> http.client.HTTPConnection:
        host, port = self._upstream.hostname or "127.0.0.1", self._upstream.port
        if self._upstream.scheme == "https":
            return http.client.HTTPSConnection(
                host, port, timeout=UPSTREAM_TIMEOUT, context=self._upstream_context
            )
        return http.client.HTTPConnection(host, port, timeout=UPSTREAM_TIMEOUT)
