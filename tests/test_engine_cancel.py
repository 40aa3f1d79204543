"""Cancelling a pull at each await of the engine (issue 11, item 5), after httpcore's
tests/test_cancellations.py: cancel, then check that nothing is left in a bad state.

Every pull goes through a SlowProxy (tests/support/slowserver.py) in front of a real peer:
the distribution registry for ``docker://`` images, nginx for ``http://`` URLs. The proxy
holds an answer at the point a test names (before the response head; after N body bytes)
and signals when it holds it; the test cancels the pull's task then, never after a sleep.
After each cancellation:

- the task ends with CancelledError, promptly (bounded), and the engine closes;
- no asyncio task is left but the test's own, no fetchd thread outside the named pools
  (threads.py) is alive, and no thread is inside a transfer: the proxy sees every client
  connection closed, and this process holds no more sockets than before the engine;
- the store is consistent: fsck re-hashes every blob clean, the blob being fetched is not
  in layout/blobs and no name is in index.json, no lease is left, the ingest's lock is
  free (and no descriptor of ours is open on it);
- a fresh engine pulls the same reference with the right digest (and leaves nothing
  either), resuming (per the proxy's log) where the bytes the cancelled pull placed end,
  and fetching less than all of them again.

Cancelling between the last byte and the commit is not tested: nothing outside the store
can hold a pull there (a slow disk would), and the commit runs to its end (threads.finish).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fetchd.config import Config
from fetchd.engine import Engine, PullResult
from fetchd.model import Digest
from fetchd.store import layout
from fetchd.store.cas import Store
from fetchd.store.locks import try_locked
from fetchd.store.maintenance import fsck
from fetchd.threads import SIZES
from tests.support.cli import Fetchd
from tests.support.fakeregistry import CONFIG, OCI_MANIFEST, oci_manifest, sha256
from tests.support.nginx import Nginx, make_file, start_nginx
from tests.support.registry import Registry
from tests.support.slowserver import Seen, SlowProxy
from tests.test_mirror_fallback import _request, push_blob

MIB = 1 << 20
SMALL = 4 * MIB + 123  # a layer that comes over one stream (sequential ingest)
BIG = 72 * MIB + 4567  # above Config.segmented_threshold (64 MiB): several range requests
FILE = 40 * MIB + 321  # a URL's file: several segments
HELD_AFTER = MIB  # body bytes an answer sends before it is held
CANCELLED_WITHIN = 5.0  # seconds for a cancelled pull to end, and for the engine to close
LEFT_WITHIN = 10.0  # seconds for connections, sockets and threads to go
SIGNAL_WITHIN = 20.0  # seconds for a server signal (a held answer) to come
SCENARIO_LIMIT = 60.0
LAYER = "application/vnd.oci.image.layer.v1.tar"
#: threads of the process-wide named pools (threads.py) may stay, idle
POOL_PREFIXES = tuple(f"fetchd-{kind}" for kind in SIZES)


# --- images and files ------------------------------------------------------------------


@dataclass(frozen=True)
class Image:
    ref: str  # NAME:TAG on the registry (prefix docker://HOST/)
    digest: str  # the manifest's digest
    layers: tuple[str, ...]  # the layers' digests
    config: str

    def at(self, gate: SlowProxy) -> str:
        return f"docker://{gate.host}/{self.ref}"


def push_image(registry: Registry, ref: str, layers: list[bytes], config: bytes = CONFIG) -> Image:
    """An OCI image of ``config`` and ``layers`` at ref (NAME:TAG) on the real registry."""
    name, tag = ref.rsplit(":", 1)
    descs = [{"mediaType": LAYER, **push_blob(registry, name, data)} for data in layers]
    push_blob(registry, name, config)
    raw = json.dumps(oci_manifest(config, descs)).encode()
    status, _ = _request(
        "PUT", f"{registry.url}/v2/{name}/manifests/{tag}", raw, **{"Content-Type": OCI_MANIFEST}
    )
    assert status == 201, status
    return Image(ref, sha256(raw), tuple(str(d["digest"]) for d in descs), sha256(config))


@dataclass(frozen=True)
class Images:
    small: Image
    big: Image
    twin_a: Image  # twin_a and twin_b share their config blob, nothing else
    twin_b: Image


@pytest.fixture(scope="module")
def images(registry: Registry) -> Images:
    rng = random.Random(11)
    twin_config = json.dumps({**json.loads(CONFIG), "config": {"Env": ["X=" + "y" * 200]}})
    return Images(
        small=push_image(registry, "cancel/small:1", [rng.randbytes(SMALL)]),
        big=push_image(registry, "cancel/big:1", [rng.randbytes(BIG)]),
        twin_a=push_image(registry, "cancel/twin:a", [rng.randbytes(SMALL)], twin_config.encode()),
        twin_b=push_image(registry, "cancel/twin:b", [rng.randbytes(SMALL)], twin_config.encode()),
    )


@dataclass(frozen=True)
class Served:
    nginx: Nginx
    digest: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("cancel-nginx")
    root = base / "root"
    root.mkdir()
    digest = make_file(root / "file.bin", FILE, seed=11)
    try:
        with start_nginx(base / "nginx", root) as nginx:
            yield Served(nginx, digest)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def reg_gate(registry: Registry) -> Iterator[SlowProxy]:
    with SlowProxy(registry.url) as gate:
        yield gate


@pytest.fixture
def url_gate(served: Served) -> Iterator[SlowProxy]:
    with SlowProxy(served.nginx.url) as gate:
        yield gate


# --- what the store holds ----------------------------------------------------------------


def ingest_dir(store: Path, digest: str) -> Path:
    """An ingest is keyed by its expected digest (cas.py): ingest/<alg>-<hex>/."""
    return store / "ingest" / digest.replace(":", "-")


def placed(ingest: Path) -> list[tuple[int, int]]:
    """The byte ranges an ingest holds for sure: a segmented one's state.json ranges,
    else the prefix its data file holds (sequential)."""
    try:
        ranges = json.loads((ingest / "state.json").read_text())["ranges"]
        return [(int(a), int(b)) for a, b in ranges]
    except (OSError, ValueError, KeyError):
        pass
    try:
        size = (ingest / "data").stat().st_size
    except OSError:
        return []
    return [(0, size)] if size else []


def data_size(ingest: Path) -> int:
    try:
        return (ingest / "data").stat().st_size
    except OSError:
        return 0


def leases(store: Path) -> list[str]:
    try:
        return sorted(n for n in os.listdir(store / "leases") if not n.startswith("."))
    except FileNotFoundError:
        return []


def lease_text(store: Path, name: str) -> str:
    try:
        return (store / "leases" / name).read_text()
    except OSError:
        return ""


def range_start(seen: Seen) -> int:
    if seen.range is None:
        return 0
    assert seen.range.startswith("bytes="), seen.range
    return int(seen.range.removeprefix("bytes=").split("-")[0] or 0)


def open_paths() -> list[str]:
    """What this process's descriptors name (sockets as socket:[INODE])."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
    return out


