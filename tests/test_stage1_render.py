"""stage1's rendering of layers into trees/: the same tree as umoci, symlinked /bin,
unprivileged rules (no setuid, no devices), and hostile layers that try to escape the tree,
as root and as a normal user.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.images import Dir, File, Hardlink, Layer, Raw, Symlink, build_image
from tests.support.stage1 import (
    Place,
    Stage1,
    check_error,
    image,
    nobody_place_fixture,  # noqa: F401 - the nobody_place fixture
    root_place_fixture,  # noqa: F401 - the root_place fixture
    snapshot,
    usr_merged_layers,
)

REF = "127.0.0.1:5000/stage1/render:latest"


# --- same tree as umoci -------------------------------------------------------------------


def _changeset_layers() -> list[Layer]:
    first = Layer(
        [
            Dir("a"),
            Dir("a/b", mode=0o750),
            File("a/b/f1", b"one\n"),
            File("a/f2", b"two\n", mode=0o600),
            File("a/exec", b"#!/bin/sh\n", mode=0o755),
            Hardlink("a/hl", "a/b/f1"),
            Dir("d"),
            File("d/x", b"x\n"),
            Dir("d/sub"),
            File("d/sub/y", b"y\n"),
            Dir("o"),
            File("o/lower", b"lower\n"),
            Dir("o/sub"),
            File("o/sub/z", b"z\n"),
            Symlink("rel", "a/b/f1"),
            Symlink("abs", "/a/b/f1"),
            Dir("ro", mode=0o555),
            File("ro/file", b"read only dir\n", mode=0o444),
            Dir("sticky", mode=0o1777),
        ],
        "gzip",
    )
    second = Layer(
        [
            File("a/.wh.f2"),  # a file whiteout
            File(".wh.d"),  # a directory whiteout
            File("o/.wh..wh..opq"),  # an opaque directory
            File("o/upper", b"upper\n"),
            File("a/exec", b"#!/bin/sh\necho replaced\n", mode=0o750),
            Hardlink("h2", "a/b/f1"),
            Dir("s"),
            Symlink("s/rel", "../a/b/f1"),
            Symlink("s/dangling", "../nowhere"),
        ],
        "gzip",
    )
    third = Layer(
        [
            Dir("d"),
            File("d/again", b"again\n"),
            File("rel2", b"plain\n", mode=0o640),
        ],
        "none",
    )
    return [first, second, third]


def _describe(top: Path) -> tuple[dict[str, tuple[str, int, str]], list[list[str]]]:
    """path -> (type, permission bits, target or content digest); groups of hard links."""
    entries: dict[str, tuple[str, int, str]] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(top))
            st = path.lstat()
            perm = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                entries[rel] = ("symlink", 0, os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                entries[rel] = ("dir", perm, "")
            elif stat.S_ISREG(st.st_mode):
                entries[rel] = ("file", perm, hashlib.sha256(path.read_bytes()).hexdigest())
                inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            else:
                entries[rel] = (f"other {stat.S_IFMT(st.st_mode):o}", perm, "")
    links = sorted(sorted(paths) for paths in inodes.values() if len(paths) > 1)
    return entries, links


def test_renders_the_same_tree_as_umoci(stage1: Stage1, tmp_path: Path) -> None:
    built = image(stage1, REF, _changeset_layers(), base=False, config={"Cmd": ["/x"]})
    result = stage1.run("run", REF, "--", "/x")  # renders, then fails to find /x: fine
    assert result.returncode == 127, result.stderr
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--rootless", "--image", f"{stage1.layout}:{REF}", str(bundle)],
        check=True,
        capture_output=True,
    )
    ours, our_links = _describe(stage1.tree(built))
    theirs, their_links = _describe(bundle / "rootfs")
    assert ours == theirs
    assert our_links == their_links == [["a/b/f1", "a/hl", "h2"]]
    # What the changesets meant, spelled out (so that both cannot be wrong the same way).
    assert "a/f2" not in ours and "d/x" not in ours and "d/sub" not in ours
    assert "o/lower" not in ours and "o/sub" not in ours and "o/upper" in ours
    assert ours["d/again"][0] == "file" and ours["ro"] == ("dir", 0o555, "")
    assert ours["sticky"] == ("dir", 0o1777, "") and ours["a/exec"][1] == 0o750


# --- real images' conventions -------------------------------------------------------------


def test_bin_symlinked_to_usr_bin_across_layers(stage1: Stage1) -> None:
    built = image(stage1, REF, usr_merged_layers(), base=False)
    result = stage1.run("run", REF, "--", "/bin/sh", "-c", "/bin/hello; readlink /bin; ls /usr/bin")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["hello from /bin", "usr/bin"]
    assert "hello" in lines[2:]
    tree = stage1.tree(built)
    assert (tree / "bin").is_symlink() and (tree / "usr/bin/hello").is_file()


def _special_layer() -> Layer:
    def raw(name: str, kind: bytes, mode: int, major: int = 0, minor: int = 0) -> Raw:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.devmajor, info.devminor = kind, mode, major, minor
        return Raw(info)

    return Layer(
        [
            File("bin/suid", b"#!/bin/sh\necho suid\n", mode=0o4755),
            File("bin/sgid", b"#!/bin/sh\necho sgid\n", mode=0o2755),
            Dir("shared", mode=0o2775),
            raw("dev/evil-null", tarfile.CHRTYPE, 0o666, 1, 3),
            raw("dev/evil-disk", tarfile.BLKTYPE, 0o660, 8, 0),
            raw("fifo", tarfile.FIFOTYPE, 0o640),
        ]
    )


def test_setuid_bits_stripped_and_device_nodes_skipped(stage1: Stage1) -> None:
    built = image(stage1, REF, [_special_layer()])
    result = stage1.run("run", REF, "--", "/bin/sh", "-c", "/bin/suid; ls /dev")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "suid"
    assert "evil-null" not in result.stdout and "evil-disk" not in result.stdout
    warnings = result.stderr.splitlines()  # one for the render, naming each node skipped
    assert len(warnings) == 1 and "2 device nodes skipped" in warnings[0], warnings
    assert "dev/evil-null, dev/evil-disk" in warnings[0]
    tree = stage1.tree(built)
    assert stat.S_IMODE((tree / "bin/suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((tree / "bin/sgid").stat().st_mode) == 0o755
    assert stat.S_IMODE((tree / "shared").stat().st_mode) == 0o775
    assert stat.S_ISFIFO((tree / "fifo").lstat().st_mode)
    assert not (tree / "dev/evil-null").exists() and not (tree / "dev/evil-disk").exists()


# --- hostile layers -----------------------------------------------------------------------


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "", data: bytes = b"") -> Raw:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, target, 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return Raw(info, data)


def _file(name: str, data: bytes = b"pwned\n") -> Raw:
    return _member(name, data=data)


def _symlink(name: str, target: str) -> Raw:
    return _member(name, tarfile.SYMTYPE, target)


def _hardlink(name: str, target: str) -> Raw:
    return _member(name, tarfile.LNKTYPE, target)


def _dir(name: str) -> Raw:
    return _member(name, tarfile.DIRTYPE)


@dataclass(frozen=True)
class Case:
    layers: Callable[[Path], list[Layer]]  # built from the sentinel directory's path
    # Confined: paths (relative to the tree) where the hostile members must have landed.
    # Refused: the member stage1 must name in its error.
    confined: Callable[[Path], list[str]] | None = None
    refused: Callable[[Path], str] | None = None


def _up(sentinel: Path) -> str:
    """A relative path from any tree in the store out to SENTINEL (far more ../ than needed)."""
    return "../" * 16 + str(sentinel).lstrip("/")


def _inside(sentinel: Path, *names: str) -> list[str]:
    return [str(sentinel).lstrip("/") + "/" + name for name in names]


CASES = {
    "dotdot-beyond-root": Case(
        lambda s: [
            Layer(
                [
                    _file(_up(s) + "/pwned"),
                    _file(_up(s) + "/file", b"overwritten\n"),
                    _dir(_up(s) + "/newdir"),
                    _symlink(_up(s) + "/link", "/etc/passwd"),
                    _file("/" + str(s).lstrip("/") + "/absolute-name"),
                    _file("./a/../../../" + str(s).lstrip("/") + "/sneaky"),
                ]
            )
        ],
        confined=lambda s: _inside(s, "pwned", "file", "newdir", "link", "absolute-name", "sneaky"),
    ),
    "absolute-symlink-chain": Case(
        lambda s: [
            Layer(
                [
                    _symlink("l1", "/l2"),
                    _symlink("l2", "/l3/../l4"),
                    _symlink("l4", str(s)),
                    _file("l1/pwned"),
                    _file("l1/file", b"overwritten\n"),
                ]
            )
        ],
        confined=lambda s: _inside(s, "pwned", "file"),
    ),
    "relative-symlink-chain": Case(
        lambda s: [
            Layer(
                [
                    _dir("deep"),
                    _dir("deep/er"),
                    _symlink("deep/er/c1", "../c2"),
                    _symlink("deep/c2", "../c3/x/.."),
                    _dir("c3"),
                    _dir("c3/x"),
                    _symlink("c3/out", _up(s)),
                    _file("deep/er/c1/out/pwned"),
                    _file("deep/er/c1/out/subdir/inner", b"overwritten\n"),
                ]
            )
        ],
        confined=lambda s: _inside(s, "pwned", "subdir/inner"),
    ),
    "symlink-planted-by-an-earlier-layer": Case(
        lambda s: [
            Layer(
                [
                    _symlink("evil", _up(s)),
                    _symlink("evilabs", str(s)),
                    _symlink("evilfile", str(s / "file")),
                ]
            ),
            Layer(
                [
                    _file("evil/pwned"),
                    _dir("evil/newdir"),
                    _file("evilabs/file", b"overwritten\n"),
                    _hardlink("evil/linked", "evil/pwned"),
                    _file("evilfile", b"overwritten through the link\n"),
                ]
            ),
        ],
        confined=lambda s: [*_inside(s, "pwned", "newdir", "file", "linked"), "evilfile"],
    ),
    "hardlink-target-outside": Case(
        lambda s: [Layer([_hardlink("hl", _up(s) + "/file")])],
        refused=lambda s: "hl",
    ),
    "hardlink-absolute-target-outside": Case(
        lambda s: [Layer([_hardlink("hl", str(s / "file"))])],
        refused=lambda s: "hl",
    ),
    "hardlink-through-planted-symlink": Case(
        lambda s: [
            Layer([_symlink("planted", str(s))]),
            Layer([_hardlink("hl", "planted/file")]),
        ],
        refused=lambda s: "hl",
    ),
    "whiteout-pointing-out": Case(
        lambda s: [
            Layer([_symlink("evil", _up(s)), _dir("keep"), _file("keep/me", b"kept\n")]),
            Layer(
                [
                    _file(_up(s) + "/.wh.file"),
                    _file(_up(s) + "/.wh.subdir"),
                    _file("evil/.wh.file"),
                    _file("evil/subdir/.wh..wh..opq"),
                    _file(_up(s) + "/.wh..wh..opq"),
                    _file("keep/../../../.wh.keep"),
                ]
            ),
        ],
        confined=lambda s: [],
    ),
    "device-node-outside": Case(
        lambda s: [
            Layer(
                [
                    _member(_up(s) + "/null", tarfile.CHRTYPE),
                    _member(_up(s) + "/fifo", tarfile.FIFOTYPE),
                ]
            )
        ],
        confined=lambda s: _inside(s, "fifo"),
    ),
}


def _outside(place: Place) -> dict[str, object]:
    """Everything under the place but the store: the sentinel and anything new beside it."""
    return {
        k: v for k, v in snapshot(place.base).items() if k != "store" and not k.startswith("store/")
    }


def _check_case(place: Place, name: str) -> None:
    case = CASES[name]
    stage1, sentinel = place.stage1, place.sentinel
    ref = f"127.0.0.1:5000/hostile/{name}:latest"
    built = build_image(
        stage1.layout, ref, [*_base_layers(), *case.layers(sentinel)], config={"Cmd": ["/bin/true"]}
    )
    place.hand_over()
    before = _outside(place)
    assert set(before) == {"sentinel", "sentinel/file", "sentinel/subdir", "sentinel/subdir/inner"}
    result = stage1.run("run", ref)
    assert _outside(place) == before, f"{name}: something outside the tree changed"
    assert (sentinel / "file").read_bytes() == b"sentinel bytes\n"
    tree = stage1.tree(built)
    if case.refused is not None:
        line = check_error(result)
        hostile = built.layers[-1].digest
        assert line.startswith(f"error: layer {hostile} member {case.refused(sentinel)}: "), line
        assert not tree.exists()
        assert [p.name for p in stage1.trees.iterdir()] == []  # no partial tree left
        return
    assert case.confined is not None
    assert result.returncode == 0, (name, result.stderr)
    for path in case.confined(sentinel):
        assert os.path.lexists(tree / path), f"{name}: {path} not confined to the tree"
    if name == "whiteout-pointing-out":
        assert not (tree / "keep").exists()  # the clamped whiteout hit the tree's own /keep


def _base_layers() -> list[Layer]:
    from tests.support.images import busybox_rootfs_layer

    return [busybox_rootfs_layer()]


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_layer_as_root(root_place: Place, name: str) -> None:
    _check_case(root_place, name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_layer_as_normal_user(nobody_place: Place, name: str) -> None:
    _check_case(nobody_place, name)


def test_normal_user_runs_an_image_and_collects_its_tree(nobody_place: Place) -> None:
    stage1 = nobody_place.stage1
    locked = Layer([Dir("ro", mode=0o555), Dir("ro/sub", mode=0o500), File("ro/sub/f", mode=0o400)])
    built = image(stage1, REF, [locked])
    nobody_place.hand_over()
    script = "cat /proc/self/uid_map; echo hi > /tmp/x; cat /tmp/x; echo w > /ro/sub/f"
    result = stage1.run("run", REF, "--", "/bin/sh", "-c", script)
    assert result.returncode == 0, result.stderr
    nobody = 65534
    assert result.stdout.split() == ["0", str(nobody), "1", "hi"]
    tree = stage1.tree(built)
    assert tree.stat().st_uid == nobody and (tree / "ro/sub/f").read_bytes() == b""
    # gc, as that user, removes a tree even with read-only directories in it.
    (stage1.layout / "index.json").unlink()
    result = stage1.run("gc")
    assert (result.returncode, result.stdout) == (0, f"removed trees/{tree.name}\n"), result.stderr
    assert not tree.exists()
