"""One cache and N hosts on a rate-limited LAN of network namespaces (issue 12, item 7).

The rig is tests/support/lan.py (adapted from ../shared/peers/lan/lan.sh, BITTORRENT.md §8):
host 0 is the cache, hosts 1..N (8) the clients, every link RATE (200mbit) both ways. The
payload is an image pushed to a docker-registry on the cache host's own loopback (never on
the LAN): one random uncompressed layer of SIZE_MIB (256) MiB, or with --image four of 64
MiB. The cache's store is filled once, untimed, by `fetchd pull` from that registry, and
`fetchd serve` on the cache host serves it (10.231.20.10:5050). Arms, each run ROUNDS (3)
times, interleaved (the order rotates every round):

  http    HTTP fan-out: every host GETs every layer from `fetchd serve` with curl at once
          (one curl per host, --parallel over the layers).
  aria2   an aria2c swarm: the cache host seeds hard links of the store's blobs with aria2c
          (RPC-checked to be seeding before the clock starts) and runs opentracker with a
          whitelist; torrents are `mktorrent -l 18 -n HEX` (the canonical piece length of
          fetchd's rule for 64-512 MiB blobs); the N leechers run aria2c with --seed-time so
          that they keep seeding until all are done (as lan.sh's aria2 row; a hook of
          --on-bt-download-complete marks each host done).
  fetchd  `fetchd pull --torrent --mirror http://CACHE:5050 --mirror-only` on every host
          (--seed-linger, stopped once all are done). Skipped, with the reason, when the CLI
          has no --torrent or the cache does not answer /fetchd/v1/torrents/sha256:HEX.

Per arm and round: wall time from the start of the N clients to the moment every host holds
every layer (the hosts' files are sha256-checked afterwards, outside the timed part: a run
with a wrong byte fails the benchmark); cache egress = bytes that left the cache host's eth0
(headers included) over the payload's size; CPU seconds (user + system) of the cache-side
processes (fetchd serve; aria2c seeder + opentracker), from /proc before and after. The
table prints medians of per-round values and the ratios to the aria2 arm (time, egress).
The machine's load average is printed before and after: other work shares these CPUs.

    sudo .venv/bin/python benchmarks/lan_swarm.py [--hosts 8] [--rate 200mbit] [--rounds 3]
        [--size-mib 256 | --image] [--arms http,aria2,fetchd] [--json]

--wan (issue 12 item 8, after ../shared/peers/lan/lan_cache.sh): host 0 is the origin (a
docker-registry on its eth0 address) behind a --wan-rate (100mbit) link, host 1 the cache,
hosts 2..N+1 the clients, every other link --rate (1gbit here). Arms: direct (8 `skopeo copy
--preserve-digests` straight from the origin), proxy (docker-registry in proxy mode on the
cache host), fetchd (`fetchd serve --upstream ORIGIN`, cold: a new empty store every round),
fetchd-warm (after one untimed pull through it), fetchd-torrent-warm (clients run `fetchd
pull --torrent --mirror CACHE --mirror-only` against the warm cache). Time until all clients
hold the image (skopeo's layouts: manifest digest and every layer's sha256 checked after),
origin egress and cache-host egress over the image's size, the cache process's CPU; ratios
to direct.

Needs root, docker-registry, skopeo, curl, aria2c, opentracker, mktorrent. Everything it
starts runs inside the rig's namespaces (named fd-*) and is stopped by PID; the rig is torn
down on every exit path.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so that `python benchmarks/lan_swarm.py` finds tests/

from benchmarks.measure import child_env, compile_fetchd  # noqa: E402
from tests.support.images import Blob, BuiltImage, BuiltLayer, build_image, random_layer  # noqa: E402
from tests.support.lan import Lan, unavailable  # noqa: E402

MIB = 1024 * 1024
PYTHON = REPO / ".venv" / "bin" / "python"
NAME, TAG = "bench/lan", "latest"
REGISTRY = "127.0.0.1:5000"  # on the cache host's own loopback, never on the LAN
SERVE_PORT, TRACKER_PORT, BT_PORT, RPC_PORT = 5050, 6969, 6881, 6800
SEEDER_PORT = 6891  # the aria2c seeder: BT_PORT on the cache host is fetchd serve's
ARMS = ("http", "aria2", "fetchd")
ROUND_TIMEOUT = 600.0
POLL = 0.02
ARIA2_BT = [
    "--enable-dht=false",
    "--enable-dht6=false",
    "--bt-enable-lpd=false",
    "--enable-peer-exchange=false",
    "--summary-interval=0",
    "--console-log-level=warn",
]


class BenchmarkFailed(RuntimeError):
    pass


@dataclass
class Run:
    arm: str
    round: int
    wall: float
    egress: int  # bytes out of the cache host
    cpu: float  # cache-side processes, user + system seconds
    verify_s: float
    cache_egress: int | None = None  # --wan: bytes out of the cache host (host 1)
    hosts_cpu: float = 0.0  # the clients on every host, user + system seconds, in all


@dataclass
class Rig:
    lan: Lan
    work: Path
    image: BuiltImage
    env: dict[str, str]
    serve: subprocess.Popen[Any] | None = None
    skips: dict[str, str] = field(default_factory=dict)
    first_client: int = 1  # --wan: host 0 is the origin, 1 the cache, the clients from 2
    upstream_blobs: int = 1  # --wan: serve's --upstream-blobs

    @property
    def clients(self) -> range:
        return range(self.first_client, self.lan.hosts + 1)

    @property
    def cache(self) -> str:
        return self.lan.addr(0)

    @property
    def layers(self) -> list[str]:
        return [layer.digest.removeprefix("sha256:") for layer in self.image.layers]

    @property
    def payload(self) -> int:
        return sum(layer.size for layer in self.image.layers)

    def host_dir(self, i: int) -> Path:
        return self.work / "hosts" / f"h{i}"

    def log(self, name: str) -> Any:
        return (self.work / "logs" / name).open("ab")


# --- processes ---------------------------------------------------------------------------------


def cpu_seconds(pids: Sequence[int]) -> float:
    """user + system seconds of pids and all their descendants (from /proc)."""
    kids: dict[int, list[int]] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, list[str]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            s = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = s[s.rindex(")") + 2 :].split()
        stats[int(d)] = fields
        kids.setdefault(int(fields[1]), []).append(int(d))
    total, todo, seen = 0.0, list(pids), set()
    while todo:
        p = todo.pop()
        if p in seen or p not in stats:
            continue
        seen.add(p)
        total += (int(stats[p][11]) + int(stats[p][12])) / ticks
        todo.extend(kids.get(p, []))
    return total


def must(done: subprocess.CompletedProcess[str], what: str) -> str:
    if done.returncode != 0:
        raise BenchmarkFailed(f"{what} exited with {done.returncode}: {done.stderr[-1500:]}")
    return done.stdout


def poll(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() >= deadline:
            raise BenchmarkFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(POLL)


def fetchd_argv(store: Path, *args: str) -> list[str]:
    return [str(PYTHON), "-m", "fetchd", "--store", str(store), "-q", *args]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MIB):
            h.update(chunk)
    return h.hexdigest()


def verify(rig: Rig, where: Callable[[int, str], Path], arm: str) -> float:
    """sha256 of every layer on every client; BenchmarkFailed on a mismatch. Seconds taken."""
    t0 = time.monotonic()
    jobs = [(i, hx) for i in rig.clients for hx in rig.layers]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as ex:
        got = list(ex.map(lambda j: sha256(where(*j)), jobs))
    for (i, hx), g in zip(jobs, got, strict=True):
        if g != hx:
            raise BenchmarkFailed(f"{arm}: host {i}'s layer {hx[:12]} hashes to {g[:12]}")
    return time.monotonic() - t0


def fresh_hosts(rig: Rig) -> None:
    shutil.rmtree(rig.work / "hosts", ignore_errors=True)
    for i in rig.clients:
        rig.host_dir(i).mkdir(parents=True)
    subprocess.run(["sync"], check=False)


# --- the arms ----------------------------------------------------------------------------------


def timed(
    rig: Rig,
    arm: str,
    round_: int,
    start: Callable[[int], subprocess.Popen[Any]],
    done: Callable[[int, subprocess.Popen[Any]], bool],
    cache_pids: Sequence[int],
) -> tuple[float, int, float, list[subprocess.Popen[Any]], float]:
    """Start one client per host at once; poll until done(i, proc) holds for every host.
    A client that exits nonzero (or exits before it is done) fails the run. Returns wall
    time, cache egress, cache CPU, the clients, and the clients' CPU until then."""
    egress0, cpu0 = rig.lan.egress_bytes(0), cpu_seconds(cache_pids)
    reaped0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    procs = {i: start(i) for i in rig.clients}
    left = set(procs)
    deadline = t0 + ROUND_TIMEOUT
    while left:
        for i in list(left):
            p = procs[i]
            if done(i, p):
                left.discard(i)
            elif p.poll() is not None:
                raise BenchmarkFailed(
                    f"{arm} round {round_}: host {i}'s client exited with {p.returncode} "
                    f"before it was done (logs in {rig.work / 'logs'})"
                )
        if time.monotonic() > deadline:
            raise BenchmarkFailed(f"{arm} round {round_}: hosts {sorted(left)} not done")
        if left:
            time.sleep(POLL)
    wall = time.monotonic() - t0
    return (
        wall,
        rig.lan.egress_bytes(0) - egress0,
        cpu_seconds(cache_pids) - cpu0,
        list(procs.values()),
        # the clients still running (lingering seeds), from /proc, and those that ended
        # and were reaped meanwhile (curl), from this process's children's rusage
        cpu_seconds([p.pid for p in procs.values() if p.poll() is None]) + _reaped_cpu(reaped0),
    )


