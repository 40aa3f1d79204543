"""ACI checks: one streaming pass over a downloaded App Container Image, before it is committed.

:func:`inspect_aci` is blocking (the engine runs it on a thread, after the download into the
ingest and before the commit). It never extracts anything and never seeks backwards: it reads
the file once, detects the compression by its magic bytes (gzip, bzip2, xz or none — appc's
four), decompresses with the stdlib (:mod:`gzip`, :mod:`bz2`, :mod:`lzma`), hashes the
uncompressed tar with sha512 (the appc image ID, ``sha512-`` + all 128 hex digits) and sha256
(the OCI ``diff_id``) as it goes, and reads the tar with :mod:`tarfile`'s stream mode.

Structure (spec/aci.md "Image Archives", made strict): exactly one ``manifest``, a regular
file of ≤ 1 MiB, parsed by :func:`fetchd.appc.manifest.parse_manifest`; everything else is
``rootfs`` (a directory) or under ``rootfs/``. Every name is canonical (no leading ``/`` or
``./``, no empty, ``.`` or ``..`` component), ≤ 4096 bytes, and appears once. No device nodes
(character or block), no sparse files, no unknown entry types. A hard link names an earlier
non-directory entry under ``rootfs/``; a relative symlink does not climb out of ``rootfs``
(an absolute one is relative to the image's root, so it stays inside by definition). No entry
lies below an earlier non-directory (a path through a symlink or a file). The archive ends
with its end-of-archive marker and nothing but zeros after it: a truncated stream, a corrupt
header (where :mod:`tarfile` would silently stop) or data hidden after the end is refused.

Bounds, all checked while reading: ≤ 1,000,000 entries; extended (pax, GNU long name)
headers ≤ 1 MiB and ≤ 16 in a row; the uncompressed bytes ≤ ``max_uncompressed`` when the
caller gives one (a dependency's ``size``: "… is larger than its size N"), else ≤ 64 GiB and
≤ max(256 MiB, 1100 × the compressed size) — gzip cannot expand more than 1032 times, so only a
bzip2 or xz bomb meets that ratio. Memory is bounded too: names are remembered as 16-byte
hashes, and :mod:`tarfile`'s member list is emptied as the walk goes.

Every refusal is :class:`~fetchd.errors.ImageInvalid` with one line "WHAT: …" naming the
entry and the rule; a file that cannot be read is :class:`~fetchd.errors.StoreError`.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import lzma
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from fetchd.appc.manifest import MAX_MANIFEST_BYTES, AppcManifest, parse_manifest
from fetchd.errors import FetchdError, ImageInvalid, StoreError

_BASE = "application/vnd.fetchd.appc.aci.v1.tar"
#: Layer media types of ACIs in the store, by compression (stage1 decompresses by the suffix).
ACI_MEDIA_TYPES: dict[str | None, str] = {
    "gzip": _BASE + "+gzip",
    "bzip2": _BASE + "+bzip2",
    "xz": _BASE + "+xz",
    None: _BASE,
}

MAX_ENTRIES = 1_000_000
MAX_PATH = 4096
#: Largest pax or GNU long-name header, and most of them in front of one entry.
MAX_EXTENDED_HEADER = 1 << 20
MAX_EXTENDED_CHAIN = 16
#: The uncompressed bound when the caller gives none.
MAX_UNCOMPRESSED = 64 << 30
BOMB_RATIO = 1100
BOMB_FLOOR = 256 << 20

_CHUNK = 1 << 20
_EOF_BLOCKS = 1024  # two zero blocks end a tar
_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)
_FOREIGN_MAGIC = ((b"\x28\xb5\x2f\xfd", "zstd"), (b"\x04\x22\x4d\x18", "lz4"))
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_EXTENDED = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
# what an earlier name was (values of the walk's `seen`)
_DIR, _IMPLIED, _OTHER = 0, 1, 2


@dataclass(frozen=True)
class Inspected:
    """What one pass over an ACI found (all of it checked)."""

    compression: str | None  # "gzip", "bzip2", "xz" or None
    media_type: str  # ACI_MEDIA_TYPES[compression]
    image_id: str  # "sha512-" + 128 hex of the uncompressed tar
    diff_id: str  # "sha256:" + hex of the uncompressed tar
    uncompressed_size: int
    manifest: AppcManifest


class _Refused(Exception):
    """Raised inside tarfile's callbacks; inspect_aci turns it into ImageInvalid."""


