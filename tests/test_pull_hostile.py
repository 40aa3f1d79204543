"""Hostile registries: every bad answer gives ``error: …``, exit 1, and an unchanged store.

The registry here is a test double of somebody else's misbehaving server
(tests.support.fakeregistry), answering each path as a case dictates.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.cli import Fetchd, failed, ok
from tests.support.fakeregistry import OCI_MANIFEST, Answer, FakeRegistry, sha256


@pytest.fixture(scope="module")
def hostile() -> Iterator[FakeRegistry]:
    with FakeRegistry() as server:
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
    case: str, hostile: FakeRegistry, fetchd: Fetchd
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


def test_nondistributable_layer_comes_from_its_urls(fetchd: Fetchd) -> None:
    """OCI image spec: a non-distributable layer is fetched from its descriptor's urls."""
    blob = b"licensed bits\n" * 1000
    with FakeRegistry() as server:
        server.routes["/external/layer.tar"] = Answer(blob)
        server.image(
            "foreign",
            {
                "digest": sha256(blob),
                "size": len(blob),
                "urls": [f"{server.url}/external/layer.tar"],
            },
            Answer(b"", status=404),
            media_type="application/vnd.oci.image.layer.nondistributable.v1.tar",
        )
        out = ok(fetchd("pull", "--insecure-options", "http", f"docker://{server.host}/foreign:1"))
    assert out.strip().startswith("sha256:")
    assert sha256(blob) in fetchd.blobs()
    assert "ok" in ok(fetchd("fsck"))


@pytest.mark.parametrize(
    "args",
    [
        ("frobnicate",),
        ("pull",),
        ("pull", "--pull-policy", "sometimes", "docker://127.0.0.1:5000/a:1"),
        ("pull", "--insecure-options", "everything", "docker://127.0.0.1:5000/a:1"),
        ("pull", "--resolve", "nonsense", "docker://127.0.0.1:5000/a:1"),
        ("pull", "--digest", "sha256:" + "0" * 64, "https://a/1", "https://a/2"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args: tuple[str, ...], fetchd: Fetchd) -> None:
    result = fetchd(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
