"""fetchd's one verified TLS client context (``fetchd.sources.http.ssl_context``): the
settings of ``ssl.create_default_context()``, with the CA store loaded at the first
handshake instead of at creation (a plain-HTTP pull never pays for it). HTTPS pulls
against the real nginx with the test CA, and without it, are in test_ranges.py."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from fetchd.config import Config
from fetchd.sources.http import ClientContext, ssl_context
from tests.support.tls import TestCA

SETTINGS = (
    "protocol",
    "verify_mode",
    "check_hostname",
    "options",
    "minimum_version",
    "maximum_version",
    "verify_flags",
    "post_handshake_auth",
    "hostname_checks_common_name",
    "keylog_filename",
)


def test_the_context_has_the_settings_of_create_default_context(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SSLKEYLOGFILE", str(tmp_path / "keys"))
    want = ssl.create_default_context()
    got = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    assert {k: getattr(got, k) for k in SETTINGS} == {k: getattr(want, k) for k in SETTINGS}


def test_the_ca_store_is_loaded_at_the_first_handshake_from_ssl_cert_file(
    monkeypatch: pytest.MonkeyPatch, tls_ca: TestCA, tmp_path: Path
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_ca.ca_path))
    monkeypatch.setenv("SSL_CERT_DIR", str(tmp_path))  # empty: the file's CA alone
    ctx = ssl_context(Config(store=tmp_path / "store"))
    assert isinstance(ctx, ssl.SSLContext)
    assert ctx.cert_store_stats()["x509_ca"] == 0
    ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="localhost")
    assert ctx.cert_store_stats()["x509_ca"] == 1
    assert ssl_context(Config(store=tmp_path / "store")) is ctx  # one per process
    ctx.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname="localhost")
    assert ctx.cert_store_stats()["x509_ca"] == 1  # loaded once


PRELOAD = """
import os, sys
from fetchd.sources.http import preload_aiohttp
preload_aiohttp()
print("aiohttp" in sys.modules, os.environ.get("SSL_CERT_FILE"))
"""


@pytest.mark.parametrize("cert_file", [None, "/some/ca.pem"])
def test_preloading_aiohttp_leaves_ssl_cert_file_as_it_was(cert_file: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
    if cert_file is not None:
        env["SSL_CERT_FILE"] = cert_file
    out = subprocess.run(
        [sys.executable, "-c", PRELOAD], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", str(cert_file)]
