"""Parsing manifests and indexes (OCI image spec, Docker schema 2) into values.

Parsing is strict about structure (every descriptor must parse, digests must use a
supported algorithm, sizes must be integers) and lenient where real tools are: umoci
writes OCI manifests without a top-level ``mediaType``, so the type is inferred.
Digest verification of the manifest bytes is the caller's job (the registry source).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fetchd.errors import ManifestInvalid, PlatformNotFound, UnsupportedMediaType
from fetchd.model import (
    DOCKER_CONFIG,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    LAYER_TYPES,
    MANIFEST_TYPES,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Platform,
    load_json,
)


@dataclass(frozen=True, slots=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]

    def blobs(self) -> tuple[Descriptor, ...]:
        return (self.config, *self.layers)


@dataclass(frozen=True, slots=True)
class ImageIndex:
    media_type: str
    manifests: tuple[Descriptor, ...]

    def select(self, platform: Platform, where: str) -> Descriptor:
        """The manifest that suits ``platform`` best (containerd's ``Only``: its own
        platform first, then what it also runs); the first of equals, as in the index."""
        best: tuple[int, Descriptor] | None = None
        for d in self.manifests:
            rank = platform.rank(d.platform) if d.media_type in MANIFEST_TYPES else None
            if rank is not None and (best is None or rank < best[0]):
                best = (rank, d)
        if best is not None:
            return best[1]
        raise PlatformNotFound(
            f"{where} has no image for {platform} (it has: {self.listed() or 'none'}); "
            "choose one with --platform"
        )

    def platforms(self) -> tuple[Descriptor, ...]:
        """The image manifests for a real platform (not attestations: os "unknown")."""
        return tuple(
            d
            for d in self.manifests
            if d.media_type in MANIFEST_TYPES
            and (p := Platform.from_json(d.platform)) is not None
            and p.os != "unknown"
        )

    def listed(self) -> str:
        """The platforms the index names, for an error line (bounded)."""
        have = sorted(
            {
                _printable(
                    "/".join(
                        str(v)
                        for v in (
                            d.platform.get("os"),
                            d.platform.get("architecture"),
                            d.platform.get("variant"),
                        )
                        if v
                    )
                )
                for d in self.manifests
                if d.platform
            }
        )
        return ", ".join(have[:MAX_LISTED]) + (", …" if len(have) > MAX_LISTED else "")


#: platforms named at most in an error (an index may list thousands)
MAX_LISTED = 20


def _printable(text: str, limit: int = 60) -> str:
    """A peer's string fit for a one-line error: control characters out, length bounded."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return clean + ("…" if len(text) > limit else "")


def _shown(value: object, limit: int = 80) -> str:
    """``repr`` of a peer's value, bounded (a 4 MiB media type must not become the error)."""
    text = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    return text[:limit] + ("…" if len(text) > limit else "")


def _load(raw: bytes, where: str) -> dict[str, Any]:
    doc = load_json(raw, f"{where}: the manifest")
    if not isinstance(doc, dict):
        raise ManifestInvalid(f"{where}: the manifest is not a JSON object")
    if doc.get("schemaVersion") != 2:
        raise UnsupportedMediaType(
            f"{where}: manifest schemaVersion {_shown(doc.get('schemaVersion'))} is not supported "
            "(only schema 2: OCI and Docker v2s2)"
        )
    return doc


def media_type_of(doc: dict[str, Any], content_type: str | None) -> str:
    """The manifest's media type: its own field, else the Content-Type, else by shape."""
    mt = doc.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    ct = (content_type or "").split(";")[0].strip()
    if ct in INDEX_TYPES or ct in MANIFEST_TYPES:
        return ct
    if "manifests" in doc:
        return OCI_INDEX
    return OCI_MANIFEST


def parse_manifest(raw: bytes, content_type: str | None, where: str) -> ImageManifest | ImageIndex:
    doc = _load(raw, where)
    mt = media_type_of(doc, content_type)
    if mt in INDEX_TYPES:
        ms = doc.get("manifests")
        if not isinstance(ms, list):
            raise ManifestInvalid(f"{where}: an index needs a 'manifests' list")
        return ImageIndex(
            mt, tuple(Descriptor.from_json(m, f"{where} manifests[{i}]") for i, m in enumerate(ms))
        )
    if mt in MANIFEST_TYPES:
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ManifestInvalid(f"{where}: a manifest needs a 'layers' list")
        config = Descriptor.from_json(doc.get("config"), f"{where} config")
        descs = tuple(Descriptor.from_json(x, f"{where} layers[{i}]") for i, x in enumerate(layers))
        for d in descs:
            if d.media_type not in LAYER_TYPES:
                raise UnsupportedMediaType(
                    f"{where}: layer {d.digest.short} has media type {_shown(d.media_type)}, "
                    "which fetchd cannot unpack"
                )
        return ImageManifest(mt, config, descs)
    raise UnsupportedMediaType(f"{where}: manifest media type {_shown(mt)} is not supported")


_DOCKER_TO_OCI_LAYER = {
    "application/vnd.docker.image.rootfs.diff.tar.gzip": (
        "application/vnd.oci.image.layer.v1.tar+gzip"
    ),
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
    ),
}


def docker_to_oci(raw: bytes) -> bytes:
    """The OCI form of a Docker schema 2 manifest, as ``skopeo copy … oci:`` writes it.

    Only media types change; config and layer blobs (and so their digests) stay. The
    OCI layout needs it: skopeo's and umoci's layout readers ignore Docker media types.
    """
    doc = load_json(raw, "the Docker manifest")
    if not isinstance(doc, dict) or media_type_of(doc, None) != DOCKER_MANIFEST:
        raise ManifestInvalid("only Docker schema 2 manifests can be converted")
    config, layers = doc.get("config"), doc.get("layers")
    if not (
        isinstance(config, dict)
        and isinstance(layers, list)
        and all(isinstance(layer, dict) for layer in layers)
    ):
        raise ManifestInvalid("the Docker manifest needs a config object and a layers list")
    doc["mediaType"] = OCI_MANIFEST
    if config.get("mediaType") == DOCKER_CONFIG:
        config["mediaType"] = OCI_CONFIG
    for layer in layers:
        mt = layer.get("mediaType")
        if isinstance(mt, str) and mt in _DOCKER_TO_OCI_LAYER:
            layer["mediaType"] = _DOCKER_TO_OCI_LAYER[mt]
    try:
        return json.dumps(doc, separators=(",", ":")).encode()
    except RecursionError:  # deep unknown fields the decoder only just managed
        raise ManifestInvalid("the Docker manifest is JSON nested too deeply") from None
