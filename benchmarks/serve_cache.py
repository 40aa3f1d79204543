"""`fetchd serve` as a LAN cache, against nginx and the distribution registry (issue 5).

Part 1, cached blob: CLIENTS (32) concurrent downloads of one cached BLOB_MIB (64) MiB blob
from `fetchd serve`, from nginx serving the very same file (root = fetchd's
layout/blobs/sha256, so both read one page-cached file) and from the distribution registry
(Debian `docker-registry`, the blob in its own storage). nginx gets as many workers as there
are CPUs (Debian's `worker_processes auto`; `--nginx-workers`). Servers alternate in rounds
(the order rotates each round). Prints each run's aggregate MB/s (10^6 B/s: all bytes / time
from the first request to the last byte) and the medians of the per-round ratios
fetchd/nginx (target ≥ 0.8) and fetchd/registry (target ≥ 1.0), plus each server's CPU
seconds per run (from /proc, the process and its children). The blob gets into fetchd's
store the way it would in use: a one-layer image is pushed to the registry, `fetchd serve
--upstream` that registry starts on an empty store, and the blob is fetched through it once.

The client is one Python process with one thread per connection, each a blocking socket
doing a plain HTTP/1.1 GET and `recv_into` a reused 1 MiB buffer (bodies discarded, every
byte counted against Content-Length). Measured on this 2-core machine against nginx, 32 ×
64 MiB: ~0.65 CPU s per 2 GiB, against ~1.0-1.2 s for 32 `curl -s -o /dev/null` processes
and ~1.2-1.4 s for asyncio (streams, `sock_recv_into` or aiohttp). What the client burns
is taken from the server on 2 cores, so the cheapest client that still copies the bytes
into user space like a real one measures the servers best. (recv with MSG_TRUNC halves the
client's CPU again but no real client discards bytes in the kernel, and it did not change
nginx's rate.) One connection per run hashes its body and must match the digest, so every
run checks at least one download per server; the others are checked for status 200 and
exact length. Before the rounds every server serves one hashed download (not counted),
which also makes sure the files are in the page cache.

Part 2, cold pulls: PULLS (16) `skopeo copy --quiet --src-tls-verify=false
--preserve-digests docker://CACHE/NAME:TAG oci:DIR:x` processes started at once (each into
its own dir) through a fresh, empty `fetchd serve` and through a fresh, empty distribution
registry in proxy mode (`proxy: {remoteurl: ORIGIN}`); both caches pull through the same
origin registry, holding an image of LAYERS (4) × LAYER_MIB (64) MiB uncompressed random
layers. `--preserve-digests` keeps the layers as served: without it skopeo gzips every
uncompressed layer on its way into oci: (16 × 256 MiB of gzip on 2 cores), which would time
skopeo's compressor, not the caches. Each arm gets a cache of its own, started empty, so
both are cold; the origin is shared and its blobs are read once before the rounds so the
first arm is not penalised by a cold page cache.

Upstream bytes are counted in the origin's access log (body bytes of GETs of the image's
blobs, config included, during the arm). The arm's time is from just before the first skopeo
is started to the moment the last one is reaped (pidfds). A run counts only if all 16 skopeo
exited 0 and wrote the origin's manifest digest (skopeo verifies every blob's digest).
After the clients end, the origin is watched until its log stops growing (the registry's
proxy can still be fetching into its own storage), then the cache is stopped and the log
settled; the quiet wait is not in the time. Ratios are fetchd/proxy (targets: one upstream
copy of the image and ≤ 0.5 × the proxy's time). Each arm also reports the CPU seconds of
its cache process. A third arm, origin-direct (`--no-direct` to skip it), runs the same
clients straight against the origin, no cache: the time the clients themselves need
(skopeo hashes and writes 16 × the image to disk), a floor that no cache can beat and
that is worth knowing before reading the time ratio. The arms rotate which goes first.

The clients share the 2 cores with the servers, and each skopeo is a session of its own,
so the kernel's autogroups give every client as much CPU as the cache and the origin
together: under 16 clients a cache gets about a seventeenth of the machine, which no LAN
cache serving other machines' clients would see. `--clients-nice 19` lowers the clients'
autogroups (and the clients) to nice 19, standing in for clients on machines of their own;
both figures are worth reading.

The registry's proxy can fail a client under this load (a 500 on a blob was seen here);
an arm in which any client fails is reported with the first error of the client and of
the cache's log, not counted, and run again with a fresh cache (at most 3 attempts).

    python benchmarks/serve_cache.py [--rounds N] [--clients N] [--blob-mib N] [--pulls N]
        [--layers N] [--layer-mib N] [--nginx-workers N] [--no-direct]
        [--part blob|pull|both] [--json]

Only 127.0.0.1; every server is stopped by its PID; everything lives in a temporary
directory under /tmp (no ':' in it: skopeo splits oci:PATH:REF there), deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so that `python benchmarks/serve_cache.py` finds tests/

from benchmarks.measure import BenchmarkFailed, child_env, compile_fetchd  # noqa: E402
from tests.support.images import (  # noqa: E402
    BuiltImage,
    build_image,
    push,
    random_layer,
    registry_manifest_digest,
)
from tests.support.nginx import Nginx, start_nginx  # noqa: E402
from tests.support.procs import Proc, free_port, wait_http  # noqa: E402
from tests.support.registry import Registry, start_registry  # noqa: E402

MIB = 1024 * 1024
MB = 1_000_000
PYTHON = REPO / ".venv" / "bin" / "python"
BLOB_NAME, PULL_NAME, TAG = "bench/blob", "bench/pull", "latest"
USER_AGENT = "fetchd-serve-bench/1"
RECV_BUFFER = 1 << 20
HEADER_LIMIT = 64 * 1024
SOCKET_TIMEOUT = 60.0  # seconds one recv/send may block
DOWNLOAD_TIMEOUT = 300.0  # seconds for one part-1 run (all clients)
PULL_TIMEOUT = 900.0  # seconds for one part-2 arm (all skopeo processes)
START_TIMEOUT = 30.0
QUIET_SECONDS = 2.0  # the origin's log must not grow for this long after an arm
QUIET_TIMEOUT = 120.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# --- processes ---------------------------------------------------------------------------


class Fetchd:
    """`fetchd serve` on a free port of 127.0.0.1; a context manager that stops it by PID."""

    def __init__(self, store: Path, upstream: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.host = f"127.0.0.1:{self.port}"
        self.store = store
        argv = [
            str(PYTHON),
            "-m",
            "fetchd",
            "--store",
            str(store),
            "serve",
            "--listen",
            self.host,
            "--upstream",
            upstream,
        ]
        self.proc = Proc(argv, log, cwd=REPO)
        try:
            wait_http(f"{self.url}/healthz", START_TIMEOUT, proc=self.proc)
        except BaseException:
            self.proc.stop()
            raise

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if line and not line.startswith("#") and "{" not in name:
                samples[name] = float(value)
        return samples

    def __enter__(self) -> Fetchd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a live process and its live descendants (from /proc)."""
    total = 0.0
    pending: list[int] = [pid]
    seen: set[int] = set()
    while pending and len(seen) < 1000:
        p = pending.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
            for task in Path(f"/proc/{p}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue
    return total


# --- part 1: many clients, one cached blob -----------------------------------------------


@dataclass(frozen=True)
class Target:
    server: str
    port: int
    path: str
    pid: int  # the server's process (with its children) whose CPU time is counted


@dataclass(frozen=True)
class Fetched:
    started: float
    ended: float
    nbytes: int
    sha256: str | None  # "sha256:HEX" for the hashed download


def _http_get(
    port: int, path: str, size: int, hashed: bool, gate: threading.Barrier | None
) -> Fetched:
    """GET http://127.0.0.1:PORT/PATH; check 200 and Content-Length; read and drop the body."""
    deadline = time.monotonic() + DOWNLOAD_TIMEOUT
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT) as sock:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: {USER_AGENT}\r\n"
            "Accept-Encoding: identity\r\nConnection: close\r\n\r\n"
        ).encode()
        if gate is not None:
            gate.wait(SOCKET_TIMEOUT)
        started = time.perf_counter()
        sock.sendall(request)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(HEADER_LIMIT)
            if not chunk or len(head) > HEADER_LIMIT:
                raise BenchmarkFailed(f"port {port}: no complete response head: {head[:200]!r}")
            head += chunk
        head, _, body = head.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)
        }
        if status_line.split(" ")[1:2] != ["200"]:
            raise BenchmarkFailed(f"GET {path} on port {port}: {status_line}")
        if headers.get("content-length") != str(size):
            raise BenchmarkFailed(
                f"GET {path} on port {port}: Content-Length "
                f"{headers.get('content-length')}, expected {size}"
            )
        hasher = hashlib.sha256(body) if hashed else None
        got = len(body)
        buf = bytearray(RECV_BUFFER)
        view = memoryview(buf)
        while got < size:
            if time.monotonic() > deadline:
                raise BenchmarkFailed(f"GET {path} on port {port}: not done in time")
            n = sock.recv_into(buf, min(RECV_BUFFER, size - got))
            if n == 0:
                raise BenchmarkFailed(f"GET {path} on port {port}: closed at {got} of {size} B")
            if hasher is not None:
                hasher.update(view[:n])  # releases the GIL for large buffers
            got += n
        ended = time.perf_counter()
    digest = f"sha256:{hasher.hexdigest()}" if hasher is not None else None
    return Fetched(started, ended, got, digest)


