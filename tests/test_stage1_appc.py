"""stage1 runs appc images (issue 13): ACIs pulled by fetchd, looked up by appc name and labels.

The end-to-end tests pull actool-built, gpg-signed ACIs with the real ``fetchd pull
--signature X.aci.asc X.aci`` and run them with ``stage1 run NAME,version=…``. The hostile
cases write an ACI layer into a store by hand (fetchd's pull refuses such ACIs before they are
stored): stage1 must hold on its own, whatever wrote the store.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import shutil
import tarfile
from pathlib import Path
from typing import Any

from tests.support.appc import AppcSite, appc_arch, build_aci
from tests.support.cli import Fetchd, ok
from tests.support.pgp import PgpCases
from tests.support.stage1 import Place, Stage1, check_error
from tests.support.stage1 import nobody_place_fixture as nobody_fixture  # noqa: F401

# the fixtures appc_site and pgp_cases

ACI = "application/vnd.fetchd.appc.aci.v1.tar"
NAME = "example.com/hello"
TEMPLATE = "https://example.com/images/{name}-{version}-{os}-{arch}.{ext}"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"


# --- ACIs pulled by the real fetchd ----------------------------------------------------------


def _trust(fetchd: Fetchd, tmp: Path, pgp: PgpCases, key: str, prefix: str) -> None:
    ok(
        fetchd(
            "trust",
            "--trust-dir",
            str(tmp / "trust"),
            "--prefix",
            prefix,
            "--skip-fingerprint-review",
            str(pgp.key(key)),
        )
    )


def test_pulled_aci_runs_as_its_user(
    fetchd: Fetchd, pgp_cases: PgpCases, nobody_place: Place, tmp_path: Path
) -> None:
    """fetchd pull --signature X.aci.asc X.aci, then stage1 run NAME,version=…: app.exec as
    user/group 1000 with its environment and working directory, ARGS appended (rkt's image
    arguments); as root and as a normal user."""
    script = 'echo "hello from $0"; id -u; id -g; pwd; echo "$GREETING" "$@"'
    aci = build_aci(
        tmp_path,
        NAME,
        "1.0.0",
        out=tmp_path / "hello.aci",
        exec_=["/bin/sh", "-c", script, NAME],
        environment={"GREETING": "hello from the manifest"},
        working_directory="/etc",
    )
    _trust(fetchd, tmp_path, pgp_cases, "ed", NAME)
    asc = pgp_cases.sign("ed", aci)
    digest = ok(
        fetchd("pull", "--trust-dir", str(tmp_path / "trust"), "--signature", str(asc), str(aci))
    ).strip()
    stage1 = Stage1(fetchd.store)
    expected = f"hello from {NAME}\n1000\n1000\n/etc\nhello from the manifest\n"
    for ref in (f"{NAME},version=1.0.0", f"{NAME}:1.0.0", NAME, digest):
        r = stage1.run("run", ref)
        assert (r.returncode, r.stdout, r.stderr) == (0, expected, ""), ref
    r = stage1.run("run", f"{NAME},version=1.0.0", "--", "and", "args")
    assert (r.returncode, r.stdout) == (0, expected[:-1] + " and args\n"), r.stderr

    # unprivileged: nobody's own store (the same pull, handed over), user namespaces only
    shutil.copytree(fetchd.store / "layout", nobody_place.stage1.layout)
    nobody_place.hand_over()
    r = nobody_place.stage1.run("run", f"{NAME},version=1.0.0")
    assert (r.returncode, r.stdout) == (0, expected), r.stderr


def test_discovered_dependency_chain_renders_in_order(
    fetchd: Fetchd, appc_site: AppcSite, pgp_cases: PgpCases, tmp_path: Path
) -> None:
    """Acceptance 1 and 7 at stage1: discovery from the host's root page, top → mid → base each
    verified for its own name; stage1 renders base, then mid, then the image (the upper wins)."""

    def publish(name: str, key: str, **build: Any) -> None:
        aci = build_aci(
            tmp_path, name, "1.0.0", out=tmp_path / f"{name.split('/')[1]}.aci", **build
        )
        path = f"/images/{name}-1.0.0-linux-{appc_arch()}.aci"
        appc_site.put(path, aci)
        appc_site.put(path + ".asc", pgp_cases.sign(key, aci))
        _trust(fetchd, tmp_path, pgp_cases, key, name)

    def dep(name: str) -> dict[str, Any]:
        labels = {"version": "1.0.0", "os": "linux", "arch": appc_arch()}  # for the template
        return {"imageName": name, "labels": [{"name": k, "value": v} for k, v in labels.items()]}

    files = {"etc/motd": b"base\n", "etc/base": b"base only\n", "etc/mid": b"from base\n"}
    publish("example.com/base", "rsa", app=False, extra_files=files)
    files = {"etc/motd": b"mid\n", "etc/mid": b"mid only\n"}
    publish("example.com/mid", "sub", app=False, deps=[dep("example.com/base")], extra_files=files)
    publish(
        NAME,
        "ed",
        deps=[dep("example.com/mid")],
        exec_=["/bin/sh", "-c", "cat /etc/motd /etc/mid /etc/base; id -u"],
        extra_files={"etc/motd": b"top\n"},
    )
    appc_site.page("/", appc_site.meta(("ac-discovery", "example.com", TEMPLATE)))
    got = fetchd(
        "pull",
        "--trust-dir",
        str(tmp_path / "trust"),
        *appc_site.resolve_args(),
        f"{NAME}:1.0.0",
        env=appc_site.env(),
    )
    assert got.returncode == 0, got.stderr
    r = Stage1(fetchd.store).run("run", f"{NAME},version=1.0.0")
    assert (r.returncode, r.stdout) == (0, "top\nmid only\nbase only\n1000\n"), r.stderr


# --- a store written by hand, in fetchd's shape for ACIs ------------------------------------


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _media_type(aci: bytes) -> str:
    if aci[:2] == b"\x1f\x8b":
        return ACI + "+gzip"
    if aci[:3] == b"BZh":
        return ACI + "+bzip2"
    if aci[:6] == b"\xfd7zXZ\x00":
        return ACI + "+xz"
    return ACI


def store_aci(
    layout: Path,
    acis: list[bytes],
    name: str,
    labels: dict[str, str],
    config: dict[str, Any],
    ref_name: str | None = None,
) -> str:
    """Record ACIS (dependencies first) as one image in LAYOUT, annotated as fetchd does."""
    layers = [{"mediaType": _media_type(a), **_blob(layout, a)} for a in acis]
    image_config = {
        "os": "linux",
        "architecture": "amd64",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": []},
    }
    config_desc = {"mediaType": OCI_CONFIG, **_blob(layout, json.dumps(image_config).encode())}
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_desc,
        "layers": layers,
    }
    desc = {"mediaType": OCI_MANIFEST, **_blob(layout, json.dumps(manifest).encode())}
    desc["annotations"] = {
        REF_NAME: ref_name or f"{name}:{labels.get('version', 'latest')}",
        "io.fetchd.appc.name": name,
        "io.fetchd.appc.labels": json.dumps(labels, sort_keys=True),
    }
    index_path = layout / "index.json"
    index = (
        json.loads(index_path.read_text())
        if index_path.exists()
        else {"schemaVersion": 2, "manifests": []}
    )
    index["manifests"].append(desc)
    index_path.write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return str(desc["digest"])


def host_labels(version: str) -> dict[str, str]:
    return {"version": version, "os": "linux", "arch": appc_arch()}


def handmade_aci(members: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """An uncompressed tar of MEMBERS (each a TarInfo, or one with its data)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item in members:
            info, data = item if isinstance(item, tuple) else (item, b"")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return out.getvalue()


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mode = mode
    return info, data


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _busybox_members() -> list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]]:
    return [
        _dir("rootfs"),
        _dir("rootfs/bin"),
        _file("rootfs/bin/busybox", Path("/bin/busybox").read_bytes(), 0o755),
        _link("rootfs/bin/sh", "busybox", tarfile.SYMTYPE),
        _link("rootfs/bin/cat", "busybox", tarfile.SYMTYPE),
        _link("rootfs/bin/ls", "busybox", tarfile.SYMTYPE),
    ]


