"""The test-support layer works against the real peers (registry, skopeo, TLS, token auth)."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import socket
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from tests.support.faultproxy import FaultProxy
from tests.support.images import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    BuiltImage,
    Dir,
    Entry,
    File,
    Hardlink,
    Layer,
    Raw,
    SkopeoError,
    Symlink,
    build_image,
    build_index,
    push,
    random_layer,
    registry_manifest_digest,
    skopeo,
    skopeo_inspect_raw,
)
from tests.support.procs import wait_until
from tests.support.registry import Registry, start_registry
from tests.support.tls import TestCA
from tests.support.tokenserver import start_token_server


def _inspect_digest(ref: str, *flags: str) -> str:
    digest: str = json.loads(skopeo("inspect", *flags, ref))["Digest"]
    return digest


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes()


def _get(host: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(host, timeout=5)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_wait_until_names_what_timed_out(tmp_path: Path) -> None:
    log = tmp_path / "peer.log"
    log.write_text("first\nlast words\n")
    with pytest.raises(TimeoutError, match=r"the moon(.|\n)*last words"):
        wait_until(lambda: False, 0.1, "the moon", log)


def test_layers_hold_what_the_spec_says(tmp_path: Path) -> None:
    hostile = tarfile.TarInfo("../escape")
    hostile.size = 3
    entries: list[Entry] = [
        Dir("d", mode=0o700),
        File("/d/f", b"abc", mode=0o600),
        Hardlink("d/h", "/d/f"),
        Symlink("d/s", "f"),
        Raw(hostile, b"bad"),
    ]
    decompress: dict[str, Callable[[bytes], bytes]] = {
        "none": lambda data: data,
        "gzip": gzip.decompress,
        "zstd": lambda data: zstandard.ZstdDecompressor().decompressobj().decompress(data),
    }
    image = build_image(
        tmp_path / "layout",
        "t",
        [Layer(entries, "none"), Layer(entries, "gzip"), Layer(entries, "zstd")],
    )
    for layer, compression in zip(image.layers, ("none", "gzip", "zstd"), strict=True):
        data = _blob(tmp_path / "layout", layer.digest)
        assert layer.size == len(data)
        assert layer.media_type.endswith(
            {"none": ".tar", "gzip": "+gzip", "zstd": "+zstd"}[compression]
        )
        tar_bytes = decompress[compression](data)
        assert f"sha256:{hashlib.sha256(tar_bytes).hexdigest()}" == layer.diff_id
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            members = {m.name: m for m in tar.getmembers()}
            assert sorted(members) == ["../escape", "d", "d/f", "d/h", "d/s"]
            assert members["d/h"].islnk() and members["d/h"].linkname == "d/f"
            assert members["d/s"].issym() and members["d/s"].linkname == "f"
            assert members["d/f"].mode == 0o600 and members["d"].mode == 0o700
    config = json.loads(_blob(tmp_path / "layout", image.config.digest))
    assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]


def test_pushed_image_keeps_its_digest_and_blob_gets_are_counted(
    registry: Registry, tmp_path: Path, busybox_layer: Layer
) -> None:
    layout = tmp_path / "layout"
    image = build_image(
        layout, "v1", [busybox_layer, random_layer(300_000, seed=1)], config={"Cmd": ["/bin/sh"]}
    )
    push(layout, "v1", f"{registry.host}/selfcheck/single:v1")
    ref = f"docker://{registry.host}/selfcheck/single:v1"
    assert _inspect_digest(ref, "--tls-verify=false") == image.digest
    assert registry_manifest_digest(registry.host, "selfcheck/single", "v1") == image.digest

    big = image.layers[1]
    path = f"/v2/selfcheck/single/blobs/{big.digest}"
    assert _get(registry.host, path) == (200, _blob(layout, big.digest))
    assert _get(registry.host, path, {"Range": "bytes=0-9"})[0] == 206
    assert registry.blob_get_count(big.digest) == 2
    assert registry.blob_bytes_sent(big.digest) == big.size + 10
    assert [line.status for line in registry.blob_gets(big.digest)] == [200, 206]


def _two_platforms(layout: Path, busybox_layer: Layer) -> tuple[BuiltImage, BuiltImage]:
    amd = build_image(layout, "amd64", [busybox_layer], annotate=False)
    arm = build_image(layout, "arm64", [busybox_layer], arch="arm64", variant="v8", annotate=False)
    return amd, arm


def test_multi_arch_index_and_docker_manifest_list(
    registry: Registry, tmp_path: Path, busybox_layer: Layer
) -> None:
    layout = tmp_path / "layout"
    amd, arm = _two_platforms(layout, busybox_layer)
    index = build_index(layout, "multi", [(amd, "linux/amd64"), (arm, "linux/arm64/v8")])

    push(layout, "multi", f"{registry.host}/selfcheck/multi:oci", all_=True)
    raw = skopeo_inspect_raw(f"docker://{registry.host}/selfcheck/multi:oci")
    assert raw["mediaType"] == OCI_INDEX
    assert [m["digest"] for m in raw["manifests"]] == [amd.digest, arm.digest]
    assert registry_manifest_digest(registry.host, "selfcheck/multi", "oci") == index.digest

    push(layout, "multi", f"{registry.host}/selfcheck/multi:docker", all_=True, fmt="v2s2")
    raw = skopeo_inspect_raw(f"docker://{registry.host}/selfcheck/multi:docker")
    assert raw["mediaType"] == DOCKER_MANIFEST_LIST
    assert [m["mediaType"] for m in raw["manifests"]] == [DOCKER_MANIFEST] * 2
    assert raw["manifests"][1]["platform"] == {
        "os": "linux",
        "architecture": "arm64",
        "variant": "v8",
    }


def test_tls_registry(
    tmp_path: Path, tls_ca: TestCA, busybox_layer: Layer, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = tmp_path / "layout"
    image = build_image(layout, "v1", [busybox_layer])
    cert_key = tls_ca.issue_server(tmp_path / "server")
    with start_registry(tmp_path / "registry", tls=cert_key) as reg:
        assert reg.url.startswith("https://")
        dest = f"{reg.host}/selfcheck/tls:v1"
        with pytest.raises(SkopeoError, match="certificate"):
            push(layout, "v1", dest, tls_verify=True)
        push(layout, "v1", dest, tls_verify=True, cert_dir=tls_ca.cert_dir(tmp_path / "certs"))
        monkeypatch.setenv("SSL_CERT_FILE", str(tls_ca.ca_path))
        assert _inspect_digest(f"docker://{dest}", "--tls-verify=true") == image.digest
        digest = registry_manifest_digest(
            reg.host, "selfcheck/tls", "v1", ssl_context=tls_ca.ssl_context()
        )
        assert digest == image.digest
        assert reg.requests("PUT", "/manifests/v1")[0].status == 201


def test_token_auth_round_trip(tmp_path: Path, busybox_layer: Layer) -> None:
    layout = tmp_path / "layout"
    image = build_image(layout, "v1", [busybox_layer])
    with (
        start_token_server(tmp_path / "tokens") as tokens,
        start_registry(tmp_path / "registry", auth=tokens.registry_auth_config()) as reg,
    ):
        ref = f"docker://{reg.host}/private/bb:v1"
        push(layout, "v1", f"{reg.host}/private/bb:v1", creds="alice:s3cret")
        assert _inspect_digest(ref, "--tls-verify=false", "--creds=alice:s3cret") == image.digest
        with pytest.raises(SkopeoError):
            _inspect_digest(ref, "--tls-verify=false", "--creds=alice:wrong")
        with pytest.raises(SkopeoError, match=r"denied|unauthorized"):
            _inspect_digest(ref, "--tls-verify=false", "--no-creds")
    asked = {(r.user, scope, r.status) for r in tokens.requests for scope in r.scopes}
    assert ("alice", "repository:private/bb:pull,push", 200) in asked
    assert ("alice", "repository:private/bb:pull", 401) in asked
    assert all(r.service == "test-registry" for r in tokens.requests)


def test_fault_proxy_modes(registry: Registry, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    image = build_image(layout, "v1", [random_layer(200_000, seed=2)])
    push(layout, "v1", f"{registry.host}/selfcheck/faults:v1")
    layer = image.layers[0]
    body = _blob(layout, layer.digest)
    path = f"/v2/selfcheck/faults/blobs/{layer.digest}"
    with FaultProxy(registry.url) as proxy:
        assert _get(proxy.host, path, {"Range": "bytes=10-19"}) == (206, body[10:20])
        assert proxy.seen[-1].range == "bytes=10-19"

        proxy.set_mode("cut")
        with pytest.raises(http.client.IncompleteRead) as cut:
            _get(proxy.host, path)
        assert len(cut.value.partial) == len(body) // 2
        assert _get(proxy.host, path) == (200, body)  # a blob is cut once only

        proxy.set_mode("corrupt")
        status, corrupt = _get(proxy.host, path)
        assert status == 200 and len(corrupt) == len(body) and corrupt != body

        proxy.set_mode("busy", count=2, status=429)
        assert _get(proxy.host, path)[0] == 429
        assert _get(proxy.host, path)[0] == 429
        assert _get(proxy.host, path) == (200, body)

        proxy.set_mode("stall")
        conn = http.client.HTTPConnection(proxy.host, timeout=0.5)
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read(1000) == body[:1000]
        with pytest.raises(socket.timeout):
            resp.read()
        conn.close()
    faults = [seen.fault for seen in proxy.seen]
    assert faults == ["pass", "cut", "pass", "corrupt", "busy", "busy", "pass", "stall"]


def test_pull_through_registry_counts_upstream_traffic(registry: Registry, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    image = build_image(layout, "v1", [random_layer(50_000, seed=3)])
    push(layout, "v1", f"{registry.host}/selfcheck/origin:v1")
    digest = image.layers[0].digest
    path = f"/v2/selfcheck/origin/blobs/{digest}"
    with start_registry(tmp_path / "mirror", proxy_remote_url=registry.url) as mirror:
        assert _get(mirror.host, path)[0] == 200
        hexdigest = digest.removeprefix("sha256:")
        stored = mirror.storage_dir / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest
        wait_until((stored / "data").exists, 5, "the mirror to store the blob", mirror.log_path)
        assert _get(mirror.host, path)[0] == 200
        assert mirror.blob_get_count(digest) == 2
    # A miss costs two upstream GETs in 2.8: one streamed to the client, one stored.
    assert registry.blob_get_count(digest) == 2