def sockets() -> int:
    return sum(p.startswith("socket:") for p in open_paths())


def stray_threads() -> list[str]:
    """fetchd threads other than the idle workers of the named pools (a download's own
    hash follower, a transfer thread of a private pool, ...)."""
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith("fetchd") and not t.name.startswith(POOL_PREFIXES)
    ]


async def poll(pred: Callable[[], bool], within: float, what: str) -> None:
    """Until ``pred()``, checked every 10 ms on the loop (the engine runs meanwhile)."""
    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


class OpenWatch:
    """Counts the opens of one file by any process (inotify IN_OPEN): the sign that a
    pull reached a lock another process holds (locks.py opens the file to take it)."""

    IN_OPEN = 0x20

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_OPEN) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self.opens = 0

    def wait(self, count: int, within: float) -> None:
        """Until ``count`` opens were seen (AssertionError after ``within`` seconds)."""
        deadline = time.monotonic() + within
        while self.opens < count:
            left = deadline - time.monotonic()
            assert left > 0, f"{self.opens} open(s) of the lock in {within} s, not {count}"
            if select.select([self.fd], [], [], left)[0]:
                data = os.read(self.fd, 65536)
                at = 0
                while at + 16 <= len(data):
                    _, mask, _, length = struct.unpack_from("iIII", data, at)
                    self.opens += bool(mask & self.IN_OPEN)
                    at += 16 + length

    def close(self) -> None:
        os.close(self.fd)


# --- one scenario: an engine, a cancel, the checks ----------------------------------------


