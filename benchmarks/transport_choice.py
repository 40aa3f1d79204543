"""Which HTTP stack carries segment bodies: CPU and wall seconds per GiB, in-process.

One file (default 1 GiB) from a local nginx over HTTPS (tests/support/nginx.py, a throwaway
CA), fetched as 8 MiB Range requests by 8 connections, each body written with pwritev
(fetchd.store.cas.pwrite_all, 256 KiB at a time) into one file through an fd per worker:
what a segmented download does, without the hashing (the same for every candidate). Each
round runs every candidate once, interleaved; CPU is getrusage(RUSAGE_SELF) user+sys of this
process (all its threads; nginx is another process), wall is perf_counter. The first round's
file of each candidate is hashed (outside the timing) and must match.

Candidates:

- ``httpclient``: http.client on threads, public API only (``HTTPResponse.readinto`` into a
  reused buffer);
- ``h11``: h11 driving an SSLSocket on threads (``recv_into`` a reused buffer, then
  ``receive_data``; the Data events carry the body);
- ``ownhead``: a small response-head reader of our own (``http.client.parse_headers``, public)
  on an SSLSocket, then ``recv_into`` straight into the reused buffer;
- ``aiohttp``: aiohttp on the event loop (one session, 8 tasks, ``iter_any`` pieces written
  with pwritev on the loop);
- ``fetchd``: fetchd.sources.transport (the transport chosen), on the transfer executor;
- ``baseline``: the old ``fetchd.sources.ranges.ThreadedRanges`` (reads ``sock._sslobj``),
  while that module exists.

    python benchmarks/transport_choice.py [--rounds N] [--size-mib N] [--only a,b]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import http.client
import importlib
import io
import os
import resource
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fetchd.store.cas import WRITE_CHUNK, pwrite_all  # noqa: E402
from tests.support.nginx import make_file, start_nginx  # noqa: E402
from tests.support.tls import make_ca  # noqa: E402

MIB = 1 << 20
SEGMENT = 8 * MIB
CONNECTIONS = 8


class Job:
    """The segments of one download, handed out to the workers in order."""

    def __init__(self, host: str, port: int, path: str, size: int, out: Path, ctx: Any) -> None:
        self.host, self.port, self.path, self.size, self.out, self.ctx = (
            host,
            port,
            path,
            size,
            out,
            ctx,
        )
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> tuple[int, int] | None:
        with self._lock:
            if self._next >= self.size:
                return None
            start = self._next
            self._next = min(self.size, start + SEGMENT)
            return start, self._next

    def segments(self) -> Iterator[tuple[int, int]]:
        while (seg := self.take()) is not None:
            yield seg

    def request(self, start: int, end: int) -> bytes:
        return (
            f"GET {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Range: bytes={start}-{end - 1}\r\nUser-Agent: bench\r\n\r\n"
        ).encode()

    def connect(self) -> ssl.SSLSocket:
        raw = socket.create_connection((self.host, self.port), 30)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.ctx.wrap_socket(raw, server_hostname=self.host)


def on_threads(worker: Callable[[Job], None]) -> Callable[[Job], None]:
    def run(job: Job) -> None:
        threads = [threading.Thread(target=worker, args=(job,)) for _ in range(CONNECTIONS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return run


@on_threads
def httpclient(job: Job) -> None:
    conn = http.client.HTTPSConnection(job.host, job.port, timeout=30, context=job.ctx)
    fd = os.open(job.out, os.O_WRONLY)
    buf = bytearray(WRITE_CHUNK)
    view = memoryview(buf)
    try:
        for start, end in job.segments():
            conn.request("GET", job.path, headers={"Range": f"bytes={start}-{end - 1}"})
            resp = conn.getresponse()
            assert resp.status == 206, resp.status
            at = start
            while at < end:
                n = resp.readinto(view[: min(len(view), end - at)])
                if not n:
                    raise ConnectionError("short body")
                pwrite_all(fd, [view[:n]], at)
                at += n
    finally:
        os.close(fd)
        conn.close()


@on_threads
def h11_threads(job: Job) -> None:
    import h11

    sock = job.connect()
    conn = h11.Connection(h11.CLIENT)
    fd = os.open(job.out, os.O_WRONLY)
    buf = bytearray(WRITE_CHUNK)
    view = memoryview(buf)
    try:
        for start, end in job.segments():
            if conn.our_state is h11.DONE:
                conn.start_next_cycle()
            req = h11.Request(
                method="GET",
                target=job.path,
                headers=[("Host", f"{job.host}:{job.port}"), ("Range", f"bytes={start}-{end - 1}")],
            )
            sock.sendall(conn.send(req) + conn.send(h11.EndOfMessage()))
            at = start
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    n = sock.recv_into(view)
                    conn.receive_data(bytes(view[:n]) if n else b"")
                    continue
                if isinstance(event, h11.Response):
                    assert event.status_code == 206
                elif isinstance(event, h11.Data):
                    pwrite_all(fd, [event.data], at)
                    at += len(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert at == end
    finally:
        os.close(fd)
        sock.close()


def read_head(sock: ssl.SSLSocket, buf: bytearray) -> tuple[int, http.client.HTTPMessage, bytes]:
    """Status, headers and the body bytes that came with them."""
    view = memoryview(buf)
    got = 0
    while True:
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError("closed before the head")
        got += n
        end = buf.find(b"\r\n\r\n", 0, got)
        if end >= 0:
            break
    head = bytes(view[: end + 4])
    rest = bytes(view[end + 4 : got])
    line, _, fields = head.partition(b"\r\n")
    status = int(line.split()[1])
    return status, http.client.parse_headers(io.BytesIO(fields)), rest


@on_threads
def ownhead(job: Job) -> None:
    sock = job.connect()
    fd = os.open(job.out, os.O_WRONLY)
    buf = bytearray(WRITE_CHUNK)
    view = memoryview(buf)
    try:
        for start, end in job.segments():
            sock.sendall(job.request(start, end))
            status, headers, rest = read_head(sock, buf)
            assert status == 206 and int(headers["Content-Length"]) == end - start
            at = start
            if rest:
                pwrite_all(fd, [rest], at)
                at += len(rest)
            while at < end:
                want = min(len(view), end - at)
                got = 0
                while got < want:
                    n = sock.recv_into(view[got:want])
                    if not n:
                        raise ConnectionError("short body")
                    got += n
                pwrite_all(fd, [view[:got]], at)
                at += got
    finally:
        os.close(fd)
        sock.close()


def aiohttp_loop(job: Job) -> None:
    import aiohttp

    async def main() -> None:
        fd = os.open(job.out, os.O_WRONLY)
        url = f"https://{job.host}:{job.port}{job.path}"
        conn = aiohttp.TCPConnector(limit=CONNECTIONS, ssl=job.ctx)
        try:
            async with aiohttp.ClientSession(connector=conn, read_bufsize=1 << 20) as session:

                async def worker() -> None:
                    for start, end in job.segments():
                        headers = {"Range": f"bytes={start}-{end - 1}"}
                        async with session.get(url, headers=headers) as resp:
                            assert resp.status == 206
                            at = start
                            async for piece in resp.content.iter_any():
                                pwrite_all(fd, [piece], at)
                                at += len(piece)
                            assert at == end

                async with asyncio.TaskGroup() as tg:
                    for _ in range(CONNECTIONS):
                        tg.create_task(worker())
        finally:
            os.close(fd)

    asyncio.run(main())


class _Sink:
    def __init__(self, path: Path) -> None:
        self.data_path = path
        self.write_lock = threading.Lock()

    def hashes_at(self, offset: int) -> bool:
        return False

    def record(self, offset: int, n: int, pieces: object = None) -> None:
        pass


def fetchd_transport(job: Job) -> None:
    from fetchd.config import Config
    from fetchd.sources.base import Location
    from fetchd.sources.transport import Transfer, Transport

    config = Config(store=job.out.parent)
    location = Location(f"https://{job.host}:{job.port}{job.path}", {})
    transport = Transport(config)
    sink = _Sink(job.out)

    def worker() -> None:
        for start, end in job.segments():
            t = Transfer(start, end)
            resp = transport.open(location, start, end, t)
            assert resp.head.status == 206, resp.head.status
            try:
                resp.read_into(t, sink, lambda n: None)
            finally:
                resp.release()
            assert t.cursor == end, (t.cursor, end)

    try:
        on_threads(lambda _job: worker())(job)
    finally:
        transport.close()


def baseline(job: Job) -> None:
    from fetchd.config import Config

    # The old module exists only in checkouts before issue 11 (run with one on PYTHONPATH).
    old = importlib.import_module("fetchd.sources.ranges")
    Segment, ThreadedRanges = old.Segment, old.ThreadedRanges
    config = Config(store=job.out.parent)
    url = f"https://{job.host}:{job.port}{job.path}"
    ranges = ThreadedRanges(url, config, "bench")
    sink: Any = _Sink(job.out)

    def worker() -> None:
        for start, end in job.segments():
            ranges.fetch(Segment(start, end, start), sink, job.size, None, lambda n: None, bool)
        ranges._drop()

    on_threads(lambda _job: worker())(job)


CANDIDATES: dict[str, Callable[[Job], None]] = {
    "httpclient": httpclient,
    "h11": h11_threads,
    "ownhead": ownhead,
    "aiohttp": aiohttp_loop,
    "fetchd": fetchd_transport,
    "baseline": baseline,
}


def available(name: str) -> bool:
    module = {
        "h11": "h11",
        "fetchd": "fetchd.sources.transport",
        "baseline": "fetchd.sources.ranges",
    }
    try:
        if name in module:
            importlib.import_module(module[name])
    except ImportError:
        return False
    return True


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 * MIB):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--only", default="", help="comma list of candidates")
    args = parser.parse_args(argv)
    names = [n for n in CANDIDATES if available(n)]
    if args.only:
        names = [n for n in args.only.split(",") if n in names]
    work = Path(tempfile.mkdtemp(prefix="fetchd-bench-transport-", dir="/tmp"))
    try:
        root = work / "root"
        root.mkdir()
        size = args.size_mib * MIB
        digest = make_file(root / "file.bin", size, seed=3)
        ca = make_ca(work / "ca")
        ctx = ssl.create_default_context(cafile=str(ca.ca_path))
        os.environ["SSL_CERT_FILE"] = str(ca.ca_path)  # for fetchd's ssl_context
        with start_nginx(work / "nginx", root, tls=ca.issue_server(work / "tls")) as nginx:
            assert nginx.tls_port is not None
            cpu: dict[str, list[float]] = {n: [] for n in names}
            wall: dict[str, list[float]] = {n: [] for n in names}
            for round_ in range(1, args.rounds + 1):
                for name in names:
                    out = work / f"{name}.out"
                    out.write_bytes(b"")
                    job = Job("127.0.0.1", nginx.tls_port, "/file.bin", size, out, ctx)
                    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                    CANDIDATES[name](job)
                    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
                    c = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
                    gib = size / (1 << 30)
                    cpu[name].append(c / gib)
                    wall[name].append((t1 - t0) / gib)
                    if round_ == 1 and sha256(out) != digest:
                        print(f"{name}: WRONG BYTES", flush=True)
                        return 1
                    out.unlink()
                    print(
                        f"round {round_} {name:<10} cpu {c / gib:5.2f} s/GiB  "
                        f"wall {(t1 - t0) / gib:5.2f} s/GiB",
                        flush=True,
                    )
            print("medians (per GiB): name, cpu s, wall s")
            for name in names:
                print(
                    f"  {name:<10} {statistics.median(cpu[name]):5.2f} "
                    f"{statistics.median(wall[name]):5.2f}"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