def _reaped_cpu(before: resource.struct_rusage) -> float:
    now = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (now.ru_utime - before.ru_utime) + (now.ru_stime - before.ru_stime)


def arm_http(rig: Rig, round_: int) -> Run:
    fresh_hosts(rig)
    assert rig.serve is not None

    def start(i: int) -> subprocess.Popen[Any]:
        argv = ["curl", "-sS", "--fail", "--parallel", "--parallel-max", "16"]
        for hx in rig.layers:
            url = f"http://{rig.cache}:{SERVE_PORT}/v2/{NAME}/blobs/sha256:{hx}"
            argv += ["-o", str(rig.host_dir(i) / hx), url]
        return rig.lan.popen(i, argv, stderr=rig.log(f"http-h{i}.log"))

    wall, egress, cpu, procs, hcpu = timed(
        rig, "http", round_, start, lambda _i, p: p.poll() == 0, [rig.serve.pid]
    )
    v = verify(rig, lambda i, hx: rig.host_dir(i) / hx, "http")
    for p in procs:
        rig.lan.stop(p)
    return Run("http", round_, wall, egress, cpu, v, hosts_cpu=hcpu)


def aria2_rpc(rig: Rig, method: str, params: Sequence[Any]) -> Any:
    body = json.dumps({"jsonrpc": "2.0", "id": "b", "method": method, "params": list(params)})
    url = f"http://127.0.0.1:{RPC_PORT}/jsonrpc"  # the cache host's own loopback
    out = rig.lan.run(0, ["curl", "-sf", "-d", body, url], timeout=10)
    return json.loads(out.stdout)["result"] if out.returncode == 0 else None


