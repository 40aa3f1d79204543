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
- No setuid/setgid bits; device nodes are skipped with a warning; ownership is the
  renderer's uid; xattrs are not applied.
- Directories stay writable by their owner while layers are applied; their real modes
  are applied at the end, deepest first.

A member that cannot be applied inside the tree raises Stage1Error naming the layer and
the member. The caller renders into a private directory and publishes it only on success.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Sequence
from typing import IO

from stage1.errors import DigestMismatch, Stage1Error
from stage1.inroot import Location, MissingError, ResolveError, Root, remove
from stage1.layout import VerifiedReader
from stage1.model import Descriptor

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_CHUNK = 1 << 20
_PERM_MASK = 0o1777  # permission bits and sticky; never setuid/setgid


class LayerError(Stage1Error):
    pass


def render(
    tree_fd: int, layers: Sequence[tuple[Descriptor, IO[bytes]]], warn: Callable[[str], None]
) -> None:
    """Apply LAYERS (descriptor and open blob) to the empty directory TREE_FD."""
    old_umask = os.umask(0)
    try:
        root = Root(tree_fd)
        modes: dict[tuple[str, ...], int] = {}
        for desc, blob in layers:
            _Layer(root, desc, modes, warn).apply(blob)
        for path in sorted(modes, key=len, reverse=True):
            try:
                fd = root.open_parts(path)
            except OSError:
                continue
            try:
                os.fchmod(fd, modes[path])
            finally:
                os.close(fd)
    finally:
        os.umask(old_umask)


def preload(layers: Sequence[Descriptor]) -> None:
    """Import what decompressing LAYERS needs, now: after a drop from root to another uid
    the interpreter's library may no longer be readable (a Python installed under /root)."""
    import gzip  # noqa: F401

    if any(desc.media_type.endswith("+zstd") for desc in layers):
        import zstandard  # noqa: F401


def _decompressor(desc: Descriptor, reader: VerifiedReader) -> io.BufferedIOBase | IO[bytes]:
    media_type = desc.media_type
    raw = io.BufferedReader(reader, _CHUNK)
    if media_type.endswith(("+gzip", ".gzip")):
        import gzip

        return gzip.GzipFile(fileobj=raw, mode="rb")
    if media_type.endswith("+zstd"):
        import zstandard

        stream: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return stream
    if media_type.endswith(("tar", ".tar")):
        return raw
    raise LayerError(f"layer {desc.digest}: unsupported media type {media_type or '(none)'}")


def _show(name: str) -> str:
    return name if name.isprintable() else ascii(name)