def download_many(target: Target, clients: int, size: int, digest: str) -> list[Fetched]:
    """`clients` concurrent GETs (threads), released together once all are connected; the
    first one hashes its body, which must match `digest`."""
    results: list[Fetched | BaseException | None] = [None] * clients
    gate = threading.Barrier(clients) if clients > 1 else None

    def one(i: int) -> None:
        try:
            results[i] = _http_get(target.port, target.path, size, i == 0, gate)
        except BaseException as exc:  # reported below, in the main thread
            results[i] = exc
            if gate is not None:
                gate.abort()

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + DOWNLOAD_TIMEOUT + SOCKET_TIMEOUT
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive():
            raise BenchmarkFailed(f"{target.server}: a download did not finish in time")
    fetched: list[Fetched] = []
    for r in results:
        if not isinstance(r, Fetched):
            if isinstance(r, threading.BrokenBarrierError):
                continue  # another client's failure broke the gate: report that one
            raise BenchmarkFailed(f"{target.server}: download failed: {r!r}")
        fetched.append(r)
    if len(fetched) != clients:
        raise BenchmarkFailed(f"{target.server}: {clients - len(fetched)} downloads failed")
    if fetched[0].sha256 != digest:
        raise BenchmarkFailed(f"{target.server}: served {fetched[0].sha256}, expected {digest}")
    return fetched


