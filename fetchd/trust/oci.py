"""Trusted publishers of OCI images (issue 13, beyond rkt): a registry name in a trusted
prefix pulls only with a signature, by a key trusted for it, over the digest its tag
resolved to.

``fetchd trust --prefix docker://HOST[:PORT]/REPO KEY`` puts keys under the keystore's
``oci.d`` (:meth:`fetchd.trust.keystore.Keystore.add_oci`): cosign public keys (PEM) and
OpenPGP certificates. :func:`check_publisher` runs in the pull after the tag is resolved
at the authority and before any blob is asked for. It looks, in order, for

* a **cosign attachment**: the tag ``sha256-<hex>.sig`` in the same repository (fetched
  through fetchd's registry client: its auth, TLS, retries and bounds), an OCI (or Docker)
  image manifest of at most 4 MiB whose layers (at most 16) are payloads of at most
  64 KiB, each with its base64 signature in the annotation
  ``dev.cosignproject.cosign/signature``, made by a trusted PEM key (ECDSA with SHA-256,
  as cosign and containers/image sign; RSA PKCS#1 v1.5 with SHA-256, at least 2048 bits;
  Ed25519), with ``critical.type`` "cosign container image signature";
* containers/image **simple signing** in a lookaside store (``--lookaside URL``, as
  registries.d's ``lookaside:``): ``URL/REPO@sha256=<hex>/signature-N`` for N = 1, 2, … up
  to 16, stopping at the first that is missing; each an OpenPGP signed message (at most
  64 KiB) by a trusted OpenPGP key (:func:`fetchd.trust.openpgp.verify_inline`, which
  applies the key policy) wrapping a payload of type "atomic container signature".

A payload counts only if it is strict JSON (no duplicate keys; ``critical`` holding exactly
``type``, ``image`` and ``identity``), names exactly the digest that was resolved, and names
this repository: cosign writes the repository (``HOST/REPO``, docker.io and
index.docker.io taken as one); a simple signature follows containers/image's default
``matchRepoDigestOrExact``: for a tag, the reference must be ``HOST/REPO:TAG`` itself; for
a by-digest pull, the same repository. The first payload that passes is enough.

A name under no trusted prefix behaves as before (TLS is the authority); with
``--insecure-options image`` the check is skipped with a warning. Otherwise no valid
signature is :class:`~fetchd.errors.NotTrusted`, one line naming each place looked and
why it did not count; the pull has then fetched no blob and stored nothing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from fetchd.errors import (
    FetchdError,
    ManifestNotFound,
    NotTrusted,
    SignatureInvalid,
    SizeMismatch,
    TransferFailed,
    UsageError,
)
from fetchd.model import DOCKER_HUB, Descriptor, Digest, Reference, load_json, unique_keys
from fetchd.sources.http import redact, translate

if TYPE_CHECKING:
    from fetchd.config import Config
    from fetchd.engine.pull import Engine
    from fetchd.sources.registry import Registry
    from fetchd.trust.openpgp import KeyInfo

log = logging.getLogger(__name__)

SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
COSIGN_PAYLOAD_MEDIA_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
COSIGN_TYPE = "cosign container image signature"
ATOMIC_TYPE = "atomic container signature"
#: payload layers of one cosign attachment that are looked at
MAX_SIGNATURE_LAYERS = 16
#: bytes of one payload (cosign) or one signed message (lookaside)
MAX_PAYLOAD = 64 * 1024
#: lookaside ``signature-N`` tried per image
MAX_LOOKASIDE = 16
#: redirects a lookaside request may follow
MAX_REDIRECTS = 5
#: RSA cosign keys below this are refused (as the OpenPGP policy)
MIN_RSA_BITS = 2048
_DOCKER_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io", DOCKER_HUB}


async def check_publisher(
    engine: Engine, ref: Reference, digest: Digest, registry: Registry
) -> str | None:
    """Check that ``digest`` (what ``ref`` resolved to) is signed by a publisher trusted
    for ``ref``'s repository. ``registry`` is the one that resolved it (the cosign
    attachment is asked of it). Returns None when no key is trusted for the repository
    or a parent path (or ``--insecure-options image``), else who signed; raises
    :class:`~fetchd.errors.NotTrusted` when nothing valid was found."""
    from fetchd.trust.keystore import Keystore

    config = engine.config
    keystore = Keystore.default(config.trust_dir)
    pgp_keys, pems = await asyncio.to_thread(keystore.oci_keys_for, ref.host, ref.name)
    if not pgp_keys and not pems:
        return None
    image = f"docker://{ref}"
    if "image" in config.insecure:
        log.warning(
            "%s: its publisher's signature is not checked (--insecure-options image), "
            "although keys are trusted for %s",
            image,
            ref.repository,
        )
        return None
    looked: list[str] = []
    if pems:
        keys = [_cosign_key(pem) for pem in pems]
        found = await _check_cosign(engine, ref, digest, registry, keys, looked)
        if found:
            log.info("%s: signature verified: %s", image, found)
            return found
    if pgp_keys:
        if config.lookaside is None:
            looked.append(
                "no lookaside for simple signatures: OpenPGP keys are trusted, pass --lookaside URL"
            )
        else:
            found = await _check_lookaside(engine, ref, digest, pgp_keys, looked)
            if found:
                log.info("%s: signature verified: %s", image, found)
                return found
    raise NotTrusted(
        f"{image} is not signed by a key trusted for {ref.repository} (looked for "
        f"{'; '.join(looked)}); have its publisher sign {digest.short}…, or trust the key "
        f"that signed it: fetchd trust --prefix docker://{ref.repository} KEY"
    )


# --- cosign -------------------------------------------------------------------------


@dataclass(frozen=True)
class CosignKey:
    """A trusted cosign public key: ``name`` is ``cosign-<sha256 of the SPKI DER>``."""

    name: str
    key: Any  # a cryptography public key


def _cosign_key(pem: bytes) -> CosignKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise SignatureInvalid(f"a trusted cosign key is not a PEM public key ({exc})") from None
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    name = f"cosign-{hashlib.sha256(der).hexdigest()}"
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise SignatureInvalid(
            f"trusted cosign key {name[:23]}… is RSA-{key.key_size}, weaker than "
            f"RSA-{MIN_RSA_BITS}; remove it"
        )
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise SignatureInvalid(
            f"trusted cosign key {name[:23]}… is a {type(key).__name__}; fetchd verifies "
            "ECDSA, RSA and Ed25519 keys"
        )
    return CosignKey(name, key)


def _verifies(key: CosignKey, signature: bytes, payload: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    try:
        if isinstance(key.key, ec.EllipticCurvePublicKey):
            key.key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key.key, rsa.RSAPublicKey):
            key.key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.key.verify(signature, payload)
    except (InvalidSignature, ValueError):
        return False
    return True


def attachment_tag(digest: Digest) -> str:
    """cosign's (and containers/image's) tag of ``digest``'s signatures."""
    return f"{digest.algorithm}-{digest.hex}.sig"