@dataclass
class Scene:
    """One test's store, servers and the state before its engine started."""

    store: Path
    gates: tuple[SlowProxy, ...]
    sockets: int
    tasks: set[asyncio.Task[object]]

    def config(self) -> Config:
        return Config(store=self.store, insecure=frozenset({"http"}))

    @contextlib.asynccontextmanager
    async def engine(self) -> AsyncIterator[Engine]:
        """An engine on the store; closing it is bounded."""
        engine = Engine(Store.open(self.store), self.config())
        await engine.__aenter__()
        try:
            yield engine
        finally:
            async with asyncio.timeout(CANCELLED_WITHIN):
                await engine.__aexit__(None, None, None)

    async def signal(self, fn: Callable[[], object]) -> None:
        """Wait (off the loop, so the engine runs meanwhile) for a server signal."""
        await asyncio.to_thread(fn)

    async def cancel(self, task: asyncio.Task[PullResult]) -> None:
        """Cancel ``task``: it must end with CancelledError, promptly."""
        assert not task.done(), f"the pull ended before it was cancelled: {task!r}"
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=CANCELLED_WITHIN)
        assert task in done, f"the cancelled pull did not end within {CANCELLED_WITHIN} s"
        if not task.cancelled():
            raise AssertionError(f"the cancelled pull ended without CancelledError: {task!r}")

    async def left_nothing(self, *, fetching: list[str], published: int = 0) -> None:
        """After the engine closed: no task, thread, connection or socket of the pull is
        left, and the store is consistent (``fetching``: the blobs being fetched when the
        pull was cancelled, which must not be visible; ``published``: how many names
        index.json holds, none of them the cancelled pull's)."""
        leftover = asyncio.all_tasks() - self.tasks - {asyncio.current_task()}
        assert not leftover, f"tasks left after the engine closed: {leftover}"
        for gate in self.gates:
            await asyncio.to_thread(gate.wait_closed, LEFT_WITHIN)
        await poll(lambda: not stray_threads(), LEFT_WITHIN, f"threads {stray_threads()} to end")
        await poll(
            lambda: sockets() <= self.sockets,
            LEFT_WITHIN,
            f"the sockets to close ({sockets()} open, {self.sockets} before the engine)",
        )
        store = Store.open(self.store)
        report = await asyncio.to_thread(fsck, store)
        assert report.ok, report.to_json()
        for digest in fetching:
            assert not store.has(Digest.parse(digest)), f"{digest} is visible unfinished"
            lock = ingest_dir(self.store, digest) / "lock"
            assert str(lock) not in open_paths(), f"a descriptor is still open on {lock}"
            if lock.exists():
                with try_locked(lock) as free:
                    assert free, f"{lock} is still held"
        names = layout.read_index(store).get("manifests", [])
        assert len(names) == published, names
        assert leases(self.store) == [], f"leases left: {leases(self.store)}"


def run(body: Callable[[Scene], Awaitable[None]], store: Path, *gates: SlowProxy) -> None:
    """``body(scene)`` in a fresh event loop, bounded."""

    async def main() -> None:
        scene = Scene(store, gates, sockets(), set(asyncio.all_tasks()))
        async with asyncio.timeout(SCENARIO_LIMIT):
            await body(scene)

    asyncio.run(main())


def resumed(placed_ranges: list[tuple[int, int]], gets: list[Seen]) -> None:
    """The resumed pull went on from what the cancelled one placed: one of its GETs
    starts where a placed range ends, and it fetched again less than all of them (its
    first request may be a probe, or a whole segment from the first gap that runs into
    the next range placed)."""
    assert gets, "the resumed pull asked for nothing"
    ends = {b for _, b in placed_ranges}
    assert any(range_start(s) in ends for s in gets), (placed_ranges, [s.range for s in gets])
    kept = sum(b - a for a, b in placed_ranges)
    assert refetched(placed_ranges, gets) < kept, (placed_ranges, gets)


def refetched(placed_ranges: list[tuple[int, int]], gets: list[Seen]) -> int:
    """Bytes of ``placed_ranges`` that the answers to ``gets`` carried again."""
    total = 0
    for seen in gets:
        start = range_start(seen)
        end = start + seen.body_bytes
        total += sum(max(0, min(b, end) - max(a, start)) for a, b in placed_ranges)
    return total


# --- the tests -------------------------------------------------------------------------------


