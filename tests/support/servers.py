"""Small HTTP servers of our own (test doubles of other people's servers), each in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

JOIN_TIMEOUT = 10.0


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that keeps HTTP/1.1 connections and does not log to stderr."""

    protocol_version = "HTTP/1.1"

    @property
    def owner(self) -> Any:
        """The ServerThread this request arrived at."""
        return getattr(self.server, "owner")  # noqa: B009 - set by ServerThread

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.owner._opened(self.connection)

    def finish(self) -> None:
        self.owner._closed(self.connection)
        super().finish()


class ServerThread:
    """A ThreadingHTTPServer on 127.0.0.1 (port from the OS) serving from a thread.

    Handlers reach this object as `self.owner`. `stopping` is set in stop() once the server
    stopped accepting, so a handler that holds a connection open can wait on it. A context
    manager.
    """

    def __init__(self, handler: type[QuietHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.owner = self  # type: ignore[attr-defined]
        self.stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        self.port: int = self._server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting (new connections are refused from here on), then release the
        handlers that wait on `stopping`, then close; idempotent. In that order: a client
        whose held connection is released must find the server gone, not a last window in
        which the accept loop still answers."""
        if self.stopping.is_set():
            return
        self._server.shutdown()
        self._server.socket.close()
        self.stopping.set()
        with self._connections_lock:  # kept-alive connections end too: the server is gone
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self._server.server_close()  # joins the handler threads
        self._thread.join(JOIN_TIMEOUT)

    def _opened(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.add(conn)
        if self.stopping.is_set():  # accepted just before the listening socket closed
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _closed(self, conn: socket.socket) -> None:
        with self._connections_lock:
            self._connections.discard(conn)

    def __enter__(self) -> Any:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