class _Raw:
    """The ACI file; a read error is the store's (StoreError), never the image's."""

    def __init__(self, f: IO[bytes], path: Path) -> None:
        self._f, self._path = f, path

    def read(self, n: int = -1) -> bytes:
        try:
            return self._f.read(n)
        except OSError as exc:
            raise StoreError(f"cannot read {self._path}: {exc.strerror or exc}") from exc

    def readable(self) -> bool:
        return True


class _Hashing:
    """The uncompressed stream as tarfile reads it: fetched from the decompressor in 1 MiB
    chunks, each hashed (sha512, sha256) and counted once; served in the sizes asked for."""

    def __init__(self, src: Any, limit: int, over: Callable[[int], str]) -> None:
        self._src, self._limit, self._over = src, limit, over
        self.sha512, self.sha256 = hashlib.sha512(), hashlib.sha256()
        self.total = 0  # bytes fetched from the decompressor
        self.eof = False
        self._buf = memoryview(b"")
        self._empty_reads = 0
        # the last two chunks with their start offsets: covers tarfile's read-ahead
        self._tail: list[tuple[int, bytes]] = []

    def _fetch(self) -> bytes:
        chunk: bytes = self._src.read(_CHUNK)
        if not chunk:
            self.eof = True
            return b""
        start = self.total
        self.total += len(chunk)
        if self.total > self._limit:
            raise _Refused(self._over(self._limit))
        self.sha512.update(chunk)
        self.sha256.update(chunk)
        self._tail = [*self._tail[-1:], (start, chunk)]
        return chunk

    def read(self, n: int = -1) -> bytes:
        if n == 0:
            return b""
        if n < 0:
            n = _CHUNK
        if not self._buf and not self.eof:
            self._buf = memoryview(self._fetch())
        if not self._buf:
            # tarfile skips a member's data by reading it; past the end that loop would spin
            self._empty_reads += 1
            if self._empty_reads > 4:
                raise _Refused("the tar archive is truncated (an entry's data is missing)")
            return b""
        out = bytes(self._buf[:n])
        self._buf = self._buf[n:]
        return out

    def readable(self) -> bool:
        return True

    def rest_is_zero(self, pos: int) -> bool:
        """Read to the end; True if every byte from offset ``pos`` on is zero."""
        for start, chunk in self._tail:
            if start + len(chunk) > pos:
                part = chunk[max(0, pos - start) :]
                if part.count(0) != len(part):
                    return False
        if self._tail and self._tail[0][0] > pos:
            return False  # cannot happen: tarfile reads ahead at most one record
        while not self.eof:
            chunk = self._fetch()
            if chunk.count(0) != len(chunk):
                return False
        return True


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile's member parser with bounds on what it would otherwise read into memory."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        chain = getattr(tf, "_fetchd_chain", 0)
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Refused(f"entry {self.name!r} is a sparse file, which fetchd does not accept")
        if self.type in _EXTENDED:
            if self.size > MAX_EXTENDED_HEADER:
                raise _Refused(
                    f"an extended tar header of {self.size} bytes is larger than "
                    f"{MAX_EXTENDED_HEADER} bytes"
                )
            if chain >= MAX_EXTENDED_CHAIN:
                raise _Refused(f"more than {MAX_EXTENDED_CHAIN} extended tar headers in a row")
            setattr(tf, "_fetchd_chain", chain + 1)  # noqa: B010
        member: tarfile.TarInfo = cast(Any, super())._proc_member(tf)
        limit = getattr(tf, "_fetchd_limit", None)  # checked on the final size (pax "size")
        if limit is not None and member.size > limit:
            raise _Refused(
                f"entry {member.name!r} claims {member.size} bytes, more than the {limit} "
                "uncompressed bytes this image may have"
            )
        return member


def _detect(head: bytes) -> str | None:
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    for magic, name in _FOREIGN_MAGIC:
        if head.startswith(magic):
            raise _Refused(f"compressed with {name}; an ACI is a tar, optionally gzip, bzip2 or xz")
    return None


def _key(name: str) -> bytes:
    return hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=16).digest()


