"""Trusted publishers of OCI images (issue 13, acceptance 8): ``fetchd trust --prefix
docker://HOST/REPO KEY`` makes pulls of that repository (and the ones under it) require a
signature over the digest the tag resolves to.

Real peers only: the distribution registry (docker-registry), skopeo (``copy --sign-by``
writes simple signatures into a registries.d lookaside directory, ``standalone-sign``),
gpg keys in a GNUPGHOME of this module, nginx serving the lookaside directory, and
cosign-format attachments made with `cryptography` (tests/support/cosign.py; Debian's
skopeo cannot make sigstore signatures) and pushed with skopeo. A refused pull must exit 1
with one error line naming what was looked for, leave nothing in the store's index, and
have asked the registry for none of the image's blobs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import Fetchd, assert_stored, failed, ok
from tests.support.cosign import CosignKey, payload, push_signature, sign_and_push
from tests.support.images import (
    BuiltImage,
    File,
    Layer,
    build_image,
    build_index,
    push,
    registry_manifest_digest,
    skopeo,
)
from tests.support.nginx import Nginx, start_nginx
from tests.support.ocigpg import Gpg
from tests.support.registry import Registry
from tests.support.slowserver import SlowProxy

HTTP = ("--insecure-options", "http")


@dataclass
class World:
    registry: Registry
    lookaside: Path  # the directory skopeo writes and nginx serves
    nginx: Nginx
    regd: Path  # a registries.d directory pointing skopeo at `lookaside`
    work: Path
    images: Path  # an OCI layout
    a: CosignKey
    b: CosignKey
    gpg: Gpg
    built: dict[str, BuiltImage]

    def push(self, repo: str, which: str = "one") -> str:
        """Push image ``which`` to REPO:1; its manifest digest."""
        push(self.images, which, f"{self.registry.host}/{repo}:1", all_=which == "index")
        return registry_manifest_digest(self.registry.host, repo, "1")

    def sign_by(self, repo: str, fpr: str, which: str = "one") -> str:
        """Push to REPO:1 with ``skopeo copy --sign-by FPR`` (simple signing, lookaside)."""
        self.gpg.skopeo(
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
            "--preserve-digests",
            "--registries.d",
            str(self.regd),
            "--sign-by",
            fpr,
            f"oci:{self.images}:{which}",
            f"docker://{self.registry.host}/{repo}:1",
        )
        return registry_manifest_digest(self.registry.host, repo, "1")

    def ref(self, repo: str, tag: str = "1") -> str:
        return f"docker://{self.registry.host}/{repo}:{tag}"

    def layer_gets(self, which: str = "one") -> int:
        img = self.built[which]
        return sum(self.registry.blob_get_count(layer.digest) for layer in img.layers)


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry, gpg: Gpg
) -> Iterator[World]:
    work = tmp_path_factory.mktemp("ocisig")
    lookaside = work / "lookaside"
    lookaside.mkdir()
    regd = work / "registries.d"
    regd.mkdir()
    (regd / "default.yaml").write_text(
        f"docker:\n  {registry.host}:\n    lookaside-staging: file://{lookaside}\n"
    )
    images = work / "layout"
    built = {
        "one": build_image(images, "one", [Layer([File("etc/which", b"one\n")])]),
        "two": build_image(images, "two", [Layer([File("etc/which", b"two\n")])]),
        "amd64": build_image(images, "-", [Layer([File("etc/which", b"amd64\n")])], annotate=False),
        "arm64": build_image(
            images, "-", [Layer([File("etc/which", b"arm64\n")])], arch="arm64", annotate=False
        ),
    }
    build_index(images, "index", [(built["amd64"], "linux/amd64"), (built["arm64"], "linux/arm64")])
    with start_nginx(work / "nginx", lookaside) as nginx:
        yield World(
            registry,
            lookaside,
            nginx,
            regd,
            work,
            images,
            CosignKey.generate(work / "a.pub"),
            CosignKey.generate(work / "b.pub"),
            gpg,
            built,
        )


@pytest.fixture
def trust_dir(tmp_path: Path) -> Path:
    return tmp_path / "trust"


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


def pull(
    fetchd: Fetchd, trust_dir: Path, ref: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return fetchd("pull", *HTTP, "--trust-dir", str(trust_dir), *extra, ref)


def assert_pulled(
    fetchd: Fetchd, world: World, repo: str, digest: str, result: str, which: str = "one"
) -> None:
    assert digest in result
    entry = fetchd.entry(f"{world.registry.host}/{repo}:1")
    if which == "one":
        assert entry["digest"] == digest
    for layer in world.built[which].layers:
        assert_stored(fetchd, layer.digest, layer.size)


def assert_refused(
    fetchd: Fetchd, world: World, repo: str, result: subprocess.CompletedProcess[str], *needles: str
) -> str:
    line = failed(result, f"docker://{world.registry.host}/{repo}:1 is not signed", *needles)
    index = fetchd.store / "layout" / "index.json"
    names = (
        []
        if not index.exists()
        else [
            m.get("annotations", {}).get("org.opencontainers.image.ref.name")
            for m in fetchd.index().get("manifests", [])
        ]
    )
    assert f"{world.registry.host}/{repo}:1" not in names
    assert fetchd.ingests() == []
    return line


# --- cosign ---------------------------------------------------------------------------


def test_cosign_signature_by_trusted_key_pulls(
    fetchd: Fetchd, world: World, trust_dir: Path
) -> None:
    repo = "ocisig/cosign-ok/app"
    digest = world.push(repo)
    sign_and_push(world.work, world.registry.host, repo, digest, world.a)
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/ocisig/cosign-ok", world.a.pub)
    out = ok(pull(fetchd, trust_dir, world.ref(repo)))
    assert_pulled(fetchd, world, repo, digest, out)


def test_unsigned_image_is_refused_before_any_blob(
    fetchd: Fetchd, world: World, trust_dir: Path
) -> None:
    repo = "ocisig/unsigned/app"
    digest = world.push(repo)
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/ocisig/unsigned/app", world.a.pub)
    before = world.layer_gets()
    line = assert_refused(
        fetchd,
        world,
        repo,
        pull(fetchd, trust_dir, world.ref(repo)),
        f"ocisig/unsigned/app:sha256-{digest[7:19]}",
        ".sig: not found",
    )
    assert "fetchd trust --prefix docker://" in line
    assert world.layer_gets() == before


def test_cosign_signature_by_another_key_is_refused(
    fetchd: Fetchd, world: World, trust_dir: Path
) -> None:
    repo = "ocisig/cosign-other/app"
    digest = world.push(repo)
    sign_and_push(world.work, world.registry.host, repo, digest, world.b)
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/{repo}", world.a.pub)
    before = world.layer_gets()
    assert_refused(
        fetchd,
        world,
        repo,
        pull(fetchd, trust_dir, world.ref(repo)),
        "not signed by a trusted cosign key",
    )
    assert world.layer_gets() == before


def test_cosign_signature_of_another_digest_is_refused(
    fetchd: Fetchd, world: World, trust_dir: Path
) -> None:
    """A valid signature by the trusted key, but over the other image's digest, copied to
    this image's attachment tag."""
    repo = "ocisig/cosign-digest/app"
    digest = world.push(repo)
    other = world.push("ocisig/cosign-digest/elsewhere", "two")
    data = payload(other, f"{world.registry.host}/{repo}")
    push_signature(world.work, world.registry.host, repo, digest, [(data, world.a.sign(data))])
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/{repo}", world.a.pub)
    assert_refused(
        fetchd,
        world,
        repo,
        pull(fetchd, trust_dir, world.ref(repo)),
        f"is a signature of {other[:19]}…, not of {digest[:19]}…",
    )


