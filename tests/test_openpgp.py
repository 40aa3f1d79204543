"""fetchd.trust.openpgp against real keys (gpg, sq) and real oracles (sqv, gpgv).

Every verdict of fetchd on the case set equals sqv's, except the two cases of the strict
policy (a key expired now, a soft revocation dated after the signature), where sqv accepts
(Sequoia judges at the signature's time) and fetchd refuses, as gpgv's status lines do
(EXPKEYSIG / REVKEYSIG).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from fetchd.errors import KeyRefused, NotTrusted, SignatureInvalid, TrustError
from fetchd.trust import openpgp
from fetchd.trust.openpgp import KeyInfo, read_keys, signature_info, verify_detached
from tests.support.pgp import PgpCases, pgp_cases_fixture  # noqa: F401 (the fixture)

ALL = ("rsa", "ed", "sub", "exp", "rev", "soft", "hard", "weak", "stranger")
#: sqv accepts these, fetchd's strict policy refuses them, gpgv flags them
STRICT = {"exp": "EXPKEYSIG", "soft": "REVKEYSIG"}
REASONS = {
    "exp": "expired on 2020-01-02",
    "rev": "revoked (hard-revoked: no reason given)",
    "soft": "revoked (soft-revoked: superseded",
    "hard": "revoked (hard-revoked: key compromised",
    "weak": "RSA-1024 is weaker than RSA-2048",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("openpgp") / "image.aci"
    path.write_bytes(os.urandom(1 << 20))
    return path


def keys(cases: PgpCases, name: str) -> list[KeyInfo]:
    return read_keys(cases.key(name).read_bytes(), f"{name}.asc")


def sqv(cases: PgpCases, name: str, sig: Path, file: Path) -> bool:
    proc = subprocess.run(
        ["sqv", "--keyring", str(cases.key(name)), str(sig), str(file)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return proc.returncode == 0


def gpgv_status(cases: PgpCases, name: str, sig: Path, file: Path, tmp: Path) -> list[str]:
    """gpgv's status keywords (it cannot read an armored keyring: dearmor it first)."""
    ring = tmp / f"{name}.gpg"
    if not ring.exists():
        subprocess.run(
            ["gpg", "--batch", "--yes", "--dearmor", "-o", str(ring), str(cases.key(name))],
            check=True,
            capture_output=True,
            timeout=60,
        )
    proc = subprocess.run(
        ["gpgv", "--status-fd", "1", "--keyring", str(ring), str(sig), str(file)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
        check=False,
    )
    return [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("[GNUPG:] ")]


def fetchd_verdict(sig: Path, file: Path, given: list[KeyInfo]) -> tuple[bool, str]:
    try:
        v = asyncio.run(verify_detached(sig.read_bytes(), file, given, file.name))
    except (SignatureInvalid, KeyRefused) as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, v.signer


# --- the oracle --------------------------------------------------------------------------


@pytest.mark.parametrize("armor", [True, False], ids=["armored", "binary"])
@pytest.mark.parametrize("name", ALL)
def test_verdict_equals_sqv_or_gpgv(
    pgp_cases: PgpCases, data: Path, tmp_path: Path, name: str, armor: bool
) -> None:
    sig = pgp_cases.sign(name, data, armor=armor, out=tmp_path / f"{name}.sig")
    ok, why = fetchd_verdict(sig, data, keys(pgp_cases, name))
    oracle = sqv(pgp_cases, name, sig, data)
    if name in STRICT:
        assert oracle, "sqv accepts a signature made while the key was valid"
        status = gpgv_status(pgp_cases, name, sig, data, tmp_path)
        assert STRICT[name] in status, status
        assert not ok and why.startswith("KeyRefused"), why
    else:
        assert ok == oracle, f"fetchd {ok} ({why}), sqv {oracle}"
    if name in REASONS:
        assert REASONS[name] in why, why
    if ok:
        assert why == pgp_cases.signing_fingerprint(name)


@pytest.mark.parametrize("name", ["rsa", "ed", "sub"])
def test_tampered_data_is_refused_as_sqv_does(
    pgp_cases: PgpCases, data: Path, tmp_path: Path, name: str
) -> None:
    sig = pgp_cases.sign(name, data, out=tmp_path / "x.asc")
    tampered = tmp_path / "tampered.aci"
    raw = bytearray(data.read_bytes())
    raw[4096] ^= 0x01
    tampered.write_bytes(bytes(raw))
    ok, why = fetchd_verdict(sig, tampered, keys(pgp_cases, name))
    assert not sqv(pgp_cases, name, sig, tampered)
    assert not ok
    assert "does not match the data" in why, why
    truncated = tmp_path / "truncated.aci"
    truncated.write_bytes(bytes(raw[:-1]))
    assert not fetchd_verdict(sig, truncated, keys(pgp_cases, name))[0]


def test_the_working_directory_cannot_answer_for_the_verifier(
    pgp_cases: PgpCases, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child is ``python -m fetchd.trust.verify``: run from a directory holding a
    pysequoia.py (or a fetchd/ package) that says yes to everything, tampered data is
    still refused (``-m`` would put the working directory first on sys.path)."""
    sig = pgp_cases.sign("ed", data, out=tmp_path / "x.asc")
    tampered = tmp_path / "tampered.aci"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0x01
    tampered.write_bytes(bytes(raw))
    hostile = tmp_path / "untrusted-dir"
    (hostile / "fetchd" / "trust").mkdir(parents=True)
    yes = 'import sys, json\nsys.stdout.write(json.dumps({"ok": True}))\n'
    (hostile / "pysequoia.py").write_text("raise SystemExit(0)\n")
    (hostile / "fetchd" / "__init__.py").write_text("")
    (hostile / "fetchd" / "trust" / "__init__.py").write_text("")
    (hostile / "fetchd" / "trust" / "verify.py").write_text(yes)
    monkeypatch.chdir(hostile)
    ok, why = fetchd_verdict(sig, tampered, keys(pgp_cases, "ed"))
    assert not ok and "does not match the data" in why, why
    assert fetchd_verdict(sig, data, keys(pgp_cases, "ed"))[0]


def test_signature_by_another_key_is_not_trusted(
    pgp_cases: PgpCases, data: Path, tmp_path: Path
) -> None:
    sig = pgp_cases.sign("stranger", data, out=tmp_path / "s.asc")
    given = keys(pgp_cases, "rsa") + keys(pgp_cases, "ed")
    assert not sqv(pgp_cases, "rsa", sig, data)
    with pytest.raises(NotTrusted) as exc:
        asyncio.run(verify_detached(sig.read_bytes(), data, given, "image.aci"))
    shown = openpgp.display_fingerprint(pgp_cases.fingerprint("stranger"))
    assert f"image.aci is signed by {shown}" in str(exc.value)
    # the issuer is known from the signature alone, before any data
    info = signature_info(sig.read_bytes(), "s.asc")
    assert info.issuer_fingerprint == pgp_cases.fingerprint("stranger")
    assert openpgp.issuer_of(info, given) is None
    assert openpgp.issuer_of(info, keys(pgp_cases, "stranger")) is not None


# --- keys ----------------------------------------------------------------------------


def test_key_info(pgp_cases: PgpCases) -> None:
    rsa, ed, sub = keys(pgp_cases, "rsa")[0], keys(pgp_cases, "ed")[0], keys(pgp_cases, "sub")[0]
    assert (rsa.algorithm, ed.algorithm, sub.algorithm) == ("RSA-3072", "Ed25519", "Ed25519")
    assert rsa.fingerprint == pgp_cases.fingerprint("rsa")
    assert rsa.user_ids == ("RSA Publisher <rsa@example.com>",)
    assert rsa.signing_keys == (rsa.fingerprint,)
    # a certification-only primary: only its subkey may sign
    assert sub.signing_keys == (pgp_cases.signing_fingerprint("sub"),)
    assert sub.fingerprint not in sub.signing_keys
    assert [p.fingerprint for p in sub.parts] == [sub.fingerprint, *sub.signing_keys]
    exp = keys(pgp_cases, "exp")[0]
    assert exp.expires == pytest.approx(1577923200.0)  # 2020-01-02 00:00 UTC
    assert keys(pgp_cases, "weak")[0].algorithm == "RSA-1024"
    for name in ("rsa", "ed", "sub", "stranger"):
        assert openpgp.policy_problem(keys(pgp_cases, name)[0], time.time()) is None
    for name, reason in REASONS.items():
        problem = openpgp.policy_problem(keys(pgp_cases, name)[0], time.time())
        assert problem is not None and reason in problem
    # the armored certificate round-trips to the same key
    again = read_keys(rsa.raw, "raw")[0]
    assert (again.fingerprint, again.raw) == (rsa.fingerprint, rsa.raw)
    assert rsa.raw.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")


def test_keyring_with_two_keys(pgp_cases: PgpCases) -> None:
    both = pgp_cases.key("rsa").read_bytes() + pgp_cases.key("ed").read_bytes()
    found = read_keys(both, "two.asc")
    assert [k.fingerprint for k in found] == [
        pgp_cases.fingerprint("rsa"),
        pgp_cases.fingerprint("ed"),
    ]


def test_not_keys_are_refused(pgp_cases: PgpCases, tmp_path: Path) -> None:
    with pytest.raises(TrustError, match="is not an OpenPGP public key"):
        read_keys(b"hello, world\n", "hello.txt")
    with pytest.raises(TrustError, match="larger than 1 MiB"):
        read_keys(b"\x99" * (2 << 20), "big.asc")
    secret = subprocess.run(
        [
            *("gpg", "--homedir", str(pgp_cases.gnupghome), "--batch", "--pinentry-mode"),
            *("loopback", "--passphrase", "", "--armor", "--export-secret-keys"),
            pgp_cases.fingerprint("ed"),
        ],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    with pytest.raises(TrustError, match="holds a secret key"):
        read_keys(secret, "secret.asc")
    sig = pgp_cases.sign("ed", pgp_cases.key("ed"), out=tmp_path / "k.asc")
    with pytest.raises(TrustError):
        read_keys(sig.read_bytes(), "a signature")


def test_display_fingerprint() -> None:
    fpr = "8b86de38890ddb7291867b025210bd8888182190"
    assert openpgp.display_fingerprint(fpr) == "8B86 DE38 890D DB72 9186  7B02 5210 BD88 8818 2190"


# --- signatures --------------------------------------------------------------------------


def test_signature_info(pgp_cases: PgpCases, data: Path, tmp_path: Path) -> None:
    for armor in (True, False):
        sig = pgp_cases.sign("sub", data, armor=armor, out=tmp_path / f"{armor}.sig")
        info = signature_info(sig.read_bytes(), "sig")
        assert info.issuer_fingerprint == pgp_cases.signing_fingerprint("sub")
        assert info.issuer_key_id == pgp_cases.signing_fingerprint("sub")[-16:]
        assert abs(info.created - time.time()) < 600
        found = openpgp.issuer_of(info, keys(pgp_cases, "rsa") + keys(pgp_cases, "sub"))
        assert found is not None and found.fingerprint == pgp_cases.fingerprint("sub")
    # only the key id: still matched (older signers)
    by_id = openpgp.SigInfo(None, pgp_cases.fingerprint("rsa")[-16:], 0.0)
    assert openpgp.issuer_of(by_id, keys(pgp_cases, "rsa")) is not None
    # the certification-only primary never signs data
    primary = openpgp.SigInfo(pgp_cases.fingerprint("sub"), None, 0.0)
    assert openpgp.issuer_of(primary, keys(pgp_cases, "sub")) is None


def test_bad_signatures(pgp_cases: PgpCases, data: Path, tmp_path: Path) -> None:
    one = pgp_cases.sign("ed", data, armor=False, out=tmp_path / "1.sig").read_bytes()
    two = pgp_cases.sign("rsa", data, armor=False, out=tmp_path / "2.sig").read_bytes()
    with pytest.raises(SignatureInvalid, match="not one OpenPGP signature"):
        signature_info(one + two, "two.sig")
    with pytest.raises(SignatureInvalid, match=r"not one OpenPGP signature|not an OpenPGP"):
        signature_info(pgp_cases.key("ed").read_bytes(), "key.asc")
    with pytest.raises(SignatureInvalid, match="not an OpenPGP signature"):
        signature_info(b"<html>404</html>", "page.asc")
    with pytest.raises(SignatureInvalid, match="larger than 64 KiB"):
        signature_info(b"\x00" * (65 << 10), "big.asc")
    with pytest.raises(SignatureInvalid):
        asyncio.run(verify_detached(one[:-7], data, keys(pgp_cases, "ed"), "cut.sig"))


# --- the child process -------------------------------------------------------------------


def _children() -> list[int]:
    me = str(os.getpid())
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me:
                out.append(int(entry))
    return out


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory, pgp_cases: PgpCases) -> tuple[Path, Path]:
    path = tmp_path_factory.mktemp("big") / "big.aci"
    with path.open("wb") as f:
        for _ in range(128):
            f.write(os.urandom(1 << 20))
    return path, pgp_cases.sign("rsa", path)


def test_verification_never_stalls_the_event_loop(
    pgp_cases: PgpCases, big: tuple[Path, Path]
) -> None:
    """128 MiB with RSA/SHA-512: pysequoia in process would hold the GIL ~180 ms."""
    path, sig = big
    given = keys(pgp_cases, "rsa")

    async def main() -> tuple[float, float]:
        worst = 0.0
        stop = False

        async def ticker() -> None:
            nonlocal worst
            while not stop:
                t = time.perf_counter()
                await asyncio.sleep(0.001)
                worst = max(worst, time.perf_counter() - t - 0.001)

        task = asyncio.create_task(ticker())
        t0 = time.perf_counter()
        v = await verify_detached(sig.read_bytes(), path, given, "big.aci")
        took = time.perf_counter() - t0
        stop = True
        await task
        assert v.primary == pgp_cases.fingerprint("rsa")
        return worst, took

    worst, took = asyncio.run(main())
    assert worst < 0.06, f"the loop stalled {worst * 1000:.0f} ms (verification {took:.2f} s)"


def test_timeout_and_cancel_end_the_child(pgp_cases: PgpCases, big: tuple[Path, Path]) -> None:
    path, sig = big
    given = keys(pgp_cases, "rsa")
    # children of this process that were there before (the suite's session fixtures:
    # registries, nginx, ...) are not the verifier's
    before = set(_children())

    def ours() -> set[int]:
        return set(_children()) - before

    with pytest.raises(SignatureInvalid, match="took longer than"):
        asyncio.run(verify_detached(sig.read_bytes(), path, given, "big.aci", timeout=0.05))
    assert ours() == set()

    async def cancelled() -> None:
        task = asyncio.create_task(verify_detached(sig.read_bytes(), path, given, "big.aci"))
        deadline = time.monotonic() + 10
        while not ours():  # the child has started
            assert time.monotonic() < deadline, "no verifying child"
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancelled())
    assert ours() == set()


# --- inline (simple signing) -----------------------------------------------------------


def _inline(cases: PgpCases, name: str, payload: bytes, tmp: Path) -> bytes:
    src = tmp / f"{name}.json"
    src.write_bytes(payload)
    fpr = cases.signing_fingerprint(name)
    cmd = ["gpg", "--homedir", str(cases.gnupghome), "--batch", "--yes", "-u", fpr + "!"]
    if name == "exp":
        cmd += ["--faked-system-time", "20200101T120000"]
    out = tmp / f"{name}.gpg"
    subprocess.run([*cmd, "-o", str(out), "--sign", str(src)], check=True, capture_output=True)
    return out.read_bytes()


def test_verify_inline(pgp_cases: PgpCases, tmp_path: Path) -> None:
    payload = b'{"critical": {"type": "atomic container signature"}}'
    signed = _inline(pgp_cases, "sub", payload, tmp_path)
    got, who = openpgp.verify_inline(signed, keys(pgp_cases, "rsa") + keys(pgp_cases, "sub"), "s")
    assert got == payload
    assert (who.primary, who.signer) == (
        pgp_cases.fingerprint("sub"),
        pgp_cases.signing_fingerprint("sub"),
    )
    # gpgv agrees on the payload
    ring = tmp_path / "subring.gpg"
    subprocess.run(["gpg", "--dearmor", "-o", str(ring), str(pgp_cases.key("sub"))], check=True)
    out = tmp_path / "payload"
    subprocess.run(
        ["gpgv", "--keyring", str(ring), "--output", str(out), str(tmp_path / "sub.gpg")],
        check=True,
        capture_output=True,
    )
    assert out.read_bytes() == payload
    with pytest.raises(SignatureInvalid):
        openpgp.verify_inline(signed, keys(pgp_cases, "rsa"), "s")
    with pytest.raises(SignatureInvalid):
        openpgp.verify_inline(signed[:-5], keys(pgp_cases, "sub"), "s")
    expired = _inline(pgp_cases, "exp", payload, tmp_path)
    with pytest.raises(KeyRefused, match="expired on 2020-01-02"):
        openpgp.verify_inline(expired, keys(pgp_cases, "exp"), "s")


def test_revoked_signing_subkey(tmp_path: Path) -> None:
    """sq revokes the signing subkey (superseded, after the signature): sqv accepts, the
    strict policy refuses, naming the subkey."""

    def sq(*args: str) -> None:
        subprocess.run(["sq", *args], check=True, capture_output=True, timeout=60)

    key, cert, data = tmp_path / "k.pgp", tmp_path / "c.pgp", tmp_path / "d"
    data.write_bytes(b"payload\n")
    sq(
        "key",
        "generate",
        "--userid",
        "S <s@example.com>",
        "--creation-time",
        "20250101",
        "--export",
        str(key),
    )
    sq("key", "extract-cert", "--output", str(cert), str(key))
    sq(
        "sign",
        "--detached",
        "--signer-key",
        str(key),
        "--time",
        "20250601",
        "--output",
        f"{data}.sig",
        str(data),
    )
    [info] = read_keys(cert.read_bytes(), "c.pgp")
    [signer] = info.signing_keys
    revoked = tmp_path / "revoked.pgp"
    with revoked.open("wb") as out:
        subprocess.run(
            ["sq", "revoke", "subkey", "--certificate", str(key), signer, "superseded", "x"],
            check=True,
            stdout=out,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
    sq("key", "extract-cert", "--output", str(tmp_path / "rc.pgp"), str(revoked))
    ring = tmp_path / "rc.pgp"
    sig = Path(f"{data}.sig")
    assert subprocess.run(["sqv", "--keyring", str(ring), str(sig), str(data)]).returncode == 0
    assert fetchd_verdict(sig, data, read_keys(cert.read_bytes(), "c"))[0]
    ok, why = fetchd_verdict(sig, data, read_keys(ring.read_bytes(), "rc"))
    assert not ok
    shown = openpgp.display_fingerprint(signer)
    assert f"its signing subkey {shown} is revoked (soft-revoked: superseded" in why, why
    problem = openpgp.policy_problem(read_keys(ring.read_bytes(), "rc")[0], time.time())
    assert problem == "it has no key that may sign now"
