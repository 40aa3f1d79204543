"""`fetchd serve` against hostile clients and misbehaving upstreams (issue 9).

The upstream here is mostly a test double (tests.support.fakeregistry: a few lines of real
HTTP server answering each path as told), because what is under test is how the cache
answers someone else's bad answers; the clients are raw sockets and http.client, sending
what real clients would not.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import resource
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import Fetchd
from tests.support.fakeregistry import OCI_MANIFEST, Answer, FakeRegistry, sha256
from tests.support.procs import Proc, free_port, wait_until
from tests.support.serve import ServeProcess, start_serve

MIB = 1 << 20
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
LAYER = b"a layer of a test image, not a tar: the cache never looks inside\n" * 64


def image(fake: FakeRegistry, name: str, blob: bytes = LAYER) -> dict[str, str]:
    """Lay out a one-layer image NAME:1 on the fake; its manifest, config and layer digests."""
    fake.image(name, {"digest": sha256(blob), "size": len(blob)}, Answer(blob))
    manifest = fake.routes[f"/v2/{name}/manifests/1"].body
    config = json.loads(manifest)["config"]["digest"]
    return {"manifest": sha256(manifest), "config": config, "layer": sha256(blob)}


def raw_exchange(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send data on a fresh connection; everything the server sent until it closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = b""
        with contextlib.suppress(ConnectionResetError):
            while len(answer) < 1 << 20:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    with FakeRegistry() as registry:
        yield registry


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(secrets.token_hex(16) + "\n")
    return path


def bearer(token_file: Path) -> dict[str, str]:
    return {"Authorization": f"Bearer {token_file.read_text().strip()}"}


@dataclass(frozen=True)
class Shared:
    """One fake upstream and one `fetchd serve` (with an admin token) for the tests whose
    server state does not matter: each uses names of its own."""

    fake: FakeRegistry
    cache: ServeProcess
    token_file: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    root = tmp_path_factory.mktemp("serve-hostile")
    token_file = root / "token"
    token_file.write_text(secrets.token_hex(16) + "\n")
    with FakeRegistry() as fake, start_serve(root / "store", [fake.url], token_file) as cache:
        yield Shared(fake, cache, token_file)


# --- item 7: a dark upstream ------------------------------------------------------------------


class DarkUpstream:
    """Someone else's server that accepts TCP connections and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = self.sock.accept()
                self.held.append(conn)

    def __enter__(self) -> DarkUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for conn in self.held:
            conn.close()
        self.sock.close()


def test_a_cached_tag_is_served_within_5_s_of_a_dark_upstream(
    fake: FakeRegistry, fetchd: Fetchd
) -> None:
    """Item 7: revalidating a cached tag against an upstream that accepts and never answers
    used to take 5 attempts × 30 s; the cached manifest must come within a couple of seconds.
    The same upstream name (a prefix) is served from the real double first, then a dark one."""
    image(fake, "dark/img")
    path = "/v2/reg.test/dark/img/manifests/1"
    with start_serve(fetchd, [f"reg.test={fake.url}"]) as cache:
        first = cache.get(path)
        assert first.status == 200, first
    with (
        DarkUpstream() as dark,
        start_serve(fetchd, [f"reg.test={dark.url}"], extra=("--tag-ttl", "0")) as cache,
    ):
        for _ in range(2):
            started = time.monotonic()
            r = cache.get(path, timeout=200)
            elapsed = time.monotonic() - started
            assert (r.status, r.body) == (200, first.body), r
            assert elapsed < 5, f"the cached tag took {elapsed:.1f} s behind a dark upstream"
        assert dark.held, "the tag was not revalidated at all"
        assert cache.get("/healthz").status == 200
    assert "serving the cached copy" in cache.log()


def test_a_slow_upstream_still_moves_a_cached_tag(fake: FakeRegistry, fetchd: Fetchd) -> None:
    """The cached copy is served after 2 s, but the upstream's late answer still counts:
    cancelling the revalidation at 2 s meant a tag behind a slow upstream never moved."""
    image(fake, "slow/img")
    path = "/v2/reg.test/slow/img/manifests/1"
    with start_serve(fetchd, [f"reg.test={fake.url}"], extra=("--tag-ttl", "0")) as cache:
        old = cache.get(path)
        assert old.status == 200, old
        new = image(fake, "slow/img", b"the tag moved to another layer\n")
        fake.routes["/v2/slow/img/manifests/1"].delay = 3.0
        started = time.monotonic()
        r = cache.get(path, timeout=60)
        assert (r.status, r.body) == (200, old.body), r  # the cached copy, at once
        assert time.monotonic() - started < 5
        wait_until(
            lambda: (
                cache.get(path, timeout=60).headers.get("Docker-Content-Digest") == new["manifest"]
            ),
            30,
            "the tag to move once the slow upstream answered",
            cache.log_path,
        )


