"""appc images in the store: their names, which index entry a name means, their layers.

fetchd stores an ACI as an OCI image manifest whose layers are the ACI files exactly as they
were signed (dependencies first), media type ``application/vnd.fetchd.appc.aci.v1.tar`` with
``+gzip``, ``+bzip2`` or ``+xz``, and whose config fetchd synthesised from the appc manifest
(Entrypoint = app.exec, User = user:group, Env, WorkingDir). The index entry carries the appc
name and labels as annotations (``io.fetchd.appc.name``, ``io.fetchd.appc.labels``: a JSON
object) and ``NAME:VERSION`` as its ref.name (``NAME:latest`` when pulled without a version).

A name such as ``example.com/hello,version=1.0.0`` (appc's grammar: ``NAME[:VERSION][,K=V]…``)
picks an entry by rkt's GetACI rules: every requested label is equal to the image's; os and
arch of this machine are requested unless given (an image without an os or arch label at all
is platform-independent and matches them); with no version asked for, an entry pulled as
latest is preferred, else the newest. stage1 imports nothing of fetchd; the grammar and the
arch names are appc's (``amd64``, ``i386``, ``aarch64``, ``armv7l``…).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from stage1.errors import UsageError
from stage1.model import Descriptor

ACI_MEDIA_TYPE = "application/vnd.fetchd.appc.aci.v1.tar"
NAME_ANNOTATION = "io.fetchd.appc.name"
LABELS_ANNOTATION = "io.fetchd.appc.labels"
REF_NAME = "org.opencontainers.image.ref.name"

AC_IDENTIFIER = re.compile(r"^[a-z0-9]+([-._~/][a-z0-9]+)*$")
_MAX_LABELS = 64
_MAX_LABELS_JSON = 64 * 1024

# os.uname().machine -> appc's arch name (appc types.ToAppcOSArch); the same table as
# fetchd/appc/names.py _MACHINE_ARCH (stage1 imports nothing from fetchd), so the arch
# label fetchd adds at pull is the one stage1 asks for at run
_APPC_ARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "i386": "i386",
    "i486": "i386",
    "i586": "i386",
    "i686": "i386",
    "armv6l": "armv6l",
    "armv7l": "armv7l",
    "armv8l": "armv7l",
    "ppc64le": "ppc64le",
    "ppc64": "ppc64",
    "s390x": "s390x",
}


def is_aci_layer(media_type: str) -> bool:
    """True for a layer that is an ACI file (its members ``manifest`` and ``rootfs/…``)."""
    base, plus, compression = media_type.partition("+")
    if base != ACI_MEDIA_TYPE:
        return False
    return not plus or compression in ("gzip", "bzip2", "xz")


def host_labels() -> dict[str, str]:
    """os and arch of this machine, in appc's names."""
    machine = os.uname().machine.lower()
    return {"os": "linux", "arch": _APPC_ARCH.get(machine, machine)}


@dataclass(frozen=True)
class AppcName:
    """An appc image name and the labels asked for (``version`` only if given)."""

    text: str
    name: str
    labels: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str) -> AppcName:
        """``NAME[:VERSION][,LABEL=VALUE]…`` (appc discovery's NewAppFromString); UsageError."""
        if text.count(":") > 1:
            raise UsageError(f"invalid appc name {text!r}: a colon may appear at most once")
        head, colon, rest = text.partition(":")
        if colon:
            if "," in head:
                raise UsageError(
                    f"invalid appc name {text!r}: a colon may appear only right after the name"
                )
            text_labels = "version=" + rest
            parts = [head, *text_labels.split(",")]
        else:
            parts = text.split(",")
        name, pairs = parts[0], parts[1:]
        if not AC_IDENTIFIER.match(name):
            raise UsageError(f"invalid appc name {text!r}: {name!r} is not an AC identifier")
        if len(pairs) > _MAX_LABELS:
            raise UsageError(f"invalid appc name {text!r}: more than {_MAX_LABELS} labels")
        labels: dict[str, str] = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            if not eq:
                raise UsageError(f"invalid appc name {text!r}: label {key!r} has no value")
            if not AC_IDENTIFIER.match(key) or key == "name":
                raise UsageError(f"invalid appc name {text!r}: bad label name {key!r}")
            if key in labels:
                raise UsageError(f"invalid appc name {text!r}: label {key} given twice")
            if not value:
                raise UsageError(f"invalid appc name {text!r}: label {key} has an empty value")
            labels[key] = value
        return cls(text, name, tuple(sorted(labels.items())))

    def label(self, key: str) -> str | None:
        return dict(self.labels).get(key)

    def pull_hint(self) -> str:
        return f"fetchd pull {self.text}"


def looks_appc(text: str) -> bool:
    """What stage1 reads as an appc name first (not a registry reference): labels after a ','."""
    return "://" not in text and "," in text


def entry_labels(entry: Descriptor) -> dict[str, str] | None:
    """The appc labels an index entry records (None if it is not an appc image)."""
    if entry.annotation(NAME_ANNOTATION) is None:
        return None
    text = entry.annotation(LABELS_ANNOTATION) or "{}"
    if len(text) > _MAX_LABELS_JSON:
        return None
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        return None
    return raw


@dataclass(frozen=True)
class Choice:
    """The entry a name selects, or None with what the store holds under that name."""

    entry: Descriptor | None
    others: tuple[str, ...]  # "name,k=v,…" of the entries with that name that did not match


def choose(entries: Sequence[Descriptor], app: AppcName) -> Choice:
    """rkt's GetACI over the index ENTRIES (oldest first): see the module docstring."""
    wanted = dict(app.labels)
    defaults = {k: v for k, v in host_labels().items() if k not in wanted}
    matching: list[Descriptor] = []
    others: list[str] = []
    for entry in entries:
        if entry.annotation(NAME_ANNOTATION) != app.name:
            continue
        labels = entry_labels(entry)
        if labels is None:
            continue
        if all(labels.get(k) == v for k, v in wanted.items()) and all(
            labels.get(k, v) == v for k, v in defaults.items()
        ):
            matching.append(entry)
        else:
            shown = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
            others.append(f"{app.name},{shown}" if shown else app.name)
    if not matching:
        return Choice(None, tuple(dict.fromkeys(others)))
    if "version" not in wanted:
        latest = [e for e in matching if e.annotation(REF_NAME) == f"{app.name}:latest"]
        latest += [e for e in matching if (entry_labels(e) or {}).get("version") == "latest"]
        if latest:
            return Choice(max(latest, key=matching.index), ())
    return Choice(matching[-1], ())
