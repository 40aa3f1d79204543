"""The segment scheduler (fetchd.sources.segments) and its transport, driven in-process.

Each test runs SegmentedDownload on a real SegmentedIngest of a real Store in tmp_path,
against the real nginx (tests/support/nginx.py: HTTPS with a test CA, its access log says
what it sent) and, where a misbehaving server is needed, a few lines of our own below (a
mirror that stalls halfway, a redirector) or tests/support/rangefaults.py. Outcomes: the
blob committed under its digest, what each source placed (RangeSource.wrote), what each
server logged, the error raised, and which threads still run fetchd code.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import hashlib
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fetchd.config import Config
from fetchd.errors import BlobNotFound, FetchdError
from fetchd.model import Digest
from fetchd.sources.base import Location
from fetchd.sources.segments import SEGMENT, RangeSource, SegmentedDownload
from fetchd.store.cas import SegmentedIngest, Store
from tests.support.locks import CountingLock
from tests.support.nginx import Nginx, NginxLogLine, make_file, start_nginx
from tests.support.rangefaults import RangeServer
from tests.support.servers import QuietHandler, ServerThread
from tests.support.tls import TestCA

MIB = 1 << 20
SIZE = 48 * MIB + 4321  # several segments, not a multiple of one
REPO = Path(__file__).resolve().parent.parent
PINNED_NAME = "blobs.fetchd.test"  # resolvable only through Config.resolve


@dataclass(frozen=True)
class Served:
    nginx: Nginx
    data: bytes
    digest: str
    ca: Path

    def url(self, test: str, path: str = "/file.bin") -> str:
        return f"{self.nginx.https_url}{path}?t={test}"

    def lines(self, test: str) -> list[NginxLogLine]:
        return [line for line in self.nginx.requests() if line.uri.endswith(f"?t={test}")]

    def sent(self, test: str) -> int:
        return sum(line.body_bytes for line in self.lines(test))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tls_ca: TestCA) -> Iterator[Served]:
    """SIZE pseudo-random bytes at /file.bin, from nginx over HTTPS; its certificate also
    names PINNED_NAME (for --resolve)."""
    base = tmp_path_factory.mktemp("segments")
    (base / "root").mkdir()
    digest = make_file(base / "root" / "file.bin", SIZE, seed=11)
    data = (base / "root" / "file.bin").read_bytes()
    tls = tls_ca.issue_server(base / "tls", names=("127.0.0.1", "localhost", PINNED_NAME))
    try:
        with start_nginx(base / "nginx", base / "root", tls=tls) as nginx:
            yield Served(nginx, data, digest, tls_ca.ca_path)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(autouse=True)
def _trust_the_test_ca(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(served.ca))


def source(url: str, tier: int = 0, headers: dict[str, str] | None = None) -> RangeSource:
    async def locate() -> Location:
        return Location(url, headers or {})

    return RangeSource(url.rsplit("/", 1)[-1], locate, tier)


async def download(
    store_dir: Path, digest: str, size: int | None, sources: Sequence[RangeSource], **cfg: object
) -> Path:
    """Run the download into a fresh ingest, commit it: the blob's path."""
    store = Store.open(store_dir)
    config = Config(store=store_dir, **cfg)  # type: ignore[arg-type]
    async with store.ingest(Digest.parse(digest), size, segmented=True) as ingest:
        assert isinstance(ingest, SegmentedIngest)
        await SegmentedDownload(ingest, sources, config).run()
        await ingest.commit()
    return store.blob_path(Digest.parse(digest))


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --- misbehaving servers of other people, in a few lines --------------------------------


