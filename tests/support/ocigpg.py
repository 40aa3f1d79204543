"""Two gpg Ed25519 keys in a GNUPGHOME of their own, for OCI simple signing (skopeo
``--sign-by``, ``standalone-sign``): the module-scoped fixture ``gpg`` (registered in
tests/conftest.py). Its gpg-agent is ended at teardown (by its GNUPGHOME)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass
class Gpg:
    home: Path
    signer: str  # fingerprints
    other: str
    signer_key: Path  # armored public keys
    other_key: Path

    def run(self, *args: str) -> str:
        return self._run("gpg", "--batch", *args)

    def skopeo(self, *args: str) -> str:
        """skopeo with this GNUPGHOME (--sign-by, standalone-sign)."""
        return self._run("skopeo", *args)

    def _run(self, *argv: str) -> str:
        env = dict(os.environ, GNUPGHOME=str(self.home))
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{' '.join(argv)}: exit {r.returncode}\n{r.stderr}"
        return r.stdout


def _fingerprint(home: Path, uid: str) -> str:
    out = subprocess.run(
        ["gpg", "--batch", "--with-colons", "--list-keys", uid],
        env=dict(os.environ, GNUPGHOME=str(home)),
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return next(line.split(":")[9] for line in out.splitlines() if line.startswith("fpr:"))


@pytest.fixture(scope="module")
def gpg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gpg]:
    root = tmp_path_factory.mktemp("gpg")
    home = root / "home"
    home.mkdir(mode=0o700)
    env = dict(os.environ, GNUPGHOME=str(home))
    for uid in ("Image Signer <signer@example.com>", "Other <other@example.org>"):
        subprocess.run(
            [
                "gpg",
                "--batch",
                "--passphrase",
                "",
                "--quick-gen-key",
                uid,
                "ed25519",
                "sign",
                "never",
            ],
            env=env,
            check=True,
            capture_output=True,
        )
    g = Gpg(
        home,
        _fingerprint(home, "signer@example.com"),
        _fingerprint(home, "other@example.org"),
        root / "signer.asc",
        root / "other.asc",
    )
    g.signer_key.write_text(g.run("--armor", "--export", "signer@example.com"))
    g.other_key.write_text(g.run("--armor", "--export", "other@example.org"))
    try:
        yield g
    finally:
        subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, check=False)
