"""stage1 and the terminal: a container never gets a descriptor of the user's terminal.

Each test starts a real interactive shell (bash) on a real pty, as a user's terminal, and
types ``stage1 run`` into it. The container's process pushes a command into its terminal
with ioctl(TIOCSTI) (a tiny static C program built here with gcc); the command must never
reach the outer shell, while the container still works interactively through a pty.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import pty
import re
import select
import shlex
import shutil
import signal
import struct
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.images import File, Layer
from tests.support.stage1 import Stage1, image, process_table

REF = "127.0.0.1:5000/stage1/tty:latest"
DEADLINE = 30.0

# Pushes ARGV[1] and a newline into the terminal with TIOCSTI, through each of its standard
# descriptors and then /dev/tty, until one accepts; prints which one did (or "refused").
STI_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
static int push(int fd, const char *s) {
    for (; *s; s++) if (ioctl(fd, TIOCSTI, s) != 0) return 0;
    return ioctl(fd, TIOCSTI, "\n") == 0;
}
int main(int argc, char **argv) {
    const char *s = argc > 1 ? argv[1] : "";
    for (int fd = 0; fd < 3; fd++)
        if (push(fd, s)) { printf("injected through fd %d\n", fd); return 0; }
    int tty = open("/dev/tty", O_RDWR | O_NOCTTY);
    if (tty >= 0 && push(tty, s)) { printf("injected through /dev/tty\n"); return 0; }
    printf("refused\n");
    return 0;
}
"""


@functools.cache
def _sti_binary() -> bytes:
    gcc = shutil.which("gcc")
    assert gcc, "the TIOCSTI test needs gcc and libc6-dev: run scripts/install-deps.sh"
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp, "sti.c"), Path(tmp, "sti")
        src.write_text(STI_C)
        subprocess.run([gcc, "-static", "-Os", "-s", "-o", out, src], check=True, timeout=120)
        return out.read_bytes()


def _tty_image(stage1: Stage1) -> None:
    image(stage1, REF, [Layer([File("bin/sti", _sti_binary(), mode=0o755)])])


