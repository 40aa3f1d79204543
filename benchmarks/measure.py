"""Running and measuring one tool's process, shared by the benchmarks.

run_child runs a command under GNU time in a session of its own and returns an Exited:
its exit status, wall time (perf_counter from just before fork to the moment it is reaped,
waited for with a pidfd), CPU time (os.wait4's rusage) and peak RSS (GNU time's %M).
check_exit is the first check of every run; the median helpers make the summaries.
"""

from __future__ import annotations

import compileall
import contextlib
import os
import re
import select
import signal
import statistics
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIME = "/usr/bin/time"  # GNU time (Debian package `time`), for peak RSS


class BenchmarkFailed(RuntimeError):
    """A run failed or produced a wrong result: it must not be counted."""


@dataclass(frozen=True)
class Exited:
    status: int  # the tool's exit code (GNU time passes it on)
    wall: float  # seconds
    cpu: float  # user + system seconds of the tool (GNU time's own are negligible)
    max_rss_kib: int  # the tool's peak RSS, from GNU time; 0 if it reported none
    stdout: str
    stderr: str
    system: float = 0.0  # the system part of ``cpu`` (seconds)

    @property
    def max_rss_mib(self) -> float:
        return self.max_rss_kib / 1024


def gnu_time_missing() -> str | None:
    """Why run_child cannot work on this machine, or None if it can."""
    return None if Path(TIME).exists() else f"{TIME} is missing: apt-get install time"


def run_child(argv: Sequence[str], env: Mapping[str, str], logs: Path, timeout: float) -> Exited:
    """Run argv to completion under GNU time, timing it and taking its CPU time and peak RSS.

    stdout and stderr go to `logs` with the suffixes .stdout and .stderr (and GNU time's
    report to .rss), and are returned. Peak RSS comes from GNU time (%M), not from os.wait4:
    a child forked (or vforked) from this Python process inherits this process's RSS
    high-water mark across exec, so wait4's ru_maxrss says at least this process's peak
    (~65 MiB) for every tool. GNU time is a small process of its own, so its child's figure
    is the tool's own (±1 MiB). CPU time is wait4's rusage of GNU time, which includes the
    tool it reaped. The child runs in a new session; after `timeout` s, or if this process
    is interrupted, the whole group (pgid = its PID) is killed and BenchmarkFailed raised.
    """
    out, err = logs.with_suffix(".stdout"), logs.with_suffix(".stderr")
    rss_file = logs.with_suffix(".rss")
    wrapped = [TIME, "-o", str(rss_file), "-f", "maxrss_kib=%M", *argv]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        started = time.perf_counter()
        proc = subprocess.Popen(
            wrapped,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=dict(env),
            cwd=REPO,
            start_new_session=True,
        )
    try:
        pidfd = os.pidfd_open(proc.pid)
        try:
            ready, _, _ = select.select([pidfd], [], [], timeout)
        finally:
            os.close(pidfd)
        if not ready:
            raise BenchmarkFailed(f"{argv[0]} did not finish in {timeout:.0f} s: {' '.join(argv)}")
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it is reaped
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group this Popen made, by its id
            proc.wait()
    match = re.search(r"maxrss_kib=(\d+)", rss_file.read_text() if rss_file.exists() else "")
    cpu = usage.ru_utime + usage.ru_stime
    max_rss_kib = int(match[1]) if match else 0
    return Exited(
        proc.returncode, wall, cpu, max_rss_kib, out.read_text(), err.read_text(), usage.ru_stime
    )


def check_exit(tool: str, exited: Exited) -> None:
    """Fail unless the tool exited 0 and GNU time reported its peak RSS."""
    if exited.status != 0:
        tail = (exited.stderr.strip() or exited.stdout.strip())[-2000:]
        raise BenchmarkFailed(f"{tool} exited with {exited.status}: {tail or '(no output)'}")
    if not exited.max_rss_kib:
        raise BenchmarkFailed(f"GNU time reported no peak RSS for {tool}")


def compile_fetchd(repo: Path) -> None:
    """Compile fetchd's modules to bytecode, as an installed package ships them: from an
    editable install, with PYTHONDONTWRITEBYTECODE set, every start compiled the modules
    changed since the last compile again (~40 ms of a 2 s run)."""
    if not compileall.compile_dir(repo / "fetchd", quiet=1):
        raise BenchmarkFailed("compiling fetchd's modules failed")


def child_env(home: Path) -> dict[str, str]:
    """The machine's environment without credentials, CA overrides or proxies; HOME = home."""
    drop = {
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "CURL_CA_BUNDLE",
        "REGISTRY_AUTH_FILE",
        "FETCHD_STORE",
        "XDG_RUNTIME_DIR",
    }
    env = {
        k: v for k, v in os.environ.items() if k not in drop and not k.lower().endswith("_proxy")
    }
    env["HOME"] = str(home)
    return env


def median_s(values: Iterable[float]) -> float | None:
    """The median of some times, rounded to the millisecond; None if there are none."""
    listed = list(values)
    return round(statistics.median(listed), 3) if listed else None


def median_ratio(
    numerators: Mapping[int, float], denominators: Mapping[int, float]
) -> float | None:
    """The median of per-round ratios over the rounds (keys) in both; None if there are none."""
    ratios = [n / denominators[k] for k, n in numerators.items() if k in denominators]
    return round(statistics.median(ratios), 3) if ratios else None


def peak_mib(values: Iterable[float]) -> float | None:
    """The largest of some peak RSS figures, rounded to 0.1 MiB; None if there are none."""
    listed = list(values)
    return round(max(listed), 1) if listed else None
