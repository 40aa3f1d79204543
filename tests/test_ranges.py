"""Issue 4: segmented HTTP(S) range downloads (`fetchd pull [--digest] URL`).

Against the real nginx on loopback (HTTPS with a test CA via SSL_CERT_FILE, and plain HTTP),
the fault-injecting RangeServer (tests/support/rangefaults.py) and the real registry. Every
test asserts outcomes: the digest printed, the blob in layout/blobs, fsck, exit codes and
error lines, and what the servers logged (statuses, ranges, body bytes).

One 1 GiB file is made once for the module and served by one nginx; each test asks for it
with a query string of its own (`/file.bin?t=NAME`), so each test is a different URL to
fetchd (its own remote-cache record and ingest) and its own lines in nginx's access log.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.cli import Fetchd, assert_stored, blob_file, failed, ok
from tests.support.images import build_image, push, random_layer
from tests.support.nginx import Nginx, NginxLogLine, make_file, start_nginx
from tests.support.procs import wait_until
from tests.support.rangefaults import RangeServer
from tests.support.registry import Registry
from tests.support.tls import TestCA

MIB = 1 << 20
GIB = 1 << 30
SEGMENT = 8 * MIB  # fetchd.sources.segments.SEGMENT: the probe asks for this much first
HTTP = ("--insecure-options", "http")
BOUNDED = 30.0  # seconds: "within a bounded time" for the fault servers (40 MiB)
FAULT_SIZE = 40 * MIB + 12345  # several segments, not a multiple of one


# --- fixtures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Big:
    nginx: Nginx
    path: Path
    size: int
    digest: str
    env: dict[str, str]  # SSL_CERT_FILE naming the test CA

    def url(self, test: str) -> str:
        return f"{self.nginx.https_url}/file.bin?t={test}"

    def lines(self, test: str) -> list[NginxLogLine]:
        """nginx's access-log lines (settled) of this test's URL."""
        return [
            line for line in self.nginx.requests("/file.bin") if line.uri.endswith(f"?t={test}")
        ]


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory, tls_ca: TestCA) -> Iterator[Big]:
    """1 GiB of pseudo-random bytes served by nginx over HTTPS (and HTTP)."""
    base = tmp_path_factory.mktemp("ranges-big")
    root = base / "root"
    root.mkdir()
    path = root / "file.bin"
    digest = make_file(path, GIB, seed=4)
    tls = tls_ca.issue_server(base / "tls")
    try:
        with start_nginx(base / "nginx", root, tls=tls) as server:
            yield Big(server, path, GIB, digest, {"SSL_CERT_FILE": str(tls_ca.ca_path)})
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def data() -> bytes:
    """The fault servers' content: several segments of pseudo-random bytes."""
    return random.Random(44).randbytes(FAULT_SIZE)


