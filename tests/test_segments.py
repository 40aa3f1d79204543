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
import hashlib
import shutil
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from fetchd.config import Config
from fetchd.errors import BlobNotFound
from fetchd.model import Digest
from fetchd.sources.base import Location
from fetchd.sources.segments import SEGMENT, RangeSource, SegmentedDownload
from fetchd.store.cas import SegmentedIngest, Store
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
            self.ranges: list[tuple[int, int]] = []

        def record(self, offset: int, n: int) -> None:
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