@dataclass(frozen=True)
class BlobRun:
    server: str
    round: int
    wall: float
    mb_s: float
    fastest: float
    slowest: float
    server_cpu: float

    def line(self, clients: int, size: int) -> str:
        return (
            f"round {self.round}  {self.server:<8}  {clients} × {size / MIB:.1f} MiB  "
            f"{self.wall:6.2f} s  {self.mb_s:6.0f} MB/s  clients {self.fastest:.2f}–"
            f"{self.slowest:.2f} s  server cpu {self.server_cpu:5.2f} s  sha256 ok"
        )


def blob_run(target: Target, round_: int, clients: int, size: int, digest: str) -> BlobRun:
    cpu0 = tree_cpu_seconds(target.pid)
    fetched = download_many(target, clients, size, digest)
    cpu = tree_cpu_seconds(target.pid) - cpu0
    start = min(f.started for f in fetched)
    wall = max(f.ended for f in fetched) - start
    durations = [f.ended - f.started for f in fetched]
    total = sum(f.nbytes for f in fetched)
    return BlobRun(
        target.server, round_, wall, total / wall / MB, min(durations), max(durations), cpu
    )


def publish(workdir: Path, registry: Registry, name: str, sizes: Sequence[int]) -> BuiltImage:
    """Build an image of uncompressed random layers of these sizes and push it byte for byte."""
    layout = workdir / f"layout-{name.replace('/', '-')}"
    seed0 = 1000 if name == BLOB_NAME else 1
    layers = [random_layer(s, seed0 + i, compression="none") for i, s in enumerate(sizes)]
    image = build_image(layout, TAG, layers)
    push(layout, TAG, f"{registry.host}/{name}:{TAG}")
    served = registry_manifest_digest(registry.host, name, TAG)
    if served != image.digest:
        raise BenchmarkFailed(f"the registry serves {served} for {name}, built {image.digest}")
    shutil.rmtree(layout)
    return image


