"""The range test-support layer works: nginx over HTTP and HTTPS with its access log, make_file,
and every fault of the RangeServer doing what tests/support/rangefaults.py says."""

from __future__ import annotations

import hashlib
import http.client
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nginx import Nginx, make_file, start_nginx
from tests.support.procs import wait_until
from tests.support.rangefaults import RangeServer
from tests.support.tls import TestCA

MIB = 1024 * 1024
SIZE = 64 * MIB
DATA = bytes(range(256)) * 1024 + b"tail"  # 256 KiB + 4, for the fault servers
TIMEOUT = 5.0

# Reads `n` body bytes of a GET, then kills itself with SIGKILL: a client dying mid-download.
KILLED_CLIENT = """
import os, signal, socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
sock = socket.create_connection(("127.0.0.1", port), timeout=10)
sock.sendall(b"GET /file.bin?killed HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n")
got = 0
for _ in range(100000):
    data = sock.recv(65536)
    got += len(data)
    if not data or got >= n:
        break
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tls_ca: TestCA) -> Iterator[Nginx]:
    base = tmp_path_factory.mktemp("nginx")
    (base / "root").mkdir()
    make_file(base / "root" / "file.bin", SIZE, seed=1)
    tls = tls_ca.issue_server(base / "tls")
    with start_nginx(
        base / "nginx", base / "root", tls=tls, headers={"Cache-Control": "max-age=60"}
    ) as server:
        yield server


def _conn(url: str) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(url.removeprefix("http://"), timeout=TIMEOUT)


def _get(
    url: str, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    conn = _conn(url)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_make_file_is_deterministic_and_hashed(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    size = 8 * MIB + 123  # a partial last chunk
    digest = make_file(a, size, seed=5)
    assert make_file(b, size, seed=5) == digest
    assert make_file(c, size, seed=6) != digest
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_size == size
    assert digest == "sha256:" + hashlib.sha256(a.read_bytes()).hexdigest()
    assert make_file(tmp_path / "empty", 0) == "sha256:" + hashlib.sha256(b"").hexdigest()


def test_nginx_serves_ranges_over_http_and_https(served: Nginx, tls_ca: TestCA) -> None:
    data = (served.root / "file.bin").read_bytes()
    before = served.bytes_sent("/file.bin")
    status, headers, body = _get(served.url, "/file.bin", {"Range": "bytes=100-199"})
    assert (status, body) == (206, data[100:200])
    assert headers["Content-Range"] == f"bytes 100-199/{SIZE}"
    assert headers["Cache-Control"] == "max-age=60"
    assert "ETag" in headers and "Last-Modified" in headers

    request = urllib.request.Request(
        f"{served.https_url}/file.bin?tls", headers={"Range": f"bytes={SIZE - MIB}-"}
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT, context=tls_ca.ssl_context()) as resp:
        assert resp.status == 206
        assert resp.read() == data[SIZE - MIB :]

    lines = served.requests("/file.bin")[-2:]
    assert [(line.range, line.status, line.body_bytes, line.https) for line in lines] == [
        ("bytes=100-199", 206, 100, False),
        (f"bytes={SIZE - MIB}-", 206, MIB, True),
    ]
    assert all(line.completed for line in lines)
    assert lines[1].uri == "/file.bin?tls" and lines[1].path == "/file.bin"
    assert served.bytes_sent("/file.bin") == before + 100 + MIB


def test_nginx_logs_conditional_requests(served: Nginx) -> None:
    _, headers, _ = _get(served.url, "/file.bin", method="HEAD")
    status, _, body = _get(served.url, "/file.bin", {"If-None-Match": headers["ETag"]})
    assert (status, body) == (304, b"")
    status, _, _ = _get(
        served.url, "/file.bin", {"If-Modified-Since": headers["Last-Modified"]}, method="HEAD"
    )
    assert status == 304
    cond, since = served.requests("/file.bin")[-2:]
    assert (cond.status, cond.body_bytes, cond.if_none_match) == (304, 0, headers["ETag"])
    assert (since.method, since.if_modified_since) == ("HEAD", headers["Last-Modified"])
    assert since.range is None


def test_nginx_logs_what_it_wrote_for_a_killed_client(served: Nginx) -> None:
    child = subprocess.run(
        [sys.executable, "-c", KILLED_CLIENT, str(served.port), str(MIB)], timeout=30
    )
    assert child.returncode == -signal.SIGKILL
    served.wait_idle()
    (line,) = [line for line in served.requests("/file.bin") if line.uri.endswith("?killed")]
    assert not line.completed
    # At least what the client read; more by what sat in socket buffers; less than the file.
    assert MIB <= line.body_bytes < SIZE


def test_range_server_without_fault(tmp_path: Path) -> None:
    on_disk = tmp_path / "data"
    on_disk.write_bytes(DATA)
    with RangeServer(on_disk) as srv:
        status, headers, body = _get(srv.url, "/file.bin", {"Range": "bytes=10-19"})
        assert (status, body, headers["Content-Range"]) == (206, DATA[10:20], "bytes 10-19/262148")
        assert headers["Accept-Ranges"] == "bytes"
        assert _get(srv.url, "/file.bin", {"Range": "bytes=-4"})[2] == b"tail"
        status, headers, _ = _get(srv.url, "/file.bin", {"Range": "bytes=262148-"})
        assert (status, headers["Content-Range"]) == (416, "bytes */262148")
        status, headers, body = _get(srv.url, "/file.bin", method="HEAD")
        assert (status, headers["Content-Length"], body) == (200, str(len(DATA)), b"")
        assert _get(srv.url, "/file.bin", {"If-None-Match": srv.etag})[0] == 304
        assert _get(srv.url, "/other")[0] == 404
        # Keep-alive: two requests on one connection.
        conn = _conn(srv.url)
        for _ in range(2):
            conn.request("GET", "/file.bin", headers={"Range": "bytes=0-0"})
            assert conn.getresponse().read() == DATA[:1]
        conn.close()
        assert [(s.method, s.range, s.status) for s in srv.seen[:3]] == [
            ("GET", "bytes=10-19", 206),
            ("GET", "bytes=-4", 206),
            ("GET", "bytes=262148-", 416),
        ]
        wait_until(lambda: srv.seen[0].done, TIMEOUT, "the first answer to end")
        assert srv.seen[0].body_bytes == 10


def test_range_server_ignore_range() -> None:
    with RangeServer(DATA, fault="ignore-range") as srv:
        status, headers, body = _get(srv.url, "/file.bin", {"Range": "bytes=10-19"})
        assert (status, body) == (200, DATA)
        assert "Accept-Ranges" not in headers and "Content-Range" not in headers
        assert srv.seen[0].fault == "ignore-range"


def test_range_server_busy() -> None:
    with RangeServer(DATA, fault="busy", busy_count=2) as srv:
        for _ in range(2):
            status, headers, _ = _get(srv.url, "/file.bin", {"Range": "bytes=0-9"})
            assert (status, headers["Retry-After"]) == (503, "1")
        assert _get(srv.url, "/file.bin", {"Range": "bytes=0-9"})[:1] == (206,)
        assert [s.status for s in srv.seen] == [503, 503, 206]


def test_range_server_stalls_one_connection() -> None:
    with RangeServer(DATA, fault="stall-one", stall_bytes=1000) as srv:
        assert _get(srv.url, "/file.bin", {"Range": "bytes=0-99"})[2] == DATA[:100]
        stalled = _conn(srv.url)
        stalled.timeout = 0.5
        stalled.request("GET", "/file.bin", headers={"Range": "bytes=5000-"})
        resp = stalled.getresponse()
        assert resp.status == 206
        assert resp.read(1000) == DATA[5000:6000]
        with pytest.raises(TimeoutError):
            resp.read(1)  # nothing more comes
        assert srv.stalled.is_set()
        # Every other request, even another non-zero start, is served.
        assert _get(srv.url, "/file.bin", {"Range": "bytes=7000-7999"})[2] == DATA[7000:8000]
        stalled.close()
        wait_until(lambda: srv.seen[2].done, TIMEOUT, "the third answer to end")
        assert [(s.fault, s.done) for s in srv.seen] == [
            ("", True),
            ("stall-one", False),
            ("", True),
        ]


def test_range_server_etag_change() -> None:
    new = b"new content" * 100
    with RangeServer(DATA) as srv:
        _, old, _ = _get(srv.url, "/file.bin", {"Range": "bytes=0-9"})
        srv.replace(new)
        status, headers, body = _get(
            srv.url, "/file.bin", {"Range": "bytes=10-", "If-Range": old["ETag"]}
        )
        assert (status, body) == (200, new)  # the validator changed: the whole new body
        assert headers["ETag"] != old["ETag"] and headers["Last-Modified"] != old["Last-Modified"]
    inverted = bytes(255 - b for b in DATA)
    with RangeServer(DATA, fault="etag-change", change_after=1) as srv:
        _, first, body1 = _get(srv.url, "/file.bin", {"Range": "bytes=0-9"})
        _, second, body2 = _get(srv.url, "/file.bin", {"Range": "bytes=10-19"})
        _, third, _ = _get(srv.url, "/file.bin", {"Range": "bytes=20-29"})
        assert (body1, body2) == (DATA[:10], inverted[10:20])
        assert first["ETag"] != second["ETag"] == third["ETag"]


def _raw_get(port: int, range_: str) -> tuple[bytes, bytes]:
    """Headers and every byte after them until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(f"GET /file.bin HTTP/1.1\r\nHost: t\r\nRange: {range_}\r\n\r\n".encode())
        received = b""
        for _ in range(10000):
            data = sock.recv(65536)
            if not data:
                break
            received += data
    head, _, body = received.partition(b"\r\n\r\n")
    return head, body