# --- item 10: admin request bodies -------------------------------------------------------------


def test_a_1000_reference_prefetch_job_is_answered_and_an_oversized_body_gets_413(
    fake: FakeRegistry, fetchd: Fetchd, token_file: Path
) -> None:
    """Item 10: the connection guard counted a request body as headers and cut off any
    admin request over 32 KiB without an answer."""
    digests = image(fake, "bulk/real")
    # 999 references no upstream of this server serves: each fails at once, with no
    # request anywhere, so the job ends quickly (the size of the body is the point).
    refs = [f"{fake.host}/bulk/real:1"] + [
        f"elsewhere.example/bulk/never-pushed-{i:04d}:1" for i in range(999)
    ]
    body = json.dumps({"references": refs}).encode()
    assert len(body) > 40_000
    auth = {**bearer(token_file), "Content-Type": "application/json"}
    with start_serve(fetchd, [fake.url], token_file=token_file) as cache:
        r = cache.request("POST", "/fetchd/v1/prefetch", headers=auth, body=body)
        assert r.status == 202, r
        job_id = r.json()["id"]
        assert len(r.json()["references"]) == 1000

        def finished() -> bool:
            reply = cache.get(f"/fetchd/v1/jobs/{job_id}", headers=auth)
            assert reply.status == 200, reply
            return bool(reply.json()["state"] != "running")

        wait_until(finished, 60, f"prefetch job {job_id}", cache.log_path)
        job = cache.get(f"/fetchd/v1/jobs/{job_id}", headers=auth).json()
        assert job["references"][refs[0]] == {"state": "done", "digest": digests["manifest"]}
        assert job["references"][refs[1]]["state"] == "failed"
        assert "no upstream" in job["references"][refs[1]]["error"]

        # Over the 1 MiB limit of an admin body: 413 and an OCI error, with or without
        # a Content-Length, and without the token the body is never read (401).
        huge = json.dumps({"references": refs * 30}).encode()
        assert len(huge) > 1 << 20
        r = cache.request("POST", "/fetchd/v1/prefetch", headers=auth, body=huge)
        assert (r.status, r.oci_codes) == (413, ["SIZE_INVALID"]), r
        assert "1048576" in r.body.decode() or "1 MiB" in r.body.decode(), r.body
        chunks = iter([huge[i : i + 65536] for i in range(0, len(huge), 65536)])
        r = cache.request("POST", "/fetchd/v1/prefetch", headers=auth, body=chunks)
        assert (r.status, r.oci_codes) == (413, ["SIZE_INVALID"]), r
        r = cache.request("POST", "/fetchd/v1/prefetch", body=huge)
        assert r.status == 401, r
        assert cache.get("/healthz").status == 200


# --- item 13: a connection flood at nofile 1024 -------------------------------------------------

FLOOD = 10_000
LOG_LIMIT = 64 * 1024


@contextlib.contextmanager
def nofile_at_least(n: int) -> Iterator[None]:
    """Raise this test process's own RLIMIT_NOFILE (root may raise the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n), max(hard, n)))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def timed_blob(port: int, path: str, digest: str) -> float:
    """GET a blob on a fresh connection, check its digest; the seconds it took, connect included."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 200, (resp.status, body[:200])
    assert sha256(body) == digest
    return time.monotonic() - started