async def _check_cosign(
    engine: Engine,
    ref: Reference,
    digest: Digest,
    registry: Registry,
    keys: Sequence[CosignKey],
    looked: list[str],
) -> str | None:
    tag = attachment_tag(digest)
    where = f"{ref.name}:{digest.algorithm}-{digest.hex[:12]}….sig"
    try:
        raw, _, _ = await registry.manifest(Reference(ref.host, ref.name, tag, None))
    except ManifestNotFound:
        looked.append(f"{where}: not found")
        return None
    except FetchdError as exc:
        looked.append(f"{where}: {exc}")
        return None
    try:
        layers = _signature_layers(raw, where)
    except SignatureInvalid as exc:
        looked.append(str(exc))
        return None
    why: list[str] = []
    for n, (desc, signature) in enumerate(layers, 1):
        what = f"{where} layer {n}"
        try:
            payload = await _payload_blob(engine, registry, ref, desc, what)
        except FetchdError as exc:
            why.append(str(exc))
            continue
        signer = next((k for k in keys if _verifies(k, signature, payload)), None)
        if signer is None:
            why.append(f"layer {n} is not signed by a trusted cosign key")
            continue
        problem = _claims_problem(payload, COSIGN_TYPE, ref, digest, exact=False)
        if problem:
            why.append(f"layer {n} {problem}")
            continue
        return f"cosign key {signer.name[:23]}…"
    looked.append(f"{where}: {'; '.join(dict.fromkeys(why)) or 'no signature layer'}")
    return None