def test_cancel_while_the_manifest_request_is_outstanding(
    images: Images, reg_gate: SlowProxy, tmp_path: Path
) -> None:
    image = images.small

    async def body(scene: Scene) -> None:
        reg_gate.hold("/manifests/")
        async with scene.engine() as engine:
            task = asyncio.create_task(engine.pull(image.at(reg_gate)))
            await scene.signal(lambda: reg_gate.wait_held("/manifests/", 1, SIGNAL_WITHIN))
            await scene.cancel(task)
        await scene.left_nothing(fetching=[image.config, *image.layers])
        assert [s.gone for s in reg_gate.requests("/manifests/")] == [True]
        assert reg_gate.requests("/blobs/") == []

        reg_gate.release()
        async with scene.engine() as engine:
            result = await engine.pull(image.at(reg_gate))
        assert str(result.digest) == image.digest
        await scene.left_nothing(fetching=[], published=1)

    run(body, tmp_path / "store", reg_gate)


def test_cancel_while_a_url_s_first_request_is_outstanding(
    served: Served, url_gate: SlowProxy, tmp_path: Path
) -> None:
    url = f"{url_gate.url}/file.bin?t=first"
    digest = Digest.parse(served.digest)

    async def body(scene: Scene) -> None:
        url_gate.hold("/file.bin")
        async with scene.engine() as engine:
            task = asyncio.create_task(engine.pull(url, digest))
            await scene.signal(lambda: url_gate.wait_held("/file.bin", 1, SIGNAL_WITHIN))
            await scene.cancel(task)
        await scene.left_nothing(fetching=[served.digest])
        assert all(s.gone for s in url_gate.requests("/file.bin"))

        url_gate.release()
        async with scene.engine() as engine:
            result = await engine.pull(url, digest)
        assert result.digest == digest
        await scene.left_nothing(fetching=[], published=1)

    run(body, tmp_path / "store", url_gate)


def test_cancel_while_a_small_layer_streams(
    images: Images, reg_gate: SlowProxy, tmp_path: Path
) -> None:
    """One stream into a sequential ingest, cancelled after HELD_AFTER bytes; the next
    pull asks for the rest only (Range from the end of what is on disk)."""
    image = images.small
    layer = image.layers[0]
    ingest = ingest_dir(tmp_path / "store", layer)

    async def body(scene: Scene) -> None:
        reg_gate.hold(f"/blobs/{layer}", after=HELD_AFTER)
        async with scene.engine() as engine:
            task = asyncio.create_task(engine.pull(image.at(reg_gate)))
            await scene.signal(lambda: reg_gate.wait_held(layer, 1, SIGNAL_WITHIN))
            await poll(lambda: data_size(ingest) > 0, SIGNAL_WITHIN, "bytes in the ingest")
            await scene.cancel(task)
        await scene.left_nothing(fetching=[layer])
        kept = placed(ingest)
        assert kept and kept[0][0] == 0 and 0 < kept[0][1] <= HELD_AFTER, kept

        reg_gate.release()
        before = len(reg_gate.requests(layer, "GET"))
        async with scene.engine() as engine:
            result = await engine.pull(image.at(reg_gate))
        assert str(result.digest) == image.digest
        await scene.left_nothing(fetching=[], published=1)
        again = reg_gate.requests(layer, "GET")[before:]
        resumed(kept, again)
        assert [range_start(s) for s in again] == [kept[0][1]], (kept, again)

    run(body, tmp_path / "store", reg_gate)


