"""``fetchd trust`` as a user runs it: rkt trust's words, the review on a terminal, the
policy at trust time, keys from files and from https/http (nginx), pubkeys discovery."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fetchd.trust.openpgp import display_fingerprint
from tests.support import appc as appc_support
from tests.support.appc import AppcSite
from tests.support.cli import Fetchd, failed, ok
from tests.support.pgp import PgpCases, pgp_cases_fixture  # noqa: F401 (the fixture)

appc_site = appc_support.appc_site  # the fixture
PROMPT = b"Are you sure you want to trust this key (yes/no)?"


def trust(
    fetchd: Fetchd, tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return fetchd("trust", "--trust-dir", str(tmp_path / "trust"), *args, env=env)


def stored(tmp_path: Path) -> list[str]:
    root = tmp_path / "trust"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_trust_a_prefix_without_review(fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases) -> None:
    key = pgp_cases.key("sub")
    res = trust(
        fetchd, tmp_path, "--prefix", "example.com/app", "--skip-fingerprint-review", str(key)
    )
    ok(res)
    fpr = pgp_cases.fingerprint("sub")
    assert 'prefix: "example.com/app"' in res.stderr
    assert f'key: "{key}"' in res.stderr
    assert f"gpg key fingerprint is: {display_fingerprint(fpr)}" in res.stderr
    sub = display_fingerprint(pgp_cases.signing_fingerprint("sub"))
    assert f"    Subkey fingerprint: {sub}" in res.stderr
    assert "\tSub Publisher <sub@example.com>" in res.stderr
    assert "without fingerprint review" in res.stderr
    assert stored(tmp_path) == [f"trustedkeys/prefix.d/example.com/app/{fpr}"]
    ok(trust(fetchd, tmp_path, "--root", "--skip-fingerprint-review", str(pgp_cases.key("ed"))))
    listing = ok(trust(fetchd, tmp_path, "--list"))
    assert f"example.com/app\t{display_fingerprint(fpr)}\tSub Publisher" in listing
    assert f"(root)\t{display_fingerprint(pgp_cases.fingerprint('ed'))}" in listing
    doc = json.loads(ok(trust(fetchd, tmp_path, "--list", "--json")))
    got = {(k["prefix"], k["fingerprint"], k["root"]) for k in doc["keys"]}
    assert got == {("example.com/app", fpr, False), (None, pgp_cases.fingerprint("ed"), True)}
    # --remove, then it is gone; a second --remove is an error
    ok(trust(fetchd, tmp_path, "--remove", display_fingerprint(fpr)))
    assert stored(tmp_path) == [f"trustedkeys/root.d/{pgp_cases.fingerprint('ed')}"]
    failed(trust(fetchd, tmp_path, "--remove", fpr), "no trusted key")


def test_no_terminal_and_no_review_flag_refuses(
    fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    res = trust(fetchd, tmp_path, "--prefix", "example.com/app", str(pgp_cases.key("ed")))
    failed(res, "lack of tty", "--skip-fingerprint-review")
    assert 'To trust the key for "example.com/app", do one of the following:' in res.stderr
    assert display_fingerprint(pgp_cases.fingerprint("ed")) in res.stderr
    assert stored(tmp_path) == []


def _on_a_terminal(
    fetchd: Fetchd, argv: list[str], answer: bytes, env: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        fetchd.argv(*argv), stdin=slave, stdout=subprocess.PIPE, stderr=slave, env=fetchd.env(env)
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 60
    try:
        while PROMPT not in seen:
            assert time.monotonic() < deadline, seen
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the child ended and closed the terminal
                    break
        os.write(master, answer)
        code = proc.wait(timeout=60)
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    return code, seen


def test_review_on_a_terminal(fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases) -> None:
    argv = ["trust", "--trust-dir", str(tmp_path / "trust"), "--prefix", "example.com/app"]
    code, seen = _on_a_terminal(fetchd, [*argv, str(pgp_cases.key("rsa"))], b"no\n")
    assert code == 1, seen
    assert b"no key was trusted" in seen
    assert stored(tmp_path) == []
    code, seen = _on_a_terminal(fetchd, [*argv, str(pgp_cases.key("rsa"))], b"yes\n")
    assert code == 0, seen
    assert display_fingerprint(pgp_cases.fingerprint("rsa")).encode() in seen
    assert stored(tmp_path) == [
        f"trustedkeys/prefix.d/example.com/app/{pgp_cases.fingerprint('rsa')}"
    ]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("exp", "expired on 2020-01-02"),
        ("rev", "revoked (hard-revoked"),
        ("soft", "revoked (soft-revoked: superseded"),
        ("hard", "revoked (hard-revoked: key compromised"),
        ("weak", "RSA-1024 is weaker than RSA-2048"),
    ],
)
def test_keys_failing_the_policy_are_refused(
    fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases, name: str, reason: str
) -> None:
    res = trust(
        fetchd,
        tmp_path,
        "--prefix",
        "example.com/app",
        "--skip-fingerprint-review",
        str(pgp_cases.key(name)),
    )
    failed(res, "is refused", reason, "nothing was trusted")
    assert stored(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["KEY"], "aborting due to implicit unbounded trust"),
        (["--prefix", "example.com/../etc", "KEY"], "'..'"),
        (["--prefix", "https://example.com/app", "KEY"], "omit https://"),
        (["--prefix", "example.com//app", "KEY"], "'//'"),
        (["--prefix", "example.com/App", "KEY"], "not an AC identifier"),
        (["--root"], "--root needs a KEYFILE"),
        (["--prefix", "example.com", "ftp://example.com/k"], "only local files and http"),
        (["--prefix", "example.com", "http://example.com/k"], "--insecure-allow-http required"),
        (["--prefix", "docker://127.0.0.1:5000/x"], "needs a KEYFILE or COSIGN_PUBKEY"),
        (["--prefix", "example.com", "/nonexistent/key.asc"], "cannot read the key"),
        (["--prefix", "example.com", "/etc/hostname"], "is not an OpenPGP public key"),
    ],
)
def test_refusals(
    fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases, args: list[str], needle: str
) -> None:
    argv = [str(pgp_cases.key("ed")) if a == "KEY" else a for a in args]
    failed(trust(fetchd, tmp_path, "--skip-fingerprint-review", *argv), needle)
    assert stored(tmp_path) == []


def test_oci_publishers(fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases) -> None:
    pem = tmp_path / "cosign.pub"
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem.write_bytes(key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    prefix = "docker://127.0.0.1:5000/team/app"
    ok(trust(fetchd, tmp_path, "--prefix", prefix, "--skip-fingerprint-review", str(pem)))
    ok(
        trust(
            fetchd,
            tmp_path,
            "--prefix",
            prefix,
            "--skip-fingerprint-review",
            str(pgp_cases.key("ed")),
        )
    )
    files = stored(tmp_path)
    assert len(files) == 2
    assert f"trustedkeys/oci.d/127.0.0.1:5000/team/app/{pgp_cases.fingerprint('ed')}" in files
    assert any(f.startswith("trustedkeys/oci.d/127.0.0.1:5000/team/app/cosign-") for f in files)
    doc = json.loads(ok(trust(fetchd, tmp_path, "--list", "--json")))
    assert sorted(k["kind"] for k in doc["keys"]) == ["cosign", "openpgp"]
    assert {k["prefix"] for k in doc["keys"]} == {prefix}


def test_keys_from_https_and_http(
    fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases, appc_site: AppcSite
) -> None:
    appc_site.put("/keys/ed.asc", pgp_cases.key("ed"))
    appc_site.put("/keys/rsa.asc", pgp_cases.key("rsa"))
    site = [*appc_site.resolve_args(), "--skip-fingerprint-review", "--prefix", "example.com/app"]
    res = trust(fetchd, tmp_path, *site, "https://example.com/keys/ed.asc", env=appc_site.env())
    ok(res)
    assert 'key: "https://example.com/keys/ed.asc"' in res.stderr
    # the test CA is not trusted without SSL_CERT_FILE
    failed(trust(fetchd, tmp_path, *site, "https://example.com/keys/rsa.asc"), "not trusted")
    failed(
        trust(fetchd, tmp_path, *site, "https://example.com/keys/none.asc", env=appc_site.env()),
        "HTTP 404",
    )
    failed(
        trust(fetchd, tmp_path, *site, "http://example.com/keys/rsa.asc"), "--insecure-allow-http"
    )
    ok(trust(fetchd, tmp_path, *site, "--insecure-allow-http", "http://example.com/keys/rsa.asc"))
    # an https key URL never goes down to http:// (nginx: /downgrade → 302 http://…), and
    # redirects are bounded (/loop redirects to itself)
    https = appc_site.env()
    failed(trust(fetchd, tmp_path, *site, "https://example.com/downgrade", env=https), "plain http")
    failed(trust(fetchd, tmp_path, *site, "https://example.com/loop", env=https), "redirects")
    assert stored(tmp_path) == sorted(
        f"trustedkeys/prefix.d/example.com/app/{pgp_cases.fingerprint(n)}" for n in ("ed", "rsa")
    )


def test_no_key_discovers_the_prefix_pubkeys(
    fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases, appc_site: AppcSite
) -> None:
    appc_site.put("/pubkeys.gpg", pgp_cases.key("ed"))
    appc_site.page(
        "/",
        AppcSite.meta(
            ("ac-discovery", "example.com", "https://example.com/images/{name}-{version}.{ext}"),
            ("ac-discovery-pubkeys", "example.com", "https://example.com/pubkeys.gpg"),
        ),
    )
    site = [*appc_site.resolve_args(), "--skip-fingerprint-review"]
    res = trust(fetchd, tmp_path, *site, "--prefix", "example.com/hello", env=appc_site.env())
    ok(res)
    assert 'key: "https://example.com/pubkeys.gpg"' in res.stderr
    assert stored(tmp_path) == [
        f"trustedkeys/prefix.d/example.com/hello/{pgp_cases.fingerprint('ed')}"
    ]
    # a site without an ac-discovery-pubkeys tag: no keys, the error says so
    appc_site.page(
        "/",
        AppcSite.meta(
            ("ac-discovery", "example.com", "https://example.com/images/{name}-{version}.{ext}")
        ),
    )
    res = trust(fetchd, tmp_path, *site, "--prefix", "example.com/other", env=appc_site.env())
    failed(res, "error determining key location", "example.com/other", "KEYFILE")
    assert len(stored(tmp_path)) == 1


class _SlowKeyServer:
    """aiohttp on 127.0.0.1 (a free port, its own thread and loop): GET /key.asc answers
    the key's first 200 bytes, waits 0.5 s, then the rest (one Content-Length body)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner, self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(
            30
        )

    async def _key(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/pgp-keys"})
        resp.content_length = len(self.body)
        await resp.prepare(request)
        await resp.write(self.body[:200])
        await asyncio.sleep(0.5)  # the fault: the rest of the body arrives later
        await resp.write(self.body[200:])
        await resp.write_eof()
        return resp

    async def _start(self) -> tuple[web.AppRunner, int]:
        app = web.Application()
        app.router.add_get("/key.asc", self._key)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, int(runner.addresses[0][1])

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def test_a_key_url_is_read_to_its_end(fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases) -> None:
    """Review finding: one read of the body returned what had arrived (200 bytes), so the
    key was cut ("Malformed packet"); the whole body is read, bounded."""
    server = _SlowKeyServer(pgp_cases.key("rsa").read_bytes())
    try:
        url = f"http://127.0.0.1:{server.port}/key.asc"
        res = trust(
            fetchd,
            tmp_path,
            "--prefix",
            "example.com/app",
            "--skip-fingerprint-review",
            "--insecure-allow-http",
            url,
        )
    finally:
        server.close()
    ok(res)
    assert f'key: "{url}"' in res.stderr
    fpr = pgp_cases.fingerprint("rsa")
    assert stored(tmp_path) == [f"trustedkeys/prefix.d/example.com/app/{fpr}"]
    stored_key = tmp_path / "trust" / stored(tmp_path)[0]
    assert stored_key.read_bytes().startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")


@pytest.mark.parametrize(("bad", "reason"), [("exp", "expired on 2020-01-02"), ("rev", "revoked")])
def test_a_key_file_with_a_refused_key_trusts_nothing(
    fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases, bad: str, reason: str
) -> None:
    both = tmp_path / "both.asc"
    both.write_bytes(pgp_cases.key("ed").read_bytes() + pgp_cases.key(bad).read_bytes())
    for prefix in ("example.com/app", "docker://127.0.0.1:5000/app"):
        res = trust(fetchd, tmp_path, "--prefix", prefix, "--skip-fingerprint-review", str(both))
        line = failed(res, "is refused", reason, "nothing was trusted")
        assert display_fingerprint(pgp_cases.fingerprint(bad)) in line
        assert stored(tmp_path) == []


def test_a_docker_hub_prefix_is_stored_as_the_pull_name(
    fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    res = trust(
        fetchd,
        tmp_path,
        "--prefix",
        "docker://busybox",
        "--skip-fingerprint-review",
        str(pgp_cases.key("ed")),
    )
    ok(res)
    assert 'prefix: "docker://docker.io/library/busybox"' in res.stderr
    fpr = pgp_cases.fingerprint("ed")
    assert stored(tmp_path) == [f"trustedkeys/oci.d/docker.io/library/busybox/{fpr}"]
    ok(trust(fetchd, tmp_path, "--remove", fpr, "--prefix", "docker://index.docker.io/busybox"))
    assert stored(tmp_path) == []
