"""Paths resolved inside a root directory, the way a process chrooted there sees them.

Everything here works through directory file descriptors (``openat`` and friends), never
through a path string that the kernel would resolve from the host's root. A path is walked
one component at a time with ``O_NOFOLLOW``; a symbolic link met on the way is read and its
target walked in its place, an absolute target from the root again; ``..`` at the root
stays at the root. So no name in a hostile tree can lead an operation outside it: the only
directories ever opened are descendants of the root, reached through real directories.

The final component of a path is not followed unless asked: creating, replacing, linking
or removing an entry acts on the entry itself, never on what a symlink there points to.

Costs are bounded whatever the tree: a walk holds one directory open at a time (``..``
re-opens the parent, checked to be the directory it came from), processes at most
MAX_STEPS names (those of symlink targets included) and follows at most MAX_SYMLINKS
links; recursive work (``remove``, ``descend``) holds at most two descriptors, however
deep or wide the tree.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterable

O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
MAX_SYMLINKS = 40  # the kernel's limit for one path walk
MAX_DEPTH = 4096
MAX_STEPS = 2 * MAX_DEPTH  # names one walk may process, those of symlink targets included

Identity = tuple[int, int]  # (st_dev, st_ino)


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino)


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
    symlink to a directory, when followed). ``ids`` are the identities of the directories
    from the root down to ``fd``'s (when the walk knew them). Close it, or use it as a
    context manager.
    """

    def __init__(
        self, fd: int, parts: tuple[str, ...], name: str, ids: tuple[Identity, ...] = ()
    ) -> None:
        self.fd = fd
        self.parts = parts
        self.name = name
        self.ids = ids

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


class _Walked:
    """Where the last walk's directory was: the names that led there and what they gave."""

    def __init__(self, key: tuple[str, ...], fd: int, parts: list[str], ids: list[Identity]):
        self.key = key
        self.fd = fd
        self.parts = parts
        self.ids = ids


class Root:
    """A directory tree entered only through ``fd``, which the caller owns.

    With ``remember``, a walk starts where the previous one left off when its path begins
    with the same names (consecutive tar members share their directory): the caller must
    call ``forget`` after removing or replacing anything in the tree, and ``forget`` when
    done (it closes the remembered directory). Creating new entries needs no ``forget``:
    a name that resolved before resolves the same way while nothing is removed.
    """

    def __init__(self, fd: int, *, remember: bool = False) -> None:
        self.fd = fd
        self.remember = remember
        self.made_dirs = 0  # directories created by walks with create
        self._walked: _Walked | None = None
        self._root_id: Identity | None = None

    def forget(self) -> None:
        if self._walked is not None:
            os.close(self._walked.fd)
            self._walked = None

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

    def _root_identity(self) -> Identity:
        if self._root_id is None:
            self._root_id = identity(os.fstat(self.fd))
        return self._root_id

    def _start(self, names: list[str]) -> tuple[int, list[str], list[Identity], int]:
        walked = self._walked
        if (
            walked is not None
            and len(walked.key) < len(names)
            and tuple(names[: len(walked.key)]) == walked.key
        ):
            return os.dup(walked.fd), list(walked.parts), list(walked.ids), len(walked.key)
        return self.open_parts(()), [], [self._root_identity()], 0

    def _keep(self, key: tuple[str, ...], fd: int, parts: list[str], ids: list[Identity]) -> None:
        if self._walked is not None and self._walked.key == key:
            return
        new = os.dup(fd)
        self.forget()
        self._walked = _Walked(key, new, list(parts), list(ids))

    def _parent(self, fd: int, parts: list[str], ids: list[Identity]) -> int:
        """The parent of FD (at PARTS, below the root); closes FD."""
        parent = os.open("..", O_DIR, dir_fd=fd)
        try:
            st = os.fstat(parent)
            if identity(st) != ids[-2]:
                # Not the directory the walk came down from (it was moved): from the root.
                os.close(parent)
                parent = -1
                parent = self.open_parts(parts[:-1])
                ids[-2] = identity(os.fstat(parent))
        except BaseException:
            if parent >= 0:
                os.close(parent)
            raise
        os.close(fd)
        parts.pop()
        ids.pop()
        return parent

    def walk(self, path: str, *, follow: bool, create: bool = False) -> Location:
        """Resolve PATH inside the root.

        Directories on the way are followed through symlinks (inside the root); the last
        component only if ``follow``. Missing directories on the way are created (0755)
        when ``create``, else MissingError. The last component need not exist.
        """
        names = components(path)
        fd, parts, ids, done = self._start(names)
        pending = names[done:]
        pending.reverse()  # a stack: the next component is at the end
        links = 0
        steps = 0
        try:
            while pending:
                steps += 1
                if steps > MAX_STEPS:
                    raise ResolveError("path resolution takes too many steps")
                name = pending.pop()
                if name == "..":
                    if parts:
                        new = self._parent(fd, parts, ids)
                        fd = new
                    continue
                last = not pending
                if last and not follow:
                    # The textual last name (the first pushed is the last popped).
                    if self.remember:
                        self._keep(tuple(names[:-1]), fd, parts, ids)
                    return Location(fd, tuple(parts), name, tuple(ids))
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    if last:
                        return Location(fd, tuple(parts), name, tuple(ids))
                    if not create:
                        raise MissingError(f"{_show(parts, name)} does not exist") from None
                    os.mkdir(name, 0o755, dir_fd=fd)
                    self.made_dirs += 1
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise ResolveError("too many levels of symbolic links")
                    target = os.readlink(name, dir_fd=fd)
                    if target.startswith("/") and parts:
                        parts.clear()
                        del ids[1:]
                        os.close(fd)
                        fd = -1
                        fd = self.open_parts(())
                    pending.extend(reversed(components(target)))
                    continue
                if last:
                    return Location(fd, tuple(parts), name, tuple(ids))
                if not stat.S_ISDIR(st.st_mode):
                    raise ResolveError(f"{_show(parts, name)} is not a directory")
                if len(parts) >= MAX_DEPTH:
                    raise ResolveError("path too deep")
                new = os.open(name, O_DIR, dir_fd=fd)
                try:
                    ids.append(identity(os.fstat(new)))
                except BaseException:
                    os.close(new)
                    raise
                os.close(fd)
                fd = new
                parts.append(name)
            return Location(fd, tuple(parts), "", tuple(ids))
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


