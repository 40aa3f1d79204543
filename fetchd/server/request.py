"""What a client's request says, parsed at the edge: the /v2/ path, ``Range``, ``Accept``.

Each parser returns a value or raises one of fetchd's errors that the server's error
table maps to a 4xx (``ReferenceInvalid``, ``TagInvalid``, ``DigestInvalid``,
``RangeNotSatisfiable``); never another exception, and never work beyond the length
of its input (aiohttp already bounds a header line to 8 KiB).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fetchd.errors import RangeNotSatisfiable, ReferenceInvalid, TagInvalid
from fetchd.model import Digest, is_valid_repository_name

_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_POSITION = re.compile(r"[0-9]+")
# More digits than any size can have: such a position is simply beyond the end.
_MAX_DIGITS = 19
_BEYOND = 10**_MAX_DIGITS


@dataclass(frozen=True, slots=True)
class DistributionPath:
    """``/v2/NAME/KIND/LAST``: KIND is manifests, blobs or tags (LAST is then "list")."""

    name: str
    kind: str
    tag: str | None = None  # a manifest by tag
    digest: Digest | None = None  # a blob, or a manifest by digest


def parse_path(raw: str) -> DistributionPath | None:
    """The part of a raw (still percent-encoded) request path after ``/v2/``; None when
    it names no endpoint of the API (a 404). An encoded character is refused outright:
    ``%2F`` must never become a path separator, nor ``%2e%2e`` a parent directory."""
    if "%" in raw or "//" in raw or "\\" in raw:
        raise ReferenceInvalid("encoded characters are not allowed")
    rest, sep, last = raw.rpartition("/")
    name, sep2, kind = rest.rpartition("/")
    if not sep or not sep2 or kind not in ("manifests", "blobs", "tags"):
        return None
    if kind == "tags" and last != "list":
        return None
    if not is_valid_repository_name(name):
        raise ReferenceInvalid("invalid repository name")
    if kind == "tags":
        return DistributionPath(name, kind)
    if kind == "blobs" or ":" in last:
        return DistributionPath(name, kind, digest=Digest.parse(last))
    if not _TAG.fullmatch(last):
        raise TagInvalid("invalid tag")
    return DistributionPath(name, kind, tag=last)


@dataclass(frozen=True, slots=True)
class ByteRange:
    start: int
    end: int  # inclusive, as in Content-Range

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        return f"bytes {self.start}-{self.end}/{size}"


def _position(text: str, header: str, size: int) -> int:
    text = text.strip()
    if not _POSITION.fullmatch(text):
        raise RangeNotSatisfiable(f"Range {header[:64]!r} is not bytes=FIRST-LAST", size)
    return _BEYOND if len(text) > _MAX_DIGITS else int(text)


def parse_range(header: str, size: int) -> ByteRange | None:
    """The one byte range of a ``size``-byte blob that ``header`` asks for (RFC 9110 §14).

    None means "send the whole blob with 200": another unit than bytes, or several
    ranges (a multipart answer is something no registry client asks for; ignoring
    ``Range`` is always allowed). Raises RangeNotSatisfiable (416 with ``Content-Range:
    bytes */SIZE``) for a byte range that does not parse or names no byte of the blob:
    a first position at or past the end, or a suffix of zero bytes (``bytes=-0``).
    """
    unit, eq, spec = header.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        return None
    first, dash, last = spec.partition("-")
    if not dash:
        raise RangeNotSatisfiable(f"Range {header[:64]!r} is not bytes=FIRST-LAST", size)
    if not first.strip():
        suffix = _position(last, header, size)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"Range {header[:64]!r} names no byte", size)
        return ByteRange(max(0, size - suffix), size - 1)
    start = _position(first, header, size)
    end = _position(last, header, size) if last.strip() else size - 1
    if end < start:
        raise RangeNotSatisfiable(f"Range {header[:64]!r} ends before it starts", size)
    if start >= size:
        raise RangeNotSatisfiable(f"Range {header[:64]!r} starts past the blob's end", size)
    return ByteRange(start, min(end, size - 1))


def accepts(values: list[str], media_type: str) -> bool:
    """Whether ``Accept`` header values admit ``media_type``: no header at all, ``*/*``,
    ``type/*`` or the type itself, with a q-value other than 0. Parameters of the media
    type are ignored, as distribution/registry ignores them."""
    kind = media_type.split("/", 1)[0]
    listed = False
    for value in values:
        for item in value.split(","):
            fields = item.split(";")
            accepted = fields[0].strip().lower()
            if not accepted:
                continue
            listed = True
            if any(_zero_q(f) for f in fields[1:]):
                continue
            if accepted in ("*/*", f"{kind}/*", media_type):
                return True
    return not listed  # an empty Accept is no Accept


def _zero_q(param: str) -> bool:
    key, _, value = param.partition("=")
    if key.strip().lower() != "q":
        return False
    try:
        return float(value.strip()[:8]) == 0.0
    except ValueError:
        return False
