"""Paths resolved inside a root directory, the way a process chrooted there sees them.

Everything here works through directory file descriptors (``openat`` and friends), never
through a path string that the kernel would resolve from the host's root. A path is walked
one component at a time with ``O_NOFOLLOW``; a symbolic link met on the way is read and its
target walked in its place, an absolute target from the root again; ``..`` at the root
stays at the root. So no name in a hostile tree can lead an operation outside it: the only
directories ever opened are descendants of the root, reached through real directories.

The final component of a path is not followed unless asked: creating, replacing, linking
or removing an entry acts on the entry itself, never on what a symlink there points to.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_SYMLINKS = 40  # the kernel's limit for one path walk
MAX_DEPTH = 4096


class ResolveError(Exception):
    """A path cannot be resolved inside the root (with the reason as the message)."""


class MissingError(ResolveError):
    """A directory on the way does not exist (and was not to be created)."""


def components(path: str) -> list[str]:
    """Split a path into its names, dropping empty ones and ``.`` (keeping ``..``)."""
    return [c for c in path.split("/") if c and c != "."]


class Location:
    """A directory (an owned file descriptor and its path from the root) and a name in it.

    ``name`` is empty when the path names the directory itself (``/``, ``a/..``, or a
    symlink to a directory, when followed). Close it, or use it as a context manager.
    """

    def __init__(self, fd: int, parts: tuple[str, ...], name: str) -> None:
        self.fd = fd
        self.parts = parts
        self.name = name

    @property
    def path(self) -> tuple[str, ...]:
        """The canonical path of the named entry, from the root (no symlinks, no ``..``)."""
        return (*self.parts, self.name) if self.name else self.parts

    def lstat(self) -> os.stat_result | None:
        try:
            return os.stat(self.name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Location:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Root:
    """A directory tree entered only through ``fd``, which the caller owns."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def open_parts(self, parts: Iterable[str]) -> int:
        """Open a canonical path (real directories only, no symlinks followed)."""
        fd = os.open(".", O_DIR, dir_fd=self.fd)
        try:
            for part in parts:
                new = os.open(part, O_DIR, dir_fd=fd)
                os.close(fd)
                fd = new
        except BaseException:
            os.close(fd)
            raise
        return fd

    def walk(self, path: str, *, follow: bool, create: bool = False) -> Location:
        """Resolve PATH inside the root.

        Directories on the way are followed through symlinks (inside the root); the last
        component only if ``follow``. Missing directories on the way are created (0755)
        when ``create``, else MissingError. The last component need not exist.
        """
        pending = components(path)
        pending.reverse()  # a stack: the next component is at the end
        parts: list[str] = []
        fd = self.open_parts(())
        links = 0
        try:
            while pending:
                name = pending.pop()
                if name == "..":
                    if parts:
                        parts.pop()
                        os.close(fd)
                        fd = -1
                        fd = self.open_parts(parts)
                    continue
                last = not pending
                if last and not follow:
                    return Location(fd, tuple(parts), name)
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    if last:
                        return Location(fd, tuple(parts), name)
                    if not create:
                        raise MissingError(f"{_show(parts, name)} does not exist") from None
                    os.mkdir(name, 0o755, dir_fd=fd)
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise ResolveError("too many levels of symbolic links")
                    target = os.readlink(name, dir_fd=fd)
                    if target.startswith("/") and parts:
                        parts.clear()
                        os.close(fd)
                        fd = -1
                        fd = self.open_parts(())
                    pending.extend(reversed(components(target)))
                    continue
                if last:
                    return Location(fd, tuple(parts), name)
                if not stat.S_ISDIR(st.st_mode):
                    raise ResolveError(f"{_show(parts, name)} is not a directory")
                if len(parts) >= MAX_DEPTH:
                    raise ResolveError("path too deep")
                new = os.open(name, O_DIR, dir_fd=fd)
                os.close(fd)
                fd = new
                parts.append(name)
            return Location(fd, tuple(parts), "")
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def read_file(self, path: str, limit: int) -> bytes | None:
        """The content of a regular file (symlinks followed inside the root), or None."""
        try:
            with self.walk(path, follow=True) as loc:
                if not loc.name:
                    return None
                fd = os.open(loc.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=loc.fd)
        except (ResolveError, OSError):
            return None
        with os.fdopen(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            return file.read(limit)


def remove(dir_fd: int, name: str) -> None:
    """Remove NAME in DIR_FD and, for a directory, everything below it; never follows links.

    Directories are made writable by their owner first, so a tree with 0555 directories
    (the image said so) can still be removed by the uid that owns it.
    """
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass
    top = os.open(name, O_DIR, dir_fd=dir_fd)
    stack: list[tuple[int, str]] = [(top, name)]
    try:
        _make_writable(top)
        while stack:
            fd = stack[-1][0]
            subdir = None
            for entry in os.listdir(fd):
                st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    subdir = entry
                    break
                os.unlink(entry, dir_fd=fd)
            if subdir is not None:
                child = os.open(subdir, O_DIR, dir_fd=fd)
                stack.append((child, subdir))
                _make_writable(child)
                continue
            os.close(fd)
            _, done = stack.pop()
            os.rmdir(done, dir_fd=stack[-1][0] if stack else dir_fd)
    finally:
        for fd, _ in stack:
            os.close(fd)


def _make_writable(fd: int) -> None:
    # Not ours (root removing another uid's tree): the unlinks below decide.
    with contextlib.suppress(PermissionError):
        os.fchmod(fd, 0o700)


def _show(parts: list[str], name: str) -> str:
    return "/" + "/".join([*parts, name])