def test_cosign_signature_for_another_repository_is_refused(
    fetchd: Fetchd, world: World, trust_dir: Path
) -> None:
    repo = "ocisig/cosign-identity/app"
    digest = world.push(repo)
    sign_and_push(
        world.work,
        world.registry.host,
        repo,
        digest,
        world.a,
        reference=f"{world.registry.host}/ocisig/cosign-identity/other",
    )
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/{repo}", world.a.pub)
    assert_refused(
        fetchd,
        world,
        repo,
        pull(fetchd, trust_dir, world.ref(repo)),
        "is a signature for",
        "cosign-identity/other",
    )


def test_one_good_layer_among_bad_ones_is_enough(
    fetchd: Fetchd, world: World, trust_dir: Path
) -> None:
    repo = "ocisig/cosign-layers/app"
    digest = world.push(repo)
    good = payload(digest, f"{world.registry.host}/{repo}")
    wrong = payload(digest, f"{world.registry.host}/{repo}", kind="something else")
    push_signature(
        world.work,
        world.registry.host,
        repo,
        digest,
        [(good, world.b.sign(good)), (wrong, world.a.sign(wrong)), (good, world.a.sign(good))],
    )
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/{repo}", world.a.pub)
    out = ok(pull(fetchd, trust_dir, world.ref(repo)))
    assert_pulled(fetchd, world, repo, digest, out)


