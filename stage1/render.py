"""Applying an image's layers, in order, to a directory: the rendered root filesystem.

Rules (OCI image spec, "Applying changesets"), for an unprivileged renderer facing layers
that may be hostile:

- Every member's path is resolved inside the tree as the container will see it
  (``inroot.Root.walk``): symlinks on the way are followed inside the tree, absolute
  targets from the tree's root, ``..`` stops at the root. The member's own name is never
  followed: an existing entry there is replaced (a directory kept if the member is one).
- Hard links: the target is resolved the same way and must already be in the tree.
- Whiteouts ``.wh.NAME`` remove NAME; an opaque ``.wh..wh..opq`` removes what lower layers
  put in its directory (entries of the same layer stay). Whiteout entries are not created.
- No setuid/setgid bits; device nodes are skipped, with one warning per render; ownership
  is the renderer's uid; xattrs are not applied.
- Directories stay writable by their owner while layers are applied; their real modes
  are applied at the end, deepest first.
- Sparse files stay sparse: only the data regions of a GNU/PAX sparse member are written,
  and a run of zeros in a regular member (a whole 1 MiB chunk) becomes a hole.

Bounds, whatever the layers say (``Limits``): the data written, the files' total size,
the number of entries created and the wall time of one render; the headers of one member
(1 MiB); the work of resolving one path (``inroot``). Walks keep a bounded number of
descriptors open and cost time linear in the tree, however deep or wide.

ACI layers (media type ``application/vnd.fetchd.appc.aci.v1.tar[+gzip|+bzip2|+xz]``, an appc
image as fetchd stores it): only ``rootfs/…`` is rendered, with that prefix stripped (hard link
targets too); ``manifest`` and the ``rootfs`` directory itself are skipped; any other member is
an error (an ACI holds nothing else). appc has no whiteouts: ``.wh.`` names are plain files
there. Every other rule above applies as to any layer.

A member that cannot be applied inside the tree raises Stage1Error naming the layer and
the member. The caller renders into a private directory and publishes it only on success.
"""

from __future__ import annotations

import copy
import io
import os
import stat
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, cast

from stage1.appc import is_aci_layer
from stage1.errors import DigestMismatch, Stage1Error
from stage1.inroot import (
    Cursor,
    Identity,
    Location,
    MissingError,
    ResolveError,
    Root,
    descend,
    identity,
    remove,
)
from stage1.layout import VerifiedReader
from stage1.model import Descriptor

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)
_PERM_MASK = 0o1777  # permission bits and sticky; never setuid/setgid
_MAX_HEADERS = 1 << 20  # the header blocks of one member (PAX records, long names, sparse maps)
_GIB = 1 << 30
_ROOTFS = "rootfs/"


class LayerError(Stage1Error):
    pass


