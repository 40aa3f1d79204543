"""Torrent metainfo: fetchd's deterministic torrent of a blob, and torrents made by others.

The rule (``../shared/BITTORRENT.md`` §0, §1): one torrent per blob, a pure function of its
bytes, so every node that holds the blob computes the same info-hash and can seed it.

- BitTorrent v1 only (a hybrid breaks aria2 1.36 and transmission 3.00), one file;
- ``info`` is exactly ``{length: size, name: <hex digest>, piece length: piece_length(size),
  pieces: SHA-1 of each piece}``: no ``private``, ``attr``, ``mtime``, ``source``…;
- the canonical file is exactly ``bencode({"info": info})``: no creation date, no creator.
  A server adds ``announce`` and ``url-list`` when it hands the file out (:meth:`Torrent.served`);
  they are outside ``info`` and leave the info-hash alone.

``mktorrent -l log2(piece length) -n HEX FILE`` gives the same info-hash.

Everything read from outside (a cache's torrent, a foreign ``.torrent``) goes through
:func:`bdecode`, which is bounded (size, depth, item count) and accepts only canonical
bencoding, so a decoded ``info`` re-encodes to the very bytes its info-hash is over.
Failures are :class:`~fetchd.errors.BadTorrent` with a reason a person can read.

Pure Python and hashlib: this module never imports libtorrent (only fetchd/bt/session.py
does), so the CLI and the server can use it without loading the session. Nothing here
blocks except :func:`build_from_file` (call it on a thread) and :meth:`TorrentBuilder.feed`
(CPU: SHA-1 of what it is fed).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fetchd.errors import BadTorrent

KiB, MiB = 1 << 10, 1 << 20

#: The piece-length rule: the smallest power of two >= MIN_PIECE giving <= MAX_PIECES
#: pieces, capped at MAX_PIECE (256 KiB up to 512 MiB, 512 KiB at 1 GiB, 16 MiB from 32 GiB).
MIN_PIECE = 256 << 10
MAX_PIECES = 2048
MAX_PIECE = 16 << 20

#: The bound on any .torrent fetchd reads. The rule keeps its own torrents at about
#: 41 KB up to 32 GiB; 8 MiB holds the pieces of a ~6.7 TiB blob at 16 MiB pieces.
MAX_TORRENT_BYTES = 8 << 20
#: Nesting :func:`bdecode` accepts (a single-file hybrid torrent needs 5).
MAX_DEPTH = 32
#: Values (strings, integers, lists, dicts) one decoded torrent may hold.
MAX_ITEMS = 1 << 16
#: Digits of an integer (20 digits hold any 64-bit value) and of a string's length.
_MAX_INT_DIGITS = 20
_MAX_LEN_DIGITS = len(str(MAX_TORRENT_BYTES))

#: Bounds on what a foreign torrent may say.
MIN_FOREIGN_PIECE = 16 << 10
MAX_FOREIGN_PIECE = 128 << 20
MAX_FOREIGN_URLS = 64
MAX_URL_LENGTH = 2048
MAX_NAME_BYTES = 255

_HASH = 20  # bytes of one SHA-1 piece hash
_INFO_KEYS = frozenset({b"length", b"name", b"piece length", b"pieces"})
_HEX_RE = re.compile(r"[0-9a-f]{64}(?:[0-9a-f]{64})?")
_URL_SCHEMES = {"announce": ("http://", "https://", "udp://"), "url-list": ("http://", "https://")}
_READ_CHUNK = 1 << 20


def piece_length(size: int) -> int:
    """fetchd's piece length for a blob of ``size`` bytes (see the module docstring)."""
    p = MIN_PIECE
    while p < MAX_PIECE and -(-size // p) > MAX_PIECES:
        p *= 2
    return p


# --- bencoding ----------------------------------------------------------------------


def bencode(value: object) -> bytes:
    """Canonical bencoding of ints, bytes, str (as UTF-8), lists and dicts (keys bytes or
    str, written sorted by their bytes). TypeError for anything else (bool included)."""
    out: list[bytes] = []
    _encode(value, out)
    return b"".join(out)


def _encode(v: object, out: list[bytes]) -> None:
    if isinstance(v, bool):
        raise TypeError("bencode: bool is not a bencode value")
    if isinstance(v, int):
        out.append(b"i%de" % v)
    elif isinstance(v, bytes | bytearray | memoryview):
        b = bytes(v)
        out.append(b"%d:" % len(b))
        out.append(b)
    elif isinstance(v, str):
        _encode(v.encode(), out)
    elif isinstance(v, list | tuple):
        out.append(b"l")
        for item in v:
            _encode(item, out)
        out.append(b"e")
    elif isinstance(v, dict):
        items: dict[bytes, object] = {}
        for k, val in v.items():
            kb = k.encode() if isinstance(k, str) else k
            if not isinstance(kb, bytes):
                raise TypeError(f"bencode: dict key {type(k).__name__}")
            if kb in items:
                raise ValueError(f"bencode: key {kb!r} twice")
            items[kb] = val
        out.append(b"d")
        for kb in sorted(items):
            _encode(kb, out)
            _encode(items[kb], out)
        out.append(b"e")
    else:
        raise TypeError(f"bencode: {type(v).__name__}")


def bdecode(raw: bytes) -> object:
    """Decode one bencoded value that is exactly ``raw``, or raise BadTorrent.

    Strict and bounded: at most MAX_TORRENT_BYTES, MAX_DEPTH levels and MAX_ITEMS values;
    canonical only (dict keys are byte strings, sorted and unique; integers without
    leading zeros or ``-0``; string lengths without leading zeros; nothing after the
    value). Strings come back as bytes, dict keys too. So ``bencode(bdecode(raw)) == raw``.
    """
    if len(raw) > MAX_TORRENT_BYTES:
        raise BadTorrent(f"it is {len(raw)} bytes, more than the {MAX_TORRENT_BYTES} allowed")
    dec = _Decoder(bytes(raw))
    value = dec.value(0)
    if dec.pos != len(raw):
        raise BadTorrent(f"it has {len(raw) - dec.pos} bytes after the bencoded value")
    return value


class _Decoder:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.pos = 0
        self.items = 0

    def fail(self, what: str) -> BadTorrent:
        return BadTorrent(f"it is not canonical bencoding ({what} at byte {self.pos})")

    def value(self, depth: int) -> object:
        if depth >= MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH}")
        self.items += 1
        if self.items > MAX_ITEMS:
            raise self.fail(f"more than {MAX_ITEMS} values")
        raw, i = self.raw, self.pos
        if i >= len(raw):
            raise self.fail("truncated")
        c = raw[i]
        if c == 0x69:  # i
            self.pos = i + 1
            return self.integer()
        if c == 0x6C:  # l
            self.pos = i + 1
            out: list[object] = []
            while self.peek() != 0x65:
                out.append(self.value(depth + 1))
            self.pos += 1
            return out
        if c == 0x64:  # d
            self.pos = i + 1
            d: dict[bytes, object] = {}
            last: bytes | None = None
            while self.peek() != 0x65:
                if self.peek() not in b"0123456789":
                    raise self.fail("a dict key that is not a string")
                self.items += 1
                key = self.string()
                if last is not None and key <= last:
                    raise self.fail(
                        f"dict key {_show(key)} {'twice' if key == last else 'out of order'}"
                    )
                last = key
                d[key] = self.value(depth + 1)
            self.pos += 1
            return d
        if 0x30 <= c <= 0x39:
            return self.string()
        raise self.fail(f"unexpected {bytes([c])!r}")

    def peek(self) -> int:
        if self.pos >= len(self.raw):
            raise self.fail("truncated")
        return self.raw[self.pos]

    def digits(self, end: int, limit: int, what: str) -> tuple[bytes, int]:
        """The bytes before the terminator ``end`` (at most ``limit`` of them)."""
        j = self.raw.find(bytes([end]), self.pos, self.pos + limit + 1)
        if j < 0:
            raise self.fail(f"{what} too long or unterminated")
        return self.raw[self.pos : j], j

    def integer(self) -> int:
        text, j = self.digits(0x65, _MAX_INT_DIGITS + 1, "an integer")
        body = text[1:] if text.startswith(b"-") else text
        if not body or not body.isdigit():
            raise self.fail(f"integer {_show(text)}")
        if (body.startswith(b"0") and len(body) > 1) or text == b"-0":
            raise self.fail(f"integer {_show(text)} with a leading zero or -0")
        self.pos = j + 1
        return int(text)

    def string(self) -> bytes:
        text, j = self.digits(0x3A, _MAX_LEN_DIGITS, "a string length")
        if not text.isdigit() or (text.startswith(b"0") and len(text) > 1):
            raise self.fail(f"string length {_show(text)}")
        n = int(text)
        start = j + 1
        if n > len(self.raw) - start:
            raise self.fail(f"a string of {n} bytes where {len(self.raw) - start} remain")
        self.pos = start + n
        return self.raw[start : self.pos]


