"""One big file over HTTPS from a local nginx: fetchd vs aria2c -x8 vs curl + sha256, alternating.

The file is SIZE_MIB MiB of deterministic pseudo-random bytes (tests/support/nginx.py make_file),
served by nginx (tests/support/nginx.py) on a free loopback port with a certificate from a
throwaway test CA. Each round runs these, each into a fresh empty directory, their order
rotated by one every round (the run after the previous round's delete + sync pays for it:
with fetchd always first, an interleaved older fetchd ran 16 % faster than the same code
did in alternating order):

- fetchd: `python -m fetchd --store DIR -q pull --digest sha256:HEX https://127.0.0.1:P/file.bin`
  with SSL_CERT_FILE naming the CA; it verifies the digest as it goes, so it must print it;
- aria2c: `aria2c -x8 -s8 -k1M --file-allocation=none --ca-certificate=CA -d DIR -o out URL`;
  its file is hashed afterwards, outside the timed region, and must match;
- curl: `curl -sS --cacert CA -o DIR/out URL`, then a separate in-process hashlib sha256 of the
  file, timed on its own: "curl+sha256" is the sum, the one-stream-then-verify anchor.

Before the counted rounds, ``--warmup`` rounds (default 1) run every tool the same way and
are printed as "warm-up", not counted: the first downloads after the file is made ran 1.3-1.9x
slower for whichever tool came first (aria2c 4.36 s then 3.44 s; fetchd 4.4-5.2 s then
2.4-3.1 s). On this VM (virtio-balloon with free page reporting) the page cache those first runs
write into is memory the host has taken back, and every page of it faults on the host: the
kernel's copy into the page cache (copy_folio_from_iter_atomic) was 29 % of all samples in
such a run and 8-11 % in the next ones. Each line's "sys" is that cost, mostly.

A fetchd run that fails (nonzero exit, wrong or missing digest) is reported with its stderr and
not counted; the other tools go on (`--skip-fetchd` leaves it out). aria2c or curl failing
aborts the benchmark: an anchor that did not work measures nothing.

Wall time is from just before fork to the moment the child is reaped (waited for with a pidfd);
CPU time comes from os.wait4's rusage of the child, peak RSS from GNU time (see
benchmarks/measure.py run_child).
Output directories are deleted, and `sync` run, between runs, outside the timed region; the page
cache is not dropped (the served file stays warm for everyone). Each run's line also says how
many body bytes nginx sent for it (from its access log, read after the run).

    python benchmarks/ranges_https.py [--rounds N] [--warmup N] [--size-mib N] [--skip-fetchd]
                                      [--json] [--baseline DIR]

``--baseline DIR`` adds one more arm in every round: fetchd from another checkout (say
``git worktree add /tmp/base REV``), run the same way with ``PYTHONPATH=DIR``, and prints
fetchd/baseline: whether fetchd itself changed, apart from how fast the anchors ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so that `python benchmarks/ranges_https.py` finds tests/

from benchmarks.measure import (  # noqa: E402
    BenchmarkFailed,
    Exited,
    check_exit,
    child_env,
    compile_fetchd,
    gnu_time_missing,
    median_ratio,
    median_s,
    peak_mib,
    run_child,
)
from tests.support.nginx import Nginx, make_file, start_nginx  # noqa: E402
from tests.support.tls import make_ca  # noqa: E402

MIB = 1024 * 1024
PYTHON = REPO / ".venv" / "bin" / "python"
FILE = "file.bin"
RUN_TIMEOUT = 300.0  # seconds for one download; the anchors take ~2–4 s per GiB here
HASH_BUFFER = 8 * MIB


@dataclass(frozen=True)
class Run:
    tool: str  # "fetchd", "aria2c" or "curl"
    round: int
    wall: float  # seconds, the child only
    cpu: float  # user + system seconds of the child
    max_rss_mib: float
    sha_wall: float = 0.0  # curl only: the separate sha256 afterwards
    served: int = 0  # body bytes nginx sent during this run
    system: float = 0.0  # the system part of cpu

    @property
    def total(self) -> float:
        """The figure compared: the download, plus the separate sha256 for curl."""
        return self.wall + self.sha_wall

    def line(self, size_mib: int) -> str:
        name = "curl+sha256" if self.tool == "curl" else self.tool
        split = f" (curl {self.wall:.2f} + sha256 {self.sha_wall:.2f})" if self.sha_wall else ""
        which = f"round {self.round}" if self.round > 0 else "warm-up"
        return (
            f"{which}  {name:<11}  {self.total:6.2f} s  "
            f"{size_mib / self.total:6.0f} MiB/s  cpu {self.cpu:5.2f} s (sys {self.system:4.2f})  "
            f"peak RSS {self.max_rss_mib:6.1f} MiB  nginx sent {self.served / MIB:5.0f} MiB{split}"
        )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BUFFER)
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as f:
        for _ in range(path.stat().st_size // HASH_BUFFER + 2):
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return f"sha256:{digest.hexdigest()}"


def _measured(tool: str, round_: int, exited: Exited, sha_wall: float = 0.0) -> Run:
    return Run(
        tool, round_, exited.wall, exited.cpu, exited.max_rss_mib, sha_wall, system=exited.system
    )


def _check_file(tool: str, path: Path, digest: str) -> None:
    if not path.is_file():
        raise BenchmarkFailed(f"{tool} wrote no {path}")
    got = sha256_file(path)
    if got != digest:
        raise BenchmarkFailed(f"{tool}'s file is {got}, served {digest}")


@dataclass(frozen=True)
class Setup:
    url: str
    digest: str
    ca: Path
    env: dict[str, str]


def pull_fetchd(setup: Setup, dest: Path, round_: int, flags: Sequence[str] = ()) -> Run:
    argv = [str(PYTHON), *flags, "-m", "fetchd", "--store", str(dest), "-q", "pull"]
    argv += ["--digest", setup.digest, setup.url]
    env = {**setup.env, "SSL_CERT_FILE": str(setup.ca)}
    exited = run_child(argv, env, dest.parent / f"fetchd-{round_}", RUN_TIMEOUT)
    check_exit("fetchd", exited)
    lines = exited.stdout.split()
    if not lines or lines[-1] != setup.digest:
        raise BenchmarkFailed(f"fetchd printed {exited.stdout.strip()!r}, not {setup.digest}")
    return _measured("fetchd", round_, exited)


def pull_baseline(checkout: Path) -> Callable[[Setup, Path, int], Run]:
    """fetchd from another checkout (its modules first on PYTHONPATH), as the arm "baseline"."""

    def pull(setup: Setup, dest: Path, round_: int) -> Run:
        env = {**setup.env, "PYTHONPATH": str(checkout)}
        # -P: the child runs in this repository, whose fetchd/ would come first otherwise.
        run = pull_fetchd(dataclasses.replace(setup, env=env), dest, round_, flags=("-P",))
        return dataclasses.replace(run, tool="baseline")

    return pull


def pull_aria2c(setup: Setup, dest: Path, round_: int) -> Run:
    argv = ["aria2c", "--no-conf", "-q", "-x8", "-s8", "-k1M", "--file-allocation=none"]
    argv += [f"--ca-certificate={setup.ca}", "--console-log-level=warn", "--summary-interval=0"]
    argv += ["-d", str(dest), "-o", "out", setup.url]
    dest.mkdir()
    exited = run_child(argv, setup.env, dest.parent / f"aria2c-{round_}", RUN_TIMEOUT)
    check_exit("aria2c", exited)
    _check_file("aria2c", dest / "out", setup.digest)  # outside the timed region
    return _measured("aria2c", round_, exited)


def pull_curl(setup: Setup, dest: Path, round_: int) -> Run:
    # -q first: ignore any ~/.curlrc.
    argv = ["curl", "-q", "-sS", "--cacert", str(setup.ca), "-o", str(dest / "out"), setup.url]
    dest.mkdir()
    exited = run_child(argv, setup.env, dest.parent / f"curl-{round_}", RUN_TIMEOUT)
    check_exit("curl", exited)
    started = time.perf_counter()
    got = sha256_file(dest / "out")  # timed: this is the "then verify" half of the anchor
    sha_wall = time.perf_counter() - started
    if got != setup.digest:
        raise BenchmarkFailed(f"curl's file is {got}, served {setup.digest}")
    return _measured("curl", round_, exited, sha_wall)


def round_ratios(numerators: Mapping[int, float], denominators: Mapping[int, float]) -> list[float]:
    """Per-round ratios (rounded to 0.01), in round order, over the rounds in both."""
    return [
        round(n / denominators[k], 2) for k, n in sorted(numerators.items()) if k in denominators
    ]


def summary(runs: Sequence[Run], args: argparse.Namespace, digest: str) -> dict[str, object]:
    def totals(tool: str) -> dict[int, float]:
        return {r.round: r.total for r in runs if r.tool == tool}

    def peak(tool: str) -> float | None:
        return peak_mib(r.max_rss_mib for r in runs if r.tool == tool)

    curl_runs = [r for r in runs if r.tool == "curl"]
    return {
        "benchmark": "ranges_https",
        "digest": digest,
        "size_mib": args.size_mib,
        "rounds": args.rounds,
        "fetchd_s": [round(t, 3) for t in totals("fetchd").values()],
        "aria2c_s": [round(t, 3) for t in totals("aria2c").values()],
        "curl_s": [round(r.wall, 3) for r in curl_runs],
        "sha256_s": [round(r.sha_wall, 3) for r in curl_runs],
        "fetchd_median_s": median_s(totals("fetchd").values()),
        "aria2c_median_s": median_s(totals("aria2c").values()),
        "curl_median_s": median_s(r.wall for r in curl_runs),
        "sha256_median_s": median_s(r.sha_wall for r in curl_runs),
        "curl_sha256_median_s": median_s(totals("curl").values()),
        # Medians over the rounds where fetchd counted of fetchd's time / the anchor's (total).
        "ratio_fetchd_aria2c": median_ratio(totals("fetchd"), totals("aria2c")),
        # Every round's ratio, and the worst: the target holds in every round, not only
        # in the median.
        "ratios_fetchd_aria2c": round_ratios(totals("fetchd"), totals("aria2c")),
        "max_ratio_fetchd_aria2c": max(
            round_ratios(totals("fetchd"), totals("aria2c")), default=None
        ),
        "ratio_fetchd_curl_sha256": median_ratio(totals("fetchd"), totals("curl")),
        "fetchd_peak_rss_mib": peak("fetchd"),
        "aria2c_peak_rss_mib": peak("aria2c"),
        "curl_peak_rss_mib": peak("curl"),
        "baseline_median_s": median_s(totals("baseline").values()),
        "ratio_fetchd_baseline": median_ratio(totals("fetchd"), totals("baseline")),
    }


def print_summary(result: Mapping[str, object], fetchd: str) -> None:
    """`fetchd` says what happened to fetchd when it has no figures ("skipped", "failed…")."""
    fetchd_s = result["fetchd_median_s"]
    fetchd_rss = result["fetchd_peak_rss_mib"]
    print(
        f"median  fetchd {f'{fetchd_s} s' if fetchd_s is not None else fetchd}  "
        f"aria2c {result['aria2c_median_s']} s  curl {result['curl_median_s']} s  "
        f"sha256 {result['sha256_median_s']} s  curl+sha256 {result['curl_sha256_median_s']} s"
    )
    if result["ratio_fetchd_aria2c"] is None:
        print(f"ratios  none: fetchd {fetchd}")
    else:
        print(
            f"ratio fetchd/aria2c {result['ratio_fetchd_aria2c']} (target <= 1.0, aim 0.8)  "
            f"fetchd/(curl+sha256) {result['ratio_fetchd_curl_sha256']} (target <= 1.0)  "
            "(medians of per-round ratios)"
        )
        print(
            f"fetchd/aria2c per round {result['ratios_fetchd_aria2c']}  "
            f"worst {result['max_ratio_fetchd_aria2c']} (target <= 1.0 in every round)"
        )
    if result["ratio_fetchd_baseline"] is not None:
        print(
            f"baseline (fetchd of --baseline) {result['baseline_median_s']} s  "
            f"ratio fetchd/baseline {result['ratio_fetchd_baseline']}"
        )
    print(
        f"peak RSS  fetchd {f'{fetchd_rss} MiB' if fetchd_rss is not None else fetchd} "
        f"(target < 200 MiB)  aria2c {result['aria2c_peak_rss_mib']} MiB  "
        f"curl {result['curl_peak_rss_mib']} MiB"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all tools (default 3)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="rounds of all tools run first and not counted (default 1)",
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="file size (default 1024)")
    parser.add_argument("--skip-fetchd", action="store_true", help="run the anchors only")
    parser.add_argument(
        "--nginx-workers", type=int, default=1, help="nginx worker_processes (default 1)"
    )
    parser.add_argument("--json", action="store_true", help="also print a JSON summary line")
    parser.add_argument(
        "--baseline", type=Path, help="also run fetchd from this checkout, interleaved"
    )
    args = parser.parse_args(argv)
    if args.baseline is not None and not (args.baseline / "fetchd" / "__init__.py").is_file():
        parser.error(f"--baseline {args.baseline}: no fetchd/ in it")
    for name in ("rounds", "size_mib", "nginx_workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    return args


def serve(workdir: Path, size_mib: int, workers: int) -> tuple[Nginx, Path, str]:
    """The file, a CA and nginx serving it over HTTPS: (nginx, CA path, digest)."""
    root = workdir / "root"
    root.mkdir()
    started = time.perf_counter()
    digest = make_file(root / FILE, size_mib * MIB, seed=1)
    os.sync()  # no writeback of the new file during the first runs
    print(f"{FILE}: {size_mib} MiB {digest} (made in {time.perf_counter() - started:.1f} s)")
    ca = make_ca(workdir / "ca")
    tls = ca.issue_server(workdir / "tls")
    return start_nginx(workdir / "nginx", root, tls=tls, workers=workers), ca.ca_path, digest


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    compile_fetchd(REPO)
    if args.baseline is not None:
        compile_fetchd(args.baseline)
    missing = gnu_time_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    if not args.skip_fetchd and not PYTHON.exists():
        print(f"error: {PYTHON} is missing: run `make deps` first", file=sys.stderr)
        return 1
    # Under /tmp, and without ':' in the path (tools that split at ':' stay happy).
    workdir = Path(tempfile.mkdtemp(prefix="fetchd-bench-ranges-", dir="/tmp"))
    fetchd_failures = warmup_failures = 0
    try:
        (workdir / "home").mkdir()
        runs_dir = workdir / "runs"
        runs_dir.mkdir()
        nginx, ca, digest = serve(workdir, args.size_mib, args.nginx_workers)
        with nginx:
            setup = Setup(f"{nginx.https_url}/{FILE}", digest, ca, child_env(workdir / "home"))
            print(f"nginx pid {nginx.pid} (workers {args.nginx_workers}) at {setup.url}")
            tools: list[tuple[str, Callable[[Setup, Path, int], Run]]] = [
                ("aria2c", pull_aria2c),
                ("curl", pull_curl),
            ]
            if not args.skip_fetchd:
                tools.insert(0, ("fetchd", pull_fetchd))
            if args.baseline is not None:
                tools.insert(1, ("baseline", pull_baseline(args.baseline.resolve())))
            runs: list[Run] = []
            # Rounds up to 0 are the warm-up: printed, not counted.
            for round_ in range(1 - args.warmup, args.rounds + 1):
                # Rotated each round: the first run of a round follows the previous
                # round's 1 GiB delete + sync, which costs whoever comes next.
                turn = (round_ - 1) % len(tools)
                for tool, pull in tools[turn:] + tools[:turn]:
                    dest = runs_dir / f"{tool}-{round_}.d"
                    before = nginx.bytes_sent(f"/{FILE}")
                    try:
                        run = pull(setup, dest, round_)
                        served = nginx.bytes_sent(f"/{FILE}") - before
                        run = dataclasses.replace(run, served=served)
                        if round_ > 0:
                            runs.append(run)
                        print(run.line(args.size_mib), flush=True)
                    except BenchmarkFailed as exc:
                        if tool not in ("fetchd", "baseline"):
                            raise
                        if round_ > 0:
                            fetchd_failures += 1
                        else:
                            warmup_failures += 1
                        which = f"round {round_}" if round_ > 0 else "warm-up"
                        print(f"{which}  {tool}  FAILED, not counted: {exc}", flush=True)
                    finally:
                        shutil.rmtree(dest, ignore_errors=True)
                        os.sync()
            total = nginx.bytes_sent(f"/{FILE}")
        print(f"nginx sent {total / MIB:.0f} MiB of body in all (its access log)")
        result = summary(runs, args, digest)
        if args.skip_fetchd:
            fetchd_state = "skipped"
        elif fetchd_failures == args.rounds:
            fetchd_state = f"failed in all {args.rounds} rounds"
        else:
            fetchd_state = "-"
        print_summary(result, fetchd_state)
        if fetchd_failures:
            print(f"fetchd failed in {fetchd_failures} of {args.rounds} rounds", file=sys.stderr)
        if warmup_failures:
            print(f"fetchd failed in {warmup_failures} warm-up runs", file=sys.stderr)
        if args.json:
            print(json.dumps(result))
        return 1 if fetchd_failures or warmup_failures else 0
    except BenchmarkFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