def part_blob(
    workdir: Path, origin: Registry, args: argparse.Namespace
) -> tuple[list[BlobRun], dict[str, object]]:
    image = publish(workdir, origin, BLOB_NAME, [args.blob_mib * MIB])
    layer = image.layers[0]
    digest, size = layer.digest, layer.size
    blob_path = f"/v2/{BLOB_NAME}/blobs/{digest}"
    hexdigest = digest.removeprefix("sha256:")
    print(f"part 1: blob {digest} ({size} B) pushed to the registry {origin.host}", flush=True)
    with contextlib.ExitStack() as stack:
        store = workdir / "blob-store"
        fetchd = stack.enter_context(Fetchd(store, origin.url, workdir / "fetchd-blob.log"))
        # Make it cached: one fetch through fetchd (checked), then it must be in the store.
        first = Target("fetchd", fetchd.port, blob_path, fetchd.proc.pid)
        download_many(first, 1, size, digest)
        stored = store / "layout" / "blobs" / "sha256" / hexdigest
        deadline = time.monotonic() + START_TIMEOUT
        while not (stored.is_file() and stored.stat().st_size == size):
            if time.monotonic() > deadline:
                raise BenchmarkFailed(f"fetchd did not store {digest} at {stored}")
            time.sleep(0.05)
        upstream_before = fetchd.metrics().get("fetchd_upstream_bytes_total", 0.0)
        nginx: Nginx = stack.enter_context(
            start_nginx(workdir / "nginx", stored.parent, workers=args.nginx_workers)
        )
        targets = [
            first,
            Target("nginx", nginx.port, f"/{hexdigest}", nginx.pid),
            Target("registry", origin.port, blob_path, origin.proc.pid),
        ]
        for t in targets:  # warm-up and check: one hashed download each, not counted
            download_many(t, 1, size, digest)
        workers = f"{args.nginx_workers} worker{'s' if args.nginx_workers != 1 else ''}"
        print(
            f"servers: fetchd serve {fetchd.url} (blob cached in its store), nginx "
            f"{nginx.url} ({workers}, sendfile, the same file), registry "
            f"{origin.url}; one checked download from each first, not counted",
            flush=True,
        )
        runs: list[BlobRun] = []
        for round_ in range(1, args.rounds + 1):
            shift = (round_ - 1) % len(targets)
            for t in targets[shift:] + targets[:shift]:
                run = blob_run(t, round_, args.clients, size, digest)
                runs.append(run)
                print(run.line(args.clients, size), flush=True)
        metrics = fetchd.metrics()
        if metrics.get("fetchd_upstream_bytes_total", 0.0) != upstream_before:
            raise BenchmarkFailed("fetchd went upstream while serving the cached blob")
        fetchd_gets = [
            line
            for line in origin.blob_gets(digest)
            if line.user_agent != USER_AGENT and line.status in (200, 206)
        ]
        print(
            f"fetchd fetched the blob from the registry {len(fetchd_gets)} time(s) in all "
            f"(the fetch that cached it), then served it from its store",
            flush=True,
        )

    def rates(server: str) -> dict[int, float]:
        return {r.round: r.mb_s for r in runs if r.server == server}

    def ratio(num: str, den: str) -> float:
        a, b = rates(num), rates(den)
        return round(statistics.median(a[k] / b[k] for k in a), 3)

    servers = ("fetchd", "nginx", "registry")
    result: dict[str, object] = {"blob_bytes": size, "clients": args.clients}
    for s in servers:
        result[f"{s}_mb_s"] = [round(v) for v in rates(s).values()]
    for s in servers:
        result[f"{s}_median_mb_s"] = round(statistics.median(rates(s).values()))
    for s in servers:
        cpu = [r.server_cpu for r in runs if r.server == s]
        result[f"{s}_median_cpu_s"] = round(statistics.median(cpu), 2)
    result["ratio_fetchd_nginx"] = ratio("fetchd", "nginx")
    result["ratio_fetchd_registry"] = ratio("fetchd", "registry")
    return runs, result