def _check_name(name: str, role: str) -> list[str]:
    """The components of ``name`` (an entry's name or a hard link's target) if it is canonical."""
    if len(name.encode("utf-8", "surrogateescape")) > MAX_PATH:
        raise _Refused(f"{role} {name[:64]!r}… is longer than {MAX_PATH} bytes")
    if name.startswith("/"):
        raise _Refused(f"{role} {name!r} is an absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise _Refused(f"{role} {name!r} has a '..' component")
    if "" in parts or "." in parts:
        raise _Refused(f"{role} {name!r} is not a canonical path (empty or '.' component)")
    return parts


class _Walk:
    """The per-entry rules, applied in archive order."""

    def __init__(self) -> None:
        self.seen: dict[bytes, int] = {}
        self.count = 0
        self.manifest: bytes | None = None

    def entry(self, info: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        self.count += 1
        if self.count > MAX_ENTRIES:
            raise _Refused(f"the archive has more than {MAX_ENTRIES} entries")
        name = info.name
        parts = _check_name(name, "entry")
        if parts[0] == "manifest" and len(parts) == 1:
            self._manifest(info, tf)
            return
        if parts[0] != "rootfs":
            raise _Refused(
                f"entry {name!r} is outside rootfs/ (an ACI holds only manifest and rootfs/)"
            )
        if info.issparse():
            raise _Refused(f"entry {name!r} is a sparse file, which fetchd does not accept")
        if info.ischr() or info.isblk():
            raise _Refused(f"entry {name!r} is a device node, which an ACI may not contain")
        if (
            not (info.isdir() or info.issym() or info.islnk() or info.isfifo())
            and info.type not in _REGULAR
        ):
            raise _Refused(f"entry {name!r} has the unknown tar type {info.type!r}")
        if len(parts) == 1 and not info.isdir():
            raise _Refused("rootfs is not a directory")
        if info.issym():
            self._symlink(name, parts, info.linkname)
        elif info.islnk():
            self._hardlink(name, info.linkname)
        self._record(name, parts, _DIR if info.isdir() else _OTHER)

    def _manifest(self, info: tarfile.TarInfo, tf: tarfile.TarFile) -> None:
        if self.manifest is not None:
            raise _Refused("the archive has more than one manifest")
        if info.type not in _REGULAR or info.issparse():
            raise _Refused("manifest is not a regular file")
        if info.size > MAX_MANIFEST_BYTES:
            raise _Refused(f"manifest is {info.size} bytes, larger than 1 MiB")
        f = tf.extractfile(info)
        data = b"" if f is None else f.read(MAX_MANIFEST_BYTES + 1)
        if len(data) != info.size:
            raise _Refused("the tar archive is truncated (in manifest)")
        self.manifest = data

    def _symlink(self, name: str, parts: list[str], target: str) -> None:
        if not target:
            raise _Refused(f"symlink {name!r} has an empty target")
        if len(target.encode("utf-8", "surrogateescape")) > MAX_PATH:
            raise _Refused(f"symlink {name!r} has a target longer than {MAX_PATH} bytes")
        if target.startswith("/"):
            return  # resolved in the image's root: rootfs
        depth = len(parts) - 2  # directories between rootfs and the link
        for comp in target.split("/"):
            if comp == "..":
                depth -= 1
                if depth < 0:
                    raise _Refused(f"symlink {name!r} -> {target!r} points outside rootfs")
            elif comp not in ("", "."):
                depth += 1

    def _hardlink(self, name: str, target: str) -> None:
        tparts = _check_name(target, f"hard link {name!r} target")
        if tparts[0] != "rootfs" or len(tparts) == 1:
            raise _Refused(f"hard link {name!r} -> {target!r} points outside rootfs")
        if self.seen.get(_key(target)) != _OTHER:
            raise _Refused(
                f"hard link {name!r} -> {target!r} does not name an earlier file in rootfs"
            )

    def _record(self, name: str, parts: list[str], kind: int) -> None:
        key = _key(name)
        had = self.seen.get(key)
        if had is not None and not (had == _IMPLIED and kind == _DIR):
            if had == _IMPLIED:
                raise _Refused(f"entry {name!r} is not a directory but earlier entries are in it")
            raise _Refused(f"entry {name!r} appears twice")
        self.seen[key] = kind
        # ancestors: stop at the first one already known (its own ancestors were checked then)
        for i in range(len(parts) - 1, 0, -1):
            parent = "/".join(parts[:i])
            pkey = _key(parent)
            state = self.seen.get(pkey)
            if state is None:
                self.seen[pkey] = _IMPLIED
                continue
            if state == _OTHER:
                raise _Refused(f"entry {name!r} lies below {parent!r}, which is not a directory")
            break


def _over_message(max_uncompressed: int | None, compressed: int) -> Callable[[int], str]:
    def over(limit: int) -> str:
        if max_uncompressed is not None and limit == max_uncompressed:
            return (
                f"the uncompressed tar is larger than its size {limit} "
                "(the bound its parent's manifest gives)"
            )
        if limit == MAX_UNCOMPRESSED:
            return (
                f"the uncompressed tar is larger than {MAX_UNCOMPRESSED} bytes, "
                "fetchd's limit for an ACI"
            )
        return (
            f"the {compressed} bytes decompress to more than {limit}: refused as a "
            f"decompression bomb (over {BOMB_RATIO} times its compressed size)"
        )

    return over


def inspect_aci(path: Path, what: str, *, max_uncompressed: int | None = None) -> Inspected:
    """Check the ACI at ``path`` (see the module docstring) and return what it is.

    ``what`` names the image in messages ("example.com/app-1.0.aci"). ``max_uncompressed``
    bounds the uncompressed tar (a dependency's ``size``). Blocking: call it on a thread."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - the ExitStack closes it, after what wraps it
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror or exc}") from exc
    compression: str | None = None
    walk = _Walk()
    with contextlib.ExitStack() as stack:
        stack.enter_context(f)
        compressed = os.fstat(f.fileno()).st_size
        if max_uncompressed is not None:
            limit = min(max_uncompressed, MAX_UNCOMPRESSED)
        else:
            limit = min(MAX_UNCOMPRESSED, max(BOMB_FLOOR, BOMB_RATIO * compressed))
        raw = _Raw(f, path)
        try:
            compression = _detect(raw.read(8))
            f.seek(0)
            src: Any = raw
            if compression == "gzip":
                src = stack.enter_context(gzip.GzipFile(fileobj=cast(Any, raw), mode="rb"))
            elif compression == "bzip2":
                src = stack.enter_context(bz2.BZ2File(cast(Any, raw), mode="rb"))
            elif compression == "xz":
                src = stack.enter_context(lzma.LZMAFile(cast(Any, raw), mode="rb"))
            stream = _Hashing(src, limit, _over_message(max_uncompressed, compressed))
            return _walk(stream, walk, compression, what, limit)
        except _Refused as exc:
            raise ImageInvalid(f"{what}: {exc}") from None
        except FetchdError:
            raise
        except tarfile.TarError as exc:
            if walk.count == 0:
                kind = f"{compression} data" if compression else "file"
                raise ImageInvalid(
                    f"{what}: not an ACI: the {kind} is not a tar archive ({exc})"
                ) from None
            raise ImageInvalid(f"{what}: the tar archive is corrupt or truncated ({exc})") from None
        except EOFError:
            raise ImageInvalid(
                f"{what}: the {compression} stream is truncated (it ends before its end marker)"
            ) from None
        except (OSError, zlib.error, lzma.LZMAError) as exc:
            raise ImageInvalid(
                f"{what}: the {compression or 'tar'} data is corrupt ({exc})"
            ) from None
        except RecursionError:
            raise ImageInvalid(f"{what}: the tar archive's headers nest too deeply") from None


def _walk(
    stream: _Hashing, walk: _Walk, compression: str | None, what: str, limit: int
) -> Inspected:
    # nothing to close: the stream belongs to the caller
    tf = tarfile.open(fileobj=cast(Any, stream), mode="r|", tarinfo=_BoundedTarInfo)  # noqa: SIM115
    setattr(tf, "_fetchd_limit", limit)  # noqa: B010
    members: list[tarfile.TarInfo] = cast(Any, tf).members
    while True:
        setattr(tf, "_fetchd_chain", 0)  # noqa: B010
        info = tf.next()
        members.clear()  # stream mode keeps every member otherwise
        if info is None:
            break
        walk.entry(info, tf)
    end = tf.offset  # where tarfile met the first zero block (or the end of the data)
    if not stream.rest_is_zero(end):
        raise _Refused(
            f"the tar archive has a corrupt header or data after its end (at byte {end})"
        )
    if stream.total - end < _EOF_BLOCKS:
        raise _Refused("the tar archive is truncated (it has no end-of-archive marker)")
    if walk.manifest is None:
        raise _Refused("the archive has no manifest")
    manifest = parse_manifest(walk.manifest, what)
    return Inspected(
        compression=compression,
        media_type=ACI_MEDIA_TYPES[compression],
        image_id="sha512-" + stream.sha512.hexdigest(),
        diff_id="sha256:" + stream.sha256.hexdigest(),
        uncompressed_size=stream.total,
        manifest=manifest,
    )
