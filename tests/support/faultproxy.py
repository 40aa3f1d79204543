"""A fault-injecting HTTP proxy in front of a registry: a test double for a misbehaving server.

Every request is forwarded to the upstream (method, path and query, headers including
Authorization and Range, body); the client's Host header is kept, so the registry's
Location headers point back at the proxy. Faults apply to successful (200/206) GETs of
/v2/NAME/blobs/DIGEST only, according to the mode set with set_mode():

- "pass": forward untouched;
- "cut": send half the body, then close the connection; only the first time per digest,
  so that a resume can succeed;
- "corrupt": the body with its length kept and the first byte of every 64 KiB flipped;
- "stall": send the headers and the first bytes, then nothing until the proxy stops;
- "busy": answer the next `count` blob GETs with `status` (503 or 429) and Retry-After: 1,
  without asking the upstream; then pass.

Request bodies must carry a Content-Length (chunked uploads get 501).
"""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Literal

from .servers import QuietHandler, ServerThread

Mode = Literal["pass", "cut", "corrupt", "stall", "busy"]

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
    def do_GET(self) -> None:
        proxy: FaultProxy = self.owner
        match = _BLOB_PATH.fullmatch(urllib.parse.urlsplit(self.path).path)
        digest = match.group(1) if match and self.command == "GET" else None
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self._reply(501, "pass")
            return
        if digest is not None and proxy.take_busy():
            self._reply(proxy.busy_status, "busy")
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() not in NOT_FORWARDED}
        upstream = proxy.connect()
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            fault = proxy.fault_for(digest) if digest and resp.status in (200, 206) else "pass"
            self._relay(resp, fault)
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

    def _relay(self, resp: http.client.HTTPResponse, fault: Mode) -> None:
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
        if buffered is not None:
            self.wfile.write(buffered)
            return
        if self.command == "HEAD" or length_header is None:
            return
        length = int(length_header)
        # How much of the body to send: all of it, unless the fault cuts or stalls it.
        limit = {"cut": length // 2, "stall": min(CHUNK, length // 2)}.get(fault, length)
        sent = 0
        while sent < limit:
            chunk = resp.read(min(CHUNK, limit - sent))
            if not chunk:
                break
            if fault == "corrupt":
                chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
            self.wfile.write(chunk)
            sent += len(chunk)
        if fault == "stall":
            self.owner.stopping.wait(STALL_LIMIT)
        if fault in ("cut", "stall"):
            self.close_connection = True
            with contextlib.suppress(OSError):  # the client may have gone already
                self.connection.shutdown(socket.SHUT_RDWR)


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
        self.busy_status = 503
        self.seen: list[Seen] = []
        super().__init__(_ProxyHandler)

    def set_mode(self, mode: Mode, *, count: int = 1, status: int = 503) -> None:
        """Switch the fault; for "busy", `count` requests get `status` (503 or 429)."""
        with self._lock:
            self._mode = mode
            self._busy_left = count if mode == "busy" else 0
            self.busy_status = status

    def take_busy(self) -> bool:
        """Whether this blob GET is answered "busy" (and one fewer after it)."""
        with self._lock:
            if self._mode != "busy" or self._busy_left <= 0:
                return False
            self._busy_left -= 1
            return True

    def fault_for(self, digest: str) -> Mode:
        """The fault for a successful GET of this blob under the current mode."""
        with self._lock:
            if self._mode == "busy":
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