def _signature_layers(raw: bytes, where: str) -> list[tuple[Descriptor, bytes]]:
    """The payload layers of a cosign attachment: (descriptor, signature bytes)."""
    doc = load_json(raw, where, SignatureInvalid)
    layers = doc.get("layers") if isinstance(doc, dict) else None
    if not isinstance(layers, list):
        raise SignatureInvalid(f"{where}: not an image manifest with layers")
    if len(layers) > MAX_SIGNATURE_LAYERS:
        raise SignatureInvalid(
            f"{where}: lists {len(layers)} layers, more than the {MAX_SIGNATURE_LAYERS} "
            "fetchd reads"
        )
    out = []
    for n, obj in enumerate(layers, 1):
        try:
            desc = Descriptor.from_json(obj, f"{where} layer {n}")
        except FetchdError:
            continue
        text = desc.annotations.get(SIGNATURE_ANNOTATION)
        if desc.media_type != COSIGN_PAYLOAD_MEDIA_TYPE or text is None:
            continue
        if desc.size > MAX_PAYLOAD:
            raise SignatureInvalid(
                f"{where}: layer {n} is {desc.size} bytes, over the {MAX_PAYLOAD} byte limit"
            )
        try:
            signature = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            continue
        out.append((desc, signature))
    if not out:
        raise SignatureInvalid(f"{where}: has no {COSIGN_PAYLOAD_MEDIA_TYPE} signature layer")
    return out


class _MemorySink:
    """A :class:`~fetchd.sources.base.Sink` in memory, for one small blob (a payload)."""

    def __init__(self, size: int, what: str) -> None:
        self.size: int | None = size
        self.offset = 0
        self.data_path = Path(os.devnull)  # no writer of its own ever writes here
        self.write_lock = contextlib.nullcontext()  # nor does anyone else
        self.meta: dict[str, Any] = {}
        self._what = what
        self._limit = size
        self._data = bytearray()

    def gaps(self) -> list[tuple[int, int]]:
        return [(self.offset, self._limit)] if self.offset < self._limit else []

    async def write_at(self, offset: int, pieces: Sequence[bytes]) -> None:
        n = sum(len(p) for p in pieces)
        if offset != self.offset or offset + n > self._limit:
            got = offset + n
            await self.restart()
            raise SizeMismatch(self._what, self._limit, got)
        for piece in pieces:
            self._data += piece
        self.offset += n

    def hashes_at(self, offset: int) -> bool:
        return False

    def record(
        self, offset: int, n: int, pieces: Sequence[bytes | memoryview] | None = None
    ) -> None:
        raise TransferFailed(f"{self._what}: only a registry's GET can fill this")

    async def restart(self) -> None:
        self._data.clear()
        self.offset = 0

    def data(self) -> bytes:
        return bytes(self._data)


async def _payload_blob(
    engine: Engine, registry: Registry, ref: Reference, desc: Descriptor, what: str
) -> bytes:
    sink = _MemorySink(desc.size, what)
    budget = asyncio.timeout(engine.config.request_budget)
    try:
        async with budget:
            await registry.blobs(ref.name).fetch(desc, sink, lambda n: None)
    except TimeoutError as exc:
        if not budget.expired():  # a stall (aiohttp's read timeout is a TimeoutError)
            raise translate(exc, what, engine.config) from exc
        raise TransferFailed(
            f"{what}: not complete within {engine.config.request_budget:g} s"
        ) from None
    data = sink.data()
    if Digest.of(data, desc.digest.algorithm) != desc.digest or len(data) != desc.size:
        raise SignatureInvalid(f"{what}: the payload does not match its digest")
    return data


# --- simple signing (lookaside) --------------------------------------------------------


def lookaside_url(base: str, ref: Reference, digest: Digest, n: int) -> str:
    """containers/image's ``lookasideStorageURL``: ``BASE/REPO@ALG=HEX/signature-N``."""
    return f"{base.rstrip('/')}/{ref.name}@{digest.algorithm}={digest.hex}/signature-{n}"


async def _check_lookaside(
    engine: Engine,
    ref: Reference,
    digest: Digest,
    keys: Sequence[KeyInfo],
    looked: list[str],
) -> str | None:
    from fetchd.trust import openpgp

    config = engine.config
    base = config.lookaside or ""
    scheme = urlsplit(base).scheme
    if scheme not in ("http", "https", "file"):
        raise UsageError(f"--lookaside {redact(base)} is not an http(s):// or file:// URL")
    why: list[str] = []
    shown = f"{redact(base).rstrip('/')}/{ref.name}@{digest.algorithm}={digest.hex[:12]}…"
    for n in range(1, MAX_LOOKASIDE + 1):
        url = lookaside_url(base, ref, digest, n)
        what = f"signature-{n}"
        try:
            signed = await _get_bounded(engine, url, what, config)
        except FetchdError as exc:
            why.append(str(exc))
            break
        if signed is None:
            if n == 1:
                why.append("signature-1: not found")
            break
        try:
            payload, verified = await asyncio.to_thread(openpgp.verify_inline, signed, keys, what)
        except FetchdError as exc:
            why.append(str(exc))
            continue
        problem = _claims_problem(payload, ATOMIC_TYPE, ref, digest, exact=ref.digest is None)
        if problem:
            why.append(f"signature-{n} {problem}")
            continue
        key = next((k for k in keys if k.fingerprint == verified.primary), None)
        who = key.user_ids[0] if key and key.user_ids else "OpenPGP key"
        return f"{who} ({openpgp.display_fingerprint(verified.primary)})"
    looked.append(f"{shown}/signature-N: {'; '.join(dict.fromkeys(why))}")
    return None


