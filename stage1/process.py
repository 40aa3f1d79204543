"""The container's process from the image config: argv, environment, working dir, user."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from stage1.errors import Stage1Error
from stage1.inroot import Root
from stage1.model import ImageConfig

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MAX_TABLE = 4 << 20
_MAX_ID = 2**32 - 2
_MAX_HOME = 4095  # PATH_MAX


@dataclass(frozen=True)
class Process:
    argv: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    uid: int  # inside the container
    gid: int


def build(config: ImageConfig, args: Sequence[str], tree: Root, ref: str, hostname: str) -> Process:
    """The process to run: Entrypoint + (ARGS or Cmd), Env, WorkingDir, User.

    TREE is the image's rendered root, read for /etc/passwd and /etc/group.
    """
    argv = config.entrypoint + (tuple(args) if args else config.cmd)
    if not argv:
        raise Stage1Error(
            f"image {ref} has no Entrypoint or Cmd; give the command: stage1 run {ref} -- COMMAND"
        )
    uid, gid, home = _user(config.user, tree, ref)
    env: dict[str, str] = {}
    for entry in config.env:
        key, eq, value = entry.partition("=")
        if key and eq:
            env[key] = value
    env.setdefault("PATH", DEFAULT_PATH)
    env.setdefault("HOSTNAME", hostname)
    env.setdefault("HOME", home)
    cwd = config.working_dir or "/"
    if not cwd.startswith("/"):
        cwd = "/" + cwd
    return Process(
        argv=argv,
        env=tuple(f"{k}={v}" for k, v in env.items()),
        cwd=cwd,
        uid=uid,
        gid=gid,
    )


def _table(tree: Root, path: str) -> list[list[str]]:
    data = tree.read_file(path, _MAX_TABLE)
    if data is None:
        return []
    rows = []
    for line in data.decode(errors="replace").splitlines():
        # A NUL could not reach execve(2) (HOME); such a line is no entry.
        if line and not line.startswith(("#", "+", "-")) and "\0" not in line:
            rows.append(line.split(":"))
    return rows


def _number(text: str) -> bool:
    return text.isascii() and text.isdigit()  # str.isdigit alone takes "²" and "١"


def _id(text: str, what: str, ref: str) -> int:
    if not _number(text) or len(text) > 10 or int(text) > _MAX_ID:
        raise Stage1Error(f"image {ref}: invalid {what} {text!r}")
    return int(text)


def _user(spec: str, tree: Root, ref: str) -> tuple[int, int, str]:
    """(uid, gid, home) for the image's User: ``user[:group]``, each a name or a number."""
    name, _, group = spec.partition(":")
    name = name or "0"
    passwd = [row for row in _table(tree, "/etc/passwd") if len(row) >= 4]
    if _number(name):
        uid = _id(name, "user", ref)
        entry = next((row for row in passwd if row[2] == name), None)
    else:
        entry = next((row for row in passwd if row[0] == name), None)
        if entry is None:
            raise Stage1Error(f"image {ref}: user {name!r} is not in the image's /etc/passwd")
        uid = _id(entry[2], f"uid of user {name!r}", ref)
    if _number(group):
        gid = _id(group, "group", ref)
    elif group:
        groups = [row for row in _table(tree, "/etc/group") if len(row) >= 3]
        row = next((row for row in groups if row[0] == group), None)
        if row is None:
            raise Stage1Error(f"image {ref}: group {group!r} is not in the image's /etc/group")
        gid = _id(row[2], f"gid of group {group!r}", ref)
    elif entry is not None:
        gid = _id(entry[3], f"gid of user {name!r}", ref)
    else:
        gid = 0
    home = entry[5] if entry is not None and len(entry) > 5 and entry[5] else "/"
    if len(home) > _MAX_HOME:
        home = "/"
    return uid, gid, home
