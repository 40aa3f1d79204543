"""TLS and authentication against the real registry: a test CA, htpasswd, token auth."""

from __future__ import annotations

import base64
import json
import shlex
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.support.cli import Fetchd, failed, ok
from tests.support.fakeregistry import Answer, FakeRegistry, sha256
from tests.support.images import (
    MANIFEST_ACCEPT,
    Layer,
    build_image,
    push,
    random_layer,
    registry_manifest_digest,
)
from tests.support.registry import Registry, start_registry
from tests.support.tls import TestCA
from tests.support.tokenserver import start_token_server


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, busybox_layer: Layer) -> Path:
    path = tmp_path_factory.mktemp("auth-images") / "layout"
    build_image(path, "app", [busybox_layer])
    return path


def auth_file(path: Path, host: str, user: str, password: str) -> Path:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


def test_tls_registry_trusted_through_ssl_cert_file(
    tls_ca: TestCA, layout: Path, fetchd: Fetchd, tmp_path: Path
) -> None:
    cert, key = tls_ca.issue_server(tmp_path / "cert")
    with start_registry(tmp_path / "reg", tls=(cert, key)) as reg:
        push(
            layout,
            "app",
            f"{reg.host}/app:1",
            tls_verify=True,
            cert_dir=tls_ca.cert_dir(tmp_path / "cd"),
        )
        want = registry_manifest_digest(reg.host, "app", "1", ssl_context=tls_ca.ssl_context())
        ref = f"docker://{reg.host}/app:1"

        untrusted = failed(fetchd("pull", ref), "certificate is not trusted", "SSL_CERT_FILE")
        assert reg.host in untrusted
        assert fetchd.blobs() == set()

        out = ok(fetchd("pull", ref, env={"SSL_CERT_FILE": str(tls_ca.ca_path)}))
        assert out.strip() == want

        # --insecure-options tls skips verification (a second store, so it really fetches)
        other = Fetchd(tmp_path / "store2", fetchd.home)
        assert ok(other("pull", "--insecure-options", "tls", ref)).strip() == want


def test_resolve_pins_a_name_to_an_address(
    tls_ca: TestCA, layout: Path, fetchd: Fetchd, tmp_path: Path
) -> None:
    cert, key = tls_ca.issue_server(tmp_path / "cert", names=("registry.test", "127.0.0.1"))
    with start_registry(tmp_path / "reg", tls=(cert, key)) as reg:
        push(
            layout,
            "app",
            f"{reg.host}/app:1",
            tls_verify=True,
            cert_dir=tls_ca.cert_dir(tmp_path / "cd"),
        )
        env = {"SSL_CERT_FILE": str(tls_ca.ca_path)}
        ref = f"docker://registry.test:{reg.port}/app:1"
        failed(fetchd("pull", ref, env=env), "cannot connect")
        out = ok(fetchd("pull", "--resolve", f"registry.test:{reg.port}:127.0.0.1", ref, env=env))
        assert out.strip() == registry_manifest_digest(
            reg.host, "app", "1", ssl_context=tls_ca.ssl_context()
        )
        assert fetchd.entry(f"registry.test:{reg.port}/app:1")


def test_token_auth_registry(layout: Path, fetchd: Fetchd, tmp_path: Path) -> None:
    with (
        start_token_server(tmp_path / "tok", users={"alice": "s3cret"}) as tokens,
        start_registry(tmp_path / "reg", auth=tokens.registry_auth_config()) as reg,
    ):
        push(layout, "app", f"{reg.host}/team/app:1", creds="alice:s3cret")
        ref = f"docker://{reg.host}/team/app:1"
        http = ("--insecure-options", "http")

        failed(fetchd("pull", *http, ref), "requires credentials")
        wrong = auth_file(tmp_path / "wrong.json", reg.host, "alice", "nope")
        failed(
            fetchd("pull", *http, ref, env={"REGISTRY_AUTH_FILE": str(wrong)}),
            "refused the credentials of user 'alice'",
        )
        assert fetchd.blobs() == set()

        right = auth_file(tmp_path / "auth.json", reg.host, "alice", "s3cret")
        tokens.requests.clear()
        out = ok(fetchd("pull", *http, ref, env={"REGISTRY_AUTH_FILE": str(right)}))

        assert out.strip().startswith("sha256:")
        asked = [r for r in tokens.requests if r.user == "alice"]
        assert asked and all(r.scopes == ("repository:team/app:pull",) for r in asked)
        # one token serves the manifest and every blob: the cache works
        assert len(asked) == 1
        assert "ok" in ok(fetchd("fsck"))


