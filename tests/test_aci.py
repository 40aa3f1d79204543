"""ACI checks (fetchd.appc.aci, fetchd.appc.manifest) on real ACIs and hostile tars.

Real ACIs come from ``actool build --owner-root`` (tests.support.appc.build_aci); their image
ID is checked against ``gzip -dc | sha512sum`` and their compressed forms against the ``bzip2``
and ``xz`` tools. ``actool validate`` is the oracle: where it refuses an archive, fetchd
refuses it too, and every archive fetchd accepts actool accepts. Hostile archives are built
with python's tarfile; where fetchd is stricter than actool (device nodes, links out of
rootfs, sizes) the test says so. Nothing is ever extracted: each test's directory holds only
what the test wrote.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import pytest

from fetchd.appc.aci import ACI_MEDIA_TYPES, inspect_aci
from fetchd.appc.manifest import (
    APPC_MANIFEST_MEDIA_TYPE,
    appc_platform,
    check_request,
    oci_config,
    parse_manifest,
)
from fetchd.errors import ImageInvalid
from tests.support.appc import appc_arch, build_aci

MANIFEST: dict[str, Any] = {
    "acKind": "ImageManifest",
    "acVersion": "0.8.11",
    "name": "example.com/hello",
    "labels": [
        {"name": "version", "value": "1.0.0"},
        {"name": "os", "value": "linux"},
        {"name": "arch", "value": "amd64"},
    ],
    "app": {
        "exec": ["/bin/echo", "hello"],
        "user": "1000",
        "group": "1000",
        "workingDirectory": "/",
        "environment": [{"name": "GREETING", "value": "hi"}],
    },
}
MANIFEST_BYTES = json.dumps(MANIFEST).encode()


def actool_validate(path: Path) -> tuple[int, str]:
    run = subprocess.run(
        ["actool", "validate", str(path)], capture_output=True, text=True, timeout=60
    )
    return run.returncode, (run.stdout + run.stderr).strip()


def sha_of(cmd: Sequence[str], path: Path, tool: str) -> str:
    data = subprocess.run([*cmd, str(path)], capture_output=True, check=True, timeout=60).stdout
    out = subprocess.run([tool], input=data, capture_output=True, check=True, timeout=60)
    return out.stdout.split()[0].decode()


# --- building hostile tars ---------------------------------------------------------------


Entry = tuple[str, bytes, dict[str, Any]]  # (name, type, extra: data/link/size/pax)


def entry(name: str, typ: bytes = tarfile.REGTYPE, **extra: Any) -> Entry:
    return (name, typ, extra)


BASE: list[Entry] = [
    entry("rootfs", tarfile.DIRTYPE),
    entry("rootfs/bin", tarfile.DIRTYPE),
    entry("rootfs/bin/hello", data=b"#!/bin/sh\necho hello\n"),
    entry("manifest", data=MANIFEST_BYTES),
]


def tar_bytes(entries: Iterable[Entry]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, typ, extra in entries:
            info = tarfile.TarInfo(name)
            info.type = typ
            data: bytes = extra.get("data", b"")
            info.size = len(data) if typ == tarfile.REGTYPE else 0
            info.linkname = extra.get("link", "")
            info.pax_headers = extra.get("pax", {})
            info.mode = 0o755 if typ == tarfile.DIRTYPE else 0o644
            t.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def write_tar(out: Path, entries: Iterable[Entry], *, compress: str | None = "gzip") -> Path:
    raw = tar_bytes(entries)
    if compress == "gzip":
        raw = gzip.compress(raw, mtime=0)
    elif compress == "bzip2":
        raw = bz2.compress(raw)
    elif compress == "xz":
        raw = lzma.compress(raw)
    out.write_bytes(raw)
    return out


def refused(path: Path, *, max_uncompressed: int | None = None) -> str:
    with pytest.raises(ImageInvalid) as err:
        inspect_aci(path, path.name, max_uncompressed=max_uncompressed)
    message = str(err.value)
    assert message.startswith(f"{path.name}: "), message
    assert "\n" not in message
    return message


# --- real ACIs ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("aci")
    return build_aci(
        tmp,
        "example.com/hello",
        "1.0.0",
        out=tmp / "hello-1.0.0.aci",
        environment={"GREETING": "hi", "EMPTY": ""},
        working_directory="/tmp",
    )


def test_actool_aci_gives_its_image_id_diff_id_and_manifest(hello: Path) -> None:
    assert actool_validate(hello)[0] == 0
    got = inspect_aci(hello, "hello-1.0.0.aci")
    assert got.compression == "gzip"
    assert (
        got.media_type == ACI_MEDIA_TYPES["gzip"] == "application/vnd.fetchd.appc.aci.v1.tar+gzip"
    )
    assert got.image_id == "sha512-" + sha_of(["gzip", "-dc"], hello, "sha512sum")
    assert len(got.image_id) == len("sha512-") + 128
    assert got.diff_id == "sha256:" + sha_of(["gzip", "-dc"], hello, "sha256sum")
    tar = subprocess.run(["gzip", "-dc", str(hello)], capture_output=True, check=True).stdout
    assert got.uncompressed_size == len(tar)
    m = got.manifest
    assert m.name == "example.com/hello"
    assert m.labels == {"version": "1.0.0", "os": "linux", "arch": appc_arch()}
    assert m.app is not None
    assert m.app.exec == ("/bin/echo", "hello from example.com/hello")
    assert (m.app.user, m.app.group, m.app.working_directory) == ("1000", "1000", "/tmp")
    assert m.app.environment == (("GREETING", "hi"), ("EMPTY", ""))
    # the manifest bytes are the tar member's, byte for byte
    member = subprocess.run(
        ["tar", "-xzOf", str(hello), "manifest"], capture_output=True, check=True
    ).stdout
    assert m.raw == member


@pytest.mark.parametrize("compression", [None, "bzip2", "xz"])
def test_other_compressions_give_the_same_image_id(
    hello: Path, tmp_path: Path, compression: str | None
) -> None:
    tar = tmp_path / "hello.tar"
    tar.write_bytes(subprocess.run(["gzip", "-dc", str(hello)], capture_output=True).stdout)
    if compression is None:
        aci = tar
    else:
        tool = {"bzip2": "bzip2", "xz": "xz"}[compression]
        subprocess.run([tool, "-k", str(tar)], check=True)
        aci = tar.with_suffix(".tar." + {"bzip2": "bz2", "xz": "xz"}[compression])
    assert actool_validate(aci)[0] == 0
    got = inspect_aci(aci, "hello.aci")
    assert got.compression == compression
    assert got.media_type == ACI_MEDIA_TYPES[compression]
    assert got.image_id == inspect_aci(hello, "hello.aci").image_id
    assert got.image_id == "sha512-" + hashlib.sha512(tar.read_bytes()).hexdigest()


def test_size_bound_is_exact(hello: Path) -> None:
    size = inspect_aci(hello, "x").uncompressed_size
    assert inspect_aci(hello, "x", max_uncompressed=size).uncompressed_size == size
    message = refused(hello, max_uncompressed=size - 1)
    assert f"is larger than its size {size - 1}" in message


def test_oci_config_is_deterministic_and_maps_the_app(hello: Path) -> None:
    m = inspect_aci(hello, "x").manifest
    got = inspect_aci(hello, "x")
    config = oci_config(m, ["sha256:" + "a" * 64, got.diff_id])
    assert config == oci_config(
        inspect_aci(hello, "x").manifest, ["sha256:" + "a" * 64, got.diff_id]
    )
    doc = json.loads(config)
    assert doc["config"] == {
        "Entrypoint": ["/bin/echo", "hello from example.com/hello"],
        "User": "1000:1000",
        "Env": ["GREETING=hi", "EMPTY="],
        "WorkingDir": "/tmp",
    }
    assert doc["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "a" * 64, got.diff_id]}
    assert doc["os"] == "linux"
    assert "created" not in doc and "history" not in doc
    assert APPC_MANIFEST_MEDIA_TYPE == "application/vnd.fetchd.appc.manifest.v1+json"


@pytest.mark.parametrize(
    ("arch", "platform"),
    [
        ("amd64", {"architecture": "amd64", "os": "linux"}),
        ("aarch64", {"architecture": "arm64", "os": "linux"}),
        ("i386", {"architecture": "386", "os": "linux"}),
        ("armv7l", {"architecture": "arm", "os": "linux", "variant": "v7"}),
        ("armv6l", {"architecture": "arm", "os": "linux", "variant": "v6"}),
        ("ppc64le", {"architecture": "ppc64le", "os": "linux"}),
        ("s390x", {"architecture": "s390x", "os": "linux"}),
    ],
)
def test_platform_from_appc_labels(arch: str, platform: dict[str, str]) -> None:
    doc = dict(MANIFEST, labels=[{"name": "os", "value": "linux"}, {"name": "arch", "value": arch}])
    m = parse_manifest(json.dumps(doc).encode(), "m")
    assert appc_platform(m) == platform
    config = json.loads(oci_config(m, []))
    assert {k: config[k] for k in platform} == platform


def test_noarch_image_has_no_platform() -> None:
    m = parse_manifest(json.dumps(dict(MANIFEST, labels=[])).encode(), "m")
    assert appc_platform(m) is None
    config = json.loads(oci_config(m, []))
    assert config["os"] == "linux" and config["architecture"]


# --- rkt's name and label check ----------------------------------------------------------


def test_check_request_with_rkt_wording() -> None:
    m = parse_manifest(MANIFEST_BYTES, "m")
    check_request(m, "example.com/hello", {"version": "1.0.0", "os": "linux"}, "x.aci")
    check_request(m, "example.com/hello", {}, "x.aci")
    with pytest.raises(ImageInvalid) as err:
        check_request(m, "example.com/other", {}, "x.aci")
    assert str(err.value) == (
        'x.aci: error when reading the app name: "example.com/other" expected but '
        '"example.com/hello" found'
    )
    with pytest.raises(ImageInvalid) as err:
        check_request(m, "example.com/hello", {"version": "2.0"}, "x.aci")
    assert str(err.value) == (
        'x.aci: requested value for label "version": "2.0" differs from fetched aci '
        'label value: "1.0.0"'
    )
    with pytest.raises(ImageInvalid) as err:
        check_request(m, "example.com/hello", {"channel": "beta"}, "x.aci")
    assert str(err.value) == 'x.aci: requested label "channel" not provided by the image manifest'


# --- the manifest, strictly --------------------------------------------------------------


def _bad_manifests() -> list[tuple[str, Any, bool]]:
    """(id, manifest document or raw bytes, does actool validate refuse it too)."""
    app = MANIFEST["app"]
    return [
        ("kind", dict(MANIFEST, acKind="PodManifest"), False),
        ("no-version", {k: v for k, v in MANIFEST.items() if k != "acVersion"}, True),
        ("bad-name", dict(MANIFEST, name="Example.com/Hello"), True),
        ("label-name", dict(MANIFEST, labels=[{"name": "name", "value": "x"}]), True),
        (
            "dup-label",
            dict(MANIFEST, labels=[{"name": "os", "value": "linux"}, {"name": "os", "value": "x"}]),
            True,
        ),
        ("no-user", dict(MANIFEST, app={k: v for k, v in app.items() if k != "user"}), True),
        ("no-group", dict(MANIFEST, app={k: v for k, v in app.items() if k != "group"}), True),
        ("relative-workdir", dict(MANIFEST, app=dict(app, workingDirectory="tmp")), True),
        ("whitelist", dict(MANIFEST, pathWhitelist=["/bin/hello"]), False),
        (
            "bad-env",
            dict(MANIFEST, app=dict(app, environment=[{"name": "1X", "value": ""}])),
            False,
        ),
        (
            "dep-id",
            dict(MANIFEST, dependencies=[{"imageName": "a.com/b", "imageID": "md5-00"}]),
            False,
        ),
        ("dep-size", dict(MANIFEST, dependencies=[{"imageName": "a.com/b", "size": -1}]), False),
        ("dup-key", b'{"acKind": "ImageManifest", "acKind": "ImageManifest"}', False),
        ("not-json", b"{", True),
        ("array", b"[]", True),
        ("huge", b" " * (1 << 20) + MANIFEST_BYTES, False),
    ]


@pytest.mark.parametrize(
    ("doc", "actool_refuses"),
    [c[1:] for c in _bad_manifests()],
    ids=[c[0] for c in _bad_manifests()],
)
def test_bad_manifests_are_refused(tmp_path: Path, doc: Any, actool_refuses: bool) -> None:
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with pytest.raises(ImageInvalid) as err:
        parse_manifest(raw, "m.aci")
    assert str(err.value).startswith("m.aci: the image manifest ")
    if actool_refuses:
        path = tmp_path / "manifest"
        path.write_bytes(raw)
        assert actool_validate(path)[0] != 0


def test_path_whitelist_says_not_supported() -> None:
    doc = dict(MANIFEST, pathWhitelist=["/bin/hello"])
    with pytest.raises(ImageInvalid, match="pathWhitelist is not supported"):
        parse_manifest(json.dumps(doc).encode(), "m")
    # an empty whitelist means "everything" (spec), so it is fine
    parse_manifest(json.dumps(dict(MANIFEST, pathWhitelist=[])).encode(), "m")


def test_dependencies_parse(tmp_path: Path) -> None:
    deps = [
        {
            "imageName": "example.com/base",
            "imageID": "sha512-" + "ab" * 64,
            "labels": [{"name": "os", "value": "linux"}],
            "size": 123,
        },
        {"imageName": "example.com/noarch"},
    ]
    m = parse_manifest(json.dumps(dict(MANIFEST, dependencies=deps)).encode(), "m")
    assert [(d.image_name, d.image_id, d.labels, d.size) for d in m.dependencies] == [
        ("example.com/base", "sha512-" + "ab" * 64, {"os": "linux"}, 123),
        ("example.com/noarch", None, {}, None),
    ]


def test_ignored_fields_warn(caplog: pytest.LogCaptureFixture) -> None:
    app = dict(MANIFEST["app"], ports=[{"name": "http", "port": 80, "protocol": "tcp"}])
    parse_manifest(json.dumps(dict(MANIFEST, app=app)).encode(), "m")
    assert "app.ports are ignored" in caplog.text


# --- hostile archives --------------------------------------------------------------------


def _hostile() -> list[tuple[str, list[Entry], str, bool]]:
    """(id, entries, what the message says, does actool validate refuse it too)."""
    return [
        ("extra-top", [*BASE, entry("etc", tarfile.DIRTYPE)], "outside rootfs/", True),
        ("extra-file", [*BASE, entry("README", data=b"x")], "outside rootfs/", True),
        ("dotdot", [*BASE, entry("rootfs/../x", data=b"x")], "'..' component", True),
        ("abs", [*BASE, entry("/rootfs/x", data=b"x")], "absolute path", True),
        (
            "abs-pax",
            [*BASE, entry("rootfs/y", data=b"x", pax={"path": "/etc/x"})],
            "absolute",
            True,
        ),
        (
            "dup-manifest",
            [*BASE, entry("manifest", data=MANIFEST_BYTES)],
            "more than one manifest",
            True,
        ),
        ("dup-file", [*BASE, entry("rootfs/bin/hello", data=b"y")], "appears twice", True),
        ("no-manifest", BASE[:-1], "has no manifest", True),
        ("chr", [*BASE, entry("rootfs/null", tarfile.CHRTYPE)], "device node", False),
        ("blk", [*BASE, entry("rootfs/sda", tarfile.BLKTYPE)], "device node", False),
        (
            "hardlink-manifest",
            [*BASE, entry("rootfs/m", tarfile.LNKTYPE, link="manifest")],
            "points outside rootfs",
            False,
        ),
        (
            "hardlink-later",
            [
                *BASE[:2],
                entry("rootfs/a", tarfile.LNKTYPE, link="rootfs/b"),
                entry("rootfs/b", data=b"b"),
                BASE[-1],
            ],
            "does not name an earlier file",
            False,
        ),
        (
            "hardlink-dotdot",
            [*BASE, entry("rootfs/p", tarfile.LNKTYPE, link="rootfs/../../etc/passwd")],
            "'..' component",
            False,
        ),
        (
            "symlink-out",
            [*BASE, entry("rootfs/bin/p", tarfile.SYMTYPE, link="../../etc/passwd")],
            "points outside rootfs",
            False,
        ),
        (
            "below-symlink",
            [
                *BASE,
                entry("rootfs/l", tarfile.SYMTYPE, link="/etc"),
                entry("rootfs/l/passwd", data=b"x"),
            ],
            "which is not a directory",
            False,
        ),
        ("dir-twice", [*BASE, entry("rootfs/bin", data=b"x")], "appears twice", True),
        (
            "file-over-dir",
            [*BASE, entry("rootfs/d/f", data=b"x"), entry("rootfs/d", data=b"x")],
            "earlier entries are in it",
            False,
        ),
        ("rootfs-file", [entry("rootfs", data=b"x"), BASE[-1]], "rootfs is not a directory", False),
        (
            "manifest-symlink",
            [*BASE[:-1], entry("manifest", tarfile.SYMTYPE, link="rootfs/bin/hello")],
            "manifest is not a regular file",
            True,
        ),
        ("dot-slash", [*BASE, entry("rootfs/./x", data=b"x")], "not a canonical path", False),
        ("long-path", [*BASE, entry("rootfs/" + "a" * 5000, data=b"x")], "longer than 4096", False),
        (
            "big-manifest",
            [*BASE[:-1], entry("manifest", data=b" " * (1 << 20) + MANIFEST_BYTES)],
            "larger than 1 MiB",
            False,
        ),
        (
            "big-pax",
            [*BASE, entry("rootfs/x", data=b"x", pax={"comment": "c" * (2 << 20)})],
            "extended tar header",
            False,
        ),
    ]


@pytest.mark.parametrize(
    ("entries", "says", "actool_refuses"),
    [c[1:] for c in _hostile()],
    ids=[c[0] for c in _hostile()],
)
def test_hostile_archives_are_refused(
    tmp_path: Path, entries: list[Entry], says: str, actool_refuses: bool
) -> None:
    aci = write_tar(tmp_path / "bad.aci", entries)
    message = refused(aci)
    assert says in message, message
    if actool_refuses:
        assert actool_validate(aci)[0] != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.aci"]  # nothing extracted


def test_benign_links_fifos_and_absolute_symlinks_pass(tmp_path: Path) -> None:
    entries = [
        *BASE[:3],
        entry("rootfs/bin/sh", tarfile.SYMTYPE, link="hello"),
        entry("rootfs/bin/abs", tarfile.SYMTYPE, link="/bin/hello"),
        entry("rootfs/bin/up", tarfile.SYMTYPE, link="../bin/./hello"),
        entry("rootfs/bin/hard", tarfile.LNKTYPE, link="rootfs/bin/hello"),
        entry("rootfs/fifo", tarfile.FIFOTYPE),
        entry("rootfs/deep/er/file", data=b"implied parents"),
        entry("rootfs/deep", tarfile.DIRTYPE),  # a directory after its children
        BASE[-1],
    ]
    aci = write_tar(tmp_path / "ok.aci", entries)
    assert actool_validate(aci)[0] == 0
    got = inspect_aci(aci, "ok.aci")
    assert got.manifest.name == "example.com/hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.aci"]


# --- corrupt, truncated and hidden data --------------------------------------------------


def _gz(entries: Iterable[Entry]) -> bytes:
    return gzip.compress(tar_bytes(entries), mtime=0)


def test_truncated_gzip_is_refused(tmp_path: Path) -> None:
    good = _gz(BASE)
    for cut in (len(good) - 4, len(good) // 2, 20):
        aci = tmp_path / "t.aci"
        aci.write_bytes(good[:cut])
        message = refused(aci)
        assert "truncated" in message or "corrupt" in message, message


def test_corrupt_gzip_is_refused(tmp_path: Path) -> None:
    good = bytearray(_gz(BASE))
    good[len(good) // 2] ^= 0xFF
    aci = tmp_path / "c.aci"
    aci.write_bytes(bytes(good))
    assert "corrupt" in refused(aci) or "truncated" in refused(aci)


def test_truncated_uncompressed_tar_is_refused(tmp_path: Path) -> None:
    tar = gzip.decompress(_gz(BASE))
    # cut inside the manifest's data, at a member boundary (no end marker), inside the marker
    manifest_at = tar.index(MANIFEST_BYTES)
    end = manifest_at + ((len(MANIFEST_BYTES) + 511) // 512) * 512
    for cut in (manifest_at + 10, end, end + 512):
        aci = tmp_path / "t.aci"
        aci.write_bytes(tar[:cut])
        assert "truncated" in refused(aci)


def test_data_after_the_end_or_a_corrupt_header_is_refused(tmp_path: Path) -> None:
    tar = gzip.decompress(_gz(BASE))
    hidden = tar + b"\0" * 1024 + tarfile.TarInfo("rootfs/hidden").tobuf() + b"\0" * 1024
    aci = tmp_path / "h.aci"
    aci.write_bytes(gzip.compress(hidden, mtime=0))
    assert "data after its end" in refused(aci)
    # a header whose checksum is wrong, in the middle: tarfile alone would stop there quietly
    second = tar.index(b"rootfs/bin/\0")
    broken = bytearray(tar)
    broken[second + 100] ^= 0x01  # the mode field, covered by the checksum
    aci.write_bytes(bytes(broken))
    assert "corrupt header" in refused(aci)


def test_not_a_tar_and_foreign_compressions(tmp_path: Path) -> None:
    aci = tmp_path / "x.aci"
    aci.write_bytes(b"")
    assert "not a tar archive" in refused(aci)
    aci.write_bytes(b"<html>not found</html>" * 100)
    assert "not a tar archive" in refused(aci)
    aci.write_bytes(gzip.compress(b"just text" * 100))
    assert "the gzip data is not a tar archive" in refused(aci)
    aci.write_bytes(b"\x28\xb5\x2f\xfd" + b"\0" * 100)
    assert "compressed with zstd" in refused(aci)


# --- decompression bombs -----------------------------------------------------------------


def _zeros_tar(members: int, size: int, compress: Callable[[bytes], bytes]) -> bytes:
    """``members`` entries of ``size`` zero bytes each, compressed member by member (the
    zeros once: every gzip, bzip2 or xz decoder reads concatenated streams as one)."""
    zeros = compress(b"\0" * size)
    parts = [compress(tar_bytes(BASE[:2])[:1024])]  # the two directory headers
    for i in range(members):
        info = tarfile.TarInfo(f"rootfs/zeros{i}")
        info.size = size
        parts += [compress(info.tobuf(tarfile.PAX_FORMAT)), zeros]
    parts.append(compress(tar_bytes([BASE[-1]])))
    return b"".join(parts)


def test_gzip_bomb_stops_at_the_dependency_size(tmp_path: Path) -> None:
    """1 GiB of zeros in ~1 MiB of gzip; the dependency's size (100 MiB) stops it."""
    aci = tmp_path / "bomb.aci"
    aci.write_bytes(_zeros_tar(64, 16 << 20, lambda b: gzip.compress(b, 9, mtime=0)))
    assert aci.stat().st_size < 2 << 20
    start = time.monotonic()
    message = refused(aci, max_uncompressed=100 << 20)
    assert time.monotonic() - start < 5
    assert f"is larger than its size {100 << 20}" in message