@dataclass(frozen=True)
class Limits:
    """What one render (all layers of an image) may cost. From the environment:

    STAGE1_RENDER_MAX_BYTES    data written (default: the free space of the tree's
                               filesystem, less 1% of it and at most 1 GiB)
    STAGE1_RENDER_MAX_SIZE     the files' total size, holes included (default 1 TiB)
    STAGE1_RENDER_MAX_ENTRIES  files, directories and links created (default 2,000,000)
    STAGE1_RENDER_MAX_SECONDS  wall time (default 1800)
    """

    data: int
    data_why: str
    size: int
    entries: int
    seconds: float

    @classmethod
    def from_environment(cls, tree_fd: int) -> Limits:
        data = _env_number("STAGE1_RENDER_MAX_BYTES")
        why = "STAGE1_RENDER_MAX_BYTES"
        if data is None:
            fs = os.statvfs(tree_fd)
            reserve = min(_GIB, fs.f_blocks * fs.f_frsize // 100)
            data = max(0, fs.f_bavail * fs.f_frsize - reserve)
            why = f"the free space on the store's filesystem, less {_size(reserve)}"
        size = _env_number("STAGE1_RENDER_MAX_SIZE")
        entries = _env_number("STAGE1_RENDER_MAX_ENTRIES")
        seconds = _env_number("STAGE1_RENDER_MAX_SECONDS", float)
        return cls(
            data=int(data),
            data_why=why,
            size=int(1 << 40 if size is None else size),
            entries=int(2_000_000 if entries is None else entries),
            seconds=1800.0 if seconds is None else seconds,
        )


def _env_number(name: str, kind: Callable[[str], Any] = int) -> Any:
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        value = kind(text)
        if not value >= 0:
            raise ValueError(text)
    except ValueError:
        raise Stage1Error(f"{name} must be a number >= 0, not {text!r}") from None
    return value


def _size(n: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", _GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


class _Budget:
    """What this render has spent so far against its Limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.data = 0
        self.size = 0
        self.entries = 0

    def clock(self) -> None:
        if time.monotonic() > self.deadline:
            raise _Exceeded(
                f"rendering takes longer than {self.limits.seconds:g} s; "
                "set STAGE1_RENDER_MAX_SECONDS to allow more"
            )

    def entry(self, count: int = 1) -> None:
        self.entries += count
        if self.entries > self.limits.entries:
            raise _Exceeded(
                f"the image has more than {self.limits.entries} files, directories and "
                "links; set STAGE1_RENDER_MAX_ENTRIES to allow more"
            )

    def file_size(self, size: int) -> None:
        self.size += size
        if self.size > self.limits.size:
            raise _Exceeded(
                f"the image's files add up to more than {_size(self.limits.size)}; "
                "set STAGE1_RENDER_MAX_SIZE to allow more"
            )

    def written(self, count: int) -> None:
        self.data += count
        if self.data > self.limits.data:
            raise _Exceeded(
                f"rendering would write more than {_size(self.limits.data)} "
                f"({self.limits.data_why}); free space, or set STAGE1_RENDER_MAX_BYTES"
            )


class _Exceeded(Exception):
    """A limit of the render was reached (the message says which); the layer names itself."""


class _BadStream(Exception):
    """Decompressing the layer failed (the cause is the decompressor's error)."""


def render(
    tree_fd: int,
    layers: Sequence[tuple[Descriptor, IO[bytes]]],
    warn: Callable[[str], None],
    limits: Limits | None = None,
) -> None:
    """Apply LAYERS (descriptor and open blob) to the empty directory TREE_FD."""
    old_umask = os.umask(0)
    root = Root(tree_fd, remember=True)
    try:
        budget = _Budget(limits or Limits.from_environment(tree_fd))
        modes: dict[Identity, int] = {}
        devices: list[str] = []  # skipped device nodes: one warning for the render
        for desc, blob in layers:
            _Layer(root, desc, modes, warn, budget, devices).apply(blob)
        root.forget()
        if devices:
            shown = ", ".join(devices[:_DEVICES_SHOWN]) + (
                ", …" if len(devices) > _DEVICES_SHOWN else ""
            )
            warn(
                f"warning: {len(devices)} device node{'s' if len(devices) > 1 else ''} "
                f"skipped ({shown}): an unprivileged tree cannot hold one; the container's "
                "/dev has null, zero, full, random, urandom and tty"
            )
        if modes:
            _apply_modes(tree_fd, modes)
    finally:
        root.forget()
        os.umask(old_umask)


_DEVICES_SHOWN = 5  # names in the one warning about skipped device nodes


def _apply_modes(tree_fd: int, modes: dict[Identity, int]) -> None:
    """Give directories their real modes, each after everything below it (one walk of the
    tree; a directory's mode is set once the walk is back in its parent)."""

    def scan(cur: Cursor) -> list[str]:
        with os.scandir(cur.fd) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]

    def leave(_cur: Cursor, _name: str, fd: int) -> None:
        perm = modes.get(identity(os.fstat(fd)))
        if perm is not None:
            os.fchmod(fd, perm)

    cursor = Cursor(tree_fd)
    try:
        descend(cursor, scan, leave)
    finally:
        cursor.close()


def preload(layers: Sequence[Descriptor]) -> None:
    """Import what decompressing LAYERS needs, now: after a drop from root to another uid
    the interpreter's library may no longer be readable (a Python installed under /root)."""
    import gzip  # noqa: F401

    if any(desc.media_type.endswith("+zstd") for desc in layers):
        import zstandard  # noqa: F401
    if any(is_aci_layer(desc.media_type) for desc in layers):
        import bz2  # noqa: F401
        import lzma  # noqa: F401


def _decompressor(desc: Descriptor, reader: VerifiedReader) -> io.BufferedIOBase | IO[bytes]:
    media_type = desc.media_type
    raw = io.BufferedReader(reader, _CHUNK)
    if media_type.endswith(("+gzip", ".gzip")):
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    if is_aci_layer(media_type) and media_type.endswith(("+bzip2", "+xz")):
        if media_type.endswith("+bzip2"):
            import bz2

            return bz2.BZ2File(raw, mode="rb")
        import lzma

        return lzma.LZMAFile(raw, mode="rb")
    if media_type.endswith("+zstd"):
        import zstandard

        stream: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return stream
    if media_type.endswith(("tar", ".tar")):
        return raw
    raise LayerError(f"layer {desc.digest}: unsupported media type {media_type or '(none)'}")


class _TarInput:
    """The decompressed layer as tarfile reads it: forward only, headers bounded.

    tarfile reads a member's extended headers (PAX records, GNU long names, sparse maps)
    whole into memory, whatever size they claim; here they may take at most _MAX_HEADERS
    bytes per member. Seeking forward skips data (with the render's clock running);
    seeking back (a member whose size contradicts the archive) is an error.
    """

    def __init__(self, stream: io.BufferedIOBase | IO[bytes], budget: _Budget) -> None:
        self._stream = stream
        self._budget = budget
        self._pos = 0
        self._headers = 0
        self.last_block = b""

    def next_member(self) -> None:
        self._headers = 0

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            raise tarfile.ReadError("an unbounded read")  # tarfile always gives a size
        self._headers += size
        if self._headers > _MAX_HEADERS:
            raise tarfile.ReadError(f"a member's headers take more than {_MAX_HEADERS} bytes")
        data = self.data(size)
        if size == tarfile.BLOCKSIZE:
            self.last_block = data
        return data

    def data(self, size: int) -> bytes:
        """Up to SIZE bytes of member data (fewer only at the end of the layer)."""
        parts = []
        left = size
        while left > 0:
            try:
                chunk = self._stream.read(left)
            except DigestMismatch:
                raise
            except Exception as exc:
                raise _BadStream(str(exc)) from exc
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        if whence != os.SEEK_SET or pos < self._pos:
            raise tarfile.ReadError("a member's size does not match the archive")
        while self._pos < pos:
            self._budget.clock()
            if not self.data(min(_CHUNK, pos - self._pos)):
                break  # tarfile notices the end itself
        return self._pos

    def tell(self) -> int:
        return self._pos

    def seekable(self) -> bool:
        return True


def _show(name: str) -> str:
    return name if name.isprintable() else ascii(name)


def _aci_path(name: str) -> str | None:
    """An ACI member's path in the tree (rootfs/ stripped), "" for rootfs itself, None for
    a member outside rootfs."""
    name = name.removeprefix("./")
    if name.rstrip("/") == "rootfs":
        return ""
    if name.startswith(_ROOTFS):
        return name[len(_ROOTFS) :]
    return None


class _Layer:
    def __init__(
        self,
        root: Root,
        desc: Descriptor,
        modes: dict[Identity, int],
        warn: Callable[[str], None],
        budget: _Budget,
        devices: list[str],
    ) -> None:
        self.root = root
        self.desc = desc
        self.modes = modes
        self.warn = warn
        self.budget = budget
        self.devices = devices
        # What this layer created (and the directories above): an opaque whiteout hides
        # only what lower layers put there.
        self.added: set[Identity] = set()
        self.aci = is_aci_layer(desc.media_type)
        self.shown = ""  # the member's name in the layer, for errors (an ACI's has rootfs/)

    def apply(self, blob: IO[bytes]) -> None:
        reader = VerifiedReader(blob, self.desc, "layer")
        try:
            source = _TarInput(_decompressor(self.desc, reader), self.budget)
            try:
                archive = tarfile.open(fileobj=cast(IO[bytes], source), mode="r:")  # noqa: SIM115
            except tarfile.ReadError as exc:
                if str(exc) != "empty file":
                    raise
                reader.drain()  # a zero-byte layer: nothing to apply
                return
            with archive:
                members = iter(archive)
                while (member := next(members, None)) is not None:
                    source.next_member()
                    self.budget.clock()
                    self._member(source, member)
                    # Nothing of this layer's headers is needed again.
                    archive.members.clear()  # type: ignore[attr-defined]
            if source.last_block.strip(b"\0"):
                # tarfile ends an archive quietly at a header it cannot read; a layer
                # that does not end with the end-of-archive blocks is damaged.
                raise tarfile.ReadError(f"bad header at offset {source.tell() - 512}")
            reader.drain()
        except (LayerError, DigestMismatch):
            raise
        except _Exceeded as exc:
            raise LayerError(f"layer {self.desc.digest}: {exc}") from exc
        except Exception as exc:
            # A corrupt blob shows up as a decompression or tar error: name the real cause.
            reader.drain()
            cause = exc.__cause__ if isinstance(exc, _BadStream) else exc
            if self.aci:
                kind = "a valid ACI"
            elif type(cause).__module__.startswith("zstandard"):
                kind = "valid zstd"
            elif isinstance(cause, OSError) and not isinstance(cause, tarfile.TarError):
                kind = "a valid layer"
            else:
                kind = "a valid tar"
            raise LayerError(f"layer {self.desc.digest} is not {kind}: {cause}") from exc

    def _member(self, source: _TarInput, member: tarfile.TarInfo) -> None:
        self.shown = member.name
        try:
            if self.aci:
                inner = self._aci_member(member)
                if inner is None:
                    return
                member = inner
            self._apply_member(source, member)
        except LayerError:
            raise
        except _Exceeded as exc:
            raise self._error(member, str(exc)) from exc
        except (ResolveError, OSError, ValueError, OverflowError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise self._error(member, reason) from exc

    def _error(self, member: tarfile.TarInfo, reason: str) -> LayerError:
        name = self.shown or member.name
        return LayerError(f"layer {self.desc.digest} member {_show(name)}: {reason}")

    def _aci_member(self, member: tarfile.TarInfo) -> tarfile.TarInfo | None:
        """MEMBER of an ACI as a member of the tree (None: not rendered); LayerError for
        one that an ACI cannot hold."""
        name = _aci_path(member.name)
        if name is None:
            if member.name.removeprefix("./") == "manifest" and member.isreg():
                return None  # the appc manifest: fetchd keeps it as a blob
            raise self._error(member, "is not the manifest and not under rootfs/ (not an ACI)")
        if not name.strip("/"):
            return None  # rootfs itself: the tree's root keeps its own mode
        inner = copy.copy(member)
        inner.name = name
        if member.islnk():
            target = _aci_path(member.linkname)
            if target is None or not target.strip("/"):
                raise self._error(
                    member, f"hard link target {_show(member.linkname)} is not under rootfs/"
                )
            inner.linkname = target
        return inner

    def _apply_member(self, source: _TarInput, member: tarfile.TarInfo) -> None:
        base = member.name.rstrip("/").rpartition("/")[2]
        if base.startswith(WHITEOUT) and not self.aci:
            self._whiteout(member, base)
            return
        if member.ischr() or member.isblk():
            self.devices.append(_show(member.name))  # said once, after the last layer
            return
        known = member.isdir() or member.isreg() or member.issym() or member.islnk()
        if not known and not member.isfifo():
            self.warn(
                f"warning: layer {self.desc.digest} member {_show(member.name)}: "
                f"unsupported type {member.type!r} skipped"
            )
            return
        made = self.root.made_dirs
        try:
            loc = self.root.walk(member.name, follow=False, create=True)
        finally:
            self.budget.entry(self.root.made_dirs - made)
        with loc:
            if not loc.name:
                if member.isdir():
                    return  # the root itself, or a directory by another name
                raise self._error(member, "names a directory, not a file")
            existing = loc.lstat()
            perm = member.mode & _PERM_MASK
            if member.isdir():
                if existing is None or not stat.S_ISDIR(existing.st_mode):
                    self.budget.entry()
                self._directory(loc, existing, perm)
            elif member.islnk():
                self.budget.entry()
                self._hardlink(member, loc, existing)
            else:
                self.budget.entry()
                if existing is not None:
                    self._remove(loc.fd, loc.name)
                if member.issym():
                    os.symlink(member.linkname, loc.name, dir_fd=loc.fd)
                elif member.isfifo():
                    os.mkfifo(loc.name, perm, dir_fd=loc.fd)
                else:
                    self._regular(source, member, loc, perm)
                    return
                self._mark_added(loc)
                mtime = int(member.mtime * 1_000_000_000)
                os.utime(loc.name, ns=(mtime, mtime), dir_fd=loc.fd, follow_symlinks=False)

    def _mark_added(self, loc: Location, st: os.stat_result | None = None) -> None:
        if st is None:
            st = os.stat(loc.name, dir_fd=loc.fd, follow_symlinks=False)
        self.added.add(identity(st))
        for ident in reversed(loc.ids):
            if ident in self.added:
                break
            self.added.add(ident)

    def _directory(self, loc: Location, existing: os.stat_result | None, perm: int) -> None:
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            if existing is not None:
                self._remove(loc.fd, loc.name)
            os.mkdir(loc.name, perm | 0o700, dir_fd=loc.fd)
        fd = os.open(loc.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=loc.fd)
        try:
            if existing is not None:
                os.fchmod(fd, perm | 0o700)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self._mark_added(loc, st)
        if perm & 0o700 == 0o700:
            self.modes.pop(identity(st), None)
        else:
            self.modes[identity(st)] = perm

    def _hardlink(
        self, member: tarfile.TarInfo, loc: Location, existing: os.stat_result | None
    ) -> None:
        with self.root.walk(member.linkname, follow=False) as target:
            source = target.lstat() if target.name else None
            if source is None:
                raise self._error(
                    member, f"hard link target {_show(member.linkname)} is not in the image"
                )
            if stat.S_ISDIR(source.st_mode):
                raise self._error(
                    member, f"hard link target {_show(member.linkname)} is a directory"
                )
            if existing is not None:
                if (existing.st_dev, existing.st_ino) == (source.st_dev, source.st_ino):
                    return
                self._remove(loc.fd, loc.name)
            os.link(
                target.name,
                loc.name,
                src_dir_fd=target.fd,
                dst_dir_fd=loc.fd,
                follow_symlinks=False,
            )
        self._mark_added(loc, source)

    def _regions(self, member: tarfile.TarInfo) -> list[tuple[int, int]]:
        """The data regions (offset, length) of a regular member, checked."""
        if member.size < 0:
            raise self._error(member, f"invalid size {member.size}")
        sparse: list[tuple[int, int]] | None = getattr(member, "sparse", None)
        if sparse is None:
            return [(0, member.size)]
        end = 0
        for offset, length in sparse:
            if offset < end or length < 0 or offset + length > member.size:
                raise self._error(member, "invalid sparse map")
            end = offset + length
        return list(sparse)

    def _regular(
        self, source: _TarInput, member: tarfile.TarInfo, loc: Location, perm: int
    ) -> None:
        regions = self._regions(member)
        self.budget.file_size(member.size)
        source.seek(member.offset_data)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(loc.name, flags, 0o600, dir_fd=loc.fd)
        try:
            for offset, length in regions:
                while length > 0:
                    self.budget.clock()
                    chunk = source.data(min(_CHUNK, length))
                    if not chunk:
                        raise tarfile.ReadError("unexpected end of data")
                    zero = chunk == _ZEROS if len(chunk) == _CHUNK else not chunk.strip(b"\0")
                    if not zero:  # zeros stay a hole
                        self.budget.written(len(chunk))
                        view = memoryview(chunk)
                        at = offset
                        while view:
                            written = os.pwrite(fd, view, at)
                            at += written
                            view = view[written:]
                    offset += len(chunk)
                    length -= len(chunk)
            os.ftruncate(fd, member.size)
            os.fchmod(fd, perm)
            mtime = int(member.mtime * 1_000_000_000)
            os.utime(fd, ns=(mtime, mtime))
            self._mark_added(loc, os.fstat(fd))
        finally:
            os.close(fd)

    def _whiteout(self, member: tarfile.TarInfo, base: str) -> None:
        victim = base[len(WHITEOUT) :]
        if base != OPAQUE and victim.startswith(WHITEOUT):
            return  # other AUFS metadata (.wh..wh.plnk, ...): not part of the image
        if base != OPAQUE and victim in ("", ".", ".."):
            raise self._error(member, "invalid whiteout")
        try:
            loc = self.root.walk(member.name.rstrip("/"), follow=False)
        except MissingError:
            return  # nothing there to hide
        with loc:
            if base == OPAQUE:
                self._opaque(loc)
            else:
                self._remove(loc.fd, victim)

    def _opaque(self, loc: Location) -> None:
        """Remove what lower layers put in LOC's directory, keeping this layer's entries."""

        def scan(cur: Cursor) -> list[str]:
            subdirs = []
            with os.scandir(cur.fd) as entries:
                found = [(e.name, e.stat(follow_symlinks=False)) for e in entries]
            for name, st in found:
                if identity(st) not in self.added:
                    self._remove(cur.fd, name)
                elif stat.S_ISDIR(st.st_mode):
                    subdirs.append(name)
            return subdirs

        cursor = Cursor(loc.fd)
        try:
            descend(cursor, scan)
        finally:
            cursor.close()

    def _remove(self, dir_fd: int, name: str) -> None:
        self.root.forget()  # a remembered walk may lead through what goes now
        remove(dir_fd, name, self._removed_directory)

    def _removed_directory(self, ident: Identity) -> None:
        self.modes.pop(ident, None)
        self.added.discard(ident)
