"""The soak test (issue 9): kill -9 at random moments across pulls from three sources while
`fetchd gc` runs in a loop against the same store, then check that nothing was lost or
corrupted and that every pull finally comes out right.

    make soak                                   # 20 kills, a random seed (printed)
    .venv/bin/python tests/soak.py --kills 20 --seed N   # the same plan again

Not collected by pytest (the name has no test_ prefix): it takes minutes.

The three sources, each a real peer on 127.0.0.1:

  a  docker://REGISTRY/soak/a:1 from docker-registry (3 layers, 240 MiB; the 128 MiB one
     comes over parallel ranges, the others one stream each);
  b  https://NGINX/big.bin --digest sha256:… from nginx over TLS (192 MiB, ranges);
  c  docker://REGISTRY/soak/c:1 through `fetchd serve` as `--mirror … --mirror-only`
     (2 layers, 128 MiB). The server has its own store; between the client and the server
     sits a byte-counting TCP relay of this script, so that the server can be killed and
     restarted on another port while clients keep one URL.

Each round starts one pull (the plan, drawn from the seed, says which), waits a random
delay between the interpreter's start-up time and that source's unkilled duration (both
measured first, the pulls into throwaway stores), and kills it with SIGKILL; a few
rounds kill the `fetchd serve` process instead (and restart it) while a pull of c runs
through it (its store wiped first, if it holds c, so that the kill lands while it
fetches from the registry). A pull that finishes before its kill counts no kill: the
round is repeated. A finished image is checked (name and blobs present), then removed
with `fetchd rm`, and the gc loop must reclaim its blobs before the next round of that
source starts it again from nothing. After the kills each source is pulled to completion
once; then `fetchd fsck` must pass on both stores, every blob must hash to its name,
every name must point at the digest the image was built with, and nothing but resumable
ingests may be left over.

Bytes re-sent come from the peers' own logs (the registry's and nginx's access logs) and
the relay's count: what each source wrote into its sockets, against the least it had to
send (the blob bytes of each time a source was pulled from nothing). A killed connection
counts what was in flight in the socket buffers too (up to a few MiB per connection).

Exit status 0 only if every check held: no blob corrupt or lost, every pull that ended by
itself right (a pull through a server killed under it may instead fail with one `error:`
line), no "internal error" or traceback from fetchd pull or gc, no debris. Findings are
printed with the seed, the round and the stderr of the process concerned; tracebacks in
fetchd serve's log are reported as warnings. Either way the work directory is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

if __package__ in (None, ""):  # run as a script: tests/soak.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support.cli import Fetchd
from tests.support.images import (
    BuiltImage,
    build_image,
    push,
    random_layer,
)
from tests.support.nginx import Nginx, make_file, start_nginx
from tests.support.registry import Registry, start_registry
from tests.support.serve import ServeProcess, start_serve
from tests.support.tls import make_ca

MIB = 1 << 20
TIME_LIMIT = 900.0  # the whole run, seconds (it takes ~5 minutes on 2 cores)
PULL_TIMEOUT = 300.0  # one pull that is not killed
SERVE_KILL_WAIT = 180.0  # the client pull after its server was killed
RECLAIM_TIMEOUT = 60.0  # the gc loop removing an image's blobs after rm
GC_PAUSE = 0.5
GC_MAX_RUNS = 2000
GC_TIMEOUT = 120.0
HTTP = ("--insecure-options", "http")
HEX64 = re.compile(r"[a-f0-9]{64}")
RELAY_CHUNK = 256 * 1024


def log(msg: str) -> None:
    print(msg, flush=True)


def mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB"


# --- the byte-counting relay in front of fetchd serve -------------------------------------


class Relay:
    """A TCP relay on 127.0.0.1 to whichever port `target_port` names now, counting the
    bytes it carries back to clients. It runs its own event loop on a thread."""

    def __init__(self) -> None:
        self.target_port = 0
        self.bytes_down = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()  # the server is down: the client sees the connection end
            return

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, downstream: bool
        ) -> None:
            try:
                while data := await src.read(RELAY_CHUNK):
                    if downstream:
                        self.bytes_down += len(data)
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))

    def stop(self) -> None:
        if not self._thread.is_alive():
            return

        async def close() -> None:
            if self._server is not None:
                self._server.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


# --- gc in a loop --------------------------------------------------------------------------


@dataclass
class GcRun:
    returncode: int
    stdout: str
    stderr: str


class GcLoop:
    """`fetchd gc` against the client store, again and again (bounded in count and time)."""

    def __init__(self, client: Fetchd, deadline: float) -> None:
        self.client = client
        self.deadline = deadline
        self.runs: list[GcRun] = []
        self._stop = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while (
            not self._stop.is_set()
            and len(self.runs) < GC_MAX_RUNS
            and time.monotonic() < self.deadline
        ):
            self._proc = subprocess.Popen(
                self.client.argv("gc"),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=self.client.env(),
            )
            try:
                out, err = self._proc.communicate(timeout=GC_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                out, err = self._proc.communicate()
                err += f"\n(soak: gc did not finish within {GC_TIMEOUT} s and was killed)"
            self.runs.append(GcRun(self._proc.returncode, out, err))
            self._stop.wait(GC_PAUSE)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(GC_TIMEOUT + 10)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)

    @property
    def removed_blobs(self) -> int:
        total = 0
        for run in self.runs:
            match = re.search(r"removed (\d+) blobs", run.stdout)
            total += int(match.group(1)) if match else 0
        return total


# --- the three sources ----------------------------------------------------------------------


@dataclass
class Source:
    key: str  # a, b, c
    what: str
    args: tuple[str, ...]  # fetchd pull arguments
    name: str  # what the store calls it (index.json name, or the URL)
    top_digest: str  # what `fetchd pull` must print
    blobs: dict[str, int]  # every digest the store must hold for it -> size
    fetched_blobs: dict[str, int]  # those a source sends as blobs (config and layers)
    env: dict[str, str] = field(default_factory=dict)
    calibrated: float = 0.0  # seconds of an unkilled pull from nothing
    complete: bool = False  # the client store holds it, named
    in_progress: bool = False  # a generation started and not yet removed
    generations: int = 0  # times a pull of it started from nothing
    kept: set[str] = field(default_factory=set)  # blobs committed when its pull was killed
    dropped: int = 0  # bytes of those the store no longer held when the next pull began

    @property
    def size(self) -> int:
        return sum(self.fetched_blobs.values())


def image_source(
    key: str, what: str, args: tuple[str, ...], name: str, built: BuiltImage
) -> Source:
    fetched = {built.config.digest: built.config.size}
    fetched.update({layer.digest: layer.size for layer in built.layers})
    blobs = {built.manifest.digest: built.manifest.size, **fetched}
    return Source(key, what, args, name, built.digest, blobs, fetched)


@dataclass
class PullResult:
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    err_path: Path


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.kills = args.kills
        self.serve_kills = min(args.serve_kills, args.kills)
        self.seed = args.seed
        self.rng = random.Random(self.seed)
        self.started = time.monotonic()
        self.deadline = self.started + args.time_limit
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="fetchd-soak-", dir="/tmp"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.keep = args.keep
        self.findings: list[str] = []  # each one fails the run
        self.warnings: list[str] = []  # reported, not failing
        self.wrong_pulls = 0  # pulls that ended by themselves and were not right
        self.kills_done = 0
        self.startup = 0.0  # seconds from exec to fetchd's first work
        self.pulls = 0
        self.registry: Registry | None = None
        self.nginx: Nginx | None = None
        self.serve: ServeProcess | None = None
        self.serve_store = self.work / "serve-store"
        self.serve_restarts = 0
        self.serve_wipes = 0
        self.relay = Relay()
        self.client = Fetchd(self.work / "store", self.work / "home")
        (self.work / "home").mkdir(exist_ok=True)
        (self.work / "pulls").mkdir(exist_ok=True)
        self.gc: GcLoop | None = None
        self.current: subprocess.Popen[str] | None = None
        self.sources: dict[str, Source] = {}
        self.baseline_registry = 0
        self.baseline_nginx = 0
        self.kill_log: list[str] = []

    # --- helpers -------------------------------------------------------------------------

    def finding(self, msg: str) -> None:
        self.findings.append(msg)
        log(f"  FINDING: {msg}")

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def start_pull(
        self, fetchd: Fetchd, src: Source, tag: str
    ) -> tuple[subprocess.Popen[str], Path, Path, TextIO, TextIO]:
        self.pulls += 1
        out_path = self.work / "pulls" / f"{self.pulls:03d}-{src.key}-{tag}.out"
        err_path = out_path.with_suffix(".err")
        out, err = out_path.open("w"), err_path.open("w")
        proc = subprocess.Popen(
            fetchd.argv("pull", *src.args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            text=True,
            env=fetchd.env(src.env),
        )
        return proc, out_path, err_path, out, err

    def pull(
        self, fetchd: Fetchd, src: Source, tag: str, timeout: float = PULL_TIMEOUT
    ) -> PullResult:
        """One pull left to run to its end (bounded)."""
        started = time.monotonic()
        proc, out_path, err_path, out, err = self.start_pull(fetchd, src, tag)
        self.current = proc
        try:
            proc.wait(min(timeout, max(self.left(), 1.0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            self.finding(f"{src.key}: a pull did not finish within {timeout:.0f} s ({err_path})")
        finally:
            self.current = None
            out.close()
            err.close()
        return PullResult(
            proc.returncode,
            out_path.read_text(),
            err_path.read_text(),
            time.monotonic() - started,
            err_path,
        )

    def start_serve(self) -> None:
        self.serve = start_serve(self.serve_store, [self.registry_().url])
        self.relay.target_port = self.serve.port

    def registry_(self) -> Registry:
        assert self.registry is not None
        return self.registry

    def nginx_(self) -> Nginx:
        assert self.nginx is not None
        return self.nginx

    def present(self, store: Path, digest: str) -> bool:
        alg, hexdigest = digest.split(":")
        return (store / "layout" / "blobs" / alg / hexdigest).is_file()

    def index_names(self, store: Path) -> dict[str, str]:
        try:
            index = json.loads((store / "layout" / "index.json").read_text())
        except FileNotFoundError:
            return {}
        names = {}
        for m in index.get("manifests", []):
            name = m.get("annotations", {}).get("org.opencontainers.image.ref.name")
            if name:
                names[name] = m.get("annotations", {}).get("io.fetchd.index.digest", m["digest"])
        return names

    def url_names(self) -> dict[str, str]:
        result = subprocess.run(
            self.client.argv("images", "--json"),
            capture_output=True,
            text=True,
            env=self.client.env(),
            timeout=60,
        )
        if result.returncode != 0:
            self.finding(f"fetchd images --json failed: {result.stderr.strip()}")
            return {}
        return {i["name"]: i["digest"] for i in json.loads(result.stdout)}

    def check_named(self, src: Source, when: str) -> bool:
        """The client store names src with its digest and holds all its blobs."""
        store = self.client.store
        named = self.url_names() if src.key == "b" else self.index_names(store)
        ok = True
        if named.get(src.name) != src.top_digest:
            self.finding(
                f"{src.key} {when}: {src.name} names {named.get(src.name)}, not {src.top_digest}"
            )
            ok = False
        lost = [d for d in src.blobs if not self.present(store, d)]
        if lost:
            self.finding(f"{src.key} {when}: lost blobs of a named image: {', '.join(lost)}")
            ok = False
        return ok

    def judge_stderr(self, src: Source, res: PullResult, when: str) -> None:
        if "internal error" in res.stderr or "Traceback" in res.stderr:
            tail = " | ".join(res.stderr.strip().splitlines()[-3:])
            self.finding(f"{src.key} {when}: {tail} ({res.err_path})")

    def finished_pull(self, src: Source, res: PullResult, when: str) -> bool:
        """Judge a pull that ended by itself; True if it completed right."""
        self.judge_stderr(src, res, when)
        if res.returncode != 0:
            self.wrong_pulls += 1
            last = (res.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            self.finding(f"{src.key} {when}: exit {res.returncode}: {last} ({res.err_path})")
            return False
        printed = res.stdout.strip()
        if printed != src.top_digest:
            self.wrong_pulls += 1
            self.finding(f"{src.key} {when}: printed {printed!r}, want {src.top_digest}")
            return False
        src.complete = self.check_named(src, when)
        if not src.complete:
            self.wrong_pulls += 1
        return src.complete

    def restart_from_nothing(self, src: Source, when: str) -> None:
        """rm the finished src and wait until the gc loop has reclaimed its blobs."""
        result = subprocess.run(
            self.client.argv("rm", src.name),
            capture_output=True,
            text=True,
            env=self.client.env(),
            timeout=60,
        )
        if result.returncode != 0:
            self.finding(f"{src.key} {when}: fetchd rm failed: {result.stderr.strip()}")
        src.complete = src.in_progress = False
        deadline = time.monotonic() + min(RECLAIM_TIMEOUT, max(self.left(), 1.0))
        while any(self.present(self.client.store, d) for d in src.blobs):
            if time.monotonic() > deadline:
                left = [d for d in src.blobs if self.present(self.client.store, d)]
                self.finding(
                    f"{src.key} {when}: gc did not reclaim {len(left)} blobs of a removed"
                    f" name within {RECLAIM_TIMEOUT:.0f} s"
                )
                break
            time.sleep(0.1)

    # --- phases --------------------------------------------------------------------------

    def setup(self) -> None:
        log(
            f"soak: seed {self.seed}, {self.kills} kills ({self.serve_kills} of fetchd serve),"
            f" work dir {self.work}"
        )
        ca = make_ca(self.work / "ca")
        tls = ca.issue_server(self.work / "tls")
        self.registry = start_registry(self.work / "registry")
        layout = self.work / "images" / "layout"
        built_a = build_image(
            layout,
            "a",
            [
                random_layer(128 * MIB, 901),
                random_layer(64 * MIB, 902),
                random_layer(48 * MIB, 903),
            ],
            config={"Cmd": ["/bin/true"]},
        )
        built_c = build_image(
            layout,
            "c",
            [random_layer(96 * MIB, 911), random_layer(32 * MIB, 912)],
            config={"Cmd": ["/bin/true"]},
        )
        host = self.registry.host
        push(layout, "a", f"{host}/soak/a:1")
        push(layout, "c", f"{host}/soak/c:1")
        shutil.rmtree(self.work / "images")  # the registry has them now
        www = self.work / "www"
        www.mkdir()
        digest_b = make_file(www / "big.bin", 192 * MIB, seed=921)
        self.nginx = start_nginx(self.work / "nginx", www, tls=tls)
        self.relay.start()
        self.start_serve()
        url = f"{self.nginx.https_url}/big.bin"
        size_b = (www / "big.bin").stat().st_size
        self.sources = {
            "a": image_source(
                "a", "registry", (*HTTP, f"docker://{host}/soak/a:1"), f"{host}/soak/a:1", built_a
            ),
            "b": Source(
                "b",
                "URL",
                ("--digest", digest_b, url),
                url,
                digest_b,
                {digest_b: size_b},
                {digest_b: size_b},
                env={"SSL_CERT_FILE": str(ca.ca_path)},
            ),
            "c": image_source(
                "c",
                "mirror",
                (*HTTP, "--mirror", self.relay.url, "--mirror-only", f"docker://{host}/soak/c:1"),
                f"{host}/soak/c:1",
                built_c,
            ),
        }
        for src in self.sources.values():
            log(f"  {src.key}: {src.what} {src.name} ({mib(src.size)}, {len(src.blobs)} blobs)")

    def calibrate(self) -> None:
        """Time one unkilled pull of each source from nothing, into throwaway stores (c
        through a throwaway server of its own, so the soak's server starts cold)."""
        cal = Fetchd(self.work / "cal-store", self.work / "home")
        started = time.monotonic()
        subprocess.run(cal.argv("images"), capture_output=True, env=cal.env(), timeout=60)
        self.startup = time.monotonic() - started
        log(f"  calibrated start-up: {self.startup:.2f} s (fetchd images)")
        cal_serve = start_serve(self.work / "cal-serve-store", [self.registry_().url])
        relay_port = self.relay.target_port
        try:
            self.relay.target_port = cal_serve.port
            for src in self.sources.values():
                res = self.pull(cal, src, "calibrate")
                if res.returncode != 0 or res.stdout.strip() != src.top_digest:
                    raise SystemExit(
                        f"soak: the calibration pull of {src.key} failed ({res.returncode}):"
                        f"\n{res.stderr}"
                    )
                src.calibrated = res.seconds
                log(f"  calibrated {src.key}: {res.seconds:.2f} s unkilled")
        finally:
            cal_serve.stop()
            self.relay.target_port = relay_port
        shutil.rmtree(self.work / "cal-store")
        shutil.rmtree(self.work / "cal-serve-store")
        self.baseline_registry = len(self.registry_().blob_gets())
        self.nginx_().wait_idle()
        self.baseline_nginx = len(self.nginx_().requests("/big.bin"))
        self.relay.bytes_down = 0

    def plan(self) -> list[str]:
        targets = ["serve"] * self.serve_kills + [
            self.rng.choice("abc") for _ in range(self.kills - self.serve_kills)
        ]
        self.rng.shuffle(targets)
        return targets

    def kill_rounds(self) -> None:
        plan = self.plan()
        log(f"  plan: {' '.join(plan)}")
        done = 0
        rounds = 0
        max_rounds = 4 * self.kills + 10
        while done < len(plan) and rounds < max_rounds and self.left() > 120:
            rounds += 1
            target = plan[done]
            src = self.sources["c" if target == "serve" else target]
            when = f"round {rounds} (kill {done + 1}/{len(plan)}, seed {self.seed})"
            if src.complete:
                self.check_named(src, f"{when}, before rm")
                self.restart_from_nothing(src, when)
            self.begin(src)
            if target == "serve":
                self.cold_serve()
            delay = self.rng.uniform(self.startup, src.calibrated)
            started = time.monotonic()
            proc, out_path, err_path, out, err = self.start_pull(self.client, src, f"r{rounds}")
            self.current = proc
            try:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(delay)
                if proc.poll() is not None:
                    out.close()
                    err.close()
                    res = PullResult(
                        proc.returncode,
                        out_path.read_text(),
                        err_path.read_text(),
                        time.monotonic() - started,
                        err_path,
                    )
                    state = "finished" if self.finished_pull(src, res, when) else "FAILED"
                    log(
                        f"  round {rounds}: {src.key} {state} after {res.seconds:.2f} s,"
                        f" before its kill at {delay:.2f} s"
                    )
                    continue
                if target == "serve":
                    label = f"kill {done + 1}/{len(plan)}"
                    self.kill_serve(src, proc, delay, when, label, out_path, err_path, started)
                else:
                    proc.kill()
                    proc.wait(30)
                    self.note_kill(src)
                    log(
                        f"  kill {done + 1}/{len(plan)}: {src.key} pull at {delay:.2f} s"
                        f" (unkilled {src.calibrated:.2f} s); {mib(self.on_disk(src))}"
                        f" of {mib(src.size)} on disk"
                    )
                    self.judge_stderr(
                        src,
                        PullResult(-9, "", err_path.read_text(), delay, err_path),
                        when,
                    )
                self.kill_log.append(f"{target}@{delay:.2f}")
                done += 1
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(30)
                self.current = None
                out.close()
                err.close()
        if done < len(plan):
            self.finding(f"only {done} of {len(plan)} kills landed in {rounds} rounds")
        self.kills_done = done

    def on_disk(self, src: Source) -> int:
        """Bytes of src the client store holds: committed blobs and partial ingests."""
        total = 0
        for digest, size in src.fetched_blobs.items():
            alg, hexdigest = digest.split(":")
            if self.present(self.client.store, digest):
                total += size
                continue
            ingest = self.client.store / "ingest" / f"{alg}-{hexdigest}"
            try:
                ranges = json.loads((ingest / "state.json").read_text())["ranges"]
                total += sum(end - start for start, end in ranges)
                continue
            except (OSError, ValueError, KeyError, TypeError):
                pass
            with contextlib.suppress(OSError):
                total += (ingest / "data").stat().st_size
        return total

    def begin(self, src: Source) -> None:
        """Count a new generation when src starts from nothing (its first pull, or the
        first after its rm was reclaimed); kills in between resume the same one. Notes
        what a killed pull had committed and the store lost since (gc took it)."""
        if not src.in_progress and not src.complete:
            src.generations += 1
            src.in_progress = True
        gone = sorted(d for d in src.kept if not self.present(self.client.store, d))
        if gone:
            size = sum(src.fetched_blobs[d] for d in gone)
            src.dropped += size
            log(
                f"    {src.key}: {len(gone)} blobs ({mib(size)}) the killed pull had committed"
                " are gone before the next pull"
            )
        src.kept = set()

    def note_kill(self, src: Source) -> None:
        src.kept = {d for d in src.fetched_blobs if self.present(self.client.store, d)}

    def kill_serve(
        self,
        src: Source,
        proc: subprocess.Popen[str],
        delay: float,
        when: str,
        label: str,
        out_path: Path,
        err_path: Path,
        started: float,
    ) -> None:
        serve = self.serve
        assert serve is not None
        os.kill(serve.proc.pid, signal.SIGKILL)
        serve.stop()
        log(
            f"  {label}: fetchd serve (pid {serve.proc.pid}) at {delay:.2f} s into a pull"
            f" of c ({mib(self.on_disk(src))} of {mib(src.size)} on disk); restarting it"
        )
        self.judge_serve_log(serve, when)
        self.start_serve()
        self.serve_restarts += 1
        try:
            proc.wait(min(SERVE_KILL_WAIT, max(self.left(), 1.0)))
        except subprocess.TimeoutExpired:
            self.finding(
                f"c {when}: the pull through the killed server did not end within"
                f" {SERVE_KILL_WAIT:.0f} s ({err_path})"
            )
            return
        res = PullResult(
            proc.returncode,
            out_path.read_text(),
            err_path.read_text(),
            time.monotonic() - started,
            err_path,
        )
        self.judge_stderr(src, res, when)
        if res.returncode == 0:
            ok = self.finished_pull(src, res, f"{when}, after the server's kill")
            log(
                f"    the pull of c went on through the restarted server: "
                f"{'right' if ok else 'WRONG'} after {res.seconds:.2f} s"
            )
        else:
            last = (res.stderr.strip().splitlines() or ["(no stderr)"])[-1]
            self.note_kill(src)
            log(f"    the pull of c failed (exit {res.returncode}): {last}")
            if not last.startswith("error: "):
                self.finding(f"c {when}: no one-line error after the server's kill ({err_path})")

    def cold_serve(self) -> None:
        """Before a round that kills the server: if its store holds c whole, stop it, wipe
        its store (a cache may be wiped) and start it again, so that the kill lands while
        it fetches from the upstream, not only while it sends what it has."""
        if not all(self.present(self.serve_store, d) for d in self.sources["c"].fetched_blobs):
            return
        assert self.serve is not None
        self.serve.stop()
        self.judge_serve_log(self.serve, "before a wipe")
        shutil.rmtree(self.serve_store)
        self.serve_wipes += 1
        self.start_serve()

    def judge_serve_log(self, serve: ServeProcess, when: str) -> None:
        """A traceback in the server's log is a warning: it is what a killed client costs
        the log, not a verdict on the store (the pulls and the checks give that)."""
        text = serve.log_path.read_text(errors="replace")
        if "Traceback" in text or "internal error" in text.lower():
            errors = sorted(set(re.findall(r"^(\w[\w.]*(?:Error|Exception)): ", text, re.M)))
            msg = (
                f"fetchd serve {when}: {text.count('Traceback')} tracebacks in its log"
                f" ({', '.join(errors) or '?'}; {serve.log_path})"
            )
            self.warnings.append(msg)
            log(f"  WARNING: {msg}")

    def final_pulls(self) -> None:
        for src in self.sources.values():
            self.begin(src)
            res = self.pull(self.client, src, "final")
            ok = self.finished_pull(src, res, "final pull")
            log(f"  final pull of {src.key}: {'right' if ok else 'WRONG'} in {res.seconds:.2f} s")

    def final_checks(self) -> tuple[int, int]:
        """fsck both stores, hash every blob, look for debris. Returns (corrupt, lost)."""
        corrupt = lost = 0
        for label, store in (("client", self.client.store), ("server", self.serve_store)):
            result = subprocess.run(
                Fetchd(store, self.client.home).argv("fsck"),
                capture_output=True,
                text=True,
                env=self.client.env(),
                timeout=300,
            )
            for line in result.stdout.splitlines():
                if line.startswith("corrupt:"):
                    corrupt += 1
                    self.finding(f"fsck of the {label} store: {line}")
                elif line.startswith("missing:"):
                    lost += 1
                    self.finding(f"fsck of the {label} store: {line}")
            if result.returncode != 0 or not result.stdout.rstrip().endswith(": ok"):
                self.finding(
                    f"fsck of the {label} store: exit {result.returncode}:"
                    f" {result.stdout.strip()} {result.stderr.strip()}"
                )
            quarantine = store / "quarantine"
            if quarantine.is_dir() and any(quarantine.iterdir()):
                names = sorted(p.name for p in quarantine.iterdir())
                self.finding(f"the {label} store's quarantine holds {names}")
            c, debris = self.hash_blobs(store)
            corrupt += c
            debris += self.debris(store)
            for d in debris:
                self.finding(f"debris in the {label} store: {d}")
        names = self.index_names(self.client.store)
        urls = self.url_names()
        for src in self.sources.values():
            named = urls if src.key == "b" else names
            if named.get(src.name) != src.top_digest:
                lost += 1
                self.finding(f"{src.key}: {src.name} names {named.get(src.name)} at the end")
            for digest in src.blobs:
                if not self.present(self.client.store, digest):
                    lost += 1
                    self.finding(f"{src.key}: blob {digest} lost at the end")
        for digest in self.sources["c"].blobs:
            if not self.present(self.serve_store, digest):
                lost += 1
                self.finding(f"c: blob {digest} not in the server's store at the end")
        return corrupt, lost

    def hash_blobs(self, store: Path) -> tuple[int, list[str]]:
        corrupt = 0
        debris = []
        root = store / "layout" / "blobs"
        for alg_dir in sorted(root.iterdir()) if root.is_dir() else []:
            for path in sorted(alg_dir.iterdir()):
                if alg_dir.name != "sha256" or not HEX64.fullmatch(path.name):
                    debris.append(str(path.relative_to(store)))
                    continue
                h = hashlib.sha256()
                with path.open("rb") as f:
                    while chunk := f.read(4 * MIB):
                        h.update(chunk)
                if h.hexdigest() != path.name:
                    corrupt += 1
                    self.finding(f"{path}: its bytes hash to sha256:{h.hexdigest()}")
        return corrupt, debris

    def debris(self, store: Path) -> list[str]:
        """What a finished store should not hold after a last gc: temporary files, leases
        (no process is left), ingests of blobs that are committed (a partial ingest of a
        blob not in the store is resumable)."""
        found = []
        for path in store.rglob("*"):
            rel = path.relative_to(store)
            if rel.parts[0] in ("quarantine",):
                continue
            if path.name.endswith((".tmp", ".partial")) or ".partial-" in path.name:
                found.append(str(rel))
            elif rel.parts[0] == "leases" and len(rel.parts) > 1:
                found.append(f"{rel}: a lease with no process left to hold it")
        ingests = store / "ingest"
        for d in sorted(ingests.iterdir()) if ingests.is_dir() else []:
            alg, _, hexdigest = d.name.partition("-")
            if alg in ("sha256", "sha512") and self.present(store, f"{alg}:{hexdigest}"):
                contents = sorted(p.name for p in d.iterdir())
                found.append(f"ingest/{d.name} {contents} of a committed blob")
            elif alg == "url":
                found.append(f"ingest/{d.name}: a URL ingest (every URL here has --digest)")
        return found

    def started_over(self) -> dict[str, int]:
        """Per source, how many soak pulls (calibration aside) logged that they discarded
        a partial download and started over."""
        counts: dict[str, int] = {}
        for path in sorted((self.work / "pulls").glob("*.err")):
            key = path.name.split("-")[1]
            if "calibrate" not in path.name and "starting over" in path.read_text():
                counts[key] = counts.get(key, 0) + 1
        return counts

    def bytes_report(self) -> list[tuple[str, int, int, str]]:
        """(source, bytes it sent, the least it had to send, how that least is made up)."""
        self.nginx_().wait_idle()
        registry_lines = self.registry_().blob_gets()[self.baseline_registry :]
        nginx_lines = self.nginx_().requests("/big.bin")[self.baseline_nginx :]
        a, b, c = self.sources["a"], self.sources["b"], self.sources["c"]
        wanted = set(a.fetched_blobs) | set(c.fetched_blobs)
        registry_sent = sum(line.bytes for line in registry_lines if line.blob_digest in wanted)
        # The server's store is never collected: it needs c from the registry once, and
        # again after each wipe (see cold_serve).
        return [
            (
                "registry",
                registry_sent,
                a.generations * a.size + (1 + self.serve_wipes) * c.size,
                f"a {a.generations}×, c {1 + self.serve_wipes}× to fetchd serve",
            ),
            (
                "nginx",
                sum(line.body_bytes for line in nginx_lines),
                b.generations * b.size,
                f"b {b.generations}×",
            ),
            (
                "mirror",
                self.relay.bytes_down,
                c.generations * c.size,
                f"c {c.generations}×; HTTP headers and manifests included",
            ),
        ]

    # --- the whole run -------------------------------------------------------------------

    def run(self) -> int:
        try:
            self.setup()
            self.calibrate()
            self.gc = GcLoop(self.client, self.deadline)
            self.gc.start()
            self.kill_rounds()
            self.final_pulls()
            self.gc.stop()
            gc_runs = self.gc.runs
            for i, run in enumerate(gc_runs):
                if run.returncode != 0 or "Traceback" in run.stderr:
                    self.finding(f"gc run {i + 1}: exit {run.returncode}: {run.stderr.strip()}")
            if self.serve is not None:
                self.judge_serve_log(self.serve, "at the end")
                self.serve.stop()
            # One more gc with no other process left: whatever the killed ones left that
            # gc is meant to clear (dead leases) must be gone; the rest is judged below.
            last = subprocess.run(
                self.client.argv("gc"),
                capture_output=True,
                text=True,
                env=self.client.env(),
                timeout=GC_TIMEOUT,
            )
            if last.returncode != 0:
                self.finding(f"the last gc: exit {last.returncode}: {last.stderr.strip()}")
            corrupt, lost = self.final_checks()
            resent = self.bytes_report()
            for label, sent, least, note in resent:
                log(
                    f"{label}: sent {mib(sent)} for {mib(least)} of blobs ({note});"
                    f" re-sent {mib(sent - least)} over {self.kills_done} kills"
                )
            over = self.started_over()
            if over:
                log(
                    "resumes that threw their partial data away ('starting over'): "
                    + ", ".join(f"{key} {n}×" for key, n in sorted(over.items()))
                )
            dropped = ", ".join(
                f"{s.key} {mib(s.dropped)}" for s in self.sources.values() if s.dropped
            )
            if dropped:
                log(
                    "fetched again because gc removed blobs a killed pull had committed but"
                    f" not yet named: {dropped}"
                )
            log(
                f"gc: {len(gc_runs)} runs removed {self.gc.removed_blobs} blobs;"
                f" {self.pulls} pulls; fetchd serve killed and restarted {self.serve_restarts}×;"
                f" {time.monotonic() - self.started:.0f} s"
            )
            if self.warnings:
                log(f"soak: {len(self.warnings)} warnings (seed {self.seed}):")
                for w in self.warnings:
                    log(f"  - {w}")
            if self.findings:
                log(f"soak: FAILED with {len(self.findings)} findings (seed {self.seed}):")
                for f in self.findings:
                    log(f"  - {f}")
            right = (
                "every pull right" if not self.wrong_pulls else f"{self.wrong_pulls} pulls wrong"
            )
            resent_text = ", ".join(
                f"{label} {mib(sent - least)}" for label, sent, least, _ in resent
            )
            log(
                f"soak: {self.kills_done} kills, {corrupt} corrupt, {lost} lost, {right};"
                f" re-sent {resent_text}"
            )
            return 0 if not self.findings and self.kills_done == self.kills else 1
        except BaseException:
            self.keep = True  # for whoever looks into it
            raise
        finally:
            self.teardown()

    def teardown(self) -> None:
        if self.current is not None and self.current.poll() is None:
            self.current.kill()
            self.current.wait(10)
        if self.gc is not None:
            self.gc.stop()
        for stop in (
            self.serve.stop if self.serve else None,
            self.relay.stop,
            self.nginx.stop if self.nginx else None,
            self.registry.stop if self.registry else None,
        ):
            if stop is not None:
                with contextlib.suppress(Exception):
                    stop()
        if self.findings or self.warnings or self.keep:
            log(f"soak: the work directory is kept: {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs in all (default 20)")
    parser.add_argument(
        "--serve-kills", type=int, default=3, help="of which of fetchd serve (default 3)"
    )
    parser.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    parser.add_argument("--time-limit", type=float, default=TIME_LIMIT, help="seconds")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = secrets.randbelow(1 << 32)
    if ":" in str(args.workdir or ""):
        parser.error("--workdir must not contain ':' (skopeo splits oci:PATH:REF at the first)")
    soak = Soak(args)
    try:
        code = soak.run()
    except (OSError, RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
        # A peer that would not start, or fetchd that cannot even start: no verdict.
        log(f"soak: error: could not run: {type(exc).__name__}: {exc}")
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
