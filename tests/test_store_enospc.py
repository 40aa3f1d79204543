"""A full disk (issue 9 items 14 and 16), on a real small filesystem: a tmpfs.

To fill the disk at a chosen moment of a pull, the test holds one of the store's locks
(as another fetchd process would), waits until the pull committed what it can, then
shrinks the tmpfs to what is in use (``mount -o remount,size=``) and lets the pull go on:
its next write fails with ENOSPC. Shrinking costs no memory, unlike writing a filler.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fetchd.errors import DiskFull
from fetchd.model import Digest
from fetchd.store import Store
from tests.support.cli import Fetchd, failed, ok
from tests.support.images import BuiltImage, File, Layer, build_image, push
from tests.support.procs import wait_until
from tests.support.registry import Registry

HTTP = ("--insecure-options", "http")
#: Bigger than the free space fetchd keeps in reserve before it starts a blob (64 MiB);
#: nothing is allocated until written.
DISK_SIZE = "96m"
WAIT = 60.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def fill(disk: Path) -> None:
    """Make the filesystem exactly as big as what is on it: no block free."""
    st = os.statvfs(disk)
    used_kib = (st.f_blocks - st.f_bfree) * st.f_frsize // 1024
    subprocess.run(["mount", "-o", f"remount,size={used_kib}k", str(disk)], check=True)
    assert os.statvfs(disk).f_bavail == 0


@contextlib.contextmanager
def holding(lock: Path) -> Iterator[None]:
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Images:
    def __init__(self, layout: Path, registry: Registry) -> None:
        self.before = build_image(layout, "before", [Layer([File("a.txt", b"there before\n")])])
        self.next = build_image(
            layout,
            "next",
            [Layer([File(f"n{i}.txt", f"next {i}\n".encode() * 500)]) for i in range(3)],
        )
        self.before_name = f"{registry.host}/enospc-before:1"
        self.next_name = f"{registry.host}/enospc-next:1"
        push(layout, "before", self.before_name)
        push(layout, "next", self.next_name)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> Images:
    return Images(tmp_path_factory.mktemp("enospc") / "layout", registry)


def _blob_digests(image: BuiltImage) -> list[str]:
    return [image.digest, image.config.digest, *(layer.digest for layer in image.layers)]


def _temp_files(store: Path) -> list[Path]:
    return [p for p in (store / "layout").rglob(".*")]


def _store_with_one_image(disk: Path, images: Images, tmp_path: Path) -> Fetchd:
    home = tmp_path / "home"
    home.mkdir()
    fetchd = Fetchd(disk / "store", home)
    out = ok(fetchd("pull", *HTTP, f"docker://{images.before_name}"))
    assert out.strip() == images.before.digest
    return fetchd


def _check_left_as_before(fetchd: Fetchd, blobs: set[str], index: bytes) -> None:
    assert fetchd.blobs() == blobs  # what the failed pull committed went again
    assert _temp_files(fetchd.store) == []
    assert (fetchd.store / "layout" / "index.json").read_bytes() == index
    assert "ok" in ok(fetchd("fsck"))


def _pull_until(
    fetchd: Fetchd, name: str, ready: Callable[[], bool], what: str, disk: Path
) -> subprocess.Popen[str]:
    """Start a pull of NAME; once ``ready()`` (the pull waits on a lock we hold), fill
    the disk. The pull is killed if anything goes wrong before that."""
    pull = fetchd.popen("pull", *HTTP, f"docker://{name}")
    try:
        wait_until(lambda: pull.poll() is not None or ready(), WAIT, what)
        assert pull.poll() is None, pull.communicate()
        fill(disk)
    except BaseException:
        pull.kill()
        pull.communicate()
        raise
    return pull


def _finished(pull: subprocess.Popen[str]) -> subprocess.CompletedProcess[str]:
    _, err = pull.communicate(timeout=WAIT)
    return subprocess.CompletedProcess(pull.args, pull.returncode, "", err)


def test_enospc_rewriting_index_json_leaves_nothing_and_the_full_store_still_works(
    disk: Path, images: Images, tmp_path: Path
) -> None:
    fetchd = _store_with_one_image(disk, images, tmp_path)
    blobs, index = fetchd.blobs(), (fetchd.store / "layout" / "index.json").read_bytes()
    with holding(fetchd.store / "index.lock"):
        pull = _pull_until(
            fetchd,
            images.next_name,
            lambda: set(_blob_digests(images.next)) <= fetchd.blobs(),
            "the pull to commit every blob and wait to write index.json",
            disk,
        )
    result = _finished(pull)

    line = failed(result)
    assert line == (
        f"error: no space left on device while writing layout/index.json in {fetchd.store}; "
        "free space or use fetchd gc"
    )
    _check_left_as_before(fetchd, blobs, index)

    # Full again (the failed pull freed what it had committed): every read-only command
    # works, and gc, which is how one frees space, too.
    fill(disk)
    out = ok(fetchd("images"))
    assert images.before_name in out
    assert images.before.digest[:19] in out
    assert "ok" in ok(fetchd("fsck"))
    assert "removed 0 blobs" in ok(fetchd("gc"))
    assert os.statvfs(disk).f_bavail == 0  # nothing needed to be written


def test_a_pull_that_runs_out_of_space_removes_what_it_committed(
    disk: Path, images: Images, tmp_path: Path
) -> None:
    fetchd = _store_with_one_image(disk, images, tmp_path)
    blobs, index = fetchd.blobs(), (fetchd.store / "layout" / "index.json").read_bytes()
    last = images.next.layers[-1].digest
    others = set(_blob_digests(images.next)[1:]) - {last}
    # The last layer waits for us (its ingest lock); the rest is committed meanwhile.
    with holding(fetchd.store / "ingest" / last.replace(":", "-") / "lock"):
        pull = _pull_until(
            fetchd,
            images.next_name,
            lambda: others <= fetchd.blobs(),
            "the pull to commit all but the last layer",
            disk,
        )
    result = _finished(pull)

    # The one line names the store and the lack of space (refused before the blob's
    # first byte, or ENOSPC while writing it).
    line = failed(result, str(fetchd.store))
    assert "internal error" not in line and "space" in line, line
    _check_left_as_before(fetchd, blobs, index)


def test_a_blob_written_into_a_full_store_raises_disk_full(disk: Path) -> None:
    store = Store.open(disk / "store")
    fill(disk)
    data = os.urandom(64 << 10)
    digest = Digest.of(data)

    async def write() -> None:
        async with store.ingest(digest, len(data)) as ingest:
            await ingest.write([data])
            await ingest.commit()

    with pytest.raises(DiskFull) as caught:
        asyncio.run(write())
    assert str(caught.value) == (
        f"no space left on device while writing blob {digest.short} in {store.root}; "
        "free space or use fetchd gc"
    )
    assert not store.has(digest)
    assert _temp_files(store.root) == []
