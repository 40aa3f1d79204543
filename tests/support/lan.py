"""A LAN of network namespaces with rate-limited links, built and torn down by a test.

Adapted from the measured rig in ../shared/peers/lan/lan.sh (BITTORRENT.md §8): one "switch"
namespace holding a bridge (STP off, forward delay 0, multicast snooping off), one namespace
per host, one veth pair per host created inside the switch namespace with its peer placed
straight into the host's namespace (so no interface ever appears in the root namespace), and
every link limited both ways with tbf: on the host's eth0 (its upload) and on the switch's
port vhI (its download). The bucket is 4 ms of line rate but at least 64 KiB (one GSO
packet; a smaller bucket makes tbf drop or segment it), the queue 20 ms. Measured there: one
TCP flow gets 94.7 % of line rate.

    with Lan(3, "200mbit") as lan:          # fd-<tag>-h0 (the cache/origin) .. -h3
        srv = lan.popen(0, ["python3", "-m", "http.server", "--bind", lan.addr(0), "8080"])
        lan.run(1, ["curl", "-sf", f"http://{lan.addr(0)}:8080/x"], timeout=30)
        lan.egress_bytes(0)

Host i has 10.231.20.(10+i)/24 on eth0, `lo` up, IPv6 off, and no default route: nothing in
the LAN can reach the root namespace or beyond. Namespace names are `PREFIX-TAG-hI` and
`PREFIX-TAG-sw` with TAG = this process's pid and a counter, so rigs of parallel tests (or
other processes) never collide, and `names()` lists exactly this rig's namespaces.

`cache_uplink` limits host 0's link (both ways) to another rate, the WAN of
../shared/peers/lan/lan_cache.sh (set_wan), the other links keep `rate`.

Processes: `popen` runs `ip netns exec NS ARGV` (which execs ARGV, so the PID is the
command's) and remembers it; teardown sends SIGTERM to each of them, waits up to 10 s, then
SIGKILL, and then ends (by PID, named in a warning) any process still left inside one of
this rig's namespaces — those can only be descendants of what this rig started. Only then
are the namespaces deleted. Teardown runs on failure too (`__exit__`, or a failed `up`).

Needs root (CAP_SYS_ADMIN for `ip netns add`, CAP_NET_ADMIN for tc): `unavailable()` says why
not, for a skip; the constructor raises LanUnavailable with the same reason.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

SUBNET = "10.231.20"
PREFIX_LEN = 24
HOST_OFFSET = 10  # host i has SUBNET.(10+i)
DEFAULT_RATE = "200mbit"
BURST_MS = 4  # tbf bucket: this many ms of line rate ...
MIN_BURST = 64 * 1024  # ... but at least one 64 KiB GSO packet
QUEUE = "20ms"  # tbf latency: the queue each link end may hold
MAX_HOSTS = 200
CMD_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

_counter = itertools.count(1)
_counter_lock = threading.Lock()
_RATE = re.compile(r"^(\d+)(kbit|mbit|gbit)$")
_UNITS = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


class LanUnavailable(RuntimeError):
    """This machine (or user) cannot build the rig; the message says why."""


def rate_bps(rate: str) -> int:
    """'200mbit' -> 200_000_000 (tc's units: kbit/mbit/gbit are 10^3/10^6/10^9 bit/s).
    ValueError for anything else."""
    m = _RATE.match(rate.lower())
    if m is None:
        raise ValueError(f"bad rate {rate!r}: use e.g. 200mbit, 1gbit")
    return int(m[1]) * _UNITS[m[2]]


def burst_bytes(rate: str) -> int:
    """The tbf bucket for a link of this rate: BURST_MS of line rate, at least 64 KiB."""
    return max(rate_bps(rate) * BURST_MS // 8000, MIN_BURST)


def address(i: int) -> str:
    """Host i's address (the same in every rig, and in docker-compose.test.yml)."""
    return f"{SUBNET}.{HOST_OFFSET + i}"


def unavailable() -> str | None:
    """Why a Lan cannot be built here, or None if it can (root, ip, tc, network namespaces)."""
    if os.geteuid() != 0:
        return "the LAN rig needs root (ip netns, veth, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the LAN rig needs {tool} (apt-get install iproute2)"
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespaces"
    return None


def _ip(*args: str, timeout: float = CMD_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _must(argv: Sequence[str], timeout: float = CMD_TIMEOUT) -> str:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()[-500:]}"
        )
    return done.stdout


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