@pytest.mark.parametrize("kind", ["url", "registry"])
def test_cancel_while_a_big_blob_streams_over_several_ranges(
    kind: str,
    images: Images,
    served: Served,
    reg_gate: SlowProxy,
    url_gate: SlowProxy,
    tmp_path: Path,
) -> None:
    """A segmented download: every range answer is held after HELD_AFTER bytes; the pull
    is cancelled once two of them are held (two connections in flight: the downloader
    adds more only as the first ones deliver)."""
    if kind == "url":
        gate, what, size, top = url_gate, served.digest, FILE, served.digest
        ref, pin, match = f"{url_gate.url}/file.bin?t=big", Digest.parse(what), "/file.bin"
    else:
        gate, what, size, top = reg_gate, images.big.layers[0], BIG, images.big.digest
        ref, pin, match = images.big.at(reg_gate), None, f"/blobs/{what}"
    ingest = ingest_dir(tmp_path / "store", what)

    async def body(scene: Scene) -> None:
        gate.hold(match, after=HELD_AFTER)
        async with scene.engine() as engine:
            task = asyncio.create_task(engine.pull(ref, pin))
            await scene.signal(lambda: gate.wait_held(match, 2, SIGNAL_WITHIN))
            await poll(lambda: data_size(ingest) > 0, SIGNAL_WITHIN, "bytes in the ingest")
            await scene.cancel(task)
        await scene.left_nothing(fetching=[what])
        kept = placed(ingest)
        assert kept and sum(b - a for a, b in kept) < size, kept

        gate.release()
        before = len(gate.requests(match, "GET"))
        async with scene.engine() as engine:
            result = await engine.pull(ref, pin)
        assert str(result.digest) == top
        await scene.left_nothing(fetching=[], published=1)
        again = gate.requests(match, "GET")[before:]
        resumed(kept, again)

    run(body, tmp_path / "store", gate)


def test_cancel_a_pull_waiting_on_another_pull_s_single_flight(
    images: Images, reg_gate: SlowProxy, tmp_path: Path
) -> None:
    """Two pulls in one engine need the same config blob; the second waits for the first's
    transfer. Cancelling the waiter leaves the first pull's transfer alone."""
    first, second = images.twin_a, images.twin_b
    config = first.config
    assert second.config == config

    async def body(scene: Scene) -> None:
        reg_gate.hold(f"/blobs/{config}", after=16)
        async with scene.engine() as engine:
            owner = asyncio.create_task(engine.pull(first.at(reg_gate)))
            await scene.signal(lambda: reg_gate.wait_held(config, 1, SIGNAL_WITHIN))
            waiter = asyncio.create_task(engine.pull(second.at(reg_gate)))
            # The waiter's lease names its manifest once it is resolved; from there it
            # goes straight to the flight of the config (no request, no other wait).
            await poll(
                lambda: any(
                    second.digest in lease_text(scene.store, n) for n in leases(scene.store)
                ),
                SIGNAL_WITHIN,
                "the second pull's lease",
            )
            for _ in range(100):
                await asyncio.sleep(0)  # loop turns for the lease's thread to hand it back
            await scene.cancel(waiter)
            assert not owner.done(), owner
            reg_gate.release()
            async with asyncio.timeout(SIGNAL_WITHIN):
                result = await owner
        assert str(result.digest) == first.digest
        await scene.left_nothing(fetching=[second.layers[0]], published=1)
        assert len(reg_gate.requests(config, "GET")) == 1
        assert reg_gate.requests(second.layers[0]) == []

        async with scene.engine() as engine:
            result = await engine.pull(second.at(reg_gate))
        assert str(result.digest) == second.digest
        await scene.left_nothing(fetching=[], published=2)
        assert len(reg_gate.requests(config, "GET")) == 1

    run(body, tmp_path / "store", reg_gate)


def test_cancel_the_pull_that_owns_a_single_flight_and_the_waiter_takes_it_over(
    images: Images, reg_gate: SlowProxy, tmp_path: Path
) -> None:
    """Two pulls of one image in one engine; the first one's layer transfer is held,
    the second waits for it. Cancelling the first, the second takes the transfer over
    and resumes it from the bytes the first placed."""
    image = images.small
    layer = image.layers[0]
    ingest = ingest_dir(tmp_path / "store", layer)

    async def body(scene: Scene) -> None:
        reg_gate.hold(f"/blobs/{layer}", after=HELD_AFTER, times=1)
        async with scene.engine() as engine:
            owner = asyncio.create_task(engine.pull(image.at(reg_gate)))
            await scene.signal(lambda: reg_gate.wait_held(layer, 1, SIGNAL_WITHIN))
            await poll(lambda: data_size(ingest) > 0, SIGNAL_WITHIN, "bytes in the ingest")
            waiter = asyncio.create_task(engine.pull(image.at(reg_gate)))
            await poll(
                lambda: sum(layer in lease_text(scene.store, n) for n in leases(scene.store)) == 2,
                SIGNAL_WITHIN,
                "the second pull's lease",
            )
            for _ in range(100):
                await asyncio.sleep(0)  # loop turns for the lease's thread to hand it back
            await scene.cancel(owner)
            async with asyncio.timeout(SIGNAL_WITHIN):
                result = await waiter
        assert str(result.digest) == image.digest
        await scene.left_nothing(fetching=[], published=1)
        first, *rest = reg_gate.requests(layer, "GET")
        assert first.gone and first.body_bytes == HELD_AFTER, first
        assert [0 < range_start(s) <= HELD_AFTER for s in rest] == [True], [
            (s.range, s.status, s.body_bytes) for s in rest
        ]

    run(body, tmp_path / "store", reg_gate)


