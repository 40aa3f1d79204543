"""Running a rendered tree as a container, with unshare(2) and no helper program.

The process tree of one run::

    stage1 (the caller's uid, never root here)     new user, mount, uts, ipc [, net] namespaces
      └─ init, pid 1 of a new pid namespace        mounts the root, then only forwards and reaps
           └─ the image's process, pid 2           exec'd with the image's argv, env, cwd

- User namespace: the caller's uid and gid are the only ones mapped, to the image's
  uid and gid; so every process of the container is that unprivileged host uid.
- Root filesystem: overlayfs, the cached tree as the read-only lower layer, the upper and
  work directories on a tmpfs of this mount namespace: writes go to memory and vanish with
  the namespace, whatever way the run ends; the tree never changes. The lower directory is
  reached through the working directory (``fchdir`` to the tree before ``unshare``), because
  the mount namespace copy carries the working directory over while a descriptor opened
  before the unshare would still name a mount of the old namespace, which overlayfs refuses,
  and a path string would need every directory above the tree to be searchable by the uid.
- Mount points inside the image are resolved with ``inroot``: a symlink planted at /proc,
  /dev, /tmp or /etc/hosts is replaced (in the writable layer), never followed out.
- Terminal: init and the process each run in a session of their own, so no process of the
  container has the user's terminal as its controlling terminal, and none holds a
  descriptor of it: where stage1's stdin, stdout or stderr is a terminal, the process has
  the slave of a pty of the container's devpts instead, and stage1 relays
  (``stage1.terminal``). Pipes and files are passed through.
- Signals: stage1 and init block the forwarded signals and take them with sigwaitinfo and
  pass each down (stage1 → init → the process), whoever sent it: the container is in no
  process group of the user's terminal, so Ctrl-C reaches it only this way (or, through
  the pty, as the pty's own SIGINT). With a pty, SIGWINCH resizes it instead.
- Lifetime: init has PR_SET_PDEATHSIG=SIGKILL; when init exits the kernel kills every
  process left in the pid namespace. So nothing of the container outlives stage1.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import stat
import termios
from collections.abc import Iterable
from dataclasses import dataclass

from stage1 import linux
from stage1.errors import Stage1Error
from stage1.inroot import O_DIR, Location, Root, remove
from stage1.process import Process
from stage1.terminal import Relay, UserTerminal, open_pty

FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGWINCH,
)
_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
# Docker's default capability set: what root in the container keeps (in its namespace).
_KEPT_CAPS = frozenset((0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31))
_MAX_FD = 1 << 20
_SCRATCH = "/tmp"  # a tmpfs is mounted over it in the container's mount namespace only


@dataclass(frozen=True)
class Container:
    tree_fd: int  # the cached tree (O_PATH), the overlay's lower layer
    process: Process
    net_host: bool
    hostname: str
    files: tuple[tuple[str, bytes], ...] = ()  # copied in: (path in the container, content)


def run(container: Container) -> int:
    """Run the container's process to its end; return stage1's exit status.

    Raises Stage1Error if the container cannot be set up or the process cannot be started
    (exit status 1, or 126/127 when the command is not executable / not found).
    """
    host_uid, host_gid = os.geteuid(), os.getegid()
    proc = container.process
    user_tty = UserTerminal.find()
    flags = (
        linux.CLONE_NEWUSER
        | linux.CLONE_NEWNS
        | linux.CLONE_NEWPID
        | linux.CLONE_NEWUTS
        | linux.CLONE_NEWIPC
    )
    if not container.net_host:
        flags |= linux.CLONE_NEWNET
    try:
        os.fchdir(container.tree_fd)
        linux.unshare(flags)
        with open("/proc/self/setgroups", "w") as f:
            f.write("deny")
        with open("/proc/self/uid_map", "w") as f:
            f.write(f"{proc.uid} {host_uid} 1\n")
        with open("/proc/self/gid_map", "w") as f:
            f.write(f"{proc.gid} {host_gid} 1\n")
        lower = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        os.chdir("/")
    except OSError as exc:
        raise Stage1Error(f"cannot create the container's namespaces: {_reason(exc)}") from exc
    status_r, status_w = os.pipe()
    alive_r, alive_w = os.pipe()
    # init sends the pty's master over this (SCM_RIGHTS), as runc's console socket does.
    console, console_init = socket.socketpair() if user_tty else (None, None)
    waited: set[signal.Signals] = {signal.SIGCHLD, *FORWARDED}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - pid 1 of the container; it never returns
        os.close(status_r)
        os.close(alive_w)
        if console is not None:
            console.close()
        _init(container, lower, status_w, alive_r, old_mask, waited, user_tty, console_init)
    os.close(status_w)
    os.close(alive_r)
    os.close(lower)
    relay = None
    try:
        if console is not None and console_init is not None and user_tty is not None:
            console_init.close()
            with console:
                master = _receive_fd(console)
            if master is not None:
                relay = Relay(master, user_tty)
                relay.start()
        with os.fdopen(status_r, "rb") as pipe:
            message = pipe.read().decode(errors="replace")  # empty once the process is exec'd
        if relay is not None:
            status = _exit_status(relay.run(pid, waited))
        else:
            status = _supervise(pid, waited)
    finally:
        if relay is not None:
            relay.stop()
    os.close(alive_w)
    if message:
        raise Stage1Error(message.removeprefix("error: "), status)
    return status


def _exit_status(wait_status: int) -> int:
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def _receive_fd(sock: socket.socket) -> int | None:
    """The descriptor init sends; None if init ended first (it then reports why)."""
    try:
        _, fds, _, _ = socket.recv_fds(sock, 1, 1)
    except OSError:
        return None
    for extra in fds[1:]:
        os.close(extra)
    return fds[0] if fds else None


def _supervise(child: int, waited: set[signal.Signals]) -> int:
    """Pass signals to CHILD until it exits; its exit status (128+N for signal N)."""
    while True:
        info = signal.sigwaitinfo(waited)
        if info.si_signo == signal.SIGCHLD:
            done, status = os.waitpid(child, os.WNOHANG)
            if done == child:
                return _exit_status(status)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, info.si_signo)


def _init(
    container: Container,
    lower: int,
    status_w: int,
    alive_r: int,
    old_mask: Iterable[int],
    waited: set[signal.Signals],
    user_tty: UserTerminal | None,
    console: socket.socket | None,
) -> None:  # pragma: no cover - runs as pid 1 of the container
    """pid 1: set up the root, start the process, reap, forward; exit with its status."""
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        os.setsid()  # out of the user's session: no controlling terminal
        os.set_blocking(alive_r, False)
        try:
            if os.read(alive_r, 1) == b"":
                os._exit(1)  # stage1 died before the death signal was armed
        except BlockingIOError:
            pass
        os.close(alive_r)
        slave = _setup(container, lower, user_tty, console)
        if user_tty is not None and slave is not None:
            # From here init holds no descriptor of the user's terminal either.
            for fd in user_tty.fds:
                os.dup2(slave, fd)
            os.close(slave)
    except BaseException as exc:
        reason = _reason(exc)
        os.write(status_w, f"error: cannot set up the container: {reason}".encode())
        os._exit(1)
    # Nothing of the host may reach the container through a descriptor: not the tree's,
    # not one stage1's caller left open without close-on-exec.
    os.closerange(3, status_w)
    os.closerange(status_w + 1, _MAX_FD)
    proc = container.process
    child = os.fork()
    if child == 0:
        try:
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            os.setsid()
            if user_tty is not None:
                fcntl.ioctl(user_tty.fds[0], termios.TIOCSCTTY, 0)
        except OSError as exc:
            message = f"error: cannot give the process its terminal: {_reason(exc)}"
            os.write(status_w, message.encode())
            os._exit(1)
        try:
            os.chdir(proc.cwd)
        except OSError as exc:
            message = f"error: cannot enter the working directory {proc.cwd}: {exc.strerror}"
            os.write(status_w, message.encode())
            os._exit(1)
        try:
            os.execvpe(proc.argv[0], proc.argv, dict(e.partition("=")[::2] for e in proc.env))
        except OSError as exc:
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            message = f"error: cannot run {proc.argv[0]} in the container: {exc.strerror}"
            os.write(status_w, message.encode(errors="replace"))
            os._exit(code)
        os._exit(127)
    os.close(status_w)
    while True:
        info = signal.sigwaitinfo(waited)
        if info.si_signo == signal.SIGCHLD:
            while True:  # reap every child: orphans of the container are ours too
                try:
                    done, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    os._exit(1)
                if done == 0:
                    break
                if done == child:
                    os._exit(_exit_status(status))
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, info.si_signo)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc) if isinstance(exc, Stage1Error) else repr(exc)


def _setup(
    container: Container, lower: int, user_tty: UserTerminal | None, console: socket.socket | None
) -> int | None:  # pragma: no cover - in pid 1
    """Make the container's root and enter it; the pty's slave, when there is a user tty."""
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE, None)
    linux.mount("tmpfs", _SCRATCH, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0700")
    for name in ("upper", "work", "root"):
        os.mkdir(f"{_SCRATCH}/{name}", 0o755)
    options = (
        f"lowerdir=/proc/self/fd/{lower},upperdir={_SCRATCH}/upper,"
        f"workdir={_SCRATCH}/work,userxattr"
    )
    linux.mount("overlay", f"{_SCRATCH}/root", "overlay", 0, options)
    os.close(lower)
    root = Root(os.open(f"{_SCRATCH}/root", O_DIR))
    nosuid_nodev = linux.MS_NOSUID | linux.MS_NODEV

    os.close(_mount(root, "proc", "proc", nosuid_nodev | linux.MS_NOEXEC, None))
    dev = _mount(root, "dev", "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, "mode=0755")
    _populate_dev(dev)
    slave = None
    if user_tty is not None and console is not None:
        master, slave = open_pty(f"/proc/self/fd/{dev}/pts/ptmx", user_tty)
        socket.send_fds(console, [b"m"], [master])
        os.close(master)
        console.close()
    os.close(dev)
    os.close(_mount(root, "tmp", "tmpfs", nosuid_nodev, "mode=1777"))
    for path, content in container.files:
        with _mountpoint(root, path, directory=False) as loc:
            fd = os.open(loc.name, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW, dir_fd=loc.fd)
            with os.fdopen(fd, "wb") as out:
                out.write(content)
    _make_workdir(root, container.process.cwd)

    linux.sethostname(container.hostname)
    if not container.net_host:
        linux.loopback_up()
    os.fchdir(root.fd)
    os.close(root.fd)
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)  # the host's root, stacked on ours by pivot_root
    os.chdir("/")

    for cap in range(64):
        if cap not in _KEPT_CAPS:
            try:
                linux.prctl(linux.PR_CAPBSET_DROP, cap)
            except OSError:
                break  # past the kernel's last capability
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    # pid 1 keeps capabilities in the namespace: no process of the container may ptrace it.
    linux.prctl(linux.PR_SET_DUMPABLE, 0)
    return slave


def _mountpoint(root: Root, path: str, *, directory: bool) -> Location:
    """PATH in the image, made a real directory (or regular file) in the writable layer."""
    loc = root.walk(path, follow=False, create=True)
    try:
        st = loc.lstat()
        wanted = stat.S_ISDIR if directory else stat.S_ISREG
        if st is None or not wanted(st.st_mode):
            if st is not None:
                remove(loc.fd, loc.name)
            if directory:
                os.mkdir(loc.name, 0o755, dir_fd=loc.fd)
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                os.close(os.open(loc.name, flags, 0o644, dir_fd=loc.fd))
    except BaseException:
        loc.close()
        raise
    return loc


def _mount(root: Root, path: str, fstype: str, flags: int, data: str | None) -> int:
    """Mount FSTYPE on PATH in the image; return a descriptor of the mounted directory."""
    with _mountpoint(root, path, directory=True) as loc:
        linux.mount(fstype, f"/proc/self/fd/{loc.fd}/{loc.name}", fstype, flags, data)
        return os.open(loc.name, O_DIR, dir_fd=loc.fd)


def _populate_dev(dev: int) -> None:  # pragma: no cover - in pid 1
    for name in _DEVICES:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666, dir_fd=dev))
        linux.mount(f"/dev/{name}", f"/proc/self/fd/{dev}/{name}", None, linux.MS_BIND, None)
    for name, target in (
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ):
        os.symlink(target, name, dir_fd=dev)
    os.mkdir("shm", 0o1777, dir_fd=dev)
    os.chmod("shm", 0o1777, dir_fd=dev)
    linux.mount(
        "tmpfs",
        f"/proc/self/fd/{dev}/shm",
        "tmpfs",
        linux.MS_NOSUID | linux.MS_NODEV,
        "mode=1777",
    )
    os.mkdir("pts", 0o755, dir_fd=dev)
    linux.mount(
        "devpts",
        f"/proc/self/fd/{dev}/pts",
        "devpts",
        linux.MS_NOSUID | linux.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )


def _make_workdir(root: Root, cwd: str) -> None:
    with root.walk(cwd, follow=True, create=True) as loc:
        if loc.name and loc.lstat() is None:
            os.mkdir(loc.name, 0o755, dir_fd=loc.fd)