# --- simple signing (skopeo copy --sign-by, lookaside over nginx) ---------------------------


def test_skopeo_sign_by_signature_pulls(fetchd: Fetchd, world: World, trust_dir: Path) -> None:
    repo = "ocisig/simple-ok/app"
    digest = world.sign_by(repo, world.gpg.signer)
    assert (world.lookaside / f"{repo}@{digest.replace(':', '=')}" / "signature-1").is_file()
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/ocisig", world.gpg.signer_key)
    out = ok(pull(fetchd, trust_dir, world.ref(repo), "--lookaside", world.nginx.url))
    assert_pulled(fetchd, world, repo, digest, out)
    assert [
        r.status for r in world.nginx.requests(f"/{repo}@{digest.replace(':', '=')}/signature-1")
    ] == [200]


def test_skopeo_signature_by_another_key_is_refused(
    fetchd: Fetchd, world: World, trust_dir: Path
) -> None:
    repo = "ocisig/simple-other/app"
    world.sign_by(repo, world.gpg.other)
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/{repo}", world.gpg.signer_key)
    before = world.layer_gets()
    assert_refused(
        fetchd,
        world,
        repo,
        pull(fetchd, trust_dir, world.ref(repo), "--lookaside", world.nginx.url),
        "/signature-N: signature-1",
    )
    assert world.layer_gets() == before


def test_simple_signature_for_another_identity_is_refused(
    fetchd: Fetchd, world: World, trust_dir: Path
) -> None:
    """skopeo standalone-sign of this manifest, for another reference: refused as
    containers/image's default matchRepoDigestOrExact refuses it."""
    repo = "ocisig/simple-identity/app"
    digest = world.push(repo)
    manifest = world.work / "simple-identity.json"
    manifest.write_text(skopeo("inspect", "--raw", "--tls-verify=false", world.ref(repo)))
    sig = world.lookaside / f"{repo}@{digest.replace(':', '=')}" / "signature-1"
    sig.parent.mkdir(parents=True)
    world.gpg.skopeo(
        "standalone-sign",
        str(manifest),
        f"{world.registry.host}/{repo}:2",
        world.gpg.signer,
        "-o",
        str(sig),
    )
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/{repo}", world.gpg.signer_key)
    assert_refused(
        fetchd,
        world,
        repo,
        pull(fetchd, trust_dir, world.ref(repo), "--lookaside", world.nginx.url),
        f"is a signature for {world.registry.host}/{repo}:2, not for",
    )


def test_openpgp_key_without_lookaside_says_so(
    fetchd: Fetchd, world: World, trust_dir: Path
) -> None:
    repo = "ocisig/simple-nolookaside/app"
    world.sign_by(repo, world.gpg.signer)
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/{repo}", world.gpg.signer_key)
    assert_refused(fetchd, world, repo, pull(fetchd, trust_dir, world.ref(repo)), "--lookaside URL")


