"""Several platforms per name (issue 10 items 1 and 2), against the real registry.

A name pulled for one platform is one index.json entry naming that platform's manifest;
a second platform of the same registry index joins it, and the entry then names an OCI
index fetchd writes, listing the stored platforms. What others see is checked with
them: skopeo inspect (and copy) with --override-arch, umoci unpack, stage1 run; what
moved over the wire with the registry's access log.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from fetchd.model import Platform
from tests.support.cli import Fetchd, failed, ok
from tests.support.images import (
    BuiltImage,
    File,
    Layer,
    build_image,
    build_index,
    push,
    registry_manifest_digest,
)
from tests.support.registry import Registry
from tests.support.stage1 import Stage1, check_error

HTTP = ("--insecure-options", "http")
INDEX_DIGEST = "io.fetchd.index.digest"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
#: this machine's architecture and another one's (the tests run on either)
MINE = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
OTHER = "arm64" if MINE == "amd64" else "amd64"


class Images:
    """An OCI layout with an index of MINE + OTHER (+ arm/v7), and single-platform images."""

    def __init__(self, layout: Path, busybox: Layer) -> None:
        self.layout = layout

        def one(arch: str, variant: str | None = None) -> BuiltImage:
            label = arch + (f"/{variant}" if variant else "")
            return build_image(
                layout,
                "-",
                [busybox, Layer([File("etc/fetchd-test", f"{label}\n".encode())])],
                config={"Cmd": ["/bin/cat", "/etc/fetchd-test"]},
                arch=arch,
                variant=variant,
                annotate=False,
            )

        self.mine, self.other, self.arm = one(MINE), one(OTHER), one("arm", "v7")
        build_index(layout, "two", [(self.mine, f"linux/{MINE}"), (self.other, f"linux/{OTHER}")])
        build_index(
            layout,
            "three",
            [
                (self.mine, f"linux/{MINE}"),
                (self.other, f"linux/{OTHER}"),
                (self.arm, "linux/arm/v7"),
            ],
        )
        build_image(
            layout,
            "foreign",
            [busybox],
            config={"Cmd": ["/bin/true"]},
            arch=OTHER,
        )

    def by_arch(self, arch: str) -> BuiltImage:
        return self.mine if arch == MINE else self.other


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, busybox_layer: Layer) -> Images:
    return Images(tmp_path_factory.mktemp("images") / "layout", busybox_layer)


def stored(fetchd: Fetchd, name: str) -> list[dict[str, object]]:
    """The image manifests the store holds for NAME: the entry, or its index's items."""
    entry = fetchd.entry(name)
    if entry["mediaType"] != OCI_INDEX:
        return [entry]
    blob = fetchd.store / "layout/blobs/sha256" / entry["digest"].split(":")[1]
    return list(json.loads(blob.read_bytes())["manifests"])


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["skopeo", *args], capture_output=True, text=True, timeout=120)


def images_json(fetchd: Fetchd, name: str) -> dict[str, object]:
    rows = [r for r in json.loads(ok(fetchd("images", "--json"))) if r["name"] == name]
    assert len(rows) == 1, rows
    return dict(rows[0])


