"""Hostile registries: every bad answer gives ``error: …``, exit 1, and an unchanged store.

The registry here is a test double of somebody else's misbehaving server: a few lines
of real HTTP server on 127.0.0.1 that answers each path as a case dictates.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.support.cli import Fetchd, failed
from tests.support.servers import QuietHandler, ServerThread

ENDLESS_LIMIT = 1 << 30  # the "endless" body stops here at the latest
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Answer:
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    endless: bool = False
    send_length: bool = True


class _Handler(QuietHandler):
    def do_GET(self) -> None:
        answer = self.owner.routes.get(self.path.split("?")[0])
        if answer is None:
            answer = Answer(b'{"errors":[{"code":"NAME_UNKNOWN"}]}', status=404)
        self.send_response(answer.status)
        for k, v in answer.headers.items():
            self.send_header(k, v)
        if answer.endless or not answer.send_length:
            self.send_header("Connection", "close")
            self.end_headers()
            self._stream(answer)
            return
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(answer.body)

    def _stream(self, answer: Answer) -> None:
        chunk = answer.body or b"x" * 65536
        sent = 0
        try:
            while sent < ENDLESS_LIMIT and not self.owner.stopping.is_set():
                self.wfile.write(chunk)
                sent += len(chunk)
                if not answer.endless:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        self.close_connection = True


class HostileRegistry(ServerThread):
    def __init__(self) -> None:
        self.routes: dict[str, Answer] = {}
        super().__init__(_Handler)

    def manifest(self, name: str, body: bytes, **headers: str) -> None:
        self.routes[f"/v2/{name}/manifests/1"] = Answer(
            body, {"Content-Type": OCI_MANIFEST, **headers}
        )

    def image(self, name: str, layer: dict[str, object], blob: Answer) -> None:
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
        self.routes[f"/v2/{name}/blobs/{sha256(config)}"] = Answer(config)
        self.routes[f"/v2/{name}/blobs/{layer['digest']}"] = blob
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256(config),
                "size": len(config),
            },
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **layer}],
        }
        self.manifest(name, json.dumps(manifest).encode())


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileRegistry]:
    with HostileRegistry() as server:
        blob = b"b" * 100
        server.manifest("malformed", b'{"schemaVersion": 2, "layers": [')
        server.manifest("huge", b" " * (5 << 20) + b"{}")
        server.routes["/v2/huge-chunked/manifests/1"] = Answer(
            b"[" * 65536, {"Content-Type": OCI_MANIFEST}, endless=True
        )
        server.manifest(
            "lying-digest", b'{"schemaVersion": 2}', **{"Docker-Content-Digest": sha256(b"x")}
        )
        server.image("unknown-alg", {"digest": "md5:" + "0" * 32, "size": 100}, Answer(blob))
        server.image("size-too-small", {"digest": sha256(blob), "size": 10}, Answer(blob))
        server.image("size-too-big", {"digest": sha256(blob), "size": 1000}, Answer(blob))
        server.image("endless-blob", {"digest": sha256(blob), "size": 100}, Answer(endless=True))
        server.image(
            "endless-unannounced",
            {"digest": sha256(blob), "size": 100},
            Answer(blob, send_length=False, endless=True),
        )
        yield server


CASES = {
    "malformed": "not valid JSON",
    "huge": "over the 4194304 byte limit",
    "huge-chunked": "over the 4194304 byte limit",
    "lying-digest": "does not match its digest",
    "unknown-alg": "digest algorithm 'md5' is not supported",
    "size-too-small": "sent more than",
    "size-too-big": "ending the body early",
    "endless-blob": "sent more than",
    "endless-unannounced": "sent more than",
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_answer_is_refused_and_store_unchanged(
    case: str, hostile: HostileRegistry, fetchd: Fetchd
) -> None:
    result = fetchd("pull", "--insecure-options", "http", f"docker://{hostile.host}/{case}:1")

    failed(result, CASES[case])
    assert fetchd.blobs() == set()
    assert fetchd.index().get("manifests", []) == []
    assert fetchd.ingests() == []


@pytest.mark.parametrize(
    "ref",
    [
        "docker://127.0.0.1:5000/../etc/passwd:1",
        "docker://127.0.0.1:5000/a/../b:1",
        "docker://127.0.0.1:5000/a/..:1",
        "docker://127.0.0.1:5000/Upper:1",
        "docker://127.0.0.1:5000/" + "a" * 300 + ":1",
        "docker://127.0.0.1:5000/a@md5:abc",
    ],
)
def test_bad_reference_is_refused_before_any_request(ref: str, fetchd: Fetchd) -> None:
    failed(fetchd("pull", "--insecure-options", "http", ref))
    assert fetchd.blobs() == set()
