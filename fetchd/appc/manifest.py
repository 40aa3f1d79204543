"""The appc image manifest (spec/aci.md "Image Manifest Schema"), parsed strictly, and what
fetchd derives from it: rkt's name/label check and a deterministic OCI image config.

:func:`parse_manifest` takes the bytes of an ACI's ``manifest`` member (≤ 1 MiB) and returns an
:class:`AppcManifest` or raises :class:`~fetchd.errors.ImageInvalid` naming the field. It keeps
appc's own rules (schema/types): ``acKind`` is ``ImageManifest``, ``acVersion`` a semver,
``name``, label and annotation names are AC identifiers, label names are unique and never
``name``, ``app.user``/``app.group`` are required when ``app`` is there, ``workingDirectory``
is absolute, environment names are ``[A-Za-z_][A-Za-z0-9_.-]*`` and unique, a dependency's
``imageID`` is ``sha512-`` and hex. Beyond appc: JSON objects with a duplicated key are refused
(two parsers must not read two different manifests from one file), and every list is bounded.
Keys the spec does not define are ignored, as appc's Go decoder ignores them.

What fetchd does not implement: a non-empty ``pathWhitelist`` is refused ("pathWhitelist is
not supported"); ``mountPoints``, ``ports``, ``isolators``, ``eventHandlers`` and
``supplementaryGIDs`` are logged as a warning and ignored (stage1 has no volumes, ports or
isolators to give them).

:func:`check_request` is rkt's ``ValidateName`` + ``ValidateLabels`` (rkt/image/validator.go)
with rkt's wording. :func:`oci_config` and :func:`appc_platform` map the manifest onto the OCI
image config and platform (appc ``aarch64`` → OCI ``arm64``, ``i386`` → ``386``, ``armv7l`` →
``arm``/``v7`` …); the config has sorted keys and no timestamps, so the same ACI always gives
the same config digest. Pure Python, nothing blocks.
"""

from __future__ import annotations

import json
import logging
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fetchd.errors import ImageInvalid
from fetchd.model import unique_keys

log = logging.getLogger(__name__)

APPC_MANIFEST_MEDIA_TYPE = "application/vnd.fetchd.appc.manifest.v1+json"

#: The largest manifest fetchd reads (the ACI member and any manifest blob).
MAX_MANIFEST_BYTES = 1 << 20
#: Most entries of any one list in a manifest (labels, annotations, exec, environment, deps…).
MAX_LIST = 1024
#: Most dependencies one manifest may name (the whole tree is bounded by the pull).
MAX_DEPENDENCIES = 64
#: Longest string value (an exec argument, a label or annotation value…).
MAX_STRING = 64 << 10

