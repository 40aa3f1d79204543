"""The few Linux system calls Python 3.11 does not wrap, through ctypes.

This is the one seam to libc: every failure becomes an ``OSError`` with the errno and a
name for what was attempted, so callers translate only ``OSError``.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38

# pivot_root has no glibc wrapper; its number differs per architecture.
_SYS_PIVOT_ROOT = {
    "x86_64": 155,
    "aarch64": 41,
    "riscv64": 41,
    "loongarch64": 41,
    "ppc64le": 203,
    "ppc64": 203,
    "s390x": 217,
    "i686": 217,
    "i386": 217,
    "armv7l": 218,
    "armv6l": 218,
}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _bytes(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None
) -> None:
    what = f"mount {fstype or 'bind'} on {target}"
    _check(
        _libc.mount(
            _bytes(source), _bytes(target), _bytes(fstype), ctypes.c_ulong(flags), _bytes(data)
        ),
        what,
    )


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_bytes(target), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if number is None:
        raise OSError(0, f"pivot_root: unknown system call number on {os.uname().machine}")
    _check(_libc.syscall(ctypes.c_long(number), _bytes(new_root), _bytes(put_old)), "pivot_root")


def prctl(option: int, arg: int) -> None:
    zero = ctypes.c_ulong(0)
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), zero, zero, zero), "prctl")


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname")


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(ctypes.c_int(fd)), "syncfs")


def drop_privileges(uid: int, gid: int) -> None:
    """Become UID/GID for good (real, effective and saved ids; no supplementary groups)."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    # Changing uid made the process non-dumpable, which makes /proc/self/* root's: the
    # uid_map of a user namespace created next could not be written.
    prctl(PR_SET_DUMPABLE, 1)


def loopback_up() -> None:
    """Bring up ``lo`` in this network namespace (ioctl SIOCSIFFLAGS on a UDP socket)."""
    fd = _libc.socket(ctypes.c_int(2), ctypes.c_int(2), ctypes.c_int(0))  # AF_INET, SOCK_DGRAM
    if fd < 0:
        _check(-1, "socket")
    try:
        flags = 0x1 | 0x8 | 0x40  # IFF_UP | IFF_LOOPBACK | IFF_RUNNING
        # struct ifreq: the name in 16 bytes, then a short of flags (in a 24-byte union)
        ifreq = b"lo".ljust(16, b"\0") + flags.to_bytes(2, sys.byteorder) + bytes(22)
        request = ctypes.create_string_buffer(ifreq, len(ifreq))
        siocsifflags = 0x8914
        _check(_libc.ioctl(ctypes.c_int(fd), ctypes.c_ulong(siocsifflags), request), "up lo")
    finally:
        os.close(fd)