def test_unsigned_image_with_a_lookaside_names_where_it_looked(
    fetchd: Fetchd, world: World, trust_dir: Path
) -> None:
    """An OpenPGP key trusted for the prefix, --lookaside URL given, no signature-1 there
    (nginx: 404): refused naming the lookaside URL looked at; no blob asked, nothing stored."""
    repo = "ocisig/simple-unsigned/app"
    digest = world.push(repo)
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/ocisig", world.gpg.signer_key)
    before = world.layer_gets()
    # the digest is shortened in the line: the URL up to it, and which file was missing
    where = f"looked for {world.nginx.url.rstrip('/')}/{repo}@sha256={digest[7:19]}…/signature-N"
    line = assert_refused(
        fetchd,
        world,
        repo,
        pull(fetchd, trust_dir, world.ref(repo), "--lookaside", world.nginx.url),
    )
    assert where in line and "signature-1: not found" in line, line
    assert world.layer_gets() == before


# --- outside trusted prefixes, and --insecure-options image ----------------------------


def test_untrusted_names_pull_as_before(fetchd: Fetchd, world: World, trust_dir: Path) -> None:
    """Keys trusted for ocisig/plain-trusted (and for a string prefix of the name) do not
    apply to ocisig/plain/app: path components, not strings."""
    repo = "ocisig/plain/app"
    digest = world.push(repo)
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/ocisig/plain-trusted", world.a.pub)
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/ocisig/pla", world.a.pub)
    out = ok(pull(fetchd, trust_dir, world.ref(repo)))
    assert_pulled(fetchd, world, repo, digest, out)


def test_insecure_image_skips_the_check_with_a_warning(
    fetchd: Fetchd, world: World, trust_dir: Path
) -> None:
    repo = "ocisig/insecure/app"
    digest = world.push(repo)
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/{repo}", world.a.pub)
    result = fetchd(
        "pull", "--insecure-options", "http,image", "--trust-dir", str(trust_dir), world.ref(repo)
    )
    out = ok(result)
    assert_pulled(fetchd, world, repo, digest, out)
    assert "not checked (--insecure-options image)" in result.stderr


# --- which digest, which reference ------------------------------------------------------


def test_a_signature_of_the_index_covers_its_platforms(
    fetchd: Fetchd, world: World, trust_dir: Path
) -> None:
    """The digest the tag resolves to (the index) is the one signed and checked."""
    repo = "ocisig/index/app"
    digest = world.push(repo, "index")
    sign_and_push(world.work, world.registry.host, repo, digest, world.a)
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/{repo}", world.a.pub)
    out = ok(pull(fetchd, trust_dir, world.ref(repo), "--platform", "linux/amd64"))
    assert_pulled(fetchd, world, repo, digest, out, "amd64")


def test_a_signature_of_a_platform_manifest_alone_is_not_enough(
    fetchd: Fetchd, world: World, trust_dir: Path
) -> None:
    repo = "ocisig/index-child/app"
    digest = world.push(repo, "index")
    child = world.built["amd64"].digest
    sign_and_push(world.work, world.registry.host, repo, child, world.a)
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/{repo}", world.a.pub)
    assert_refused(
        fetchd,
        world,
        repo,
        pull(fetchd, trust_dir, world.ref(repo), "--platform", "linux/amd64"),
        f"sha256-{digest[7:19]}….sig: not found",
    )


def test_a_by_digest_pull_takes_a_signature_of_the_repository(
    fetchd: Fetchd, world: World, trust_dir: Path
) -> None:
    """skopeo signed REPO:1; pulling REPO@DIGEST matches by repository (as
    matchRepoDigestOrExact does)."""
    repo = "ocisig/simple-bydigest/app"
    digest = world.sign_by(repo, world.gpg.signer)
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/{repo}", world.gpg.signer_key)
    ref = f"docker://{world.registry.host}/{repo}@{digest}"
    out = ok(pull(fetchd, trust_dir, ref, "--lookaside", world.nginx.url))
    assert digest in out
    for layer in world.built["one"].layers:
        assert_stored(fetchd, layer.digest, layer.size)


