"""Hostile or broken peers on the client side: deep JSON, stalls without end, long
Retry-After, silent servers, odd challenges, token realms, names with a newline.

Each peer here is a test double of somebody else's server: a few lines of real HTTP
(or bare TCP) on 127.0.0.1. fetchd runs as a separate process, as a user runs it.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import Fetchd, failed, ok
from tests.support.fakeregistry import (
    CONFIG,
    OCI_MANIFEST,
    Answer,
    FakeRegistry,
    oci_manifest,
    sha256,
)
from tests.support.servers import QuietHandler, ServerThread

HTTP = ("--insecure-options", "http")
DEEP = b"[" * 100_000
DRIP_INTERVAL = 0.25  # seconds between the bytes of a dripping manifest: < --stall-timeout
DRIP_LIMIT = 2000  # bytes dripped at most (8 minutes): bounded even if nobody hangs up


# --- item 14: deeply nested JSON from a peer is an error line, not "internal error" ---


@pytest.fixture(scope="module")
def deep() -> Iterator[FakeRegistry]:
    with FakeRegistry() as server:
        server.manifest("deep-manifest", DEEP)
        server.manifest("deep-object", b'{"a":' * 100_000)
        # a 404 whose OCI error body is deep JSON
        server.routes["/v2/deep-error/manifests/1"] = Answer(DEEP[:60_000], status=404)
        # a token server answering deep JSON
        server.routes["/v2/deep-token/manifests/1"] = Answer(
            status=401, headers={"WWW-Authenticate": f'Bearer realm="{server.url}/token"'}
        )
        server.routes["/token"] = Answer(DEEP, {"Content-Type": "application/json"})
        yield server


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("deep-manifest", "nested too deeply"),
        ("deep-object", "nested too deeply"),
        ("deep-error", "not found"),
        ("deep-token", "nested too deeply"),
    ],
)
def test_deeply_nested_json_gives_one_error_line(
    case: str, needle: str, deep: FakeRegistry, fetchd: Fetchd
) -> None:
    result = fetchd("pull", *HTTP, f"docker://{deep.host}/{case}:1")

    line = failed(result, needle)
    assert "internal error" not in line
    assert len([ln for ln in result.stderr.splitlines() if ln.strip()]) == 1, result.stderr
    assert fetchd.blobs() == set()


# --- item 15: every request has an overall bound -------------------------------------


class _DripHandler(QuietHandler):
    """Announces a 2000-byte manifest, then sends one byte every DRIP_INTERVAL seconds."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", OCI_MANIFEST)
        self.send_header("Content-Length", str(DRIP_LIMIT))
        self.end_headers()
        try:
            for _ in range(DRIP_LIMIT):
                self.wfile.write(b" ")
                self.wfile.flush()
                if self.owner.stopping.wait(DRIP_INTERVAL):
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


def test_dripping_manifest_fails_within_the_request_budget(fetchd: Fetchd) -> None:
    with ServerThread(_DripHandler) as server:
        started = time.monotonic()
        result = fetchd(
            "pull", *HTTP, "--stall-timeout", "1", f"docker://{server.host}/drip:1", timeout=120
        )
        elapsed = time.monotonic() - started

    # 4 × --stall-timeout, at least 5 s: the manifest must be whole by then
    failed(result, "not complete within 5 s", server.host, "--stall-timeout")
    assert elapsed < 60, elapsed  # 5 s and a process start; without the bound: 500 s


def _manifest_requests(server: FakeRegistry, name: str) -> int:
    return sum(1 for path, _ in server.seen if path == f"/v2/{name}/manifests/1")


def test_long_retry_after_fails_at_once(fetchd: Fetchd) -> None:
    with FakeRegistry() as server:
        server.routes["/v2/busy/manifests/1"] = Answer(status=503, headers={"Retry-After": "55"})
        started = time.monotonic()
        result = fetchd("pull", *HTTP, f"docker://{server.host}/busy:1", timeout=120)

        failed(result, "HTTP 503", "retry after 55 s", "try again later")
        assert time.monotonic() - started < 60  # before: four waits of 55 s
        assert _manifest_requests(server, "busy") == 1


def test_retry_after_waits_stay_within_the_request_budget(fetchd: Fetchd) -> None:
    """Retry-After 6 is under the cap (30 s) but over the budget (5 s at --stall-timeout 1):
    the request fails at once instead of waiting four times 6 s."""
    with FakeRegistry() as server:
        server.routes["/v2/busy/manifests/1"] = Answer(status=503, headers={"Retry-After": "6"})
        result = fetchd(
            "pull", *HTTP, "--stall-timeout", "1", f"docker://{server.host}/busy:1", timeout=120
        )

        failed(result, "HTTP 503", "try again later")
        assert _manifest_requests(server, "busy") == 1


