"""`fetchd serve`, the LAN cache: real clients (skopeo, podman, fetchd, Chromium) against a
real `fetchd serve` on loopback, pulling through from a real distribution registry.

Each test starts its own upstream registry, so its access log counts exactly what that
test made the cache fetch. Where the upstream must be slow, a throttling proxy (a test
double of a slow registry: the real registry's answers, blob bodies sent 64 KiB at a time
with a pause between chunks) stands between the cache and the registry.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import os
import re
import secrets
import select
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import urllib.parse
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from fetchd.server import link
from tests.support.cli import REPO, Fetchd, failed, ok
from tests.support.faultproxy import FaultProxy
from tests.support.images import (
    BuiltImage,
    File,
    Layer,
    build_image,
    push,
    random_layer,
    registry_manifest_digest,
)
from tests.support.procs import free_port, wait_until
from tests.support.registry import Registry, start_registry
from tests.support.serve import Reply, ServeProcess, start_serve
from tests.support.servers import QuietHandler, ServerThread

HTTP = ("--insecure-options", "http")
MIB = 1 << 20
CLIENT_TIMEOUT = 120.0
ARTIFACTS = REPO / "artifacts"


# --- images ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    layout: Path
    small: BuiltImage  # busybox + one small layer: for podman, skopeo, the status page
    other: BuiltImage  # shares nothing with small but busybox: never pulled before a test
    four: BuiltImage  # 4 random layers of 3 MiB each: the concurrent cold pulls
    big: BuiltImage  # one random 4 MiB layer: slow upstream, ranges, hostile clients

    def blob_path(self, digest: str) -> Path:
        return self.layout / "blobs" / "sha256" / digest.split(":", 1)[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, busybox_layer: Layer) -> Images:
    layout = tmp_path_factory.mktemp("serve-images") / "layout"
    return Images(
        layout,
        small=build_image(
            layout,
            "small",
            [busybox_layer, Layer([File("etc/fetchd-test", b"served\n")])],
            config={"Cmd": ["/bin/sh"]},
        ),
        other=build_image(
            layout, "other", [busybox_layer, Layer([File("etc/fetchd-test", b"other\n")])]
        ),
        four=build_image(layout, "four", [random_layer(3 * MIB, 5501 + i) for i in range(4)]),
        big=build_image(layout, "big", [random_layer(4 * MIB, 5601)]),
    )


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Registry]:
    """A registry of this test's own: its access log is this test's upstream traffic."""
    with start_registry(tmp_path / "upstream") as reg:
        yield reg


def publish(images: Images, tag: str, registry: Registry, name: str) -> str:
    """Push the layout's `tag` to registry as NAME:1; the digest the registry serves."""
    push(images.layout, tag, f"{registry.host}/{name}:1")
    return registry_manifest_digest(registry.host, name, "1")


# --- clients --------------------------------------------------------------------------------


def run(
    argv: Sequence[str], *, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=CLIENT_TIMEOUT, env=env
    )


def popen(argv: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs: Sequence[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    """(exit status, stderr) of each process; any still running after an error is killed."""
    results = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=CLIENT_TIMEOUT)
            results.append((proc.returncode, err))
        return results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def skopeo_copy_argv(cache: ServeProcess, ref: str, dest: Path) -> list[str]:
    """skopeo copy docker://CACHE/REF oci:DEST:x, manifests kept byte for byte."""
    return [
        "skopeo",
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-tls-verify=false",
        f"docker://{cache.host}/{ref}",
        f"oci:{dest}:x",
    ]


def oci_dir_digest(dest: Path) -> str:
    """The digest of the one image skopeo wrote to an OCI layout, after checking its blobs."""
    index = json.loads((dest / "index.json").read_text())
    (entry,) = index["manifests"]
    for blob in (dest / "blobs" / "sha256").iterdir():
        with blob.open("rb") as f:
            assert hashlib.file_digest(f, "sha256").hexdigest() == blob.name, blob
    digest: str = entry["digest"]
    return digest


def skopeo_pull(cache: ServeProcess, ref: str, dest: Path) -> str:
    ok(run(skopeo_copy_argv(cache, ref, dest)))
    return oci_dir_digest(dest)


class Podman:
    """podman with its storage in a temporary dir, with the flags that work here.

    podman refuses a runroot path longer than 50 characters, so that one is a short
    directory of /tmp of its own, removed when the context ends.
    """

    def __init__(self, root: Path, registries_conf: Path | None = None) -> None:
        self.root = root
        (root / "home").mkdir(parents=True, exist_ok=True)
        self.runroot = Path(tempfile.mkdtemp(prefix="fetchd-podman-", dir="/tmp"))
        self.env = dict(os.environ, HOME=str(root / "home"))
        if registries_conf is not None:
            self.env["CONTAINERS_REGISTRIES_CONF"] = str(registries_conf)

    def __enter__(self) -> Podman:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.runroot, ignore_errors=True)

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [
            "podman",
            "--root",
            str(self.root / "root"),
            "--runroot",
            str(self.runroot),
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
            *args,
        ]
        return run(argv, env=self.env)

    def digest(self, ref: str) -> str:
        (info,) = json.loads(ok(self("image", "inspect", ref)))
        digest: str = info["Digest"]
        return digest


def mirror_only(cache: ServeProcess, ref: str) -> tuple[str, ...]:
    """fetchd pull arguments that ask the cache and nothing else."""
    return ("pull", "--mirror", cache.url, "--mirror-only", ref)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def total_blob_bytes(image: BuiltImage) -> int:
    return image.config.size + sum(layer.size for layer in image.layers)


# --- a slow upstream ------------------------------------------------------------------------

CHUNK = 64 * 1024
GATE_TIMEOUT = 30.0  # seconds a held manifest request waits for the test at most
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})
_BLOB_PATH = re.compile(r"/v2/.+/blobs/(sha256:[a-f0-9]{64})")


class _ThrottleHandler(QuietHandler):
    def do_GET(self) -> None:
        proxy: ThrottleProxy = self.owner
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=30)
        try:
            if "/manifests/" in self.path:
                with proxy.lock:
                    proxy.manifest_asks += 1
                proxy.manifest_gate.wait(GATE_TIMEOUT)
            upstream.request(self.command, self.path, headers=headers)
            resp = upstream.getresponse()
            match = _BLOB_PATH.fullmatch(urllib.parse.urlsplit(self.path).path)
            digest = match.group(1) if match and self.command == "GET" else None
            body = resp.read() if resp.getheader("Content-Length") is None else None
            self.send_response(resp.status, resp.reason)
            for name, value in resp.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            length = len(body) if body is not None else int(resp.getheader("Content-Length", 0))
            self.send_header("Content-Length", str(length))
            self.end_headers()
            if self.command == "HEAD":
                return
            if body is not None:
                self.wfile.write(body)
                return
            sent = 0
            while sent < length:
                chunk = resp.read(min(CHUNK, length - sent))
                if not chunk:
                    break
                if digest is not None and resp.status == 200 and not sent:
                    with proxy.lock:  # what every other blob had sent as this one began
                        proxy.began[digest] = dict(proxy.sent)
                self.wfile.write(chunk)
                sent += len(chunk)
                if digest is not None and resp.status == 200:
                    proxy.sent[digest] = sent
                    if sent < length:
                        time.sleep(proxy.pause)  # the slowness this double simulates
            if digest is not None and resp.status == 200:
                proxy.finished[digest] = time.monotonic()
        finally:
            upstream.close()

    do_HEAD = do_GET