# --- part 2: cold concurrent pulls through a cache ---------------------------------------


def origin_blob_stats(origin: Registry, image: BuiltImage) -> dict[str, tuple[int, int]]:
    """Per blob of the image (layers and config): (GET count, body bytes) in the origin's log."""
    lines = origin.blob_gets()
    blobs = [image.config.digest, *(layer.digest for layer in image.layers)]
    return {
        d: (
            sum(1 for line in lines if line.blob_digest == d),
            sum(line.bytes for line in lines if line.blob_digest == d),
        )
        for d in blobs
    }


def wait_origin_quiet(origin: Registry, image: BuiltImage) -> None:
    """Until the origin's log of the image's blobs has not grown for QUIET_SECONDS (bounded)."""
    deadline = time.monotonic() + QUIET_TIMEOUT
    last = origin_blob_stats(origin, image)
    since = time.monotonic()
    while time.monotonic() - since < QUIET_SECONDS:
        if time.monotonic() > deadline:
            raise BenchmarkFailed("the origin kept serving the image's blobs after the pulls")
        time.sleep(0.25)
        now = origin_blob_stats(origin, image)
        if now != last:
            last, since = now, time.monotonic()


class PullFailed(BenchmarkFailed):
    """A client failed in one arm: the arm is retried with a fresh cache, and reported."""


CACHES = ("fetchd", "registry-proxy")
DIRECT = "origin-direct"  # reference arm: the same clients straight from the origin, no cache
ATTEMPTS = 3  # per arm, each with a fresh cache


@dataclass(frozen=True)
class PullArm:
    cache: str
    round: int
    wall: float
    fastest: float
    slowest: float
    upstream_bytes: int
    upstream_gets: tuple[int, ...]  # per layer
    cpu: float  # CPU seconds of the cache process (origin-direct: of the origin) in the arm
    cache_said: int | None  # fetchd's own fetchd_upstream_bytes_total

    def line(self, pulls: int, image_bytes: int) -> str:
        said = f"  (fetchd says {self.cache_said} B)" if self.cache_said is not None else ""
        what = (
            "served by the origin"
            if self.cache == DIRECT
            else f"upstream {self.upstream_bytes / MIB:7.1f} MiB ="
        )
        return (
            f"round {self.round}  {self.cache:<14}  {pulls} pulls  {self.wall:6.2f} s  clients "
            f"{self.fastest:.2f}–{self.slowest:.2f} s  cpu {self.cpu:5.2f} s  {what} "
            f"{self.upstream_bytes / image_bytes:.2f} × image, GETs per layer "
            f"{list(self.upstream_gets)}{said}"
        )