class _StallHandler(QuietHandler):
    def do_GET(self) -> None:
        owner: StallingMirror = self.owner
        start, end = 0, len(owner.data) - 1
        header = self.headers.get("Range", "")
        if header.startswith("bytes="):
            a, _, b = header.removeprefix("bytes=").partition("-")
            start, end = int(a), min(int(b) if b else end, end)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(owner.data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        at = start
        try:
            while at <= end:
                if not owner.take(64 << 10):
                    owner.stalled.set()
                    owner.stopping.wait(60)  # a stall: nothing until the test ends
                    self.close_connection = True
                    return
                chunk = owner.data[at : min(at + (64 << 10), end + 1)]
                self.wfile.write(chunk)
                at += len(chunk)
        except OSError:
            self.close_connection = True


class StallingMirror(ServerThread):
    """Serves `data` with Range until it has sent `budget` body bytes in all; from then on
    every response stalls (headers, then nothing)."""

    def __init__(self, data: bytes, budget: int) -> None:
        self.data = data
        self.budget = budget
        self.sent = 0
        self.stalled = threading.Event()
        self._lock = threading.Lock()
        super().__init__(_StallHandler)

    def take(self, n: int) -> bool:
        with self._lock:
            if self.sent >= self.budget:
                return False
            self.sent += n
            return True


class _RedirectHandler(QuietHandler):
    def do_GET(self) -> None:
        owner: Redirector = self.owner
        owner.seen.append(self.headers.get("Authorization"))
        self.send_response(302)
        self.send_header("Location", owner.target)
        self.send_header("Content-Length", "0")
        self.end_headers()


class Redirector(ServerThread):
    """Answers every GET with 302 to `target`; `seen` lists the Authorization headers."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.seen: list[str | None] = []
        super().__init__(_RedirectHandler)


# --- tests ---------------------------------------------------------------------------------


def test_ranges_over_https_fill_the_ingest_and_the_commit_verifies(
    served: Served, tmp_path: Path
) -> None:
    src = source(served.url("plain"))

    blob = asyncio.run(download(tmp_path / "store", served.digest, SIZE, [src]))

    assert blob.read_bytes() == served.data
    assert src.wrote == SIZE
    lines = served.lines("plain")
    assert len(lines) >= 3 and {line.status for line in lines} == {206}
    assert all(line.range and line.user_agent.startswith("fetchd/") for line in lines)
    assert served.sent("plain") <= SIZE + 2 * SEGMENT  # stolen halves end answers early


def test_tier_1_is_not_asked_while_tier_0_serves(served: Served, tmp_path: Path) -> None:
    best, spare = source(served.url("tier0")), source(served.url("tier1"), tier=1)

    blob = asyncio.run(download(tmp_path / "store", served.digest, SIZE, [spare, best]))

    assert blob.read_bytes() == served.data
    assert (best.wrote, spare.wrote) == (SIZE, 0)
    assert served.lines("tier1") == []
    assert served.lines("tier0")


def test_a_source_answering_404_is_skipped_and_the_next_tier_serves_all(
    served: Served, tmp_path: Path
) -> None:
    missing = source(served.url("404", path="/not-here.bin"))
    origin = source(served.url("after-404"), tier=1)

    blob = asyncio.run(download(tmp_path / "store", served.digest, SIZE, [missing, origin]))

    assert blob.read_bytes() == served.data
    assert (missing.wrote, origin.wrote) == (0, SIZE)
    assert [line.status for line in served.lines("404")] == [404]  # asked once, not retried


def test_every_source_answering_404_is_blob_not_found(served: Served, tmp_path: Path) -> None:
    a = source(served.url("gone-a", path="/gone.bin"))
    b = source(served.url("gone-b", path="/gone.bin"), tier=1)

    with pytest.raises(BlobNotFound):
        asyncio.run(download(tmp_path / "store", served.digest, SIZE, [a, b]))

    assert [line.status for line in served.lines("gone-a")] == [404]
    assert [line.status for line in served.lines("gone-b")] == [404]


def test_a_mirror_stalling_halfway_hands_the_rest_to_the_origin_in_bounded_time(
    served: Served, tmp_path: Path
) -> None:
    """The issue's acceptance case, smaller: the mirror stalls after half the blob; the pull
    completes within the stall timeout + a few seconds, the origin sends at most what the
    mirror did not place + one segment, and what the mirror placed is kept."""
    stall = 2.0
    with StallingMirror(served.data, budget=SIZE // 2) as mirror:
        near = source(f"{mirror.url}/file.bin")
        origin = source(served.url("hedge"), tier=1)
        started = time.monotonic()

        blob = asyncio.run(
            # attempts=100: a stalled mirror must be dropped at once, not retried
            download(
                tmp_path / "store",
                served.digest,
                SIZE,
                [near, origin],
                stall_timeout=stall,
                attempts=100,
            )
        )
        elapsed = time.monotonic() - started
        assert mirror.stalled.is_set()

    assert blob.read_bytes() == served.data
    assert elapsed < stall + 10.0, f"took {elapsed:.1f} s with a {stall:g} s stall timeout"
    assert near.wrote >= SIZE // 4, f"the mirror's bytes were not kept ({near.wrote})"
    assert near.wrote + origin.wrote == SIZE
    sent = served.sent("hedge")
    assert sent <= SIZE - near.wrote + SEGMENT, f"origin sent {sent}, mirror placed {near.wrote}"


def test_resolve_pins_the_address_while_tls_verifies_the_name(
    served: Served, tmp_path: Path
) -> None:
    port = served.nginx.tls_port
    assert port is not None
    url = f"https://{PINNED_NAME}:{port}/file.bin?t=pinned"

    blob = asyncio.run(
        download(
            tmp_path / "store",
            served.digest,
            SIZE,
            [source(url)],
            resolve={(PINNED_NAME, port): "127.0.0.1"},
        )
    )

    assert blob.read_bytes() == served.data
    assert served.lines("pinned") and all(line.https for line in served.lines("pinned"))


def test_a_redirect_to_another_origin_drops_authorization_and_is_followed_once(
    tmp_path: Path,
) -> None:
    data = SIZE // 2 * b"r" + b"x" * (SIZE - SIZE // 2)
    with RangeServer(data) as target, Redirector(target.file_url) as redirector:
        src = source(f"{redirector.url}/blob", headers={"Authorization": "Bearer s3cret"})

        blob = asyncio.run(download(tmp_path / "store", sha256(data), SIZE, [src]))
        gets = [s for s in target.seen if s.method == "GET"]

    assert blob.read_bytes() == data
    assert redirector.seen == ["Bearer s3cret"]  # the probe; the segments went straight on
    assert len(gets) >= 3 and all("Authorization" not in s.headers for s in gets)


def test_an_ipv6_literal_is_sent_as_a_bracketed_host(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    digest = make_file(root / "v6.bin", 20 * MIB + 7, seed=12)
    with start_nginx(tmp_path / "nginx", root, ipv6=True) as nginx:
        src = source(f"http://[::1]:{nginx.port}/v6.bin")
        blob = asyncio.run(download(tmp_path / "store", digest, 20 * MIB + 7, [src]))
        lines = nginx.requests("/v6.bin")

    assert blob.stat().st_size == 20 * MIB + 7
    assert len(lines) >= 2 and {line.status for line in lines} == {206}  # not a 400


def test_a_server_ignoring_range_gives_one_stream_and_its_validators(tmp_path: Path) -> None:
    data = bytes(range(256)) * (12 * MIB // 256)
    with RangeServer(data, fault="ignore-range") as server:
        store = Store.open(tmp_path / "store")

        async def run() -> dict[str, object]:
            config = Config(store=tmp_path / "store")
            async with store.ingest(None, None, key="url-test", segmented=True) as ingest:
                assert isinstance(ingest, SegmentedIngest)
                await SegmentedDownload(ingest, [source(server.file_url)], config).run()
                await ingest.commit()
                assert ingest.digest == Digest.parse(sha256(data))
                return dict(ingest.meta)

        meta = asyncio.run(run())
        gets = [(s.status, s.body_bytes) for s in server.seen if s.method == "GET"]

    assert gets == [(200, len(data))]
    assert meta["etag"] == server.etag and meta["size"] == len(data)


def fetchd_frames() -> dict[str, list[str]]:
    """Threads whose stack is inside fetchd's transfer code now: name -> functions."""
    busy: dict[str, list[str]] = {}
    names = {t.ident: t.name for t in threading.enumerate()}
    main = threading.main_thread().ident
    for ident, frame in sys._current_frames().items():
        if ident == main:
            continue
        stack = []
        f = frame
        while f is not None:
            path = f.f_code.co_filename
            if path.endswith(("fetchd/sources/transport.py", "fetchd/sources/segments.py")):
                stack.append(f.f_code.co_name)
            f = f.f_back
        if stack:
            busy[names.get(ident, str(ident))] = stack
    return busy


def test_a_cancelled_download_returns_only_after_its_threads_stopped(
    served: Served, tmp_path: Path
) -> None:
    """Cancel run() while every transfer is blocked in a read of a stalled mirror (a
    stall timeout of 60 s): when the cancellation has propagated, no thread runs the
    transport any more, and nothing is written into the ingest afterwards."""
    with StallingMirror(served.data, budget=3 * MIB) as mirror:
        store = Store.open(tmp_path / "store")
        after: dict[str, object] = {}

        async def run() -> None:
            config = Config(store=tmp_path / "store", stall_timeout=60.0)
            async with store.ingest(Digest.parse(served.digest), SIZE, segmented=True) as ingest:
                assert isinstance(ingest, SegmentedIngest)
                task = asyncio.create_task(
                    SegmentedDownload(ingest, [source(f"{mirror.url}/f")], config).run()
                )
                deadline = time.monotonic() + 20
                while not (mirror.stalled.is_set() and fetchd_frames()):
                    assert time.monotonic() < deadline, "the mirror never stalled a transfer"
                    await asyncio.sleep(0.05)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                after["busy"] = fetchd_frames()
                after["ranges"] = list(ingest.ranges)

        asyncio.run(run())

    assert after["busy"] == {}, f"still in the transport after the cancel: {after['busy']}"
    assert after["ranges"], "the bytes placed before the cancel were not kept"


# --- no private state of the standard library ---------------------------------------------

#: attributes of ssl / socket / http.client objects that are not their public API
PRIVATE_STDLIB = {"_sslobj", "_sock", "fp", "_method", "_close_conn", "_safe_read", "_tunnel"}
#: public-looking attributes of http.client.HTTPResponse that only it may assign
ASSIGNED_STATE = {"length", "chunked", "chunk_left", "will_close"}


def stdlib_state_uses(path: Path) -> list[str]:
    found = []
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_STDLIB:
            found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        if isinstance(node, ast.Assign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Attribute) and t.attr in ASSIGNED_STATE:
                    owner = t.value.id if isinstance(t.value, ast.Name) else ""
                    if owner not in ("self", "cls"):
                        found.append(f"{path.name}:{node.lineno}: .{t.attr} =")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and node.args[1].value in PRIVATE_STDLIB | ASSIGNED_STATE
        ):
            found.append(f"{path.name}:{node.lineno}: {node.func.id}(…, {node.args[1].value!r})")
    return found


