"""Frozen values parsed at the edge: digests, descriptors, references, image configs."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from stage1.errors import InvalidImageConfig, Stage1Error, UsageError

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX_DIGITS = frozenset("0123456789abcdef")
_MAX_SIZE = 2**63 - 1  # OCI sizes are int64
# What execve(2) takes (Linux): a string of at most MAX_ARG_STRLEN bytes with its NUL, and
# argv and the environment together a quarter of the stack limit (8 MiB by default). The
# image's share is bounded here, so a hostile config gets a clear error, not E2BIG.
_MAX_STRING = 128 * 1024 - 1
_MAX_STRINGS_BYTES = 1 << 20
_MAX_PATH = 4095  # PATH_MAX without the NUL

DOCKER_HUB = "docker.io"


@dataclass(frozen=True)
class Digest:
    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        """Parse ``sha256:HEX`` (or sha512); raise ValueError for anything else."""
        if not isinstance(text, str):
            raise ValueError(f"not a digest: a {type(text).__name__}")
        algorithm, _, hex_ = text.partition(":")
        if len(hex_) != _HEX_LENGTH.get(algorithm, -1) or not _HEX_DIGITS.issuperset(hex_):
            raise ValueError(f"not a digest: {_quote(text)}")
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
            if not isinstance(raw, dict):
                raise ValueError(f"a {type(raw).__name__}, not an object")
            if "digest" not in raw or "size" not in raw:
                raise ValueError("no digest or size")
            digest = Digest.parse(raw["digest"])
            size = raw["size"]
            if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= _MAX_SIZE:
                raise ValueError(f"bad size {_quote(size)}")
            media_type = _text(raw.get("mediaType"), "mediaType")
            annotations = raw.get("annotations") or {}
            if not isinstance(annotations, dict):
                raise ValueError("annotations is not an object")
            platform = raw.get("platform")
            plat = None
            if isinstance(platform, dict):
                plat = (
                    _text(platform.get("os"), "platform.os"),
                    _text(platform.get("architecture"), "platform.architecture"),
                    _text(platform.get("variant"), "platform.variant"),
                )
            return cls(
                media_type=media_type,
                digest=digest,
                size=size,
                annotations=tuple(
                    (k, _text(v, f"annotation {_quote(k)}")) for k, v in annotations.items()
                ),
                platform=plat,
            )
        except ValueError as exc:
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
        if raw == text and "," in text:
            # An appc name with labels (example.com/app,version=1.0): stage1.appc reads it;
            # its label values may hold what a registry reference may not.
            return cls(text, text, None)
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

    def pull_hint(self) -> str:
        """The fetchd command that stores this image: ``docker://`` and the full name,
        which ``fetchd pull`` accepts (rkt's convention; a bare name would be appc's)."""
        if self.name:
            return f"fetchd pull docker://{self.name}"
        return f"fetchd pull docker://HOST/NAME@{self.digest}"

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
        """The config object of RAW (a parsed config blob, read for WHERE, which the error
        names); raise InvalidImageConfig for what execve(2) or stage1 could not honour: a field of
        the wrong type, a NUL byte, an Env entry not NAME=VALUE, a string or list too long.
        """
        try:
            if not isinstance(raw, dict):
                raise ValueError(f"it is a {type(raw).__name__}, not an object")
            config = raw.get("config")
            if config is None:
                config = {}
            if not isinstance(config, dict):
                raise ValueError("config is not an object")
            env = _strings(config.get("Env"), "Env")
            for entry in env:
                name, eq, _ = entry.partition("=")
                if not name or not eq:
                    raise ValueError(f"Env entry {_quote(entry)} is not NAME=VALUE")
            working_dir = _text(config.get("WorkingDir"), "WorkingDir")
            if _size(working_dir, "WorkingDir") > _MAX_PATH:
                raise ValueError(f"WorkingDir is longer than {_MAX_PATH} bytes")
            user = _text(config.get("User"), "User")
            if _size(user, "User") > _MAX_PATH:
                raise ValueError(f"User is longer than {_MAX_PATH} bytes")
            return cls(
                entrypoint=_strings(config.get("Entrypoint"), "Entrypoint"),
                cmd=_strings(config.get("Cmd"), "Cmd"),
                env=env,
                working_dir=working_dir,
                user=user,
            )
        except ValueError as exc:
            raise InvalidImageConfig(f"{exc} (the config of {where})") from exc


def _quote(value: Any, limit: int = 60) -> str:
    """VALUE for an error message: a short repr of a string or number, else its type."""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        text = repr(value[: limit + 1] if isinstance(value, str) else value)
        return text if len(text) <= limit + 2 else text[:limit] + "..."
    return f"a {type(value).__name__}"


def _text(value: Any, what: str) -> str:
    """A string field (absent or null: empty) without NUL bytes; else ValueError."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{what} is {_quote(value)}, not a string")
    if "\0" in value:
        raise ValueError(f"{what} {_quote(value)} has a NUL byte")
    return value


def _size(text: str, what: str) -> int:
    """The length of TEXT as the bytes a system call gets (ValueError if it has none)."""
    try:
        return len(os.fsencode(text))
    except UnicodeEncodeError:
        raise ValueError(f"{what} {_quote(text)} is not valid text") from None


def _strings(value: Any, what: str) -> tuple[str, ...]:
    """A list of strings (absent or null: empty) that execve(2) can take; else ValueError."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"{what} is {_quote(value)}, not a list of strings")
    total = 0
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"{what} has {_quote(item)}, not a string")
        if "\0" in item:
            raise ValueError(f"{what} entry {_quote(item)} has a NUL byte")
        size = _size(item, what) + 1
        if size > _MAX_STRING + 1:
            raise ValueError(f"{what} has an entry longer than {_MAX_STRING} bytes")
        total += size + 8  # and its pointer
        if total > _MAX_STRINGS_BYTES:
            raise ValueError(f"{what} is larger than {_MAX_STRINGS_BYTES} bytes in all")
    return tuple(value)


@dataclass(frozen=True)
class Image:
    """A runnable image: the manifest chosen for this machine, its layers and its config."""

    ref: str
    manifest: Digest
    layers: tuple[Descriptor, ...]
    config: ImageConfig