# --- rendering ACI layers -------------------------------------------------------------------


def test_aci_layers_render_rootfs_only_in_every_compression(stage1: Stage1, tmp_path: Path) -> None:
    """gzip (actool's), bzip2, xz and plain ACIs: rootfs/ stripped, manifest not rendered,
    a dependency's files below the image's (the image wins), app.exec run with its env."""
    dep = build_aci(
        tmp_path,
        "example.com/base",
        "1",
        out=tmp_path / "base.aci",
        app=False,
        extra_files={"etc/motd": b"from the base\n", "etc/base-only": b"base\n"},
    )
    for compression in ("gzip", "bzip2", "xz", None):
        name = f"example.com/app-{compression or 'tar'}"
        aci = build_aci(
            tmp_path,
            name,
            "1.0.0",
            out=tmp_path / f"{compression}.aci",
            compression=compression,
            extra_files={"etc/motd": b"from the app\n"},
        )
        store_aci(
            stage1.layout,
            [dep.read_bytes(), aci.read_bytes()],
            name,
            host_labels("1.0.0"),
            {
                "Entrypoint": ["/bin/sh", "-c", "cat /etc/motd /etc/base-only; ls /; echo $HI"],
                "Env": ["HI=hi"],
                "User": "1000:1000",
                "WorkingDir": "/",
            },
        )
        r = stage1.run("run", f"{name},version=1.0.0")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[:2] == ["from the app", "base"], r.stdout
        listing = r.stdout.split()
        assert "rootfs" not in listing and "manifest" not in listing, r.stdout
        assert r.stdout.endswith("hi\n"), r.stdout