def run_pulls(
    host: str, image: BuiltImage, dirs: Sequence[Path], env: Mapping[str, str], nice: int = 0
) -> tuple[float, list[float]]:
    """Start one skopeo per dir at once; wait for all (pidfds); check each; return the wall
    time (first start → last reaped) and each client's time. With ``nice``, each skopeo runs
    under `nice -n N` and its session's autogroup gets the same nice (each skopeo is a
    session of its own, and the kernel shares CPU between autogroups first)."""
    procs: list[subprocess.Popen[bytes]] = []
    ends: dict[int, float] = {}
    starts: dict[int, float] = {}
    started = time.perf_counter()
    try:
        for d in dirs:
            d.mkdir(parents=True)
            argv = [
                *(["nice", "-n", str(nice)] if nice else []),
                "skopeo",
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                "--preserve-digests",
                f"docker://{host}/{PULL_NAME}:{TAG}",
                f"oci:{d / 'oci'}:x",
            ]
            with (d / "skopeo.out").open("wb") as out:
                starts[len(procs)] = time.perf_counter()
                procs.append(
                    subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=dict(env),
                        start_new_session=True,
                    )
                )
                if nice:
                    Path(f"/proc/{procs[-1].pid}/autogroup").write_text(str(nice))
        pidfds = {os.pidfd_open(p.pid): i for i, p in enumerate(procs)}
        try:
            deadline = time.monotonic() + PULL_TIMEOUT
            while pidfds:
                left = deadline - time.monotonic()
                ready, _, _ = select.select(list(pidfds), [], [], max(0.0, left))
                if not ready:
                    raise BenchmarkFailed(f"{len(pidfds)} skopeo did not finish in time")
                for fd in ready:
                    i = pidfds.pop(fd)
                    os.close(fd)
                    _, status = os.waitpid(procs[i].pid, 0)
                    ends[i] = time.perf_counter()
                    procs[i].returncode = os.waitstatus_to_exitcode(status)
        finally:
            for fd in pidfds:
                os.close(fd)
    finally:
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)  # the session this Popen made, by its id
                p.wait()
    wall = max(ends.values()) - started
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        said = (dirs[failed[0]] / "skopeo.out").read_text(errors="replace").strip()
        raise PullFailed(
            f"{len(failed)} of {len(procs)} skopeo failed; skopeo {failed[0]} exited with "
            f"{procs[failed[0]].returncode}: {said[-600:]}"
        )
    for i, d in enumerate(dirs):
        index = json.loads((d / "oci" / "index.json").read_text())
        digests = [m["digest"] for m in index["manifests"]]
        if digests != [image.digest]:
            raise BenchmarkFailed(f"skopeo {i} wrote {digests}, the origin has {image.digest}")
    return wall, [ends[i] - starts[i] for i in range(len(procs))]


def error_lines(log: Path, limit: int = 2) -> str:
    """The first error lines of a server's log (the registry's level=error, fetchd's
    WARNING/ERROR), shortened."""
    text = log.read_text(errors="replace") if log.exists() else ""
    picked = [
        line[:300]
        for line in text.splitlines()
        if "level=error" in line or "ERROR" in line or "WARNING" in line or "Traceback" in line
    ]
    return " | ".join(picked[:limit]) or "(nothing in its log)"


@contextlib.contextmanager
def cache_server(kind: str, workdir: Path, origin: Registry) -> Iterator[Fetchd | Registry]:
    if kind == "fetchd":
        with Fetchd(workdir / "store", origin.url, workdir / "fetchd.log") as fetchd:
            yield fetchd
    elif kind == "registry-proxy":
        with start_registry(workdir / "proxy", proxy_remote_url=origin.url) as proxy:
            yield proxy
    else:
        yield origin  # origin-direct: no cache; the origin is not ours to stop here


def pull_arm(
    kind: str,
    round_: int,
    armdir: Path,
    origin: Registry,
    image: BuiltImage,
    pulls: int,
    env: Mapping[str, str],
    nice: int = 0,
) -> PullArm:
    before = origin_blob_stats(origin, image)
    said: int | None = None
    with cache_server(kind, armdir, origin) as cache:
        cpu0 = tree_cpu_seconds(cache.proc.pid)
        try:
            wall, durations = run_pulls(
                cache.host, image, [armdir / f"client-{i}" for i in range(pulls)], env, nice
            )
        except PullFailed as exc:
            log = cache.proc.log_path
            raise PullFailed(f"{exc}; {kind}'s log: {error_lines(log)}") from None
        wait_origin_quiet(origin, image)
        cpu = tree_cpu_seconds(cache.proc.pid) - cpu0
        if isinstance(cache, Fetchd):
            said = int(cache.metrics().get("fetchd_upstream_bytes_total", -1))
    after = origin_blob_stats(origin, image)  # the cache stopped; requests() settles
    upstream = sum(after[d][1] - before[d][1] for d in after)
    gets = tuple(after[ly.digest][0] - before[ly.digest][0] for ly in image.layers)
    return PullArm(kind, round_, wall, min(durations), max(durations), upstream, gets, cpu, said)