class Lan:
    """hosts + 1 namespaces on one bridge (host 0 is the cache/origin). A context manager.

    Not thread-safe: build, use and tear down from one thread (processes it starts may of
    course run concurrently). Every method that runs a command raises RuntimeError (with
    the command's stderr) when a setup step fails, subprocess.TimeoutExpired on a timeout.
    """

    def __init__(
        self,
        hosts: int,
        rate: str = DEFAULT_RATE,
        *,
        cache_uplink: str | None = None,
        prefix: str = "fd",
    ) -> None:
        why = unavailable()
        if why is not None:
            raise LanUnavailable(why)
        if not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be 1..{MAX_HOSTS}, not {hosts}")
        if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
            raise ValueError(f"prefix must be a short lowercase name, not {prefix!r}")
        rate_bps(rate)  # ValueError early
        if cache_uplink is not None:
            rate_bps(cache_uplink)
        self.hosts = hosts
        self.rate = rate
        self.cache_uplink = cache_uplink
        with _counter_lock:
            n = next(_counter)
        self.tag = f"{prefix}-{os.getpid()}x{n}"
        self.switch = f"{self.tag}-sw"
        self._procs: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []
        self._up = False

    # --- names and addresses ---------------------------------------------------------------

    def ns(self, i: int) -> str:
        """Host i's namespace name."""
        if not 0 <= i <= self.hosts:
            raise IndexError(f"no host {i} in a LAN of hosts 0..{self.hosts}")
        return f"{self.tag}-h{i}"

    def addr(self, i: int) -> str:
        self.ns(i)
        return address(i)

    def link_rate(self, i: int) -> str:
        """The rate of host i's link (each way)."""
        return self.cache_uplink if i == 0 and self.cache_uplink else self.rate

    def names(self) -> list[str]:
        """This rig's namespaces that exist now (after teardown: none)."""
        listed = _ip("netns", "list").stdout.splitlines()
        mine = re.compile(rf"^{re.escape(self.tag)}-(sw|h\d+)$")
        return [n for n in (line.split()[0] for line in listed if line.strip()) if mine.match(n)]

    # --- building and tearing down -----------------------------------------------------------

    def up(self) -> Lan:
        """Build the rig; on any failure everything built so far is removed again."""
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        self._up = True
        return self

    def _add_ns(self, name: str) -> None:
        done = _ip("netns", "add", name)
        if done.returncode != 0:
            raise LanUnavailable(f"ip netns add {name} failed: {done.stderr.strip()}")
        self._made.append(name)
        for cmd in (
            ["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
            ["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
            ["ip", "-n", name, "link", "set", "lo", "up"],
        ):
            _must(cmd)

    def _tbf(self, ns: str, dev: str, rate: str) -> None:
        _must(
            ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
             "burst", str(burst_bytes(rate)), "latency", QUEUE]
        )  # fmt: skip

    def _build(self) -> None:
        sw = self.switch
        self._add_ns(sw)
        _must(["ip", "-n", sw, "link", "add", "br0", "type", "bridge", "stp_state", "0",
               "forward_delay", "0", "mcast_snooping", "0"])  # fmt: skip
        _must(["ip", "-n", sw, "link", "set", "br0", "up"])
        for i in range(self.hosts + 1):
            ns, port = self.ns(i), f"vh{i}"
            self._add_ns(ns)
            # made inside the switch namespace, its peer moved straight into the host's:
            # neither end is ever visible in the root namespace
            _must(["ip", "-n", sw, "link", "add", port, "type", "veth",
                   "peer", "name", "eth0", "netns", ns])  # fmt: skip
            _must(["ip", "-n", sw, "link", "set", port, "master", "br0"])
            _must(["ip", "-n", sw, "link", "set", port, "up"])
            _must(["ip", "-n", ns, "addr", "add", f"{address(i)}/{PREFIX_LEN}", "dev", "eth0"])
            _must(["ip", "-n", ns, "link", "set", "eth0", "up"])
            self._tbf(ns, "eth0", self.link_rate(i))  # host i's upload
            self._tbf(sw, port, self.link_rate(i))  # host i's download
        for i in range(1, self.hosts + 1):
            if not self.reaches(i, address(0)):
                raise RuntimeError(f"{self.ns(i)} cannot reach {address(0)}")

    def down(self) -> None:
        """Stop this rig's processes (by PID) and delete its namespaces. Idempotent."""
        for proc in reversed(self._procs):
            self._stop(proc)
        self._procs.clear()
        for name in reversed(self._made):
            for pid in self.pids_in(name):
                # a descendant of something this rig started (nothing else enters its
                # namespaces): end it by PID, or the namespace outlives its deletion
                print(f"lan: ending pid {pid}, left in {name}", flush=True)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            _ip("netns", "del", name)
        self._made.clear()
        self._up = False

    @staticmethod
    def pids_in(name: str) -> list[int]:
        """The live processes inside namespace `name` (zombies left out)."""
        out = _ip("netns", "pids", name).stdout
        return [int(p) for p in out.split() if p.isdigit() and _proc_state(int(p)) != "Z"]

    @staticmethod
    def _stop(proc: subprocess.Popen[Any]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)

    def __enter__(self) -> Lan:
        return self.up()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    # --- running things ----------------------------------------------------------------------

    def argv(self, i: int, argv: Sequence[str]) -> list[str]:
        """The command line that runs argv on host i."""
        return ["ip", "netns", "exec", self.ns(i), *argv]

    def popen(self, i: int, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start argv on host i (subprocess.Popen keywords pass through; stdin defaults to
        /dev/null). The process is stopped by its PID at teardown, or earlier by stop()."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen(self.argv(i, argv), **kw)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any]) -> int | None:
        """SIGTERM one process this rig started, SIGKILL after 10 s; its exit status."""
        self._stop(proc)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def run(
        self, i: int, argv: Sequence[str], timeout: float = CMD_TIMEOUT, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run argv on host i to completion, output captured as text (never raises on a
        nonzero exit; subprocess.TimeoutExpired after `timeout`, the child killed)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(
            self.argv(i, argv), capture_output=True, text=True, timeout=timeout, check=False, **kw
        )

    # --- counters ------------------------------------------------------------------------------

    def egress_bytes(self, i: int) -> int:
        """Bytes host i's eth0 has sent so far (headers included), as seen inside host i."""
        out = _must(["ip", "-n", self.ns(i), "-s", "-j", "link", "show", "dev", "eth0"])
        return int(json.loads(out)[0]["stats64"]["tx"]["bytes"])

    def qdiscs(self, i: int) -> list[dict[str, Any]]:
        """`tc -j qdisc show` of host i's eth0 (its upload) and of its switch port (its
        download), each with an added "where": "host" | "switch"."""
        out: list[dict[str, Any]] = []
        for where, ns, dev in (("host", self.ns(i), "eth0"), ("switch", self.switch, f"vh{i}")):
            for q in json.loads(_must(["tc", "-n", ns, "-j", "qdisc", "show", "dev", dev])):
                out.append({**q, "where": where})
        return out

    def reaches(self, frm: int, host: str) -> bool:
        """Whether host `frm` reaches `host`: a TCP connect to its port 9 (discard, where
        nothing listens) is refused, i.e. answered. No ping: iputils may be missing."""
        probe = ["timeout", "5", "bash", "-c", f"exec 3<>/dev/tcp/{host}/9"]
        return "Connection refused" in self.run(frm, probe, timeout=10).stderr

    def wait_tcp(self, frm: int, host: str, port: int, timeout: float = 20.0) -> None:
        """Poll until a TCP connect from host `frm` to host:port succeeds; TimeoutError."""
        deadline = time.monotonic() + timeout
        probe = ["bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}"]
        while self.run(frm, probe, timeout=5).returncode != 0:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} (from {self.ns(frm)})")
            time.sleep(0.05)