class ThrottleProxy(ServerThread):
    """The real registry's answers, blob bodies paced at 64 KiB per `pause` seconds.

    `sent[digest]` is how many body bytes of a blob have gone out so far, `finished[digest]`
    the monotonic time its last byte was written, `began[digest]` a copy of `sent` as
    the blob's first byte went out (in the order the blobs began). Manifest requests wait for
    `manifest_gate` (set from the start unless `hold_manifests`), at most GATE_TIMEOUT
    seconds; `manifest_asks` counts them as they arrive.
    """

    def __init__(self, registry: Registry, pause: float, hold_manifests: bool = False) -> None:
        self.upstream_port = registry.port
        self.pause = pause
        self.sent: dict[str, int] = {}
        self.finished: dict[str, float] = {}
        self.began: dict[str, dict[str, int]] = {}
        self.lock = threading.Lock()
        self.manifest_asks = 0
        self.manifest_gate = threading.Event()
        if not hold_manifests:
            self.manifest_gate.set()
        super().__init__(_ThrottleHandler)


# --- real clients pull through the cache ------------------------------------------------------


def test_skopeo_pulls_through_the_cache(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    want = publish(images, "small", upstream, "skopeo/small")
    with start_serve(fetchd, [upstream.url]) as cache:
        assert skopeo_pull(cache, "skopeo/small:1", tmp_path / "cold") == want
        assert skopeo_pull(cache, "skopeo/small:1", tmp_path / "warm") == want
        by_digest = skopeo_pull(cache, f"skopeo/small@{want}", tmp_path / "by-digest")
        assert by_digest == want
    # The second and third pulls came from the store: one upstream GET per blob.
    for blob in (images.small.config, *images.small.layers):
        gets = upstream.blob_gets(blob.digest)
        assert [(g.status, g.bytes) for g in gets] == [(200, blob.size)], gets


def test_podman_pulls_through_the_cache(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    want = publish(images, "small", upstream, "podman/small")
    with Podman(tmp_path / "podman") as podman, start_serve(fetchd, [upstream.url]) as cache:
        ok(podman("pull", "--quiet", "--tls-verify=false", f"{cache.host}/podman/small:1"))
        assert podman.digest(f"{cache.host}/podman/small:1") == want
    assert upstream.blob_gets(images.small.layers[1].digest), "the cache never asked upstream"


def test_podman_uses_the_cache_as_a_registries_conf_mirror(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    want = publish(images, "small", upstream, "mirrored/small")
    with start_serve(fetchd, [upstream.url]) as cache:
        conf = tmp_path / "registries.conf"
        conf.write_text(
            "unqualified-search-registries = []\n"
            "[[registry]]\n"
            f'location = "{upstream.host}"\n'
            "insecure = true\n"
            "[[registry.mirror]]\n"
            f'location = "{cache.host}"\n'
            "insecure = true\n"
        )
        before = len(upstream.requests())
        ref = f"{upstream.host}/mirrored/small:1"
        with Podman(tmp_path / "podman", conf) as podman:
            ok(podman("pull", "--quiet", ref))
            assert podman.digest(ref) == want
        status = cache.status()
    # Every upstream request since the pull began was the cache's, none podman's own.
    during = upstream.requests()[before:]
    assert during, "nothing reached the upstream: the image came from nowhere"
    assert {line.user_agent.split("/")[0] for line in during} == {"fetchd"}, during
    assert f"{upstream.host}/mirrored/small:1" in [r["name"] for r in status["recent"]]
    assert f"{upstream.host}/mirrored/small" in [c["repository"] for c in status["cached"]]


def test_fetchd_pull_uses_the_mirror_and_falls_back_unless_mirror_only(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    want = publish(images, "small", upstream, "client/small")
    ref = f"docker://{upstream.host}/client/small:1"
    client = Fetchd(tmp_path / "client-store", fetchd.home)
    with start_serve(fetchd, [upstream.url]) as cache:
        before = len(upstream.requests())
        ok(client(*mirror_only(cache, ref)))
        assert client.entry(f"{upstream.host}/client/small:1")["digest"] == want
        status = cache.status()
    # The client asked the cache only; the cache asked the upstream.
    assert f"{upstream.host}/client/small:1" in [r["name"] for r in status["recent"]]
    during = upstream.requests()[before:]
    assert during and {line.user_agent for line in during} == {"fetchd/0.1"}
    # The mirror is down: fetchd falls back to the origin, unless --mirror-only.
    dead = f"http://127.0.0.1:{free_port()}"
    fallback = Fetchd(tmp_path / "fallback-store", fetchd.home)
    ok(fallback("pull", *HTTP, "--mirror", dead, ref))
    assert fallback.entry(f"{upstream.host}/client/small:1")["digest"] == want
    strict = Fetchd(tmp_path / "strict-store", fetchd.home)
    failed(strict("pull", *HTTP, "--mirror", dead, "--mirror-only", ref), "--mirror-only")


def test_two_upstreams_by_prefix_and_by_ns(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    with start_registry(tmp_path / "second") as second:
        want = publish(images, "other", second, "team/app")
        with start_serve(fetchd, [upstream.url, f"second.example={second.url}"]) as cache:
            # By name prefix: second.example/team/app → team/app on the second registry.
            assert skopeo_pull(cache, "second.example/team/app:1", tmp_path / "prefix") == want
            # By the OCI ns= parameter, which fetchd pull --mirror sends.
            client = Fetchd(tmp_path / "client-store", fetchd.home)
            ok(client(*mirror_only(cache, f"docker://{second.host}/team/app:1")))
            assert client.entry(f"{second.host}/team/app:1")["digest"] == want
        assert second.requests(path_contains="/v2/team/app/")
    assert not upstream.requests(path_contains="team/app"), "the default upstream was asked"


# --- single flight ----------------------------------------------------------------------------


def test_16_concurrent_cold_pulls_fetch_each_layer_once(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    want = publish(images, "four", upstream, "flight/four")
    # A slow upstream (each 3 MiB layer takes ~1 s), so that all clients ask while it arrives.
    with ThrottleProxy(upstream, pause=0.02) as slow, start_serve(fetchd, [slow.url]) as cache:
        clients = [Fetchd(tmp_path / f"fetchd-{i}", fetchd.home) for i in range(8)]
        dests = [tmp_path / f"skopeo-{i}" for i in range(8)]
        ref = f"docker://{slow.host}/flight/four:1"
        procs = [
            *(popen(skopeo_copy_argv(cache, "flight/four:1", dest)) for dest in dests),
            *(c.popen(*mirror_only(cache, ref)) for c in clients),
        ]
        results = finish(procs)
        for (code, err), proc in zip(results, procs, strict=True):
            assert code == 0, f"{proc.args!r}: exit {code}\n{err}"
        for dest in dests:
            assert oci_dir_digest(dest) == want
        for client in clients:
            assert client.entry(f"{slow.host}/flight/four:1")["digest"] == want
            for blob in images.four.layers:
                path = client.store / "layout/blobs/sha256" / blob.digest.split(":")[1]
                assert path.stat().st_size == blob.size
        metrics = cache.metrics()
    for layer in images.four.layers:
        gets = upstream.blob_gets(layer.digest)
        assert [(g.status, g.bytes) for g in gets] == [(200, layer.size)], gets
        assert upstream.blob_bytes_sent(layer.digest) == layer.size
    # The clients really overlapped: more of them asked for a layer than the store had.
    assert metrics["fetchd_cache_misses_total"] > len(images.four.layers) + 1, metrics
    assert metrics["fetchd_upstream_bytes_total"] == total_blob_bytes(images.four)


@pytest.mark.parametrize("at_once", [False, True], ids=["default", "upstream-blobs-0"])
def test_big_layers_come_from_the_upstream_one_after_another(
    tmp_path: Path, upstream: Registry, fetchd: Fetchd, at_once: bool
) -> None:
    """serve fetches blobs of 16 MiB or more from an upstream one after another, in the
    order asked (the next one as the one before nears its end), a small one at once;
    ``--upstream-blobs 0`` fetches them all at once (before: always all at once)."""
    layout = tmp_path / "layout"
    big = [random_layer(16 * MIB, 5801 + i) for i in range(3)]
    image = build_image(layout, "big3", [*big, random_layer(MIB, 5811)])
    push(layout, "big3", f"{upstream.host}/link/big3:1")
    want = registry_manifest_digest(upstream.host, "link/big3", "1")
    extra = ("--upstream-blobs", "0") if at_once else ()
    # 16 MiB in 256 chunks at ~8 ms: about 2 s a layer, each on its own connection.
    with (
        ThrottleProxy(upstream, pause=0.008) as slow,
        start_serve(fetchd, [slow.url], extra=extra) as cache,
    ):
        assert skopeo_pull(cache, "link/big3:1", tmp_path / "oci") == want
        began = dict(slow.began)
    layers = image.layers[:3]
    size = {layer.digest: layer.size for layer in image.layers}
    order = [d for d in began if d in {layer.digest for layer in layers}]
    assert sorted(order) == sorted(layer.digest for layer in layers), began
    # How much of the blob that began before had gone out when the next one began.
    before = [began[b].get(a, 0) / size[a] for a, b in itertools.pairwise(order)]
    if at_once:
        assert max(before) < 0.25, before
    else:
        assert min(before) >= 0.25, before
        small = image.layers[3].digest
        assert sum(began[small].get(d, 0) for d in order) < sum(size[d] for d in order), began
    for layer in image.layers:  # still one upstream copy each
        gets = upstream.blob_gets(layer.digest)
        assert [(g.status, g.bytes) for g in gets] == [(200, layer.size)], gets


def test_a_stalled_upstream_transfer_does_not_hold_up_the_next_big_blob(
    tmp_path: Path, upstream: Registry, fetchd: Fetchd
) -> None:
    """The link's slot belongs to a transfer that moves: one whose upstream went silent
    gives it up after link.IDLE, and the next big blob comes meanwhile (without that
    rule, only after link.MAX_WAIT)."""
    layout = tmp_path / "layout"
    image = build_image(layout, "two", [random_layer(16 * MIB, 5821 + i) for i in range(2)])
    push(layout, "two", f"{upstream.host}/link/two:1")
    stuck, next_one = image.layers
    with (
        ThreadPoolExecutor(1) as pool,
        FaultProxy(upstream.url) as proxy,
        start_serve(fetchd, [proxy.url], extra=("--stall-timeout", "120")) as cache,
    ):
        proxy.set_mode("stall-after", digests=[stuck.digest], after=4 * MIB)
        first = pool.submit(read_blob, cache.port, f"/v2/link/two/blobs/{stuck.digest}")
        assert proxy.stalled.wait(60), "the first blob never reached its stall"
        asked = time.monotonic()
        status, data, broke = read_blob(cache.port, f"/v2/link/two/blobs/{next_one.digest}")
        took = time.monotonic() - asked
        assert (status, broke, len(data)) == (200, None, next_one.size)
        assert "sha256:" + sha256_hex(data) == next_one.digest
        assert not first.done(), "the stalled blob's request ended: nothing was held up"
        assert took < link.MAX_WAIT / 2, f"the next blob waited {took:.1f} s"
    assert proxy.bytes_sent(digest=next_one.digest) == next_one.size


def test_concurrent_cold_clients_of_one_tag_make_one_upstream_manifest_request(
    upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    """Single flight for manifests too: 8 clients ask a cold cache for one tag (and 8
    for one digest) while upstream has not answered; upstream is asked once for each and
    every client gets the manifest (before, each client's request went upstream)."""
    want = publish(images, "small", upstream, "flight/small")
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    for reference in ("1", want):
        with (
            ThrottleProxy(upstream, pause=0.0, hold_manifests=True) as slow,
            start_serve(fetchd, [slow.url]) as cache,
            ThreadPoolExecutor(8) as pool,
        ):
            path = f"/v2/flight/small/manifests/{reference}"
            replies = [pool.submit(cache.get, path, headers=accept) for _ in range(8)]
            # every client is waiting in serve (a miss each) while upstream is held, and
            # serve's request reached the upstream (a miss is counted before it is sent)
            wait_until(
                lambda: (
                    cache.metrics()["fetchd_cache_misses_total"] >= 8 and slow.manifest_asks >= 1
                ),
                30,
                "8 clients to wait for the manifest",
                cache.log_path,
            )
            assert slow.manifest_asks == 1, slow.manifest_asks
            slow.manifest_gate.set()
            for reply in replies:
                got = reply.result(timeout=60)
                assert got.status == 200, got
                assert "sha256:" + hashlib.sha256(got.body).hexdigest() == want
            assert slow.manifest_asks == 1, slow.manifest_asks
        shutil.rmtree(fetchd.store)  # cold again for the digest round
    gets = upstream.requests("GET", path_contains="/v2/flight/small/manifests/")
    ours = [g.path.rsplit("/", 1)[1] for g in gets if g.user_agent.startswith("fetchd/")]
    assert ours == ["1", want], gets


def test_a_blob_still_arriving_is_streamed_before_the_upstream_finishes(
    upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    publish(images, "big", upstream, "stream/big")
    (layer,) = images.big.layers
    # 4 MiB in 64 chunks at ~30 ms: the upstream needs about 2 s.
    with ThrottleProxy(upstream, pause=0.03) as slow, start_serve(fetchd, [slow.url]) as cache:
        conn = http.client.HTTPConnection("127.0.0.1", cache.port, timeout=30)
        try:
            conn.request("GET", f"/v2/stream/big/blobs/{layer.digest}")
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.getheader("Content-Length") == str(layer.size)
            assert resp.getheader("Docker-Content-Digest") == layer.digest
            first = resp.read(1)
            first_at = time.monotonic()
            upstream_sent = slow.sent.get(layer.digest, 0)
            upstream_done = layer.digest in slow.finished
            fetches = [f["digest"] for f in cache.status()["fetches"]]
            still_going = layer.digest not in slow.finished
            rest = resp.read()
        finally:
            conn.close()
    body = first + rest
    assert len(body) == layer.size
    assert "sha256:" + sha256_hex(body) == layer.digest
    assert not upstream_done, "the first byte came only after the upstream had sent everything"
    assert upstream_sent < layer.size
    assert first_at < slow.finished[layer.digest]
    if still_going:  # the status page saw the live fetch
        assert layer.digest in fetches
    gets = upstream.blob_gets(layer.digest)
    assert [(g.status, g.bytes) for g in gets] == [(200, layer.size)], gets


def assert_stops_cleanly(cache: ServeProcess) -> None:
    """SIGTERM ends the server with status 0: it did not die or break on its own before."""
    assert cache.stop() == 0, f"fetchd serve ended badly:\n{cache.log()}"
    assert "internal error" not in cache.log(), cache.log()


def read_blob(port: int, path: str) -> tuple[int, bytes, str | None]:
    """GET path: (status, the body bytes that arrived, how the body ended if it broke)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        length = resp.getheader("Content-Length")
        body = b""
        try:
            while chunk := resp.read(CHUNK):  # b"" at the end, or when the server closed
                body += chunk
        except ConnectionResetError:
            return resp.status, body, "reset"
        if length is not None and len(body) < int(length):
            return resp.status, body, f"closed after {len(body)} of {length} bytes"
        return resp.status, body, None
    finally:
        conn.close()


def test_a_blob_that_fails_verification_breaks_the_connection(
    upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    publish(images, "big", upstream, "corrupt/big")
    (layer,) = images.big.layers
    with FaultProxy(upstream.url) as proxy, start_serve(fetchd, [proxy.url]) as cache:
        proxy.set_mode("corrupt")
        status, body, broken = read_blob(cache.port, f"/v2/corrupt/big/blobs/{layer.digest}")
        # Either refused before the body, or the body broken off: never a complete bad blob.
        assert status != 200 or broken is not None, (status, len(body))
        assert len(body) < layer.size or status != 200
        assert not (fetchd.store / "layout/blobs/sha256" / layer.digest.split(":")[1]).exists()
        # The failed fetch is the upstream's fault: the cache stays up and fetches again.
        proxy.set_mode("pass")
        try:
            status, body, broken = read_blob(cache.port, f"/v2/corrupt/big/blobs/{layer.digest}")
        except ConnectionRefusedError:
            code = cache.stop()
            pytest.fail(f"fetchd serve stopped after a failed fetch (exit {code}):\n{cache.log()}")
        assert (status, broken) == (200, None), f"{status} {broken}\n{cache.log()}"
        assert "sha256:" + sha256_hex(body) == layer.digest
        assert_stops_cleanly(cache)


# --- the distribution API, read-only --------------------------------------------------------


def warm(cache: ServeProcess, name: str, image: BuiltImage, dest: Path) -> None:
    """Pull image through the cache, so that its blobs are in the store."""
    assert skopeo_pull(cache, f"{name}:1", dest) == image.digest


def test_ranges_head_unknown_blobs_and_push_attempts(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    publish(images, "big", upstream, "api/big")
    (layer,) = images.big.layers
    data = images.blob_path(layer.digest).read_bytes()
    with start_serve(fetchd, [upstream.url]) as cache:
        warm(cache, "api/big", images.big, tmp_path / "warm")
        blob = f"/v2/api/big/blobs/{layer.digest}"
        for spec, start, end in (
            ("bytes=0-0", 0, 0),
            ("bytes=1000-70999", 1000, 70999),
            (f"bytes={layer.size - 100}-", layer.size - 100, layer.size - 1),
            ("bytes=-4096", layer.size - 4096, layer.size - 1),
        ):
            r = cache.get(blob, headers={"Range": spec})
            assert r.status == 206, (spec, r)
            assert r.headers["Content-Range"] == f"bytes {start}-{end}/{layer.size}", spec
            assert r.body == data[start : end + 1], spec
        r = cache.get(blob, headers={"Range": f"bytes={layer.size}-"})
        assert r.status == 416
        r = cache.get(blob)
        assert r.status == 200 and sha256_hex(r.body) == layer.digest.split(":")[1]

        head = cache.request("HEAD", blob)
        assert head.status == 200 and head.body == b""
        assert head.headers["Content-Length"] == str(layer.size)
        assert head.headers["Docker-Content-Digest"] == layer.digest
        head = cache.request("HEAD", "/v2/api/big/manifests/1")
        assert head.status == 200
        assert head.headers["Docker-Content-Digest"] == images.big.digest
        assert head.headers["Content-Length"] == str(images.big.manifest.size)

        unknown = "sha256:" + sha256_hex(b"no such blob anywhere")
        r = cache.get(f"/v2/api/big/blobs/{unknown}")
        assert (r.status, r.oci_codes) == (404, ["BLOB_UNKNOWN"]), r
        r = cache.request("HEAD", f"/v2/api/big/blobs/{unknown}")
        assert r.status == 404
        r = cache.get("/v2/api/big/manifests/no-such-tag")
        assert (r.status, r.oci_codes) == (404, ["MANIFEST_UNKNOWN"]), r

        before = upstream.requests()
        manifest = images.blob_path(images.big.digest).read_bytes()
        for method, path, body in (
            ("POST", "/v2/api/big/blobs/uploads/", b""),
            ("POST", f"/v2/api/big/blobs/uploads/?digest={unknown}", b"no such blob anywhere"),
            ("PUT", "/v2/api/big/manifests/2", manifest),
            ("PATCH", "/v2/api/big/blobs/uploads/some-uuid", b"x"),
            ("DELETE", f"/v2/api/big/manifests/{images.big.digest}", b""),
            ("DELETE", blob, b""),
        ):
            r = cache.request(method, path, body=body)
            assert (r.status, r.oci_codes) == (405, ["UNSUPPORTED"]), (method, path, r)
        assert upstream.requests() == before, "a write reached the upstream"
        # And the cache still serves what it had.
        assert cache.get(f"/v2/api/big/manifests/{images.big.digest}").body == manifest
        assert cache.get("/v2/").status == 200


def test_blob_etag_is_the_same_for_head_get_and_ranges(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    """One blob, one ETag: a client that resumes with If-Range gets the range it asked for."""
    publish(images, "big", upstream, "etag/big")
    (layer,) = images.big.layers
    data = images.blob_path(layer.digest).read_bytes()
    with start_serve(fetchd, [upstream.url]) as cache:
        warm(cache, "etag/big", images.big, tmp_path / "warm")
        blob = f"/v2/etag/big/blobs/{layer.digest}"
        head = cache.request("HEAD", blob)
        get = cache.get(blob)
        ranged = cache.get(blob, headers={"Range": "bytes=10-19"})
        etags = {head.headers["ETag"], get.headers["ETag"], ranged.headers["ETag"]}
        assert len(etags) == 1, f"HEAD, GET and ranged GET of one blob give ETags {etags}"
        resumed = cache.get(
            blob, headers={"Range": "bytes=10-19", "If-Range": head.headers["ETag"]}
        )
        assert (resumed.status, resumed.body) == (206, data[10:20])


# --- upstream down --------------------------------------------------------------------------


def test_upstream_down_cached_images_serve_and_uncached_fail_fast(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    want = publish(images, "small", upstream, "down/kept")
    publish(images, "other", upstream, "down/other")
    (_, other_layer) = images.other.layers
    # --tag-ttl 0: every tag request asks upstream again, so the stale path is taken.
    with start_serve(fetchd, [upstream.url], extra=("--tag-ttl", "0")) as cache:
        assert skopeo_pull(cache, "down/kept:1", tmp_path / "before") == want
        upstream.stop()
        assert skopeo_pull(cache, "down/kept:1", tmp_path / "by-tag") == want
        assert skopeo_pull(cache, f"down/kept@{want}", tmp_path / "by-digest") == want
        for path in (
            "/v2/down/other/manifests/1",
            f"/v2/down/other/manifests/{images.other.digest}",
            f"/v2/down/other/blobs/{other_layer.digest}",
        ):
            started = time.monotonic()
            r = cache.get(path, timeout=60)
            elapsed = time.monotonic() - started
            assert elapsed < 30, f"{path}: {elapsed:.1f} s"
            assert 500 <= r.status < 600, (path, r)
            assert r.oci_codes, (path, r.body)
        started = time.monotonic()
        result = run(skopeo_copy_argv(cache, "down/other:1", tmp_path / "uncached"))
        assert result.returncode != 0
        assert time.monotonic() - started < 60
        assert cache.get("/healthz").status == 200
    assert "serving the cached copy" in cache.log()


def test_upstream_gone_while_a_blob_is_fetched_fails_the_request_not_the_server(
    upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    """The manifest is cached (its blob sizes known), the blob not; then upstream goes."""
    publish(images, "big", upstream, "gone/big")
    (layer,) = images.big.layers
    with start_serve(fetchd, [upstream.url]) as cache:
        assert cache.get("/v2/gone/big/manifests/1").status == 200
        upstream.stop()
        started = time.monotonic()
        status, body, broken = read_blob(cache.port, f"/v2/gone/big/blobs/{layer.digest}")
        assert time.monotonic() - started < 30
        # The fetch failed before its first byte: an OCI error, not a 200 that breaks off.
        assert (status, broken) == (502, None), (status, broken, body[:200])
        assert Reply(status, http.client.HTTPMessage(), body).oci_codes, body[:200]
        assert cache.get("/healthz").status == 200
        assert cache.get("/v2/gone/big/manifests/1").status == 200  # still served
        assert_stops_cleanly(cache)


# --- hostile clients ------------------------------------------------------------------------

LEAK_MARKERS = (b"root:x:0:0", b"FETCHD-SENTINEL")


def raw_exchange(port: int, data: bytes, timeout: float = 15.0) -> bytes | None:
    """Send data on a fresh connection; the one answer (or what came until the server
    closed); None if the server reset the connection. A server that hangs fails the test."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            answer = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return answer
                answer += chunk
                head, sep, body = answer.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length: *(\d+)", head)
                if sep and length and len(body) >= int(length.group(1)):
                    return answer
        except (ConnectionResetError, BrokenPipeError):
            return None


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_hostile_requests_are_refused_and_read_nothing_outside_the_store(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    publish(images, "big", upstream, "hostile/big")
    # A file outside the store whose name is the digest of its content: a blob in all but place.
    secret = b"FETCHD-SENTINEL " + secrets.token_hex(16).encode() + b"\n"
    sentinel_hex = sha256_hex(secret)
    (tmp_path / sentinel_hex).write_bytes(secret)
    (tmp_path / "sentinel.txt").write_bytes(secret)
    store = fetchd.store
    assert store.parent == tmp_path
    up = "../../../../"  # from STORE/layout/blobs/sha256/ to tmp_path
    h64 = sentinel_hex
    with start_serve(fetchd, [upstream.url]) as cache:
        warm(cache, "hostile/big", images.big, tmp_path / "warm")
        paths = [
            f"/v2/../../etc/passwd/blobs/sha256:{h64}",
            f"/v2/hostile/big/blobs/sha256:{up}{h64}",
            f"/v2/hostile/big/blobs/sha256:{up}sentinel.txt",
            f"/v2/hostile/big/blobs/{up}sentinel.txt",
            f"/v2/hostile/big/manifests/{up}sentinel.txt",
            f"/v2/%2e%2e/%2e%2e/etc/passwd/blobs/sha256:{h64}",
            f"/v2/hostile/big/blobs/sha256%3A{h64}",
            f"/v2/hostile/big/blobs/sha256:..%2F..%2F..%2F..%2F{h64}",
            f"/v2/hostile%2Fbig/blobs/sha256:{h64}",
            "/v2/hostile/big/blobs/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2fsentinel.txt",
            "/v2/hostile/big/blobs/..%5c..%5c..%5c..%5csentinel.txt",
            f"/v2//{tmp_path}/blobs/sha256:{h64}",
            f"/v2/{tmp_path}/sentinel.txt/blobs/sha256:{h64}",
            f"/v2/hostile/big/blobs/{tmp_path}/sentinel.txt",
            "/v2/..\\..\\..\\..\\etc/blobs/sha256:" + h64,
            f"/v2/hostile/big/blobs/sha256:..\\..\\..\\..\\{h64}",
            "/etc/passwd",
            "//etc/passwd",
            f"/{tmp_path}/sentinel.txt",
            "/v2/" + "a" * 5000 + "/manifests/1",
            "/v2/" + "a/" * 2500 + "blobs/sha256:" + h64,
            "/v2/hostile/big/manifests/" + "t" * 5000,
            "/v2/hostile/big/blobs/sha256:xyz",
            "/v2/hostile/big/blobs/md5:" + "0" * 32,
            "/v2/hostile/big/blobs/sha256:" + h64.upper(),
            "/v2/hostile/big/blobs/sha256:" + h64[:63],
            "/v2/hostile/big/blobs/sha256:" + h64 + "00",
            "/v2/hostile/big/blobs/sha256:" + h64 + "/../../../sentinel.txt",
            "/v2/hostile/big/manifests/sha256:xyz",
            "/v2/hostile/big/manifests/md5:" + "0" * 32,
            "/v2/HOSTILE/big/blobs/sha256:" + h64,
        ]
        answers: dict[str, Reply] = {}
        for path in paths:
            answers[path] = cache.get(path)
        for path, r in answers.items():
            assert 400 <= r.status < 500, (path[:120], r.status, r.body[:200])
            for marker in LEAK_MARKERS:
                assert marker not in r.body, (path[:120], r.body[:200])
        # Invalid digests are named as such; the overlong name as a bad name.
        for digest in ("sha256:xyz", "md5:" + "0" * 32, "sha256:" + h64.upper()):
            assert answers[f"/v2/hostile/big/blobs/{digest}"].oci_codes == ["DIGEST_INVALID"]
        assert answers["/v2/" + "a" * 5000 + "/manifests/1"].oci_codes == ["NAME_INVALID"]

        # Raw request lines http.client would not send: absolute and odd request targets.
        for target in (
            f"http://127.0.0.1:{cache.port}/v2/../../{tmp_path}/sentinel.txt",
            f"/v2/hostile/big/blobs/sha256:{h64}#/../../../../sentinel.txt",
            f"{tmp_path}/sentinel.txt",
            "*",
        ):
            answer = raw_exchange(cache.port, f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            if answer:
                assert 400 <= status_of(answer) < 500, (target, answer[:200])
                for marker in LEAK_MARKERS:
                    assert marker not in answer, (target, answer[:300])

        # 64 KiB in one header, and a 64 KiB request line (many lines: the next test).
        big = "a" * 65536
        for request in (
            f"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n",
            f"GET /v2/{big} HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            answer = raw_exchange(cache.port, request.encode())
            if answer:  # refused with an answer, else dropped (None or b"")
                assert status_of(answer) in (400, 413, 414, 431), answer[:200]

        # Still serving, and nothing of the hostile requests reached the upstream's files.
        layer = images.big.layers[0]
        r = cache.get(f"/v2/hostile/big/blobs/{layer.digest}")
        assert r.status == 200 and "sha256:" + sha256_hex(r.body) == layer.digest
    assert not [
        line for line in upstream.requests() if "sentinel" in line.path or ".." in line.path
    ]
    # The sentinel's digest may be asked of the upstream (a well-formed digest the store
    # lacks), but no answer anywhere carried its content: checked above.


SLOW_READ_RATE = 3 * MIB  # bytes a second: a client on a poor link (48 MiB: ~16 s, > the
# 10 s after which fetchd serve drops a connection with no request in progress)


def slow_get(port: int, path: str, rate: float) -> tuple[bytes, bytes, float]:
    """GET path on a socket with a small receive buffer, reading at most `rate` bytes a
    second: (head, body, seconds). The pacing is the slowness under test, not a wait."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.settimeout(30)
    started = time.monotonic()
    try:
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = bytearray()
        while len(data) < 2 * 60 * rate:  # bounded: 2 minutes at the rate
            chunk = sock.recv(256 * 1024)
            if not chunk:
                break
            data += chunk
            ahead = started + len(data) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    finally:
        sock.close()
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return head, body, time.monotonic() - started


def test_a_slow_reader_of_a_big_cached_blob_gets_all_of_it(
    tmp_path: Path, upstream: Registry, fetchd: Fetchd
) -> None:
    """The guard that drops idle connections must not count a response still being sent
    as idle: a client reading a cached 48 MiB blob for longer than that timeout gets it
    whole (it used to be cut off once the handler had handed the file to sendfile)."""
    layout = tmp_path / "layout"
    image = build_image(layout, "large", [random_layer(48 * MIB, 5701)])
    push(layout, "large", f"{upstream.host}/slow/large:1")
    (layer,) = image.layers
    path = f"/v2/slow/large/blobs/{layer.digest}"
    with start_serve(fetchd, [upstream.url]) as cache:
        status, body, broken = read_blob(cache.port, path)  # now it is in the store
        assert (status, broken, len(body)) == (200, None, layer.size)
        # A connection that sends nothing, opened with the slow read: the guard must
        # drop it meanwhile, or the read did not outlast the guard and proves nothing.
        with socket.create_connection(("127.0.0.1", cache.port), timeout=30) as idle:
            head, body, seconds = slow_get(cache.port, path, SLOW_READ_RATE)
            idle.setblocking(False)
            try:
                idle_dropped = idle.recv(1) == b""
            except BlockingIOError:
                idle_dropped = False  # still open
            except ConnectionResetError:
                idle_dropped = True
        assert_stops_cleanly(cache)

    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    assert idle_dropped, f"an idle connection outlived a {seconds:.1f} s read: no guard ran"
    assert len(body) == layer.size, f"{len(body)} of {layer.size} bytes after {seconds:.1f} s"
    assert "sha256:" + sha256_hex(body) == layer.digest


def test_64_kib_of_headers_in_many_lines_are_refused(upstream: Registry, fetchd: Fetchd) -> None:
    """A request whose header block is 64 KiB is refused or dropped, however it is split."""
    with start_serve(fetchd, [upstream.url]) as cache:
        for count, size in ((8, 8000), (64, 1000)):
            fields = "".join(f"X-Pad-{i}: {'p' * size}\r\n" for i in range(count))
            request = f"GET /v2/ HTTP/1.1\r\nHost: x\r\n{fields}\r\n".encode()
            assert len(request) > 64_000
            answer = raw_exchange(cache.port, request)
            if answer:  # refused with an answer, else dropped (None or b"")
                assert status_of(answer) in (400, 413, 431), (
                    f"{count} headers of {size} bytes: {answer[:120]!r}"
                )
        assert cache.get("/healthz").status == 200


def test_slow_clients_are_dropped_while_a_normal_client_keeps_pulling(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    publish(images, "big", upstream, "slow/big")
    (layer,) = images.big.layers
    with start_serve(fetchd, [upstream.url]) as cache:
        warm(cache, "slow/big", images.big, tmp_path / "warm")
        trickle = Trickle(cache.port, 50)
        trickle.start()
        try:
            wait_until(lambda: trickle.connected == 50, 10, "50 slow clients to connect")
            downloads: list[tuple[int, float]] = []  # (slow clients still connected, seconds)
            while trickle.is_alive() and len(downloads) < 500:
                alive = trickle.alive()
                started = time.monotonic()
                r = cache.get(f"/v2/slow/big/blobs/{layer.digest}", timeout=30)
                assert r.status == 200 and "sha256:" + sha256_hex(r.body) == layer.digest
                downloads.append((alive, time.monotonic() - started))
        finally:
            trickle.join(60)
        assert not trickle.is_alive()
    assert downloads and downloads[0][0] == 50, downloads[:3]
    assert max(seconds for _, seconds in downloads) < 10, downloads
    assert trickle.dropped_after.count(None) == 0, trickle.dropped_after
    assert max(t for t in trickle.dropped_after if t is not None) < 16, trickle.dropped_after
    for answer in trickle.answers:
        assert not answer.startswith(b"HTTP/1.1 2"), answer[:200]


class Trickle(threading.Thread):
    """`n` raw connections sending a request one byte a second, headers that never end.

    Records when each was dropped (seconds after connecting; None if never within 25 s)
    and whatever the server sent them.
    """

    PAYLOAD = b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"s" * 4096
    BOUND = 25.0

    def __init__(self, port: int, n: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.n = n
        self.connected = 0
        self.dropped_after: list[float | None] = [None] * n
        self.answers: list[bytes] = []
        self._socks: dict[socket.socket, int] = {}
        self._lock = threading.Lock()

    def alive(self) -> int:
        with self._lock:
            return len(self._socks)

    def run(self) -> None:
        try:
            self._run()
        finally:
            for sock in list(self._socks):
                sock.close()

    def _drop(self, sock: socket.socket, started: float) -> None:
        with self._lock:
            i = self._socks.pop(sock)
        self.dropped_after[i] = time.monotonic() - started
        sock.close()

    def _run(self) -> None:
        for i in range(self.n):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.setblocking(False)
            with self._lock:
                self._socks[sock] = i
            self.connected += 1
        started = time.monotonic()
        received: dict[socket.socket, bytes] = {}
        position = 0
        next_byte = started
        while self._socks and time.monotonic() - started < self.BOUND:
            now = time.monotonic()
            if now >= next_byte:
                byte = self.PAYLOAD[position % len(self.PAYLOAD) : position % len(self.PAYLOAD) + 1]
                position += 1
                next_byte += 1.0
                for sock in list(self._socks):
                    try:
                        sock.send(byte)
                    except OSError:
                        self._drop(sock, started)
            readable, _, _ = select.select(
                list(self._socks), [], [], max(0.0, next_byte - time.monotonic())
            )
            for sock in readable:
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if data:
                    received[sock] = received.get(sock, b"") + data
                    continue
                if sock in received:
                    self.answers.append(received.pop(sock))
                self._drop(sock, started)
        self.answers.extend(received.values())


# --- the admin API --------------------------------------------------------------------------


def test_admin_prefetch_warms_the_cache_and_needs_the_token(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    want = publish(images, "small", upstream, "admin/small")
    token = secrets.token_hex(16)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = json.dumps({"references": [f"{upstream.host}/admin/small:1"]}).encode()
    with start_serve(fetchd, [upstream.url], token_file=token_file) as cache:
        before = len(upstream.requests())
        for headers in (
            {"Content-Type": "application/json"},
            {"Authorization": "Bearer wrong-token-wrong-token", "Content-Type": "application/json"},
            {"Authorization": f"Basic {token}", "Content-Type": "application/json"},
            {"Authorization": f"Bearer {token}x", "Content-Type": "application/json"},
        ):
            r = cache.request("POST", "/fetchd/v1/prefetch", headers=headers, body=body)
            assert (r.status, r.oci_codes) == (401, ["UNAUTHORIZED"]), (headers, r)
            assert cache.request("POST", "/fetchd/v1/gc", headers=headers).status == 401
        assert len(upstream.requests()) == before, "an unauthorised prefetch reached upstream"
        assert cache.status()["cached"] == []

        r = cache.request("POST", "/fetchd/v1/prefetch", headers=auth, body=body)
        assert r.status == 202, r
        job_id = r.json()["id"]
        assert cache.get(f"/fetchd/v1/jobs/{job_id}").status == 401

        def job_state() -> str:
            reply = cache.get(f"/fetchd/v1/jobs/{job_id}", headers=auth)
            assert reply.status == 200, reply
            state: str = reply.json()["state"]
            assert state in ("running", "done"), reply.json()
            return state

        wait_until(lambda: job_state() == "done", 60, f"prefetch job {job_id}", cache.log_path)
        job = cache.get(f"/fetchd/v1/jobs/{job_id}", headers=auth).json()
        assert job["references"][f"{upstream.host}/admin/small:1"]["digest"] == want
        assert upstream.blob_gets(images.small.layers[1].digest)

        # The cache is warm: a pull through it makes no upstream request at all.
        warmed = len(upstream.requests())
        assert skopeo_pull(cache, "admin/small:1", tmp_path / "pulled") == want
        client = Fetchd(tmp_path / "client-store", fetchd.home)
        ok(client(*mirror_only(cache, f"docker://{upstream.host}/admin/small:1")))
        assert len(upstream.requests()) == warmed, upstream.requests()[warmed:]

        # The scheme is case-insensitive (RFC 9110 §11.1); the token is not.
        r = cache.request("POST", "/fetchd/v1/gc", headers={"Authorization": f"bearer {token}"})
        assert r.status == 200, r
        report = r.json()
        assert isinstance(report, dict) and "removed_blobs" in report, report
        # gc keeps what the cache holds for its pulled images.
        assert skopeo_pull(cache, "admin/small:1", tmp_path / "after-gc") == want
        assert len(upstream.requests()) == warmed
        assert cache.get("/fetchd/v1/jobs/no-such-job", headers=auth).status == 404


def test_admin_api_without_a_token_file_refuses_everyone(
    upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    publish(images, "small", upstream, "admin/none")
    body = json.dumps({"references": [f"{upstream.host}/admin/none:1"]}).encode()
    with start_serve(fetchd, [upstream.url]) as cache:
        before = len(upstream.requests())
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
            r = cache.request("POST", "/fetchd/v1/prefetch", headers=headers, body=body)
            assert r.status == 401, (headers, r)
        assert len(upstream.requests()) == before


def test_a_short_token_file_is_refused(tmp_path: Path, upstream: Registry, fetchd: Fetchd) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("short\n")
    port = free_port()
    r = fetchd(
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        upstream.url,
        "--token-file",
        str(token_file),
        timeout=30,
    )
    failed(r, "16 characters")


# --- metrics and health -----------------------------------------------------------------------


def test_metrics_and_healthz(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    publish(images, "small", upstream, "metrics/small")
    blobs = total_blob_bytes(images.small)
    n_blobs = 1 + len(images.small.layers)
    with start_serve(fetchd, [upstream.url]) as cache:
        health = cache.get("/healthz")
        assert (health.status, health.body.strip()) == (200, b"ok")
        skopeo_pull(cache, "metrics/small:1", tmp_path / "cold")
        skopeo_pull(cache, "metrics/small:1", tmp_path / "warm")
        reply = cache.get("/metrics")
        assert reply.status == 200
        assert reply.headers.get_content_type() == "text/plain"
        text = reply.body.decode()
        m = cache.metrics()
    families = set(re.findall(r"^# TYPE (\S+) (?:counter|gauge)$", text, re.M))
    for name in (
        "fetchd_requests_total",
        "fetchd_cache_hits_total",
        "fetchd_cache_misses_total",
        "fetchd_bytes_served_total",
        "fetchd_upstream_bytes_total",
        "fetchd_inflight_fetches",
        "fetchd_store_size_bytes",
    ):
        assert name in families, f"{name} missing from\n{text}"
        assert f"# HELP {name} " in text
    served_200 = m.get('fetchd_requests_total{route="/v2/{tail}",status="200"}', 0)
    assert served_200 >= 2 * (1 + n_blobs), text  # two pulls: manifest + blobs each
    assert m['fetchd_requests_total{route="/healthz",status="200"}'] >= 1
    assert m["fetchd_cache_misses_total"] >= 1 + n_blobs  # the cold pull
    assert m["fetchd_cache_hits_total"] >= n_blobs  # the warm pull
    assert blobs <= m["fetchd_upstream_bytes_total"] <= blobs + images.small.manifest.size
    assert m["fetchd_inflight_fetches"] == 0
    assert m["fetchd_store_size_bytes"] >= blobs
    # Both pulls received every blob from the cache: the warm one from the store.
    assert m["fetchd_bytes_served_total"] >= 2 * blobs, (
        f"bytes served {m['fetchd_bytes_served_total']:.0f} < {2 * blobs} (two pulls of every blob)"
    )


# --- the status page in a real browser ------------------------------------------------------


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile.mkdir(parents=True, exist_ok=True)
    argv = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        *args,
    ]
    env = dict(os.environ, HOME=str(profile))
    return run(argv, env=env)


def png_size(path: Path) -> tuple[int, int, int]:
    """(width, height, bytes of image data once inflated) of a PNG, checking its structure."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, chunk = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return width, height, len(zlib.decompress(idat))


def test_status_page_in_headless_chromium(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    publish(images, "small", upstream, "status/webapp")
    with start_serve(fetchd, [upstream.url]) as cache:
        skopeo_pull(cache, "status/webapp:1", tmp_path / "cold")
        skopeo_pull(cache, "status/webapp:1", tmp_path / "warm")
        page = f"{cache.url}/"
        dom = chromium(tmp_path / "profile-dom", "--virtual-time-budget=3000", "--dump-dom", page)
        assert dom.returncode == 0, dom.stderr[-3000:]
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "serve-status.png"
        shot.unlink(missing_ok=True)
        r = chromium(
            tmp_path / "profile-shot",
            "--virtual-time-budget=3000",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1280,800",
            page,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        status = cache.status()
    html = dom.stdout
    assert "fetchd LAN cache" in html
    # Filled in by the page's script from /fetchd/v1/status:
    assert f"<td>{upstream.host}/status/webapp</td>" in html, html[-3000:]
    assert f"<td>{upstream.host}/status/webapp:1</td>" in html, html[-3000:]
    hit_rate = re.search(r'id="hitrate">([^<]*)<', html)
    assert hit_rate and hit_rate.group(1) == f"{100 * status['hit_rate']:.0f}%", hit_rate
    width, height, raw = png_size(shot)
    assert (width, height) == (1280, 800)
    assert raw >= 1280 * 800 * 3  # every row of pixels is there
    assert shot.stat().st_size > 15_000, "a blank page"


def test_lru_eviction_to_max_size_spares_recent_and_keeps_serving(
    tmp_path: Path, upstream: Registry, images: Images, fetchd: Fetchd
) -> None:
    """--max-size: the least recently used image goes first; a manifest used within
    --grace stays; what remains still serves without the upstream."""
    old_digest = publish(images, "four", upstream, "lru/old")
    new_digest = publish(images, "big", upstream, "lru/new")
    token = secrets.token_hex(16)
    token_file = tmp_path / "token"
    token_file.write_text(token)
    auth = {"Authorization": f"Bearer {token}"}
    limit = total_blob_bytes(images.big) + MIB  # room for "new" alone
    extra = ("--max-size", f"{limit}B", "--grace", "0")
    with start_serve(fetchd, [upstream.url], token_file=token_file, extra=extra) as cache:
        assert skopeo_pull(cache, "lru/old:1", tmp_path / "old") == old_digest
        assert skopeo_pull(cache, "lru/new:1", tmp_path / "new") == new_digest

        r = cache.request("POST", "/fetchd/v1/gc", headers=auth)

        assert r.status == 200, r
        assert old_digest in r.json()["evicted_manifests"]
        blobs = fetchd.blobs()
        assert not {layer.digest for layer in images.four.layers} & blobs
        assert {layer.digest for layer in images.big.layers} <= blobs
        size = sum(
            (fetchd.store / "layout/blobs" / d.replace(":", "/")).stat().st_size for d in blobs
        )
        assert size <= limit
        before = len(upstream.requests())
        assert skopeo_pull(cache, "lru/new:1", tmp_path / "again") == new_digest
        assert not upstream.blob_gets(images.big.layers[0].digest)[1:]
        assert len([x for x in upstream.requests()[before:] if "/blobs/" in x.path]) == 0

    # With the default grace nothing recent is evicted, however small --max-size is.
    store2 = tmp_path / "store2"
    with start_serve(
        store2, [upstream.url], token_file=token_file, extra=("--max-size", "1B")
    ) as cache:
        assert skopeo_pull(cache, "lru/new:1", tmp_path / "new2") == new_digest
        r = cache.request("POST", "/fetchd/v1/gc", headers=auth)
        assert r.status == 200 and r.json()["evicted_manifests"] == [], r