async def _get_bounded(engine: Engine, url: str, what: str, config: Config) -> bytes | None:
    """The body of ``url`` (at most MAX_PAYLOAD bytes), or None if it does not exist."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        return await asyncio.to_thread(_read_file, Path(unquote(parts.path)), what)
    import aiohttp

    budget = asyncio.timeout(config.request_budget)
    try:
        async with budget, engine.session().get(url, max_redirects=MAX_REDIRECTS) as resp:
            if resp.status == 404:
                return None
            if resp.status != 200:
                raise TransferFailed(f"{what}: {redact(url)} answered HTTP {resp.status}")
            return await _read_body(resp, what)
    except TimeoutError as exc:
        if not budget.expired():  # a stall (aiohttp's read timeout is a TimeoutError)
            raise translate(exc, what, config) from exc
        raise TransferFailed(f"{what}: not complete within {config.request_budget:g} s") from None
    except aiohttp.TooManyRedirects:
        raise TransferFailed(f"{what}: more than {MAX_REDIRECTS} redirects") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise translate(exc, what, config) from exc


async def _read_body(resp: Any, what: str) -> bytes:
    if resp.content_length is not None and resp.content_length > MAX_PAYLOAD:
        raise SignatureInvalid(f"{what} is over the {MAX_PAYLOAD} byte limit")
    pieces: list[bytes] = []
    got = 0
    while True:
        more = await resp.content.read(MAX_PAYLOAD + 1 - got)
        if not more:
            return b"".join(pieces)
        pieces.append(more)
        got += len(more)
        if got > MAX_PAYLOAD:
            raise SignatureInvalid(f"{what} is over the {MAX_PAYLOAD} byte limit")


def _read_file(path: Path, what: str) -> bytes | None:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_PAYLOAD + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TransferFailed(f"{what}: {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_PAYLOAD:
        raise SignatureInvalid(f"{what} is over the {MAX_PAYLOAD} byte limit")
    return data


# --- payloads -------------------------------------------------------------------------


def _claims_problem(
    payload: bytes, kind: str, ref: Reference, digest: Digest, *, exact: bool
) -> str | None:
    """Why a verified payload does not vouch for ``digest`` as ``ref``, or None if it does.
    ``exact``: the reference must be ``HOST/REPO:TAG`` (a tag pull, simple signing)."""
    try:
        doc = json.loads(payload.decode("utf-8"), object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as exc:
        return f"is not a strict JSON payload ({str(exc)[:80]})"
    crit = doc.get("critical") if isinstance(doc, dict) else None
    if not isinstance(crit, dict) or set(crit) != {"type", "image", "identity"}:
        return "has no critical section of type, image and identity"
    image, identity = crit["image"], crit["identity"]
    if crit["type"] != kind:
        return f"is of type {str(crit['type'])[:60]!r}, not {kind!r}"
    if not (
        isinstance(image, dict)
        and set(image) == {"docker-manifest-digest"}
        and isinstance(image["docker-manifest-digest"], str)
    ):
        return "names no docker-manifest-digest"
    if not (
        isinstance(identity, dict)
        and set(identity) == {"docker-reference"}
        and isinstance(identity["docker-reference"], str)
    ):
        return "names no docker-reference"
    signed = image["docker-manifest-digest"]
    if signed != str(digest):
        return f"is a signature of {signed[:19]}…, not of {digest.short}…"
    text = identity["docker-reference"]
    if not _identity_matches(text, ref, exact=exact):
        want = f"{ref.repository}:{ref.tag}" if exact else ref.repository
        return f"is a signature for {text[:120]}, not for {want}"
    return None


def _identity_matches(text: str, ref: Reference, *, exact: bool) -> bool:
    try:
        signed = Reference.parse(text)
    except FetchdError:
        return False
    same_repo = _hub(signed.host) == _hub(ref.host) and signed.name == ref.name
    if not exact:
        return same_repo
    last = text.partition("@")[0].rsplit("/", 1)[-1]
    return same_repo and ":" in last and signed.digest is None and signed.tag == ref.tag


def _hub(host: str) -> str:
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host
