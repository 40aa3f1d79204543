"""fetchd.trust.keystore: rkt's layout, prefixes by path component, masks, OCI publishers."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fetchd.errors import KeyRefused, TrustError, UsageError
from fetchd.model import Reference
from fetchd.trust.keystore import (
    Keystore,
    TrustedKey,
    normalize_fingerprint,
    oci_prefix,
    validate_prefix,
)
from tests.support.pgp import PgpCases, pgp_cases_fixture  # noqa: F401 (the fixture)


@pytest.fixture
def store(tmp_path: Path) -> Keystore:
    return Keystore(tmp_path / "etc", tmp_path / "usr-lib")


def fprs(keys: list[TrustedKey]) -> set[str]:
    return {k.info.fingerprint for k in keys}


@pytest.mark.parametrize(
    "good", ["example.com", "example.com/app", "coreos.com/etcd", "a.b-c_d~e/f/g0", "10.0.0.1/x"]
)
def test_good_prefixes(good: str) -> None:
    assert validate_prefix(good) == good


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("example.com/../etc", "'..'"),
        ("example.com//app", "'//'"),
        ("/etc/passwd", "start with '/'"),
        ("https://example.com/app", "must not contain a URL scheme, omit https://"),
        ("http://example.com", "omit http://"),
        ("Example.com/App", "not an AC identifier"),
        ("example.com/app/", "not an AC identifier"),
        ("example.com/*", "not an AC identifier"),
        ("example.com/app?x=1", "not an AC identifier"),
        ("", "not an AC identifier"),
        ("a" * 2000, "longer than"),
        ("docker://", "not a registry"),
        ("docker://host:99999/x", "above 65535"),
        ("docker://host/Repo", "not a repository path"),
        ("docker://host/repo:tag", "not a repository path"),
        ("docker://host/../x", "not a repository path"),
    ],
)
def test_bad_prefixes(bad: str, why: str) -> None:
    with pytest.raises(UsageError) as exc:
        validate_prefix(bad)
    assert why in str(exc.value)


def test_docker_prefixes() -> None:
    assert validate_prefix("docker://127.0.0.1:5000/team/app") == "docker://127.0.0.1:5000/team/app"
    assert validate_prefix("docker://Quay.IO/team/") == "docker://quay.io/team"
    assert oci_prefix("docker://localhost:5000") == ("localhost:5000", "")


def test_fingerprints() -> None:
    fpr = "8b86de38890ddb7291867b025210bd8888182190"
    assert normalize_fingerprint("8B86 DE38 890D DB72 9186  7B02 5210 BD88 8818 2190") == fpr
    assert normalize_fingerprint("0x" + fpr.upper()) == fpr
    with pytest.raises(UsageError):
        normalize_fingerprint("52abd8965accc1a2")  # a key id is not enough


def test_keys_apply_by_path_component(store: Keystore, pgp_cases: PgpCases) -> None:
    [ed] = store.add(pgp_cases.key("ed").read_bytes(), "example.com/app")
    [rsa] = store.add(pgp_cases.key("rsa").read_bytes(), None)
    store.add(pgp_cases.key("sub").read_bytes(), "example.com")
    ed_f, rsa_f, sub_f = (pgp_cases.fingerprint(n) for n in ("ed", "rsa", "sub"))
    # rkt's layout, the file named by the fingerprint, 0644 in 0755 directories
    assert ed == store.local / "trustedkeys/prefix.d/example.com/app" / ed_f
    assert rsa == store.local / "trustedkeys/root.d" / rsa_f
    assert stat.S_IMODE(ed.stat().st_mode) == 0o644
    assert stat.S_IMODE(ed.parent.stat().st_mode) == 0o755
    assert ed.read_bytes().startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert fprs(store.keys_for("example.com/app")) == {ed_f, rsa_f, sub_f}
    assert fprs(store.keys_for("example.com/app/sub")) == {ed_f, rsa_f, sub_f}
    # rkt compared strings: a key for example.com/app applied to example.com/apple
    assert fprs(store.keys_for("example.com/apple")) == {rsa_f, sub_f}
    assert fprs(store.keys_for("example.com")) == {rsa_f, sub_f}
    assert fprs(store.keys_for("example.org/app")) == {rsa_f}
    prefixes = {k.info.fingerprint: k.prefix for k in store.keys_for("example.com/app")}
    assert prefixes == {ed_f: "example.com/app", rsa_f: None, sub_f: "example.com"}
    # root keys do not count for key discovery; prefix keys do, for the name and below
    assert store.has_prefix_keys("example.com/app/x")
    assert store.has_prefix_keys("example.com/other")
    assert not store.has_prefix_keys("example.org/app")
    listed = {(k.prefix, k.info.fingerprint) for k in store.entries()}
    assert listed == {(None, rsa_f), ("example.com", sub_f), ("example.com/app", ed_f)}


def test_a_keyring_file_becomes_one_file_per_key(store: Keystore, pgp_cases: PgpCases) -> None:
    both = pgp_cases.key("rsa").read_bytes() + pgp_cases.key("ed").read_bytes()
    paths = store.add(both, "example.com")
    assert sorted(p.name for p in paths) == sorted(
        [pgp_cases.fingerprint("rsa"), pgp_cases.fingerprint("ed")]
    )
    assert len(store.keys_for("example.com/x")) == 2


def test_empty_local_file_masks_a_system_key(store: Keystore, pgp_cases: PgpCases) -> None:
    assert store.system is not None
    vendor = Keystore(store.system, None)
    vendor.add(pgp_cases.key("ed").read_bytes(), "example.com")
    vendor.add(pgp_cases.key("rsa").read_bytes(), None)
    ed_f, rsa_f = pgp_cases.fingerprint("ed"), pgp_cases.fingerprint("rsa")
    assert fprs(store.keys_for("example.com/app")) == {ed_f, rsa_f}
    assert store.has_prefix_keys("example.com/app")
    # --remove of a vendor key writes the mask
    [mask] = store.remove(ed_f)
    assert mask == store.local / "trustedkeys/prefix.d/example.com" / ed_f
    assert mask.stat().st_size == 0
    assert (store.system / "trustedkeys/prefix.d/example.com" / ed_f).stat().st_size > 0
    assert fprs(store.keys_for("example.com/app")) == {rsa_f}
    assert not store.has_prefix_keys("example.com/app")
    # a local empty file in root.d masks the vendor root key
    (store.local / "trustedkeys/root.d").mkdir(parents=True)
    (store.local / "trustedkeys/root.d" / rsa_f).write_bytes(b"")
    assert store.keys_for("example.com/app") == []
    assert store.entries() == []


def test_remove(store: Keystore, pgp_cases: PgpCases) -> None:
    ed_f = pgp_cases.fingerprint("ed")
    store.add(pgp_cases.key("ed").read_bytes(), "example.com/a")
    store.add(pgp_cases.key("ed").read_bytes(), "example.com/b")
    [gone] = store.remove(ed_f, "example.com/a")
    assert not gone.exists()
    assert fprs(store.keys_for("example.com/b")) == {ed_f}
    assert store.keys_for("example.com/a") == []
    with pytest.raises(TrustError, match="no trusted key"):
        store.remove(ed_f, "example.com/a")
    store.remove(ed_f)
    assert store.entries() == []


def test_fingerprint_mismatch_and_bad_files(store: Keystore, pgp_cases: PgpCases) -> None:
    d = store.local / "trustedkeys/prefix.d/example.com"
    d.mkdir(parents=True)
    shutil.copy(pgp_cases.key("ed"), d / pgp_cases.fingerprint("rsa"))
    with pytest.raises(TrustError, match="fingerprint mismatch"):
        store.keys_for("example.com/app")
    (d / pgp_cases.fingerprint("rsa")).unlink()
    (d / "README").write_text("not a key, ignored as rkt's loader would not")
    (d / pgp_cases.fingerprint("ed")).write_text("garbage")
    with pytest.raises(TrustError, match="not an OpenPGP public key"):
        store.keys_for("example.com/app")


def test_rkt_keystore_as_it_is(tmp_path: Path, pgp_cases: PgpCases) -> None:
    """A keystore written as rkt trust writes it (armored key under its fingerprint)."""
    etc = tmp_path / "etc-rkt"
    d = etc / "trustedkeys/prefix.d/coreos.com/etcd"
    d.mkdir(parents=True)
    shutil.copy(pgp_cases.key("rsa"), d / pgp_cases.fingerprint("rsa"))
    store = Keystore(etc, None)
    assert fprs(store.keys_for("coreos.com/etcd")) == {pgp_cases.fingerprint("rsa")}
    assert store.keys_for("coreos.com/etcdctl") == []
    default = Keystore.default(Path("/etc/rkt"))
    assert (default.local, default.system) == (Path("/etc/rkt"), Path("/usr/lib/rkt"))
    assert Keystore.default(tmp_path).system is None


def test_default_locations() -> None:
    store = Keystore.default(None)
    if os.geteuid() == 0:
        assert (store.local, store.system) == (Path("/etc/fetchd"), Path("/usr/lib/fetchd"))


def _cosign_pem() -> tuple[bytes, str]:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo), hashlib.sha256(
        der
    ).hexdigest()


def test_oci_publishers(store: Keystore, pgp_cases: PgpCases) -> None:
    pem, digest = _cosign_pem()
    [c] = store.add(pem, "docker://127.0.0.1:5000/team")
    assert c == store.local / "trustedkeys/oci.d/127.0.0.1:5000/team" / f"cosign-{digest}.pub"
    [g] = store.add_oci(pgp_cases.key("ed").read_bytes(), "127.0.0.1:5000", "team/app")
    assert g.name == pgp_cases.fingerprint("ed")
    gpg, cosign = store.oci_keys_for("127.0.0.1:5000", "team/app/x")
    assert [k.fingerprint for k in gpg] == [pgp_cases.fingerprint("ed")]
    assert cosign == [pem]
    assert store.oci_keys_for("127.0.0.1:5000", "teamx/app") == ([], [])
    assert store.oci_keys_for("127.0.0.1:5001", "team/app") == ([], [])
    assert store.oci_keys_for("127.0.0.1:5000", "team") == ([], [pem])
    # appc names never see OCI keys
    assert store.keys_for("127.0.0.1/team") == []
    gpg_entries, cosign_entries = store.oci_entries()
    assert [k.prefix for k in gpg_entries] == ["docker://127.0.0.1:5000/team/app"]
    assert [c.prefix for c in cosign_entries] == ["docker://127.0.0.1:5000/team"]
    store.remove(digest, "docker://127.0.0.1:5000/team")
    assert store.oci_keys_for("127.0.0.1:5000", "team/app")[1] == []
    with pytest.raises(TrustError, match="not a PEM public key"):
        store.add_oci(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n", "h", "r")


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("docker://busybox", "docker://docker.io/library/busybox"),
        ("docker://busybox/", "docker://docker.io/busybox/"),  # a subtree: no library/
        ("docker://team/app", "docker://docker.io/team/app"),
        ("docker://docker.io/busybox", "docker://docker.io/library/busybox"),
        ("docker://Index.Docker.IO/busybox", "docker://docker.io/library/busybox"),
        ("docker://registry-1.docker.io/team/app", "docker://docker.io/team/app"),
        ("docker://index.docker.io", "docker://docker.io"),
        ("docker://docker.io/team/", "docker://docker.io/team/"),
        ("docker://quay.io", "docker://quay.io"),
        ("docker://localhost", "docker://localhost"),
        ("docker://localhost/app", "docker://localhost/app"),
        ("docker://quay.io/app", "docker://quay.io/app"),  # library/ is the Hub's only
    ],
)
def test_docker_prefixes_are_read_as_pull_names(given: str, stored: str) -> None:
    """Review finding: docker://busybox was stored under the host "busybox", which no pull
    names (a pull of docker://busybox is docker.io/library/busybox), so it guarded nothing."""
    assert validate_prefix(given) == stored
    assert validate_prefix(stored) == stored  # idempotent: the stored form reads back
    assert oci_prefix(stored) == oci_prefix(given)


def test_a_docker_hub_prefix_guards_what_the_pull_looks_up(
    store: Keystore, pgp_cases: PgpCases
) -> None:
    ed, rsa, sub = (pgp_cases.fingerprint(n) for n in ("ed", "rsa", "sub"))
    [path] = store.add(pgp_cases.key("ed").read_bytes(), "docker://busybox")
    assert path == store.local / "trustedkeys/oci.d/docker.io/library/busybox" / ed
    pem, _digest = _cosign_pem()
    store.add(pem, "docker://index.docker.io/team")  # stored for docker.io/library/team
    store.add(pgp_cases.key("rsa").read_bytes(), "docker://index.docker.io/team/")
    store.add(pgp_cases.key("sub").read_bytes(), "docker://registry-1.docker.io")

    def found(text: str) -> set[str]:
        ref = Reference.parse(text)  # what fetchd pull looks up
        gpg, _pems = store.oci_keys_for(ref.host, ref.name)
        return {k.fingerprint for k in gpg}

    assert found("docker://busybox") == {ed, sub}
    assert found("docker://docker.io/library/busybox:1.36") == {ed, sub}
    assert found("docker://index.docker.io/busybox") == {ed, sub}  # library/ added on lookup
    assert found("docker://registry-1.docker.io/library/busybox") == {ed, sub}
    assert found("docker://team/app") == {rsa, sub}
    assert found("docker://index.docker.io/team/app") == {rsa, sub}
    assert found("docker://quay.io/library/busybox") == set()
    # https's default port is no part of the name (serve's upstream host:port)
    assert {
        k.fingerprint for k in store.oci_keys_for("registry-1.docker.io:443", "library/busybox")[0]
    } == {ed, sub}
    assert store.oci_keys_for("docker.io", "library/team")[1] == [pem]
    assert store.oci_keys_for("docker.io", "team/app")[1] == []
    # a key stored under an alias directory (as before the fix) still counts for docker.io
    legacy = store.local / "trustedkeys/oci.d/index.docker.io/library/alpine"
    legacy.mkdir(parents=True)
    shutil.copy(pgp_cases.key("ed"), legacy / ed)
    assert found("docker://alpine") == {ed, sub}
    listed = {(k.prefix, k.info.fingerprint) for k in store.oci_entries()[0]}
    assert listed == {
        ("docker://docker.io/library/busybox", ed),
        ("docker://docker.io/library/alpine", ed),
        ("docker://docker.io/team/", rsa),
        ("docker://docker.io", sub),
    }
    # --remove with an alias prefix reaches both
    assert len(store.remove(ed, "docker://index.docker.io/alpine")) == 1
    assert found("docker://alpine") == {sub}


def test_a_key_file_with_one_refused_key_stores_none(store: Keystore, pgp_cases: PgpCases) -> None:
    """Review finding: add stored every certificate of a file, judged or not (the appc
    pull's --trust-keys-from-https judged only the first); now one refused key refuses
    the file, with its reason, and nothing is written."""
    for bad, reason in (("exp", "expired on 2020-01-02"), ("rev", "revoked (hard-revoked")):
        data = pgp_cases.key("ed").read_bytes() + pgp_cases.key(bad).read_bytes()
        for prefix in ("example.com/app", None, "docker://127.0.0.1:5000/app"):
            with pytest.raises(KeyRefused) as exc:
                store.add(data, prefix)
            assert reason in str(exc.value), exc.value
            assert pgp_cases.fingerprint(bad)[:4].upper() in str(exc.value)
            assert "nothing was trusted" in str(exc.value)
            assert not (store.local / "trustedkeys").exists()
