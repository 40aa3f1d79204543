"""Values parsed at the edge: Digest, Descriptor, Reference, Platform.

Everything past the CLI and the network parsers works with these frozen values, never
with raw strings. Grammars follow the OCI image and distribution specs.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fetchd.errors import DigestInvalid, FetchdError, ManifestInvalid, ReferenceInvalid

# --- media types ---------------------------------------------------------------------

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
#: Accept header for manifests, most preferred first.
MANIFEST_ACCEPT = (OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST)

LAYER_TYPES = frozenset(
    {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        # appc ACIs as signed (issue 13; fetchd.appc.aci.ACI_MEDIA_TYPES): manifest + rootfs/
        "application/vnd.fetchd.appc.aci.v1.tar",
        "application/vnd.fetchd.appc.aci.v1.tar+gzip",
        "application/vnd.fetchd.appc.aci.v1.tar+bzip2",
        "application/vnd.fetchd.appc.aci.v1.tar+xz",
    }
)
NONDISTRIBUTABLE_TYPES = frozenset(
    t for t in LAYER_TYPES if "nondistributable" in t or "foreign" in t
)

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
#: the largest size a descriptor may state (the OCI spec's int64)
MAX_BLOB_SIZE = (1 << 63) - 1

# --- JSON from a peer ----------------------------------------------------------------


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` for documents read "paranoid" (signature payloads, appc
    manifests): a key given twice in one object is an error (ValueError), not the last
    value silently winning, so two readers cannot see two different documents."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {json.dumps(key)} appears twice in one object")
        out[key] = value
    return out


def load_json(raw: bytes, what: str, error: type[FetchdError] = ManifestInvalid) -> Any:
    """``raw`` (UTF-8 JSON, as the OCI specs require) parsed, or ``error`` with one line.

    Every JSON document a peer sends (manifests, indexes, token answers, error bodies,
    tag lists) goes through here, so that malformed, non-UTF-8, absurdly nested (the
    C decoder's recursion limit: ``RecursionError``) or over-long-integer input becomes
    a :class:`FetchdError` and never escapes as a Python exception. Memory is bounded
    by the caller, which never reads more than :data:`MAX_MANIFEST_SIZE` bytes.
    """
    try:
        return json.loads(raw.decode("utf-8"))
    except RecursionError:
        # from None: the chained exception would hold a stack a thousand frames deep
        raise error(f"{what} is JSON nested too deeply to be a real document") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise error(f"{what} is not valid JSON ({reason})") from exc


# --- digests -------------------------------------------------------------------------

_HEX_LEN = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[0-9a-f]+")
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")


@dataclass(frozen=True, slots=True)
class Digest:
    """A content digest, ``algorithm:hex``. Only sha256 and sha512 are accepted."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        # fullmatch, not match with $: "$" also matches before a trailing newline
        m = _DIGEST_RE.fullmatch(text)
        if not m:
            raise DigestInvalid(f"{text[:80]!r} is not a digest (expected sha256:<64 hex>)")
        alg, hexpart = m.group(1), m.group(2)
        want = _HEX_LEN.get(alg)
        if want is None:
            raise DigestInvalid(
                f"digest algorithm {alg[:40]!r} is not supported (only sha256 and sha512)"
            )
        if len(hexpart) != want or not _HEX_RE.fullmatch(hexpart):
            raise DigestInvalid(f"{text[:80]!r} is not a valid {alg} digest")
        return cls(alg, hexpart)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())

    @property
    def short(self) -> str:
        return f"{self.algorithm}:{self.hex[:12]}"

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


# --- platforms -----------------------------------------------------------------------
#
# Matching follows containerd (github.com/containerd/platforms: Normalize, Only): both
# sides are normalised (os lowercased; x86_64 → amd64, aarch64 → arm64, arm64/v8 →
# arm64, amd64/v1 → amd64, arm → arm/v7, ...), and a platform accepts an ordered list
# of platforms: itself first, then what it runs as well (arm/v7 also arm/v6 and arm/v5,
# arm64 also arm/v8…v5, amd64/v3 also amd64/v2 and amd64, amd64 also 386).

_MACHINE_TO_ARCH = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i686": ("386", ""),
    "i386": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "loongarch64": ("loong64", ""),
}

_ARM64_VARIANTS = {  # containerd's arm64variantToVersion: (majors, the minor to start at)
    "v8": ((8,), (0,)),
    **{f"v8.{m}": ((8,), (m,)) for m in range(10)},
    "v9": ((9, 8), (0, 5)),
    **{f"v9.{m}": ((9, 8), (m, min(m + 5, 9))) for m in range(8)},
}
_PLATFORM_PART = re.compile(r"[A-Za-z0-9_.-]+")


