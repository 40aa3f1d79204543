"""A registry double for someone else's misbehaving registry: answers each path as told.

A few lines of real HTTP server on 127.0.0.1 (ThreadingHTTPServer in a thread). Routes
map a path to an :class:`Answer`; :meth:`FakeRegistry.image` lays out a one-layer image
whose layer descriptor and blob answer are given, so each test states only what is bad.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field

from .servers import QuietHandler, ServerThread

ENDLESS_LIMIT = 1 << 30  # the "endless" body stops here at the latest
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


#: the image config of every image these doubles make (the platform the tests run on)
CONFIG = json.dumps(
    {
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, "amd64"),
        "os": "linux",
        "rootfs": {},
    }
).encode()


def oci_manifest(config: bytes, layers: list[dict[str, object]]) -> dict[str, object]:
    """An OCI image manifest of ``config`` and the ``layers`` descriptors."""
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256(config),
            "size": len(config),
        },
        "layers": layers,
    }


@dataclass
class Answer:
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    endless: bool = False
    send_length: bool = True
    delay: float = 0.0  # seconds before the answer (a slow upstream); keep it small


class _Handler(QuietHandler):
    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.owner.seen.append((path, dict(self.headers)))
        needed = self.owner.basic_auth
        if needed and path.startswith("/v2/") and self.headers.get("Authorization") != needed:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="fake"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        answer = self.owner.routes.get(path)
        if answer is None:
            answer = Answer(b'{"errors":[{"code":"NAME_UNKNOWN"}]}', status=404)
        if answer.delay:
            self.owner.stopping.wait(min(answer.delay, 30.0))
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


class FakeRegistry(ServerThread):
    """``routes`` maps a path to its answer; ``seen`` lists (path, request headers);
    with ``basic_auth`` (a whole ``Authorization`` value) /v2/ paths need it (else 401)."""

    def __init__(self, basic_auth: str | None = None) -> None:
        self.routes: dict[str, Answer] = {}
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.basic_auth = basic_auth
        super().__init__(_Handler)

    def manifest(self, name: str, body: bytes, **headers: str) -> None:
        self.routes[f"/v2/{name}/manifests/1"] = Answer(
            body, {"Content-Type": OCI_MANIFEST, **headers}
        )

    def image(
        self,
        name: str,
        layer: dict[str, object],
        blob: Answer,
        media_type: str = "application/vnd.oci.image.layer.v1.tar",
    ) -> None:
        self.routes[f"/v2/{name}/blobs/{sha256(CONFIG)}"] = Answer(CONFIG)
        self.routes[f"/v2/{name}/blobs/{layer['digest']}"] = blob
        manifest = oci_manifest(CONFIG, [{"mediaType": media_type, **layer}])
        self.manifest(name, json.dumps(manifest).encode())