@pytest.fixture(autouse=True)
def _drop_big_files(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[None]:
    """These tests write GiBs per test: drop them after a test that passed (a failed test's
    store stays for a look)."""
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed == failed_before:
        shutil.rmtree(tmp_path, ignore_errors=True)


# --- helpers -------------------------------------------------------------------------------


def sha256(blob: bytes) -> str:
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def url_ingest(fetchd: Fetchd, url: str) -> Path:
    """The ingest of a URL pulled without --digest (fetchd.engine.pull.Engine.pull_url)."""
    return fetchd.store / "ingest" / ("url-" + hashlib.sha256(url.encode()).hexdigest()[:40])


def on_disk(ingest: Path) -> int:
    """Bytes a segmented ingest holds for sure: the ranges its state.json records."""
    try:
        ranges = json.loads((ingest / "state.json").read_text())["ranges"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(b - a for a, b in ranges)


def range_start(header: str | None) -> int:
    assert header is not None and header.startswith("bytes="), header
    return int(header.removeprefix("bytes=").split("-")[0])


def gaps(ranges: list[list[int]], size: int) -> list[tuple[int, int]]:
    """The byte ranges of [0, size) that ``ranges`` (sorted, merged) leave out."""
    out, at = [], 0
    for a, b in sorted(ranges):
        if a > at:
            out.append((at, a))
        at = max(at, b)
    if at < size:
        out.append((at, size))
    return out


def kill_when(
    proc: subprocess.Popen[str], ready: Callable[[], bool], what: str, timeout: float = 60
) -> None:
    """SIGKILL proc once ready() holds; fail if proc ended by itself first."""
    try:
        wait_until(lambda: ready() or proc.poll() is not None, timeout, what)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the pull ended ({proc.returncode}) before {what}"


def bounded(fetchd: Fetchd, *args: str, limit: float = BOUNDED) -> subprocess.CompletedProcess[str]:
    """Run fetchd; fail the test (not hang it) if it is still running after `limit` s."""
    started = time.monotonic()
    try:
        result = fetchd(*args, timeout=limit)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stderr or b"")[-2000:]
        text = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        pytest.fail(f"fetchd {' '.join(args)}: still running after {limit:g} s\n{text}")
    assert time.monotonic() - started < limit
    return result


def interleaved(lines: list[NginxLogLine]) -> bool:
    """Several connections were in use at once: nginx logs a request when it ends, and the
    requests of different connections end interleaved (A, B, A), not one connection's
    requests after another's."""
    order = [line.connection for line in sorted(lines, key=lambda line: line.msec)]
    runs = [c for i, c in enumerate(order) if i == 0 or order[i - 1] != c]
    return len(runs) > len(set(runs))


def covered(lines: list[NginxLogLine]) -> list[tuple[int, int]]:
    """The byte ranges [a, b) the 206 answers in lines sent, merged. Answers cut short
    count too: work stealing ends a response early on purpose, after using its start."""
    spans = []
    for line in lines:
        if line.status == 206:
            start = range_start(line.range)
            spans.append((start, start + line.body_bytes))
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


# --- 1 GiB over HTTPS from nginx ------------------------------------------------------------


def test_1gib_over_https_with_parallel_ranges_stores_the_right_digest(
    big: Big, fetchd: Fetchd
) -> None:
    url = big.url("https")

    out = ok(fetchd("pull", url, env=big.env))

    assert out.strip() == big.digest  # computed: no --digest given
    assert_stored(fetchd, big.digest, big.size)
    lines = big.lines("https")
    assert lines and all(line.https for line in lines)
    ranged = [line for line in lines if line.status == 206]
    assert len(ranged) >= 4 and all(line.range for line in ranged), [
        (line.status, line.range) for line in lines
    ]
    per_connection: dict[int, int] = {}
    for line in ranged:
        per_connection[line.connection] = per_connection.get(line.connection, 0) + line.body_bytes
    busy = [c for c, n in per_connection.items() if n >= big.size // 16]
    assert len(busy) >= 2, f"bytes per connection: {per_connection}"
    assert interleaved(ranged), "the connections were used one after another"
    assert covered(lines) == [(0, big.size)]
    assert sum(line.body_bytes for line in lines) <= 1.15 * big.size

    # Again: no Cache-Control, so the record is stale at once: a conditional GET, a 304
    # with no body, and the stored blob is the answer.
    assert ok(fetchd("pull", url, env=big.env)).strip() == big.digest
    (again,) = big.lines("https")[len(lines) :]
    assert again.if_none_match or again.if_modified_since
    assert (again.status, again.body_bytes) == (304, 0)
    assert fetchd.blobs() == {big.digest}


def test_1gib_with_a_wrong_digest_fails_and_commits_nothing(big: Big, fetchd: Fetchd) -> None:
    wrong = "sha256:" + hashlib.sha256(b"not the file").hexdigest()

    line = failed(
        fetchd("pull", "--digest", wrong, big.url("wrong"), env=big.env),
        "does not match its digest",
    )

    assert wrong in line
    assert fetchd.blobs() == set()
    assert not blob_file(fetchd, wrong).exists() and not blob_file(fetchd, big.digest).exists()
    # The message says "the data was discarded": no ingest keeps any of it.
    assert all(on_disk(i) == 0 and not (i / "data").exists() for i in fetchd.ingests())
    assert "ok" in ok(fetchd("fsck"))


def test_plain_http_needs_insecure_options_http_then_ranges_with_the_digest_given(
    big: Big, fetchd: Fetchd
) -> None:
    url = f"{big.nginx.url}/file.bin?t=http"

    failed(fetchd("pull", "--digest", big.digest, url), "plain HTTP", "--insecure-options http")
    assert big.lines("http") == [], "a request before the refusal"

    out = ok(fetchd("pull", *HTTP, "--digest", big.digest, url))

    assert out.strip() == big.digest  # given, enforced, printed
    assert_stored(fetchd, big.digest, big.size)
    lines = big.lines("http")
    assert not any(line.https for line in lines)
    assert len([line for line in lines if line.status == 206]) >= 2
    assert covered(lines) == [(0, big.size)]


def test_an_ipv6_literal_url_comes_over_parallel_ranges(tmp_path: Path, fetchd: Fetchd) -> None:
    """http://[::1]:PORT/…: every request (the probe and the segments, all on threads)
    names the host as [::1]:PORT, which nginx accepts (an unbracketed ::1:PORT is a 400)."""
    root = tmp_path / "root"
    root.mkdir()
    digest = make_file(root / "v6.bin", 40 * MIB + 4321, seed=6)
    with start_nginx(tmp_path / "nginx", root, ipv6=True) as server:
        url = f"http://[::1]:{server.port}/v6.bin"
        out = ok(bounded(fetchd, "pull", *HTTP, "--digest", digest, url))
        lines = server.requests("/v6.bin")

    assert out.strip() == digest
    assert_stored(fetchd, digest, 40 * MIB + 4321)
    assert {line.status for line in lines} == {206}, [(x.status, x.body_bytes) for x in lines]
    assert len(lines) >= 2


def test_https_without_the_test_ca_is_a_clear_error(big: Big, fetchd: Fetchd) -> None:
    failed(fetchd("pull", big.url("untrusted")), "certificate", "SSL_CERT_FILE")
    assert fetchd.blobs() == set()


def test_kill_9_at_half_then_resume_sends_at_most_1_15_times_the_file(
    big: Big, fetchd: Fetchd
) -> None:
    url = big.url("kill")
    ingest = url_ingest(fetchd, url)

    proc = fetchd.popen("pull", url, env=big.env)
    kill_when(proc, lambda: on_disk(ingest) >= big.size // 2, "fetchd held half the file")
    kept = on_disk(ingest)
    assert big.size // 2 <= kept < big.size
    big.nginx.wait_idle()  # the killed connections' lines are in the log
    first = big.lines("kill")

    out = ok(fetchd("pull", url, env=big.env))

    assert out.strip() == big.digest
    assert_stored(fetchd, big.digest, big.size)
    lines = big.lines("kill")
    second = lines[len(first) :]
    assert second and {line.status for line in second} == {206}
    assert min(range_start(line.range) for line in second) > 0, "the second run started over"
    sent = sum(line.body_bytes for line in lines)
    assert sent <= 1.15 * big.size, f"nginx sent {sent / MIB:.0f} MiB for a 1024 MiB file"


def test_kill_9_with_every_byte_on_disk_then_resume_sends_nothing(big: Big, fetchd: Fetchd) -> None:
    """Killed between the last segment and the commit (hashing, fsync): the next pull
    commits what is on disk. (It used to probe bytes=SIZE-, read the 416 as "changed" and
    download the whole file again: the soak test found it.) That window is now a few
    milliseconds, too short to kill in reliably, so the pull is killed half-way and the
    rest of the bytes are put in place as its last segments would have been."""
    url = big.url("kill-complete")
    ingest = url_ingest(fetchd, url)

    proc = fetchd.popen("pull", url, env=big.env)
    kill_when(proc, lambda: on_disk(ingest) >= big.size // 2, "fetchd held half the bytes")
    big.nginx.wait_idle()
    first = big.lines("kill-complete")
    state = json.loads((ingest / "state.json").read_text())
    with open(big.path, "rb") as src, open(ingest / "data", "r+b") as dst:
        for start, end in gaps(state["ranges"], big.size):
            src.seek(start)
            dst.seek(start)
            dst.write(src.read(end - start))
    state["ranges"] = [[0, big.size]]
    (ingest / "state.json").write_text(json.dumps(state))

    out = ok(fetchd("pull", url, env=big.env))

    assert out.strip() == big.digest
    assert_stored(fetchd, big.digest, big.size)
    again = big.lines("kill-complete")[len(first) :]
    assert sum(line.body_bytes for line in again) == 0, [(x.status, x.range) for x in again]


def test_mirrors_share_the_segments(
    big: Big, fetchd: Fetchd, tmp_path: Path, tls_ca: TestCA
) -> None:
    tls = tls_ca.issue_server(tmp_path / "tls")
    # Without --digest nothing could check that the mirror sends the same bytes.
    bare = fetchd("pull", "--mirror", f"{big.url('m')}&x", big.url("m"), env=big.env)
    assert failed(bare, "--mirror", "--digest")
    assert fetchd.blobs() == set()
    with start_nginx(tmp_path / "mirror", big.path.parent, tls=tls) as mirror:
        url, other = big.url("mirror"), f"{mirror.https_url}/file.bin?t=mirror"

        out = ok(fetchd("pull", "--digest", big.digest, "--mirror", other, url, env=big.env))

        assert out.strip() == big.digest
        assert_stored(fetchd, big.digest, big.size)
        mine = big.lines("mirror")
        theirs = [line for line in mirror.requests("/file.bin") if line.uri.endswith("?t=mirror")]
    assert [line for line in mine if line.status == 206], "the first URL served no range"
    assert [line for line in theirs if line.status == 206], "the mirror served no range"
    assert covered(mine + theirs) == [(0, big.size)]


# --- fault-injecting servers ---------------------------------------------------------------


def test_server_ignoring_range_gives_the_right_bytes_over_one_stream(
    data: bytes, fetchd: Fetchd
) -> None:
    with RangeServer(data, fault="ignore-range") as server:
        out = ok(bounded(fetchd, "pull", *HTTP, server.file_url))
        gets = [s for s in server.seen if s.method == "GET"]

    assert out.strip() == sha256(data)
    assert_stored(fetchd, sha256(data), len(data))
    assert [(s.status, s.body_bytes) for s in gets] == [(200, len(data))], "not one stream"


def test_a_resume_that_falls_back_to_one_stream_keeps_the_validators(
    data: bytes, fetchd: Fetchd
) -> None:
    """A partial download left by a kill, then the server stops honouring Range: the plain
    stream starts over, and the URL's ETag is still recorded, so `--pull-policy update`
    asks with If-None-Match and takes the 304 (nothing is downloaded again)."""
    with RangeServer(data, fault="stall-one") as server:
        ingest = url_ingest(fetchd, server.file_url)
        proc = fetchd.popen("pull", *HTTP, "--max-connections", "1", server.file_url)
        kill_when(proc, lambda: server.stalled.is_set() and on_disk(ingest) > 0, "a stall")
        server.set_fault("ignore-range")
        out = ok(bounded(fetchd, "pull", *HTTP, server.file_url))
        server.set_fault("none")  # (the fault ignores conditional requests as well)
        before = len(server.seen)
        again = ok(bounded(fetchd, "pull", *HTTP, "--pull-policy", "update", server.file_url))
        check = server.seen[before:]

    assert out.strip() == again.strip() == sha256(data)
    assert_stored(fetchd, sha256(data), len(data))
    assert [(s.headers.get("If-None-Match"), s.status) for s in check] == [(server.etag, 304)], (
        check
    )


def test_busy_server_with_retry_after_twice_then_succeeds(data: bytes, fetchd: Fetchd) -> None:
    with RangeServer(data, fault="busy", busy_count=2) as server:
        started = time.monotonic()
        out = ok(bounded(fetchd, "pull", *HTTP, server.file_url))
        elapsed = time.monotonic() - started
        statuses = [s.status for s in server.seen]

    assert out.strip() == sha256(data)
    assert_stored(fetchd, sha256(data), len(data))
    assert statuses[:2] == [503, 503] and statuses.count(503) == 2, statuses
    assert 206 in statuses[2:]
    assert elapsed >= 2.0, f"Retry-After: 1 twice, yet done in {elapsed:.2f} s"


def test_one_stalled_connection_is_replaced_in_bounded_time(data: bytes, fetchd: Fetchd) -> None:
    with RangeServer(data, fault="stall-one") as server:
        out = ok(bounded(fetchd, "pull", *HTTP, "--stall-timeout", "2", server.file_url))
        assert server.stalled.is_set(), "no connection was stalled"
        stalled = [s for s in server.seen if s.fault == "stall-one"]

    assert out.strip() == sha256(data)
    assert_stored(fetchd, sha256(data), len(data))
    assert len(stalled) == 1 and stalled[0].body_bytes < len(data)


@pytest.mark.parametrize("new_size", [FAULT_SIZE, 4 * MIB], ids=["same-size", "shorter-416"])
def test_content_change_between_two_runs_restarts_and_stores_the_new_content(
    new_size: int, data: bytes, fetchd: Fetchd
) -> None:
    """Same size: only the validators (ETag, Last-Modified) tell. Shorter: the resumed range
    is past the new end, so the server answers 416."""
    new = random.Random(45).randbytes(new_size)
    with RangeServer(data, fault="stall-one") as server:
        ingest = url_ingest(fetchd, server.file_url)
        # One connection: the first segment completes, the second stalls; kill -9 then.
        proc = fetchd.popen("pull", *HTTP, "--max-connections", "1", server.file_url)
        kill_when(
            proc,
            lambda: server.stalled.is_set() and on_disk(ingest) >= SEGMENT,
            "the first segment was on disk",
        )
        assert SEGMENT <= on_disk(ingest) < len(data)
        server.set_fault("none")
        server.replace(new)
        before = len(server.seen)

        out = ok(bounded(fetchd, "pull", *HTTP, server.file_url))
        second = [s for s in server.seen[before:] if s.method == "GET"]

    assert out.strip() == sha256(new)  # the new content's digest, computed
    assert_stored(fetchd, sha256(new), len(new))
    assert fetchd.blobs() == {sha256(new)}
    # It tried to resume (a range past what it held), saw the change, and started over.
    assert range_start(second[0].range) >= SEGMENT
    assert second[0].status == (416 if new_size <= SEGMENT else 206)
    assert any(s.range and range_start(s.range) == 0 for s in second[1:]), [s.range for s in second]


def test_etag_change_within_one_run_restarts_and_stores_the_new_content(
    data: bytes, fetchd: Fetchd
) -> None:
    inverted = data.translate(bytes(255 - b for b in range(256)))
    with RangeServer(data, fault="etag-change") as server:
        out = ok(bounded(fetchd, "pull", *HTTP, server.file_url))

    assert out.strip() == sha256(inverted)
    assert_stored(fetchd, sha256(inverted), len(data))
    assert fetchd.blobs() == {sha256(inverted)}


def test_deadline_keeps_the_progress_and_the_next_run_resumes(data: bytes, fetchd: Fetchd) -> None:
    with RangeServer(data, fault="stall-one") as server:
        ingest = url_ingest(fetchd, server.file_url)
        # One connection, stalled on its second segment: the deadline ends the run.
        args = ("pull", *HTTP, "--max-connections", "1", "--deadline", "3", server.file_url)
        failed(bounded(fetchd, *args), "--deadline")
        assert server.stalled.is_set()
        kept = on_disk(ingest)
        assert SEGMENT <= kept < len(data), "the progress was not saved on exit"
        server.set_fault("none")
        before = len(server.seen)

        out = ok(bounded(fetchd, "pull", *HTTP, server.file_url))
        second = [s for s in server.seen[before:] if s.method == "GET"]

    assert out.strip() == sha256(data)
    assert_stored(fetchd, sha256(data), len(data))
    assert second and min(range_start(s.range) for s in second) >= SEGMENT, [
        s.range for s in second
    ]
    assert sum(s.body_bytes for s in second) <= len(data) - kept + SEGMENT


def test_server_gone_mid_download_is_a_clear_error_in_bounded_time(
    data: bytes, fetchd: Fetchd
) -> None:
    """Every retry of the last source fails (connection refused): the pull must end."""
    with RangeServer(data, fault="stall-one") as server:
        ingest = url_ingest(fetchd, server.file_url)
        proc = fetchd.popen("pull", *HTTP, "--max-connections", "1", server.file_url)
        try:
            wait_until(
                lambda: server.stalled.is_set() or proc.poll() is not None,
                BOUNDED,
                "the second segment to stall",
            )
        except BaseException:
            proc.kill()
            proc.communicate()
            raise
    # The server is gone: the stalled connection is closed, new ones are refused.
    started = time.monotonic()
    try:
        stdout, stderr = proc.communicate(timeout=BOUNDED)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail(f"fetchd still running {BOUNDED:g} s after its only source went away")
    assert time.monotonic() - started < BOUNDED
    failed(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert fetchd.blobs() == set()
    assert on_disk(ingest) >= SEGMENT, "the first segment was not kept for a later resume"


def test_overlong_answers_end_with_the_right_bytes_or_a_clear_error(
    data: bytes, fetchd: Fetchd
) -> None:
    with RangeServer(data, fault="overlong") as server:
        result = bounded(fetchd, "pull", *HTTP, server.file_url)

    if result.returncode == 0:
        assert result.stdout.strip() == sha256(data)
        assert_stored(fetchd, sha256(data), len(data))
    else:
        failed(result)
        assert fetchd.blobs() == set()
        assert "ok" in ok(fetchd("fsck"))


def test_wrong_content_range_falls_back_to_one_stream(data: bytes, fetchd: Fetchd) -> None:
    with RangeServer(data, fault="wrong-content-range") as server:
        result = bounded(fetchd, "pull", *HTTP, server.file_url)
        seen = list(server.seen)

    assert ok(result).strip() == sha256(data)
    assert_stored(fetchd, sha256(data), len(data))
    assert seen[0].fault == "wrong-content-range"
    whole = [s for s in seen if s.method == "GET" and s.range is None]
    assert [(s.status, s.body_bytes) for s in whole] == [(200, len(data))]


# --- a big registry layer ------------------------------------------------------------------


def test_512mib_registry_layer_comes_over_parallel_ranges(
    registry: Registry, fetchd: Fetchd, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    built = build_image(layout, "one", [random_layer(512 * MIB, seed=41)])
    name = f"{registry.host}/ranges-512:1"
    push(layout, "one", name)
    shutil.rmtree(layout)
    (layer,) = built.layers
    assert layer.size >= 512 * MIB

    out = ok(fetchd("pull", *HTTP, f"docker://{name}"))

    assert out.strip() == built.digest
    assert_stored(fetchd, layer.digest, layer.size)
    gets = registry.blob_gets(layer.digest)
    assert len([g for g in gets if g.status == 206]) >= 2, [(g.status, g.bytes) for g in gets]
    # Segments, not the blob twice: at most a few MiB more than the layer.
    assert sum(g.bytes for g in gets) <= 1.15 * layer.size


# --- rkt's remote cache --------------------------------------------------------------------


def test_within_max_age_no_request_and_update_revalidates_with_a_304(
    fetchd: Fetchd, tmp_path: Path, tls_ca: TestCA
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    digest = make_file(root / "cached.bin", 24 * MIB, seed=46)
    env = {"SSL_CERT_FILE": str(tls_ca.ca_path)}
    tls = tls_ca.issue_server(tmp_path / "tls")
    with start_nginx(
        tmp_path / "nginx", root, tls=tls, headers={"Cache-Control": "max-age=600"}
    ) as nginx:
        url = f"{nginx.https_url}/cached.bin"

        assert ok(fetchd("pull", url, env=env)).strip() == digest
        first = nginx.requests("/cached.bin")
        assert first and sum(line.body_bytes for line in first) >= 24 * MIB

        assert ok(fetchd("pull", url, env=env)).strip() == digest
        assert nginx.requests("/cached.bin") == first, "a request within max-age"

        assert ok(fetchd("pull", "--pull-policy", "update", url, env=env)).strip() == digest
        (check,) = nginx.requests("/cached.bin")[len(first) :]

    assert check.if_none_match or check.if_modified_since
    assert (check.status, check.body_bytes) == (304, 0)
    assert_stored(fetchd, digest, 24 * MIB)
    assert fetchd.blobs() == {digest}


# --- gc ------------------------------------------------------------------------------------


def test_gc_keeps_a_blob_pulled_by_url(data: bytes, fetchd: Fetchd) -> None:
    with RangeServer(data, headers={"Cache-Control": "max-age=600"}) as server:
        assert ok(fetchd("pull", *HTTP, server.file_url)).strip() == sha256(data)

        ok(fetchd("gc"))

        assert fetchd.blobs() == {sha256(data)}, "gc removed the URL's blob"
        before = len(server.seen)
        out = ok(fetchd("pull", *HTTP, "--pull-policy", "never", server.file_url))
        assert out.strip() == sha256(data)
        assert len(server.seen) == before
    assert_stored(fetchd, sha256(data), len(data))
