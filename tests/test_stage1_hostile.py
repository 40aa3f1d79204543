"""stage1 against hostile layers and other local users (issue 9): trees no other user can
reach, sparse files and the render's limits, trees deep and wide under a small descriptor
limit, and path resolution that stays linear in depth.
"""

from __future__ import annotations

import os
import resource
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import Dir, File, Layer, Raw, Symlink
from tests.support.stage1 import (
    RUN_TIMEOUT,
    SYSTEM_PYTHON,
    Place,
    Stage1,
    check_error,
    image,
    nobody_place_fixture,  # noqa: F401 - the nobody_place fixture
    remove_index_entry,
    root_place_fixture,  # noqa: F401 - the root_place fixture
)

REF = "127.0.0.1:5000/stage1/hostile:latest"
GIB = 1 << 30


@pytest.fixture(autouse=True)
def _remove_deep_trees(tmp_path: Path) -> Iterator[None]:
    """pytest removes old temporary directories recursively (shutil.rmtree), which a tree
    deeper than Python's recursion limit breaks for every later session: rm them now."""
    yield
    subprocess.run(["rm", "-rf", "--one-file-system", str(tmp_path / "store")], check=False)


def _run_limited(stage1: Stage1, *args: str, nofile: int = 256) -> subprocess.CompletedProcess[str]:
    """stage1 with RLIMIT_NOFILE at NOFILE (``ulimit -n``)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    result = subprocess.run(
        stage1.argv(*args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        preexec_fn=limit,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


# --- item 2: no other local user reaches a cached tree --------------------------------------

_ATTACK = r"""
import os, sys
tree = sys.argv[1]
def attempt(what, action):
    try:
        action()
    except PermissionError:
        print(what, "denied")
    else:
        print(what, "DONE")
