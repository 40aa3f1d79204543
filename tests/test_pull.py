"""fetchd pull against the real distribution registry, images pushed with skopeo.

Each test names its own repositories on the shared session registry, so the order of
tests does not matter. Outcomes are checked with other tools: skopeo inspect and umoci
unpack read the store, the registry's access log counts what was transferred.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support.cli import Fetchd, failed, ok
from tests.support.images import (
    BuiltImage,
    File,
    Layer,
    build_image,
    build_index,
    busybox_rootfs_layer,
    push,
    random_layer,
    registry_manifest_digest,
)
from tests.support.registry import Registry

HTTP = ("--insecure-options", "http")


class Images:
    """One OCI layout with every kind of test image, built once for the module."""

    def __init__(self, layout: Path, busybox: Layer) -> None:
        self.layout = layout
        self.oci = build_image(
            layout,
            "oci",
            [busybox, Layer([File("etc/fetchd-test", b"oci\n")])],
            config={"Cmd": ["/bin/sh"]},
        )
        self.zstd = build_image(
            layout,
            "zstd",
            [busybox_rootfs_layer("zstd"), Layer([File("etc/fetchd-test", b"zstd\n")], "zstd")],
        )
        self.multi = build_image(
            layout,
            "multi",
            [
                busybox,
                Layer([File("a.txt", b"gzip layer\n")], "gzip"),
                Layer([File("b.txt", b"plain layer\n")], "none"),
                Layer([File("etc/fetchd-test", b"multi\n")], "gzip"),
            ],
        )
        self.amd64 = build_image(
            layout, "-", [busybox, Layer([File("etc/fetchd-test", b"amd64\n")])], annotate=False
        )
        self.arm64 = build_image(
            layout,
            "-",
            [busybox, Layer([File("etc/fetchd-test", b"arm64\n")])],
            arch="arm64",
            annotate=False,
        )
        build_index(layout, "index", [(self.amd64, "linux/amd64"), (self.arm64, "linux/arm64")])


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, busybox_layer: Layer) -> Images:
    return Images(tmp_path_factory.mktemp("images") / "layout", busybox_layer)


def unpack(layout: Path, name: str, bundle: Path) -> Path:
    """umoci's rendering of the stored image: the reference renderer reads our layout."""
    r = subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{layout}:{name}", str(bundle)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return bundle / "rootfs"


