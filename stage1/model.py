"""Frozen values parsed at the edge: digests, descriptors, references, image configs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stage1.errors import Stage1Error, UsageError

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX_DIGITS = frozenset("0123456789abcdef")

DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``sha256:HEX`` (or sha512); raise ValueError for anything else."""
        algorithm, _, hex_ = text.partition(":")
        if len(hex_) != _HEX_LENGTH.get(algorithm, -1) or not _HEX_DIGITS.issuperset(hex_):
            raise ValueError(f"not a digest: {text!r}")
        return cls(algorithm, hex_)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, its digest and its size."""

    media_type: str
    digest: Digest
    size: int
    annotations: tuple[tuple[str, str], ...] = ()
    platform: tuple[str, str, str] | None = None  # (os, architecture, variant)

    @classmethod
    def parse(cls, raw: Any, where: str) -> Descriptor:
        """Parse a descriptor object found in ``where`` (for the error message)."""
        try:
            digest = Digest.parse(raw["digest"])
            size = raw["size"]
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"bad size {size!r}")
            media_type = raw.get("mediaType") or ""
            annotations = raw.get("annotations") or {}
            platform = raw.get("platform")
            plat = None
            if isinstance(platform, dict):
                plat = (
                    str(platform.get("os", "")),
                    str(platform.get("architecture", "")),
                    str(platform.get("variant", "")),
                )
            return cls(
                media_type=str(media_type),
                digest=digest,
                size=size,
                annotations=tuple((str(k), str(v)) for k, v in dict(annotations).items()),
                platform=plat,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise Stage1Error(f"invalid descriptor in {where}: {exc}") from exc

    def annotation(self, key: str) -> str | None:
        for k, v in self.annotations:
            if k == key:
                return v
        return None


@dataclass(frozen=True)
class Reference:
    """What the user typed for ``fetchd pull``, normalised the same way.

    ``name`` is the full reference (``HOST/PATH:TAG`` or ``HOST/PATH@DIGEST``), or None when
    the user gave a bare digest; ``digest`` is set when the reference pins one.
    """

    text: str
    name: str | None
    digest: Digest | None

    @classmethod
    def parse(cls, text: str) -> Reference:
        raw = text.removeprefix("docker://")
        if not raw:
            raise UsageError(f"invalid image reference {text!r}")
        if raw.partition(":")[0] in _HEX_LENGTH:
            return cls(text, None, _parse_digest(raw, text))
        name_part, at, digest_text = raw.partition("@")
        digest = _parse_digest(digest_text, text) if at else None
        tag = ""
        slash = name_part.rfind("/")
        colon = name_part.rfind(":")
        if colon > slash:
            name_part, tag = name_part[:colon], name_part[colon + 1 :]
            if not tag:
                raise UsageError(f"invalid image reference {text!r}: empty tag")
        first, sep, rest = name_part.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost"):
            host, path = first, rest
        else:
            host, path = DOCKER_HUB, name_part
        if host == DOCKER_HUB and "/" not in path:
            path = "library/" + path
        if not path or path.startswith("/") or path.endswith("/") or "//" in path:
            raise UsageError(f"invalid image reference {text!r}")
        if not tag and digest is None:
            tag = "latest"
        name = f"{host}/{path}"
        if tag:
            name += f":{tag}"
        if digest is not None:
            name += f"@{digest}"
        return cls(text, name, digest)

    def candidates(self) -> tuple[str, ...]:
        """Index annotations (``org.opencontainers.image.ref.name``) that name this image."""
        names = [self.name] if self.name else []
        raw = self.text.removeprefix("docker://")
        if raw not in names:
            names.append(raw)
        if self.name and self.digest is not None:
            base = self.name.partition("@")[0]
            if base.rfind(":") > base.rfind("/"):
                # HOST/PATH:TAG@DIGEST may have been recorded without its tag.
                names.append(f"{base.rpartition(':')[0]}@{self.digest}")
        return tuple(names)


def _parse_digest(text: str, ref: str) -> Digest:
    try:
        return Digest.parse(text)
    except ValueError:
        raise UsageError(f"invalid digest in image reference {ref!r}") from None


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config (``config`` object) that decide the process."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""

    @classmethod
    def parse(cls, raw: Any, where: str) -> ImageConfig:
        try:
            config = raw.get("config") or {}
            return cls(
                entrypoint=_strings(config.get("Entrypoint")),
                cmd=_strings(config.get("Cmd")),
                env=_strings(config.get("Env")),
                working_dir=str(config.get("WorkingDir") or ""),
                user=str(config.get("User") or ""),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            raise Stage1Error(f"invalid image config {where}: {exc}") from exc


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Image:
    """A runnable image: the manifest chosen for this machine, its layers and its config."""

    ref: str
    manifest: Digest
    layers: tuple[Descriptor, ...]
    config: ImageConfig