def test_xz_bomb_is_refused_by_the_ratio_bound(tmp_path: Path) -> None:
    """1 GiB of zeros in ~160 KiB of xz, no dependency size: the bound (1100 times the
    compressed size, at least 256 MiB) stops it after 256 MiB."""
    aci = tmp_path / "bomb.aci"
    aci.write_bytes(_zeros_tar(16, 64 << 20, lambda b: lzma.compress(b, preset=0)))
    assert aci.stat().st_size < 1 << 20
    start = time.monotonic()
    message = refused(aci)
    assert time.monotonic() - start < 30
    assert "decompression bomb" in message and f"more than {256 << 20}" in message


def test_member_claiming_more_than_the_limit_is_refused_at_its_header(tmp_path: Path) -> None:
    """A tiny file whose header claims an exabyte: refused at once, not skipped block by block."""
    info = tarfile.TarInfo("rootfs/huge")
    info.size = 1 << 60
    aci = tmp_path / "claim.aci"
    aci.write_bytes(gzip.compress(tar_bytes(BASE[:2])[:1024] + info.tobuf(tarfile.PAX_FORMAT)))
    start = time.monotonic()
    message = refused(aci)
    assert time.monotonic() - start < 2
    assert f"entry 'rootfs/huge' claims {1 << 60} bytes" in message
    # with a dependency size, the claim is measured against it
    info.size = 4096
    aci.write_bytes(gzip.compress(tar_bytes(BASE[:2])[:1024] + info.tobuf(tarfile.PAX_FORMAT)))
    assert "claims 4096 bytes, more than the 2000" in refused(aci, max_uncompressed=2000)


