"""pull of appc images (issue 13, acceptance 1, 2, 4, 6, 7): real peers only — ACIs built by
actool, signed by gpg/sq keys (tests.support.pgp), served by nginx over TLS with a test CA on
127.43.0.N:443 (tests.support.appc), reached through ``--resolve``; the CLI as a process."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.appc import AppcSite, appc_arch, build_aci
from tests.support.cli import Fetchd
from tests.support.pgp import PgpCases

# the fixtures appc_site and pgp_cases
pytest_plugins = ["tests.support.appc", "tests.support.pgp"]

NAME = "example.com/hello"
TEMPLATE = "https://example.com/images/{name}-{version}-{os}-{arch}.{ext}"


def aci_path(name: str, version: str) -> str:
    return f"/images/{name}-{version}-linux-{appc_arch()}.aci"


def publish(
    site: AppcSite,
    tmp: Path,
    pgp: PgpCases,
    signer: str | None = "ed",
    name: str = NAME,
    version: str = "1.0.0",
    **build: Any,
) -> Path:
    """Build, sign and serve ``name`` at the template's URL; returns the local ACI."""
    out = tmp / f"{name.replace('/', '_')}-{version}.aci"
    aci = build_aci(tmp, build.pop("manifest_name", name), version, out=out, **build)
    path = aci_path(name, version)
    site.put(path, aci)
    if signer is not None:
        site.put(path + ".asc", pgp.sign(signer, aci))
    return aci


def root_page(site: AppcSite, *extra: tuple[str, str, str]) -> None:
    site.page("/", site.meta(("ac-discovery", "example.com", TEMPLATE), *extra))


def trust(fetchd: Fetchd, tmp: Path, pgp: PgpCases, key: str, prefix: str = NAME) -> None:
    got = fetchd(
        "trust",
        "--trust-dir",
        str(tmp / "trust"),
        "--prefix",
        prefix,
        "--skip-fingerprint-review",
        str(pgp.key(key)),
    )
    assert got.returncode == 0, got.stderr