class _SilentServer:
    """Accepts TCP connections and never sends a byte (counts them); a context manager."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.host = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.append(conn)

    def __enter__(self) -> _SilentServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(10)
        for conn in [*self.accepted, self.sock]:
            conn.close()


def test_silent_server_fails_within_a_bounded_time(fetchd: Fetchd) -> None:
    with _SilentServer() as server:
        started = time.monotonic()
        result = fetchd(
            "pull", *HTTP, "--stall-timeout", "0.5", f"docker://{server.host}/x:1", timeout=120
        )
        elapsed = time.monotonic() - started

        # the https probe (its handshake bounded by --stall-timeout), then two attempts
        failed(result, server.host, "did not answer", "try again later")
        assert len(server.accepted) <= 3, len(server.accepted)
    assert elapsed < 12, elapsed  # about 2 s; before: 15 s of TLS handshake, 5 attempts


# --- item 17: challenges, token realms and credentials --------------------------------

TOKEN = "tok-123"


class _GateHandler(QuietHandler):
    """A registry that wants a bearer token (challenge as configured) and a token
    endpoint at /token that records the Authorization it was sent."""

    def do_GET(self) -> None:
        server: GatedRegistry = self.owner
        path = self.path.split("?")[0]
        if path == "/token":
            server.token_requests.append(self.headers.get("Authorization"))
            self._answer(200, json.dumps({"token": TOKEN}).encode(), "application/json")
        elif self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_response(401)
            for challenge in server.challenges:
                self.send_header("WWW-Authenticate", challenge.format(url=server.url))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path in server.routes:
            body, ctype = server.routes[path]
            self._answer(200, body, ctype)
        else:
            self._answer(404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}', "application/json")

    def _answer(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class GatedRegistry(ServerThread):
    """Serves one small image, `app:1`, to whoever shows the bearer token."""

    def __init__(self, *challenges: str) -> None:
        self.challenges = challenges
        self.token_requests: list[str | None] = []
        config, layer = CONFIG, b"L" * 100
        tar = "application/vnd.oci.image.layer.v1.tar"
        manifest = json.dumps(
            oci_manifest(config, [{"mediaType": tar, "digest": sha256(layer), "size": len(layer)}])
        ).encode()
        self.digest = sha256(manifest)
        self.routes = {
            "/v2/app/manifests/1": (manifest, OCI_MANIFEST),
            f"/v2/app/blobs/{sha256(config)}": (config, "application/octet-stream"),
            f"/v2/app/blobs/{sha256(layer)}": (layer, "application/octet-stream"),
        }
        super().__init__(_GateHandler)


@pytest.mark.parametrize(
    "challenges",
    [
        ('bearer realm="{url}/token",service="gate"',),  # lower case (RFC 9110: any case)
        # several challenges in one header, Basic first: Bearer is the one to answer
        ('Basic realm="gate", Bearer realm="{url}/token",service="gate"',),
        # or in two headers
        ('Basic realm="gate"', 'Bearer realm="{url}/token"'),
    ],
    ids=["lower-case", "basic-then-bearer", "two-headers"],
)
def test_bearer_challenge_is_read_case_insensitively_among_others(
    challenges: tuple[str, ...], fetchd: Fetchd
) -> None:
    with GatedRegistry(*challenges) as server:
        out = ok(fetchd("pull", *HTTP, f"docker://{server.host}/app:1"))

        assert out.strip() == server.digest
        assert server.token_requests == [None]  # anonymous: no credentials configured


def _auth_file(home: Path, host: str) -> dict[str, str]:
    path = home / "auth.json"
    token = base64.b64encode(b"alice:s3cret").decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return {"REGISTRY_AUTH_FILE": str(path)}


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_credentials_never_go_to_a_realm_on_another_host_named_over_plain_http(
    fetchd: Fetchd, scheme: str
) -> None:
    # "localhost" is this very server, but a host name other than the registry's: over
    # plain http a machine in the middle could have written any realm there, an https
    # one of its own included.
    with GatedRegistry() as server:
        server.challenges = (f'Bearer realm="{scheme}://localhost:{server.port}/token"',)
        env = _auth_file(fetchd.home, server.host)

        line = failed(fetchd("pull", *HTTP, f"docker://{server.host}/app:1", env=env))

        assert "another host named over plain HTTP" in line and "https" in line, line
        assert server.token_requests == []  # not even asked: nothing was sent anywhere
        assert fetchd.blobs() == set()


def test_credentials_go_to_a_plain_http_realm_on_the_registry_host(fetchd: Fetchd) -> None:
    with GatedRegistry('Bearer realm="{url}/token"') as server:
        env = _auth_file(fetchd.home, server.host)

        out = ok(fetchd("pull", *HTTP, f"docker://{server.host}/app:1", env=env))

        assert out.strip() == server.digest
        assert server.token_requests == ["Basic " + base64.b64encode(b"alice:s3cret").decode()]


@pytest.mark.parametrize(
    "suffix",
    [":1\n", "\n", "@sha256:" + "0" * 64 + "\n"],
    ids=["tag", "name", "digest"],
)
def test_reference_with_a_trailing_newline_is_refused_before_any_request(
    suffix: str, fetchd: Fetchd
) -> None:
    with FakeRegistry() as server:
        # the line shows the newline escaped: one line, and the culprit visible
        failed(fetchd("pull", *HTTP, f"docker://{server.host}/app{suffix}"), "\\n")

        assert server.seen == []