def _pax_header(records: bytes) -> bytes:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = len(records)
    return info.tobuf(tarfile.USTAR_FORMAT) + records + b"\0" * (-len(records) % 512)


def test_extended_header_chains_are_bounded(tmp_path: Path) -> None:
    record = b"12 comment=\n"  # a pax record: its own length, key=value, newline
    file = tarfile.TarInfo("rootfs/f").tobuf(tarfile.USTAR_FORMAT)
    head = tar_bytes(BASE[:2])[:1024]
    tail = tar_bytes([BASE[-1]])
    aci = tmp_path / "pax.aci"
    aci.write_bytes(gzip.compress(head + _pax_header(record) * 3 + file + tail, mtime=0))
    assert inspect_aci(aci, "pax.aci").manifest.name == "example.com/hello"
    aci.write_bytes(gzip.compress(head + _pax_header(record) * 40 + file + tail, mtime=0))
    assert "more than 16 extended tar headers in a row" in refused(aci)


def test_gnu_long_names_are_read(tmp_path: Path) -> None:
    long = "rootfs/" + "d" * 200 + "/" + "f" * 200
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for name, typ in (("rootfs", tarfile.DIRTYPE), (long, tarfile.REGTYPE)):
            info = tarfile.TarInfo(name)
            info.type = typ
            t.addfile(info, io.BytesIO(b"") if typ == tarfile.REGTYPE else None)
        info = tarfile.TarInfo("manifest")
        info.size = len(MANIFEST_BYTES)
        t.addfile(info, io.BytesIO(MANIFEST_BYTES))
    aci = tmp_path / "gnu.aci"
    aci.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    assert actool_validate(aci)[0] == 0
    assert inspect_aci(aci, "gnu.aci").uncompressed_size == len(buf.getvalue())
