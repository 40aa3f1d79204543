"""stage1 run: the process from the image config, isolation, signals, caching, gc, errors.

Images are OCI layouts written straight into the store's layout/ (tests.support.images);
the registry-and-fetchd plumbing in front of this is tested elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.images import (
    File,
    Layer,
    build_image,
    build_index,
    busybox_rootfs_layer,
)
from tests.support.stage1 import (
    DEFAULT_ID,
    Stage1,
    app_layer,
    check_error,
    descendants,
    image,
    process_table,
    remove_index_entry,
    snapshot,
    wait_for,
)

REF = "127.0.0.1:5000/stage1/busybox:latest"


def test_echo_and_exit_status(stage1: Stage1) -> None:
    image(stage1, REF)
    result = stage1.run("run", REF, "--", "/bin/echo", "hi")
    assert (result.returncode, result.stdout, result.stderr) == (0, "hi\n", "")
    result = stage1.run("run", f"docker://{REF}", "--", "/bin/sh", "-c", "exit 7")
    assert result.returncode == 7


def test_image_config_is_honoured(stage1: Stage1) -> None:
    config = {
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ['echo "$GREETING"; id -u; id -g; id -un; pwd; echo "$HOME"'],
        "Env": ["GREETING=hello from env", "PATH=/bin"],
        "WorkingDir": "/srv/work",
        "User": "app",
    }
    image(stage1, REF, [app_layer()], config=config)
    result = stage1.run("run", REF)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "hello from env",
        "1000",
        "1001",
        "app",
        "/srv/work",
        "/home/app",
    ]
    # ARGS replace Cmd; the Entrypoint stays.
    result = stage1.run("run", REF, "--", "echo replaced; id -un")
    assert result.stdout.splitlines() == ["replaced", "app"]


def test_user_uid_gid_numbers_and_group_name(stage1: Stage1) -> None:
    image(stage1, REF, [app_layer()], config={"User": "1000:staff", "Cmd": ["/bin/id"]})
    result = stage1.run("run", REF)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("uid=1000(app) gid=50(staff)")


def test_unknown_user_is_an_error(stage1: Stage1) -> None:
    image(stage1, REF, config={"User": "ghost", "Cmd": ["/bin/true"]})
    line = check_error(stage1.run("run", REF))
    assert "user 'ghost' is not in the image's /etc/passwd" in line


def test_stdin_passes_through(stage1: Stage1) -> None:
    image(stage1, REF)
    result = stage1.run("run", REF, "--", "/bin/cat", input=b"through stdin\n")
    assert (result.returncode, result.stdout) == (0, "through stdin\n")


def test_namespaces_and_mounts(stage1: Stage1) -> None:
    image(stage1, REF)
    script = (
        "cat /proc/self/uid_map; echo pid=$$; hostname; ls /dev; "
        "cat /proc/mounts | cut -d' ' -f2,3 | grep -E '^/(proc|tmp|dev) '; "
        "grep -c : /proc/net/dev"
    )
    result = stage1.run("run", REF, "--", "/bin/sh", "-c", script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    inside, outside, count = lines[0].split()
    assert (inside, count) == ("0", "1")
    assert int(outside) == (DEFAULT_ID if os.geteuid() == 0 else os.geteuid()) != 0
    assert lines[1] == "pid=2"  # pid 1 is stage1's init
    assert lines[2] == _built(stage1).name[:12]
    devices = {"null", "zero", "full", "random", "urandom", "tty"}
    assert devices <= set(lines[3:-4])
    assert lines[-4:-1] == ["/proc proc", "/dev tmpfs", "/tmp tmpfs"]
    assert lines[-1] == "1"  # --net none: loopback only


def _built(stage1: Stage1) -> Path:
    # The one tree in the store (the tests here build one image per store).
    (tree,) = [p for p in stage1.trees.iterdir() if not p.name.startswith(".")]
    return tree


def test_net_host_shares_the_network_and_copies_resolv_conf(stage1: Stage1) -> None:
    image(stage1, REF)
    result = stage1.run(
        "run",
        "--net",
        "host",
        REF,
        "--",
        "/bin/sh",
        "-c",
        "cat /etc/resolv.conf; cat /proc/net/dev",
    )
    assert result.returncode == 0, result.stderr
    host_resolv = Path("/etc/resolv.conf").read_text() if Path("/etc/resolv.conf").exists() else ""
    assert result.stdout.startswith(host_resolv)
    host_ifaces = {
        line.split(":")[0].strip()
        for line in Path("/proc/net/dev").read_text().splitlines()
        if ":" in line
    }
    inside = {
        line.split(":")[0].strip()
        for line in result.stdout[len(host_resolv) :].splitlines()
        if ":" in line
    }
    assert inside == host_ifaces


def test_as_root_every_container_process_is_an_unprivileged_host_uid_and_sigterm_ends_all(
    stage1: Stage1,
) -> None:
    if os.geteuid() != 0:
        pytest.skip("about stage1 started by root")
    image(stage1, REF)
    script = "cat /proc/self/uid_map; sleep 60 & sleep 60 & echo started; wait"
    proc = subprocess.Popen(
        stage1.argv("run", REF, "--", "/bin/sh", "-c", script),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        uid_map = proc.stdout.readline().split()
        assert uid_map[0] == "0" and int(uid_map[1]) == DEFAULT_ID
        assert proc.stdout.readline() == "started\n"

        def container() -> dict[int, tuple[int, str]]:
            below = descendants(proc.pid, process_table())
            sleeping = [pid for pid, (_, comm) in below.items() if comm == "sleep"]
            return below if len(sleeping) == 2 else {}

        seen = wait_for(container, 10, "the container's two sleeps")
        # stage1 itself, its init, the shell and both sleeps: all the unprivileged uid.
        table = process_table()
        assert table[proc.pid][1] == DEFAULT_ID
        assert len(seen) == 4, seen
        assert {uid for uid, _ in seen.values()} == {DEFAULT_ID}

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143
        assert time.monotonic() - started < 5
        wait_for(
            lambda: not (set(seen) & set(process_table())),
            5,
            "every container process to be gone",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigint_is_forwarded(stage1: Stage1) -> None:
    image(stage1, REF)
    proc = subprocess.Popen(
        stage1.argv("run", REF, "--", "/bin/sh", "-c", "echo ready; exec sleep 60"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        wait_for(
            lambda: any(c == "sleep" for _, c in descendants(proc.pid, process_table()).values()),
            10,
            "sleep to start",
        )
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_second_run_reuses_the_tree_and_writes_never_reach_it(stage1: Stage1) -> None:
    built = image(stage1, REF)
    assert stage1.run("run", REF, "--", "/bin/true").returncode == 0
    tree = stage1.tree(built)
    before = snapshot(tree)
    tree_inode = (tree.stat().st_ino, tree.stat().st_mtime_ns)
    script = (
        "echo changed > /etc/passwd && echo new > /newfile && rm /bin/cat && "
        "mkdir -p /var/x && touch /var/x/y && chmod 700 /etc && cat /etc/passwd"
    )
    result = stage1.run("run", REF, "--", "/bin/sh", "-c", script)
    assert (result.returncode, result.stdout) == (0, "changed\n"), result.stderr
    # Same directory, same inodes, same bytes, same times: not rendered again, not written.
    assert (tree.stat().st_ino, tree.stat().st_mtime_ns) == tree_inode
    assert snapshot(tree) == before
    # Each run starts from the image again.
    result = stage1.run("run", REF, "--", "/bin/sh", "-c", "cat /etc/passwd; ls /newfile")
    assert result.stdout.startswith("root:x:0:0")
    assert result.returncode != 0  # /newfile is gone
    assert [p.name for p in stage1.trees.iterdir()] == [tree.name]


def test_missing_image_names_the_pull_command(stage1: Stage1) -> None:
    image(stage1, REF)
    line = check_error(stage1.run("run", "docker.io/library/alpine:3.20"))
    assert line == (
        f"error: image docker.io/library/alpine:3.20 is not in the store at {stage1.store}; "
        "run: fetchd pull docker://docker.io/library/alpine:3.20"
    )
    empty = Stage1(stage1.store.parent / "empty")
    line = check_error(empty.run("run", "alpine"))
    # fetchd's form (rkt's convention): docker:// for a registry image, which fetchd accepts
    assert line.endswith("run: fetchd pull docker://docker.io/library/alpine:latest")


def test_reference_forms(stage1: Stage1) -> None:
    built = image(stage1, "docker.io/library/tiny:latest", config={"Cmd": ["/bin/echo", "ok"]})
    hexdigest = built.digest.removeprefix("sha256:")
    for ref in (
        "tiny",
        "tiny:latest",
        "library/tiny",
        "docker.io/library/tiny",
        "docker://docker.io/library/tiny:latest",
        f"tiny@sha256:{hexdigest}",
        f"sha256:{hexdigest}",
    ):
        result = stage1.run("run", ref)
        assert (result.returncode, result.stdout) == (0, "ok\n"), (ref, result.stderr)


def test_usage_errors_exit_2(stage1: Stage1) -> None:
    for args in (
        (),
        ("frobnicate",),
        ("run",),
        ("run", "--net", "bridge", REF),
        ("run", "--bogus", REF),
        ("run", REF, "extra"),
        ("run", "tiny@sha256:abc"),
    ):
        check_error(stage1.run(*args), status=2)
    assert stage1.run("--help").returncode == 0


def test_command_not_found_is_127(stage1: Stage1) -> None:
    image(stage1, REF)
    result = stage1.run("run", REF, "--", "/bin/no-such-command")
    line = check_error(result, status=127)
    assert "/bin/no-such-command" in line


def test_image_without_a_command(stage1: Stage1) -> None:
    image(stage1, REF)
    line = check_error(stage1.run("run", REF))
    assert "has no Entrypoint or Cmd" in line


def test_gc_removes_trees_no_image_references(stage1: Stage1) -> None:
    keep = image(stage1, "127.0.0.1:5000/keep:1", config={"Cmd": ["/bin/true"]})
    drop = image(
        stage1,
        "127.0.0.1:5000/drop:1",
        [Layer([File("drop", b"x")])],
        config={"Cmd": ["/bin/true"]},
    )
    for ref in ("127.0.0.1:5000/keep:1", "127.0.0.1:5000/drop:1"):
        assert stage1.run("run", ref).returncode == 0
    remove_index_entry(stage1.layout, "127.0.0.1:5000/drop:1")
    result = stage1.run("gc")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"removed trees/{drop.digest.removeprefix('sha256:')}\n"
    assert sorted(p.name for p in stage1.trees.iterdir()) == [keep.digest.removeprefix("sha256:")]
    assert stage1.run("gc").stdout == ""


def test_image_index_selects_this_machine(stage1: Stage1) -> None:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
    other = "arm64" if arch == "amd64" else "amd64"
    mine = build_image(
        stage1.layout,
        "mine",
        [busybox_rootfs_layer()],
        config={"Cmd": ["/bin/echo", arch]},
        arch=arch,
        annotate=False,
    )
    theirs = build_image(
        stage1.layout,
        "theirs",
        [busybox_rootfs_layer()],
        config={"Cmd": ["/bin/echo", other]},
        arch=other,
        annotate=False,
    )
    build_index(stage1.layout, REF, [(theirs, f"linux/{other}"), (mine, f"linux/{arch}")])
    result = stage1.run("run", REF)
    assert (result.returncode, result.stdout) == (0, f"{arch}\n"), result.stderr
    assert stage1.tree(mine).is_dir()


def test_docker_media_types_and_every_compression(stage1: Stage1) -> None:
    """A Docker schema 2 manifest (no top-level mediaType) with gzip, zstd and plain layers."""
    layers = [
        busybox_rootfs_layer("zstd"),
        Layer([File("gz", b"gzip layer\n")], "gzip"),
        Layer([File("plain", b"plain layer\n")], "none"),
    ]
    built = build_image(stage1.layout, "unused", layers, annotate=False)
    # Docker names its gzip layers its own way; it has no zstd or plain type: keep OCI's.
    docker_gzip = "application/vnd.docker.image.rootfs.diff.tar.gzip"
    manifest = {  # Docker schema 2, and no top-level mediaType (as umoci writes them)
        "schemaVersion": 2,
        "config": {
            **built.config.descriptor(),
            "mediaType": "application/vnd.docker.container.image.v1+json",
        },
        "layers": [
            {
                **layer.descriptor(),
                "mediaType": docker_gzip
                if layer.media_type.endswith("+gzip")
                else layer.media_type,
            }
            for layer in built.layers
        ],
    }
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (stage1.layout / "blobs" / "sha256" / digest).write_bytes(data)
    # annotate=False wrote no index.json: this manifest is the only entry.
    index: dict[str, object] = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "digest": f"sha256:{digest}",
                "size": len(data),
                "annotations": {"org.opencontainers.image.ref.name": REF},
            }
        ],
    }
    (stage1.layout / "index.json").write_text(json.dumps(index))
    result = stage1.run("run", REF, "--", "/bin/cat", "/gz", "/plain")
    assert (result.returncode, result.stdout) == (0, "gzip layer\nplain layer\n"), result.stderr


def test_corrupt_layer_is_refused_and_nothing_is_published(stage1: Stage1) -> None:
    built = image(stage1, REF, [Layer([File("data", b"x" * 100_000)], "none")])
    blob = stage1.layout / "blobs" / "sha256" / built.layers[1].digest.removeprefix("sha256:")
    data = bytearray(blob.read_bytes())
    data[5000] ^= 0xFF  # inside the file's bytes: the tar still parses
    blob.write_bytes(bytes(data))
    line = check_error(stage1.run("run", REF, "--", "/bin/true"))
    assert line == (
        f"error: layer {built.layers[1].digest} is corrupt (its bytes hash to a different "
        "digest); run: fetchd fsck"
    )
    assert list(stage1.trees.iterdir()) == []


def test_corrupt_config_is_refused(stage1: Stage1) -> None:
    built = image(stage1, REF)
    blob = stage1.layout / "blobs" / "sha256" / built.config.digest.removeprefix("sha256:")
    blob.write_bytes(blob.read_bytes().replace(b"linux", b"LINUX"))
    line = check_error(stage1.run("run", REF, "--", "/bin/true"))
    assert line.startswith(f"error: config {built.config.digest} is corrupt")


def test_no_container_process_outlives_a_killed_stage1(stage1: Stage1) -> None:
    image(stage1, REF)
    proc = subprocess.Popen(
        stage1.argv("run", REF, "--", "/bin/sh", "-c", "sleep 60 & echo ready; wait"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        seen = wait_for(
            lambda: (
                (d := descendants(proc.pid, process_table()))
                and any(c == "sleep" for _, c in d.values())
                and d
            ),
            10,
            "the container's sleep",
        )
        proc.kill()  # SIGKILL: stage1 cannot forward anything
        assert proc.wait(timeout=10) == -signal.SIGKILL
        wait_for(
            lambda: not (set(seen) & set(process_table())),
            5,
            "the container to die with stage1",
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_concurrent_first_runs_publish_one_tree(stage1: Stage1) -> None:
    built = image(stage1, REF, [Layer([File(f"f{i}", b"x" * 1000) for i in range(300)])])
    procs = [
        subprocess.Popen(
            stage1.argv("run", REF, "--", "/bin/cat", "/f7"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert (proc.returncode, out, err) == (0, "x" * 1000, "")
    assert [p.name for p in stage1.trees.iterdir()] == [stage1.tree(built).name]


def test_gc_removes_partial_trees_of_dead_renders(stage1: Stage1) -> None:
    built = image(stage1, REF, config={"Cmd": ["/bin/true"]})
    assert stage1.run("run", REF).returncode == 0
    hexdigest = built.digest.removeprefix("sha256:")
    stale = stage1.trees / f".partial-{hexdigest}-999999999"  # above pid_max: a dead render
    live = stage1.trees / f".partial-{hexdigest}-{os.getpid()}"
    for partial in (stale, live):
        (partial / "etc").mkdir(parents=True)
        (partial / "etc" / "half").write_bytes(b"half")
    result = stage1.run("gc")
    assert result.stdout == f"removed trees/{stale.name}\n"
    assert sorted(p.name for p in stage1.trees.iterdir()) == sorted([hexdigest, live.name])


def test_root_runs_as_the_uid_it_is_given(stage1: Stage1) -> None:
    if os.geteuid() != 0:
        pytest.skip("about stage1 started by root")
    built = image(stage1, REF, config={"Cmd": ["/bin/cat", "/proc/self/uid_map"]})
    result = stage1.run("run", "--uid", "1234567", "--gid", "7654321", REF)
    assert result.stdout.split() == ["0", "1234567", "1"], result.stderr
    assert stage1.tree(built).stat().st_uid == 1234567
    # Back to the default uid: the tree is handed over again (root only), and still runs.
    result = stage1.run("run", REF, "--", "/bin/sh", "-c", "cat /proc/self/gid_map; ls -n /etc")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == ["0", str(DEFAULT_ID), "1"]
    assert {p.lstat().st_uid for p in stage1.tree(built).rglob("*")} == {DEFAULT_ID}


def test_no_host_descriptor_reaches_the_container(stage1: Stage1, tmp_path: Path) -> None:
    """A descriptor stage1's caller left open (say, of a host directory) is not passed on:
    through it the container could reach the host's filesystem."""
    image(stage1, REF)
    host_dir = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)  # inheritable below
    try:
        result = subprocess.run(
            stage1.argv("run", REF, "--", "/bin/ls", "/proc/self/fd"),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            pass_fds=(host_dir,),
            timeout=60,
        )
    finally:
        os.close(host_dir)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.split()) == ["0", "1", "2", "3"]  # 3: ls's own directory