def test_no_module_of_fetchd_uses_private_state_of_the_standard_library() -> None:
    found = [
        hit for path in sorted((REPO / "fetchd").rglob("*.py")) for hit in stdlib_state_uses(path)
    ]
    assert found == []


def test_an_interrupted_tls_transfer_records_only_body_bytes(
    served: Served, tmp_path: Path
) -> None:
    """Cut a transfer over TLS from another thread mid-body (as a stall, a steal or a
    slow-cut does), many times at different points: every byte the transport recorded
    is the body's. (SSLSocket.shutdown detached the SSL object first, and a read racing
    it took the kernel's queued ciphertext as body bytes.)"""
    from fetchd.sources.transport import Transfer, Transport

    class Recorder:
        def __init__(self, path: Path) -> None:
            self.data_path = path
            self.write_lock = threading.Lock()
            self.ranges: list[tuple[int, int]] = []

        def hashes_at(self, offset: int) -> bool:
            return False

        def record(self, offset: int, n: int, pieces: object = None) -> None:
            self.ranges.append((offset, n))

    bad = []
    for run in range(6):
        out = tmp_path / f"out{run}"
        out.write_bytes(b"")
        transport = Transport(Config(store=tmp_path))
        transfer = Transfer(0, SIZE)
        recorder = Recorder(out)
        resp = transport.open(Location(served.url("tls-cut"), {}), 0, SIZE, transfer)
        at = (SIZE // 4) + run * 977

        def cut(transfer: Transfer = transfer, at: int = at) -> None:
            deadline = time.monotonic() + 30
            while transfer.cursor < at and time.monotonic() < deadline:
                time.sleep(0.0002)
            transfer.interrupt()

        cutter = threading.Thread(target=cut)
        cutter.start()
        try:
            resp.read_into(transfer, recorder, lambda n: None)
        except Exception:  # Interrupted, or a lost connection: either is fine
            pass
        finally:
            cutter.join(30)
            resp.close()
            transport.close()
        got = out.read_bytes()
        wrong = [(o, n) for o, n in recorder.ranges if got[o : o + n] != served.data[o : o + n]]
        if wrong:
            bad.append((run, wrong[:3]))
        out.unlink()
    assert bad == [], f"recorded bytes that are not the body's: {bad}"


# --- review findings (R2): servers that misbehave in one way each ---------------------------


class _ScriptHandler(QuietHandler):
    def do_GET(self) -> None:
        owner: Scripted = self.owner
        with owner.lock:
            owner.count += 1
            n = owner.count
        rng = None
        header = self.headers.get("Range", "")
        if header.startswith("bytes="):
            a, _, b = header.removeprefix("bytes=").partition("-")
            rng = (int(a), int(b) if b else None)
        try:
            if owner.answer(owner, self, rng, n) is False:
                self.close_connection = True
        except OSError:
            self.close_connection = True


Answer = Callable[["Scripted", _ScriptHandler, "tuple[int, int | None] | None", int], "bool | None"]


class Scripted(ServerThread):
    """A server whose answer to the n-th GET (1-based) is `answer(server, handler, range,
    n)`, written raw to `handler.wfile`; False closes the connection afterwards. `sent`
    counts the body bytes written by send_range."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.count = 0
        self.sent = 0
        self.lock = threading.Lock()
        super().__init__(_ScriptHandler)

    @property
    def file_url(self) -> str:
        return f"{self.url}/file.bin"

    def send_range(
        self,
        out: _ScriptHandler,
        data: bytes,
        rng: tuple[int, int | None] | None,
        etag: str | None = None,
        extra: bytes = b"",
        rate: float | None = None,
        status: int = 206,
    ) -> None:
        """`data`'s range `rng` (the whole with status 200), at `rate` B/s if given, then
        `extra` (bytes past the body)."""
        a, b = rng if rng is not None and status == 206 else (0, None)
        b = len(data) - 1 if b is None else min(b, len(data) - 1)
        body = data[a : b + 1]
        head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
        if status == 206:
            head += f"Content-Range: bytes {a}-{b}/{len(data)}\r\n"
        if etag:
            head += f'ETag: "{etag}"\r\n'
        if rate is None:
            out.wfile.write(head.encode() + b"\r\n" + body + extra)
            with self.lock:
                self.sent += len(body)
            return
        out.wfile.write(head.encode() + b"\r\n")
        step = max(1, int(rate / 20))
        for at in range(0, len(body), step):  # bounded by the body; ends when the test does
            if self.stopping.wait(step / rate):
                return
            out.wfile.write(body[at : at + step])
            with self.lock:
                self.sent += len(body[at : at + step])


def run_download(
    store_dir: Path,
    sources: Sequence[RangeSource],
    digest: str | None,
    size: int | None,
    bound: float = 60.0,
    prefill: bytes = b"",
    **cfg: object,
) -> Digest:
    """Like download(), for a digest or a plain URL (digest None: key "url"), after placing
    `prefill` at 0 in an earlier run; fails if it takes longer than `bound` s (a hang).
    Returns the digest of what was committed."""
    store = Store.open(store_dir)
    config = Config(store=store_dir, **cfg)  # type: ignore[arg-type]
    expected = Digest.parse(digest) if digest else None

    async def run() -> Digest:
        if prefill:
            async with store.ingest(expected, size, key="url", segmented=True) as ingest:
                await ingest.write_at(0, [prefill])
        async with store.ingest(expected, size, key="url", segmented=True) as ingest:
            assert isinstance(ingest, SegmentedIngest)
            assert ingest.offset == len(prefill)
            async with asyncio.timeout(bound):
                await SegmentedDownload(ingest, sources, config).run()
            await ingest.commit()
            assert ingest.digest is not None
            return ingest.digest

    return asyncio.run(run())


@pytest.mark.parametrize("mode", ["ranges", "one-stream"])
def test_a_uniformly_slow_mirror_is_raced_by_the_next_tier(
    served: Served, tmp_path: Path, mode: str
) -> None:
    """R2 #2: a mirror sending every answer at 16 KiB/s (on all its connections, so it is
    its own median; ignoring Range in one-stream) while the origin is healthy: the origin
    completes the blob; the mirror's bytes are kept."""
    status = 206 if mode == "ranges" else 200

    def trickle(srv: Scripted, out: _ScriptHandler, rng: object, n: int) -> bool:
        srv.send_range(out, served.data, rng, rate=16 << 10, status=status)  # type: ignore[arg-type]
        return False

    with Scripted(trickle) as mirror:
        near = source(mirror.file_url)
        origin = source(served.url(f"floor-{mode}"), tier=1)
        got = run_download(tmp_path / "store", [near, origin], served.digest, SIZE)

    assert str(got) == served.digest
    assert near.wrote < SIZE // 8 and near.wrote + origin.wrote == SIZE
    assert served.sent(f"floor-{mode}") <= SIZE - near.wrote + SEGMENT