def torrents(rig: Rig) -> tuple[list[Path], Path]:
    """mktorrent -l 18 -n HEX for every layer (announce = the cache's opentracker), and
    opentracker's whitelist of their info-hashes (as `aria2c -S` prints them)."""
    tdir = rig.work / "torrents"
    tdir.mkdir(exist_ok=True)
    blobs = rig.work / "cache-store" / "layout" / "blobs" / "sha256"
    out, hashes = [], []
    for hx in rig.layers:
        t = tdir / f"{hx}.torrent"
        if not t.exists():
            must(
                subprocess.run(
                    ["mktorrent", "-l", "18", "-n", hx, "-a",
                     f"http://{rig.cache}:{TRACKER_PORT}/announce", "-o", str(t), str(blobs / hx)],
                    capture_output=True, text=True, check=False,
                ),
                "mktorrent",
            )  # fmt: skip
        shown = subprocess.run(["aria2c", "-S", str(t)], capture_output=True, text=True)
        m = re.search(r"Info Hash: ([0-9a-f]{40})", shown.stdout)
        if m is None:
            raise BenchmarkFailed(f"aria2c -S {t} printed no info hash")
        out.append(t)
        hashes.append(m[1])
    wl = tdir / "whitelist"
    wl.write_text("".join(h + "\n" for h in hashes))
    return out, wl


