"""A big signed ACI by its appc name: fetchd pull vs rkt's fetch done by hand, alternating.

The image: ``actool build --owner-root`` (tests/support/appc.py build_aci) of a rootfs of
busybox-static plus one file of ``--size`` MiB (default 256) from os.urandom, incompressible;
gzip, actool's default. It is signed (detached, armored) with an Ed25519 key made by
``gpg --quick-gen-key`` in a temporary GNUPGHOME, whose gpg-agent is ended with
``gpgconf --kill gpg-agent`` at the end. The site is tests/support/appc.py's AppcSite, used as
it is outside pytest (``start_appc_site``): nginx over TLS on 127.43.0.N:443 with a
throwaway test CA, the discovery page (one ``ac-discovery`` template) at the host's root, the
ACI and its .asc under /images/. The key is trusted once, before the rounds, with
``fetchd trust --trust-dir T --prefix example.com/big --skip-fingerprint-review KEY``.

Per round, each arm into a fresh empty directory, their order alternating every round:

- fetchd: ``python -m fetchd --store DIR -q pull --trust-dir T --resolve example.com:443:ADDR
  example.com/big:1.0.0`` with SSL_CERT_FILE = the CA, timed to its exit. It walks discovery
  (the name's page, a 404, then the root's), fetches and checks the signature, then the ACI,
  which it decompresses and walks as it arrives (the diff_id, the manifest against the name
  and labels, every rootfs entry). It must print a digest and hold the ACI as a blob of its
  sha256 and size (checked outside the timed region).
- anchor: what rkt's fetch did, step by step with real tools, one after the other:
  ``curl`` the .aci.asc, ``curl`` the .aci (``--resolve example.com:443:ADDR --cacert CA``),
  ``sqv --keyring KEY SIG ACI`` (must print the key's fingerprint), and
  ``gzip -dc ACI | sha512sum`` (rkt's image ID; must match the one computed at setup). Its
  time is the sum of the four steps' times; each step's is printed too. The anchor knows
  the URLs and does no discovery (two small GETs in fetchd's arm).

Before the timed rounds each arm runs once, checked but not counted, so the ACI on the
site, the tools and fetchd's modules are in the page cache for everyone; the page cache is
not dropped after that. Between runs the output is deleted and ``sync`` run, outside the
timed region. Wall time is from just before fork to the reaping of the child (a pidfd), CPU
time os.wait4's rusage, peak RSS GNU time's %M (benchmarks/measure.py run_child); for the
anchor the CPU is the steps' sum and the peak RSS the largest step's. A failed run (either
arm) aborts the benchmark. Everything is on 127.0.0.0/8, nginx is stopped by its PID and the
temporary directory under /tmp is removed on every exit path.

    python benchmarks/appc_pull.py [--rounds N] [--size MiB] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so that `python benchmarks/appc_pull.py` finds tests/

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
from tests.support.appc import AppcSite, appc_arch, build_aci, start_appc_site  # noqa: E402
from tests.support.tls import make_ca  # noqa: E402

MIB = 1024 * 1024
PYTHON = REPO / ".venv" / "bin" / "python"
NAME = "example.com/big"
VERSION = "1.0.0"
TEMPLATE = "https://example.com/images/{name}-{version}-{os}-{arch}.{ext}"
UID = "Big Publisher <big@example.com>"
RUN_TIMEOUT = 300.0  # seconds for one run or step; ~1–3 s per 256 MiB here
SETUP_TIMEOUT = 120.0  # gpg and actool at setup
HASH_BUFFER = 8 * MIB
STEPS = ("curl-asc", "curl-aci", "sqv", "sha512")
TOOLS = ("curl", "sqv", "gzip", "sha512sum", "bash", "actool", "gpg", "gpgconf")


@dataclass(frozen=True)
class Run:
    arm: str  # "fetchd" or "anchor"
    round: int  # 0: the warm-up run, not counted
    wall: float  # seconds: the child, or the sum of the anchor's steps
    cpu: float  # user + system seconds (summed over the anchor's steps)
    max_rss_mib: float  # the child's, or the anchor's largest step's
    steps: Mapping[str, float] = field(default_factory=dict)  # the anchor's, by name

    def line(self) -> str:
        split = "  (" + " + ".join(f"{k} {v:.2f}" for k, v in self.steps.items()) + ")"
        return (
            f"round {self.round}  {self.arm:<6}  {self.wall:6.2f} s  cpu {self.cpu:5.2f} s  "
            f"peak RSS {self.max_rss_mib:6.1f} MiB{split if self.steps else ''}"
        )


@dataclass(frozen=True)
class Setup:
    site: AppcSite
    aci_url: str
    trust_dir: Path
    key: Path  # the armored public key
    fingerprint: str  # 40 hex, upper case as sqv prints it
    aci_sha256: str  # hex
    aci_size: int
    image_id: str  # sha512 hex of the uncompressed tar: rkt's image ID
    env: dict[str, str]

    @property
    def resolve(self) -> str:
        return f"example.com:443:{self.site.addr}"


def _file_digest(path: Path, algorithm: str, opener: str = "plain") -> str:
    digest = hashlib.new(algorithm)
    buffer = bytearray(HASH_BUFFER)
    view = memoryview(buffer)
    with gzip.open(path, "rb") if opener == "gzip" else path.open("rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _run_setup(argv: Sequence[str], env: Mapping[str, str]) -> bytes:
    got = subprocess.run(argv, capture_output=True, env=dict(env), timeout=SETUP_TIMEOUT)
    if got.returncode != 0:
        err = got.stderr.decode(errors="replace").strip()
        raise BenchmarkFailed(f"{' '.join(argv[:3])} failed ({got.returncode}): {err}")
    return got.stdout


@contextlib.contextmanager
def gpg_home(workdir: Path, env: Mapping[str, str]) -> Iterator[dict[str, str]]:
    """A temporary GNUPGHOME (the env to run gpg with); its gpg-agent is killed after."""
    home = workdir / "gnupg"
    home.mkdir(mode=0o700)
    gpg_env = {**env, "GNUPGHOME": str(home)}
    try:
        yield gpg_env
    finally:
        subprocess.run(
            ["gpgconf", "--kill", "gpg-agent"], env=gpg_env, capture_output=True, check=False
        )


def make_key(gpg_env: Mapping[str, str], out: Path) -> str:
    """An Ed25519 signing key; its armored public key at out; returns its fingerprint."""
    batch = ["gpg", "--batch", "--passphrase", "", "--pinentry-mode", "loopback"]
    _run_setup([*batch, "--quick-gen-key", UID, "ed25519", "sign", "never"], gpg_env)
    colons = _run_setup(["gpg", "--with-colons", "--list-keys", UID], gpg_env).decode()
    fprs = [line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:")]
    if not fprs:
        raise BenchmarkFailed(f"gpg listed no fingerprint for {UID}")
    out.write_bytes(_run_setup(["gpg", "--armor", "--export", fprs[0]], gpg_env))
    return fprs[0].upper()


def publish(site: AppcSite, workdir: Path, size_mib: int, gpg_env: Mapping[str, str]) -> Path:
    """Build the ACI into the site's /images/, sign it there; the root's discovery page."""
    path = site.root / "images" / f"{NAME}-{VERSION}-linux-{appc_arch()}.aci"
    started = time.perf_counter()
    big = os.urandom(size_mib * MIB)
    try:
        build_aci(workdir, NAME, VERSION, out=path, extra_files={"big.bin": big})
    except RuntimeError as exc:
        raise BenchmarkFailed(str(exc)) from exc
    del big
    batch = ["gpg", "--batch", "--passphrase", "", "--pinentry-mode", "loopback", "--yes"]
    _run_setup([*batch, "--armor", "--detach-sign", "-o", f"{path}.asc", str(path)], gpg_env)
    site.page("/", site.meta(("ac-discovery", "example.com", TEMPLATE)))
    os.sync()  # no writeback of the new files during the first runs
    print(
        f"{path.name}: {path.stat().st_size / MIB:.1f} MiB gzip, rootfs {size_mib} MiB random "
        f"+ busybox (built and signed in {time.perf_counter() - started:.1f} s)"
    )
    return path


def trust(setup: Setup, workdir: Path) -> None:
    argv = [str(PYTHON), "-m", "fetchd", "trust", "--trust-dir", str(setup.trust_dir)]
    argv += ["--prefix", NAME, "--skip-fingerprint-review", str(setup.key)]
    check_exit("fetchd trust", run_child(argv, setup.env, workdir / "trust", RUN_TIMEOUT))


def pull_fetchd(setup: Setup, dest: Path, round_: int) -> Run:
    argv = [str(PYTHON), "-m", "fetchd", "--store", str(dest / "store"), "-q", "pull"]
    argv += ["--trust-dir", str(setup.trust_dir), "--resolve", setup.resolve, f"{NAME}:{VERSION}"]
    dest.mkdir()
    env = {**setup.env, "SSL_CERT_FILE": str(setup.site.ca)}
    exited = run_child(argv, env, dest / "fetchd", RUN_TIMEOUT)
    check_exit("fetchd", exited)
    printed = exited.stdout.split()
    if not printed or not printed[-1].startswith("sha256:"):
        raise BenchmarkFailed(f"fetchd printed {exited.stdout.strip()!r}, not a digest")
    blob = dest / "store" / "layout" / "blobs" / "sha256" / setup.aci_sha256
    if not blob.is_file() or blob.stat().st_size != setup.aci_size:
        raise BenchmarkFailed(f"fetchd's store has no blob {setup.aci_sha256} of the ACI's size")
    return Run("fetchd", round_, exited.wall, exited.cpu, exited.max_rss_mib)


def pull_anchor(setup: Setup, dest: Path, round_: int) -> Run:
    dest.mkdir()
    aci, sig = dest / "image.aci", dest / "image.aci.asc"
    curl = ["curl", "-q", "-sS", "--fail", "--cacert", str(setup.site.ca)]
    curl += ["--resolve", setup.resolve]
    steps: list[tuple[str, list[str]]] = [
        ("curl-asc", [*curl, "-o", str(sig), f"{setup.aci_url}.asc"]),
        ("curl-aci", [*curl, "-o", str(aci), setup.aci_url]),
        ("sqv", ["sqv", "--keyring", str(setup.key), str(sig), str(aci)]),
        (
            "sha512",
            ["bash", "-o", "pipefail", "-c", 'gzip -dc -- "$1" | sha512sum', "sha512", str(aci)],
        ),
    ]
    walls: dict[str, float] = {}
    cpu, rss = 0.0, 0.0
    for step, argv in steps:
        exited = run_child(argv, setup.env, dest / step, RUN_TIMEOUT)
        check_exit(f"anchor {step}", exited)
        walls[step] = exited.wall
        cpu += exited.cpu
        rss = max(rss, exited.max_rss_mib)
        _check_step(setup, step, exited)
    return Run("anchor", round_, sum(walls.values()), cpu, rss, walls)


def _check_step(setup: Setup, step: str, exited: Exited) -> None:
    out = exited.stdout.split()
    if step == "sqv" and setup.fingerprint not in (w.upper() for w in out):
        raise BenchmarkFailed(f"sqv printed {exited.stdout.strip()!r}, not {setup.fingerprint}")
    if step == "sha512" and (not out or out[0] != setup.image_id):
        raise BenchmarkFailed(f"gzip -dc | sha512sum gave {exited.stdout.strip()!r}")


ARMS = (("fetchd", pull_fetchd), ("anchor", pull_anchor))


def summary(runs: Sequence[Run], args: argparse.Namespace, setup: Setup) -> dict[str, object]:
    counted = [r for r in runs if r.round > 0]

    def walls(arm: str) -> dict[int, float]:
        return {r.round: r.wall for r in counted if r.arm == arm}

    anchors = [r for r in counted if r.arm == "anchor"]
    fetchds = [r for r in counted if r.arm == "fetchd"]
    return {
        "benchmark": "appc_pull",
        "size_mib": args.size,
        "aci_mib": round(setup.aci_size / MIB, 1),
        "rounds": args.rounds,
        "fetchd_s": [round(t, 3) for t in walls("fetchd").values()],
        "anchor_s": [round(t, 3) for t in walls("anchor").values()],
        "fetchd_median_s": median_s(walls("fetchd").values()),
        "anchor_median_s": median_s(walls("anchor").values()),
        "anchor_steps_median_s": {s: median_s(r.steps[s] for r in anchors) for s in STEPS},
        "ratio_fetchd_anchor": median_ratio(walls("fetchd"), walls("anchor")),
        "ratios_fetchd_anchor": [
            round(t / walls("anchor")[k], 2) for k, t in sorted(walls("fetchd").items())
        ],
        "fetchd_cpu_median_s": median_s(r.cpu for r in fetchds),
        "anchor_cpu_median_s": median_s(r.cpu for r in anchors),
        "fetchd_peak_rss_mib": peak_mib(r.max_rss_mib for r in fetchds),
        "anchor_peak_rss_mib": peak_mib(r.max_rss_mib for r in anchors),
    }


def print_summary(result: Mapping[str, object]) -> None:
    steps = result["anchor_steps_median_s"]
    assert isinstance(steps, dict)
    print(
        f"median  fetchd {result['fetchd_median_s']} s (cpu {result['fetchd_cpu_median_s']} s)  "
        f"anchor {result['anchor_median_s']} s (cpu {result['anchor_cpu_median_s']} s: "
        + " + ".join(f"{k} {v}" for k, v in steps.items())
        + ")"
    )
    print(
        f"ratio fetchd/anchor {result['ratio_fetchd_anchor']} (median of per-round ratios; "
        f"per round {result['ratios_fetchd_anchor']})"
    )
    print(
        f"peak RSS  fetchd {result['fetchd_peak_rss_mib']} MiB  "
        f"anchor {result['anchor_peak_rss_mib']} MiB (its largest step)"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both arms (default 3)")
    parser.add_argument(
        "--size", type=int, default=256, metavar="MiB", help="the random file (default 256)"
    )
    parser.add_argument("--json", action="store_true", help="also print a JSON summary line")
    args = parser.parse_args(argv)
    for name in ("rounds", "size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def missing_tools() -> str | None:
    gone = [t for t in TOOLS if shutil.which(t) is None]
    if gone:
        return f"missing: {', '.join(gone)}"
    if not PYTHON.exists():
        return f"{PYTHON} is missing: run `make deps` first"
    return gnu_time_missing()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_tools()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    compile_fetchd(REPO)
    # Under /tmp, and without ':' in the path (tools that split at ':' stay happy).
    workdir = Path(tempfile.mkdtemp(prefix="fetchd-bench-appc-", dir="/tmp"))
    try:
        (workdir / "home").mkdir()
        runs_dir = workdir / "runs"
        runs_dir.mkdir()
        env = child_env(workdir / "home")
        ca = make_ca(workdir / "ca")
        with gpg_home(workdir, env) as gpg_env, start_appc_site(workdir / "site", ca) as site:
            key = workdir / "key.asc"
            fingerprint = make_key(gpg_env, key)
            aci = publish(site, workdir, args.size, gpg_env)
            started = time.perf_counter()
            setup = Setup(
                site=site,
                aci_url=f"https://example.com/{aci.relative_to(site.root)}",
                trust_dir=workdir / "trust",
                key=key,
                fingerprint=fingerprint,
                aci_sha256=_file_digest(aci, "sha256"),
                aci_size=aci.stat().st_size,
                image_id=_file_digest(aci, "sha512", opener="gzip"),
                env=env,
            )
            print(
                f"image ID sha512-{setup.image_id[:32]}… (hashed in "
                f"{time.perf_counter() - started:.1f} s); nginx pid {site.pid} on {site.addr}:443; "
                f"key {fingerprint}"
            )
            trust(setup, workdir)
            runs: list[Run] = []
            for round_ in range(args.rounds + 1):  # round 0: the warm-up, not counted
                turn = round_ % len(ARMS)
                for arm, pull in ARMS[turn:] + ARMS[:turn]:
                    dest = runs_dir / f"{arm}-{round_}.d"
                    try:
                        runs.append(pull(setup, dest, round_))
                    finally:
                        shutil.rmtree(dest, ignore_errors=True)
                        os.sync()
                    note = "  (warm-up, not counted)" if round_ == 0 else ""
                    print(runs[-1].line() + note, flush=True)
                if round_ > 0:
                    pair = {r.arm: r.wall for r in runs[-2:]}
                    ratio = pair["fetchd"] / pair["anchor"]
                    print(f"round {round_}  ratio fetchd/anchor {ratio:.2f}", flush=True)
        result = summary(runs, args, setup)
        print_summary(result)
        if args.json:
            print(json.dumps(result))
        return 0
    except BenchmarkFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