attempt("read", lambda: open(os.path.join(tree, "open/file"), "rb").close())
attempt("write", lambda: open(os.path.join(tree, "open/file"), "r+b").write(b"owned\n"))
attempt("plant", lambda: open(os.path.join(tree, "open/planted"), "wb").close())
attempt("plant-tmp", lambda: open(os.path.join(tree, "tmp/planted"), "wb").close())
attempt("list", lambda: os.listdir(tree))
"""


def _open_layer() -> Layer:
    return Layer([Dir("open", mode=0o777), File("open/file", b"original\n", mode=0o777)])


def _check_other_user_is_locked_out(stage1: Stage1, built_digest: str, attacker: int) -> None:
    tree = stage1.trees / built_digest.removeprefix("sha256:")
    assert tree.is_dir()
    attack = subprocess.run(
        [
            *("setpriv", f"--reuid={attacker}", f"--regid={attacker}", "--clear-groups"),
            *(SYSTEM_PYTHON, "-c", _ATTACK, str(tree)),
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert attack.returncode == 0, attack.stderr
    assert attack.stdout.split("\n")[:-1] == [
        "read denied",
        "write denied",
        "plant denied",
        "plant-tmp denied",
        "list denied",
    ]
    assert stat.S_IMODE(stage1.trees.stat().st_mode) == 0o700  # tightened from 0755
    result = stage1.run("run", REF, "--", "/bin/sh", "-c", "cat /open/file; ls /open /tmp")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["original", "/open:", "file", "/tmp:"]


def test_another_user_cannot_reach_a_tree_rendered_by_root(root_place: Place) -> None:
    stage1 = root_place.stage1
    built = image(stage1, REF, [_open_layer()])
    stage1.trees.mkdir(mode=0o755)  # as an older stage1 left it
    os.chmod(stage1.trees, 0o755)
    assert stage1.run("run", REF, "--", "/bin/true").returncode == 0
    _check_other_user_is_locked_out(stage1, built.digest, 65534)


def test_another_user_cannot_reach_a_tree_of_a_normal_users_store(nobody_place: Place) -> None:
    stage1 = nobody_place.stage1
    built = image(stage1, REF, [_open_layer()])
    stage1.trees.mkdir(mode=0o755)
    os.chmod(stage1.trees, 0o755)
    nobody_place.hand_over()
    result = stage1.run("run", REF, "--", "/bin/true")
    assert result.returncode == 0, result.stderr
    _check_other_user_is_locked_out(stage1, built.digest, 54321)


def test_a_tree_others_could_reach_before_is_rendered_again(root_place: Place) -> None:
    """trees/ left 0755 by an older stage1: while it was, another user could plant files
    in an image's 0777 directory. Tightening trees/ does not undo that, so every tree
    there is set aside and rendered again (and stage1 gc removes the old one)."""
    stage1 = root_place.stage1
    built = image(stage1, REF, [_open_layer()])
    assert stage1.run("run", REF, "--", "/bin/true").returncode == 0
    os.chmod(stage1.trees, 0o755)  # as an older stage1 left it
    tree = stage1.tree(built)
    planted = subprocess.run(
        [
            *("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
            *("sh", "-c", f"echo planted > {tree}/open/evil && echo changed > {tree}/open/file"),
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert planted.returncode == 0, planted.stderr  # it could, before: that is the point

    result = stage1.run("run", REF, "--", "/bin/sh", "-c", "cat /open/file; ls /open")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["original", "file"]
    assert "set aside" in result.stderr, result.stderr
    assert stage1.run("gc").returncode == 0
    assert sorted(p.name for p in stage1.trees.iterdir()) == [tree.name]


# --- item 4: sparse files stay sparse; what one render may write is bounded ------------------

_PAYLOAD = b"the end of a sparse file\n"


def _sparse_member(size: int, version: str) -> Raw:
    """A GNU sparse member (PAX format VERSION 0.1 or 1.0): 5 bytes at 0, the payload
    4 KiB before the end, holes elsewhere."""
    tail = size - 4096
    info = tarfile.TarInfo("big.bin")
    info.mode = 0o644
    if version == "0.1":
        data = b"start" + _PAYLOAD
        info.pax_headers = {
            "GNU.sparse.map": f"0,5,{tail},{len(_PAYLOAD)}",
            "GNU.sparse.size": str(size),
            "GNU.sparse.name": "big.bin",
        }
    else:
        sparse_map = f"2\n0\n5\n{tail}\n{len(_PAYLOAD)}\n".encode().ljust(512, b"\0")
        data = sparse_map + b"start" + _PAYLOAD
        info.pax_headers = {
            "GNU.sparse.major": "1",
            "GNU.sparse.minor": "0",
            "GNU.sparse.realsize": str(size),
            "GNU.sparse.name": "big.bin",
        }
    info.size = len(data)
    return Raw(info, data)


@pytest.mark.parametrize("version", ["0.1", "1.0"])
def test_a_sparse_10_gib_member_renders_sparse_in_seconds(stage1: Stage1, version: str) -> None:
    size = 10 * GIB
    layer = Layer([_sparse_member(size, version)])
    built = image(stage1, REF, [layer])
    assert built.layers[-1].size < 1024  # a small layer
    started = time.monotonic()
    result = stage1.run("run", REF, "--", "/bin/true")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 10, elapsed
    path = stage1.tree(built) / "big.bin"
    st = path.stat()
    assert st.st_size == size
    assert st.st_blocks * 512 <= 256 * 1024, st.st_blocks  # holes, not 10 GiB of zeros
    with path.open("rb") as file:
        assert file.read(8) == b"start\0\0\0"
        file.seek(size - 4096)
        assert file.read(len(_PAYLOAD) + 1) == _PAYLOAD + b"\0"


def test_zeros_in_a_regular_member_become_holes(stage1: Stage1) -> None:
    zeros = bytes(8 << 20)
    built = image(stage1, REF, [Layer([File("zeros", zeros + b"x")])])
    assert stage1.run("run", REF, "--", "/bin/true").returncode == 0
    path = stage1.tree(built) / "zeros"
    assert path.stat().st_size == len(zeros) + 1
    assert path.stat().st_blocks * 512 <= 2 << 20
    assert path.read_bytes() == zeros + b"x"


def test_files_larger_in_total_than_the_limit_are_refused(stage1: Stage1) -> None:
    built = image(stage1, REF, [Layer([_sparse_member(2 << 40, "0.1")])])
    line = check_error(stage1.run("run", REF, "--", "/bin/true"))
    assert line == (
        f"error: layer {built.layers[-1].digest} member big.bin: the image's files add up "
        "to more than 1 TiB; set STAGE1_RENDER_MAX_SIZE to allow more"
    )
    assert list(stage1.trees.iterdir()) == []  # nothing published, no partial tree


@pytest.mark.parametrize(
    ("variable", "value", "reason"),
    [
        (
            "STAGE1_RENDER_MAX_BYTES",
            "1048576",
            "rendering would write more than 1 MiB (STAGE1_RENDER_MAX_BYTES); "
            "free space, or set STAGE1_RENDER_MAX_BYTES",
        ),
        (
            "STAGE1_RENDER_MAX_ENTRIES",
            "2",
            "the image has more than 2 files, directories and links; "
            "set STAGE1_RENDER_MAX_ENTRIES to allow more",
        ),
    ],
)
def test_a_render_past_a_configured_limit_fails_with_one_line(
    stage1: Stage1, variable: str, value: str, reason: str
) -> None:
    layer = Layer(
        [Dir("a"), File("a/one", os.urandom(600_000)), File("a/two", os.urandom(600_000))]
    )
    built = image(stage1, REF, [layer], base=False)
    env = {**os.environ, variable: value}
    line = check_error(stage1.run("run", REF, "--", "/bin/true", env=env))
    assert line.startswith(f"error: layer {built.layers[-1].digest} member a/"), line
    assert line.endswith(f": {reason}"), line
    assert list(stage1.trees.iterdir()) == []


def test_a_render_past_its_time_limit_fails_with_one_line(stage1: Stage1) -> None:
    built = image(stage1, REF)
    env = {**os.environ, "STAGE1_RENDER_MAX_SECONDS": "0"}
    line = check_error(stage1.run("run", REF, "--", "/bin/true", env=env))
    assert line == (
        f"error: layer {built.layers[0].digest}: rendering takes longer than 0 s; "
        "set STAGE1_RENDER_MAX_SECONDS to allow more"
    )


# --- item 9: deep and wide trees under ulimit -n 256 ------------------------------------------

# More than twice the descriptor limit: enough to show a walk holds few. (Removing a deep
# tree costs ext4 about a millisecond a directory here, so no deeper than needed.)
DEEP = 600
WIDE = 600


def _deep(depth: int) -> str:
    return "/".join(["d"] * depth)


def test_a_deep_directory_is_whited_out_under_a_small_descriptor_limit(stage1: Stage1) -> None:
    lower = Layer([File(f"{_deep(DEEP)}/bottom", b"deep\n"), File("keep", b"kept\n")])
    upper = Layer([File(".wh.d")])
    built = image(stage1, REF, [lower, upper])
    result = _run_limited(stage1, "run", REF, "--", "/bin/cat", "/keep")
    assert (result.returncode, result.stdout) == (0, "kept\n"), result.stderr
    assert not (stage1.tree(built) / "d").exists()


def test_an_opaque_whiteout_over_a_wide_directory_and_a_new_uid(stage1: Stage1) -> None:
    lower = Layer([Dir("w"), File("w/old", b"old\n"), Dir("w/lowerdir")])
    subdirs = [Dir(f"w/s{i:04}") for i in range(WIDE)]
    # The opaque whiteout after this layer's own entries: they stay, the lower ones go.
    upper = Layer([*subdirs, File("w/s0599/inner", b"inner\n"), File("w/.wh..wh..opq")])
    built = image(stage1, REF, [lower, upper])
    script = "ls /w | wc -l; cat /w/s0599/inner; ls /w/old /w/lowerdir 2>&1 | wc -l"
    result = _run_limited(stage1, "run", "--uid", "1500000000", REF, "--", "/bin/sh", "-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(WIDE), "inner", "2"]
    tree = stage1.tree(built)
    assert sorted(os.listdir(tree / "w")) == [f"s{i:04}" for i in range(WIDE)]
    # Handed to another uid: every entry of the wide directory is chowned.
    result = _run_limited(stage1, "run", "--uid", "1500000001", REF, "--", "/bin/true")
    assert result.returncode == 0, result.stderr
    owners = {(tree / "w" / f"s{i:04}").lstat().st_uid for i in range(WIDE)}
    assert owners == {1500000001}
    assert (tree / "w/s0599/inner").lstat().st_uid == 1500000001


def test_gc_removes_a_deep_tree_and_goes_on_past_one_it_cannot_remove(stage1: Stage1) -> None:
    built = image(stage1, REF, [Layer([File(f"{_deep(DEEP)}/bottom", b"deep\n")])])
    assert _run_limited(stage1, "run", REF, "--", "/bin/true").returncode == 0
    remove_index_entry(stage1.layout, REF)
    deep_name = built.digest.removeprefix("sha256:")
    stuck_name = "0" * 64  # sorted first: gc meets it before the deep tree
    stuck = stage1.trees / stuck_name
    stuck.mkdir()
    (stuck / "immutable").write_bytes(b"x")
    subprocess.run(["chattr", "+i", str(stuck / "immutable")], check=True)
    try:
        result = _run_limited(stage1, "gc")
    finally:
        subprocess.run(["chattr", "-i", str(stuck / "immutable")], check=True)
    assert result.stdout == f"removed trees/{deep_name}\n", result.stderr
    assert result.returncode == 1
    assert f"warning: cannot remove {stage1.trees}/{stuck_name}: " in result.stderr
    check_error(result)
    assert sorted(os.listdir(stage1.trees)) == [stuck_name]


# --- item 12: path resolution linear in depth -------------------------------------------------

CLIMB = 1200  # "../" * CLIMB fits in a symlink target (PATH_MAX)


def test_a_deep_tree_with_a_symlink_climbing_back_renders_in_linear_time(
    stage1: Stage1,
) -> None:
    deep = _deep(CLIMB)
    entries: list[File | Symlink | Dir] = [
        File(f"{deep}/bottom", b"bottom\n"),
        Symlink(f"{deep}/up", "../" * CLIMB),  # from the bottom back to the root
    ]
    # Each name goes down, climbs back and goes down again: 4 x CLIMB names to resolve.
    entries += [File(f"{deep}/up/{deep}/up/x{i}", f"{i}\n".encode()) for i in range(20)]
    built = image(stage1, REF, [Layer(entries)])
    started = time.monotonic()
    result = stage1.run("run", REF, "--", "/bin/cat", "/x0", "/x19")
    elapsed = time.monotonic() - started
    assert (result.returncode, result.stdout) == (0, "0\n19\n"), result.stderr
    assert elapsed < 10, elapsed
    assert sorted(p.name for p in stage1.tree(built).glob("x*")) == sorted(
        f"x{i}" for i in range(20)
    )


def test_a_path_that_takes_too_many_steps_is_refused(stage1: Stage1) -> None:
    deep = _deep(CLIMB)
    hops = "/".join([f"{deep}/up"] * 8)  # 16 x CLIMB names: past the walk's bound
    layer = Layer([File(f"{deep}/bottom"), Symlink(f"{deep}/up", "../" * CLIMB), File(f"{hops}/x")])
    built = image(stage1, REF, [layer])
    line = check_error(stage1.run("run", REF, "--", "/bin/true"))
    assert line.startswith(f"error: layer {built.layers[-1].digest} member "), line
    assert line.endswith(": path resolution takes too many steps"), line


def test_a_deep_chain_of_read_only_directories_gets_its_modes(stage1: Stage1) -> None:
    chain = [Dir("/".join(["r"] * i), mode=0o555) for i in range(1, 501)]
    built = image(stage1, REF, [Layer(chain)])
    started = time.monotonic()
    assert stage1.run("run", REF, "--", "/bin/true").returncode == 0
    assert time.monotonic() - started < 10
    bottom = stage1.tree(built) / "/".join(["r"] * 500)
    assert stat.S_IMODE(bottom.stat().st_mode) == 0o555
    assert stat.S_IMODE((stage1.tree(built) / "r").stat().st_mode) == 0o555