class _Layer:
    def __init__(
        self,
        root: Root,
        desc: Descriptor,
        modes: dict[tuple[str, ...], int],
        warn: Callable[[str], None],
    ) -> None:
        self.root = root
        self.desc = desc
        self.modes = modes
        self.warn = warn
        # Canonical paths this layer created (and their parents): an opaque whiteout
        # hides only what lower layers put there.
        self.added: set[tuple[str, ...]] = set()

    def apply(self, blob: IO[bytes]) -> None:
        reader = VerifiedReader(blob, self.desc, "layer")
        try:
            stream = _decompressor(self.desc, reader)
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                for member in archive:
                    self._member(archive, member)
                    # Stream mode keeps every header it has read; this layer needs none back.
                    archive.members.clear()  # type: ignore[attr-defined]
            reader.drain()
        except tarfile.ReadError as exc:
            if str(exc) != "empty file":
                reader.drain()
                raise LayerError(f"layer {self.desc.digest} is not a valid tar: {exc}") from exc
            reader.drain()  # a zero-byte layer: nothing to apply
        except DigestMismatch:
            raise
        except (tarfile.TarError, zlib.error, EOFError, OSError, ValueError) as exc:
            # A corrupt blob shows up as a decompression or tar error: name the real cause.
            reader.drain()
            kind = "a valid layer" if isinstance(exc, OSError) else "a valid tar"
            raise LayerError(f"layer {self.desc.digest} is not {kind}: {exc}") from exc
        except Exception as exc:
            if type(exc).__module__.startswith("zstandard"):
                reader.drain()
                raise LayerError(f"layer {self.desc.digest} is not valid zstd: {exc}") from exc
            raise

    def _member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        try:
            self._apply_member(archive, member)
        except LayerError:
            raise
        except (ResolveError, OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise self._error(member, reason) from exc

    def _error(self, member: tarfile.TarInfo, reason: str) -> LayerError:
        return LayerError(f"layer {self.desc.digest} member {_show(member.name)}: {reason}")

    def _apply_member(self, archive: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        base = member.name.rstrip("/").rpartition("/")[2]
        if base.startswith(WHITEOUT):
            self._whiteout(member, base)
            return
        if member.ischr() or member.isblk():
            self.warn(
                f"warning: layer {self.desc.digest} member {_show(member.name)}: "
                "device node skipped (an unprivileged tree cannot hold one)"
            )
            return
        known = member.isdir() or member.isreg() or member.issym() or member.islnk()
        if not known and not member.isfifo():
            self.warn(
                f"warning: layer {self.desc.digest} member {_show(member.name)}: "
                f"unsupported type {member.type!r} skipped"
            )
            return
        with self.root.walk(member.name, follow=False, create=True) as loc:
            if not loc.name:
                if member.isdir():
                    return  # the root itself, or a directory by another name
                raise self._error(member, "names a directory, not a file")
            self._mark_added(loc.path)
            existing = loc.lstat()
            perm = member.mode & _PERM_MASK
            if member.isdir():
                self._directory(loc, existing, perm)
            elif member.islnk():
                self._hardlink(member, loc, existing)
            else:
                if existing is not None:
                    self._remove(loc)
                if member.issym():
                    os.symlink(member.linkname, loc.name, dir_fd=loc.fd)
                elif member.isfifo():
                    os.mkfifo(loc.name, perm, dir_fd=loc.fd)
                else:
                    self._regular(archive, member, loc, perm)
                    return
                mtime = int(member.mtime * 1_000_000_000)
                os.utime(loc.name, ns=(mtime, mtime), dir_fd=loc.fd, follow_symlinks=False)

    def _mark_added(self, path: tuple[str, ...]) -> None:
        for i in range(len(path), 0, -1):
            prefix = path[:i]
            if prefix in self.added:
                break
            self.added.add(prefix)

    def _directory(self, loc: Location, existing: os.stat_result | None, perm: int) -> None:
        if existing is not None and stat.S_ISDIR(existing.st_mode):
            fd = os.open(loc.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=loc.fd)
            try:
                os.fchmod(fd, perm | 0o700)
            finally:
                os.close(fd)
        else:
            if existing is not None:
                self._remove(loc)
            os.mkdir(loc.name, perm | 0o700, dir_fd=loc.fd)
        if perm & 0o700 == 0o700:
            self.modes.pop(loc.path, None)
        else:
            self.modes[loc.path] = perm

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
                self._remove(loc)
            os.link(
                target.name,
                loc.name,
                src_dir_fd=target.fd,
                dst_dir_fd=loc.fd,
                follow_symlinks=False,
            )

    def _regular(
        self, archive: tarfile.TarFile, member: tarfile.TarInfo, loc: Location, perm: int
    ) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(loc.name, flags, 0o600, dir_fd=loc.fd)
        with os.fdopen(fd, "wb") as out:
            data = archive.extractfile(member)
            if data is not None:
                while chunk := data.read(_CHUNK):
                    out.write(chunk)
            out.flush()
            os.fchmod(fd, perm)
            mtime = int(member.mtime * 1_000_000_000)
            os.utime(fd, ns=(mtime, mtime))

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
                self._remove(Location(-1, loc.parts, victim), loc.fd)

    def _opaque(self, loc: Location) -> None:
        """Remove what lower layers put in LOC's directory, keeping this layer's entries."""
        stack: list[tuple[int, tuple[str, ...]]] = [(os.dup(loc.fd), loc.parts)]
        try:
            while stack:
                fd, parts = stack.pop()
                try:
                    for name in os.listdir(fd):
                        path = (*parts, name)
                        if path not in self.added:
                            self._remove(Location(-1, parts, name), fd)
                            continue
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        if stat.S_ISDIR(st.st_mode):
                            sub = os.open(
                                name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd
                            )
                            stack.append((sub, path))
                finally:
                    os.close(fd)
        finally:
            for fd, _ in stack:
                os.close(fd)

    def _remove(self, loc: Location, dir_fd: int | None = None) -> None:
        remove(loc.fd if dir_fd is None else dir_fd, loc.name)
        path = loc.path
        for recorded in [p for p in self.modes if p[: len(path)] == path]:
            del self.modes[recorded]