def test_token_auth_big_layer_over_parallel_ranges(fetchd: Fetchd, tmp_path: Path) -> None:
    """A layer big enough for range requests, from a token-auth registry: the probe goes
    over aiohttp, the other segments over threads, and every one of them carries the one
    token (no 401, one token request)."""
    layout = tmp_path / "layout"
    built = build_image(layout, "big", [random_layer(96 << 20, seed=43)])
    (layer,) = built.layers
    with (
        start_token_server(tmp_path / "tok", users={"alice": "s3cret"}) as tokens,
        start_registry(tmp_path / "reg", auth=tokens.registry_auth_config()) as reg,
    ):
        push(layout, "big", f"{reg.host}/team/big:1", creds="alice:s3cret")
        right = auth_file(tmp_path / "auth.json", reg.host, "alice", "s3cret")
        tokens.requests.clear()
        out = ok(
            fetchd(
                "pull",
                "--insecure-options",
                "http",
                f"docker://{reg.host}/team/big:1",
                env={"REGISTRY_AUTH_FILE": str(right)},
            )
        )
        gets = reg.blob_gets(layer.digest)

    assert out.strip() == built.digest
    assert layer.digest in fetchd.blobs()
    assert len([g for g in gets if g.status == 206]) >= 2, [(g.status, g.bytes) for g in gets]
    assert all(g.status == 206 for g in gets), [(g.status, g.bytes) for g in gets]
    assert sum(g.bytes for g in gets) <= 1.15 * layer.size
    assert len([r for r in tokens.requests if r.user == "alice"]) == 1
    assert "ok" in ok(fetchd("fsck"))


def test_basic_auth_registry(layout: Path, fetchd: Fetchd, tmp_path: Path) -> None:
    htpasswd = tmp_path / "htpasswd"
    line = subprocess.run(
        ["htpasswd", "-Bbn", "bob", "hunter2"], capture_output=True, text=True, check=True
    ).stdout
    htpasswd.write_text(line)
    auth = {"htpasswd": {"realm": "fetchd-test", "path": str(htpasswd)}}
    with start_registry(tmp_path / "reg", auth=auth) as reg:
        push(layout, "app", f"{reg.host}/app:1", creds="bob:hunter2")
        ref = f"docker://{reg.host}/app:1"
        http = ("--insecure-options", "http")
        failed(fetchd("pull", *http, ref), "requires credentials")
        bad = auth_file(tmp_path / "bad.json", reg.host, "bob", "wrong")
        failed(fetchd("pull", *http, ref, env={"REGISTRY_AUTH_FILE": str(bad)}), "refused")
        good = auth_file(tmp_path / "good.json", reg.host, "bob", "hunter2")
        # ~/.docker/config.json works as well as $REGISTRY_AUTH_FILE
        (fetchd.home / ".docker").mkdir()
        (fetchd.home / ".docker/config.json").write_text(good.read_text())
        out = ok(fetchd("pull", *http, ref))
        assert out.strip() == registry_manifest_digest_basic(reg.host, "app", "1", "bob", "hunter2")


def registry_manifest_digest_basic(host: str, name: str, tag: str, user: str, pw: str) -> str:
    token = base64.b64encode(f"{user}:{pw}".encode()).decode()
    req = urllib.request.Request(
        f"http://{host}/v2/{name}/manifests/{tag}",
        headers={"Accept": MANIFEST_ACCEPT, "Authorization": f"Basic {token}"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(resp.headers["Docker-Content-Digest"])


def test_redirect_to_blob_storage_carries_no_credentials(fetchd: Fetchd, tmp_path: Path) -> None:
    """A registry that redirects blob GETs to another host (blob storage, a CDN): the
    redirect is followed, and the registry's credentials never reach that host."""
    blob = b"layer bytes\n" * 4096
    creds = "Basic " + base64.b64encode(b"carol:pw").decode()
    with FakeRegistry() as storage, FakeRegistry(basic_auth=creds) as registry:
        storage.routes["/bucket/layer"] = Answer(blob)
        registry.image(
            "redirected",
            {"digest": sha256(blob), "size": len(blob)},
            Answer(status=307, headers={"Location": f"{storage.url}/bucket/layer"}),
        )
        env = {
            "REGISTRY_AUTH_FILE": str(auth_file(tmp_path / "a.json", registry.host, "carol", "pw"))
        }
        out = ok(
            fetchd(
                "pull",
                "--insecure-options",
                "http",
                f"docker://{registry.host}/redirected:1",
                env=env,
            )
        )
    assert out.strip().startswith("sha256:")
    assert sha256(blob) in fetchd.blobs()
    assert any(h.get("Authorization") == creds for p, h in registry.seen if "/blobs/" in p)
    assert storage.seen and all("Authorization" not in h for _, h in storage.seen)


def test_progress_bars_on_a_terminal(layout: Path, registry: Registry, fetchd: Fetchd) -> None:
    """stderr a terminal (script(1) gives it one): per-blob and total bars, bytes/s."""
    name = f"{registry.host}/progress:1"
    push(layout, "app", name)
    cmd = " ".join(
        shlex.quote(a)
        for a in fetchd.argv("pull", "--insecure-options", "http", f"docker://{name}")
    )
    r = subprocess.run(
        ["script", "-qec", cmd, "/dev/null"], capture_output=True, env=fetchd.env(), timeout=120
    )
    screen = r.stdout.decode(errors="replace")
    assert r.returncode == 0, screen
    assert "[########################]" in screen and "total" in screen and "/s" in screen
    quiet = fetchd(
        "pull", "--pull-policy", "update", "--insecure-options", "http", f"docker://{name}"
    )
    assert "[#" not in quiet.stderr  # not a terminal: no bars
