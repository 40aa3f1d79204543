"""One index name, two kinds: ``example.com/app:1.0`` is an appc name and also the index
name of ``docker://example.com/app:1.0``. Neither kind silently replaces the other in
``index.json`` (stage1 would then run an image another authority vouched for), and an
appc entry never answers a ``docker://`` pull from the store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fetchd.errors import StoreError
from fetchd.model import Descriptor, Digest
from fetchd.store import layout
from fetchd.store.cas import Store
from tests.support.cli import Fetchd, failed
from tests.support.images import File, Layer, build_image, push, registry_manifest_digest
from tests.support.registry import Registry

NAME = "example.com/app:1.0"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _manifest(store: Store, tag: str) -> Descriptor:
    config = json.dumps({"architecture": "amd64", "os": "linux", "tag": tag}).encode()
    cdig = Digest.of(config)
    store.put(config, cdig)
    doc = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": str(cdig),
            "size": len(config),
        },
        "layers": [],
    }
    raw = json.dumps(doc).encode()
    digest = Digest.of(raw)
    store.put(raw, digest)
    return Descriptor(
        OCI_MANIFEST, digest, len(raw), platform={"os": "linux", "architecture": "amd64"}
    )


def _appc(desc: Descriptor) -> Descriptor:
    ann = {layout.APPC_NAME_ANNOTATION: "example.com/app", layout.APPC_LABELS_ANNOTATION: "{}"}
    return Descriptor(desc.media_type, desc.digest, desc.size, (), ann, desc.platform)


def _names(store: Store) -> list[tuple[str, bool]]:
    return [(e.name, layout.is_appc(e)) for e in layout.entries(store)]


def test_a_registry_image_does_not_replace_an_appc_image(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    layout.set_appc_entry(store, NAME, _appc(_manifest(store, "appc")))
    with pytest.raises(StoreError, match=r"is an appc image; remove it first \(fetchd rm"):
        layout.set_platforms(store, NAME, [_manifest(store, "docker")], None)
    assert _names(store) == [(NAME, True)]


def test_an_appc_image_does_not_replace_a_registry_image(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    layout.set_platforms(store, NAME, [_manifest(store, "docker")], None)
    with pytest.raises(StoreError, match="is a registry image; remove it first"):
        layout.set_appc_entry(store, NAME, _appc(_manifest(store, "appc")))
    assert _names(store) == [(NAME, False)]


def test_each_kind_replaces_its_own(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    layout.set_appc_entry(store, NAME, _appc(_manifest(store, "a1")))
    second = _appc(_manifest(store, "a2"))
    layout.set_appc_entry(store, NAME, second)
    entry = layout.find(store, NAME)
    assert entry is not None and entry.manifest.digest == second.digest


def test_an_appc_entry_never_answers_a_docker_pull(
    fetchd: Fetchd, registry: Registry, tmp_path: Path
) -> None:
    """A stored appc image whose index name equals a docker:// reference's is not "the
    image already in the store" for that pull (which would skip the registry, and any
    publisher check); the pull goes to the registry and then refuses to replace it."""
    build_image(tmp_path / "oci", "kinds", [Layer([File("a", b"docker\n")])])
    name = f"{registry.host}/kinds:1"
    push(tmp_path / "oci", "kinds", name)
    store = Store.open(fetchd.store)
    appc_desc = _appc(_manifest(store, "appc"))
    layout.set_appc_entry(store, name, appc_desc)
    got = fetchd("pull", "--insecure-options", "http", f"docker://{name}")
    failed(got, f"{name} in the store is an appc image; remove it first")
    assert registry_manifest_digest(registry.host, "kinds", "1") not in got.stdout
    entry = layout.find(store, name)
    assert entry is not None and entry.manifest.digest == appc_desc.digest