def untar_zstd_layers(fetchd: Fetchd, name: str, rootfs: Path) -> Path:
    rootfs.mkdir()
    blobs = fetchd.store / "layout/blobs/sha256"
    manifest = json.loads((blobs / fetchd.entry(name)["digest"].split(":")[1]).read_bytes())
    for layer in manifest["layers"]:
        assert layer["mediaType"].endswith("+zstd")
        blob = blobs / layer["digest"].split(":")[1]
        r = subprocess.run(
            f"zstd -dc {blob} | tar -x -C {rootfs}", shell=True, capture_output=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
    return rootfs


def skopeo_inspect(store: Path, name: str) -> dict[str, object]:
    r = subprocess.run(
        ["skopeo", "inspect", f"oci:{store}/layout:{name}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    out: dict[str, object] = json.loads(r.stdout)
    return out


# tag in the layout, skopeo --format, --all, what /etc/fetchd-test holds after unpacking
KINDS = {
    "oci-manifest": ("oci", None, False, b"oci\n"),
    "docker-v2s2": ("oci", "v2s2", False, b"oci\n"),
    "oci-index": ("index", None, True, b"amd64\n"),
    "docker-manifest-list": ("index", "v2s2", True, b"amd64\n"),
    "zstd-layers": ("zstd", None, False, b"zstd\n"),
    "multi-layer": ("multi", None, False, b"multi\n"),
}


@pytest.mark.parametrize("kind", KINDS)
def test_pull_each_manifest_kind(
    kind: str, images: Images, registry: Registry, fetchd: Fetchd, tmp_path: Path
) -> None:
    tag, fmt, all_, content = KINDS[kind]
    name = f"{registry.host}/{kind}:1"
    push(images.layout, tag, name, fmt=fmt, all_=all_)
    expected = registry_manifest_digest(registry.host, kind, "1")

    out = ok(fetchd("pull", *HTTP, f"docker://{name}"))

    assert out.strip() == expected
    assert fetchd.entry(name)["annotations"]["org.opencontainers.image.ref.name"] == name
    skopeo_inspect(fetchd.store, name)
    if kind == "zstd-layers":
        # umoci 0.4.7 cannot unpack zstd layers: Debian's zstd and tar render it instead.
        rootfs = untar_zstd_layers(fetchd, name, tmp_path / "rootfs")
    else:
        rootfs = unpack(fetchd.store / "layout", name, tmp_path / "bundle")
    assert (rootfs / "etc/fetchd-test").read_bytes() == content
    assert (rootfs / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert "ok" in ok(fetchd("fsck"))
    if kind == "multi-layer":
        assert (rootfs / "a.txt").read_bytes() == b"gzip layer\n"
        assert (rootfs / "b.txt").read_bytes() == b"plain layer\n"


def test_platform_selects_arm64_manifest(
    images: Images, registry: Registry, fetchd: Fetchd, tmp_path: Path
) -> None:
    name = f"{registry.host}/multiarch:1"
    push(images.layout, "index", name, all_=True)

    out = ok(fetchd("pull", *HTTP, "--platform", "linux/arm64", f"docker://{name}"))

    assert out.strip() == registry_manifest_digest(registry.host, "multiarch", "1")
    entry = fetchd.entry(name)
    assert entry["digest"] == images.arm64.digest
    assert entry["platform"]["architecture"] == "arm64"
    assert f"sha256:{images.amd64.layers[-1].digest.split(':')[1]}" not in fetchd.blobs()
    rootfs = unpack(fetchd.store / "layout", name, tmp_path / "bundle")
    assert (rootfs / "etc/fetchd-test").read_bytes() == b"arm64\n"


def test_unknown_platform_is_a_clear_error(
    images: Images, registry: Registry, fetchd: Fetchd
) -> None:
    name = f"{registry.host}/multiarch-s390x:1"
    push(images.layout, "index", name, all_=True)
    failed(
        fetchd("pull", *HTTP, "--platform", "linux/s390x", f"docker://{name}"),
        "no image for linux/s390x",
        "linux/amd64",
    )
    assert fetchd.blobs() == set()


def test_big_layers_side_by_side_come_one_request_each(
    registry: Registry, fetchd: Fetchd, tmp_path: Path
) -> None:
    """Two layers of over 64 MiB: neither dominates the image, so neither is cut into
    8 MiB ranges (a registry serves those on twice the CPU): each comes in one ranged GET
    of the whole layer, after the 1-byte GET that locates it."""
    layout = tmp_path / "layout"
    built = build_image(layout, "wide", [random_layer(64 << 20, seed=30 + i) for i in range(2)])
    push(layout, "wide", f"{registry.host}/wide:1")

    out = ok(fetchd("pull", *HTTP, f"docker://{registry.host}/wide:1"))

    assert out.strip() == built.digest
    for layer in built.layers:
        assert layer.size > 64 << 20  # the tar header: at the segmented threshold or more
        gets = registry.blob_gets(layer.digest)
        assert sorted((g.status, g.bytes) for g in gets) == [(206, 1), (206, layer.size)], gets
    assert "ok" in ok(fetchd("fsck"))
    assert fetchd.ingests() == []


def test_second_pull_of_present_image_makes_no_request(
    images: Images, registry: Registry, fetchd: Fetchd
) -> None:
    name = f"{registry.host}/twice:1"
    push(images.layout, "multi", name)
    first = ok(fetchd("pull", *HTTP, f"docker://{name}"))
    before = len(registry.requests(path_contains="/twice/"))

    second = ok(fetchd("pull", *HTTP, f"docker://{name}"))

    assert second == first
    assert len(registry.requests(path_contains="/twice/")) == before
    # update re-resolves the tag (one manifest request) but fetches no blob again
    blob_gets = registry.blob_get_count()
    ok(fetchd("pull", *HTTP, "--pull-policy", "update", f"docker://{name}"))
    assert len(registry.requests(path_contains="/twice/")) > before
    assert registry.blob_get_count() == blob_gets


def test_pull_policy_never_without_image_fails(fetchd: Fetchd, registry: Registry) -> None:
    failed(
        fetchd("pull", *HTTP, "--pull-policy", "never", f"docker://{registry.host}/absent:1"),
        "not in the store",
    )


def test_plain_http_needs_insecure_option(
    images: Images, registry: Registry, fetchd: Fetchd
) -> None:
    name = f"{registry.host}/plainhttp:1"
    push(images.layout, "oci", name)
    failed(fetchd("pull", f"docker://{name}"), "--insecure-options http")
    assert fetchd.blobs() == set()


def test_missing_tag_is_not_found(fetchd: Fetchd, registry: Registry) -> None:
    failed(fetchd("pull", *HTTP, f"docker://{registry.host}/nothing-here:1"), "not found")


def test_images_rm_gc_export(
    images: Images, registry: Registry, fetchd: Fetchd, tmp_path: Path
) -> None:
    a, b = f"{registry.host}/keep:1", f"{registry.host}/drop:1"
    push(images.layout, "oci", a)
    push(images.layout, "zstd", b)
    ok(fetchd("pull", *HTTP, f"docker://{a}", f"docker://{b}"))
    listed = json.loads(ok(fetchd("images", "--json")))
    assert {i["name"] for i in listed} == {a, b}
    assert all(i["size"] > 1000 and i["last_used"] for i in listed)

    ok(fetchd("rm", b))
    assert {i["name"] for i in json.loads(ok(fetchd("images", "--json")))} == {a}
    before = fetchd.blobs()
    ok(fetchd("gc"))
    after = fetchd.blobs()
    zstd_only = {layer.digest for layer in images.zstd.layers} - {
        layer.digest for layer in images.oci.layers
    }
    assert zstd_only <= before and not (zstd_only & after)
    assert images.oci.digest in after
    assert "ok" in ok(fetchd("fsck"))

    ok(fetchd("export", a, str(tmp_path / "exported")))
    rootfs = unpack(tmp_path / "exported", a, tmp_path / "bundle")
    assert (rootfs / "etc/fetchd-test").read_bytes() == b"oci\n"
    ok(fetchd("export", a, str(tmp_path / "image.tar")))
    assert (tmp_path / "image.tar").stat().st_size > 1000


def test_gc_max_size_evicts_least_recently_used(
    images: Images, registry: Registry, fetchd: Fetchd
) -> None:
    old, new = f"{registry.host}/lru-old:1", f"{registry.host}/lru-new:1"
    push(images.layout, "zstd", old)
    push(images.layout, "oci", new)
    ok(fetchd("pull", *HTTP, f"docker://{old}"))
    ok(fetchd("pull", *HTTP, f"docker://{new}"))
    oci_size = images.oci.manifest.size + images.oci.config.size
    oci_size += sum(layer.size for layer in images.oci.layers)

    out = ok(fetchd("gc", "--max-size", f"{oci_size}B"))  # bytes: a size needs a unit

    assert f"evicted {old}" in out
    assert {i["name"] for i in json.loads(ok(fetchd("images", "--json")))} == {new}
    assert "ok" in ok(fetchd("fsck"))


def test_fsck_quarantines_a_corrupt_blob(
    images: Images, registry: Registry, fetchd: Fetchd
) -> None:
    name = f"{registry.host}/fsck:1"
    push(images.layout, "oci", name)
    ok(fetchd("pull", *HTTP, f"docker://{name}"))
    victim = images.oci.layers[-1].digest
    path = fetchd.store / "layout/blobs/sha256" / victim.split(":")[1]
    path.chmod(0o644)
    path.write_bytes(b"rotten")

    failed(fetchd("fsck"), "problems")

    assert not path.exists()
    assert (fetchd.store / "quarantine" / victim.replace(":", "-")).read_bytes() == b"rotten"


def _image_blobs(image: BuiltImage) -> set[str]:
    return {image.digest, image.config.digest, *(layer.digest for layer in image.layers)}


def test_two_processes_pull_the_same_image_into_one_store(
    images: Images, registry: Registry, fetchd: Fetchd
) -> None:
    name = f"{registry.host}/concurrent:1"
    push(images.layout, "multi", name)
    procs = [fetchd.popen("pull", *HTTP, f"docker://{name}") for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]

    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == images.multi.digest
    assert fetchd.blobs() == _image_blobs(images.multi)
    fetchd.entry(name)  # exactly one entry for the name, and index.json parses
    assert len(fetchd.index()["manifests"]) == 1
    assert fetchd.ingests() == []
    assert "ok" in ok(fetchd("fsck"))