AC_IDENTIFIER = re.compile(r"^[a-z0-9]+([-._~/][a-z0-9]+)*$")
_SEMVER = re.compile(
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
#: rkt's ResolveKey accepts a prefix of ≥ 2 hex digits; the full ID has 128.
_IMAGE_ID = re.compile(r"^sha512-[0-9a-f]{2,128}$")

#: appc arch label (types.ToAppcOSArch) → (OCI architecture, variant).
_ARCH = {
    "amd64": ("amd64", None),
    "x86_64": ("amd64", None),
    "i386": ("386", None),
    "aarch64": ("arm64", None),
    "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
}
#: Python's platform.machine() → OCI architecture (the fallback for an image without labels).
_MACHINE = {
    "x86_64": ("amd64", None),
    "aarch64": ("arm64", None),
    "i386": ("386", None),
    "i686": ("386", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
}


@dataclass(frozen=True)
class App:
    """``app`` of the manifest: what to run and as whom (names, numbers or absolute paths)."""

    exec: tuple[str, ...]
    user: str
    group: str
    working_directory: str | None
    #: (name, value) in the manifest's order
    environment: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Dependency:
    """One ``dependencies[]`` entry, in the manifest's order."""

    image_name: str
    #: ``sha512-`` + 2..128 hex (a prefix of the dependency's image ID), or None
    image_id: str | None
    labels: dict[str, str]
    #: the dependency's uncompressed size in bytes: an upper bound fetchd enforces
    size: int | None


@dataclass(frozen=True)
class AppcManifest:
    """An ImageManifest. ``raw`` is the bytes it was parsed from (stored as a blob as is)."""

    name: str
    labels: dict[str, str]
    app: App | None
    dependencies: tuple[Dependency, ...]
    path_whitelist: tuple[str, ...]
    annotations: dict[str, str]
    raw: bytes

    def label(self, key: str) -> str | None:
        return self.labels.get(key)


# --- parsing -------------------------------------------------------------------------


class _Bad(Exception):
    """A problem found while parsing; parse_manifest turns it into ImageInvalid."""


def _obj(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Bad(f"{where} must be an object")
    return value


def _list(value: object, where: str, limit: int = MAX_LIST) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Bad(f"{where} must be a list")
    if len(value) > limit:
        raise _Bad(f"{where} has {len(value)} entries, more than {limit}")
    return value


def _str(value: object, where: str, *, required: bool = True) -> str:
    if not isinstance(value, str) or (required and not value):
        raise _Bad(
            f"{where} must be a non-empty string" if required else f"{where} must be a string"
        )
    if len(value) > MAX_STRING:
        raise _Bad(f"{where} is longer than {MAX_STRING} characters")
    if "\x00" in value:
        raise _Bad(f"{where} contains a NUL character")
    return value


def _identifier(value: object, where: str) -> str:
    text = _str(value, where)
    if len(text) > 1024 or not AC_IDENTIFIER.match(text):
        raise _Bad(
            f"{where} {json.dumps(text)} is not an AC identifier "
            "(lowercase letters, digits and -._~/, starting and ending with a letter or digit)"
        )
    return text


def _pairs(value: object, where: str, *, kind: str) -> dict[str, str]:
    """labels/annotations: a list of {name, value}, names AC identifiers and unique."""
    out: dict[str, str] = {}
    for i, item in enumerate(_list(value, where)):
        entry = _obj(item, f"{where}[{i}]")
        key = _identifier(entry.get("name"), f"{where}[{i}].name")
        val = _str(entry.get("value"), f"{where}[{i}].value", required=False)
        if kind == "label" and key == "name":
            raise _Bad('invalid label name: "name"')
        if key in out:
            raise _Bad(f"duplicate {kind}s of name {json.dumps(key)}")
        out[key] = val
    return out


def _parse_app(value: object) -> App:
    app = _obj(value, "app")
    exec_ = tuple(
        _str(a, f"app.exec[{i}]") for i, a in enumerate(_list(app.get("exec"), "app.exec"))
    )
    user = _str(app.get("user"), "app.user") if "user" in app else ""
    group = _str(app.get("group"), "app.group") if "group" in app else ""
    if not user:
        raise _Bad("app.user is required")
    if not group:
        raise _Bad("app.group is required")
    workdir = app.get("workingDirectory")
    if workdir is not None:
        workdir = _str(workdir, "app.workingDirectory", required=False) or None
        if workdir is not None and not workdir.startswith("/"):
            raise _Bad("app.workingDirectory must be an absolute path")
    env: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, item in enumerate(_list(app.get("environment"), "app.environment")):
        entry = _obj(item, f"app.environment[{i}]")
        key = _str(entry.get("name"), f"app.environment[{i}].name")
        if not _ENV_NAME.match(key):
            raise _Bad(
                f"app.environment[{i}].name {json.dumps(key)} must be letters, digits and _.- "
                "and not start with a digit"
            )
        if key in seen:
            raise _Bad(f"app.environment names {json.dumps(key)} twice")
        seen.add(key)
        env.append((key, _str(entry.get("value"), f"app.environment[{i}].value", required=False)))
    for key, what in (
        ("mountPoints", "mount points"),
        ("ports", "ports"),
        ("isolators", "isolators"),
        ("eventHandlers", "event handlers"),
        ("supplementaryGIDs", "supplementary GIDs"),
    ):
        if _list(app.get(key), f"app.{key}"):
            log.warning("the image's app.%s are ignored: fetchd's stage1 has no %s", key, what)
    return App(exec_, user, group, workdir, tuple(env))


def _parse_dependency(value: object, where: str) -> Dependency:
    dep = _obj(value, where)
    name = _identifier(dep.get("imageName"), f"{where}.imageName")
    image_id = dep.get("imageID")
    if image_id is not None:
        image_id = _str(image_id, f"{where}.imageID")
        if not _IMAGE_ID.match(image_id):
            raise _Bad(f"{where}.imageID {json.dumps(image_id)} is not sha512- and hex digits")
    labels = _pairs(dep.get("labels"), f"{where}.labels", kind="label")
    size = dep.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise _Bad(f"{where}.size must be a non-negative integer")
    return Dependency(name, image_id, labels, size)


def parse_manifest(raw: bytes, what: str) -> AppcManifest:
    """The ImageManifest in ``raw``, else ImageInvalid ("WHAT: the image manifest …")."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ImageInvalid(f"{what}: the image manifest is larger than 1 MiB")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
        top = _obj(doc, "the manifest")
        if top.get("acKind") != "ImageManifest":
            raise _Bad(f'acKind must be "ImageManifest", not {json.dumps(top.get("acKind"))}')
        version = _str(top.get("acVersion"), "acVersion")
        if not _SEMVER.match(version):
            raise _Bad(f"acVersion {json.dumps(version)} is not a semantic version")
        name = _identifier(top.get("name"), "name")
        labels = _pairs(top.get("labels"), "labels", kind="label")
        annotations = _pairs(top.get("annotations"), "annotations", kind="annotation")
        app = None if top.get("app") is None else _parse_app(top["app"])
        deps = tuple(
            _parse_dependency(d, f"dependencies[{i}]")
            for i, d in enumerate(_list(top.get("dependencies"), "dependencies", MAX_DEPENDENCIES))
        )
        whitelist = tuple(
            _str(p, f"pathWhitelist[{i}]")
            for i, p in enumerate(_list(top.get("pathWhitelist"), "pathWhitelist"))
        )
    except _Bad as exc:
        raise ImageInvalid(f"{what}: the image manifest is invalid: {exc}") from None
    except RecursionError:
        raise ImageInvalid(f"{what}: the image manifest is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ImageInvalid(f"{what}: the image manifest is not JSON: {exc}") from None
    if whitelist:
        raise ImageInvalid(
            f"{what}: the image manifest has a pathWhitelist; pathWhitelist is not supported"
        )
    return AppcManifest(name, labels, app, deps, whitelist, annotations, raw)


# --- the request ---------------------------------------------------------------------


def check_request(m: AppcManifest, name: str, labels: Mapping[str, str], what: str) -> None:
    """rkt's ValidateName + ValidateLabels: the manifest's name is ``name`` and every requested
    label is there with the requested value (extra labels in the manifest are fine)."""
    if m.name != name:
        raise ImageInvalid(
            f"{what}: error when reading the app name: {json.dumps(name)} expected but "
            f"{json.dumps(m.name)} found"
        )
    for key in sorted(labels):
        want = labels[key]
        have = m.labels.get(key)
        if have is None:
            raise ImageInvalid(
                f"{what}: requested label {json.dumps(key)} not provided by the image manifest"
            )
        if have != want:
            raise ImageInvalid(
                f"{what}: requested value for label {json.dumps(key)}: {json.dumps(want)} "
                f"differs from fetched aci label value: {json.dumps(have)}"
            )


# --- the OCI view --------------------------------------------------------------------


def _oci_arch(appc_arch: str | None) -> tuple[str, str | None]:
    if appc_arch is None:
        return _MACHINE.get(platform.machine(), (platform.machine(), None))
    return _ARCH.get(appc_arch, (appc_arch, None))


def appc_platform(m: AppcManifest) -> dict[str, str] | None:
    """The OCI platform object of the image (for the index descriptor), or None when the
    manifest has no ``os`` or no ``arch`` label (an OS- or architecture-independent image)."""
    os_, arch = m.labels.get("os"), m.labels.get("arch")
    if os_ is None or arch is None:
        return None
    oci_arch, variant = _oci_arch(arch)
    out = {"architecture": oci_arch, "os": os_}
    if variant is not None:
        out["variant"] = variant
    return out


def oci_config(m: AppcManifest, diff_ids: Sequence[str]) -> bytes:
    """The OCI image config (application/vnd.oci.image.config.v1+json) for ``m`` whose layers'
    uncompressed digests are ``diff_ids`` (dependencies first, this image last).

    Entrypoint = app.exec, User = "user:group" (as the manifest spells them: names, numbers or
    absolute paths), Env = ["K=V", …] in order, WorkingDir. os/architecture(/variant) come from
    the labels; an image without them gets this machine's (as rkt would run it here)."""
    plat = appc_platform(m)
    if plat is None:
        oci_arch, variant = _oci_arch(m.labels.get("arch"))
        plat = {"architecture": oci_arch, "os": m.labels.get("os", "linux")}
        if variant is not None:
            plat["variant"] = variant
    config: dict[str, Any] = {}
    if m.app is not None:
        if m.app.exec:
            config["Entrypoint"] = list(m.app.exec)
        config["User"] = f"{m.app.user}:{m.app.group}"
        if m.app.environment:
            config["Env"] = [f"{k}={v}" for k, v in m.app.environment]
        if m.app.working_directory:
            config["WorkingDir"] = m.app.working_directory
    doc: dict[str, Any] = {
        **plat,
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
