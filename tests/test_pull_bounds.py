"""Sizes and counts a peer states are bounded before fetchd spends anything on them.

The servers here are test doubles of somebody else's lying server (tests.support
.fakeregistry): they agree to any size asked. fetchd runs as a process of its own under
GNU time, whose %M is its peak RSS, and an address-space limit makes a regression fail in
seconds instead of eating the machine's memory.
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fetchd.progress import Progress, TerminalBars
from tests.support.cli import Fetchd
from tests.support.fakeregistry import (
    CONFIG,
    Answer,
    FakeRegistry,
    oci_manifest,
    sha256,
)

GNU_TIME = "/usr/bin/time"  # Debian package `time` (scripts/install-deps.sh)
HUGE = 1 << 62  # 4 EiB: more than any disk, less than int64
MAX_RSS = 128 << 20  # fetchd refusing takes 38 MiB (GNU time %M)
ADDRESS_SPACE = 2 << 30  # a plan of 2^39 segments hits this within seconds
RUN_TIMEOUT = 60.0
FAST = 20.0  # seconds: generous for a loaded machine; the refusal takes well under 2
ONE_LINE = re.compile(
    r"^error: .* is 4\.0 EiB, more than the [0-9.]+ [KMGTPE]?i?B free in (?P<store>\S+); "
    r"free space there or pull into a store on a bigger disk \(--store\)$"
)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_bounded(fetchd: Fetchd, tmp: Path, *args: str) -> tuple[int, str, int, float]:
    """Run fetchd under the address-space limit: (exit status, stderr, peak RSS, seconds).

    The peak RSS is GNU time's %M, not the ru_maxrss of wait4 on a child of this process:
    a forked child keeps the forking process's RSS high-water mark across exec, so that
    would say at least pytest's own peak (207 MiB late in a CI run). GNU time is small, and
    fetchd, forked from it, starts from its few MiB."""
    err_path, rss_path = tmp / "stderr.txt", tmp / "maxrss.txt"
    started = time.monotonic()
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            [GNU_TIME, "-o", str(rss_path), "-f", "maxrss_kib=%M", *fetchd.argv(*args)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=fetchd.env({"MALLOC_ARENA_MAX": "2"}),
            preexec_fn=_limit_memory,
            start_new_session=True,
        )
    try:
        code = proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"fetchd ran for more than {RUN_TIMEOUT} s") from None
    elapsed = time.monotonic() - started
    found = re.search(r"maxrss_kib=(\d+)", rss_path.read_text())
    assert found, f"GNU time reported no peak RSS: {rss_path.read_text()!r}"
    return code, err_path.read_text(), int(found[1]) * 1024, elapsed


def check_refused(code: int, stderr: str, rss: int, elapsed: float, fetchd: Fetchd) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 1, stderr[-2000:]
    assert len(lines) == 1 and ONE_LINE.match(lines[0]), stderr[-2000:]
    assert ONE_LINE.match(lines[0])["store"] == str(fetchd.store)  # type: ignore[index]
    assert rss < MAX_RSS, f"peak RSS {rss >> 20} MiB"
    assert elapsed < FAST, f"{elapsed:.1f} s"
    assert fetchd.blobs() == set()
    assert fetchd.ingests() == []


@pytest.fixture(scope="module")
def liar() -> Iterator[FakeRegistry]:
    """Agrees to 2^62 bytes: in a layer descriptor, and in every 206 it answers."""
    with FakeRegistry() as server:
        agreed = Answer(
            b"x" * 4096, {"Content-Range": f"bytes 0-{(8 << 20) - 1}/{HUGE}"}, status=206
        )
        server.image("huge", {"digest": sha256(b"never sent"), "size": HUGE}, agreed)
        server.routes["/huge.bin"] = agreed
        server.routes["/huge-200.bin"] = Answer(
            b"x" * 4096, {"Content-Length": str(HUGE)}, send_length=False
        )
        yield server


def test_a_descriptor_of_4_eib_is_refused_before_any_blob_request(
    liar: FakeRegistry, fetchd: Fetchd, tmp_path: Path
) -> None:
    result = run_bounded(
        fetchd, tmp_path, "pull", "--insecure-options", "http", f"docker://{liar.host}/huge:1"
    )
    check_refused(*result, fetchd)
    blob_gets = [p for p, _ in liar.seen if "/blobs/" in p and sha256(b"never sent") in p]
    assert blob_gets == [], "a blob no disk can hold was asked for"


@pytest.mark.parametrize("path", ["/huge.bin", "/huge-200.bin"], ids=["206", "200"])
def test_a_url_agreeing_to_4_eib_is_refused(
    path: str, liar: FakeRegistry, fetchd: Fetchd, tmp_path: Path
) -> None:
    """A 206 whose Content-Range, or a 200 whose Content-Length, says 2^62 bytes."""
    result = run_bounded(fetchd, tmp_path, "pull", "--insecure-options", "http", liar.url + path)
    check_refused(*result, fetchd)


def test_a_manifest_over_the_layer_limit_is_refused(fetchd: Fetchd) -> None:
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "size": 1}
    manifest = oci_manifest(CONFIG, [{**layer, "digest": sha256(b"%d" % i)} for i in range(10_001)])
    with FakeRegistry() as server:
        server.manifest("wide", json.dumps(manifest).encode())
        result = fetchd("pull", "--insecure-options", "http", f"docker://{server.host}/wide:1")
        assert not [p for p, _ in server.seen if "/blobs/" in p]
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {server.host}/wide:1: the manifest lists 10001 layers, "
        "more than the 10000 fetchd accepts"
    ]


class _TimedLog(list[tuple[str, dict[str, str]]]):
    """FakeRegistry.seen, with the moment each request arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, item: tuple[str, dict[str, str]]) -> None:
        self.times.append(time.monotonic())
        super().append(item)


