"""fsck re-checks appc signatures (issue 13): every stored ACI's signature is verified again,
over the stored bytes, with the keys trusted now for its name. Real peers: an ACI built by
actool, signed by gpg, served by nginx over TLS (tests.support.appc), pulled by the CLI;
then ``fetchd trust --remove`` or a revoked certificate in the keystore, then ``fetchd fsck``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.support.appc import AppcSite
from tests.support.cli import Fetchd
from tests.support.pgp import PgpCases
from tests.test_pull_appc import NAME, publish, pull, root_page, trust

pytest_plugins = ["tests.support.appc", "tests.support.pgp"]


def fsck(fetchd: Fetchd, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return fetchd("fsck", "--trust-dir", str(tmp / "trust"), *args)


def test_fsck_reports_a_signer_no_longer_trusted(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    publish(appc_site, tmp_path, pgp_cases)
    root_page(appc_site)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    got = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    assert got.returncode == 0, got.stderr
    blobs_before = fetchd.blobs()
    sound = fsck(fetchd, tmp_path)
    assert sound.returncode == 0, sound.stdout + sound.stderr
    assert "signature:" not in sound.stdout and ": ok" in sound.stdout, sound.stdout
    fpr = pgp_cases.fingerprint("ed")
    removed = fetchd("trust", "--trust-dir", str(tmp_path / "trust"), "--remove", fpr)
    assert removed.returncode == 0, removed.stderr
    bad = fsck(fetchd, tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    lines = [ln for ln in bad.stdout.splitlines() if ln.startswith("signature:")]
    assert len(lines) == 1, bad.stdout
    assert lines[0].startswith(f"signature: {NAME}:1.0.0: the signature of {NAME} ("), lines
    assert "no longer verifies" in lines[0], lines
    # the bytes are intact: nothing quarantined, the entry kept
    assert fetchd.blobs() == blobs_before
    assert fetchd.entry(f"{NAME}:1.0.0")
    doc = json.loads(fsck(fetchd, tmp_path, "--json").stdout)
    assert doc["ok"] is False and doc["corrupt"] == [] and len(doc["signatures"]) == 1, doc


def test_fsck_reports_a_revoked_signer(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """Pulled while the key was valid; its certificate in the keystore now carries the
    revocation: fsck names the image and the reason."""
    publish(appc_site, tmp_path, pgp_cases, signer="rev")
    root_page(appc_site)
    fpr = pgp_cases.fingerprint("rev")
    home = pgp_cases.root / "gnupg-rev"  # rev's secret key, its certificate not revoked there
    valid = subprocess.run(
        ["gpg", "--homedir", str(home), "--armor", "--export", fpr],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    d = tmp_path / "trust/trustedkeys/prefix.d" / NAME
    d.mkdir(parents=True)
    (d / fpr).write_bytes(valid)
    got = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    assert got.returncode == 0, got.stderr
    assert fsck(fetchd, tmp_path).returncode == 0
    (d / fpr).write_bytes(pgp_cases.key("rev").read_bytes())
    bad = fsck(fetchd, tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    lines = [ln for ln in bad.stdout.splitlines() if ln.startswith("signature:")]
    assert len(lines) == 1 and "revoked" in lines[0] and f"{NAME}:1.0.0" in lines[0], bad.stdout