def test_a_connection_flood_at_nofile_1024_starves_no_client_and_floods_no_log(
    fake: FakeRegistry, fetchd: Fetchd
) -> None:
    """Item 13: 10,000 idle connections against a server with 1024 descriptors used to
    make a 64 MiB blob take 20 s (the client's connection waited behind the flood for
    descriptors) while asyncio logged a traceback for every failed accept."""
    blob = os.urandom(64 * MIB)
    digests = image(fake, "flood/big", blob)
    path = f"/v2/flood/big/blobs/{digests['layer']}"
    with (
        nofile_at_least(FLOOD + 2048),
        start_serve(fetchd, [fake.url], nofile=1024) as cache,
    ):
        assert cache.get("/v2/flood/big/manifests/1").status == 200
        timed_blob(cache.port, path, digests["layer"])  # now it is in the store
        unloaded = min(timed_blob(cache.port, path, digests["layer"]) for _ in range(3))
        bound = max(2 * unloaded, 3.0)
        log_before = cache.log_path.stat().st_size
        flood: list[socket.socket] = []
        try:
            for _ in range(FLOOD):
                sock = socket.socket()
                sock.setblocking(False)
                flood.append(sock)
                sock.connect_ex(("127.0.0.1", cache.port))
            loaded = [timed_blob(cache.port, path, digests["layer"]) for _ in range(3)]
        finally:
            for sock in flood:
                sock.close()
        assert max(loaded) < bound, f"unloaded {unloaded:.2f} s, during the flood {loaded}"
        assert cache.get("/healthz").status == 200
        grown = cache.log_path.stat().st_size - log_before
    assert grown < LOG_LIMIT, f"the log grew {grown} bytes:\n{cache.log()[-2000:]}"
    # The flood did reach the limit (else it proved nothing): idle connections were shed.
    assert "closed idle ones" in cache.log(), cache.log()[-2000:]


def test_malformed_requests_get_a_400_and_leave_no_traceback_in_the_log(shared: Shared) -> None:
    """A client's malformed request is the client's fault: it gets its 400, and the log
    does not grow a traceback per request (aiohttp logs each one as an ERROR)."""
    cache = shared.cache
    before = cache.log_path.stat().st_size
    for i in range(200):
        answer = raw_exchange(cache.port, f"GET /v2/ HTTP/1.1\r\nX-{i}: \x01\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.") and status_of(answer) == 400, answer[:200]
    assert cache.get("/healthz").status == 200
    grown = cache.log_path.stat().st_size - before
    assert grown < 4096, f"the log grew {grown} bytes:\n{cache.log()[-2000:]}"


