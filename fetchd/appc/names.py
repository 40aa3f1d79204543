"""appc image names: ``NAME[:VERSION][,LABEL=VALUE]…`` (appc discovery/parse.go), made strict.

The grammar is appc's ``NewAppFromString``: a colon may appear only right after the name and at
most once (``NAME:VER`` is ``NAME,version=VER``), every ``,``-separated part after the name is
``KEY=VALUE``, a key given twice is an error, and ``name`` is the name. fetchd is stricter where
appc was loose (each is in the README's differences list):

- the name and every label key must match the AC Identifier regex of the spec in full
  (``^[a-z0-9]+([-._~/][a-z0-9]+)*$``; appc checked the characters and the ends only, so
  ``example.com/../x`` passed);
- a label value may not be empty and may not contain ``/ ? # %``, whitespace or control
  characters: values are put into URL templates by discovery, and these would change which
  URL is asked for (refused before any request, naming the label);
- os/arch defaults (:meth:`AppName.with_host_defaults`) use appc's arch names, as rkt did
  (``amd64``, ``aarch64``, ``i386``, ``armv7l``, …), and a given os/arch must be one the
  appc spec knows (rkt's "bad arch" check).

Errors are :class:`~fetchd.errors.ReferenceInvalid` with one line naming what is wrong.
"""

from __future__ import annotations

import ipaddress
import platform
import re
from dataclasses import dataclass

from fetchd.errors import ReferenceInvalid

AC_IDENTIFIER = re.compile(r"^[a-z0-9]+([-._~/][a-z0-9]+)*$")
#: longest app string fetchd parses (names are host + path: 255 + a few components)
MAX_NAME_TEXT = 1024
#: labels one name may carry
MAX_LABELS = 32
#: characters refused in label values (they would change the URL a template renders)
_BAD_VALUE = re.compile(r"[/?#%\s\x00-\x1f\x7f]")

#: appc spec schema/types/labels.go ValidOSArch
VALID_OS_ARCH: dict[str, tuple[str, ...]] = {
    "linux": (
        "amd64",
        "i386",
        "aarch64",
        "aarch64_be",
        "armv6l",
        "armv7l",
        "armv7b",
        "ppc64",
        "ppc64le",
        "s390x",
    ),
    "freebsd": ("amd64", "i386", "arm"),
    "darwin": ("x86_64", "i386"),
}

#: platform.machine() → appc arch (rkt's types.ToAppcOSArch)
_MACHINE_ARCH = {
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


def host_os_arch() -> tuple[str, str]:
    """This machine's os and arch in appc's names (``("linux", "amd64")``)."""
    machine = platform.machine().lower()
    return platform.system().lower(), _MACHINE_ARCH.get(machine, machine)


def valid_identifier(text: str) -> bool:
    return len(text) <= MAX_NAME_TEXT and AC_IDENTIFIER.match(text) is not None


def check_label_value(key: str, value: str, what: str) -> None:
    """ReferenceInvalid unless value may go into a discovery template."""
    if not value:
        raise ReferenceInvalid(f"{what}: label {key} has an empty value")
    bad = _BAD_VALUE.search(value)
    if bad:
        raise ReferenceInvalid(
            f"{what}: label {key}={value[:64]!r} contains {bad.group()!r}; label values may not "
            "contain '/', '?', '#', '%', spaces or control characters (they would change the "
            "discovery URL)"
        )


@dataclass(frozen=True)
class AppName:
    """An appc name and its labels (sorted by key; ``version`` only if given)."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> AppName:
        """appc's ``NewAppFromString``: ``example.com/app:1.0`` or
        ``example.com/app,version=1.0,os=linux`` (errors: ReferenceInvalid)."""
        what = repr(text[:80])
        if len(text) > MAX_NAME_TEXT:
            raise ReferenceInvalid(f"{what}…: an appc name is at most {MAX_NAME_TEXT} characters")
        first_comma, first_colon = text.find(","), text.find(":")
        if first_comma > -1 and first_colon > first_comma:
            raise ReferenceInvalid(
                f"{what}: malformed app string - colon may appear only right after the app name"
            )
        if text.count(":") > 1:
            raise ReferenceInvalid(f"{what}: malformed app string - colon may appear at most once")
        head, *parts = text.split(",")
        name, colon, version = head.partition(":")
        if colon:
            parts.insert(0, f"version={version}")
        if len(parts) > MAX_LABELS:
            raise ReferenceInvalid(f"{what}: more than {MAX_LABELS} labels")
        labels: dict[str, str] = {}
        for part in parts:
            key, eq, value = part.partition("=")
            if not eq:
                raise ReferenceInvalid(
                    f"{what}: malformed string - has a label without a value: {key}"
                )
            if key == "name":
                raise ReferenceInvalid(f"{what}: label name with multiple values")
            if key in labels:
                raise ReferenceInvalid(f"{what}: label {key} with multiple values")
            if not valid_identifier(key):
                raise ReferenceInvalid(
                    f"{what}: label key {key[:64]!r} is not an AC Identifier "
                    "(lowercase a-z, 0-9 and -._~/ between them)"
                )
            check_label_value(key, value, what)
            labels[key] = value
        if not valid_identifier(name):
            raise ReferenceInvalid(
                f"{what}: {name[:80]!r} is not an appc name (an AC Identifier: lowercase a-z, "
                "0-9 and -._~/ between them, like example.com/app)"
            )
        return cls(name, tuple(sorted(labels.items())))

    def label(self, key: str) -> str | None:
        for k, v in self.labels:
            if k == key:
                return v
        return None

    def with_labels(self, **extra: str) -> AppName:
        """A copy with these labels set (replacing any of the same key)."""
        merged = dict(self.labels)
        for key, value in extra.items():
            check_label_value(key, value, repr(str(self)))
            merged[key] = value
        return AppName(self.name, tuple(sorted(merged.items())))

    def with_host_defaults(self) -> AppName:
        """rkt's setAppDefaults: os and arch of this machine (appc names) unless given; a
        given os/arch must be valid for the appc spec."""
        host_os, host_arch = host_os_arch()
        os_ = self.label("os") or host_os
        arch = self.label("arch") or host_arch
        valid = VALID_OS_ARCH.get(os_)
        if valid is None:
            raise ReferenceInvalid(
                f"{self}: bad os {os_!r} (must be one of: {', '.join(sorted(VALID_OS_ARCH))})"
            )
        if arch not in valid:
            raise ReferenceInvalid(
                f"{self}: bad arch {arch!r} for {os_} (must be one of: {', '.join(valid)})"
            )
        return self.with_labels(os=os_, arch=arch)

    def ref_name(self) -> str:
        """``NAME:VERSION`` or ``NAME:latest`` (the index.json ref.name)."""
        return f"{self.name}:{self.label('version') or 'latest'}"

    def __str__(self) -> str:
        order = {"version": 0, "os": 1, "arch": 2}
        labels = sorted(self.labels, key=lambda kv: (order.get(kv[0], 3), kv[0]))
        return ",".join([self.name, *(f"{k}={v}" for k, v in labels)])


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def looks_appc(text: str) -> bool:
    """A bare appc name: no scheme, not a path, and its first component has a '.' (a host
    name or an IPv4 literal), or it carries ``,LABEL=VALUE``."""
    if "://" in text or text.startswith(("/", ".", "~")) or not text:
        return False
    if text.endswith((".aci", ".torrent", ".tar", ".tar.gz", ".tgz")):
        return False
    if "," in text:
        return True
    host = re.split(r"[/:,]", text, maxsplit=1)[0]
    return "." in host or _is_ip(host)