def test_aci_hard_links_are_rendered_without_rootfs(stage1: Stage1) -> None:
    aci = handmade_aci(
        [
            *_busybox_members(),
            _dir("rootfs/etc"),
            _file("rootfs/etc/a", b"linked\n"),
            _link("rootfs/etc/b", "rootfs/etc/a", tarfile.LNKTYPE),
            _file("rootfs/etc/.wh.a", b"not a whiteout in an ACI\n"),
            _file("manifest", b'{"acKind": "ImageManifest"}'),
        ]
    )
    store_aci(
        stage1.layout,
        [gzip.compress(aci)],
        "example.com/links",
        host_labels("1"),
        {"Entrypoint": ["/bin/cat", "/etc/b", "/etc/.wh.a"]},
    )
    r = stage1.run("run", "example.com/links:1")
    assert (r.returncode, r.stdout) == (0, "linked\nnot a whiteout in an ACI\n"), r.stderr


def test_hostile_aci_layers_are_refused(stage1: Stage1) -> None:
    """Members outside rootfs/, hard links out of it, .. and absolute paths (which stay in
    the tree, as for any layer), a corrupt stream: one error line, nothing run."""
    sentinel = stage1.store.parent / "sentinel"
    cases: list[tuple[str, list[Any], str]] = [
        ("outside", [_file("etc/passwd", b"x")], "member etc/passwd: is not the manifest"),
        ("extra", [_file("README", b"x")], "member README: is not the manifest"),
        (
            "hardlink",
            [_link("rootfs/bin/x", "etc/shadow", tarfile.LNKTYPE)],
            "hard link target etc/shadow is not under rootfs/",
        ),
        (
            "hardlink-root",
            [_link("rootfs/bin/x", "rootfs", tarfile.LNKTYPE)],
            "hard link target rootfs is not under rootfs/",
        ),
    ]
    for label, extra, message in cases:
        aci = handmade_aci([*_busybox_members(), *extra])
        name = f"example.com/bad-{label}"
        store_aci(stage1.layout, [aci], name, host_labels("1"), {"Entrypoint": ["/bin/ls"]})
        line = check_error(stage1.run("run", f"{name},version=1"))
        assert message in line, line

    # .. and absolute paths stay inside the tree (stage1's rule for every layer)
    aci = handmade_aci(
        [
            *_busybox_members(),
            _file(f"rootfs/../../{sentinel.name}", b"escaped?\n"),
            _file("rootfs//abs", b"absolute\n"),
        ]
    )
    store_aci(
        stage1.layout,
        [aci],
        "example.com/dotdot",
        host_labels("1"),
        {"Entrypoint": ["/bin/cat", f"/{sentinel.name}", "/abs"]},
    )
    r = stage1.run("run", "example.com/dotdot,version=1")
    assert (r.returncode, r.stdout) == (0, "escaped?\nabsolute\n"), r.stderr
    assert not sentinel.exists()

    for compression, data in (("bzip2", bz2.compress(b"x" * 4096)), ("xz", lzma.compress(b"y"))):
        good = handmade_aci(_busybox_members())
        packed = bz2.compress(good) if compression == "bzip2" else lzma.compress(good)
        corrupt = packed[: len(packed) // 2] + bytes(64) + packed[len(packed) // 2 + 64 :]
        name = f"example.com/corrupt-{compression}"
        store_aci(stage1.layout, [corrupt], name, host_labels("1"), {"Entrypoint": ["/bin/ls"]})
        line = check_error(stage1.run("run", f"{name},version=1"))
        assert "is not a valid ACI" in line, line
        assert data  # a stream of the right kind that is not a tar
        name = f"example.com/notatar-{compression}"
        store_aci(stage1.layout, [data], name, host_labels("1"), {"Entrypoint": ["/bin/ls"]})
        line = check_error(stage1.run("run", f"{name},version=1"))
        assert "is not a valid ACI" in line, line


# --- appc names -----------------------------------------------------------------------------


def _echo_aci() -> bytes:
    members = [*_busybox_members(), _link("rootfs/bin/echo", "busybox", tarfile.SYMTYPE)]
    return gzip.compress(handmade_aci(members))


def test_appc_names_choose_as_rkt_getaci(stage1: Stage1) -> None:
    """Every requested label equal; os/arch of this machine; no version: latest, else newest."""
    aci = _echo_aci()
    name = "example.com/pick"

    def add(version: str, said: str, ref_name: str | None = None, **labels: str) -> None:
        store_aci(
            stage1.layout,
            [aci],
            name,
            {**host_labels(version), **labels},
            {"Entrypoint": ["/bin/echo", said]},
            ref_name,
        )

    add("1.0.0", "one")
    add("2.0.0", "two", channel="beta")
    add("0.9.0", "latest one", ref_name=f"{name}:latest")
    add("3.0.0", "other arch", arch="s390x" if appc_arch() != "s390x" else "amd64")
    store_aci(  # no os/arch labels at all: platform-independent
        stage1.layout, [aci], name, {"version": "4"}, {"Entrypoint": ["/bin/echo", "noarch"]}
    )

    def said(ref: str) -> str:
        r = stage1.run("run", ref)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    assert said(f"{name},version=1.0.0") == "one"
    assert said(f"{name}:1.0.0") == "one"
    assert said(f"{name},channel=beta") == "two"
    assert said(f"{name},version=2.0.0,os=linux,arch={appc_arch()}") == "two"
    assert said(f"{name},os=linux") == "latest one"
    assert said(f"{name},version=4") == "noarch"
    assert said(name) == "latest one"

    line = check_error(stage1.run("run", f"{name},version=3.0.0"))
    assert line.startswith(f"error: image {name},version=3.0.0 is not in the store at "), line
    assert "(it holds example.com/pick,arch=" in line, line
    assert line.endswith(f"run: fetchd pull {name},version=3.0.0"), line
    line = check_error(stage1.run("run", f"{name},version=1.0.0,channel=beta"))
    assert "is not in the store" in line, line
    for bad, why in (
        (f"{name}:1:2,os=linux", "a colon may appear at most once"),
        (f"{name},channel=beta:1", "a colon may appear only right after the name"),
        (f"{name},channel", "label 'channel' has no value"),
        (f"{name},version=1,version=2", "label version given twice"),
        ("Example.com/x,version=1", "is not an AC identifier"),
    ):
        line = check_error(stage1.run("run", bad), status=2)
        assert why in line, line

    # a label value a registry reference could not hold
    add("5", "odd label", flavour="a//b/")
    assert said(f"{name},flavour=a//b/") == "odd label"

    # newest of equals: a second entry recorded later wins
    add("1.0.0", "one, again", ref_name=f"{name}:1.0.0-again")
    assert said(f"{name},version=1.0.0") == "one, again"


def test_no_version_without_latest_takes_the_newest(stage1: Stage1) -> None:
    aci = _echo_aci()
    for version in ("1", "3", "2"):
        store_aci(
            stage1.layout,
            [aci],
            "example.com/newest",
            host_labels(version),
            {"Entrypoint": ["/bin/echo", version]},
        )
    r = stage1.run("run", "example.com/newest")
    assert (r.returncode, r.stdout) == (0, "2\n"), r.stderr
    r = stage1.run("run", "example.com/newest,os=linux")
    assert (r.returncode, r.stdout) == (0, "2\n"), r.stderr


def test_stage1_and_fetchd_name_this_machine_alike() -> None:
    """The arch label fetchd adds at pull (fetchd.appc.names) is the one stage1 asks for at
    run (stage1.appc keeps its own copy: stage1 imports nothing from fetchd)."""
    from fetchd.appc.names import _MACHINE_ARCH
    from stage1.appc import _APPC_ARCH

    assert _APPC_ARCH == _MACHINE_ARCH