# --- bounds ---------------------------------------------------------------------------------


def test_attachment_bounds(fetchd: Fetchd, world: World, trust_dir: Path) -> None:
    """More than 16 layers: refused unread; a payload over 64 KiB: refused, never fetched."""
    host = world.registry.host
    many = "ocisig/bounds-layers/app"
    digest = world.push(many)
    good = payload(digest, f"{host}/{many}")
    push_signature(world.work, host, many, digest, [(good, world.a.sign(good))] * 17)
    trust(fetchd, trust_dir, f"docker://{host}/ocisig", world.a.pub)
    assert_refused(
        fetchd, world, many, pull(fetchd, trust_dir, world.ref(many)), "17 layers, more than the 16"
    )

    big = "ocisig/bounds-payload/app"
    digest = world.push(big)
    doc = json.loads(payload(digest, f"{host}/{big}"))
    doc["optional"] = {"padding": "x" * 70_000}
    data = json.dumps(doc).encode()
    push_signature(world.work, host, big, digest, [(data, world.a.sign(data))])
    payload_digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert_refused(
        fetchd,
        world,
        big,
        pull(fetchd, trust_dir, world.ref(big)),
        f"is {len(data)} bytes, over the 65536 byte limit",
    )
    assert world.registry.blob_get_count(payload_digest) == 0


def test_lookaside_bounds(fetchd: Fetchd, world: World, trust_dir: Path) -> None:
    """A signature-1 of 1 MiB is refused; one that never comes fails after the stall
    timeout (and a drip would end within the request budget, 4 x --stall-timeout)."""
    repo = "ocisig/bounds-lookaside/app"
    digest = world.push(repo)
    sig = world.lookaside / f"{repo}@{digest.replace(':', '=')}" / "signature-1"
    sig.parent.mkdir(parents=True)
    sig.write_bytes(b"\x90" * (1 << 20))
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/{repo}", world.gpg.signer_key)
    assert_refused(
        fetchd,
        world,
        repo,
        pull(fetchd, trust_dir, world.ref(repo), "--lookaside", world.nginx.url),
        "signature-1 is over the 65536 byte limit",
    )
    with SlowProxy(world.nginx.url) as proxy:
        proxy.hold("signature-1")
        started = time.monotonic()
        result = pull(
            fetchd, trust_dir, world.ref(repo), "--lookaside", proxy.url, "--stall-timeout", "1"
        )
        elapsed = time.monotonic() - started
        proxy.release()
    assert_refused(fetchd, world, repo, result, "signature-1: no data for 1 s")
    assert elapsed < 30, elapsed


@pytest.mark.parametrize("kind", ["rsa-3072", "ed25519"])
def test_rsa_and_ed25519_cosign_keys(
    fetchd: Fetchd, world: World, trust_dir: Path, kind: str
) -> None:
    """containers/image loads RSA (PKCS#1 v1.5, SHA-256) and Ed25519 keys besides ECDSA."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

    repo = f"ocisig/cosign-{kind}/app"
    digest = world.push(repo)
    data = payload(digest, f"{world.registry.host}/{repo}")
    if kind == "ed25519":
        ed = ed25519.Ed25519PrivateKey.generate()
        pub, sig = ed.public_key(), ed.sign(data)
    else:
        key = rsa.generate_private_key(65537, 3072)
        pub, sig = key.public_key(), key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    pem = world.work / f"{kind}.pub"
    pem.write_bytes(
        pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    push_signature(
        world.work, world.registry.host, repo, digest, [(data, base64.b64encode(sig).decode())]
    )
    trust(fetchd, trust_dir, f"docker://{world.registry.host}/{repo}", pem)
    out = ok(pull(fetchd, trust_dir, world.ref(repo)))
    assert_pulled(fetchd, world, repo, digest, out)
