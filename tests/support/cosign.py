"""cosign-format image signatures for tests, made with `cryptography` alone (as in
../shared/peers/oci-signatures.sh: Debian's skopeo has sigstore signing patched out and
cosign is not packaged).

A :class:`CosignKey` is an ECDSA P-256 key pair (cosign's), its public key written as a PEM
SubjectPublicKeyInfo (what ``fetchd trust --prefix docker://… KEY.pub`` takes).
:func:`push_signature` builds a small OCI layout whose one image manifest has the payload as
its layer (media type ``application/vnd.dev.cosign.simplesigning.v1+json``, the base64
signature in the annotation ``dev.cosignproject.cosign/signature``) and copies it with
``skopeo copy --preserve-digests`` to ``REPO:sha256-<hex>.sig``, the tag cosign and
containers/image use. The payload is cosign's: ``critical`` = identity (the repository,
no tag), image (the manifest digest), type "cosign container image signature".
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .images import skopeo

PAYLOAD_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


@dataclass(frozen=True)
class CosignKey:
    private: ec.EllipticCurvePrivateKey
    #: the public key, PEM (SubjectPublicKeyInfo)
    pub: Path

    @classmethod
    def generate(cls, path: Path) -> CosignKey:
        """A new P-256 key pair; the public key is written to ``path``."""
        key = ec.generate_private_key(ec.SECP256R1())
        path.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        return cls(key, path)

    def sign(self, payload: bytes) -> str:
        """The base64 ECDSA/SHA-256 signature of the exact payload bytes (cosign's)."""
        return base64.b64encode(self.private.sign(payload, ec.ECDSA(hashes.SHA256()))).decode()


def payload(digest: str, reference: str, kind: str = "cosign container image signature") -> bytes:
    """cosign's simple-signing payload for ``digest`` ("sha256:…") as ``reference``."""
    doc = {
        "critical": {
            "identity": {"docker-reference": reference},
            "image": {"docker-manifest-digest": digest},
            "type": kind,
        },
        "optional": None,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def signature_tag(digest: str) -> str:
    return digest.replace(":", "-", 1) + ".sig"


def push_signature(
    workdir: Path,
    registry_host: str,
    repo: str,
    digest: str,
    layers: list[tuple[bytes, str]],
) -> str:
    """Push ``REPO:sha256-<hex>.sig`` for ``digest`` with ``layers``: (payload, base64
    signature) each. Returns the attachment manifest's digest."""
    layout = workdir / f"cosign-{len(list(workdir.glob('cosign-*')))}"
    layout.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    diff_ids = ["sha256:" + hashlib.sha256(p).hexdigest() for p, _ in layers]
    config = json.dumps(
        {
            "architecture": "",
            "os": "",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **_blob(layout, config)},
        "layers": [
            {
                "mediaType": PAYLOAD_MEDIA_TYPE,
                **_blob(layout, p),
                "annotations": {SIGNATURE_ANNOTATION: sig},
            }
            for p, sig in layers
        ],
    }
    desc = {"mediaType": OCI_MANIFEST, **_blob(layout, json.dumps(manifest).encode())}
    tag = signature_tag(digest)
    index = {
        "schemaVersion": 2,
        "manifests": [desc | {"annotations": {"org.opencontainers.image.ref.name": tag}}],
    }
    (layout / "index.json").write_text(json.dumps(index))
    skopeo(
        "copy",
        "--quiet",
        "--dest-tls-verify=false",
        "--preserve-digests",
        f"oci:{layout}:{tag}",
        f"docker://{registry_host}/{repo}:{tag}",
    )
    return str(desc["digest"])


def sign_and_push(
    workdir: Path,
    registry_host: str,
    repo: str,
    digest: str,
    key: CosignKey,
    reference: str | None = None,
) -> str:
    """cosign's signature of ``digest`` by ``key`` (identity ``reference``, default
    ``HOST/REPO``), pushed to ``REPO:sha256-<hex>.sig``."""
    data = payload(digest, reference or f"{registry_host}/{repo}")
    return push_signature(workdir, registry_host, repo, digest, [(data, key.sign(data))])