def part_pull(
    workdir: Path, origin: Registry, args: argparse.Namespace
) -> tuple[list[PullArm], dict[str, object]]:
    image = publish(workdir, origin, PULL_NAME, [args.layer_mib * MIB] * args.layers)
    image_bytes = image.config.size + sum(layer.size for layer in image.layers)
    # Read the origin's blobs once so that its files are in the page cache for every arm.
    for blob in (image.config, *image.layers):
        t = Target("origin", origin.port, f"/v2/{PULL_NAME}/blobs/{blob.digest}", 0)
        download_many(t, 1, blob.size, blob.digest)
    print(
        f"part 2: image {origin.host}/{PULL_NAME}:{TAG} {image.digest}: {args.layers} × "
        f"{args.layer_mib} MiB uncompressed random layers ({image_bytes} B of blobs); "
        f"{args.pulls} concurrent skopeo per arm (nice {args.clients_nice}), each arm a fresh "
        "empty cache; "
        f"{DIRECT} = the same clients straight from the origin (the clients' floor)",
        flush=True,
    )
    env = child_env(workdir / "home")
    (workdir / "home").mkdir(exist_ok=True)
    arms: list[PullArm] = []
    failures: list[str] = []
    kinds = [*CACHES, DIRECT] if args.direct else list(CACHES)
    for round_ in range(1, args.rounds + 1):
        shift = (round_ - 1) % len(kinds)
        for kind in kinds[shift:] + kinds[:shift]:
            for attempt in range(1, ATTEMPTS + 1):
                armdir = workdir / f"{kind}-{round_}-{attempt}"
                armdir.mkdir()
                try:
                    arm = pull_arm(
                        kind, round_, armdir, origin, image, args.pulls, env, args.clients_nice
                    )
                except PullFailed as exc:
                    failures.append(f"{kind}: {exc}")
                    print(f"round {round_}  {kind:<14}  attempt {attempt} FAILED: {exc}")
                    if attempt == ATTEMPTS:
                        raise
                    continue
                finally:
                    shutil.rmtree(armdir, ignore_errors=True)
                arms.append(arm)
                print(arm.line(args.pulls, image_bytes), flush=True)
                break

    def of(kind: str) -> list[PullArm]:
        return [a for a in arms if a.cache == kind]

    def ratio(field: str, den: str) -> float:
        by_round = {a.round: a for a in of(den)}
        per_round = [
            float(getattr(a, field)) / float(getattr(by_round[a.round], field))
            for a in of("fetchd")
        ]
        return round(statistics.median(per_round), 3)

    def med(values: Iterable[float], digits: int = 3) -> float:
        return round(statistics.median(values), digits)

    result: dict[str, object] = {
        "image_bytes": image_bytes,
        "pulls": args.pulls,
        "layers": args.layers,
        "layer_mib": args.layer_mib,
    }
    for kind in kinds:
        key = kind.replace("-", "_")
        result[f"{key}_s"] = [round(a.wall, 3) for a in of(kind)]
        result[f"{key}_median_s"] = med(a.wall for a in of(kind))
        result[f"{key}_median_cpu_s"] = med((a.cpu for a in of(kind)), 2)
    for kind in CACHES:
        key = kind.replace("-", "_")
        result[f"{key}_upstream_bytes"] = [a.upstream_bytes for a in of(kind)]
        result[f"{key}_upstream_copies_median"] = med(
            a.upstream_bytes / image_bytes for a in of(kind)
        )
    result["ratio_time_fetchd_proxy"] = ratio("wall", "registry-proxy")
    result["ratio_upstream_fetchd_proxy"] = ratio("upstream_bytes", "registry-proxy")
    if args.direct:
        result["ratio_time_fetchd_direct"] = ratio("wall", DIRECT)
        result["ratio_time_proxy_direct"] = med(
            a.wall / {d.round: d for d in of(DIRECT)}[a.round].wall for a in of("registry-proxy")
        )
    result["failed_attempts"] = failures
    return arms, result


