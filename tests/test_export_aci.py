"""``fetchd export REF DEST.aci`` (issue 13, acceptance 5): the ACI and its signature as signed.

An actool-built ACI signed with gpg is pulled with the real ``fetchd pull --signature``; the
export writes ``DEST.aci`` and ``DEST.aci.asc`` byte-identical to what was pulled, which
``actool validate`` and ``sqv`` (with the signer's key) accept. The same image exported to a
directory is an OCI layout that skopeo reads; a registry image cannot become a .aci.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from fetchd.store import maintenance as mt
from fetchd.store.cas import Store
from tests.support.appc import build_aci
from tests.support.cli import Fetchd, blob_file, failed, ok
from tests.support.images import Layer, build_image, push, skopeo
from tests.support.pgp import PgpCases
from tests.support.registry import Registry

NAME = "example.com/hello"


def pull_signed(fetchd: Fetchd, pgp: PgpCases, tmp_path: Path, key: str = "ed") -> Path:
    """Build, sign (gpg --armor --detach-sign), trust and pull example.com/hello 1.0.0."""
    aci = build_aci(tmp_path, NAME, "1.0.0", out=tmp_path / "hello.aci")
    asc = pgp.sign(key, aci)
    trust = tmp_path / "trust"
    ok(
        fetchd(
            "trust",
            "--trust-dir",
            str(trust),
            "--prefix",
            NAME,
            "--skip-fingerprint-review",
            str(pgp.key(key)),
        )
    )
    out = ok(fetchd("pull", "--trust-dir", str(trust), "--signature", str(asc), str(aci)))
    assert out.strip().startswith("sha256:"), out
    return aci


def test_export_aci_is_what_was_signed(fetchd: Fetchd, pgp_cases: PgpCases, tmp_path: Path) -> None:
    aci = pull_signed(fetchd, pgp_cases, tmp_path)
    asc = aci.with_name(aci.name + ".asc")
    for ref in (f"{NAME}:1.0.0", f"{NAME},version=1.0.0", f"{NAME},version=1.0.0,os=linux"):
        dest = tmp_path / "out" / f"{ref.replace('/', '_')}.aci"
        assert ok(fetchd("export", ref, str(dest))).strip() == str(dest)
        assert dest.read_bytes() == aci.read_bytes()
        exported_asc = dest.with_name(dest.name + ".asc")
        assert exported_asc.read_bytes() == asc.read_bytes()

        validate = subprocess.run(
            ["actool", "validate", str(dest)], capture_output=True, text=True, timeout=60
        )
        assert validate.returncode == 0, validate.stderr
        sqv = subprocess.run(
            ["sqv", "--keyring", str(pgp_cases.key("ed")), str(exported_asc), str(dest)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sqv.returncode == 0, sqv.stderr
        assert sqv.stdout.strip().upper() == pgp_cases.signing_fingerprint("ed").upper()

    # --json names both files
    dest = tmp_path / "json.aci"
    doc = json.loads(ok(fetchd("export", "--json", f"{NAME}:1.0.0", str(dest))))
    assert doc["dest"] == str(dest) and doc["signature"] == f"{dest}.asc"
    assert doc["name"] == f"{NAME}:1.0.0" and doc["blobs"] == 2

    # a signature by another key: sqv refuses the pair (the oracle is not a rubber stamp)
    stranger = subprocess.run(
        ["sqv", "--keyring", str(pgp_cases.key("stranger")), f"{dest}.asc", str(dest)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert stranger.returncode != 0


def test_export_appc_to_a_directory_is_an_oci_layout(
    fetchd: Fetchd, pgp_cases: PgpCases, tmp_path: Path
) -> None:
    pull_signed(fetchd, pgp_cases, tmp_path)
    dest = tmp_path / "layout"
    ok(fetchd("export", f"{NAME}:1.0.0", str(dest)))
    raw = json.loads(skopeo("inspect", "--config", f"oci:{dest}:{NAME}:1.0.0"))
    assert raw["config"]["Entrypoint"] == ["/bin/echo", f"hello from {NAME}"]
    assert raw["config"]["User"] == "1000:1000"
    assert raw["os"] == "linux"


def test_export_aci_refusals(
    fetchd: Fetchd, pgp_cases: PgpCases, registry: Registry, busybox_layer: Layer, tmp_path: Path
) -> None:
    pull_signed(fetchd, pgp_cases, tmp_path)
    error = failed(fetchd("export", f"{NAME},version=9", str(tmp_path / "x.aci")))
    assert "is not in the store" in error, error
    assert not (tmp_path / "x.aci").exists()

    layout = tmp_path / "src"
    build_image(layout, "app", [busybox_layer], config={"Cmd": ["/bin/true"]})
    ref = f"{registry.host}/export/app:1"
    push(layout, "app", ref)
    ok(fetchd("pull", "--insecure-options", "http", f"docker://{ref}"))
    usage = fetchd("export", f"docker://{ref}", str(tmp_path / "app.aci"))
    assert usage.returncode == 2, usage.stderr  # a usage error: say a directory or a .tar
    assert usage.stderr.strip().splitlines() == [
        f"error: {ref} is not an appc image: only an ACI exports to a .aci file; "
        "give a directory (an OCI layout) or a .tar"
    ]
    assert not (tmp_path / "app.aci").exists()

    # a corrupt ACI blob in the store is not exported
    entry = fetchd.entry(f"{NAME}:1.0.0")
    manifest = json.loads(blob_file(fetchd, entry["digest"]).read_bytes())
    blob = blob_file(fetchd, manifest["layers"][-1]["digest"])
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    error = failed(fetchd("export", f"{NAME}:1.0.0", str(tmp_path / "bad.aci")))
    assert "is corrupt" in error and "fetchd fsck" in error, error
    assert not (tmp_path / "bad.aci").exists()
    assert not list(tmp_path.glob(".bad.aci*"))


def test_export_aci_does_not_follow_a_planted_symlink(
    fetchd: Fetchd, pgp_cases: PgpCases, tmp_path: Path
) -> None:
    """Review finding: the export wrote through ``.{name}.{pid}.tmp`` opened with
    open(…, "wb"), which follows a symlink planted at that predictable name: the victim
    got the ACI's bytes. The export runs in this process, so its pid is ours."""
    aci = pull_signed(fetchd, pgp_cases, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "hello.aci"
    victims = []
    for target in (dest, out / "hello.aci.asc"):
        victim = tmp_path / f"victim-{target.name}"
        victim.write_bytes(b"precious\n")
        (out / f".{target.name}.{os.getpid()}.tmp").symlink_to(victim)
        victims.append(victim)
    result = mt.export(Store(fetchd.store), f"{NAME}:1.0.0", dest)
    assert result.dest == dest
    assert dest.read_bytes() == aci.read_bytes()
    assert (out / "hello.aci.asc").read_bytes() == aci.with_name(aci.name + ".asc").read_bytes()
    for victim in victims:
        assert victim.read_bytes() == b"precious\n"
    assert not dest.is_symlink()
    # the exported files are as open() would have made them (0666 less the umask)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in out.iterdir() if not p.is_symlink()) == [
        "hello.aci",
        "hello.aci.asc",
    ]