def test_headers_over_32_kib_are_refused_even_after_blank_lines(shared: Shared) -> None:
    """Blank lines before a request line are skipped by the parser; the guard took the
    first of them for the end of the headers and let 800 KB of headers through."""
    cache = shared.cache
    for prefix in (b"", b"\r\n\r\n"):
        headers = b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(40))
        answer = raw_exchange(
            cache.port, prefix + b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n"
        )
        assert not answer.startswith(b"HTTP/1.1 200"), (prefix, answer[:200])
    # A few blank lines and a small request are still fine.
    answer = raw_exchange(
        cache.port, b"\r\n\r\nGET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


def test_clients_that_reset_mid_blob_leave_no_traceback_in_the_log(shared: Shared) -> None:
    """A client killed while a blob goes out to it (the soak test kills many) is routine:
    aiohttp logged an ERROR with a traceback for each (ConnectionResetError under
    sendfile)."""
    cache = shared.cache
    blob = os.urandom(16 * MIB)
    digests = image(shared.fake, "gone/big", blob)
    path = f"/v2/gone/big/blobs/{digests['layer']}"
    assert cache.get("/v2/gone/big/manifests/1").status == 200
    timed_blob(cache.port, path, digests["layer"])  # now it is in the store
    before = cache.log_path.stat().st_size
    for _ in range(30):
        with socket.create_connection(("127.0.0.1", cache.port), timeout=15) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            # Close with a reset (SO_LINGER 0), as a killed process's kernel may.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    timed_blob(cache.port, path, digests["layer"])  # and the server still serves it
    grown = cache.log_path.read_bytes()[before:].decode(errors="replace")
    assert "Traceback" not in grown and "ERROR" not in grown, grown[-3000:]


# --- item 14: clear answers, not 500 -------------------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000


def test_an_upstream_answering_html_or_deep_json_is_a_502_naming_the_problem(
    shared: Shared,
) -> None:
    fake, cache = shared.fake, shared.cache
    fake.routes["/v2/bad/html/manifests/1"] = Answer(
        b"<html><body>Log in to the hotel Wi-Fi</body></html>", {"Content-Type": "text/html"}
    )
    fake.routes["/v2/bad/deep/manifests/1"] = Answer(DEEP, {"Content-Type": OCI_MANIFEST})
    fake.routes["/v2/bad/deep-error/manifests/1"] = Answer(
        DEEP[:60_000], {"Content-Type": "application/json"}, status=404
    )
    fake.routes["/v2/bad/deep/tags/list"] = Answer(DEEP, {"Content-Type": "application/json"})
    for path, words in (
        ("/v2/bad/html/manifests/1", ("JSON",)),
        ("/v2/bad/deep/manifests/1", ("nested", "deep")),
        ("/v2/bad/deep/tags/list", ("nested", "deep", "not a tag list")),
    ):
        r = cache.get(path)
        assert r.status == 502 and r.oci_codes, (path, r)
        message = r.json()["errors"][0]["message"]
        assert any(w in message for w in words) and fake.host in message, (path, message)
    # A 404 whose error body is deep JSON: still the 404 (or a 502), never a 500.
    r = cache.get("/v2/bad/deep-error/manifests/1")
    assert (r.status, r.oci_codes) in ((404, ["MANIFEST_UNKNOWN"]), (502, ["UNAVAILABLE"])), r
    assert cache.get("/healthz").status == 200


def test_a_non_ascii_authorization_header_is_refused_not_a_500(shared: Shared) -> None:
    cache = shared.cache
    for target in ("POST /fetchd/v1/prefetch", "GET /fetchd/v1/jobs/x", "POST /fetchd/v1/gc"):
        request = (
            f"{target} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n"
        ).encode() + b"Authorization: Bearer \xff\xfe\xe9t\xc3\xa9\r\n\r\n{}"
        answer = raw_exchange(cache.port, request)
        assert status_of(answer) in (400, 401), (target, answer[:300])
    assert cache.get("/healthz").status == 200


def test_a_manifest_request_by_a_blob_digest_is_manifest_unknown(shared: Shared) -> None:
    fake, cache = shared.fake, shared.cache
    digests = image(fake, "blob/asmanifest", os.urandom(4096))
    assert cache.get("/v2/blob/asmanifest/manifests/1").status == 200
    for kind in ("layer", "config"):
        assert cache.get(f"/v2/blob/asmanifest/blobs/{digests[kind]}").status == 200
    for kind in ("layer", "config"):
        for method in ("GET", "HEAD"):
            r = cache.request(method, f"/v2/blob/asmanifest/manifests/{digests[kind]}")
            assert r.status == 404, (kind, method, r)
            if method == "GET":
                assert r.oci_codes == ["MANIFEST_UNKNOWN"], (kind, r)
    by_digest = cache.get(f"/v2/blob/asmanifest/manifests/{digests['manifest']}")
    assert by_digest.status == 200


# --- item 17: Range, Accept, the status page ---------------------------------------------------


def test_unsatisfiable_ranges_are_416_with_the_size(shared: Shared) -> None:
    fake, cache = shared.fake, shared.cache
    blob = os.urandom(1000)
    digests = image(fake, "range/blob", blob)
    path = f"/v2/range/blob/blobs/{digests['layer']}"
    assert cache.get("/v2/range/blob/manifests/1").status == 200  # the blob's size
    assert cache.get(path).body == blob
    for header in ("bytes=-0", "bytes=1000-", "bytes=1000-2000", "bytes=5000-6000"):
        r = cache.get(path, headers={"Range": header})
        assert r.status == 416, (header, r.status, r.body[:100])
        assert r.headers["Content-Range"] == "bytes */1000", (header, r.headers)
    for header, start, end in (
        ("bytes=0-0", 0, 0),
        ("bytes=-5", 995, 999),
        ("bytes=990-", 990, 999),
        ("bytes=10-19", 10, 19),
        ("bytes=900-5000", 900, 999),
        ("bytes=-5000", 0, 999),
    ):
        r = cache.get(path, headers={"Range": header})
        assert (r.status, r.body) == (206, blob[start : end + 1]), (header, r.status)
        assert r.headers["Content-Range"] == f"bytes {start}-{end}/1000", header
    for header in ("bytes=0-1,5-6", "items=0-1"):  # not served as ranges: the whole blob
        r = cache.get(path, headers={"Range": header})
        assert (r.status, r.body) == (200, blob), header
    for header in ("bytes=5-1", "bytes=x-y", "bytes=" + "9" * 5000 + "-"):
        r = cache.get(path, headers={"Range": header})
        assert r.status == 416, (header[:40], r.status)
    etag = cache.request("HEAD", path).headers["ETag"]
    r = cache.get(path, headers={"Range": "bytes=-0", "If-Range": '"sha256:other"'})
    assert (r.status, r.body) == (200, blob)  # If-Range does not match: the whole blob
    r = cache.get(path, headers={"Range": "bytes=1-2", "If-Range": etag})
    assert (r.status, r.body) == (206, blob[1:3])


def test_a_manifest_is_served_only_in_a_media_type_the_client_accepts(shared: Shared) -> None:
    """distribution/registry's answer: an OCI manifest for a client that lists manifest
    types but not OCI's is MANIFEST_UNKNOWN (404); no Accept, or */*, accepts anything."""
    fake, cache = shared.fake, shared.cache
    image(fake, "accept/oci")
    path = "/v2/accept/oci/manifests/1"
    for accept in (
        None,
        "*/*",
        "application/*",
        OCI_MANIFEST,
        f"{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.5",
    ):
        r = cache.get(path, headers={"Accept": accept} if accept else {})
        assert r.status == 200, (accept, r)
        assert r.headers["Content-Type"] == OCI_MANIFEST
    for accept in (
        DOCKER_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ):
        for method in ("GET", "HEAD"):
            r = cache.request(method, path, headers={"Accept": accept})
            assert r.status == 404, (accept, method, r)
            if method == "GET":
                assert r.oci_codes == ["MANIFEST_UNKNOWN"], r
                assert "OCI manifest" in r.json()["errors"][0]["message"]


class NetnsServe:
    """`fetchd serve --listen 0.0.0.0:PORT` inside a network namespace of its own (only
    lo, up): a server that listens beyond loopback, reachable only by probes run in that
    namespace with nsenter. Stopped by its PID."""

    def __init__(self, fetchd: Fetchd, upstream: str, token_file: Path, *args: str) -> None:
        self.port = free_port()
        serve = fetchd.argv(
            "serve",
            "--listen",
            f"0.0.0.0:{self.port}",
            "--upstream",
            upstream,
            "--token-file",
            str(token_file),
            # BitTorrent listens on one address, never a wildcard (issue 12)
            "--bt-listen",
            "127.0.0.1",
            *args,
        )
        script = 'ip link set lo up && exec "$@"'
        argv = ["unshare", "--net", "sh", "-c", script, "sh", *serve]
        self.proc = Proc(
            argv, fetchd.store.parent / f"serve-netns-{self.port}.log", env=fetchd.env()
        )
        try:
            wait_until(self._ready, 30, "serve in its namespace", self.proc.log_path)
        except BaseException:
            self.proc.stop()
            raise

    def _ready(self) -> bool:
        self.proc.check_running()
        return self.curl("/healthz")[0] == 200

    def curl(self, path: str, *headers: str) -> tuple[int, str]:
        argv = ["nsenter", f"--target={self.proc.pid}", "--net", "curl", "-s", "-m", "10"]
        for h in headers:
            argv += ["-H", h]
        argv += ["-w", "\n%{http_code}", f"http://127.0.0.1:{self.port}{path}"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
        body, _, code = out.rpartition("\n")
        return int(code or 0), body

    def __enter__(self) -> NetnsServe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()


DETAILS = ("cached", "recent", "fetches")


def test_the_status_page_lists_images_only_when_asked_or_on_loopback(
    fake: FakeRegistry, fetchd: Fetchd, token_file: Path
) -> None:
    image(fake, "status/private")
    auth = bearer(token_file)
    # On loopback the page stays public by default (test_serve's status page test reads
    # it so); --no-public-status makes it private.
    with start_serve(
        fetchd, [fake.url], token_file=token_file, extra=("--no-public-status",)
    ) as cache:
        assert cache.get("/v2/status/private/manifests/1").status == 200
        check_private(cache, auth)
    # Beyond loopback the default is private, and --public-status makes it public.
    with NetnsServe(fetchd, fake.url, token_file) as remote:
        code, text = remote.curl("/fetchd/v1/status")
        doc = json.loads(text)
        assert code == 200 and "hits" in doc and not set(DETAILS) & set(doc), doc
        code, page = remote.curl("/")
        assert code == 200 and "fetchd LAN cache" in page and fake.host not in page
        code, text = remote.curl("/fetchd/v1/status", f"Authorization: {auth['Authorization']}")
        assert code == 200 and set(DETAILS) <= set(json.loads(text)), text
    with NetnsServe(fetchd, fake.url, token_file, "--public-status") as remote:
        code, text = remote.curl("/fetchd/v1/status")
        assert code == 200 and set(DETAILS) <= set(json.loads(text)), text


def check_private(cache: ServeProcess, auth: dict[str, str]) -> None:
    doc = cache.status()
    assert {"hits", "misses", "hit_rate"} <= set(doc) and not set(DETAILS) & set(doc), doc
    page = cache.get("/").body.decode()
    assert "fetchd LAN cache" in page and "127.0.0.1" not in page, page[:500]
    full = cache.get("/fetchd/v1/status", headers=auth).json()
    assert full["cached"] and full["recent"], full
    wrong = cache.get("/fetchd/v1/status", headers={"Authorization": "Bearer nope"}).json()
    assert not set(DETAILS) & set(wrong)
