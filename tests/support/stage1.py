"""Helpers for the stage1 tests: running stage1 as root or as a normal user, stores that user
can use, and snapshots of directory trees. Images are built with tests.support.images.

stage1 always runs as a separate process, as a user runs it: real exit codes, real stderr.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.images import (
    BuiltImage,
    Dir,
    File,
    Layer,
    Symlink,
    build_image,
    busybox_rootfs_layer,
)

REPO = Path(__file__).resolve().parent.parent.parent
RUN_TIMEOUT = 60.0
# The host uid stage1 drops to when root starts it (stage1.cli.DEFAULT_ID).
DEFAULT_ID = 2_000_000_000
# A Python every user can execute: the project's own interpreter may live under /root.
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class Stage1:
    """stage1 with a store, run as root or (via runuser) as a normal user."""

    store: Path
    user: str | None = None  # None: the test's own user (root)

    @property
    def layout(self) -> Path:
        return self.store / "layout"

    @property
    def trees(self) -> Path:
        return self.store / "trees"

    def argv(self, *args: str) -> list[str]:
        if self.user is None:
            return [sys.executable, "-m", "stage1", "--store", str(self.store), *args]
        return [
            "runuser",
            "-u",
            self.user,
            "--",
            "env",
            f"PYTHONPATH={readable_stage1()}",
            "PYTHONDONTWRITEBYTECODE=1",
            SYSTEM_PYTHON,
            "-m",
            "stage1",
            "--store",
            str(self.store),
            *args,
        ]

    def run(
        self, *args: str, input: bytes | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.argv(*args),
            input=input.decode() if input is not None else None,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=env,
        )
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def tree(self, image: BuiltImage) -> Path:
        return self.trees / image.digest.removeprefix("sha256:")


def check_error(result: subprocess.CompletedProcess[str], status: int = 1) -> str:
    """Assert that a run failed with STATUS and exactly one line ``error: …``; return it."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def image(
    stage1: Stage1,
    ref: str,
    layers: Sequence[Layer] = (),
    *,
    base: bool = True,
    config: dict[str, Any] | None = None,
) -> BuiltImage:
    """Build an image named REF in the store: the busybox layer (if BASE), then LAYERS."""
    all_layers = ([busybox_rootfs_layer()] if base else []) + list(layers)
    return build_image(stage1.layout, ref, all_layers, config=config)


def app_layer() -> Layer:
    """A user and group named app (1000:1001) in /etc/passwd and /etc/group."""
    return Layer(
        [
            File(
                "etc/passwd",
                b"root:x:0:0:root:/root:/bin/sh\n"
                b"app:x:1000:1001:App:/home/app:/bin/sh\n"
                b"nobody:x:65534:65534::/:/bin/false\n",
            ),
            File("etc/group", b"root:x:0:\napp:x:1001:\nstaff:x:50:app\n"),
            Dir("home"),
            Dir("home/app"),
        ]
    )


