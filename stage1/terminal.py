"""The user's terminal and the container's pty, and the relay stage1 runs between them.

A container never gets a descriptor of the user's terminal. With one, a process of the
container could push input into it with ioctl(TIOCSTI) (typed into the shell that started
stage1 once stage1 exits: bubblewrap's CVE-2017-5226), change its modes, or read what the
user types later. So the container always runs in a session of its own, and where stage1's
stdin, stdout or stderr is a terminal the container gets, in that place, the slave of a pty
opened in its own devpts (``/dev/pts/0``, its controlling terminal, as ``podman run -t``
and runc's console socket do); stage1 copies bytes between the user's terminal and the
pty's master, which only stage1 holds. Descriptors that are not terminals (pipes, files)
are passed through as they are.

While relaying, the user's terminal is in raw mode (the pty's line discipline does the
editing, echo and signals, with the user's modes copied to it); its modes are put back
when the run ends, whatever way it ends short of SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import struct
import termios
import time
import tty
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int): lock or unlock a pty's slave
TIOCGPTPEER = 0x5441  # _IO('T', 0x41): open the slave of this master (Linux 4.13+)
_CHUNK = 1 << 16
_BUFFERED = 1 << 20  # input not yet taken by the container: stop reading the user beyond it
# After the container's process ended, what is left in the pty is read until no process
# holds its slave (the pid namespace is gone by then), but no longer than this: a slave
# passed out of the container (SCM_RIGHTS over a socket of --net host) must not hold stage1.
DRAIN_SECONDS = 2.0


@dataclass(frozen=True)
class UserTerminal:
    """Which of stage1's stdin, stdout and stderr are terminals, with their modes."""

    fds: tuple[int, ...]
    attrs: list[Any] | None  # termios modes, copied to the container's pty
    size: bytes  # struct winsize

    @classmethod
    def find(cls) -> UserTerminal | None:
        fds = tuple(fd for fd in (0, 1, 2) if os.isatty(fd))
        if not fds:
            return None
        attrs: list[Any] | None
        try:
            attrs = termios.tcgetattr(fds[0])
        except termios.error:
            attrs = None
        return cls(fds, attrs, _window_size(fds[0]))

    @property
    def input(self) -> int | None:
        """The terminal the user types into, if stdin is one."""
        return 0 if 0 in self.fds else None

    @property
    def output(self) -> int:
        """Where the container's terminal output goes: stdout, else stderr, else stdin."""
        return next((fd for fd in (1, 2) if fd in self.fds), self.fds[0])


def _window_size(fd: int) -> bytes:
    try:
        return fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8))
    except OSError:
        return struct.pack("HHHH", 24, 80, 0, 0)


