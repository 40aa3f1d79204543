"""Trusted publishers through ``fetchd serve`` (issue 13): for a repository under a trusted
``docker://HOST/REPO`` prefix (``serve --trust-dir``), the LAN cache serves a manifest its
upstream resolved only with a signature over that digest by a trusted key, as ``fetchd
pull`` requires; else the OCI error DENIED (403) naming what was looked for, nothing
stored and no blob asked of the upstream, and the next request asks again.

For a prefix trusted by an OpenPGP key, serve reads containers/image simple signatures
from its ``--lookaside URL`` as pull does; without one such a prefix is always refused, the
refusal naming ``--lookaside``.

Real peers only: the distribution registry (docker-registry) as the upstream, skopeo as the
LAN client (and to push images and cosign-format attachments, tests/support/cosign.py; and
``skopeo copy --sign-by`` with a gpg key into a registries.d lookaside that nginx serves).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import Fetchd, blob_file, ok
from tests.support.cosign import CosignKey, sign_and_push
from tests.support.images import (
    BuiltImage,
    File,
    Layer,
    build_image,
    build_index,
    push,
    registry_manifest_digest,
)
from tests.support.nginx import Nginx, start_nginx
from tests.support.ocigpg import Gpg
from tests.support.registry import Registry, start_registry
from tests.support.serve import ServeProcess, start_serve

CLIENT_TIMEOUT = 120.0
ACCEPT = ", ".join(
    (
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    )
)


@dataclass(frozen=True)
class Images:
    layout: Path
    built: dict[str, BuiltImage]
    work: Path
    a: CosignKey  # the trusted key
    b: CosignKey  # another key


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    work = tmp_path_factory.mktemp("serve-publishers")
    layout = work / "layout"
    built = {
        "one": build_image(layout, "one", [Layer([File("etc/which", b"one\n")])]),
        "two": build_image(layout, "two", [Layer([File("etc/which", b"two\n")])]),
        "amd64": build_image(layout, "-", [Layer([File("etc/which", b"amd64\n")])], annotate=False),
        "arm64": build_image(
            layout, "-", [Layer([File("etc/which", b"arm64\n")])], arch="arm64", annotate=False
        ),
    }
    build_index(layout, "index", [(built["amd64"], "linux/amd64"), (built["arm64"], "linux/arm64")])
    return Images(
        layout, built, work, CosignKey.generate(work / "a.pub"), CosignKey.generate(work / "b.pub")
    )


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Registry]:
    """A registry of this test's own: its access log is this test's upstream traffic."""
    with start_registry(tmp_path / "upstream") as reg:
        yield reg


@pytest.fixture
def trust_dir(tmp_path: Path) -> Path:
    return tmp_path / "trust"


def publish(images: Images, registry: Registry, repo: str, which: str = "one") -> str:
    """Push image ``which`` to REPO:1; the digest the registry serves."""
    push(images.layout, which, f"{registry.host}/{repo}:1", all_=which == "index")
    return registry_manifest_digest(registry.host, repo, "1")


def trust(fetchd: Fetchd, trust_dir: Path, prefix: str, key: Path) -> None:
    ok(
        fetchd(
            "trust",
            "--trust-dir",
            str(trust_dir),
            "--skip-fingerprint-review",
            "--prefix",
            prefix,
            str(key),
        )
    )


def serve(fetchd: Fetchd, upstream: Registry, trust_dir: Path, *extra: str) -> ServeProcess:
    return start_serve(fetchd, [upstream.url], extra=("--trust-dir", str(trust_dir), *extra))


def skopeo_pull(cache: ServeProcess, ref: str, dest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
            f"docker://{cache.host}/{ref}",
            f"oci:{dest}:x",
        ],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )


def pulled_digest(dest: Path) -> str:
    (entry,) = json.loads((dest / "index.json").read_text())["manifests"]
    digest: str = entry["digest"]
    return digest


def image_blobs(image: BuiltImage) -> list[str]:
    return [image.config.digest, *(layer.digest for layer in image.layers)]


def assert_denied(cache: ServeProcess, repo: str, *needles: str) -> str:
    reply = cache.get(f"/v2/{repo}/manifests/1", headers={"Accept": ACCEPT})
    assert reply.status == 403, reply
    assert reply.oci_codes == ["DENIED"], reply
    message: str = reply.json()["errors"][0]["message"]
    for needle in needles:
        assert needle in message, message
    return message


def assert_nothing_of(fetchd: Fetchd, upstream: Registry, image: BuiltImage) -> None:
    """Neither the image's manifest nor any of its blobs in serve's store, none asked."""
    for digest in (image.digest, *image_blobs(image)):
        assert not blob_file(fetchd, digest).exists(), digest
    upstream.settle()
    for digest in image_blobs(image):
        assert upstream.blob_get_count(digest) == 0, digest


def test_a_cosign_signed_image_pulls_through_serve(
    tmp_path: Path, fetchd: Fetchd, upstream: Registry, images: Images, trust_dir: Path
) -> None:
    repo = "pub/signed/app"
    digest = publish(images, upstream, repo)
    sign_and_push(images.work, upstream.host, repo, digest, images.a)
    trust(fetchd, trust_dir, f"docker://{upstream.host}/pub/signed", images.a.pub)
    with serve(fetchd, upstream, trust_dir) as cache:
        ok(skopeo_pull(cache, f"{repo}:1", tmp_path / "cold"))
        assert pulled_digest(tmp_path / "cold") == digest
        ok(skopeo_pull(cache, f"{repo}@{digest}", tmp_path / "by-digest"))
        assert pulled_digest(tmp_path / "by-digest") == digest
        for blob in image_blobs(images.built["one"]):
            assert blob_file(fetchd, blob).exists(), blob


def test_an_unsigned_image_is_denied_and_asked_again(
    tmp_path: Path, fetchd: Fetchd, upstream: Registry, images: Images, trust_dir: Path
) -> None:
    repo = "pub/unsigned/app"
    digest = publish(images, upstream, repo)
    trust(fetchd, trust_dir, f"docker://{upstream.host}/pub", images.a.pub)
    image = images.built["one"]
    with serve(fetchd, upstream, trust_dir) as cache:
        result = skopeo_pull(cache, f"{repo}:1", tmp_path / "unsigned")
        assert result.returncode != 0, result
        assert "denied" in result.stderr.lower(), result.stderr
        assert_denied(
            cache,
            repo,
            f"docker://{upstream.host}/{repo}:1 is not signed",
            f"sha256-{digest[7:19]}….sig: not found",
        )
        by_digest = cache.get(f"/v2/{repo}/manifests/{digest}", headers={"Accept": ACCEPT})
        assert (by_digest.status, by_digest.oci_codes) == (403, ["DENIED"]), by_digest
        assert_nothing_of(fetchd, upstream, image)
        # Signed by a key trusted for nothing: still refused, the reason named.
        sign_and_push(images.work, upstream.host, repo, digest, images.b)
        assert_denied(cache, repo, "layer 1 is not signed by a trusted cosign key")
        assert_nothing_of(fetchd, upstream, image)
        # The refusal was not cached: once the publisher signs, the same tag pulls.
        sign_and_push(images.work, upstream.host, repo, digest, images.a)
        ok(skopeo_pull(cache, f"{repo}:1", tmp_path / "signed"))
        assert pulled_digest(tmp_path / "signed") == digest


def test_an_image_under_an_attachment_shaped_tag_is_checked(
    tmp_path: Path, fetchd: Fetchd, upstream: Registry, images: Images, trust_dir: Path
) -> None:
    """A tag that looks like a cosign attachment (sha256-HEX.sig) gets no exemption: an
    unsigned image pushed under one is denied like under any other tag."""
    repo = "pub/attached/app"
    tag = "sha256-" + "ab" * 32 + ".sig"
    push(images.layout, "one", f"{upstream.host}/{repo}:{tag}")
    trust(fetchd, trust_dir, f"docker://{upstream.host}/pub", images.a.pub)
    with serve(fetchd, upstream, trust_dir) as cache:
        got = cache.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
        assert (got.status, got.oci_codes) == (403, ["DENIED"]), got
        result = skopeo_pull(cache, f"{repo}:{tag}", tmp_path / "out")
        assert result.returncode != 0, result
        assert_nothing_of(fetchd, upstream, images.built["one"])


def test_a_tag_moved_to_an_unsigned_image_is_denied_not_served_stale(
    tmp_path: Path, fetchd: Fetchd, upstream: Registry, images: Images, trust_dir: Path
) -> None:
    repo = "pub/moved/app"
    first = publish(images, upstream, repo, "one")
    sign_and_push(images.work, upstream.host, repo, first, images.a)
    trust(fetchd, trust_dir, f"docker://{upstream.host}/{repo}", images.a.pub)
    with serve(fetchd, upstream, trust_dir, "--tag-ttl", "0") as cache:
        ok(skopeo_pull(cache, f"{repo}:1", tmp_path / "first"))
        second = publish(images, upstream, repo, "two")
        assert second != first
        assert_denied(cache, repo, f"sha256-{second[7:19]}….sig: not found")
        assert_nothing_of(fetchd, upstream, images.built["two"])
        # The verified digest stays pullable by digest.
        ok(skopeo_pull(cache, f"{repo}@{first}", tmp_path / "by-digest"))


def test_a_keystore_that_cannot_be_read_is_not_hidden_by_a_stale_copy(
    tmp_path: Path, fetchd: Fetchd, upstream: Registry, images: Images, trust_dir: Path
) -> None:
    """A guard, not a proof of the stale-copy rule: when the trusted key file no longer
    holds the key it is named after, a verified tag is refused (with --tag-ttl 0), not
    served from the copy verified before. This failure is raised before the revalidation
    (so it passed before that rule too); the rule itself (a SignatureInvalid/TrustError
    from check_publisher during revalidation is refused) has no test of its own."""
    repo = "pub/keyfile/app"
    digest = publish(images, upstream, repo, "one")
    sign_and_push(images.work, upstream.host, repo, digest, images.a)
    trust(fetchd, trust_dir, f"docker://{upstream.host}/{repo}", images.a.pub)
    (stored,) = trust_dir.glob("trustedkeys/oci.d/**/cosign-*.pub")
    with serve(fetchd, upstream, trust_dir, "--tag-ttl", "0") as cache:
        ok(skopeo_pull(cache, f"{repo}:1", tmp_path / "first"))
        stored.write_bytes(images.b.pub.read_bytes())
        got = cache.get(f"/v2/{repo}/manifests/1", headers={"Accept": ACCEPT})
        assert got.status != 200, got
        assert b"fingerprint mismatch" in got.body, got.body


def test_a_signed_index_serves_its_platform_manifests(
    tmp_path: Path, fetchd: Fetchd, upstream: Registry, images: Images, trust_dir: Path
) -> None:
    """The signature covers the index; its platform manifests, asked by digest, pass."""
    repo = "pub/index/app"
    digest = publish(images, upstream, repo, "index")
    sign_and_push(images.work, upstream.host, repo, digest, images.a)
    trust(fetchd, trust_dir, f"docker://{upstream.host}/pub/index", images.a.pub)
    with serve(fetchd, upstream, trust_dir) as cache:
        dest = tmp_path / "amd64"
        result = subprocess.run(
            [
                "skopeo",
                "--override-arch",
                "amd64",
                "--override-os",
                "linux",
                "copy",
                "--quiet",
                "--src-tls-verify=false",
                f"docker://{cache.host}/{repo}:1",
                f"oci:{dest}:x",
            ],
            capture_output=True,
            text=True,
            timeout=CLIENT_TIMEOUT,
        )
        ok(result)
        for blob in image_blobs(images.built["amd64"]):
            assert blob_file(fetchd, blob).exists(), blob
        # A platform manifest of another trusted repository, never reached through a
        # verified index of that repository: refused.
        other = images.built["arm64"].digest
        unsigned = "pub/index/bare"
        push(images.layout, "index", f"{upstream.host}/{unsigned}:1", all_=True)
        reply = cache.get(f"/v2/{unsigned}/manifests/{other}", headers={"Accept": ACCEPT})
        assert (reply.status, reply.oci_codes) == (403, ["DENIED"]), reply


def test_untrusted_names_pass_as_before(
    tmp_path: Path, fetchd: Fetchd, upstream: Registry, images: Images, trust_dir: Path
) -> None:
    trust(fetchd, trust_dir, f"docker://{upstream.host}/pub/signed", images.a.pub)
    for repo in ("elsewhere/app", "pub/signedness/app"):  # not under pub/signed/
        publish(images, upstream, repo)
    with serve(fetchd, upstream, trust_dir) as cache:
        for n, repo in enumerate(("elsewhere/app", "pub/signedness/app")):
            ok(skopeo_pull(cache, f"{repo}:1", tmp_path / f"pulled-{n}"))
            assert pulled_digest(tmp_path / f"pulled-{n}") == images.built["one"].digest


# --- simple signing (skopeo copy --sign-by, a lookaside over nginx) -------------------------


@dataclass(frozen=True)
class Lookaside:
    dir: Path  # what skopeo writes (registries.d lookaside-staging) and nginx serves
    regd: Path  # the registries.d directory
    nginx: Nginx


@pytest.fixture
def lookaside(tmp_path: Path, upstream: Registry) -> Iterator[Lookaside]:
    root = tmp_path / "lookaside"
    root.mkdir()
    regd = tmp_path / "registries.d"
    regd.mkdir()
    (regd / "default.yaml").write_text(
        f"docker:\n  {upstream.host}:\n    lookaside-staging: file://{root}\n"
    )
    with start_nginx(tmp_path / "nginx", root) as nginx:
        yield Lookaside(root, regd, nginx)


def sign_by(images: Images, gpg: Gpg, lookaside: Lookaside, upstream: Registry, repo: str) -> str:
    """Push image "one" to REPO:1 with ``skopeo copy --sign-by``; the digest it serves."""
    gpg.skopeo(
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--preserve-digests",
        "--registries.d",
        str(lookaside.regd),
        "--sign-by",
        gpg.signer,
        f"oci:{images.layout}:one",
        f"docker://{upstream.host}/{repo}:1",
    )
    digest = registry_manifest_digest(upstream.host, repo, "1")
    assert (lookaside.dir / f"{repo}@{digest.replace(':', '=')}" / "signature-1").is_file()
    return digest


def test_a_skopeo_signed_image_pulls_through_serve_with_lookaside(
    tmp_path: Path,
    fetchd: Fetchd,
    upstream: Registry,
    images: Images,
    trust_dir: Path,
    gpg: Gpg,
    lookaside: Lookaside,
) -> None:
    repo = "pub/simple/app"
    digest = sign_by(images, gpg, lookaside, upstream, repo)
    bare = "pub/simple/bare"
    unsigned = publish(images, upstream, bare, "two")
    trust(fetchd, trust_dir, f"docker://{upstream.host}/pub/simple", gpg.signer_key)
    with serve(fetchd, upstream, trust_dir, "--lookaside", lookaside.nginx.url) as cache:
        ok(skopeo_pull(cache, f"{repo}:1", tmp_path / "signed"))
        assert pulled_digest(tmp_path / "signed") == digest
        for blob in image_blobs(images.built["one"]):
            assert blob_file(fetchd, blob).exists(), blob
        signature = f"/{repo}@{digest.replace(':', '=')}/signature-1"
        assert [r.status for r in lookaside.nginx.requests(signature)] == [200]
        # Unsigned, under the same prefix: refused, nothing of it stored or asked.
        result = skopeo_pull(cache, f"{bare}:1", tmp_path / "unsigned")
        assert result.returncode != 0, result
        assert "denied" in result.stderr.lower(), result.stderr
        assert_denied(
            cache,
            bare,
            f"docker://{upstream.host}/{bare}:1 is not signed",
            f"{lookaside.nginx.url}/{bare}@sha256={unsigned[7:19]}…/signature-N: "
            "signature-1: not found",
        )
        assert_nothing_of(fetchd, upstream, images.built["two"])


def test_a_skopeo_signed_image_is_denied_without_lookaside(
    tmp_path: Path,
    fetchd: Fetchd,
    upstream: Registry,
    images: Images,
    trust_dir: Path,
    gpg: Gpg,
    lookaside: Lookaside,
) -> None:
    repo = "pub/simple/app"
    sign_by(images, gpg, lookaside, upstream, repo)
    trust(fetchd, trust_dir, f"docker://{upstream.host}/pub/simple", gpg.signer_key)
    with serve(fetchd, upstream, trust_dir) as cache:
        result = skopeo_pull(cache, f"{repo}:1", tmp_path / "signed")
        assert result.returncode != 0, result
        assert "denied" in result.stderr.lower(), result.stderr
        assert_denied(
            cache,
            repo,
            f"docker://{upstream.host}/{repo}:1 is not signed",
            "no lookaside for simple signatures: OpenPGP keys are trusted, pass --lookaside URL",
        )
        assert_nothing_of(fetchd, upstream, images.built["one"])
    assert lookaside.nginx.requests() == []