def test_second_platform_joins_the_first(
    images: Images, registry: Registry, fetchd: Fetchd, tmp_path: Path
) -> None:
    name = f"{registry.host}/plat/two:1"
    push(images.layout, "two", name, all_=True)
    top = registry_manifest_digest(registry.host, "plat/two", "1")

    assert ok(fetchd("pull", *HTTP, f"docker://{name}")).strip() == top
    assert fetchd.entry(name)["digest"] == images.mine.digest  # one platform: its manifest
    before = {line.blob_digest for line in registry.blob_gets()}

    # policy new, a platform not stored: asked of the registry, and only its blobs come
    out = ok(fetchd("pull", *HTTP, "--platform", f"linux/{OTHER}", f"docker://{name}"))

    assert out.strip() == top  # still the registry's digest
    fetched = [line.blob_digest for line in registry.blob_gets()]
    fetched_now = [d for d in fetched if d not in before]
    other_only = {images.other.config.digest, images.other.layers[-1].digest}
    assert sorted(fetched_now) == sorted(other_only)  # the shared busybox layer: not again
    entry = fetchd.entry(name)
    assert entry["mediaType"] == OCI_INDEX
    assert entry["annotations"][INDEX_DIGEST] == top
    assert {(m["digest"], m["platform"]["architecture"]) for m in stored(fetchd, name)} == {
        (images.mine.digest, MINE),
        (images.other.digest, OTHER),
    }
    assert sorted(images_json(fetchd, name)["platforms"]) == sorted(
        [f"linux/{MINE}", f"linux/{OTHER}"]
    )
    row = next(ln for ln in ok(fetchd("images")).splitlines() if ln.startswith(name))
    assert f"linux/{MINE}" in row and f"linux/{OTHER}" in row
    assert "ok" in ok(fetchd("fsck"))

    # skopeo picks each stored platform; a copy of what it picks is that manifest
    oci = f"oci:{fetchd.store}/layout:{name}"
    for arch in (MINE, OTHER):
        r = skopeo("inspect", "--override-arch", arch, oci)
        assert r.returncode == 0, r.stderr
        seen = json.loads(r.stdout)
        assert seen["Architecture"] == arch
        assert seen["Layers"] == [layer.digest for layer in images.by_arch(arch).layers]
    copied = tmp_path / "copied"
    r = skopeo("copy", "--override-arch", OTHER, oci, f"oci:{copied}:x")
    assert r.returncode == 0, r.stderr
    copied_index = json.loads((copied / "index.json").read_text())
    assert copied_index["manifests"][0]["digest"] == images.other.digest

    # stage1 runs this machine's platform
    stage1 = Stage1(fetchd.store)
    r = stage1.run("run", f"docker://{name}")
    assert (r.returncode, r.stdout) == (0, f"{MINE}\n"), r.stderr

    # a second pull of either platform asks the registry nothing
    requests = len(registry.requests())
    ok(fetchd("pull", *HTTP, "--platform", f"linux/{OTHER}", f"docker://{name}"))
    ok(fetchd("pull", *HTTP, f"docker://{name}"))
    assert len(registry.requests()) == requests

    # rm --platform: this machine's goes; the other stays, and stage1 refuses it
    assert ok(fetchd("rm", "--platform", f"linux/{MINE}", name)) == f"{name} linux/{MINE}\n"
    entry = fetchd.entry(name)
    assert (entry["digest"], entry["platform"]["architecture"]) == (images.other.digest, OTHER)
    assert entry["annotations"][INDEX_DIGEST] == top
    line = check_error(stage1.run("run", f"docker://{name}"))
    assert line == (
        f"error: image docker://{name} is in the store for linux/{OTHER}, not for this machine "
        f"(linux/{MINE}); run: fetchd pull docker://{name}"
    )
    assert "ok" in ok(fetchd("fsck"))
    # the last platform takes the name with it
    ok(fetchd("rm", "--platform", f"linux/{OTHER}", name))
    assert name not in ok(fetchd("images"))


def test_rm_of_a_platform_not_stored_changes_nothing(
    images: Images, registry: Registry, fetchd: Fetchd
) -> None:
    name = f"{registry.host}/plat/rm-none:1"
    push(images.layout, "two", name, all_=True)
    ok(fetchd("pull", *HTTP, f"docker://{name}"))
    index = (fetchd.store / "layout/index.json").read_bytes()

    failed(
        fetchd("rm", "--platform", "linux/s390x", name),
        f"{name} is not in the store for linux/s390x (it is for linux/{MINE})",
    )

    assert (fetchd.store / "layout/index.json").read_bytes() == index


def test_arm64_v8_is_arm64(images: Images, registry: Registry, fetchd: Fetchd) -> None:
    """containerd's normalisation: the index says linux/arm64, the user linux/arm64/v8."""
    name = f"{registry.host}/plat/v8:1"
    push(images.layout, "two", name, all_=True)
    arm64 = images.by_arch("arm64")

    ok(fetchd("pull", *HTTP, "--platform", "linux/arm64/v8", f"docker://{name}"))

    assert fetchd.entry(name)["digest"] == arm64.digest
    # and aarch64, in capitals, names it too: present, so no request
    requests = len(registry.requests())
    ok(fetchd("pull", *HTTP, "--platform", "Linux/AArch64", f"docker://{name}"))
    assert len(registry.requests()) == requests
    assert fetchd.entry(name)["digest"] == arm64.digest


def test_containerd_platform_rules() -> None:
    """The ordered list each platform runs, as containerd's platforms.Only has it."""

    def accepts(text: str) -> list[str]:
        return [str(p) for p in Platform.parse(text).accepts()]

    assert Platform.parse("linux/arm64/v8") == Platform.parse("linux/aarch64")
    assert Platform.parse("linux/amd64/v1") == Platform.parse("linux/x86_64")
    assert Platform.parse("linux/arm") == Platform.parse("linux/arm/v7")
    assert accepts("linux/arm/v7") == ["linux/arm/v7", "linux/arm/v6", "linux/arm/v5"]
    # A variant the table does not know (yet) still matches itself, first.
    assert accepts("linux/arm64/v10")[0] == "linux/arm64/v10"
    assert accepts("linux/amd64") == ["linux/amd64", "linux/386"]
    assert accepts("linux/amd64/v3") == [
        "linux/amd64/v3",
        "linux/amd64/v2",
        "linux/amd64",
        "linux/386",
    ]
    assert accepts("linux/arm64") == [
        "linux/arm64",
        "linux/arm/v8",
        "linux/arm/v7",
        "linux/arm/v6",
        "linux/arm/v5",
    ]
    assert not Platform.parse("linux/amd64").matches(
        {"os": "linux", "architecture": "amd64", "variant": "v2"}
    )