def _show(b: bytes, limit: int = 40) -> str:
    """A byte string for a message: quoted, printable, shortened."""
    text = b[:limit].decode("utf-8", "replace")
    text = "".join(ch if ch.isprintable() else f"\\x{ord(ch):02x}" for ch in text)
    return repr(text + ("…" if len(b) > limit else ""))


# --- fetchd's canonical torrent -------------------------------------------------------


def _check_hex(hex: str) -> None:
    if not isinstance(hex, str) or not _HEX_RE.fullmatch(hex):
        raise ValueError(f"not a sha256/sha512 hex digest: {hex!r:.80}")


def _label(hex: str) -> str:
    return f"{'sha256' if len(hex) == 64 else 'sha512'}:{hex[:12]}…"


@dataclass(frozen=True, slots=True)
class Torrent:
    """fetchd's canonical torrent of one blob (``hex``, ``size``). Constructing one that
    breaks the rule raises ValueError: get them from :class:`TorrentBuilder`,
    :func:`build_from_file` or :func:`canonical`."""

    hex: str
    size: int
    piece_length: int
    pieces: bytes  # SHA-1 per piece, 20 bytes each

    def __post_init__(self) -> None:
        _check_hex(self.hex)
        if self.size < 1:
            raise ValueError("a torrent needs at least one byte")
        if self.piece_length != piece_length(self.size):
            raise ValueError(f"piece length {self.piece_length} breaks the rule for {self.size}")
        if len(self.pieces) != _HASH * -(-self.size // self.piece_length):
            raise ValueError(f"{len(self.pieces)} bytes of piece hashes for {self.size}")

    def _info(self) -> dict[bytes, object]:
        return {
            b"length": self.size,
            b"name": self.hex.encode(),
            b"piece length": self.piece_length,
            b"pieces": self.pieces,
        }

    @property
    def raw(self) -> bytes:
        """The canonical file: exactly ``bencode({"info": info})``."""
        return bencode({b"info": self._info()})

    @property
    def info_hash(self) -> bytes:
        """SHA-1 of the bencoded info dict (20 bytes): the v1 info-hash."""
        return hashlib.sha1(bencode(self._info())).digest()

    @property
    def info_hash_hex(self) -> str:
        return self.info_hash.hex()

    @property
    def num_pieces(self) -> int:
        return len(self.pieces) // _HASH

    def span(self, i: int) -> tuple[int, int]:
        """[start, end) of piece ``i`` in the blob; IndexError outside 0..num_pieces-1."""
        if not 0 <= i < self.num_pieces:
            raise IndexError(f"piece {i} of {self.num_pieces}")
        start = i * self.piece_length
        return start, min(self.size, start + self.piece_length)

    def pieces_within(self, ranges: Sequence[tuple[int, int]]) -> set[int]:
        """The pieces whose every byte lies in ``ranges`` ([start, end) byte ranges of the
        blob, in any order, overlapping or adjacent ones count as one)."""
        merged: list[list[int]] = []
        for a, b in sorted((max(0, a), min(self.size, b)) for a, b in ranges):
            if a >= b:
                continue
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        out: set[int] = set()
        plen = self.piece_length
        for a, b in merged:
            first = -(-a // plen)
            last = self.num_pieces - 1 if b >= self.size else b // plen - 1
            out.update(range(first, last + 1))
        return out

    def served(self, announce: str | None, url_list: Sequence[str]) -> bytes:
        """The file a server hands out: the canonical one plus ``announce`` (if given) and
        ``url-list`` (BEP 19 web seeds, if any). ``info`` and so the info-hash unchanged."""
        top: dict[bytes, object] = {b"info": self._info()}
        if announce is not None:
            top[b"announce"] = announce.encode()
        if url_list:
            top[b"url-list"] = [u.encode() for u in url_list]
        return bencode(top)


class TorrentBuilder:
    """Builds the canonical torrent of a blob as its bytes stream in.

    ``feed`` the blob's bytes in order, in chunks of any size, then ``finish``. Hashes each
    piece as its last byte arrives and copies nothing (a SHA-1 object per piece). It does
    not verify the blob: the store's sha256 at commit does; a torrent built from bytes
    that then fail that check must be dropped. One caller at a time (calls must not overlap).
    ValueError for a ``hex`` that is not a hex digest; BadTorrent for ``size`` < 1.
    """

    def __init__(self, hex: str, size: int) -> None:
        _check_hex(hex)
        if size < 1:
            raise BadTorrent(f"{_label(hex)} is empty: a blob of 0 bytes has no torrent")
        self.hex, self.size = hex, size
        self._plen = piece_length(size)
        self._pieces: list[bytes] = []
        self._piece = hashlib.sha1()
        self._in_piece = 0  # bytes of the current piece hashed so far
        self._fed = 0
        self._done = False

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Hash the next bytes of the blob. BadTorrent if they run past ``size``."""
        if self._done:
            raise ValueError("TorrentBuilder.feed after finish")
        view = memoryview(chunk).cast("B")
        if self._fed + len(view) > self.size:
            raise BadTorrent(
                f"{_label(self.hex)}: fed {self._fed + len(view)} bytes, its size is {self.size}"
            )
        self._fed += len(view)
        while view:
            n = min(len(view), self._plen - self._in_piece)
            self._piece.update(view[:n])
            self._in_piece += n
            view = view[n:]
            if self._in_piece == self._plen:
                self._pieces.append(self._piece.digest())
                self._piece, self._in_piece = hashlib.sha1(), 0

    def finish(self) -> Torrent:
        """The torrent. BadTorrent if fewer than ``size`` bytes were fed."""
        if self._fed != self.size:
            raise BadTorrent(f"{_label(self.hex)}: fed {self._fed} bytes, its size is {self.size}")
        if not self._done:
            if self._in_piece:
                self._pieces.append(self._piece.digest())
            self._done = True
        return Torrent(self.hex, self.size, self._plen, b"".join(self._pieces))


def build_from_file(path: Path, hex: str, size: int) -> Torrent:
    """The canonical torrent of the blob in ``path`` (blocking: call it on a thread).

    BadTorrent if the file is not ``size`` bytes long (it stops reading once past it).
    OSError as raised by open/read. Like the builder, it does not check the sha256.
    """
    builder = TorrentBuilder(hex, size)
    view = memoryview(bytearray(min(_READ_CHUNK, size + 1)))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            builder.feed(view[:n])
    return builder.finish()


def canonical(raw: bytes, hex: str, size: int) -> Torrent:
    """Check a torrent received for the blob (``hex``, ``size``), e.g. from a cache.

    Accepted only if it is canonical bencoding and its ``info`` is exactly fetchd's for
    this blob; keys outside ``info`` (announce, url-list, comment…) are ignored and dropped
    (the returned Torrent's ``raw`` is the canonical file). The piece hashes cannot be
    checked before the download: wrong ones only waste it (the sha256 at commit refuses
    the blob). Raises BadTorrent("torrent for sha256:… refused: <reason>"); ValueError if
    ``hex`` is not a sha256/sha512 hex digest (the caller's own value: a bug).
    """
    _check_hex(hex)
    try:
        return _canonical(raw, hex, size)
    except BadTorrent as exc:
        raise BadTorrent(f"torrent for {_label(hex)} refused: {exc.message}") from None


def _canonical(raw: bytes, hex: str, size: int) -> Torrent:
    if size < 1:
        raise BadTorrent("a blob of 0 bytes has no torrent")
    top = bdecode(raw)
    if not isinstance(top, dict) or not isinstance(top.get(b"info"), dict):
        raise BadTorrent("it has no info dict")
    info: dict[bytes, object] = top[b"info"]
    if b"files" in info:
        raise BadTorrent("it is a multi-file torrent (not fetchd's canonical form)")
    extra = sorted(set(info) - _INFO_KEYS)
    if extra:
        keys = ", ".join(_show(k) for k in extra[:5]) + (", …" if len(extra) > 5 else "")
        raise BadTorrent(
            f"its info has key{'s' if len(extra) > 1 else ''} {keys} (not fetchd's canonical form)"
        )
    missing = sorted(_INFO_KEYS - set(info))
    if missing:
        raise BadTorrent(f"its info lacks {', '.join(_show(k) for k in missing)}")
    name, length, plen, pieces = (
        info[b"name"],
        info[b"length"],
        info[b"piece length"],
        info[b"pieces"],
    )
    if name != hex.encode():
        shown = _show(name) if isinstance(name, bytes) else type(name).__name__
        raise BadTorrent(f"its name is {shown}, not the blob's hex digest")
    if not isinstance(length, int) or length != size:
        raise BadTorrent(f"its length is {length!r:.40}, the blob's size is {size}")
    want = piece_length(size)
    if not isinstance(plen, int) or plen != want:
        raise BadTorrent(
            f"its piece length is {plen!r:.40}; fetchd's rule gives {want} for {size} bytes"
        )
    n = -(-size // want)
    if not isinstance(pieces, bytes) or len(pieces) != _HASH * n:
        got = len(pieces) if isinstance(pieces, bytes) else type(pieces).__name__
        raise BadTorrent(f"its pieces are {got} bytes, {n} pieces need {_HASH * n}")
    return Torrent(hex, size, want, pieces)


# --- torrents made by others ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Foreign:
    """A single-file v1 torrent made by someone else (mktorrent, transmission-create,
    qBittorrent, libtorrent…), as :func:`parse_foreign` read it. ``name`` is sanitised
    (no '/', '\\\\', '..', NUL or control characters): fit to be shown or used as a file
    name, never a path. ``info_raw`` is the bencoded info dict the info-hash is over;
    ``raw`` the whole file as given."""

    info_hash: bytes
    name: str
    length: int
    piece_length: int
    pieces: bytes
    announce: list[str]
    url_list: list[str]
    info_raw: bytes
    raw: bytes

    @property
    def info_hash_hex(self) -> str:
        return self.info_hash.hex()

    @property
    def num_pieces(self) -> int:
        return len(self.pieces) // _HASH


def parse_foreign(raw: bytes) -> Foreign:
    """Read a single-file BitTorrent v1 torrent (a hybrid's v1 part is fine).

    Refused with BadTorrent: not canonical bencoding or beyond the bounds of
    :func:`bdecode`; multi-file; v2-only; a hybrid whose v2 part describes another file;
    a length below 1 or not matching the piece hashes; a piece length not a multiple of
    16 KiB or above 128 MiB. Trackers (``announce``, ``announce-list``) and web seeds
    (``url-list``) are kept if they are http(s) (or udp, for trackers) URLs, at most
    MAX_FOREIGN_URLS of each; the rest are dropped. Trust: nothing here is verified
    against content — the caller checks the pieces (the swarm does) and a --digest.
    """
    try:
        return _parse_foreign(raw)
    except BadTorrent as exc:
        raise BadTorrent(f"torrent refused: {exc.message}") from None


def _parse_foreign(raw: bytes) -> Foreign:
    top = bdecode(raw)
    if not isinstance(top, dict) or not isinstance(top.get(b"info"), dict):
        raise BadTorrent("it has no info dict")
    info: dict[bytes, object] = top[b"info"]
    if b"files" in info:
        raise BadTorrent("it is a multi-file torrent (fetchd stores single files only)")
    version = info.get(b"meta version")
    if b"pieces" not in info:
        if version is not None:
            raise BadTorrent("it is a BitTorrent v2-only torrent (fetchd reads v1)")
        raise BadTorrent("its info lacks 'pieces'")
    if version is not None and version != 2:
        raise BadTorrent(f"its meta version is {version!r:.20}")
    length, plen, pieces = info.get(b"length"), info.get(b"piece length"), info[b"pieces"]
    if not isinstance(length, int) or length < 1:
        raise BadTorrent(f"its length is {length!r:.40}")
    if (
        not isinstance(plen, int)
        or not MIN_FOREIGN_PIECE <= plen <= MAX_FOREIGN_PIECE
        or plen % MIN_FOREIGN_PIECE
    ):
        raise BadTorrent(
            f"its piece length is {plen!r:.40} (a multiple of 16 KiB up to 128 MiB is needed)"
        )
    n = math.ceil(length / plen)
    if not isinstance(pieces, bytes) or len(pieces) != _HASH * n:
        got = len(pieces) if isinstance(pieces, bytes) else type(pieces).__name__
        raise BadTorrent(
            f"its pieces are {got} bytes, {length} bytes in {plen}-byte pieces need {_HASH * n}"
        )
    name_raw = info.get(b"name")
    if not isinstance(name_raw, bytes):
        raise BadTorrent("its info has no name")
    attr = info.get(b"attr", b"")
    if not isinstance(attr, bytes) or b"l" in attr or b"p" in attr:
        raise BadTorrent(f"its file has attributes {attr!r:.20} (a symlink or pad file)")
    if version == 2:
        _check_hybrid(info, name_raw, length)
    info_raw = bencode(info)  # canonical input: these are the bytes of the file
    return Foreign(
        info_hash=hashlib.sha1(info_raw).digest(),
        name=_sanitise(name_raw),
        length=length,
        piece_length=plen,
        pieces=pieces,
        announce=_urls(_announces(top), "announce"),
        url_list=_urls(_as_list(top.get(b"url-list")), "url-list"),
        info_raw=info_raw,
        raw=bytes(raw),
    )


def _check_hybrid(info: dict[bytes, object], name: bytes, length: int) -> None:
    """A hybrid's v2 part must describe the same single file as its v1 part."""
    tree = info.get(b"file tree")
    leaf = tree.get(name) if isinstance(tree, dict) and len(tree) == 1 else None
    entry = leaf.get(b"") if isinstance(leaf, dict) and len(leaf) == 1 else None
    if not isinstance(entry, dict) or entry.get(b"length") != length:
        raise BadTorrent("its v2 file tree describes other files than its v1 part")


def _announces(top: dict[bytes, object]) -> list[object]:
    out: list[object] = [top.get(b"announce")]
    for tier in _as_list(top.get(b"announce-list")):
        out.extend(_as_list(tier))
    return out


def _as_list(v: object) -> list[object]:
    return v if isinstance(v, list) else [] if v is None else [v]


def _urls(values: list[object], key: str) -> list[str]:
    out: list[str] = []
    for v in values:
        if len(out) >= MAX_FOREIGN_URLS:
            break
        if not isinstance(v, bytes) or len(v) > MAX_URL_LENGTH:
            continue
        try:
            url = v.decode("ascii")
        except UnicodeDecodeError:
            continue
        ok = url.isprintable() and " " not in url and url.lower().startswith(_URL_SCHEMES[key])
        if ok and url not in out:
            out.append(url)
    return out


def _sanitise(name: bytes) -> str:
    """A torrent's name made safe as one file name: no separators, no '..', no NUL or
    control characters, at most MAX_NAME_BYTES bytes of UTF-8, never empty."""
    text = name.decode("utf-8", "replace")
    text = "".join("_" if ch in "/\\" or not ch.isprintable() else ch for ch in text)
    while ".." in text:
        text = text.replace("..", "_")
    text = text.strip().lstrip(".")
    while len(text.encode()) > MAX_NAME_BYTES:
        text = text[:-1]
    return text or "torrent"