def test_the_only_source_is_kept_however_slow(tmp_path: Path) -> None:
    """R2 #2's other half: with nothing to race it with, a source below the speed floor
    for longer than FLOOR_FOR is not cut."""
    from fetchd.sources.segments import FLOOR_FOR, LOWEST_SPEED

    data = bytes(range(256)) * (int(LOWEST_SPEED * (FLOOR_FOR + 1.5) / 2) // 256)

    def trickle(srv: Scripted, out: _ScriptHandler, rng: object, n: int) -> None:
        srv.send_range(out, data, rng, rate=LOWEST_SPEED / 2)  # type: ignore[arg-type]

    with Scripted(trickle) as only:
        src = source(only.file_url)
        got = run_download(tmp_path / "store", [src], sha256(data), len(data))

    assert str(got) == sha256(data)
    assert src.wrote == len(data) and only.count == 1  # one request, never cut


@pytest.mark.parametrize("mode", ["interim-for-ever", "dripping-head"])
def test_a_mirror_that_never_finishes_its_head_is_dropped_for_the_next_tier(
    served: Served, tmp_path: Path, mode: str
) -> None:
    """R2 #3: endless 100 Continue answers, or a head dripped a byte at a time, reset the
    per-recv stall timeout for ever; the request's budget (4 stall timeouts) and the
    bound on interim answers end it, and the origin serves the blob."""

    def silent(srv: Scripted, out: _ScriptHandler, rng: object, n: int) -> bool:
        if mode == "dripping-head":
            out.wfile.write(b"HTTP/1.1 206 Partial\r\nX-Drip: ")
        for _ in range(2000):  # 10 min at most; ends when the test does
            out.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n" if mode.startswith("i") else b"a")
            if srv.stopping.wait(0.3):
                break
        return False

    with Scripted(silent) as mirror:
        near = source(mirror.file_url)
        origin = source(served.url(f"head-{mode}"), tier=1)
        got = run_download(
            tmp_path / "store", [near, origin], served.digest, SIZE, stall_timeout=2.0
        )

    assert str(got) == served.digest
    assert (near.wrote, origin.wrote) == (0, SIZE)
    assert mirror.count == 1  # stalled, with the origin alive: dropped at once


def test_a_mirror_whose_etag_changes_between_segments_does_not_fail_a_known_digest(
    served: Served, tmp_path: Path
) -> None:
    """R2 #4: a mirror behind two balanced nodes with different ETags; the digest is
    known, so the digest is the validator: the pull completes, nothing restarts."""

    def balanced(srv: Scripted, out: _ScriptHandler, rng: object, n: int) -> None:
        srv.send_range(out, served.data, rng, etag=f"node-{n % 2}")  # type: ignore[arg-type]

    with Scripted(balanced) as mirror:
        near = source(mirror.file_url)
        origin = source(served.url("etag-nodes"), tier=1)
        got = run_download(tmp_path / "store", [near, origin], served.digest, SIZE)

    assert str(got) == served.digest
    assert near.wrote == SIZE and mirror.count >= 3
    assert mirror.sent <= SIZE + 2 * SEGMENT  # never started over


def test_an_inconsistent_peer_of_a_url_is_dropped_not_the_download(
    served: Served, tmp_path: Path
) -> None:
    """R2 #4, no digest: a URL (nginx) and a --mirror URL whose ETag changes with every
    answer; the URL validated the download, so only the inconsistent mirror is dropped."""

    def balanced(srv: Scripted, out: _ScriptHandler, rng: object, n: int) -> None:
        srv.send_range(out, served.data, rng, etag=f"node-{n}")  # type: ignore[arg-type]

    with Scripted(balanced) as mirror:
        flaky = source(mirror.file_url)
        url = source(served.url("etag-peer"))
        # the probe (which validates) goes to the second of two equal sources: the URL
        got = run_download(tmp_path / "store", [flaky, url], None, None)

    assert str(got) == served.digest
    assert flaky.dead and not url.dead
    assert served.sent("etag-peer") + mirror.sent <= SIZE + 2 * SEGMENT  # never started over


@pytest.mark.parametrize("fault", ["416", "200", "shifted"])
def test_a_mirror_failing_a_resume_does_not_throw_the_resumed_bytes_away(
    served: Served, tmp_path: Path, fault: str
) -> None:
    """R2 #5: 32 MiB of the blob on disk; the mirror answers the resume with 416, with 200
    and the whole blob, or with a shifted Content-Range; the origin completes what is
    missing and the resumed bytes are kept."""
    have = 32 * MIB

    def bad(srv: Scripted, out: _ScriptHandler, rng: tuple[int, int | None] | None, n: int) -> None:
        if fault == "416":
            out.wfile.write(
                b"HTTP/1.1 416 No\r\nContent-Range: bytes */1000\r\nContent-Length: 0\r\n\r\n"
            )
        elif fault == "200" or rng is None:  # a plain GET gets the whole blob
            srv.send_range(out, served.data, rng, status=200)
        else:
            srv.send_range(out, served.data, (rng[0] - MIB, rng[1] and rng[1] - MIB))

    with Scripted(bad) as mirror:
        near = source(mirror.file_url)
        origin = source(served.url(f"resume-{fault}"), tier=1)
        got = run_download(
            tmp_path / "store", [near, origin], served.digest, SIZE, prefill=served.data[:have]
        )

    assert str(got) == served.digest
    assert (near.wrote, origin.wrote) == (0, SIZE - have)
    assert all(
        int(line.range.split("=")[1].split("-")[0]) >= have
        for line in served.lines(f"resume-{fault}")
    )


def test_a_url_republished_at_another_size_starts_over_at_the_new_size(tmp_path: Path) -> None:
    """R2 #6: a plain URL (no digest, no size) changes to a new version, of another size,
    after the first two answers: the download starts over once and gets the new one."""
    old, new = os.urandom(20 * MIB), os.urandom(21 * MIB + 5)

    def republished(srv: Scripted, out: _ScriptHandler, rng: object, n: int) -> None:
        data, etag = (old, "v1") if n <= 2 else (new, "v2")
        srv.send_range(out, data, rng, etag=etag)  # type: ignore[arg-type]

    with Scripted(republished) as server:
        got = run_download(tmp_path / "store", [source(server.file_url)], None, None)

    assert str(got) == sha256(new)


def test_a_cancel_during_a_connect_returns_at_once(tmp_path: Path) -> None:
    """R2 #7: a listener whose backlog is full (the SYN goes unanswered) and a connect
    timeout of 60 s: the cancel ends the connect, and run() returns, well before."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    store = Store.open(tmp_path / "store")
    outcome: dict[str, object] = {}

    async def run() -> None:
        config = Config(store=tmp_path / "store", connect_timeout=60.0, stall_timeout=60.0)
        async with store.ingest(None, None, key="k", segmented=True) as ingest:
            assert isinstance(ingest, SegmentedIngest)
            src = source(f"http://127.0.0.1:{port}/f")
            task = asyncio.create_task(SegmentedDownload(ingest, [src], config).run())
            deadline = time.monotonic() + 20
            while not any("_connect" in f for f in fetchd_frames().values()):
                assert time.monotonic() < deadline, "no transfer ever connected"
                await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.wait({task}, timeout=10.0)  # the connect timeout is 60 s
            outcome["returned"] = task.done()
            with contextlib.suppress(BaseException):
                await task

    try:
        asyncio.run(run())
    finally:
        for s in [*fillers, listener]:
            s.close()
    assert outcome["returned"], "run() still connecting 10 s after the cancel"


def test_a_retry_after_wait_is_no_slow_connection(tmp_path: Path) -> None:
    """R2 #8: a mirror (2 MiB/s per connection) answers one request with 503 Retry-After:
    5; the connections waiting for it have no rate and are not "cut as slow", so the
    mirror is not demoted and the origin is never asked."""
    data = os.urandom(16 * MIB)

    def busy_once(srv: Scripted, out: _ScriptHandler, rng: object, n: int) -> None:
        if n == 2:
            out.wfile.write(b"HTTP/1.1 503 Busy\r\nRetry-After: 5\r\nContent-Length: 0\r\n\r\n")
            return
        srv.send_range(out, data, rng, rate=2 << 20)  # type: ignore[arg-type]

    with Scripted(busy_once) as mirror, RangeServer(data) as far:
        near, origin = source(mirror.file_url), source(far.file_url, tier=1)
        got = run_download(
            tmp_path / "store", [near, origin], sha256(data), len(data), max_connections=2
        )
        asked = [s for s in far.seen if s.method == "GET"]

    assert str(got) == sha256(data)
    assert (near.wrote, asked) == (len(data), [])


# --- the transport's keep-alive hygiene (R2 #9) ---------------------------------------------


class Recorder:
    """A sink for Response.read_into: the file it writes, the ranges recorded."""

    def __init__(self, path: Path) -> None:
        path.write_bytes(b"")
        self.data_path = path
        self.write_lock = CountingLock()
        self.ranges: list[tuple[int, int]] = []

    def hashes_at(self, offset: int) -> bool:
        return False

    def record(self, offset: int, n: int, pieces: object = None) -> None:
        self.ranges.append((offset, n))


def fetch_range(transport: object, url: str, start: int, end: int, out: Path) -> bytes:
    """One range GET through `transport`, read whole and released: the bytes."""
    from fetchd.sources.transport import Transfer, Transport

    assert isinstance(transport, Transport)
    transfer = Transfer(start, end)
    resp = transport.open(Location(url, {}), start, end, transfer)
    try:
        assert resp.head.status == 206, resp.head.status
        transfer.cursor = start
        sink = Recorder(out)
        resp.read_into(transfer, sink, lambda n: None)
        # every write into the file held the sink's write lock (one write per record)
        assert sink.write_lock.entries == len(sink.ranges) > 0
    finally:
        resp.release()
    return out.read_bytes()[start:end]


@pytest.mark.parametrize(("extra", "size"), [(b"\r\n", 1 * MIB), (b"JUNK", 100)])
def test_bytes_past_a_body_do_not_break_the_next_request(
    tmp_path: Path, extra: bytes, size: int
) -> None:
    """A stray CRLF after a body (skipped before the next status line, RFC 9112 §2.2) or
    other bytes past it (the connection is not reused): the next request works."""
    from fetchd.sources.transport import Transport

    data = os.urandom(size)

    def sloppy(srv: Scripted, out: _ScriptHandler, rng: object, n: int) -> None:
        srv.send_range(out, data, rng, extra=extra)  # type: ignore[arg-type]

    with Scripted(sloppy) as server:
        transport = Transport(Config(store=tmp_path))
        try:
            first = fetch_range(transport, server.file_url, 0, size // 2, tmp_path / "a")
            second = fetch_range(transport, server.file_url, size // 2, size, tmp_path / "b")
        finally:
            transport.close()

    assert first + second == data


def test_a_late_interrupt_does_not_cut_the_next_user_of_a_pooled_connection(
    served: Served, tmp_path: Path
) -> None:
    """A transfer whose 404 was drained and released (its connection pooled), interrupted
    afterwards: the transfer that took the connection over is not cut."""
    from fetchd.sources.transport import Transfer, Transport

    transport = Transport(Config(store=tmp_path))
    try:
        done = Transfer(0, 100)
        resp = transport.open(Location(served.url("pool", path="/none.bin"), {}), 0, 100, done)
        assert resp.head.status == 404
        resp.drain()
        resp.release()
        taker = Transfer(0, 4 * MIB)
        resp = transport.open(Location(served.url("pool"), {}), 0, 4 * MIB, taker)
        done.interrupt()  # late: a stall or a slow-cut deciding about the old transfer
        sink = Recorder(tmp_path / "out")
        try:
            resp.read_into(taker, sink, lambda n: None)
        finally:
            resp.release()
    finally:
        transport.close()

    assert (tmp_path / "out").read_bytes() == served.data[: 4 * MIB]
    assert len(served.lines("pool")) == 2 and len(served.nginx.requests()) >= 2


def test_a_stale_keep_alive_connection_is_retried_on_a_fresh_one(tmp_path: Path) -> None:
    """Two pooled connections the server has both closed since: the retry after the first
    one's failure connects afresh instead of taking the other stale one."""
    from fetchd.sources.transport import Transfer, Transport

    data = os.urandom(MIB)
    closed = threading.Semaphore(0)

    def one_each(srv: Scripted, out: _ScriptHandler, rng: object, n: int) -> bool:
        srv.send_range(out, data, rng)  # type: ignore[arg-type]
        out.wfile.flush()
        out.connection.shutdown(socket.SHUT_RDWR)  # keep-alive promised, closed silently
        closed.release()
        return False

    with Scripted(one_each) as server:
        transport = Transport(Config(store=tmp_path))
        try:
            a, b = Transfer(0, MIB // 2), Transfer(MIB // 2, MIB)
            loc = Location(server.file_url, {})
            ra = transport.open(loc, 0, MIB // 2, a)
            rb = transport.open(loc, MIB // 2, MIB, b)  # a second connection: ra's is busy
            for resp, t, name in ((ra, a, "a"), (rb, b, "b")):
                resp.read_into(t, Recorder(tmp_path / name), lambda n: None)
                resp.release()
            assert closed.acquire(timeout=20) and closed.acquire(timeout=20)
            third = fetch_range(transport, server.file_url, 0, MIB, tmp_path / "c")
        finally:
            transport.close()

    assert third == data and server.count == 3


@pytest.mark.parametrize("size_line", [b"-5", b"0x10", b"1_0", b"+10"])
def test_a_chunk_size_that_is_not_hex_digits_is_refused(tmp_path: Path, size_line: bytes) -> None:
    from fetchd.sources.transport import ConnectionLost, Transfer, Transport

    def chunked(srv: Scripted, out: _ScriptHandler, rng: object, n: int) -> None:
        out.wfile.write(
            b"HTTP/1.1 206 X\r\nContent-Range: bytes 0-15/16\r\nTransfer-Encoding: chunked\r\n\r\n"
            + size_line
            + b"\r\n"
            + b"0123456789abcdef\r\n0\r\n\r\n"
        )

    with Scripted(chunked) as server:
        transport = Transport(Config(store=tmp_path))
        sink = Recorder(tmp_path / "out")
        transfer = Transfer(0, 16)
        try:
            resp = transport.open(Location(server.file_url, {}), 0, 16, transfer)
            with pytest.raises(ConnectionLost, match="bad chunk size"):
                resp.read_into(transfer, sink, lambda n: None)
            resp.close()
        finally:
            transport.close()

    assert sink.ranges == []


@pytest.mark.parametrize("fault", ["404", "short"])
def test_a_source_label_appears_once_in_its_errors(
    served: Served, tmp_path: Path, fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    """R2 nit: "mirror: mirror: …" in messages."""

    def short(srv: Scripted, out: _ScriptHandler, rng: tuple[int, int | None], n: int) -> None:
        srv.send_range(out, served.data, (rng[0], rng[0] + 1000))

    with Scripted(short) as mirror, caplog.at_level("INFO", logger="fetchd.sources.segments"):
        near = source(served.url("label", "/none.bin") if fault == "404" else mirror.file_url)
        with pytest.raises(FetchdError) as failed:
            run_download(tmp_path / "store", [near], served.digest, SIZE, attempts=1)

    label = near.label
    texts = [str(failed.value), *(r.getMessage() for r in caplog.records)]
    assert any(label in t for t in texts)
    assert [t for t in texts if t.count(label) > 1] == []


# --- writes around the page cache ------------------------------------------------------


def read_range(url: str, start: int, end: int, ingest: SegmentedIngest, config: Config) -> None:
    """One range GET through the transport into `ingest`, read whole (on this thread)."""
    from fetchd.sources.transport import Transfer, Transport

    transport = Transport(config)
    try:
        transfer = Transfer(start, end)
        resp = transport.open(Location(url, {}), start, end, transfer)
        try:
            assert resp.head.status == 206, resp.head.status
            resp.read_into(transfer, ingest, lambda n: None)
        finally:
            resp.release()
        assert transfer.cursor == end
    finally:
        transport.close()


def test_bytes_hashed_from_the_buffer_skip_the_page_cache_and_bytes_ahead_do_not(
    served: Served, tmp_path: Path
) -> None:
    """Bytes written where hashing stands are hashed from the transport's buffer: they go
    around the page cache (O_DIRECT), which on this VM costs 0.25-2.6 s of system time
    per GiB. Bytes that land ahead of it stay in the page cache, where the hash follower
    re-reads them. Checked with mincore on the data file, before anything reads it."""
    from tests.support.pagecache import resident_pages

    ahead, first, total = (8 * MIB, 16 * MIB), (0, 8 * MIB), SIZE
    store = Store.open(tmp_path / "store")
    config = Config(store=tmp_path / "store")
    url = served.url("direct")

    async def run() -> tuple[int, int, int, Path]:
        digest = Digest.parse(served.digest)
        async with store.ingest(digest, SIZE, segmented=True) as ingest:
            assert isinstance(ingest, SegmentedIngest)
            await asyncio.to_thread(read_range, url, *ahead, ingest, config)  # hash at 0
            await asyncio.to_thread(read_range, url, *first, ingest, config)  # hash here
            await ingest.flush()  # the follower has hashed `ahead`: hashing stands at 16 MiB
            assert ingest.hashed == ahead[1]
            await asyncio.to_thread(read_range, url, ahead[1], total, ingest, config)
            data = ingest.data_path
            counts = (
                resident_pages(data, *first),
                resident_pages(data, *ahead),
                resident_pages(data, ahead[1], total - total % 4096),
            )
            await ingest.commit()
        return (*counts, store.blob_path(digest))

    at_hash, ahead_pages, rest, blob = asyncio.run(run())

    assert blob.read_bytes() == served.data
    assert (at_hash, rest) == (0, 0)
    assert ahead_pages == (ahead[1] - ahead[0]) // 4096


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a ramfs needs root")
def test_a_file_system_without_o_direct_gets_the_bytes_through_the_page_cache(
    served: Served, tmp_path: Path
) -> None:
    """ramfs refuses O_DIRECT (EINVAL at open): the transport writes through the page
    cache instead, and the blob is whole."""
    import subprocess

    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mnt)], check=True)
    try:
        with pytest.raises(OSError):
            os.open(mnt / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
        got = run_download(mnt / "store", [source(served.url("ramfs"))], served.digest, SIZE)
        blob = Store.open(mnt / "store").blob_path(got)
        assert str(got) == served.digest and blob.read_bytes() == served.data
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)
