"""Misbehaving range servers: test doubles of other people's HTTP servers, one file each.

A RangeServer serves one byte string (in memory, or a file on disk) at one path over HTTP/1.1
with keep-alive, in a thread (tests/support/servers.py). Without a fault it is a correct range
server: GET and HEAD; Range `bytes=A-B`, `bytes=A-`, `bytes=-N` → 206 with Content-Range; an
unsatisfiable range → 416 with `Content-Range: bytes */SIZE`; a multi-range or malformed Range
→ 200 with the whole body (allowed by RFC 9110); If-Range (ETag or date) that no longer matches
→ 200 whole; If-None-Match / If-Modified-Since → 304; `Accept-Ranges: bytes`, ETag,
Last-Modified and any extra `headers` on every answer. Other paths get 404, other methods 405.

`replace(data)` swaps the content at any time, with a new ETag and a Last-Modified one second
later per replacement, so a resumed download sees a changed validator.

Faults (`fault=` or `set_fault()`; the response a fault touched says so in `seen[i].fault`):

- "ignore-range": every GET is 200 with the whole body; no Accept-Ranges header; If-Range,
  Range and conditionals are ignored.
- "busy": the first `busy_count` requests (any method) get `busy_status` (503 by default, or
  429) with `Retry-After: 1` and an empty body; the rest are served normally.
- "stall-one": the first GET whose Range starts past byte 0 (the first "other" segment of a
  segmented client; a one-stream client is never stalled) gets its headers and
  min(`stall_bytes`, half its length) body bytes, then nothing until the server stops (at most
  STALL_LIMIT s); then the connection is closed. `stalled` is set when the stall begins. Every
  other request is served normally.
- "etag-change": after `change_after` GET responses (default 1) the server calls
  replace(data with every byte inverted) once, by itself, so the segments of one download see
  two validators (HEADs do not count; a file on disk is read into memory for this). To
  change the content between two downloads, call replace() instead: it works under any fault.
- "overlong": every GET announces the right Content-Length (and Content-Range), writes that
  many body bytes and then `overlong_extra` more (b"OVERLONG" repeated), then closes the
  connection.
- "wrong-content-range": a satisfiable Range request gets a 206 for a range shifted by
  `shift` bytes (forward, or backward where forward would pass the end; served correctly where
  neither fits, e.g. `bytes=0-`); Content-Range and body agree with each other, not with the
  request. Requests without Range are served normally.

`seen` lists every request in arrival order as a Seen, appended when the answer's headers are
sent; its `body_bytes` grows while the body is written and `done` is set when it ends.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .servers import QuietHandler, ServerThread

Fault = Literal[
    "none", "ignore-range", "busy", "stall-one", "etag-change", "overlong", "wrong-content-range"
]

CHUNK = 64 * 1024
STALL_LIMIT = 600.0  # a stalled response is released at the latest after this
OVERLONG_FILLER = b"OVERLONG"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass
class Seen:
    """One request and what the server did with it."""

    method: str
    path: str
    range: str | None  # the Range request header
    headers: dict[str, str]  # every request header (last value wins)
    status: int
    fault: str  # the fault applied to this answer, "" for none
    body_bytes: int = 0  # body bytes written so far (overlong filler included)
    done: bool = field(default=False)


@dataclass(frozen=True)
class _Content:
    data: bytes | Path
    size: int
    etag: str
    last_modified: float  # Unix time, whole seconds

    def chunks(self, start: int, length: int) -> Iterator[bytes]:
        if isinstance(self.data, bytes):
            view = memoryview(self.data)
            for offset in range(start, start + length, CHUNK):
                yield bytes(view[offset : min(offset + CHUNK, start + length)])
            return
        with self.data.open("rb") as f:
            f.seek(start)
            left = length
            for _ in range(length // CHUNK + 1):
                if left <= 0:
                    break
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise OSError(f"{self.data} shrank under the server")
                left -= len(chunk)
                yield chunk


class _Handler(QuietHandler):
    def do_HEAD(self) -> None:
        self._answer()

    def do_GET(self) -> None:
        self._answer()

    def _other(self) -> None:
        self.close_connection = True  # a request body, if any, is left unread
        self._send(405, {}, None, "")

    do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _other

    def _send(
        self,
        status: int,
        headers: dict[str, str],
        body: tuple[_Content, int, int] | None,
        fault: str,
        extra: int = 0,
    ) -> None:
        """Headers, then the (start, length) slice of the content unless HEAD, then `extra`."""
        server: RangeServer = self.owner
        seen = server._record(self, status, fault)
        self.send_response(status)
        if status != 304:
            headers.setdefault("Content-Length", str(body[2] if body is not None else 0))
        for name, value in {**server.headers, **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            if body is not None and self.command == "GET":
                self._write_body(seen, body, fault)
            if extra and self.command == "GET":
                filler = OVERLONG_FILLER * (extra // len(OVERLONG_FILLER) + 1)
                self.wfile.write(filler[:extra])
                seen.body_bytes += extra
        except OSError:  # the client went away
            self.close_connection = True
        finally:
            seen.done = True
        if fault in ("overlong", "stall-one"):
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    def _write_body(self, seen: Seen, body: tuple[_Content, int, int], fault: str) -> None:
        content, start, length = body
        limit = min(self.owner.stall_bytes, length // 2) if fault == "stall-one" else length
        for chunk in content.chunks(start, limit):
            self.wfile.write(chunk)
            seen.body_bytes += len(chunk)
        if fault == "stall-one":
            self.wfile.flush()
            self.owner.stalled.set()
            self.owner.stopping.wait(STALL_LIMIT)

    def _answer(self) -> None:
        server: RangeServer = self.owner
        if self.path.split("?", 1)[0] != server.path:
            self._send(404, {}, None, "")
            return
        fault = server.fault
        if fault == "busy" and server._take_busy():
            self._send(server.busy_status, {"Retry-After": "1"}, None, "busy")
            return
        content = server._content_for_request(self.command)
        headers = {
            "ETag": content.etag,
            "Last-Modified": email.utils.formatdate(content.last_modified, usegmt=True),
            "Content-Type": "application/octet-stream",
        }
        if fault == "ignore-range":
            self._send(200, headers, (content, 0, content.size), fault)
            return
        headers["Accept-Ranges"] = "bytes"
        if self._not_modified(content):
            self._send(304, headers, None, "")
            return
        extra = server.overlong_extra if fault == "overlong" and self.command == "GET" else 0
        tag = "overlong" if extra else ""
        wanted = self._range(content)
        if wanted is None:
            self._send(200, headers, (content, 0, content.size), tag, extra)
            return
        start, end = wanted
        if start >= content.size or start > end:
            headers["Content-Range"] = f"bytes */{content.size}"
            self._send(416, headers, None, "")
            return
        end = min(end, content.size - 1)
        if fault == "wrong-content-range":
            shift = server.shift if end + server.shift < content.size else -server.shift
            if start + shift >= 0:
                start, end, tag = start + shift, end + shift, fault
        elif fault == "stall-one" and start > 0 and server._take_stall():
            tag = fault
        headers["Content-Range"] = f"bytes {start}-{end}/{content.size}"
        self._send(206, headers, (content, start, end - start + 1), tag, extra)

    def _not_modified(self, content: _Content) -> bool:
        if_none_match = self.headers.get("If-None-Match")
        if if_none_match is not None:
            tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
            return "*" in tags or content.etag in tags
        since = self.headers.get("If-Modified-Since")
        if since is not None:
            with contextlib.suppress(TypeError, ValueError):
                parsed = email.utils.parsedate_to_datetime(since).timestamp()
                return content.last_modified <= parsed
        return False

    def _range(self, content: _Content) -> tuple[int, int] | None:
        """The (first, last) byte asked for, or None to send the whole body. A suffix range
        `-N` becomes (size - N, size - 1); `-0` becomes unsatisfiable."""
        header = self.headers.get("Range")
        if header is None:
            return None
        if_range = self.headers.get("If-Range")
        if if_range is not None and if_range not in (
            content.etag,
            email.utils.formatdate(content.last_modified, usegmt=True),
        ):
            return None
        match = _RANGE.fullmatch(header.replace(" ", ""))
        if match is None or match[1] == match[2] == "":
            return None  # malformed or a multi-range: ignored
        if match[1] == "":
            suffix = int(match[2])
            return (max(content.size - suffix, 0), content.size - 1) if suffix else (1, 0)
        start = int(match[1])
        return start, int(match[2]) if match[2] else content.size - 1


class RangeServer(ServerThread):
    """One file at `path` on a free port of 127.0.0.1, with a fault. A context manager."""

    def __init__(
        self,
        data: bytes | Path,
        *,
        path: str = "/file.bin",
        fault: Fault = "none",
        headers: dict[str, str] | None = None,
        busy_count: int = 2,
        busy_status: int = 503,
        stall_bytes: int = 64 * 1024,
        change_after: int = 1,
        overlong_extra: int = 64 * 1024,
        shift: int = 1,
    ) -> None:
        self.path = path
        self.headers = dict(headers or {})
        self.busy_count = busy_count
        self.busy_status = busy_status
        self.stall_bytes = stall_bytes
        self.change_after = change_after
        self.overlong_extra = overlong_extra
        self.shift = shift
        self.seen: list[Seen] = []
        self.stalled = threading.Event()
        self._lock = threading.Lock()
        self._generation = 0
        self._base_time = float(int(time.time()) - 3600)
        self._content = self._make_content(data)
        self.fault: Fault = "none"
        self._busy_left = 0
        self._stall_left = 0
        self._gets_before_change = 0
        self.set_fault(fault)
        super().__init__(_Handler)
        self.file_url = f"{self.url}{path}"

    def set_fault(self, fault: Fault) -> None:
        """Switch the fault; resets its counters (busy_count, the one stall, change_after)."""
        with self._lock:
            self.fault = fault
            self._busy_left = self.busy_count
            self._stall_left = 1
            self._gets_before_change = self.change_after
            self.stalled.clear()

    def replace(self, data: bytes | Path) -> None:
        """Serve `data` from now on, with a new ETag and a later Last-Modified."""
        with self._lock:
            self._content = self._make_content(data)

    @property
    def etag(self) -> str:
        return self._content.etag

    def _make_content(self, data: bytes | Path) -> _Content:
        # Called with the lock held (or before the server starts).
        self._generation += 1
        if isinstance(data, bytes):
            size = len(data)
            tag = hashlib.sha256(data).hexdigest()[:16]
        else:
            size = data.stat().st_size
            tag = f"{size:x}"
        return _Content(
            data, size, f'"g{self._generation}-{tag}"', self._base_time + self._generation
        )

    def _content_for_request(self, method: str) -> _Content:
        """The content this request is answered from; under "etag-change", counts the GET and
        swaps in the inverted content once `change_after` GETs have been answered."""
        with self._lock:
            content = self._content
            if self.fault == "etag-change" and method == "GET" and self._gets_before_change >= 0:
                if self._gets_before_change == 0:
                    self._content = self._make_content(_inverted(content))
                    content = self._content
                self._gets_before_change -= 1
            return content

    def _take_busy(self) -> bool:
        with self._lock:
            if self._busy_left <= 0:
                return False
            self._busy_left -= 1
            return True

    def _take_stall(self) -> bool:
        with self._lock:
            if self._stall_left <= 0:
                return False
            self._stall_left -= 1
            return True

    def _record(self, handler: QuietHandler, status: int, fault: str) -> Seen:
        headers = dict(handler.headers.items())
        range_ = handler.headers.get("Range")
        seen = Seen(handler.command, handler.path, range_, headers, status, fault)
        with self._lock:
            self.seen.append(seen)
        return seen


def _inverted(content: _Content) -> bytes:
    data = content.data if isinstance(content.data, bytes) else content.data.read_bytes()
    return data.translate(bytes(255 - b for b in range(256)))