def arm_aria2(rig: Rig, round_: int) -> Run:
    fresh_hosts(rig)
    files, wl = torrents(rig)
    seed = rig.work / "seed"
    shutil.rmtree(seed, ignore_errors=True)
    seed.mkdir()
    blobs = rig.work / "cache-store" / "layout" / "blobs" / "sha256"
    for hx in rig.layers:  # hard links: the seeder reads the store's own pages
        os.link(blobs / hx, seed / hx)
    conf = rig.work / "ot.conf"
    conf.write_text(
        f"listen.tcp {rig.cache}:{TRACKER_PORT}\nlisten.udp {rig.cache}:{TRACKER_PORT}\n"
        f"access.whitelist {wl}\ntracker.rootdir /\n"
    )
    lan = rig.lan
    tracker = lan.popen(0, ["opentracker", "-f", str(conf)], stdout=rig.log("opentracker.log"),
                        stderr=subprocess.STDOUT)  # fmt: skip
    lan.wait_tcp(1, rig.cache, TRACKER_PORT)
    seeder = lan.popen(
        0,
        ["aria2c", *ARIA2_BT, "--seed-ratio=0.0", "--check-integrity=true",
         f"--listen-port={SEEDER_PORT}", "--enable-rpc", f"--rpc-listen-port={RPC_PORT}",
         "--rpc-listen-all=false", "-d", str(seed), *map(str, files)],
        stdout=rig.log("aria2-seeder.log"), stderr=subprocess.STDOUT,
    )  # fmt: skip

    last: list[Any] = []

    def seeding() -> bool:
        if seeder.poll() is not None:
            raise BenchmarkFailed(f"the aria2c seeder exited with {seeder.returncode}")
        act = aria2_rpc(rig, "aria2.tellActive", [["seeder", "completedLength", "totalLength"]])
        last[:] = [act]
        return (
            bool(act)
            and len(act) == len(files)
            and all(a["seeder"] == "true" and a["completedLength"] == a["totalLength"] for a in act)
        )

    try:
        poll(seeding, 120, "the aria2c seeder to verify and seed every layer")
    except BenchmarkFailed as exc:
        raise BenchmarkFailed(f"{exc}; its RPC said {last}") from None
    marks = rig.work / "done"
    shutil.rmtree(marks, ignore_errors=True)
    marks.mkdir()

    def start(i: int) -> subprocess.Popen[Any]:
        hook = rig.work / f"done-h{i}.sh"  # aria2c runs it with GID, file count, path
        hook.write_text(f'#!/bin/sh\necho "$3" >> {marks}/h{i}\n')
        hook.chmod(0o755)
        return lan.popen(
            i,
            ["aria2c", *ARIA2_BT, "--seed-time=60", "--file-allocation=none",
             f"--listen-port={BT_PORT}", f"--on-bt-download-complete={hook}",
             "-d", str(rig.host_dir(i)), *map(str, files)],
            stdout=rig.log(f"aria2-h{i}.log"), stderr=subprocess.STDOUT,
        )  # fmt: skip

    def done(i: int, _p: subprocess.Popen[Any]) -> bool:
        try:
            return len((marks / f"h{i}").read_text().split()) >= len(files)
        except FileNotFoundError:
            return False

    wall, egress, cpu, procs, hcpu = timed(
        rig, "aria2", round_, start, done, [seeder.pid, tracker.pid]
    )
    for p in procs:  # they seed until every host is done; then they go
        lan.stop(p)
    lan.stop(seeder)
    lan.stop(tracker)
    v = verify(rig, lambda i, hx: rig.host_dir(i) / hx, "aria2")
    shutil.rmtree(seed, ignore_errors=True)
    return Run("aria2", round_, wall, egress, cpu, v, hosts_cpu=hcpu)


def fetchd_torrent_missing(rig: Rig) -> str | None:
    """Why the fetchd arm cannot run yet, or None."""
    helptext = subprocess.run(
        [str(PYTHON), "-m", "fetchd", "pull", "--help"], capture_output=True, text=True
    ).stdout
    if "--torrent" not in helptext:
        return "`fetchd pull` has no --torrent"
    url = f"http://{rig.cache}:{SERVE_PORT}/fetchd/v1/torrents/sha256:{rig.layers[0]}?name={NAME}"
    got = rig.lan.run(1, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{content_type}",
                          url], timeout=30).stdout  # fmt: skip
    if not got.startswith("200") or "bittorrent" not in got:
        return f"`fetchd serve` answers GET /fetchd/v1/torrents/sha256:HEX with {got or 'nothing'}"
    return None


def arm_fetchd(rig: Rig, round_: int) -> Run:
    fresh_hosts(rig)
    assert rig.serve is not None
    ref = f"docker://{REGISTRY}/{NAME}:{TAG}"  # never asked: --mirror-only

    def start(i: int) -> subprocess.Popen[Any]:
        argv = fetchd_argv(
            rig.host_dir(i) / "store", "pull", "--insecure-options", "http", "--torrent",
            "--mirror", f"http://{rig.cache}:{SERVE_PORT}", "--mirror-only",
            "--bt-listen", f"{rig.lan.addr(i)}:{BT_PORT}", "--seed-linger", "600", ref,
        )  # fmt: skip
        return rig.lan.popen(i, argv, env=rig.env, stdout=rig.log(f"fetchd-h{i}.log"),
                             stderr=subprocess.STDOUT)  # fmt: skip

    def blob(i: int, hx: str) -> Path:
        return rig.host_dir(i) / "store" / "layout" / "blobs" / "sha256" / hx

    def done(i: int, p: subprocess.Popen[Any]) -> bool:
        return all(blob(i, hx).exists() for hx in rig.layers)

    wall, egress, cpu, procs, hcpu = timed(rig, "fetchd", round_, start, done, [rig.serve.pid])
    for p in procs:
        rig.lan.stop(p)
    v = verify(rig, blob, "fetchd")
    return Run("fetchd", round_, wall, egress, cpu, v, hosts_cpu=hcpu)