def usr_merged_layers() -> list[Layer]:
    """busybox under /usr/bin with bin -> usr/bin, then a later layer writing bin/hello."""
    applets = ("sh", "echo", "cat", "ls", "readlink")
    first = Layer(
        [
            Dir("usr"),
            Dir("usr/bin"),
            File("usr/bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755),
            *(Symlink(f"usr/bin/{a}", "busybox") for a in applets),
            Symlink("bin", "usr/bin"),
        ]
    )
    second = Layer([File("bin/hello", b"#!/bin/sh\necho hello from /bin\n", mode=0o755)])
    return [first, second]


# --- trees --------------------------------------------------------------------------------


Entry = tuple[str, int, str, int, int, int]  # type, perm, content/target, ino, nlink, mtime


def snapshot(top: Path) -> dict[str, Entry]:
    """Every entry below TOP (not following links): type, permission bits, content digest or
    link target, inode, link count and mtime: any change to the tree changes the snapshot."""
    result: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                kind, content = "file", hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                kind, content = "symlink", os.readlink(path)
            elif stat.S_ISDIR(st.st_mode):
                kind, content = "dir", ""
            else:
                kind, content = f"other {stat.S_IFMT(st.st_mode):o}", ""
            result[str(path.relative_to(top))] = (
                kind,
                stat.S_IMODE(st.st_mode),
                content,
                st.st_ino,
                st.st_nlink,
                st.st_mtime_ns,
            )
    return result


@functools.cache
def readable_stage1() -> Path:
    """A copy of the stage1 package that any user can import.

    The checkout may sit under a directory other users cannot enter (a 0700 home or
    temporary directory), so stage1 run via runuser imports it from here.
    """
    base = Path(tempfile.mkdtemp(prefix="fetchd-stage1-"))
    base.chmod(0o755)
    shutil.copytree(REPO / "stage1", base / "stage1", ignore=shutil.ignore_patterns("__pycache__"))
    for path in [base / "stage1", *(base / "stage1").rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    atexit.register(shutil.rmtree, base, True)
    return base


# --- users and stores ---------------------------------------------------------------------


@dataclass
class Place:
    """A directory only a given user owns: its store and, beside it, a sentinel."""

    base: Path
    stage1: Stage1
    sentinel: Path
    uid: int

    def hand_over(self) -> None:
        """Give the store to the place's user, as if that user had pulled the images."""
        for dirpath, _, filenames in os.walk(self.stage1.store):
            os.chown(dirpath, self.uid, self.uid)
            for name in filenames:
                os.chown(os.path.join(dirpath, name), self.uid, self.uid)


def _owned_place(user: str | None, owner_uid: int) -> Iterator[Place]:
    # Under /tmp itself: the test's tmp_path is root's and 0700, which nobody cannot enter.
    base = Path(tempfile.mkdtemp(prefix="stage1-test-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        store = base / "store"
        store.mkdir()
        sentinel = base / "sentinel"
        sentinel.mkdir(mode=0o777)
        os.chmod(sentinel, 0o777)  # anyone could change it: only confinement keeps it intact
        (sentinel / "file").write_bytes(b"sentinel bytes\n")
        os.chmod(sentinel / "file", 0o666)
        (sentinel / "subdir").mkdir()
        os.chmod(sentinel / "subdir", 0o777)
        (sentinel / "subdir" / "inner").write_bytes(b"inner\n")
        os.chmod(sentinel / "subdir" / "inner", 0o666)
        for path in (base, store, sentinel, sentinel / "file", sentinel / "subdir"):
            os.chown(path, owner_uid, owner_uid)
        os.chown(sentinel / "subdir" / "inner", owner_uid, owner_uid)
        yield Place(base, Stage1(store, user), sentinel, owner_uid)
    finally:
        shutil.rmtree(base)


@pytest.fixture(name="nobody_place")
def nobody_place_fixture() -> Iterator[Place]:
    """A store owned by the normal user nobody, for stage1 run through runuser."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become nobody (runuser)")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is needed to run stage1 as another user")
    yield from _owned_place("nobody", pwd.getpwnam("nobody").pw_uid)


@pytest.fixture(name="root_place")
def root_place_fixture() -> Iterator[Place]:
    """A store for stage1 run by root; the sentinel belongs to the uid root renders as."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    yield from _owned_place(None, DEFAULT_ID)


# --- processes ----------------------------------------------------------------------------


def wait_for(pred: Any, timeout: float, what: str) -> Any:
    """Poll PRED every 20 ms until it returns something true; that value, or TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (ppid, uid, command) for every live process (zombies are dead: left out), read
    with ps from the host."""
    out = subprocess.run(
        ["ps", "-e", "-o", "pid=,ppid=,uid=,stat=,comm="],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    table = {}
    for line in out.splitlines():
        pid, ppid, uid, state, *comm = line.split()
        if not state.startswith("Z"):
            table[int(pid)] = (int(ppid), int(uid), " ".join(comm))
    return table


def descendants(pid: int, table: dict[int, tuple[int, int, str]]) -> dict[int, tuple[int, str]]:
    """pid -> (uid, command) for every process below PID."""
    found: dict[int, tuple[int, str]] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, uid, comm) in table.items():
            if ppid == parent and child not in found:
                found[child] = (uid, comm)
                frontier.append(child)
    return found


def remove_index_entry(layout: Path, ref: str) -> None:
    """Forget REF in index.json (what `fetchd rm` does)."""
    path = layout / "index.json"
    index = json.loads(path.read_text())
    index["manifests"] = [
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != ref
    ]
    path.write_text(json.dumps(index))


def image_with_raw_config(
    stage1: Stage1, ref: str, config: bytes, *, base: bool = True
) -> BuiltImage:
    """An image named REF (the busybox layer if BASE) whose config blob is exactly CONFIG's
    bytes: for configs json.dumps cannot write (NUL bytes are fine, deep nesting is not)."""
    built = image(stage1, ref, base=base)
    blobs = stage1.layout / "blobs" / "sha256"
    config_hex = hashlib.sha256(config).hexdigest()
    (blobs / config_hex).write_bytes(config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": f"sha256:{config_hex}",
            "size": len(config),
        },
        "layers": [layer.descriptor() for layer in built.layers],
    }
    data = json.dumps(manifest).encode()
    manifest_hex = hashlib.sha256(data).hexdigest()
    (blobs / manifest_hex).write_bytes(data)
    index_path = stage1.layout / "index.json"
    index = json.loads(index_path.read_text())
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref:
            entry.update(digest=f"sha256:{manifest_hex}", size=len(data))
    index_path.write_text(json.dumps(index))
    return built