def open_pty(ptmx: str, user: UserTerminal) -> tuple[int, int]:
    """Open a pty at PTMX (a devpts instance's ptmx): (master, slave), modes as USER's.

    The slave is opened without becoming the caller's controlling terminal.
    """
    master = os.open(ptmx, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
        slave = fcntl.ioctl(master, TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            if user.attrs is not None:
                termios.tcsetattr(slave, termios.TCSANOW, user.attrs)
            fcntl.ioctl(slave, termios.TIOCSWINSZ, user.size)
        except BaseException:
            os.close(slave)
            raise
    except BaseException:
        os.close(master)
        raise
    return master, slave


class Relay:
    """Copies the user's input to the pty's master and its output to the user, while
    supervising the container's init.

    One thread: a process that unshared a pid namespace cannot start threads, so the copy
    and the signals share one ``select`` loop (signals arrive through a wakeup pipe).
    ``start`` puts the user's terminal in raw mode; ``run`` relays until init exits, then
    drains what the container wrote (bounded); ``stop`` restores the terminal's modes. The
    user's terminal is never made non-blocking: that open file is shared with the shell.
    """

    def __init__(self, master: int, user: UserTerminal) -> None:
        self._master = master
        self._user = user
        self._saved: list[Any] | None = None
        os.set_blocking(master, False)

    def start(self) -> None:
        fd = self._user.input
        if fd is not None:
            try:
                self._saved = termios.tcgetattr(fd)
                tty.setraw(fd, termios.TCSANOW)
            except termios.error:
                self._saved = None

    def stop(self) -> None:
        """Restore the user's terminal and close the master; idempotent."""
        if self._saved is not None and self._user.input is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self._user.input, termios.TCSANOW, self._saved)
            self._saved = None
        if self._master >= 0:
            os.close(self._master)
            self._master = -1

    def run(self, child: int, signals: Collection[signal.Signals]) -> int:
        """Relay until CHILD exits; its wait status. SIGNALS (blocked by the caller) are
        passed to CHILD, except SIGWINCH, which resizes the pty (the kernel then signals
        the container's foreground process group), and SIGCHLD."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        handlers = {signo: signal.getsignal(signo) for signo in signals}
        old_wake = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        try:
            for signo in signals:
                signal.signal(signo, _ignore)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
            status = self._loop(child, wake_r)
            self._drain()
            return status
        finally:
            signal.pthread_sigmask(signal.SIG_BLOCK, signals)
            signal.set_wakeup_fd(old_wake)
            for signo, handler in handlers.items():
                signal.signal(signo, handler if handler is not None else signal.SIG_DFL)
            os.close(wake_r)
            os.close(wake_w)

    def _loop(self, child: int, wake: int) -> int:
        master, user_in = self._master, self._user.input
        pending = b""  # typed by the user, not yet taken by the pty
        master_open = True
        while True:
            readers = [wake]
            if master_open:
                readers.append(master)
            if user_in is not None and len(pending) < _BUFFERED:
                readers.append(user_in)
            writers = [master] if pending else []
            ready, writable = _wait(readers, writers)
            if wake in ready:
                for signo in os.read(wake, 1024):
                    if signo == signal.SIGWINCH:
                        self._resize()
                    elif signo != signal.SIGCHLD:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(child, signo)
                # Also when a wakeup byte was lost: the pipe was full.
                done, status = os.waitpid(child, os.WNOHANG)
                if done == child:
                    return status
            if master in ready and not self._forward_output():
                master_open = False  # no process holds the slave (now)
            if user_in is not None and user_in in ready:
                try:
                    data = os.read(user_in, _CHUNK)
                except OSError:
                    data = b""
                if data:
                    pending += data
                else:
                    user_in = None  # hung up: SIGHUP comes, and is passed on
            if pending and master in writable:
                try:
                    pending = pending[os.write(master, pending) :]
                except BlockingIOError:
                    pass
                except OSError:
                    pending = b""

    def _resize(self) -> None:
        size = _window_size(self._user.fds[0])
        with contextlib.suppress(OSError):
            fcntl.ioctl(self._master, termios.TIOCSWINSZ, size)

    def _drain(self) -> None:
        deadline = time.monotonic() + DRAIN_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            if not _wait([self._master], [], left)[0]:
                return
            if not self._forward_output():
                return

    def _forward_output(self) -> bool:
        """Copy what the master has to the user; False once no process holds the slave."""
        try:
            data = os.read(self._master, _CHUNK)
        except BlockingIOError:
            return True
        except OSError:  # EIO: every descriptor of the slave is closed
            return False
        if not data:
            return False
        out = self._user.output
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(out, view) :]
            except OSError:  # the user's terminal is gone: the output has nowhere to go
                break
        return True


def _ignore(signo: int, frame: object) -> None:
    """A Python-level handler, so that the signal reaches the wakeup pipe."""


def _wait(
    readers: list[int], writers: list[int], timeout: float | None = None
) -> tuple[set[int], set[int]]:
    """The readable and the writable descriptors among those given, with poll(2), not
    select(2): select fails on a descriptor numbered 1024 or more, which a caller that
    holds many open files hands stage1's pty."""
    poller = select.poll()
    for fd in {*readers, *writers}:
        mask = (select.POLLIN if fd in readers else 0) | (select.POLLOUT if fd in writers else 0)
        poller.register(fd, mask)
    events = poller.poll(None if timeout is None else max(0, int(timeout * 1000)))
    gone = select.POLLHUP | select.POLLERR | select.POLLNVAL  # the read or write says what
    readable = {fd for fd, ev in events if ev & (select.POLLIN | gone) and fd in readers}
    writable = {fd for fd, ev in events if ev & (select.POLLOUT | gone) and fd in writers}
    return readable, writable
