"""A `fetchd serve` cache gone wrong, as a few lines of real HTTP server in front of the
real one (a fault-injecting proxy: someone else's misbehaving server, as far as the client
under test knows): it hands out non-canonical torrents, or no slices."""

from __future__ import annotations

import contextlib
import http.server
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

from fetchd.bt.metainfo import bdecode, bencode


class _BadCache(http.server.ThreadingHTTPServer):
    """A cache gone wrong, as a proxy in front of the real one: with ``private`` it hands
    out torrents whose info dict carries private=1 (not fetchd's canonical form); with
    ``slices`` False it answers 404 to the slice endpoint (a cache that hands none out).
    Everything else is forwarded as it is (status, Range, Content-Range)."""

    def __init__(self, upstream: str, *, private: bool = False, slices: bool = True) -> None:
        self.upstream = upstream
        self.private = private
        self.slices = slices
        self.torrents_served = 0
        super().__init__(("127.0.0.1", 0), _Forward)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    server: _BadCache

    def do_GET(self) -> None:
        if self.path.startswith("/fetchd/v1/slices/") and not self.server.slices:
            self._answer(404, b"{}", {"Content-Type": "application/json"})
            return
        headers = {k: v for k, v in self.headers.items() if k in ("Range", "Accept")}
        req = urllib.request.Request(self.server.upstream + self.path, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                status, body, got = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as exc:
            status, body, got = exc.code, exc.read(), exc.headers
        keep = ("Content-Type", "Content-Range", "Docker-Content-Digest", "Accept-Ranges")
        out = {k: v for k, v in got.items() if k in keep}
        if self.path.startswith("/fetchd/v1/torrents/") and status == 200 and self.server.private:
            doc = bdecode(body)
            assert isinstance(doc, dict)
            doc[b"info"][b"private"] = 1
            body = bencode(doc)
            self.server.torrents_served += 1
        self._answer(status, body, out)

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def bad_cache(upstream: str, **faults: bool) -> Iterator[_BadCache]:
    proxy = _BadCache(upstream, **faults)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(10)
