"""Running the fetchd CLI as a separate process, and reading the store it leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent.parent
CLI_TIMEOUT = 300.0


class Fetchd:
    """Runs ``python -m fetchd --store STORE …`` and reads the store it leaves."""

    def __init__(self, store: Path, home: Path) -> None:
        self.store = store
        self.home = home

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "REGISTRY_AUTH_FILE")
        }
        env["HOME"] = str(self.home)  # no ~/.docker/config.json of the machine's
        env["PYTHONPATH"] = str(REPO)
        env.pop("XDG_RUNTIME_DIR", None)
        env.update(extra or {})
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "fetchd", "--store", str(self.store), *args]

    def __call__(
        self, *args: str, env: Mapping[str, str] | None = None, timeout: float = CLI_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, env=self.env(env), timeout=timeout
        )

    def popen(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(env),
        )

    # --- what is in the store ------------------------------------------------------

    def index(self) -> dict[str, Any]:
        return dict(json.loads((self.store / "layout" / "index.json").read_text()))

    def entry(self, name: str) -> dict[str, Any]:
        hits = [
            m
            for m in self.index().get("manifests", [])
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == name
        ]
        assert len(hits) == 1, f"{name}: {len(hits)} index.json entries"
        return hits[0]

    def blobs(self) -> set[str]:
        root = self.store / "layout" / "blobs"
        return (
            {f"{a.name}:{p.name}" for a in root.iterdir() for p in a.iterdir()}
            if root.exists()
            else set()
        )

    def ingests(self) -> list[Path]:
        root = self.store / "ingest"
        return sorted(root.iterdir()) if root.exists() else []


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """stdout of a run that must have succeeded (else fail with its stderr)."""
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result.stdout


def failed(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The one-line error of a run that must have failed with exit 1."""
    assert result.returncode == 1, f"exit {result.returncode}\nstderr:\n{result.stderr}"
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for n in needles:
        assert n in lines[-1], f"{n!r} not in {lines[-1]!r}"
    return lines[-1]


def blob_file(fetchd: Fetchd, digest: str) -> Path:
    """Where the store keeps blob ``digest`` ("sha256:HEX")."""
    return fetchd.store / "layout" / "blobs" / "sha256" / digest.removeprefix("sha256:")


def assert_stored(fetchd: Fetchd, digest: str, size: int) -> None:
    """The blob is in layout/blobs at its size, fsck re-hashes it clean, no ingest is left."""
    path = blob_file(fetchd, digest)
    assert path.is_file(), f"{digest} not in {path.parent}"
    assert path.stat().st_size == size
    assert "ok" in ok(fetchd("fsck"))
    assert fetchd.ingests() == []