def test_all_platforms_stores_every_platform(
    images: Images, registry: Registry, fetchd: Fetchd
) -> None:
    name = f"{registry.host}/plat/three:1"
    push(images.layout, "three", name, all_=True)
    top = registry_manifest_digest(registry.host, "plat/three", "1")

    assert ok(fetchd("pull", *HTTP, "--all-platforms", f"docker://{name}")).strip() == top

    assert sorted(m["digest"] for m in stored(fetchd, name)) == sorted(
        [images.mine.digest, images.other.digest, images.arm.digest]
    )
    assert sorted(images_json(fetchd, name)["platforms"]) == sorted(
        ["linux/amd64", "linux/arm64", "linux/arm/v7"]
    )
    r = skopeo(
        "inspect",
        "--override-arch",
        "arm",
        "--override-variant",
        "v7",
        f"oci:{fetchd.store}/layout:{name}",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["Layers"] == [layer.digest for layer in images.arm.layers]
    assert "ok" in ok(fetchd("fsck"))
    requests = len(registry.requests())
    ok(fetchd("pull", *HTTP, "--all-platforms", f"docker://{name}"))  # all there: no request
    assert len(registry.requests()) == requests


def test_single_platform_image_of_another_platform_is_refused(
    images: Images, registry: Registry, fetchd: Fetchd
) -> None:
    """No index, a config that says OTHER: never stored silently for this machine."""
    name = f"{registry.host}/plat/foreign:1"
    push(images.layout, "foreign", name)

    for args in ((), ("--platform", f"linux/{MINE}")):
        failed(
            fetchd("pull", *HTTP, *args, f"docker://{name}"),
            f"{name} is an image for linux/{OTHER} only, not for linux/{MINE}",
            f"--platform linux/{OTHER}",
        )
        assert fetchd.blobs() == set()  # nothing stays: not even its config

    ok(fetchd("pull", *HTTP, "--platform", f"linux/{OTHER}", f"docker://{name}"))
    assert fetchd.entry(name)["platform"]["architecture"] == OTHER
    assert images_json(fetchd, name)["platforms"] == [f"linux/{OTHER}"]
    line = check_error(Stage1(fetchd.store).run("run", name))
    assert f"is in the store for linux/{OTHER}, not for this machine" in line


def test_umoci_unpacks_one_platform(
    images: Images, registry: Registry, fetchd: Fetchd, tmp_path: Path
) -> None:
    """umoci reads a name of one platform as it is; of two, through export --platform."""
    name = f"{registry.host}/plat/umoci:1"
    push(images.layout, "two", name, all_=True)
    ok(fetchd("pull", *HTTP, f"docker://{name}"))

    def unpack(layout: Path, bundle: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["umoci", "unpack", "--rootless", "--image", f"{layout}:{name}", str(bundle)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = unpack(fetchd.store / "layout", tmp_path / "one")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "one/rootfs/etc/fetchd-test").read_bytes() == f"{MINE}\n".encode()

    ok(fetchd("pull", *HTTP, "--platform", f"linux/{OTHER}", f"docker://{name}"))
    assert unpack(fetchd.store / "layout", tmp_path / "two").returncode != 0  # ambiguous
    ok(fetchd("export", "--platform", f"linux/{OTHER}", name, str(tmp_path / "out")))
    r = unpack(tmp_path / "out", tmp_path / "three")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "three/rootfs/etc/fetchd-test").read_bytes() == f"{OTHER}\n".encode()


def test_docker_manifest_list_and_concurrent_platform_pulls(
    images: Images, registry: Registry, fetchd: Fetchd
) -> None:
    """Two pulls of two platforms of one name at once both land; from a Docker manifest
    list (stored in OCI form, each original kept) as well."""
    name = f"{registry.host}/plat/v2s2:1"
    push(images.layout, "two", name, fmt="v2s2", all_=True)
    top = registry_manifest_digest(registry.host, "plat/v2s2", "1")

    procs = [
        fetchd.popen("pull", *HTTP, "--platform", f"linux/{arch}", f"docker://{name}")
        for arch in (MINE, OTHER)
    ]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert (p.returncode, out.strip()) == (0, top), err

    kept = stored(fetchd, name)
    assert sorted(m["platform"]["architecture"] for m in kept) == sorted([MINE, OTHER])
    assert all("io.fetchd.source.digest" in m["annotations"] for m in kept)
    assert "ok" in ok(fetchd("fsck"))
    requests = len(registry.requests())
    ok(fetchd("pull", *HTTP, "--all-platforms", f"docker://{name}"))  # both there, by source
    assert len(registry.requests()) == requests
    r = Stage1(fetchd.store).run("run", f"docker://{name}")
    assert (r.returncode, r.stdout) == (0, f"{MINE}\n"), r.stderr


def test_a_moved_tag_brings_the_stored_platforms_along(
    images: Images, registry: Registry, fetchd: Fetchd, tmp_path: Path, busybox_layer: Layer
) -> None:
    """pull --pull-policy update after the tag moved to a new index: the name holds the
    new index's manifests for every platform it held, not a mix of two indexes."""
    name = f"{registry.host}/plat/moved:1"
    push(images.layout, "two", name, all_=True)
    ok(fetchd("pull", *HTTP, "--all-platforms", f"docker://{name}"))
    layout = tmp_path / "layout"
    new = {
        arch: build_image(
            layout,
            "-",
            [busybox_layer, Layer([File("etc/fetchd-test", f"new {arch}\n".encode())])],
            arch=arch,
            annotate=False,
        )
        for arch in (MINE, OTHER)
    }
    build_index(layout, "next", [(new[a], f"linux/{a}") for a in (MINE, OTHER)])
    push(layout, "next", name, all_=True)
    top = registry_manifest_digest(registry.host, "plat/moved", "1")

    assert ok(fetchd("pull", *HTTP, "--pull-policy", "update", f"docker://{name}")).strip() == top

    assert fetchd.entry(name)["annotations"][INDEX_DIGEST] == top
    assert sorted(m["digest"] for m in stored(fetchd, name)) == sorted(
        [new[MINE].digest, new[OTHER].digest]
    )
    assert "ok" in ok(fetchd("fsck"))


def blob_path(fetchd: Fetchd, digest: str) -> Path:
    return fetchd.store / "layout/blobs/sha256" / digest.split(":")[1]


def all_blobs(fetchd: Fetchd) -> set[str]:
    return {p.name for p in (fetchd.store / "layout/blobs/sha256").iterdir()}


def test_gc_keeps_every_platform_when_one_manifest_is_corrupt(
    images: Images, registry: Registry, fetchd: Fetchd
) -> None:
    """gc walks each platform's manifest on its own and fails closed: a manifest that
    rotted on disk made gc keep only the top digest, and delete the platforms after it
    (the cache server's eviction runs the same walk unasked)."""
    name = f"{registry.host}/plat/gc-rot:1"
    push(images.layout, "two", name, all_=True)
    ok(fetchd("pull", *HTTP, "--all-platforms", f"docker://{name}"))
    before = all_blobs(fetchd)
    other = {images.other.manifest.digest, images.other.config.digest}
    other |= {layer.digest for layer in images.other.layers}
    rotten = blob_path(fetchd, images.mine.digest)
    rotten.chmod(0o644)
    rotten.write_bytes(b"\0" * rotten.stat().st_size)  # bit rot: same size, not JSON

    line = failed(fetchd("gc"), "fsck")
    assert "cannot be read" in line, line
    assert all_blobs(fetchd) == before, "gc deleted blobs while a manifest was unreadable"

    fetchd("fsck")  # quarantines the rotten manifest (it no longer matches its digest)
    assert not rotten.exists()
    ok(fetchd("gc"))
    # The other platform is whole (what only the quarantined manifest named may go).
    assert {d.split(":")[1] for d in other} <= all_blobs(fetchd)


def test_gc_keeps_what_an_unnamed_index_entry_uses(
    images: Images, registry: Registry, fetchd: Fetchd
) -> None:
    """Every index.json entry is a gc root, named or not (an image another tool wrote
    into the layout): gc deleted the blobs of an entry without a ref.name."""
    name = f"{registry.host}/plat/gc-unnamed:1"
    push(images.layout, "two", name, all_=True)
    ok(fetchd("pull", *HTTP, f"docker://{name}"))
    index_path = fetchd.store / "layout/index.json"
    index = json.loads(index_path.read_text())
    for entry in index["manifests"]:
        entry.get("annotations", {}).pop("org.opencontainers.image.ref.name", None)
    index_path.write_text(json.dumps(index))
    before = all_blobs(fetchd)

    ok(fetchd("gc"))

    assert all_blobs(fetchd) == before