class Terminal:
    """An interactive bash on a real pty: what the test types, and what the user sees."""

    def __init__(self, rows: int = 24, cols: int = 80) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "TERM": "dumb",
            "PS1": "$ ",
            "LANG": "C",
        }
        if "PYTHONPATH" in os.environ:  # a checkout under test (e.g. an older commit)
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        pid, fd = pty.fork()
        if pid == 0:  # pragma: no cover - the outer shell
            try:
                os.execve("/bin/bash", ["bash", "--norc", "--noprofile", "-i"], env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.resize(rows, cols)
        self.output = b""
        self.status: int | None = None

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def expect(self, pattern: str, timeout: float = DEADLINE) -> re.Match[bytes]:
        """Read what the terminal shows until PATTERN appears after what was expected last."""
        regex = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.output)
            if match:
                self.output = self.output[match.end() :]
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{pattern!r} not seen; the terminal shows {self.output!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    data = os.read(self.fd, 65536)
                except OSError:  # EIO: the shell is gone
                    data = b""
                if not data:
                    raise EOFError(f"{pattern!r} not seen; the terminal shows {self.output!r}")
                self.output += data

    def close(self) -> int:
        """End the shell (exit, else SIGKILL); its exit status."""
        if self.status is not None:
            return self.status
        deadline = time.monotonic() + DEADLINE
        with contextlib.suppress(OSError):
            self.type("exit\n")
        while time.monotonic() < deadline:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                os.close(self.fd)
                self.status = os.waitstatus_to_exitcode(status)
                return self.status
            if select.select([self.fd], [], [], 0.05)[0]:
                with contextlib.suppress(OSError):
                    os.read(self.fd, 65536)  # keep the pty drained
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        os.close(self.fd)
        self.status = -signal.SIGKILL
        raise TimeoutError("the outer shell did not exit")


@pytest.fixture(name="terminal")
def terminal_fixture() -> Iterator[Terminal]:
    term = Terminal()
    try:
        term.expect(r"\$ ")
        yield term
    finally:
        term.close()


def _stage1(stage1: Stage1, *args: str) -> str:
    return shlex.join(stage1.argv("run", REF, "--", *args))


def test_tiocsti_in_the_container_never_reaches_the_outer_shell(
    stage1: Stage1, terminal: Terminal, tmp_path: Path
) -> None:
    legacy = Path("/proc/sys/dev/tty/legacy_tiocsti")
    if legacy.exists() and legacy.read_text().strip() == "0":
        pytest.skip("this kernel refuses TIOCSTI to everyone (dev.tty.legacy_tiocsti=0)")
    _tty_image(stage1)
    through_pty, through_dev_tty = tmp_path / "through-pty", tmp_path / "through-dev-tty"
    # Not a terminal on any descriptor: the container must not reach one through /dev/tty.
    quiet = "</dev/null >/dev/null 2>&1"
    terminal.type(
        f"{_stage1(stage1, '/bin/sti', f'id -u > {through_dev_tty}')} {quiet}; echo rc0=$?\n"
    )
    assert terminal.expect(r"rc0=(\d+)").group(1) == b"0"
    # On the terminal: the container has a pty of its own, whose input it may push to.
    terminal.type(
        f"echo B$(stty -g)B; {_stage1(stage1, '/bin/sti', f'id -u > {through_pty}')}; "
        "echo rc1=$?; echo A$(stty -g)A\n"
    )
    before = terminal.expect(r"B([0-9a-f:]+)B").group(1)
    # The push did succeed (into the container's own pty): else this test proves nothing.
    terminal.expect(r"injected through fd \d")
    assert terminal.expect(r"rc1=(\d+)").group(1) == b"0"
    after = terminal.expect(r"A([0-9a-f:]+)A").group(1)
    assert after == before  # the terminal's modes are restored
    # Whatever was pushed would be read by the shell now, before this line.
    terminal.type("echo do''ne\n")
    terminal.expect(r"\ndone")
    assert terminal.close() == 0
    ran = [p.name for p in (through_dev_tty, through_pty) if p.exists()]
    assert ran == [], "the outer shell ran what the container pushed"


def test_the_relay_works_when_the_caller_holds_over_1024_descriptors(
    stage1: Stage1, terminal: Terminal
) -> None:
    """The pty's master is then numbered past 1024, where select(2) fails (internal error)."""
    _tty_image(stage1)
    terminal.type(
        'ulimit -n 4096; for i in $(seq 3 1100); do eval "exec $i</dev/null"; done; '
        f"{_stage1(stage1, '/bin/busybox', 'echo', 'hel' + 'lo')}; echo rc=$?\n"
    )
    terminal.expect(r"hello")
    assert terminal.expect(r"rc=(\d+)").group(1) == b"0"


def test_the_container_is_interactive_through_a_pty(stage1: Stage1, terminal: Terminal) -> None:
    _tty_image(stage1)
    script = (
        'echo RE""ADY; read line; echo "go""t:$line"; /bin/busybox tty; '
        "/bin/busybox stty size; exit 3"
    )
    terminal.resize(33, 111)
    terminal.type(f"{_stage1(stage1, '/bin/sh', '-c', script)}; echo rc=$?\n")
    terminal.expect(r"READY")
    terminal.type("hello there\n")
    assert terminal.expect(r"got:(.*?)\r?\n").group(1) == b"hello there"
    assert terminal.expect(r"(/dev/\S+)").group(1) == b"/dev/pts/0"
    assert terminal.expect(r"(\d+ \d+)\r?\n").group(1) == b"33 111"
    assert terminal.expect(r"rc=(\d+)").group(1) == b"3"


def test_window_size_changes_reach_the_container(stage1: Stage1, terminal: Terminal) -> None:
    _tty_image(stage1)
    script = 'echo RE""ADY; while read line; do /bin/busybox stty size; done'
    terminal.type(f"{_stage1(stage1, '/bin/sh', '-c', script)}; echo rc=$?\n")
    terminal.expect(r"READY")
    terminal.resize(50, 120)
    sizes = []
    for _ in range(20):  # SIGWINCH and the next line race: ask until the size arrives
        terminal.type("\n")
        sizes.append(terminal.expect(r"\n(\d+ \d+)\r?\n").group(1))
        if sizes[-1] == b"50 120":
            break
    assert sizes[-1] == b"50 120", sizes
    terminal.type("\x04")  # ^D: end of input for read; the loop and the container end
    assert terminal.expect(r"rc=(\d+)").group(1) == b"0"


def test_a_process_left_holding_the_pty_does_not_hold_stage1(
    stage1: Stage1, terminal: Terminal
) -> None:
    _tty_image(stage1)
    script = "/bin/sleep 300 & echo bye; exit 5"
    started = time.monotonic()
    terminal.type(f"{_stage1(stage1, '/bin/sh', '-c', script)}; echo rc=$?\n")
    terminal.expect(r"\nbye")
    assert terminal.expect(r"rc=(\d+)").group(1) == b"5"
    assert time.monotonic() - started < 20


def test_ctrl_c_reaches_the_container_through_its_pty(stage1: Stage1, terminal: Terminal) -> None:
    _tty_image(stage1)
    script = 'echo RE""ADY; /bin/sleep 60; echo not interrupted'
    terminal.type(f"{_stage1(stage1, '/bin/sh', '-c', script)}; echo rc=$?\n")
    terminal.expect(r"READY")
    terminal.type("\x03")  # the user's terminal is raw: ^C is a byte, the pty's ISIG acts
    assert terminal.expect(r"rc=(\d+)").group(1) == b"130"
    assert b"not interrupted" not in terminal.output


def test_sigterm_to_stage1_ends_the_run_and_restores_the_terminal(
    stage1: Stage1, terminal: Terminal
) -> None:
    _tty_image(stage1)
    script = 'echo RE""ADY; exec /bin/sleep 60'
    terminal.type(
        f"echo B$(stty -g)B; {_stage1(stage1, '/bin/sh', '-c', script)}; "
        "echo rc=$?; echo A$(stty -g)A\n"
    )
    before = terminal.expect(r"B([0-9a-f:]+)B").group(1)
    terminal.expect(r"READY")
    # The shell's child; its own child (init) is a python process too.
    (stage1_pid,) = [pid for pid, (ppid, _, _) in process_table().items() if ppid == terminal.pid]
    os.kill(stage1_pid, signal.SIGTERM)
    assert terminal.expect(r"rc=(\d+)").group(1) == b"143"
    assert terminal.expect(r"A([0-9a-f:]+)A").group(1) == before