def normalize_arch(arch: str, variant: str) -> tuple[str, str]:
    """containerd's ``normalizeArch``."""
    arch, variant = arch.lower(), variant.lower()
    if arch == "i386":
        return "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        return "arm64", {"8": "", "v8": "", "v8.0": "", "9": "v9", "9.0": "v9", "v9.0": "v9"}.get(
            variant, variant
        )
    if arch == "armhf":
        return "arm", "v7"
    if arch == "armel":
        return "arm", "v6"
    if arch == "arm":
        if variant in ("", "7"):
            return "arm", "v7"
        if variant in ("5", "6", "8"):
            return "arm", "v" + variant
    return arch, variant


@dataclass(frozen=True, slots=True)
class Platform:
    """An OS/ARCH[/VARIANT], normalised (containerd's ``Normalize``): compare with ==."""

    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def of(cls, os: str, architecture: str, variant: str | None = None) -> Platform:
        arch, var = normalize_arch(architecture, variant or "")
        return cls("darwin" if os.lower() == "macos" else os.lower(), arch, var or None)

    @classmethod
    def parse(cls, text: str) -> Platform:
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(_PLATFORM_PART.fullmatch(p) for p in parts):
            raise ReferenceInvalid(f"platform {text[:80]!r} is not OS/ARCH[/VARIANT]")
        return cls.of(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | None) -> Platform | None:
        """The OCI ``platform`` object (or an image config's os/architecture/variant)
        as a value; None when it names no OS or no architecture."""
        if not obj:
            return None
        os_, arch, variant = obj.get("os"), obj.get("architecture"), obj.get("variant")
        if not (isinstance(os_, str) and os_ and isinstance(arch, str) and arch):
            return None
        return cls.of(os_, arch, variant if isinstance(variant, str) else None)

    @classmethod
    def host(cls) -> Platform:
        """This machine, as containerd's ``DefaultSpec`` (the variant matters for arm)."""
        machine = _platform.machine().lower()
        arch, variant = _MACHINE_TO_ARCH.get(machine, (machine, ""))
        return cls.of("linux", arch, variant or None)

    def to_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def accepts(self) -> tuple[Platform, ...]:
        """What this platform runs, best first (containerd's ``platformVector``)."""
        if self.architecture == "arm64":
            majors, minors = _ARM64_VARIANTS.get(self.variant or "v8", ((), ()))
            out = [
                Platform.of(self.os, "arm64", f"v{major}.{minor}" if minor else f"v{major}")
                for major, start in zip(majors, minors, strict=True)
                for minor in range(start, -1, -1)
            ]
            if self not in out:  # a variant the table does not know matches itself
                out.insert(0, self)
            arm = "v8" if (self.variant or "v8").startswith(("v8", "v9")) else self.variant
            return (*out, *Platform.of(self.os, "arm", arm).accepts())
        out = [self]
        level = (self.variant or "").removeprefix("v")
        if self.architecture == "amd64":
            if level.isdigit():
                out += [
                    Platform.of(self.os, "amd64", f"v{n}") for n in range(int(level) - 1, 0, -1)
                ]
            out.append(Platform(self.os, "386"))
        elif self.architecture == "arm" and level.isdigit():
            out += [Platform.of(self.os, "arm", f"v{n}") for n in range(int(level) - 1, 4, -1)]
        return tuple(out)

    def rank(self, other: Mapping[str, Any] | None) -> int | None:
        """How well the OCI ``platform`` object ``other`` suits this platform: 0 is best;
        None if it does not run here at all (containerd's ``Only(self)``)."""
        theirs = Platform.from_json(other)
        if theirs is None:
            return None
        try:
            return self.accepts().index(theirs)
        except ValueError:
            return None

    def matches(self, other: Mapping[str, Any] | None) -> bool:
        """True if the OCI ``platform`` object ``other`` satisfies this platform."""
        return self.rank(other) is not None

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def platform_text(obj: Mapping[str, Any] | None) -> str | None:
    """``OS/ARCH[/VARIANT]`` of an OCI ``platform`` object, normalised; None if it has none."""
    plat = Platform.from_json(obj)
    return str(plat) if plat else None


# --- descriptors ---------------------------------------------------------------------

_PLATFORM_STRINGS = ("os", "architecture", "variant", "os.version")
_PLATFORM_LISTS = ("os.features", "features")