def test_cancel_a_pull_waiting_on_the_ingest_lock_another_process_holds(
    images: Images, reg_gate: SlowProxy, fetchd: Fetchd, tmp_path: Path
) -> None:
    """A `fetchd pull` process holds the layer's ingest (its answer is held); the engine
    pulls the same image and waits for that lock. Cancelled there, it leaves the other
    process's ingest alone, which then completes."""
    assert fetchd.store == tmp_path / "store"
    image = images.small
    layer = image.layers[0]
    lock = ingest_dir(fetchd.store, layer) / "lock"

    async def body(scene: Scene) -> None:
        reg_gate.hold(f"/blobs/{layer}", after=HELD_AFTER)
        other = fetchd.popen("pull", "--insecure-options", "http", image.at(reg_gate))
        try:
            await scene.signal(lambda: reg_gate.wait_held(layer, 1, SIGNAL_WITHIN))
            watch = OpenWatch(lock)
            try:
                async with scene.engine() as engine:
                    task = asyncio.create_task(engine.pull(image.at(reg_gate)))
                    await scene.signal(lambda: watch.wait(1, SIGNAL_WITHIN))
                    await scene.cancel(task)
            finally:
                watch.close()
            assert other.poll() is None, "the other process ended before the cancel"
            assert str(lock) not in open_paths(), "the engine kept the lock file open"
            assert len(reg_gate.requests(layer, "GET")) == 1  # the other process's only
            reg_gate.release()
            out, err = await asyncio.to_thread(other.communicate, timeout=SIGNAL_WITHIN)
        finally:
            if other.poll() is None:
                other.kill()
                other.wait()
        assert other.returncode == 0, err
        assert out.strip() == image.digest
        # The other process's connections are closed too: it ended.
        await scene.left_nothing(fetching=[], published=1)

        async with scene.engine() as engine:
            result = await engine.pull(image.at(reg_gate))
        assert str(result.digest) == image.digest
        await scene.left_nothing(fetching=[], published=1)
        assert len(reg_gate.requests(layer, "GET")) == 1

    run(body, tmp_path / "store", reg_gate)


def test_cancel_a_pull_whose_lease_waits_on_a_gc_in_another_process(
    images: Images, reg_gate: SlowProxy, tmp_path: Path
) -> None:
    """Another process (a gc) holds the store's gc lock: the pull's lease, taken in a
    thread after the manifest, waits for it. Cancelled there, the pull must not leave a
    live lease behind once the gc is done (it would keep those blobs from every gc for as
    long as this process lives)."""
    image = images.small
    store = tmp_path / "store"
    Store.open(store)
    gc_lock = store / "gc.lock"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('locked', flush=True)\n"
            "sys.stdin.read()\n",
            str(gc_lock),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )

    async def body(scene: Scene) -> None:
        try:
            assert holder.stdout is not None and holder.stdin is not None
            assert await asyncio.to_thread(holder.stdout.readline) == "locked\n"
            async with scene.engine() as engine:
                task = asyncio.create_task(engine.pull(image.at(reg_gate)))
                await poll(lambda: bool(leases(store)), SIGNAL_WITHIN, "the pull's lease")
                await scene.cancel(task)
            holder.stdin.close()  # the gc is done
            await asyncio.to_thread(holder.wait, SIGNAL_WITHIN)
        finally:
            if holder.poll() is None:
                holder.kill()
                holder.wait()
        await poll(lambda: not leases(store), LEFT_WITHIN, f"the leases {leases(store)} to go")
        await scene.left_nothing(fetching=[image.config, *image.layers])

        async with scene.engine() as engine:
            result = await engine.pull(image.at(reg_gate))
        assert str(result.digest) == image.digest
        await scene.left_nothing(fetching=[], published=1)

    run(body, tmp_path / "store", reg_gate)