def pull(fetchd: Fetchd, site: AppcSite, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return fetchd(
        "pull", "--trust-dir", str(tmp / "trust"), *site.resolve_args(), *args, env=site.env()
    )


def error_line(got: subprocess.CompletedProcess[str]) -> str:
    errors = [ln for ln in got.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, got.stderr
    return errors[0]


def assert_nothing_stored(fetchd: Fetchd) -> None:
    index = fetchd.index() if (fetchd.store / "layout" / "index.json").exists() else {}
    assert index.get("manifests", []) == []
    assert fetchd.blobs() == set()
    assert [p for p in fetchd.ingests() if any(p.iterdir())] == []


def test_trust_then_pull_by_name(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """Acceptance 1: discovery from the host's root page (the walk goes up), a key trusted with
    `fetchd trust`, the digest printed, skopeo reads the layout, the ACI stored as signed."""
    aci = publish(appc_site, tmp_path, pgp_cases)
    root_page(appc_site)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    got = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    assert got.returncode == 0, got.stderr
    digest = got.stdout.strip()
    assert digest.startswith("sha256:")
    assert "signature verified:" in got.stderr
    assert pgp_cases.uid("ed") in got.stderr
    entry = fetchd.entry(f"{NAME}:1.0.0")
    assert entry["digest"] == digest
    ann = entry["annotations"]
    assert ann["io.fetchd.appc.name"] == NAME
    assert ann["io.fetchd.appc.signer"] == pgp_cases.fingerprint("ed")
    assert json.loads(ann["io.fetchd.appc.labels"])["version"] == "1.0.0"
    requests = appc_site.requests()
    # the walk: the name's own page is a 404, the host's answers; the signature before the ACI
    assert requests[0].startswith("GET /hello?ac-discovery=1 404"), requests
    sig_at = next(i for i, r in enumerate(requests) if ".aci.asc " in r)
    aci_at = next(i for i, r in enumerate(requests) if r.split()[1].endswith(".aci"))
    assert sig_at < aci_at
    # the ACI and its signature are blobs, byte for byte as fetched
    blobs = fetchd.store / "layout" / "blobs"
    manifest = json.loads((blobs / "sha256" / digest.split(":")[1]).read_bytes())
    layer = manifest["layers"][-1]
    assert layer["mediaType"] == "application/vnd.fetchd.appc.aci.v1.tar+gzip"
    assert (blobs / "sha256" / layer["digest"].split(":")[1]).read_bytes() == aci.read_bytes()
    sig = ann["io.fetchd.appc.signature"].split(":")[1]
    assert (blobs / "sha256" / sig).read_bytes() == (aci.parent / (aci.name + ".asc")).read_bytes()
    inspect = subprocess.run(
        ["skopeo", "inspect", f"oci:{fetchd.store / 'layout'}:{NAME}:1.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["Digest"] == digest
    config = subprocess.run(
        ["skopeo", "inspect", "--config", f"oci:{fetchd.store / 'layout'}:{NAME}:1.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert json.loads(config.stdout)["config"]["User"] == "1000:1000"
    # policy new: the second pull is answered by the store, with no request at all
    appc_site.clear_log()
    again = pull(fetchd, appc_site, tmp_path, f"{NAME},version=1.0.0")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == digest
    assert appc_site.requests() == []


def test_untrusted_signer_refused_before_the_aci(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """Acceptance 2 (without keys, no tty) and the signature first: exit 1, the trust hint,
    no request for the ACI, nothing stored."""
    publish(appc_site, tmp_path, pgp_cases, signer="stranger")
    root_page(appc_site)
    trust(fetchd, tmp_path, pgp_cases, "ed")  # a key, but not the signer's
    got = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    assert got.returncode == 1
    line = error_line(got)
    assert "is signed by" in line and "not trusted for example.com/hello" in line, line
    assert f"fetchd trust --prefix {NAME}" in line, line
    assert not any(r.split()[1].endswith(".aci") for r in appc_site.requests())
    assert_nothing_stored(fetchd)


def test_no_keys_at_all_gives_the_hint(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    publish(appc_site, tmp_path, pgp_cases)
    root_page(appc_site, ("ac-discovery-pubkeys", "example.com", "https://example.com/pubkeys.gpg"))
    appc_site.put("/pubkeys.gpg", pgp_cases.key("ed"))
    got = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    assert got.returncode == 1
    line = error_line(got)
    assert "--trust-keys-from-https" in line and f"fetchd trust --prefix {NAME}" in line, line
    assert not any(r.split()[1].endswith(".aci") for r in appc_site.requests())
    assert_nothing_stored(fetchd)


def test_trust_keys_from_https(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """Acceptance 2: the ac-discovery-pubkeys key is trusted for the name (TOFU) and used."""
    publish(appc_site, tmp_path, pgp_cases)
    root_page(appc_site, ("ac-discovery-pubkeys", "example.com", "https://example.com/pubkeys.gpg"))
    appc_site.put("/pubkeys.gpg", pgp_cases.key("ed"))
    got = pull(fetchd, appc_site, tmp_path, "--trust-keys-from-https", f"{NAME}:1.0.0")
    assert got.returncode == 0, got.stderr
    fpr = pgp_cases.fingerprint("ed")
    assert (tmp_path / "trust/trustedkeys/prefix.d" / NAME / fpr).is_file()
    assert "signature verified:" in got.stderr


@pytest.mark.parametrize("key", ["rsa", "ed", "sub"])
def test_key_kinds_pass(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases, key: str
) -> None:
    """Acceptance 4: RSA-3072, Ed25519 and a signing subkey under a cert-only primary."""
    publish(appc_site, tmp_path, pgp_cases, signer=key)
    root_page(appc_site)
    trust(fetchd, tmp_path, pgp_cases, key)
    got = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    assert got.returncode == 0, got.stderr
    assert fetchd.entry(f"{NAME}:1.0.0")["annotations"]["io.fetchd.appc.signer"] == (
        pgp_cases.fingerprint(key)
    )


@pytest.mark.parametrize(
    ("key", "reason"),
    [("exp", "expired"), ("rev", "revoked"), ("soft", "revoked"), ("hard", "revoked")],
)
def test_refused_keys(
    fetchd: Fetchd,
    appc_site: AppcSite,
    tmp_path: Path,
    pgp_cases: PgpCases,
    key: str,
    reason: str,
) -> None:
    """Acceptance 4: expired and revoked (hard or soft) keys are refused with the reason,
    before the ACI is requested; nothing stored."""
    publish(appc_site, tmp_path, pgp_cases, signer=key)
    root_page(appc_site)
    # `fetchd trust` refuses such keys itself: put the file where the keystore reads it
    d = tmp_path / "trust/trustedkeys/prefix.d" / NAME
    d.mkdir(parents=True)
    (d / pgp_cases.fingerprint(key)).write_bytes(pgp_cases.key(key).read_bytes())
    got = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    assert got.returncode == 1
    assert reason in error_line(got)
    assert not any(r.split()[1].endswith(".aci") for r in appc_site.requests())
    assert_nothing_stored(fetchd)


def test_direct_url_remote_cache(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """Acceptance 6: an https ACI URL (signature beside it, keys of the manifest's name);
    a second pull within max-age makes no request; past it, one conditional GET → 304."""
    publish(appc_site, tmp_path, pgp_cases)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    url = appc_site.url(aci_path(NAME, "1.0.0"))
    first = pull(fetchd, appc_site, tmp_path, url)
    assert first.returncode == 0, first.stderr
    appc_site.clear_log()
    second = pull(fetchd, appc_site, tmp_path, url)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert appc_site.requests() == []
    # max-age over: the record was checked 300 s ago (as if time had passed)
    with sqlite3.connect(fetchd.store / "fetchd.db") as db:
        db.execute("UPDATE urls SET checked_at = checked_at - 301 WHERE url = ?", (url,))
    appc_site.clear_log()
    third = pull(fetchd, appc_site, tmp_path, url)
    assert third.returncode == 0, third.stderr
    assert third.stdout == first.stdout
    acis = [r for r in appc_site.requests() if r.split()[1].endswith(".aci")]
    assert acis == [f"GET {aci_path(NAME, '1.0.0')} 304"]


def test_local_aci_with_signature(fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases) -> None:
    aci = build_aci(tmp_path, NAME, "1.0.0", out=tmp_path / "hello.aci")
    sig = pgp_cases.sign("ed", aci, out=tmp_path / "other-name.asc")
    trust(fetchd, tmp_path, pgp_cases, "ed")
    got = fetchd("pull", "--trust-dir", str(tmp_path / "trust"), "--signature", str(sig), str(aci))
    assert got.returncode == 0, got.stderr
    assert fetchd.entry(f"{NAME}:1.0.0")["digest"] == got.stdout.strip()
    # without a signature beside it: refused, saying what to pass
    bare = fetchd("pull", "--trust-dir", str(tmp_path / "trust"), str(aci))
    assert bare.returncode == 1
    assert "--signature" in error_line(bare)


def test_dependency_chain(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """Acceptance 7: top → mid → base, each discovered, verified for its own name (its own
    key), its imageID checked; layers in render order (dependencies first)."""
    base = publish(
        appc_site,
        tmp_path,
        pgp_cases,
        "rsa",
        name="example.com/base",
        app=False,
        extra_files={"base.txt": b"base\n"},
    )
    base_id = _image_id(base)
    mid = publish(
        appc_site,
        tmp_path,
        pgp_cases,
        "sub",
        name="example.com/mid",
        app=False,
        deps=[
            {
                "imageName": "example.com/base",
                "imageID": base_id[: 7 + 16],
                # a dependency gets no os/arch defaults (rkt PR #2317): the labels the
                # template's {os}-{arch} needs are given, as a publisher would
                "labels": [
                    {"name": "version", "value": "1.0.0"},
                    {"name": "os", "value": "linux"},
                    {"name": "arch", "value": appc_arch()},
                ],
            }
        ],
    )
    publish(
        appc_site,
        tmp_path,
        pgp_cases,
        "ed",
        deps=[
            {
                "imageName": "example.com/mid",
                "labels": [
                    {"name": "version", "value": "1.0.0"},
                    {"name": "os", "value": "linux"},
                    {"name": "arch", "value": appc_arch()},
                ],
            }
        ],
    )
    root_page(appc_site)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    trust(fetchd, tmp_path, pgp_cases, "sub", "example.com/mid")
    trust(fetchd, tmp_path, pgp_cases, "rsa", "example.com/base")
    got = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    assert got.returncode == 0, got.stderr
    assert got.stderr.count("signature verified:") == 3
    blobs = fetchd.store / "layout" / "blobs" / "sha256"
    manifest = json.loads((blobs / got.stdout.strip().split(":")[1]).read_bytes())
    names = [layer["annotations"]["io.fetchd.appc.name"] for layer in manifest["layers"]]
    assert names == ["example.com/base", "example.com/mid", NAME]
    signers = [layer["annotations"]["io.fetchd.appc.signer"] for layer in manifest["layers"]]
    assert signers == [pgp_cases.fingerprint(k) for k in ("rsa", "sub", "ed")]
    assert manifest["layers"][1]["digest"].split(":")[1] == _sha256(mid)


def _image_id(aci: Path) -> str:
    import gzip
    import hashlib

    return "sha512-" + hashlib.sha512(gzip.decompress(aci.read_bytes())).hexdigest()


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tampered_aci_discarded(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """Bad input: bytes that fail the signature are discarded before commit (no blob, no
    entry, no ingest a retry would resume), one error line."""
    aci = publish(appc_site, tmp_path, pgp_cases)
    data = bytearray(aci.read_bytes())
    data[len(data) // 2] ^= 0xFF
    appc_site.put(aci_path(NAME, "1.0.0"), bytes(data))
    trust(fetchd, tmp_path, pgp_cases, "ed")
    got = pull(fetchd, appc_site, tmp_path, appc_site.url(aci_path(NAME, "1.0.0")))
    assert got.returncode == 1
    assert "does not match the data" in error_line(got)
    assert_nothing_stored(fetchd)


def test_unsigned_stored_image_does_not_answer_a_verified_pull(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """An ACI stored with --insecure-options image (anyone's bytes naming example.com/hello
    1.0.0) is not what a later verified pull of that name gets: that pull discovers, verifies
    and replaces it; the verified entry then answers from the store."""
    anyone = build_aci(
        tmp_path, NAME, "1.0.0", out=tmp_path / "anyone.aci", extra_files={"evil": b"x\n"}
    )
    got = fetchd("pull", "--insecure-options", "image", str(anyone))
    assert got.returncode == 0, got.stderr
    unsigned = got.stdout.strip()
    assert fetchd.entry(f"{NAME}:1.0.0")["digest"] == unsigned
    aci = publish(appc_site, tmp_path, pgp_cases)
    root_page(appc_site)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    verified = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.strip() != unsigned
    assert "signature verified:" in verified.stderr
    assert any(r.split()[1].endswith(".aci") for r in appc_site.requests())
    entry = fetchd.entry(f"{NAME}:1.0.0")
    assert entry["digest"] == verified.stdout.strip()
    assert entry["annotations"]["io.fetchd.appc.signer"] == pgp_cases.fingerprint("ed")
    blobs = fetchd.store / "layout" / "blobs" / "sha256"
    manifest = json.loads((blobs / entry["digest"].split(":")[1]).read_bytes())
    assert manifest["layers"][-1]["digest"].split(":")[1] == _sha256(aci)
    # the verified entry answers from the store; once its key is no longer trusted, it does not
    appc_site.clear_log()
    again = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    assert again.returncode == 0 and again.stdout == verified.stdout, again.stderr
    assert appc_site.requests() == []
    removed = fetchd(
        "trust", "--trust-dir", str(tmp_path / "trust"), "--remove", pgp_cases.fingerprint("ed")
    )
    assert removed.returncode == 0, removed.stderr
    gone = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    assert gone.returncode == 1
    assert "not trusted for example.com/hello" in error_line(gone)
    assert any(r.endswith(".aci.asc 200") for r in appc_site.requests())


def test_keys_over_unverified_channels_need_pubkey(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """--trust-keys-from-https trusts no key that came over unverified TLS (--insecure-options
    tls) or was named by a discovery page that came over plain http, unless pubkey is
    insecure too: one error line naming the fix, no key written, no ACI requested."""
    prefix_d = tmp_path / "trust/trustedkeys/prefix.d"
    keys = ("ac-discovery-pubkeys", "example.com", "https://example.com/pubkeys.gpg")
    publish(appc_site, tmp_path, pgp_cases)
    root_page(appc_site, keys)
    appc_site.put("/pubkeys.gpg", pgp_cases.key("ed"))
    tls = pull(
        fetchd,
        appc_site,
        tmp_path,
        "--insecure-options",
        "tls",
        "--trust-keys-from-https",
        f"{NAME}:1.0.0",
    )
    assert tls.returncode == 1
    line = error_line(tls)
    assert "--insecure-options tls" in line and "pubkey" in line, line
    assert not prefix_d.exists()
    assert not any(r.split()[1].endswith(".aci") for r in appc_site.requests())
    # example.net is not in the site's certificate: its page comes over http (allowed), and
    # names an https key URL that would verify
    other = "example.net/hello"
    publish(appc_site, tmp_path, pgp_cases, name=other)
    appc_site.page(
        "/",
        appc_site.meta(
            ("ac-discovery", "example.com", TEMPLATE),
            ("ac-discovery", "example.net", TEMPLATE),
            keys,
            ("ac-discovery-pubkeys", "example.net", "https://example.com/pubkeys.gpg"),
        ),
    )
    plain = fetchd(
        "pull",
        "--trust-dir",
        str(tmp_path / "trust"),
        *appc_site.resolve_args("example.net"),
        "--insecure-options",
        "http",
        "--trust-keys-from-https",
        f"{other}:1.0.0",
        env=appc_site.env(),
    )
    assert plain.returncode == 1
    line = error_line(plain)
    assert "plain http" in line and "pubkey" in line, line
    assert not prefix_d.exists()
    # with pubkey insecure as well: rkt's TOFU, as asked for
    both = pull(
        fetchd,
        appc_site,
        tmp_path,
        "--insecure-options",
        "tls,pubkey",
        "--trust-keys-from-https",
        f"{NAME}:1.0.0",
    )
    assert both.returncode == 0, both.stderr
    assert (prefix_d / NAME / pgp_cases.fingerprint("ed")).is_file()


def test_keys_named_by_a_page_an_https_redirect_sent_over_http_need_pubkey(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """The page that named the keys came over http after an https redirect (the site's
    /downgrade: https -> http://HOST/?ac-discovery=1, followed with --insecure-options
    http): the keys are not trusted without pubkey, whatever URL the walk started from."""
    name = "example.com/downgrade"
    prefix_d = tmp_path / "trust/trustedkeys/prefix.d"
    publish(appc_site, tmp_path, pgp_cases, name=name)
    root_page(appc_site, ("ac-discovery-pubkeys", "example.com", "https://example.com/pubkeys.gpg"))
    appc_site.put("/pubkeys.gpg", pgp_cases.key("ed"))
    got = pull(
        fetchd,
        appc_site,
        tmp_path,
        "--insecure-options",
        "http",
        "--trust-keys-from-https",
        f"{name}:1.0.0",
    )
    assert got.returncode == 1, got.stderr
    line = error_line(got)
    assert "plain http" in line and "pubkey" in line, line
    assert not prefix_d.exists()
    assert not any(r.split()[1].endswith(".aci") for r in appc_site.requests())


def test_dependency_without_os_arch_labels_says_what_is_missing(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """A dependency gets no os/arch defaults: when the template needs them, the discovery
    error names the variables left unfilled and the labels to give."""
    dep = {"imageName": "example.com/base", "labels": [{"name": "version", "value": "1.0.0"}]}
    publish(appc_site, tmp_path, pgp_cases, deps=[dep])
    root_page(appc_site)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    got = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    assert got.returncode == 1
    line = error_line(got)
    assert "example.com/base" in line and "(1 skipped: {os}, {arch} not given" in line, line
    assert "dependencies get no os/arch defaults: give os=…,arch=… labels" in line, line
