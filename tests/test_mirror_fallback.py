"""``pull --mirror``: whatever a mirror answers, a failure sends the pull on to the origin.

The origin is the real registry (tests.support.registry); each mirror is a test double
of somebody else's broken mirror or captive portal (tests.support.fakeregistry), answering
the manifest request with one bad answer. The pull must succeed with the origin's digest,
warn naming the mirror, and leave a store that fsck finds clean; with --mirror-only it
must fail with one line instead.
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
from collections.abc import Iterator

import pytest

from tests.support.cli import Fetchd, failed, ok
from tests.support.fakeregistry import OCI_MANIFEST, Answer, FakeRegistry, sha256
from tests.support.registry import Registry

HTTP = ("--insecure-options", "http")
NAME = "mirrored/app"
DEPTH = 100_000


def _request(
    method: str, url: str, body: bytes = b"", **headers: str
) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        resp.read()
        return resp.status, dict(resp.headers)


def push_blob(registry: Registry, name: str, data: bytes) -> dict[str, object]:
    """A monolithic upload (distribution spec: POST, then PUT with the digest)."""
    status, headers = _request("POST", f"{registry.url}/v2/{name}/blobs/uploads/")
    assert status == 202, status
    location = headers["Location"]
    if location.startswith("/"):
        location = registry.url + location
    sep = "&" if "?" in location else "?"
    status, _ = _request(
        "PUT",
        f"{location}{sep}digest={sha256(data)}",
        data,
        **{"Content-Type": "application/octet-stream"},
    )
    assert status == 201, status
    return {"digest": sha256(data), "size": len(data)}


def push_image(registry: Registry, name: str) -> tuple[bytes, str]:
    """A one-layer image at NAME:1 on the real registry: (manifest bytes, its digest)."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {}}).encode()
    layer = hashlib.sha256(b"layer").digest() * 64
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **push_blob(registry, name, config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                **push_blob(registry, name, layer),
            }
        ],
    }
    raw = json.dumps(manifest).encode()
    status, headers = _request(
        "PUT", f"{registry.url}/v2/{name}/manifests/1", raw, **{"Content-Type": OCI_MANIFEST}
    )
    assert status == 201, status
    assert headers["Docker-Content-Digest"] == sha256(raw)
    return raw, sha256(raw)


@pytest.fixture(scope="module")
def origin(registry: Registry) -> tuple[bytes, str]:
    return push_image(registry, NAME)


def bad_answers(good: bytes) -> dict[str, Answer]:
    deep = b"[" * DEPTH + b"]" * DEPTH
    return {
        "captive-portal-html": Answer(
            b"<html><body>Please log in to the hotel Wi-Fi</body></html>",
            {"Content-Type": "text/html; charset=utf-8"},
        ),
        "oversized": Answer(b" " * (5 << 20) + b"{}", {"Content-Type": OCI_MANIFEST}),
        "endless": Answer(b"[" * 65536, {"Content-Type": OCI_MANIFEST}, endless=True),
        "wrong-digest": Answer(
            good, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": sha256(b"other")}
        ),
        "malformed-digest": Answer(
            good, {"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": "sha256:not-hex"}
        ),
        "deep-json": Answer(deep, {"Content-Type": OCI_MANIFEST}),
    }


@pytest.fixture(scope="module")
def mirrors(origin: tuple[bytes, str]) -> Iterator[dict[str, FakeRegistry]]:
    servers: dict[str, FakeRegistry] = {}
    try:
        for case, answer in bad_answers(origin[0]).items():
            server = servers[case] = FakeRegistry()
            server.routes[f"/v2/{NAME}/manifests/1"] = answer
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def test_every_bad_mirror_is_passed_over_for_the_origin(
    mirrors: dict[str, FakeRegistry],
    origin: tuple[bytes, str],
    registry: Registry,
    fetchd: Fetchd,
) -> None:
    """One pull through all the bad mirrors in turn (one process: this suite is timed),
    each allowed to resolve the tag (``--pull-from-mirror all``): each failure must send
    it on to the next, the last one's to the origin; a mirror that failed is not asked
    for blobs either."""
    ref = f"docker://{registry.host}/{NAME}:1"
    order = list(mirrors.values())

    result = fetchd(
        "pull",
        *HTTP,
        "--pull-from-mirror",
        "all",
        *(a for m in order for a in ("--mirror", m.url)),
        ref,
    )

    ok(result)
    assert fetchd.entry(f"{registry.host}/{NAME}:1")["digest"] == origin[1]
    assert "Traceback" not in result.stderr
    for case, mirror in mirrors.items():
        warned = [ln for ln in result.stderr.splitlines() if f"mirror {mirror.url} failed" in ln]
        assert len(warned) == 1, f"{case}: {result.stderr[-3000:]}"
        then = "trying the origin" if mirror is order[-1] else "trying the next mirror"
        assert warned[0].endswith(then), f"{case}: {warned[0]}"
        asked = {p for p, _ in mirror.seen}
        assert asked == {f"/v2/{NAME}/manifests/1"}, f"{case}: {asked}"
    assert "ok" in ok(fetchd("fsck"))


def test_by_default_the_origin_resolves_the_tag_and_mirrors_serve_only_digests(
    mirrors: dict[str, FakeRegistry],
    origin: tuple[bytes, str],
    registry: Registry,
    fetchd: Fetchd,
) -> None:
    """``digest-only`` (registries.conf's default for pull-from-mirror): no mirror is
    asked what the tag means, whatever it would answer; they are asked for blobs by
    digest (and have none), and the origin's digest is the one stored."""
    ref = f"docker://{registry.host}/{NAME}:1"
    order = list(mirrors.values())
    before = {case: len(m.seen) for case, m in mirrors.items()}  # the fixture is shared

    result = fetchd("pull", *HTTP, *(a for m in order for a in ("--mirror", m.url)), ref)

    ok(result)
    assert fetchd.entry(f"{registry.host}/{NAME}:1")["digest"] == origin[1]
    for case, mirror in mirrors.items():
        asked = {p for p, _ in mirror.seen[before[case] :]}
        assert asked, f"{case}: the mirror was not asked for any blob"
        assert all("/blobs/sha256:" in p for p in asked), f"{case}: {asked}"
    assert "ok" in ok(fetchd("fsck"))


def test_mirror_only_fails_with_one_line_naming_the_mirror(
    mirrors: dict[str, FakeRegistry], registry: Registry, fetchd: Fetchd
) -> None:
    mirror = mirrors["deep-json"]
    ref = f"docker://{registry.host}/{NAME}:1"

    line = failed(fetchd("pull", *HTTP, "--mirror", mirror.url, "--mirror-only", ref))

    assert "--mirror-only" in line and mirror.url in line, line
    assert fetchd.blobs() == set()