def test_store_from_the_environment(stage1: Stage1) -> None:
    image(stage1, REF)
    argv = stage1.argv("run", REF, "--", "/bin/echo", "env store")
    i = argv.index("--store")
    del argv[i : i + 2]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={**os.environ, "FETCHD_STORE": str(stage1.store)},
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert (result.returncode, result.stdout) == (0, "env store\n"), result.stderr


@pytest.mark.parametrize(
    ("compression", "reason"),
    [
        ("gzip", "is not a valid layer: Not a gzipped file"),
        ("zstd", "is not valid zstd: "),
        ("none", "is not a valid tar: "),
    ],
)
def test_undecodable_layer_is_an_error(stage1: Stage1, compression: str, reason: str) -> None:
    """Bytes that match their digest but are no layer: a one-line error naming the layer."""
    media_type = {
        "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
        "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
        "none": "application/vnd.oci.image.layer.v1.tar",
    }[compression]
    built = build_image(stage1.layout, "unused", [busybox_rootfs_layer()], annotate=False)
    garbage = b"this is not a layer " * 100
    hexdigest = hashlib.sha256(garbage).hexdigest()
    (stage1.layout / "blobs" / "sha256" / hexdigest).write_bytes(garbage)
    bad = {"mediaType": media_type, "digest": f"sha256:{hexdigest}", "size": len(garbage)}
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": built.config.descriptor(),
        "layers": [built.layers[0].descriptor(), bad],
    }
    data = json.dumps(manifest).encode()
    digest = hashlib.sha256(data).hexdigest()
    (stage1.layout / "blobs" / "sha256" / digest).write_bytes(data)
    entry = {
        "mediaType": manifest["mediaType"],
        "digest": f"sha256:{digest}",
        "size": len(data),
        "annotations": {"org.opencontainers.image.ref.name": REF},
    }
    (stage1.layout / "index.json").write_text(
        json.dumps({"schemaVersion": 2, "manifests": [entry]})
    )
    line = check_error(stage1.run("run", REF, "--", "/bin/true"))
    assert line.startswith(f"error: layer sha256:{hexdigest} {reason}"), line
    assert list(stage1.trees.iterdir()) == []
