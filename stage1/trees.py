"""``$STORE/trees/``: rendered root filesystems, one per manifest digest, owned by stage1.

A tree is rendered into ``.partial-HEX-PID`` and renamed to ``HEX`` last, after a
``syncfs``: a crash mid-render leaves only a partial directory (removed by ``stage1 gc``),
never a half tree under the final name. Two runs rendering the same image at once both
render; the first rename wins and the other discards its copy.

A tree belongs to the uid the container runs as: inside the user namespace that uid is the
container's only one, and it must be able to read every file and to copy any file up into
the run's writable layer. Started as root, stage1 renders in a child process that has
already dropped to that uid; the root process only creates the partial directory, hands it
over (fchown) and renames it: it never writes a byte inside a tree. A tree that belongs to
another uid (stage1 was run with another --uid before) is handed over by root with lchown,
walking through file descriptors without following links.

Only the store's owner may reach a tree: ``trees/`` is 0700 (tightened when an older store
left it open), as containerd and podman keep a container's root filesystem. A tree keeps
the image's modes (a 0777 directory, a 1777 /tmp) for the container, where they mean what
the image says; on the host nobody else can even open them. The container's uid needs no
way through ``trees/``: stage1 opens the tree as the store's owner and hands the container
the descriptor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

from stage1 import linux
from stage1.errors import Stage1Error
from stage1.inroot import O_DIR, Cursor, descend, remove
from stage1.layout import Layout
from stage1.model import Descriptor, Image

PARTIAL = ".partial-"
#: a tree set aside because other users could reach it: never run again, gc removes it
STALE = ".stale-"


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Trees:
    def __init__(self, store: str) -> None:
        self.path = os.path.join(store, "trees")

    def _open(self, create: bool) -> int:
        try:
            if create:
                os.makedirs(os.path.dirname(self.path), 0o755, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(self.path, 0o700)
            fd = os.open(self.path, O_DIR)
        except OSError as exc:
            raise Stage1Error(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) != 0o700:
                # An older stage1 made it 0755: no other user may reach a tree. What they
                # could reach until now may have been changed (a 0777 directory of an
                # image, a descriptor opened meanwhile): every tree is rendered again.
                os.fchmod(fd, 0o700)
                _set_aside(fd, self.path)
        except OSError as exc:
            os.close(fd)
            raise Stage1Error(
                f"{self.path} is open to other users and cannot be made private "
                f"({exc.strerror}); run stage1 as the store's owner, or: chmod 700 {self.path}"
            ) from exc
        return fd

    def prepare(self, layout: Layout, image: Image, owner: Owner | None) -> int:
        """An O_PATH descriptor of IMAGE's complete tree, rendered now if it is not cached.

        OWNER is set when running as root: the uid/gid to render as and to hand the tree
        to. Without it the tree is rendered as, and must belong to, the current user.
        """
        trees_fd = self._open(create=True)
        try:
            name = image.manifest.hex
            fd = _open_tree(trees_fd, name)
            if fd is None:
                self._render(trees_fd, name, layout, image, owner)
                fd = _open_tree(trees_fd, name)
                if fd is None:
                    raise Stage1Error(f"{self.path}/{name} vanished while it was being used")
            want = owner.uid if owner else os.geteuid()
            st = os.fstat(fd)
            if st.st_uid != want:
                if owner is None:
                    os.close(fd)
                    raise Stage1Error(
                        f"{self.path}/{name} belongs to uid {st.st_uid}; run stage1 as that "
                        "user, or as root"
                    )
                _chown_tree(trees_fd, name, owner)
            return fd
        finally:
            os.close(trees_fd)

    def _render(
        self, trees_fd: int, name: str, layout: Layout, image: Image, owner: Owner | None
    ) -> None:
        partial = f"{PARTIAL}{name}-{os.getpid()}"
        try:
            os.mkdir(partial, 0o755, dir_fd=trees_fd)
        except OSError as exc:
            raise Stage1Error(f"cannot create {self.path}/{partial}: {exc.strerror}") from exc
        try:
            if owner is not None:
                os.chown(partial, owner.uid, owner.gid, dir_fd=trees_fd, follow_symlinks=False)
            tree = os.open(partial, O_DIR, dir_fd=trees_fd)
            try:
                # Opened by the caller: root may read a store the container's uid cannot.
                blobs = [(desc, layout.open_blob(desc, image.ref)) for desc in image.layers]
                try:
                    if owner is None:
                        _render_here(tree, blobs)
                    else:
                        _render_as(owner, tree, blobs)
                finally:
                    for _, blob in blobs:
                        blob.close()
                linux.syncfs(tree)
            finally:
                os.close(tree)
            try:
                os.rename(partial, name, src_dir_fd=trees_fd, dst_dir_fd=trees_fd)
                return
            except OSError as exc:
                if _open_tree(trees_fd, name) is None:
                    raise Stage1Error(f"cannot publish {self.path}/{name}: {exc.strerror}") from exc
                # Another run published the same tree first: use that one.
            remove(trees_fd, partial)
        except BaseException:
            remove(trees_fd, partial)
            raise

    def gc(self, layout: Layout) -> Iterator[str]:
        """Remove trees no index entry leads to, and partial trees of dead renders."""
        if not os.path.isdir(self.path):
            return
        keep = {digest.hex for digest in layout.referenced_manifests()}
        trees_fd = self._open(create=False)
        failed: list[str] = []
        try:
            for name in sorted(os.listdir(trees_fd)):
                if name.startswith(STALE):
                    pass  # always removed
                elif name.startswith(PARTIAL):
                    pid = name.rpartition("-")[2]
                    if pid.isascii() and pid.isdigit() and _alive(int(pid)):
                        continue
                elif name in keep or not _is_hex(name):
                    continue
                try:
                    remove(trees_fd, name)
                except OSError as exc:
                    # One tree that cannot be removed must not keep gc from the others.
                    _warn(f"warning: cannot remove {self.path}/{name}: {exc.strerror or exc}")
                    failed.append(name)
                    continue
                yield name
        finally:
            os.close(trees_fd)
        if failed:
            raise Stage1Error(
                f"could not remove {len(failed)} tree(s) in {self.path} (see the warnings); "
                "run stage1 gc as the store's owner or as root"
            )


Blobs = list[tuple[Descriptor, IO[bytes]]]


def _set_aside(trees_fd: int, path: str) -> None:
    """Rename every tree out of the way (to be rendered again; gc removes the old)."""
    names = [n for n in os.listdir(trees_fd) if _is_hex(n)]
    for name in names:
        try:
            os.rename(
                name, f"{STALE}{name}-{os.getpid()}", src_dir_fd=trees_fd, dst_dir_fd=trees_fd
            )
        except OSError as exc:
            raise Stage1Error(
                f"cannot set aside {path}/{name}, which other users could reach: "
                f"{exc.strerror}; remove it (stage1 gc) before running it"
            ) from exc
    if names:
        _warn(
            f"warning: {path} was open to other users: {len(names)} rendered tree(s) set "
            "aside to be rendered again (stage1 gc removes them)"
        )


def _render_here(tree: int, blobs: Blobs) -> None:
    from stage1.render import render  # tarfile and friends: only when a tree is rendered

    render(tree, blobs, _warn)


def _render_as(owner: Owner, tree: int, blobs: Blobs) -> None:
    """Render in a child process that is OWNER, not root, before it reads a layer."""
    from stage1 import render

    render.preload([desc for desc, _ in blobs])
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        status = 1
        try:
            os.close(read_end)
            linux.drop_privileges(owner.uid, owner.gid)
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # after the drop, which clears it
            _render_here(tree, blobs)
            status = 0
        except Stage1Error as exc:
            os.write(write_end, str(exc).encode(errors="replace"))
        except KeyboardInterrupt:
            status = 130
        except BaseException as exc:
            os.write(write_end, f"rendering failed: {exc!r}".encode(errors="replace"))
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        raise
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise Stage1Error(message or f"rendering failed (exit status {code})")


def _open_tree(trees_fd: int, name: str) -> int | None:
    try:
        return os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=trees_fd)
    except FileNotFoundError:
        return None


def _chown_tree(trees_fd: int, name: str, owner: Owner) -> None:
    """Hand a tree to OWNER (root only): lchown everything, through descriptors (at most
    two open, however deep or wide the tree)."""

    def scan(cur: Cursor) -> list[str]:
        subdirs = []
        with os.scandir(cur.fd) as entries:
            for entry in entries:
                os.chown(entry.name, owner.uid, owner.gid, dir_fd=cur.fd, follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(entry.name)
        return subdirs

    cursor = Cursor(trees_fd)
    try:
        cursor.down(name)
        os.fchown(cursor.fd, owner.uid, owner.gid)
        descend(cursor, scan)
    except OSError as exc:
        raise Stage1Error(f"cannot hand tree {name} to uid {owner.uid}: {exc}") from exc
    finally:
        cursor.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_hex(name: str) -> bool:
    return len(name) in (64, 128) and all(c in "0123456789abcdef" for c in name)