def wide_image(server: FakeRegistry, name: str, layers: int) -> str:
    """An image of ``layers`` distinct tiny layers on ``server``; its config's digest."""
    server.routes[f"/v2/{name}/blobs/{sha256(CONFIG)}"] = Answer(CONFIG)
    descs: list[dict[str, object]] = []
    for i in range(layers):
        blob = b"%d" % i
        server.routes[f"/v2/{name}/blobs/{sha256(blob)}"] = Answer(blob)
        descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": sha256(blob),
                "size": len(blob),
            }
        )
    server.manifest(name, json.dumps(oci_manifest(CONFIG, descs)).encode())
    return sha256(CONFIG)


PLAN_LIMIT = 2.0  # seconds from the manifest to the first blob request (the bound)
FIRST_BLOB_TIMEOUT = 15.0  # the quadratic plan took ~135 s for 5,000 layers


def test_a_5000_layer_manifest_is_planned_in_under_2_s(fetchd: Fetchd) -> None:
    """Planning is what runs between the manifest's arrival and the first blob request:
    per blob it stat()ed every blob (25 million stats for 5,000 layers). The transfer of
    5,000 blobs is not measured (its cost is per blob, and this machine is shared): the
    pull is stopped once the first blob requests came."""
    with FakeRegistry() as server:
        server.seen = _TimedLog()
        config = wide_image(server, "wide", 5000)
        proc = fetchd.popen("pull", "--insecure-options", "http", f"docker://{server.host}/wide:1")

        def first(wanted: Callable[[str], bool]) -> int | None:
            return next((i for i, (p, _) in enumerate(server.seen) if wanted(p)), None)

        def layer(path: str) -> bool:  # the config comes first, before the layers' plan
            return "/blobs/" in path and config not in path

        try:
            deadline = time.monotonic() + FIRST_BLOB_TIMEOUT
            while first(layer) is None and proc.poll() is None:
                assert time.monotonic() < deadline, "no layer asked for: still planning"
                time.sleep(0.02)
        finally:
            proc.kill()
            proc.communicate()
        m, b = first(lambda p: "/manifests/" in p), first(layer)
        assert m is not None and b is not None, "the pull ended before any layer request"
        planned = server.seen.times[b] - server.seen.times[m]
    assert planned < PLAN_LIMIT, f"{planned:.2f} s from the manifest to the first layer"


def test_progress_of_5000_blobs_holds_and_draws_a_bounded_number() -> None:
    """The bars a 5,000-layer pull (or a server's long life) keeps and redraws 8 times a
    second: a bounded number, with a total over every blob."""
    progress = Progress()
    bars = TerminalBars(progress, io.StringIO())
    for i in range(5000):
        key = f"blob-{i}"
        progress.start(key, key, 10)
        progress.advance(key, 10)
        if i % 1000 == 999:
            progress.drop(key)  # failed: no bar, but its bytes moved
        else:
            progress.finish(key)
        assert len(progress.transfers) <= 64
    progress.start("running", "running", 100)
    lines = bars.render()
    assert 2 <= len(lines) <= 21
    assert any(line.startswith("running") for line in lines)
    assert lines[-1].startswith("total") and "48.8 KiB / 48.9 KiB" in lines[-1], lines[-1]


SMALL_DISK = 96  # MiB of tmpfs: 32 MiB of room once fetchd's 64 MiB reserve is kept


def run_on_small_disk(fetchd: Fetchd, mount: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """fetchd with its store on a tmpfs of SMALL_DISK MiB, mounted in a mount namespace of
    its own (nothing outside the process sees it; it goes away with the process); stdout
    lists the ingests it left."""
    mount.mkdir()
    argv = fetchd.argv(*args)
    # After fetchd, what is left in ingest/ goes to stdout (fetchd's own is empty on error).
    script = (
        f'm="$1"; shift; mount -t tmpfs -o size={SMALL_DISK}m fetchd-test "$m" || exit 99; '
        '"$@"; rc=$?; ls -A "$m/store/ingest"; exit $rc'
    )
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(mount),
            *argv,
        ],
        capture_output=True,
        text=True,
        env=fetchd.env(),
        timeout=RUN_TIMEOUT,
    )


def test_a_body_of_no_length_stops_at_the_free_space(liar: FakeRegistry, tmp_path: Path) -> None:
    """A URL that streams without end (no Content-Length): fetchd stops at what the disk
    can hold, says so in one line and keeps nothing of it."""
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs -o size=1m t {tmp_path}"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace here: {probe.stderr!r}")
    liar.routes["/endless.bin"] = Answer(send_length=False, endless=True)
    mount = tmp_path / "small"
    fetchd = Fetchd(mount / "store", tmp_path)

    result = run_on_small_disk(
        fetchd, mount, "pull", "--insecure-options", "http", f"{liar.url}/endless.bin"
    )

    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        f"error: {liar.url}/endless.bin runs on, more than the 32 MiB free in {fetchd.store}; "
        "free space there or pull into a store on a bigger disk (--store)"
    ]
    assert result.stdout == "", f"left in ingest/: {result.stdout}"