def _check_platform(plat: object, where: str) -> None:
    """The OCI ``platform`` object: its fields of the spec have the spec's types."""
    if not isinstance(plat, dict):
        raise ManifestInvalid(f"{where}: platform must be an object")
    for key in _PLATFORM_STRINGS:
        if key in plat and not isinstance(plat[key], str):
            raise ManifestInvalid(f"{where}: platform {key} must be a string")
    for key in _PLATFORM_LISTS:
        value = plat.get(key)
        if value is not None and not (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            raise ManifestInvalid(f"{where}: platform {key} must be a list of strings")


@dataclass(frozen=True, slots=True)
class Descriptor:
    """An OCI content descriptor: what a blob is, how big, and its digest."""

    media_type: str
    digest: Digest
    size: int
    urls: tuple[str, ...] = ()
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Mapping[str, Any] | None = None

    @classmethod
    def from_json(cls, obj: object, where: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise ManifestInvalid(f"{where}: a descriptor must be a JSON object")
        media_type = obj.get("mediaType", "")
        size = obj.get("size")
        digest = obj.get("digest")
        if not isinstance(media_type, str):
            raise ManifestInvalid(f"{where}: mediaType must be a string")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_BLOB_SIZE:
            raise ManifestInvalid(f"{where}: size must be an integer from 0 to 2^63-1")
        if not isinstance(digest, str):
            raise ManifestInvalid(f"{where}: digest must be a string")
        urls = obj.get("urls") or []
        annotations = obj.get("annotations") or {}
        plat = obj.get("platform")
        if not (isinstance(urls, list) and all(isinstance(u, str) for u in urls)):
            raise ManifestInvalid(f"{where}: urls must be a list of strings")
        if not (
            isinstance(annotations, dict) and all(isinstance(v, str) for v in annotations.values())
        ):
            raise ManifestInvalid(f"{where}: annotations must be an object of strings")
        if plat is not None:
            _check_platform(plat, where)
        return cls(media_type, Digest.parse(digest), size, tuple(urls), annotations, plat)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": str(self.digest),
            "size": self.size,
        }
        if self.urls:
            out["urls"] = list(self.urls)
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform:
            out["platform"] = dict(self.platform)
        return out


# --- references ----------------------------------------------------------------------

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
# Used with fullmatch only: "$" would also match before a trailing newline ("a:1\n").
_NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST_RE = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
    r"|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
MAX_NAME_LENGTH = 255
DOCKER_HUB = "docker.io"


@dataclass(frozen=True, slots=True)
class Reference:
    """A registry image reference: ``HOST[:PORT]/NAME[:TAG][@DIGEST]``, normalised.

    ``docker.io`` is the default host and single-component names on it gain ``library/``,
    as docker and podman do. ``tag`` is ``latest`` when neither tag nor digest is given.
    """

    host: str
    name: str
    tag: str | None
    digest: Digest | None

    @classmethod
    def parse(cls, text: str) -> Reference:
        raw = text.removeprefix("docker://")
        if not raw or len(raw) > 1024:
            raise ReferenceInvalid(f"{text[:80]!r} is not an image reference")
        rest, _, digest_text = raw.partition("@")
        digest = Digest.parse(digest_text) if digest_text else None
        first, slash, remainder = rest.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            host, path = first, remainder
            if not _HOST_RE.fullmatch(host):
                raise ReferenceInvalid(f"{text[:80]!r}: {host!r} is not a valid registry host")
        else:
            host, path = DOCKER_HUB, rest
        name, tag = path, None
        colon = path.rfind(":")
        if colon > path.rfind("/"):
            name, tag = path[:colon], path[colon + 1 :]
            if not _TAG_RE.fullmatch(tag):
                raise ReferenceInvalid(f"{text[:80]!r}: {tag[:80]!r} is not a valid tag")
        if host == DOCKER_HUB and "/" not in name:
            name = f"library/{name}"
        if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
            raise ReferenceInvalid(
                f"{text[:80]!r}: the repository name must be lowercase components "
                "[a-z0-9] separated by '/', '.', '_' or '-' (no '..', no empty parts)"
            )
        if tag is None and digest is None:
            tag = "latest"
        return cls(host, name, tag, digest)

    @property
    def repository(self) -> str:
        """``HOST/NAME`` — the part that names a repository."""
        return f"{self.host}/{self.name}"

    def __str__(self) -> str:
        """The full, normalised reference: the store's ``ref.name`` annotation."""
        out = self.repository
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out


def is_valid_repository_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and bool(_NAME_RE.fullmatch(name))