ARM_FUNCS: dict[str, Callable[[Rig, int], Run]] = {
    "http": arm_http,
    "aria2": arm_aria2,
    "fetchd": arm_fetchd,
}


# --- setup ---------------------------------------------------------------------------------------


def build(work: Path, layers: int, layer_mib: int) -> BuiltImage:
    """The random image, cached under work/images by its shape (a JSON note of what was
    built; rebuilt when the note or the layout is missing)."""
    layout = work / "images" / f"{layers}x{layer_mib}"
    note = layout.with_suffix(".json")
    if note.exists() and (layout / "index.json").exists():
        d = json.loads(note.read_text())
        return BuiltImage(
            Blob(**d["manifest"]), Blob(**d["config"]), tuple(BuiltLayer(**x) for x in d["layers"])
        )
    shutil.rmtree(layout, ignore_errors=True)
    image = build_image(
        layout,
        TAG,
        [random_layer(layer_mib * MIB, 1000 + s, compression="none") for s in range(layers)],
    )
    note.write_text(json.dumps(dataclasses.asdict(image)))
    return image


def setup(lan: Lan, work: Path, image_layout: Path, image: BuiltImage, rate: str) -> Rig:
    env = child_env(work / "home")
    (work / "home").mkdir(exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    rig = Rig(lan, work, image, env)
    reg = work / "registry"
    shutil.rmtree(reg, ignore_errors=True)
    reg.mkdir()
    (reg / "config.yml").write_text(
        "version: 0.1\nlog: {level: warn}\n"
        f"storage:\n  filesystem: {{rootdirectory: {reg / 'data'}}}\n"
        f'http: {{addr: "{REGISTRY}"}}\n'
    )
    registry = lan.popen(0, ["docker-registry", "serve", str(reg / "config.yml")],
                         stdout=rig.log("registry.log"), stderr=subprocess.STDOUT)  # fmt: skip
    poll(lambda: lan.run(0, ["curl", "-sf", f"http://{REGISTRY}/v2/"]).returncode == 0, 30,
         "the registry")  # fmt: skip
    must(
        lan.run(0, ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
                    f"oci:{image_layout}:{TAG}", f"docker://{REGISTRY}/{NAME}:{TAG}"], 600),
        "skopeo push",
    )  # fmt: skip
    store = work / "cache-store"
    shutil.rmtree(store, ignore_errors=True)
    printed = must(
        lan.run(0, fetchd_argv(store, "pull", "--insecure-options", "http",
                               f"docker://{REGISTRY}/{NAME}:{TAG}"), 600, env=env),
        "fetchd pull into the cache's store",
    ).strip()  # fmt: skip
    if printed != image.digest:
        raise BenchmarkFailed(f"the cache pulled {printed!r}, built {image.digest}")
    rig.serve = lan.popen(
        0,
        fetchd_argv(store, "serve", "--listen", f"{rig.cache}:{SERVE_PORT}", "--insecure-options",
                    "http", "--upstream", f"http://{REGISTRY}", "--bt-listen",
                    f"{rig.cache}:{BT_PORT}"),
        env=env, stdout=rig.log("serve.log"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    lan.wait_tcp(1, rig.cache, SERVE_PORT, timeout=60)
    del registry  # keeps running (the serve's upstream); stopped with the rig
    return rig


# --- --wan: the cache where it matters (issue 12 item 8; ../shared/peers/lan/lan_cache.sh) ----

WAN_ARMS = ("direct", "proxy", "fetchd", "fetchd-warm", "fetchd-torrent-warm")
ORIGIN_PORT = 5000


def registry_config(path: Path, addr: str, data: Path, remote: str | None = None) -> Path:
    path.write_text(
        "version: 0.1\nlog: {level: warn}\n"
        f"storage:\n  filesystem: {{rootdirectory: {data}}}\n  delete: {{enabled: true}}\n"
        f'http: {{addr: "{addr}"}}\n' + (f"proxy: {{remoteurl: {remote}}}\n" if remote else "")
    )
    return path


def wan_setup(lan: Lan, work: Path, image_layout: Path, image: BuiltImage) -> Rig:
    """The origin registry on host 0 (behind the WAN link), the image pushed to it over the
    host's own loopback (its own address: not on the wire)."""
    env = child_env(work / "home")
    (work / "home").mkdir(exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    rig = Rig(lan, work, image, env, first_client=2)
    origin = f"{lan.addr(0)}:{ORIGIN_PORT}"
    data = work / "wan-origin"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir()
    conf = registry_config(data / "config.yml", origin, data / "data")
    rig.serve = lan.popen(0, ["docker-registry", "serve", str(conf)],
                          stdout=rig.log("origin.log"), stderr=subprocess.STDOUT)  # fmt: skip
    poll(lambda: lan.run(0, ["curl", "-sf", f"http://{origin}/v2/"]).returncode == 0, 30,
         "the origin registry")  # fmt: skip
    must(
        lan.run(0, ["skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--preserve-digests",
                    f"oci:{image_layout}:{TAG}", f"docker://{origin}/{NAME}:{TAG}"], 600),
        "skopeo push to the origin",
    )  # fmt: skip
    return rig


def wan_arm(rig: Rig, arm: str, round_: int) -> Run:
    """8 clients pull the image at once: straight from the origin, through the registry's
    proxy mode, or through `fetchd serve` (cold: a new empty store; -warm: after one untimed
    pull through it). Clients are `skopeo copy --preserve-digests` into oci: layouts, or with
    fetchd-torrent-warm `fetchd pull --torrent --mirror CACHE --mirror-only`."""
    lan, fresh = rig.lan, rig.work / "wan-cache"
    assert rig.serve is not None
    origin, cache = f"{lan.addr(0)}:{ORIGIN_PORT}", lan.addr(1)
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    fresh_hosts(rig)
    torrent = arm.startswith("fetchd-torrent")
    cache_proc: subprocess.Popen[Any] | None = None
    if arm == "direct":
        host = origin
    elif arm == "proxy":
        host = f"{cache}:{ORIGIN_PORT}"
        conf = registry_config(fresh / "config.yml", host, fresh / "data", f"http://{origin}")
        cache_proc = lan.popen(1, ["docker-registry", "serve", str(conf)],
                               stdout=rig.log("proxy.log"), stderr=subprocess.STDOUT)  # fmt: skip
    else:
        host = f"{cache}:{SERVE_PORT}"
        cache_proc = lan.popen(
            1,
            fetchd_argv(fresh / "store", "serve", "--listen", host, "--insecure-options", "http",
                        "--upstream", f"http://{origin}", "--bt-listen", f"{cache}:{BT_PORT}",
                        "--upstream-blobs", str(rig.upstream_blobs)),
            env=rig.env, stdout=rig.log("wan-serve.log"), stderr=subprocess.STDOUT,
        )  # fmt: skip
    poll(lambda: lan.run(2, ["curl", "-sf", f"http://{host}/v2/"]).returncode == 0, 60, host)

    def skopeo(i: int, dest: Path) -> list[str]:
        return ["skopeo", "copy", "--quiet", "--src-tls-verify=false", "--preserve-digests",
                f"docker://{host}/{NAME}:{TAG}", f"oci:{dest}:{TAG}"]  # fmt: skip

    if arm.endswith("-warm"):
        must(lan.run(2, skopeo(2, fresh / "warm"), 900), "the warming pull")
        shutil.rmtree(fresh / "warm")

    def start(i: int) -> subprocess.Popen[Any]:
        if torrent:
            argv = fetchd_argv(
                rig.host_dir(i) / "store", "pull", "--insecure-options", "http", "--torrent",
                "--mirror", f"http://{host}", "--mirror-only", "--bt-listen",
                f"{lan.addr(i)}:{BT_PORT}", "--seed-linger", "600", f"docker://{origin}/{NAME}:{TAG}",
            )  # fmt: skip
        else:
            argv = skopeo(i, rig.host_dir(i) / "oci")
        return lan.popen(i, argv, env=rig.env, stdout=rig.log(f"wan-{arm}-h{i}.log"),
                         stderr=subprocess.STDOUT)  # fmt: skip

    def blob(i: int, hx: str) -> Path:
        top = rig.host_dir(i) / ("store/layout" if torrent else "oci")
        return top / "blobs" / "sha256" / hx

    def done(i: int, p: subprocess.Popen[Any]) -> bool:
        if torrent:
            return all(blob(i, hx).exists() for hx in rig.layers)
        return p.poll() == 0

    pids = [cache_proc.pid] if cache_proc else [rig.serve.pid]
    cache0 = lan.egress_bytes(1)
    wall, egress, cpu, procs, hcpu = timed(rig, arm, round_, start, done, pids)
    cache_egress = lan.egress_bytes(1) - cache0
    for p in procs:
        lan.stop(p)
    if not torrent:
        for i in rig.clients:
            index = json.loads((rig.host_dir(i) / "oci" / "index.json").read_text())
            if [m["digest"] for m in index["manifests"]] != [rig.image.digest]:
                raise BenchmarkFailed(f"{arm}: host {i} wrote another manifest")
    v = verify(rig, blob, arm)
    if cache_proc is not None:
        lan.stop(cache_proc)
    return Run(arm, round_, wall, egress, cpu, v, cache_egress, hosts_cpu=hcpu)


# --- report ---------------------------------------------------------------------------------


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def summary(
    runs: Sequence[Run], rig: Rig, args: argparse.Namespace, base_arm: str = "aria2"
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "benchmark": "lan_swarm" + (" --wan" if args.wan else ""),
        "base": base_arm,
        "hosts": args.hosts,
        "rate": args.rate,
        "layers": len(rig.layers),
        "payload_bytes": rig.payload,
        "floor_s": round(rig.payload * 8 / rate_bps(args.rate), 2),
        "skipped": rig.skips,
        "arms": {},
    }
    per: dict[str, dict[int, Run]] = {}
    for r in runs:
        per.setdefault(r.arm, {})[r.round] = r
    base = per.get(base_arm, {})
    for arm, rs in per.items():
        a: dict[str, Any] = {
            "wall_s": [round(r.wall, 2) for r in rs.values()],
            "egress_x": [round(r.egress / rig.payload, 3) for r in rs.values()],
            "cpu_s": [round(r.cpu, 2) for r in rs.values()],
            "hosts_cpu_s": [round(r.hosts_cpu, 2) for r in rs.values()],
            "verify_s": [round(r.verify_s, 2) for r in rs.values()],
        }
        a["median_wall_s"] = round(med([r.wall for r in rs.values()]), 2)
        a["median_egress_x"] = round(med([r.egress / rig.payload for r in rs.values()]), 3)
        a["median_cpu_s"] = round(med([r.cpu for r in rs.values()]), 2)
        a["median_hosts_cpu_s"] = round(med([r.hosts_cpu for r in rs.values()]), 2)
        ce = [r.cache_egress / rig.payload for r in rs.values() if r.cache_egress is not None]
        if ce:
            a["median_cache_egress_x"] = round(med(ce), 3)
        both = [k for k in rs if k in base]
        if both and arm != base_arm:
            a["time_vs_base"] = round(med([rs[k].wall / base[k].wall for k in both]), 2)
            a["egress_vs_base"] = round(med([rs[k].egress / base[k].egress for k in both]), 2)
        out["arms"][arm] = a
    return out


def report(s: dict[str, Any]) -> None:
    where = (
        f"WAN: origin behind {s['wan']}, cache + {s['hosts']} clients at {s['rate']}"
        if "wan" in s
        else f"LAN swarm: 1 cache + {s['hosts']} hosts, every link {s['rate']} both ways"
    )
    print(
        f"\n{where}; "
        f"{s['layers']} layer(s), {s['payload_bytes'] / MIB:.1f} MiB; line-rate bound "
        f"{s['floor_s']} s (one copy at the nominal rate)"
    )
    b = s["base"][:5]
    egress = "origin ×" if "wan" in s else "egress ×"
    cache_x = "cache ×" if "wan" in s else ""
    print(f"{'arm':<20} {'time s':>8} {egress:>9} {cache_x:>8} {'cache CPU s':>12} "
          f"{'hosts CPU s':>12} {'t/' + b:>8} {'e/' + b:>8}   rounds (s)")  # fmt: skip
    for arm, a in s["arms"].items():
        cx = a.get("median_cache_egress_x")
        print(
            f"{arm:<20} {a['median_wall_s']:>8.2f} {a['median_egress_x']:>9.3f} "
            f"{'' if cx is None else f'{cx:.3f}':>8} "
            f"{a['median_cpu_s']:>12.2f} {a['median_hosts_cpu_s']:>12.2f} "
            f"{a.get('time_vs_base', '-'):>8} "
            f"{a.get('egress_vs_base', '-'):>8}   {a['wall_s']}"
        )
    for arm, why in s["skipped"].items():
        print(f"{arm:<20} skipped: {why}")


def rate_bps(rate: str) -> int:
    from tests.support.lan import rate_bps as parse

    return parse(rate)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--hosts", type=int, default=8, help="client hosts (default 8)")
    p.add_argument("--rate", help="every link, each way (default 200mbit; --wan: 1gbit)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per arm (default 3)")
    p.add_argument("--size-mib", type=int, default=256, help="the one layer's MiB (default 256)")
    p.add_argument("--image", action="store_true", help="a 4 × 64 MiB image instead")
    p.add_argument(
        "--arms",
        help=f"comma-separated: {','.join(ARMS)} (default), or with "
        f"--wan {','.join(WAN_ARMS)} (default)",
    )
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/fetchd-lan-bench"),
                   help="images (kept for the next run), stores, logs")  # fmt: skip
    p.add_argument(
        "--wan",
        action="store_true",
        help="item 8: origin behind --wan-rate, cache + clients at --rate (1gbit)",
    )
    p.add_argument("--wan-rate", default="100mbit", help="the origin's link (default 100mbit)")
    p.add_argument(
        "--upstream-blobs",
        type=int,
        default=1,
        metavar="N",
        help="--wan: `fetchd serve --upstream-blobs N` (default 1, as serve; 0: all at once)",
    )
    p.add_argument("--json", action="store_true", help="also print a JSON summary line")
    args = p.parse_args(argv)
    known = WAN_ARMS if args.wan else ARMS
    args.rate = args.rate or ("1gbit" if args.wan else "200mbit")
    args.arm_list = [a for a in (args.arms or ",".join(known)).split(",") if a]
    bad = [a for a in args.arm_list if a not in known]
    if bad:
        p.error(f"unknown arms {bad} (known: {', '.join(known)})")
    if args.hosts < 1 or args.rounds < 1 or args.size_mib < 1:
        p.error("--hosts, --rounds and --size-mib must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like ^C: the rig's teardown runs (namespaces deleted, PIDs stopped)
    signal.signal(signal.SIGTERM, lambda _n, _f: sys.exit(143))
    why = unavailable()
    missing = [t for t in ("docker-registry", "skopeo", "curl", "aria2c", "opentracker",
                           "mktorrent") if shutil.which(t) is None]  # fmt: skip
    if why or missing:
        print(f"error: {why or 'missing tools: ' + ', '.join(missing)}", file=sys.stderr)
        return 1
    compile_fetchd(REPO)
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    os.chmod(work, 0o755)
    layers, mib = (4, 64) if args.image else (1, args.size_mib)
    print(f"building/reading the {layers} × {mib} MiB image under {work}/images", flush=True)
    layout = work / "images" / f"{layers}x{mib}"
    image = build(work, layers, mib)
    print(f"load average before: {os.getloadavg()}", flush=True)
    runs: list[Run] = []
    hosts = args.hosts + 1 if args.wan else args.hosts
    with Lan(hosts, args.rate, cache_uplink=args.wan_rate if args.wan else None) as lan:
        if args.wan:
            rig = wan_setup(lan, work, layout, image)
            rig.upstream_blobs = args.upstream_blobs
        else:
            rig = setup(lan, work, layout, image, args.rate)
        arms = list(args.arm_list)
        for arm in [a for a in arms if a.startswith("fetchd-torrent") or a == "fetchd"]:
            if args.wan and arm == "fetchd":
                continue
            skip = fetchd_torrent_missing(rig) if not args.wan else None
            if skip:
                rig.skips[arm] = skip
                arms.remove(arm)
                print(f"arm {arm}: skipped — {skip}", flush=True)
        for r in range(1, args.rounds + 1):
            k = (r - 1) % len(arms) if arms else 0
            for arm in arms[k:] + arms[:k]:
                run = wan_arm(rig, arm, r) if args.wan else ARM_FUNCS[arm](rig, r)
                runs.append(run)
                print(
                    f"round {r}  {arm:<20} {run.wall:7.2f} s  "
                    f"{'origin' if args.wan else 'egress'} {run.egress / rig.payload:6.3f}×"
                    f"  cache cpu {run.cpu:6.2f} s  hosts cpu {run.hosts_cpu:6.2f} s"
                    f"  (verify {run.verify_s:.1f} s, "
                    f"load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
        s = summary(runs, rig, args, "direct" if args.wan else "aria2")
        if args.wan:
            s["wan"] = args.wan_rate
            s["floor_s"] = round(rig.payload * 8 / rate_bps(args.wan_rate), 2)
    print(f"load average after: {os.getloadavg()}")
    shutil.rmtree(work / "hosts", ignore_errors=True)
    report(s)
    if args.json:
        print(json.dumps(s))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