class Cursor:
    """A walk down and up a directory tree through one open directory at a time.

    ``down`` opens a subdirectory by name, never through a symlink; ``up`` re-opens ``..``
    and checks that it is the directory the walk came down from (else OSError ESTALE). So
    a walk holds at most two descriptors however deep the tree. ``base`` is the caller's
    and is never closed; ``close`` closes what the cursor opened.
    """

    def __init__(self, base: int) -> None:
        self.base = base
        self.fd = base
        self.names: list[str] = []
        self._ids = [identity(os.fstat(base))]

    @property
    def identity(self) -> Identity:
        return self._ids[-1]

    def down(self, name: str) -> None:
        new = os.open(name, O_DIR, dir_fd=self.fd)
        try:
            ident = identity(os.fstat(new))
        except BaseException:
            os.close(new)
            raise
        if self.fd != self.base:
            os.close(self.fd)
        self.fd = new
        self.names.append(name)
        self._ids.append(ident)

    def up(self) -> tuple[str, int]:
        """Go to the parent: the name and the (open, now the caller's) descriptor of the
        directory left."""
        if len(self.names) == 1:
            parent = self.base
        else:
            parent = os.open("..", O_DIR, dir_fd=self.fd)
            try:
                moved = identity(os.fstat(parent)) != self._ids[-2]
            except BaseException:
                os.close(parent)
                raise
            if moved:
                os.close(parent)
                where = "/".join(self.names)
                raise OSError(errno.ESTALE, f"{where} was moved while it was being walked")
        left = self.fd
        self.fd = parent
        self._ids.pop()
        return self.names.pop(), left

    def close(self) -> None:
        if self.fd != self.base:
            os.close(self.fd)
        self.fd = self.base
        del self.names[:]
        del self._ids[1:]


def descend(
    cursor: Cursor,
    scan: Callable[[Cursor], list[str]],
    leave: Callable[[Cursor, str, int], None] | None = None,
) -> None:
    """Walk the tree below the cursor's directory, depth first, holding one directory open.

    SCAN runs in each directory (the cursor's own first) and returns the subdirectories to
    enter. LEAVE, if given, runs when the walk has left a directory: the cursor is at the
    parent, with the name and the open descriptor of the directory left (closed after).
    The cursor ends where it started.
    """
    pending = [scan(cursor)]
    while pending:
        if pending[-1]:
            cursor.down(pending[-1].pop())
            pending.append(scan(cursor))
            continue
        pending.pop()
        if pending:
            name, fd = cursor.up()
            try:
                if leave is not None:
                    leave(cursor, name, fd)
            finally:
                os.close(fd)


def remove(dir_fd: int, name: str, on_directory: Callable[[Identity], None] | None = None) -> None:
    """Remove NAME in DIR_FD and, for a directory, everything below it; never follows links.

    Directories are made writable by their owner first, so a tree with 0555 directories
    (the image said so) can still be removed by the uid that owns it. ON_DIRECTORY is told
    the identity of every directory removed. At most two descriptors are open at a time.
    """
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except IsADirectoryError:
        pass

    def scan(cur: Cursor) -> list[str]:
        _make_writable(cur.fd)
        if on_directory is not None:
            on_directory(cur.identity)
        subdirs = []
        with os.scandir(cur.fd) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
                else:
                    os.unlink(entry.name, dir_fd=cur.fd)
        return subdirs

    def leave(cur: Cursor, done: str, _fd: int) -> None:
        os.rmdir(done, dir_fd=cur.fd)

    cursor = Cursor(dir_fd)
    try:
        cursor.down(name)
        descend(cursor, scan, leave)
        done, fd = cursor.up()
        os.close(fd)
        os.rmdir(done, dir_fd=dir_fd)
    finally:
        cursor.close()


def _make_writable(fd: int) -> None:
    # Not ours (root removing another uid's tree): the unlinks below decide.
    with contextlib.suppress(PermissionError):
        os.fchmod(fd, 0o700)


def _show(parts: list[str], name: str) -> str:
    return "/" + "/".join([*parts, name])