# --- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    add = parser.add_argument
    add("--rounds", type=int, default=3, help="rounds of each part (default 3)")
    add("--clients", type=int, default=32, help="part 1: concurrent downloads (default 32)")
    add("--blob-mib", type=int, default=64, help="part 1: MiB of the blob (default 64)")
    add("--pulls", type=int, default=16, help="part 2: concurrent skopeo (default 16)")
    add("--layers", type=int, default=4, help="part 2: layers in the image (default 4)")
    add("--layer-mib", type=int, default=64, help="part 2: MiB per layer (default 64)")
    add(
        "--nginx-workers",
        type=int,
        default=os.cpu_count() or 1,
        help="nginx worker_processes (default: the CPU count, as Debian's `auto`)",
    )
    add(
        "--direct",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"part 2: also the reference arm {DIRECT} (default on)",
    )
    add(
        "--clients-nice",
        type=int,
        default=0,
        choices=range(20),
        metavar="N",
        help="part 2: run each skopeo at nice N, its autogroup too (default 0; 19 stands "
        "in for clients on machines of their own: the caches get the CPU first)",
    )
    add("--part", choices=("blob", "pull", "both"), default="both", help="what to run")
    add("--json", action="store_true", help="also print a JSON summary line")
    args = parser.parse_args(argv)
    for name in ("rounds", "clients", "blob_mib", "pulls", "layers", "layer_mib"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.nginx_workers < 1:
        parser.error("--nginx-workers must be at least 1")
    return args


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    compile_fetchd(REPO)
    for tool in ("skopeo", "nginx", "docker-registry"):
        if shutil.which(tool) is None:
            print(f"error: {tool} is not installed", file=sys.stderr)
            return 1
    if not PYTHON.exists():
        print(f"error: {PYTHON} is missing: run `make deps` first", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="fetchd-serve-bench-", dir="/tmp"))
    summary: dict[str, object] = {"benchmark": "serve_cache", "rounds": args.rounds}
    print(f"load average at start: {loadavg()} ({os.cpu_count()} CPUs)", flush=True)
    try:
        with start_registry(workdir / "origin") as origin:
            if args.part in ("blob", "both"):
                _, blob = part_blob(workdir, origin, args)
                summary["blob"] = blob
                print(
                    f"part 1 median  fetchd {blob['fetchd_median_mb_s']} MB/s  nginx "
                    f"{blob['nginx_median_mb_s']} MB/s  registry {blob['registry_median_mb_s']}"
                    f" MB/s  (server cpu s per run: fetchd {blob['fetchd_median_cpu_s']}, "
                    f"nginx {blob['nginx_median_cpu_s']}, registry "
                    f"{blob['registry_median_cpu_s']})",
                    flush=True,
                )
                print(
                    f"part 1 ratios (median of per-round)  fetchd/nginx "
                    f"{blob['ratio_fetchd_nginx']} (target ≥ 0.8)  fetchd/registry "
                    f"{blob['ratio_fetchd_registry']} (target ≥ 1.0)",
                    flush=True,
                )
            if args.part in ("pull", "both"):
                _, pull = part_pull(workdir, origin, args)
                summary["pull"] = pull
                direct = (
                    f"  {DIRECT} {pull['origin_direct_median_s']} s (the clients' floor)"
                    if args.direct
                    else ""
                )
                print(
                    f"part 2 median  fetchd {pull['fetchd_median_s']} s, "
                    f"{pull['fetchd_upstream_copies_median']} × image from upstream  "
                    f"registry-proxy {pull['registry_proxy_median_s']} s, "
                    f"{pull['registry_proxy_upstream_copies_median']} × image from upstream"
                    f"{direct}",
                    flush=True,
                )
                print(
                    f"part 2 ratios fetchd/proxy (median of per-round)  time "
                    f"{pull['ratio_time_fetchd_proxy']} (target ≤ 0.5)  upstream bytes "
                    f"{pull['ratio_upstream_fetchd_proxy']} (target: fetchd 1.0 × image)",
                    flush=True,
                )
                if args.direct:
                    print(
                        f"part 2 time over {DIRECT} (median of per-round)  fetchd "
                        f"{pull['ratio_time_fetchd_direct']}  registry-proxy "
                        f"{pull['ratio_time_proxy_direct']}",
                        flush=True,
                    )
                failed = pull["failed_attempts"]
                if isinstance(failed, list) and failed:
                    print(f"part 2: {len(failed)} failed attempt(s), retried with fresh caches")
        print(f"load average at end: {loadavg()}", flush=True)
        if args.json:
            print(json.dumps(summary))
        return 0
    except BenchmarkFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