def test_range_server_overlong() -> None:
    with RangeServer(DATA, fault="overlong", overlong_extra=100) as srv:
        head, body = _raw_get(srv.port, "bytes=0-99")
        assert b"Content-Length: 100" in head.split(b"\r\n")
        assert body == DATA[:100] + (b"OVERLONG" * 13)[:100]
        wait_until(lambda: srv.seen[0].done, TIMEOUT, "the answer to end")
        assert (srv.seen[0].fault, srv.seen[0].body_bytes) == ("overlong", 200)


def test_range_server_wrong_content_range() -> None:
    with RangeServer(DATA, fault="wrong-content-range", shift=1) as srv:
        status, headers, body = _get(srv.url, "/file.bin", {"Range": "bytes=10-19"})
        assert (status, headers["Content-Range"], body) == (206, "bytes 11-20/262148", DATA[11:21])
        status, headers, body = _get(srv.url, "/file.bin", {"Range": "bytes=262140-"})
        assert (headers["Content-Range"], body) == ("bytes 262139-262146/262148", DATA[-9:-1])
        assert _get(srv.url, "/file.bin")[2] == DATA
        assert [s.fault for s in srv.seen] == ["wrong-content-range"] * 2 + [""]


def test_stall_is_released_when_the_server_stops() -> None:
    srv = RangeServer(DATA, fault="stall-one", stall_bytes=10)
    conn = _conn(srv.url)
    try:
        conn.request("GET", "/file.bin", headers={"Range": "bytes=100-"})
        resp = conn.getresponse()
        wait_until(srv.stalled.is_set, TIMEOUT, "the stall")
        srv.stop()
        assert len(resp.read(10)) == 10
        with pytest.raises(http.client.IncompleteRead):
            resp.read()  # closed at stop, short of its Content-Length
    finally:
        conn.close()
        srv.stop()
