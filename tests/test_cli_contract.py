"""Issue 10: one error contract for fetchd and stage1, and the command line of the ecosystem.

Every mistake a user can make ends with exit 1 (2 for usage) and one line ``error: …``
that says what to do: never a traceback, never "internal error", and the store as it
was (``index.json`` byte for byte, ``fsck`` clean). A store the user may only read works
for everything that does not write. Real peers throughout: the registry (images pushed
with skopeo), ``python -m http.server``, a few lines of range server that closes every
connection, and the other user ``nobody`` through runuser.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import REPO, Fetchd, ok
from tests.support.images import BuiltImage, File, Layer, Raw, build_image, push
from tests.support.nginx import make_file, start_nginx
from tests.support.procs import free_port, wait_until
from tests.support.rangefaults import RangeServer
from tests.support.registry import Registry
from tests.support.stage1 import SYSTEM_PYTHON, Stage1, check_error, readable_stage1

HTTP = ("--insecure-options", "http")
MIB = 1 << 20


# --- fixtures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pushed:
    """Two small busybox images on the session registry, pushed once for the module."""

    registry: Registry
    one: BuiltImage
    two: BuiltImage

    @property
    def ref1(self) -> str:
        return f"docker://{self.registry.host}/contract/one:1"

    @property
    def ref2(self) -> str:
        return f"docker://{self.registry.host}/contract/two:1"

    def name(self, ref: str) -> str:
        return ref.removeprefix("docker://")


@pytest.fixture(scope="module")
def pushed(
    registry: Registry, busybox_layer: Layer, tmp_path_factory: pytest.TempPathFactory
) -> Pushed:
    layout = tmp_path_factory.mktemp("contract") / "layout"
    one = build_image(layout, "one", [busybox_layer, Layer([File("etc/which", b"one\n")])])
    two = build_image(layout, "two", [busybox_layer, Layer([File("etc/which", b"two\n")])])
    push(layout, "one", f"{registry.host}/contract/one:1")
    push(layout, "two", f"{registry.host}/contract/two:1")
    return Pushed(registry, one, two)


# What fetchd run as another user does not import: left out of its readable copy.
_DEV_ONLY = ("mypy", "mypyc", "pip", "pygments", "ruff", "hypothesis", "_pytest", "pytest")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # the same inode, through a path every user may walk
    except OSError:
        shutil.copy2(src, dst)


@functools.cache
def _readable_pythonpath() -> str:
    """fetchd, stage1 and the virtualenv's packages where any user can import them.

    The checkout may sit under a directory other users cannot enter (CI clones into a
    0700 temporary directory): the packages are hard-linked (or copied) into a 0755
    directory, removed at exit."""
    base = Path(tempfile.mkdtemp(prefix="fetchd-readable-"))
    base.chmod(0o755)
    for package in ("fetchd", "stage1"):
        shutil.copytree(
            REPO / package, base / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    site = Path(sysconfig.get_paths()["purelib"])
    shutil.copytree(
        site,
        base / "site",
        copy_function=_link_or_copy,
        ignore=lambda _, names: [n for n in names if n.startswith(_DEV_ONLY) or n == "__pycache__"],
    )
    for path in [base, *base.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)
    atexit.register(shutil.rmtree, base, True)
    return f"{base}:{base / 'site'}"


class OtherUser(Fetchd):
    """fetchd run as the user ``nobody`` (runuser), with the project's interpreter version
    from /usr/bin and a copy of the code and the virtualenv's packages that any user can
    read on PYTHONPATH."""

    def argv(self, *args: str) -> list[str]:
        return [
            "runuser",
            "-u",
            "nobody",
            "--",
            "env",
            f"HOME={self.home}",
            f"PYTHONPATH={_readable_pythonpath()}",
            "PYTHONDONTWRITEBYTECODE=1",
            SYSTEM_PYTHON,
            "-m",
            "fetchd",
            "--store",
            str(self.store),
            *args,
        ]


def _can_run_as_nobody() -> str | None:
    if os.geteuid() != 0:
        return "needs root to become nobody (runuser)"
    if not shutil.which("runuser") or not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"runuser and {SYSTEM_PYTHON} are needed to run fetchd as another user"
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if version != str(sys.version_info[:2]):
        return f"{SYSTEM_PYTHON} is not Python {sys.version_info[:2]} (the virtualenv's)"
    return None


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory under /tmp that nobody can enter (the test's tmp_path is root's 0700)."""
    why = _can_run_as_nobody()
    if why:
        pytest.skip(why)
    base = Path(tempfile.mkdtemp(prefix="fetchd-contract-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(base)], check=False)
        shutil.rmtree(base)


# --- what "the store is unchanged" means ---------------------------------------------------


def snapshot(fetchd: Fetchd) -> tuple[bytes, set[str]]:
    return (fetchd.store / "layout" / "index.json").read_bytes(), fetchd.blobs()


def assert_unchanged(fetchd: Fetchd, before: tuple[bytes, set[str]]) -> None:
    assert snapshot(fetchd) == before, "the store changed"
    assert "ok" in ok(fetchd("fsck"))


def one_error(result: subprocess.CompletedProcess[str], status: int = 1) -> str:
    """The single ``error:`` line of a failed run: no traceback, no internal error."""
    assert "Traceback" not in result.stderr, result.stderr
    assert "internal error" not in result.stderr, result.stderr
    if status == 2:  # argparse's usage lines come first, then the one error line
        assert result.returncode == 2, (result.returncode, result.stderr)
        errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1, result.stderr
        return errors[0]
    return check_error(result, status)


# --- the enumeration of mistakes -------------------------------------------------------------


@dataclass(frozen=True)
class Mistake:
    """A command a user may get wrong: its arguments (given the pushed images and a scratch
    directory), the exit status and words of the error line it must end with."""

    argv: Callable[[Pushed, Path], list[str]]
    status: int
    says: tuple[str, ...]


#: this machine's architecture (the test images are built for it) and another one
MINE = {"x86_64": "amd64", "aarch64": "arm64"}[os.uname().machine]
OTHER = "arm64" if MINE == "amd64" else "amd64"

MISTAKES: dict[str, Mistake] = {
    "serve on a port in use": Mistake(
        lambda p, d: ["serve", "--listen", "127.0.0.1:{busy}", "--upstream", p.registry.url],
        1,
        ("cannot listen on 127.0.0.1:", "address already in use", "--listen"),
    ),
    "serve on port 80000": Mistake(
        lambda p, d: ["serve", "--listen", "127.0.0.1:80000", "--upstream", p.registry.url],
        2,
        ("is not ADDR:PORT", "65535"),
    ),
    "serve on no port": Mistake(
        lambda p, d: ["serve", "--listen", "localhost", "--upstream", p.registry.url],
        2,
        ("is not ADDR:PORT",),
    ),
    "-v with -q": Mistake(lambda p, d: ["images", "-v", "-q"], 2, ("-q", "-v")),
    "-v before the command, -q after it": Mistake(
        lambda p, d: ["-v", "images", "-q"], 2, ("-v and -q",)
    ),
    "prefetch --from a missing file": Mistake(
        lambda p, d: ["prefetch", "--from", str(d / "missing.txt")],
        1,
        ("cannot read", "missing.txt"),
    ),
    "export into a file's subdirectory": Mistake(
        lambda p, d: ["export", p.ref1, str(d / "a-file" / "out")], 1, ("a-file",)
    ),
    "pull of a name not in the store under --pull-policy never": Mistake(
        lambda p, d: ["pull", *HTTP, "--pull-policy", "never", p.ref2],
        1,
        ("not in the store", "--pull-policy never"),
    ),
    "pull of a tag the registry lacks": Mistake(
        lambda p, d: ["pull", *HTTP, p.ref1.replace(":1", ":nope")], 1, ("not found",)
    ),
    "rm of a name not in the store": Mistake(lambda p, d: ["rm", p.ref2], 1, ("not in the store",)),
    "--store inside a file (given after the command)": Mistake(
        lambda p, d: ["images", "--store", str(d / "a-file" / "store")],
        1,
        ("cannot open the store", "Not a directory", "--store"),
    ),
    "export of a name not in the store": Mistake(
        lambda p, d: ["export", p.ref2, str(d / "out")], 1, ("not in the store",)
    ),
    "gc --max-size 1 (no unit)": Mistake(lambda p, d: ["gc", "--max-size", "1"], 2, ("unit",)),
    "gc --max-size -1": Mistake(lambda p, d: ["gc", "--max-size", "-1"], 2, ("negative",)),
    "gc --max-size 0": Mistake(lambda p, d: ["gc", "--max-size", "0"], 2, ("--max-size",)),
    "pull --platform an image cannot satisfy": Mistake(
        lambda p, d: ["pull", *HTTP, "--platform", f"linux/{OTHER}", p.ref1],
        1,
        (f"linux/{MINE} only", "--platform"),
    ),
    "--stall-timeout 0": Mistake(
        lambda p, d: ["pull", *HTTP, "--stall-timeout", "0", p.ref1], 2, ("--stall-timeout",)
    ),
    "a malformed --platform": Mistake(
        lambda p, d: ["pull", *HTTP, "--platform", "linux", p.ref1], 2, ("OS/ARCH",)
    ),
    "--deadline nan": Mistake(
        lambda p, d: ["pull", *HTTP, "--deadline", "nan", p.ref1], 2, ("--deadline", "seconds")
    ),
    "--deadline -1": Mistake(
        lambda p, d: ["pull", *HTTP, "--deadline", "-1", p.ref1], 2, ("--deadline", "seconds")
    ),
    "prefetch --from a file that is not text": Mistake(
        lambda p, d: ["prefetch", "--from", str(d / "binary")], 2, ("not UTF-8", "binary")
    ),
    "serve --max-connections -5": Mistake(
        lambda p, d: ["serve", "--max-connections", "-5", "--upstream", p.registry.url],
        2,
        ("--max-connections", "at least 1"),
    ),
    "serve --upstream-blobs -1": Mistake(
        lambda p, d: ["serve", "--upstream-blobs", "-1", "--upstream", p.registry.url],
        2,
        ("--upstream-blobs", "at least 0"),
    ),
    "serve --grace -1": Mistake(
        lambda p, d: ["serve", "--grace", "-1", "--upstream", p.registry.url],
        2,
        ("--grace", "seconds"),
    ),
}


@pytest.fixture(scope="module")
def one_pulled(pushed: Pushed, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding pushed.ref1, pulled once for the module; tests take copies."""
    base = tmp_path_factory.mktemp("one-pulled")
    (base / "home").mkdir()
    ok(Fetchd(base / "store", base / "home")("pull", "-q", *HTTP, pushed.ref1))
    return base / "store"


@pytest.mark.parametrize("case", list(MISTAKES))
def test_each_mistake_is_one_error_line_and_leaves_the_store_as_it_was(
    case: str, pushed: Pushed, one_pulled: Path, fetchd: Fetchd, tmp_path: Path
) -> None:
    shutil.copytree(one_pulled, fetchd.store)
    (tmp_path / "a-file").write_text("not a directory\n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00docker://x\n")
    before = snapshot(fetchd)
    mistake = MISTAKES[case]
    with BusyPort() as busy:
        argv = [a.replace("{busy}", str(busy)) for a in mistake.argv(pushed, tmp_path)]
        result = fetchd(*argv, timeout=60)
    line = one_error(result, mistake.status)
    for word in mistake.says:
        assert word in line, (word, line)
    assert_unchanged(fetchd, before)


class BusyPort:
    """A port of 127.0.0.1 something already listens on, for the time of a ``with``."""

    def __enter__(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


# --- a store the user may only read ----------------------------------------------------------


def test_a_read_only_store_serves_every_command_that_does_not_write(
    pushed: Pushed, public_dir: Path
) -> None:
    """nobody's own store, made read-only with chmod -R a-w: images, fsck, export, a
    pull of an image already there and stage1 run of a rendered tree succeed; rm, gc and
    a pull of a new image end with one line that says the store is read-only."""
    home = public_dir / "home"
    home.mkdir()
    store = public_dir / "store"
    store.mkdir()
    for path in (home, store):
        shutil.chown(path, "nobody")
    user = OtherUser(store, home)
    digest = ok(user("pull", "-q", *HTTP, pushed.ref1)).strip()
    stage1 = Stage1(store, "nobody")
    assert stage1.run("run", pushed.ref1, "--", "/bin/cat", "/etc/which").stdout == "one\n"
    subprocess.run(["chmod", "-R", "a-w", str(store)], check=True)
    before = snapshot(user)

    assert ok(user("pull", *HTTP, pushed.ref1)).strip() == digest
    listed = ok(user("images"))
    assert pushed.name(pushed.ref1) in listed
    assert "ok" in ok(user("fsck"))
    out = public_dir / "export"
    out.mkdir()
    shutil.chown(out, "nobody")
    ok(user("export", pushed.ref1, str(out / "layout")))
    assert (out / "layout" / "index.json").is_file()
    run = stage1.run("run", pushed.ref1, "--", "/bin/cat", "/etc/which")
    assert (run.returncode, run.stdout) == (0, "one\n"), run.stderr
    assert "warning" not in ok(user("images")).lower() and not user("images").stderr

    for argv in (["rm", pushed.ref1], ["gc"], ["pull", *HTTP, pushed.ref2]):
        line = one_error(user(*argv))
        assert "the store is read-only for this user" in line and "--store" in line, line
    assert snapshot(user) == before


def test_root_s_store_read_by_another_user(pushed: Pushed, public_dir: Path) -> None:
    """A store root pulled into and others may read: nobody lists, checks and pulls (the
    image is there) without a warning; a write is one clear line."""
    store = public_dir / "store"
    root = Fetchd(store, public_dir)
    digest = ok(root("pull", "-q", *HTTP, pushed.ref1)).strip()
    subprocess.run(["chmod", "-R", "a+rX", str(store)], check=True)
    user = OtherUser(store, public_dir)
    before = snapshot(root)

    images = user("images")
    assert pushed.name(pushed.ref1) in ok(images) and images.stderr == ""
    assert "ok" in ok(user("fsck"))
    assert ok(user("pull", *HTTP, pushed.ref1)).strip() == digest
    one_error(user("rm", pushed.ref1))
    assert_unchanged(root, before)


def test_serve_on_a_privileged_port_as_a_normal_user(pushed: Pushed, public_dir: Path) -> None:
    start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")
    if start.exists() and int(start.read_text()) <= 81:
        pytest.skip("this machine lets every user listen on port 81")
    (public_dir / "store").mkdir()
    shutil.chown(public_dir / "store", "nobody")
    user = OtherUser(public_dir / "store", public_dir)
    result = user("serve", "--listen", "127.0.0.1:81", "--upstream", pushed.registry.url)
    line = one_error(result)
    assert "cannot listen on 127.0.0.1:81: permission denied" in line and "1023" in line


# --- URL pulls from servers that close every connection ---------------------------------------


@pytest.fixture(scope="module")
def url_data() -> bytes:
    return random.Random(10).randbytes(20 * MIB + 12345)  # more than one 8 MiB segment


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_a_range_server_that_answers_connection_close_serves_a_url_pull(
    url_data: bytes, fetchd: Fetchd
) -> None:
    with RangeServer(url_data, headers={"Connection": "close"}) as server:
        out = ok(fetchd("pull", *HTTP, server.file_url, timeout=120))
        gets = [s for s in server.seen if s.method == "GET"]
    assert out.strip() == sha256(url_data)
    assert all(s.status == 206 for s in gets) and len(gets) > 1, "not over ranges"
    assert "ok" in ok(fetchd("fsck"))


def test_python_http_server_serves_a_url_pull_as_one_stream(
    url_data: bytes, fetchd: Fetchd, tmp_path: Path
) -> None:
    root = tmp_path / "www"
    root.mkdir()
    (root / "blob.bin").write_bytes(url_data)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(port), "-d", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: _listening(port), 10.0, "python -m http.server to listen")
        out = ok(fetchd("pull", *HTTP, f"http://127.0.0.1:{port}/blob.bin", timeout=120))
    finally:
        server.terminate()
        log = server.communicate(timeout=10)[1]
    assert out.strip() == sha256(url_data)
    gets = [ln for ln in log.splitlines() if '"GET /blob.bin' in ln]
    assert len(gets) == 1 and '" 200 ' in gets[0], log  # one stream: it ignores Range
    assert "ok" in ok(fetchd("fsck"))


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- global options after the subcommand ------------------------------------------------------


def test_global_options_also_after_the_subcommand(
    pushed: Pushed, fetchd: Fetchd, tmp_path: Path
) -> None:
    other = tmp_path / "other-store"
    bare = [sys.executable, "-m", "fetchd"]
    env = fetchd.env()

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*bare, *args], capture_output=True, text=True, env=env)

    pulled = ok(run("pull", "-q", *HTTP, "--store", str(other), pushed.ref1))
    assert pulled.strip().startswith("sha256:")
    assert pushed.name(pushed.ref1) in ok(run("images", "--store", str(other)))
    assert pushed.name(pushed.ref1) in ok(run("--store", str(other), "images"))  # DESIGN.md's
    verbose = run("pull", *HTTP, pushed.ref1, "-v", "--store", str(other))
    assert "present" in verbose.stderr, verbose.stderr  # -v's INFO line
    assert ok(run("--store", str(other), "pull", "-q", *HTTP, pushed.ref1)) == pulled
    # stage1's --store after the command
    gc = subprocess.run(
        [sys.executable, "-m", "stage1", "gc", "--store", str(other)],
        capture_output=True,
        text=True,
    )
    assert gc.returncode == 0, gc.stderr


def test_stage1_says_an_unusable_store_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x\n")
    result = subprocess.run(
        [sys.executable, "-m", "stage1", "run", "--store", str(tmp_path / "a-file"), "x:1"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(readable_stage1())},
    )
    assert "Not a directory" in one_error(result)


# --- stage1: device nodes ----------------------------------------------------------------------


def _device(name: str, major: int, minor: int) -> Raw:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.devmajor, info.devminor = tarfile.CHRTYPE, 0o666, major, minor
    return Raw(info)


# What debian:bookworm's rootfs layer holds in /dev.
DEBIAN_DEVICES = [("console", 5, 1), ("full", 1, 7), ("null", 1, 3), ("ptmx", 5, 2)]
DEBIAN_DEVICES_2 = [("random", 1, 8), ("tty", 5, 0), ("urandom", 1, 9), ("zero", 1, 5)]


def test_device_nodes_of_every_layer_are_one_warning_per_render(
    stage1: Stage1, busybox_layer: Layer
) -> None:
    ref = "127.0.0.1:5000/contract/devices:1"
    build_image(
        stage1.layout,
        ref,
        [
            busybox_layer,
            Layer([_device(f"dev/{n}", a, b) for n, a, b in DEBIAN_DEVICES]),
            Layer([_device(f"dev/{n}", a, b) for n, a, b in DEBIAN_DEVICES_2]),
        ],
    )
    first = stage1.run("run", ref, "--", "/bin/true")
    assert first.returncode == 0, first.stderr
    warnings = first.stderr.splitlines()
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("warning: 8 device nodes skipped (dev/console, dev/full")
    again = stage1.run("run", ref, "--", "/bin/true")  # the tree is rendered: no warning
    assert (again.returncode, again.stderr) == (0, "")


# --- --json, the names of a multi-image pull, progress rows -----------------------------------


def _blob_bytes(fetchd: Fetchd) -> int:
    root = fetchd.store / "layout" / "blobs" / "sha256"
    return sum(p.stat().st_size for p in root.iterdir())


def test_pull_json_is_one_document_with_the_bytes_received(pushed: Pushed, fetchd: Fetchd) -> None:
    first = fetchd("pull", "-q", "--json", *HTTP, pushed.ref1)
    doc = json.loads(ok(first))
    assert first.stderr == ""
    (image,) = doc["images"]
    assert image["name"] == pushed.name(pushed.ref1) and image["ref"] == pushed.ref1
    assert image["digest"] == image["manifest"] == pushed.one.digest
    assert image["platform"] == f"linux/{MINE}" and image["platforms"] == [f"linux/{MINE}"]
    assert image["fetched"] is True
    # Every byte of the store came over the network for this pull: manifest, config, layers.
    assert image["bytes_fetched"] == doc["bytes_fetched"] == _blob_bytes(fetchd)

    again = json.loads(ok(fetchd("pull", "--json", *HTTP, pushed.ref1)))
    assert again["images"][0]["fetched"] is False and again["bytes_fetched"] == 0
    pre = json.loads(ok(fetchd("prefetch", "--json", *HTTP, pushed.ref1)))
    assert pre["images"][0]["digest"] == pushed.one.digest


def test_a_multi_image_pull_names_each_digest_a_single_one_prints_only_it(
    pushed: Pushed, fetchd: Fetchd
) -> None:
    both = ok(fetchd("pull", "-q", *HTTP, pushed.ref1, pushed.ref2)).splitlines()
    assert both == [
        f"{pushed.name(pushed.ref1)} {pushed.one.digest}",
        f"{pushed.name(pushed.ref2)} {pushed.two.digest}",
    ]
    assert ok(fetchd("pull", "-q", *HTTP, pushed.ref2)) == pushed.two.digest + "\n"


def test_images_fsck_gc_json_carry_what_their_text_shows(pushed: Pushed, fetchd: Fetchd) -> None:
    ok(fetchd("pull", "-q", *HTTP, pushed.ref1, pushed.ref2))
    images = json.loads(ok(fetchd("images", "--json")))
    text = ok(fetchd("images"))
    assert sorted(i["name"] for i in images) == sorted(
        [pushed.name(pushed.ref1), pushed.name(pushed.ref2)]
    )
    for i in images:
        assert i["name"] in text and i["digest"][:19] in text and i["platforms"]

    fsck = json.loads(ok(fetchd("fsck", "--json")))
    assert fsck["ok"] is True and f"checked {fsck['checked']} blobs: ok" in ok(fetchd("fsck"))
    assert fsck["corrupt"] == [] and fsck["missing"] == []

    ok(fetchd("rm", pushed.ref2))
    gc = json.loads(ok(fetchd("gc", "--json")))
    assert gc["removed_blobs"] == 3  # two's manifest, config and its own layer
    assert gc["freed_bytes"] > 0 and gc["evicted"] == []
    assert ok(fetchd("gc")).startswith("removed 0 blobs")  # the text of the same, now


def test_progress_rows_name_the_image_and_what_each_row_is(pushed: Pushed, fetchd: Fetchd) -> None:
    """On a terminal (a pty as stderr): a row per manifest, config and layer, each with
    the image's short name."""
    import pty

    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            fetchd.argv("pull", *HTTP, pushed.ref1),
            stdout=subprocess.PIPE,
            stderr=follower,
            env=fetchd.env(),
        )
        os.close(follower)
        follower = -1
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    rows = drawn.decode().replace("\x1b[2K", "\n").splitlines()
    labels = {" ".join(r.split()[:2]) for r in rows if r.startswith("one:1 ")}
    assert labels == {"one:1 manifest", "one:1 config", "one:1 layer"}, rows
    assert any(r.startswith("total ") for r in rows), rows


def test_a_url_pull_never_loads_aiohttp_or_libtorrent(fetchd: Fetchd, tmp_path: Path) -> None:
    """A plain URL pull runs on fetchd's own transport: aiohttp (0.14-0.24 s of CPU at
    import, its SSL contexts) and libtorrent are never imported (PYTHONPROFILEIMPORTTIME
    lists every module a process imports, on stderr)."""
    root = tmp_path / "www"
    root.mkdir()
    digest = make_file(root / "blob", 3 << 20, seed=7)
    with start_nginx(tmp_path / "nginx", root) as server:
        res = fetchd(
            "pull",
            "--insecure-options",
            "http",
            "--digest",
            digest,
            f"{server.url}/blob",
            env={"PYTHONPROFILEIMPORTTIME": "1"},
        )
    assert ok(res).strip().splitlines()[-1] == digest
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in res.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "fetchd.engine.pull" in imported and "fetchd.sources.transport" in imported
    assert not {m for m in imported if m.split(".")[0] in ("aiohttp", "libtorrent")}
