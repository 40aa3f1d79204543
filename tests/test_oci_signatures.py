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

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import REPO, Fetchd, assert_stored, failed, ok
from tests.support.cosign import CosignKey, payload, push_signature, sign_and_push
from tests.support.images import (
    BuiltImage,
    File,
    Layer,
    build_image,
    push,
    registry_manifest_digest,
    skopeo,
)
from tests.support.nginx import Nginx, start_nginx
from tests.support.registry import Registry

HTTP = ("--insecure-options", "http")


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
        push(self.images, which, f"{self.registry.host}/{repo}:1")
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
    }
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
    if not (REPO / "fetchd" / "trust" / "command.py").exists():  # TEMPORARY until A's lands
        from fetchd.trust.keystore import Keystore, oci_prefix

        Keystore(trust_dir, None).add_oci(key.read_bytes(), *oci_prefix(prefix))
        return
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


def assert_pulled(fetchd: Fetchd, world: World, repo: str, digest: str, result: str) -> None:
    assert digest in result
    entry = fetchd.entry(f"{world.registry.host}/{repo}:1")
    assert entry["digest"] == digest
    for layer in world.built["one"].layers:
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
