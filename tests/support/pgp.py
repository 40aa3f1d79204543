"""OpenPGP test cases made with the real tools (gpg, sq), as ../shared/peers/openpgp/make-cases.sh.

One :class:`PgpCases` per test session (fixture ``pgp_cases``; register it with
``from tests.support.pgp import pgp_cases_fixture  # noqa: F401`` in a test module and
take ``pgp_cases`` as a parameter). The keys, by name:

======== ===============================================================================
rsa      RSA-3072 primary that signs (gpg)
ed       Ed25519 primary that signs (gpg)
sub      Ed25519 primary for certification only, with an Ed25519 signing subkey (gpg)
exp      Ed25519, expired on 2020-01-02; :meth:`PgpCases.sign` signs on 2020-01-01, while valid
rev      Ed25519, hard-revoked (gpg's own revocation certificate, no reason); signs now
soft     sq key, revoked "superseded" on 2025-12-01 (soft); signs on 2025-06-01, before it
hard     the same sq key, revoked "compromised" on 2025-12-01 (hard); signs on 2025-06-01
weak     RSA-1024 that signs (gpg)
stranger Ed25519 that signs, trusted by nobody (gpg)
======== ===============================================================================

``soft`` and ``hard`` are one secret key with two published certificates, so they share a
fingerprint. Every helper runs the real tool and fails loudly (CalledProcessError) if it fails.
The gpg-agents of the homes are ended at teardown (``gpgconf --kill gpg-agent`` per home).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

UIDS = {
    "rsa": "RSA Publisher <rsa@example.com>",
    "ed": "Ed Publisher <ed@example.com>",
    "sub": "Sub Publisher <sub@example.com>",
    "exp": "Expired Publisher <exp@example.com>",
    "rev": "Revoked Publisher <rev@example.com>",
    "soft": "Soft Revoked <soft@example.com>",
    "hard": "Soft Revoked <soft@example.com>",
    "weak": "Weak Publisher <weak@example.com>",
    "stranger": "Stranger <stranger@example.org>",
}
EXPIRED_SIGN_TIME = "20200101T120000"  # gpg --faked-system-time: while "exp" was valid
SQ_SIGN_TIME = "20250601"  # before the sq revocations (20251201)


class PgpCases:
    """The keys above under ``root``; ``gnupghome`` holds the gpg secret keys but ``rev``'s."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.gnupghome = root / "gnupg"
        self._rev_home = root / "gnupg-rev"  # rev's secret key, never revoked in this home
        self.keys_dir = root / "keys"
        self._homes: list[Path] = []
        self._fprs: dict[str, str] = {}
        self._signing: dict[str, str] = {}

    # --- public API ------------------------------------------------------------------

    def key(self, name: str) -> Path:
        """The armored public certificate of ``name``."""
        path = self.keys_dir / f"{name}.asc"
        assert path.is_file(), f"no key {name!r} (one of {sorted(UIDS)})"
        return path

    def fingerprint(self, name: str) -> str:
        """The primary key's fingerprint, 40 lowercase hex."""
        return self._fprs[name]

    def signing_fingerprint(self, name: str) -> str:
        """The fingerprint of the key that makes ``name``'s signatures (a subkey for sub/soft)."""
        return self._signing[name]

    def uid(self, name: str) -> str:
        return UIDS[name]

    def sign(self, name: str, file: Path, armor: bool = True, out: Path | None = None) -> Path:
        """A detached signature of ``file`` by ``name``: ``FILE.asc`` (armored) or ``FILE.sig``."""
        if out is None:
            out = file.with_name(file.name + (".asc" if armor else ".sig"))
        if name in ("soft", "hard"):
            cmd = ["sq", "sign", "--detached", "--signer-key", str(self.keys_dir / "soft.key.pgp")]
            cmd += ["--time", SQ_SIGN_TIME, "--output", str(out)]
            if not armor:
                cmd.append("--binary")
            if out.exists():
                out.unlink()
            _run([*cmd, str(file)])
            return out
        home = self._rev_home if name == "rev" else self.gnupghome
        cmd = ["-u", self._signing[name] + "!"]  # exactly this (sub)key
        if name == "exp":
            cmd = ["--faked-system-time", EXPIRED_SIGN_TIME, *cmd]
        cmd += ["--yes", "--detach-sign", "-o", str(out)]
        if armor:
            cmd.append("--armor")
        self._gpg(home, *cmd, str(file))
        return out

    # --- making them -----------------------------------------------------------------

    def make(self) -> None:
        self.keys_dir.mkdir(parents=True)
        for home in (self.gnupghome, self._rev_home):
            home.mkdir(mode=0o700)
            self._homes.append(home)
        g = self.gnupghome
        self._gen(g, "rsa", "rsa3072", "sign", "never")
        self._gen(g, "ed", "ed25519", "sign", "never")
        self._gen(g, "sub", "ed25519", "cert", "never")
        self._gpg(g, "--quick-add-key", self._fprs["sub"], "ed25519", "sign", "never")
        self._gen(g, "exp", "ed25519", "sign", "1d", faked="20200101T000000")
        self._gen(g, "weak", "rsa1024", "sign", "never")
        self._gen(g, "stranger", "ed25519", "sign", "never")
        for name in ("rsa", "ed", "sub", "exp", "weak", "stranger"):
            (self.keys_dir / f"{name}.asc").write_bytes(
                self._gpg(g, "--armor", "--export", self._fprs[name])
            )
        self._make_rev()
        self._make_sq()
        for name in UIDS:
            self._signing.setdefault(name, self._fprs[name])
        self._signing["sub"] = self._subkeys(g, self._fprs["sub"])[0]

    def close(self) -> None:
        for home in self._homes:
            subprocess.run(
                ["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                capture_output=True,
                check=False,
            )

    def _gen(self, home: Path, name: str, *spec: str, faked: str | None = None) -> None:
        pre = ["--faked-system-time", faked] if faked else []
        self._gpg(home, *pre, "--quick-gen-key", UIDS[name], *spec)
        self._fprs[name] = self._primary(home, UIDS[name])

    def _make_rev(self) -> None:
        """rev: secret key in its own home; the public cert carries the hard revocation."""
        home = self._rev_home
        self._gen(home, "rev", "ed25519", "sign", "never")
        fpr = self._fprs["rev"]
        revcert = (home / "openpgp-revocs.d" / f"{fpr.upper()}.rev").read_text()
        revcert = revcert.replace(":-----BEGIN", "-----BEGIN")
        pub = self.root / "gnupg-revpub"
        pub.mkdir(mode=0o700)
        self._homes.append(pub)
        self._gpg(pub, "--import", input=self._gpg(home, "--armor", "--export", fpr))
        self._gpg(pub, "--import", input=revcert.encode())
        (self.keys_dir / "rev.asc").write_bytes(self._gpg(pub, "--armor", "--export", fpr))

    def _make_sq(self) -> None:
        """soft/hard: one sq key, a superseded (soft) and a compromised (hard) revocation."""
        k = self.keys_dir
        _run(
            [
                *("sq", "key", "generate", "--userid", UIDS["soft"]),
                *("--creation-time", "20250101", "--export", str(k / "soft.key.pgp")),
            ]
        )
        _run(
            [
                "sq",
                "key",
                "extract-cert",
                "--output",
                str(k / "soft.cert.pgp"),
                str(k / "soft.key.pgp"),
            ]
        )
        for reason, name in (("superseded", "soft"), ("compromised", "hard")):
            rev = _run(
                [
                    *("sq", "revoke", "certificate", "--certificate", str(k / "soft.key.pgp")),
                    *("--time", "20251201", reason, "test"),
                ]
            )
            (k / f"{name}.rev.asc").write_bytes(rev)
            home = self.root / f"gnupg-{name}"
            home.mkdir(mode=0o700)
            self._homes.append(home)
            self._gpg(home, "--import", str(k / "soft.cert.pgp"), str(k / f"{name}.rev.asc"))
            fpr = self._primary(home, UIDS[name])
            self._fprs[name] = fpr
            (k / f"{name}.asc").write_bytes(self._gpg(home, "--armor", "--export", fpr))
            subs = self._subkeys(home, fpr, usage="s")
            self._signing[name] = subs[0] if subs else fpr

    def _gpg(self, home: Path, *args: str, input: bytes | None = None) -> bytes:
        cmd = ["gpg", "--homedir", str(home), "--batch", "--passphrase", ""]
        cmd += ["--pinentry-mode", "loopback", *args]
        return _run(cmd, input=input)

    def _colons(self, home: Path, who: str) -> list[list[str]]:
        out = self._gpg(home, "--with-colons", "--fixed-list-mode", "--list-keys", who)
        return [line.split(":") for line in out.decode().splitlines()]

    def _primary(self, home: Path, uid: str) -> str:
        rows = self._colons(home, f"={uid}")
        return next(r[9] for r in rows if r[0] == "fpr").lower()

    def _subkeys(self, home: Path, fpr: str, usage: str = "s") -> list[str]:
        """Fingerprints of the subkeys of ``fpr`` whose capabilities include ``usage``."""
        found: list[str] = []
        caps = ""
        in_sub = False
        for r in self._colons(home, fpr):
            if r[0] == "sub":
                in_sub, caps = True, r[11]
            elif r[0] == "pub":
                in_sub = False
            elif r[0] == "fpr" and in_sub and usage in caps:
                found.append(r[9].lower())
        return found


def _run(cmd: list[str], input: bytes | None = None) -> bytes:
    env = {**os.environ}
    env.pop("GNUPGHOME", None)
    proc = subprocess.run(cmd, input=input, capture_output=True, env=env, timeout=120, check=False)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc.stdout


@pytest.fixture(scope="session", name="pgp_cases")
def pgp_cases_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgpCases]:
    """The OpenPGP cases, made once per session (about a second with gpg and sq)."""
    cases = PgpCases(tmp_path_factory.mktemp("pgp"))
    try:
        cases.make()
        yield cases
    finally:
        cases.close()


#: the same fixture (its name is ``pgp_cases`` whichever of the two names is imported)
pgp_cases = pgp_cases_fixture
