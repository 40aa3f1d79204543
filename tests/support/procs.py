"""Processes, ports and polling: every peer a test starts is stopped by its PID."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

POLL_INTERVAL = 0.05
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS just handed out (free until someone binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file, or a note that there is none."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    pred: Callable[[], bool], timeout: float, what: str, log: Path | None = None
) -> None:
    """Poll pred every 0.05 s until it is true; TimeoutError naming `what` (and the log's tail)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            tail = f"\n--- {log} ---\n{log_tail(log)}" if log is not None else ""
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}{tail}")
        time.sleep(POLL_INTERVAL)


class Proc:
    """A subprocess whose stdout and stderr go to one log file; a context manager that stops it."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        with log_path.open("ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
            )
        self.pid = self._popen.pid

    def running(self) -> bool:
        return self._popen.poll() is None

    def check_running(self) -> None:
        """Raise RuntimeError with the log's tail if the process has exited."""
        if not self.running():
            raise RuntimeError(
                f"{self.argv[0]} (pid {self.pid}) exited with {self._popen.returncode}"
                f"\n--- {self.log_path} ---\n{log_tail(self.log_path)}"
            )

    def stop(self) -> int:
        """SIGTERM, wait up to 10 s, then SIGKILL. Idempotent; returns the exit status."""
        if self._popen.poll() is None:
            self._popen.terminate()
            try:
                return self._popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._popen.kill()
        return self._popen.wait(STOP_TIMEOUT)

    def __enter__(self) -> Proc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def http_status(url: str, ssl_context: ssl.SSLContext | None = None) -> int | None:
    """The status a GET of url answers with, or None if nothing answers (yet)."""
    try:
        with urllib.request.urlopen(url, timeout=2, context=ssl_context) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def wait_http(
    url: str,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
    *,
    proc: Proc | None = None,
) -> None:
    """Poll until a GET of url answers any HTTP status; fail at once if proc has exited."""

    def answers() -> bool:
        if proc is not None:
            proc.check_running()
        return http_status(url, ssl_context) is not None

    wait_until(answers, timeout, f"{url} to answer", proc.log_path if proc else None)
