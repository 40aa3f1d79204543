"""A mirror that stalls half-way through a layer, against the origin alone: what hedging costs.

The image is one uncompressed layer of LAYER_MIB MiB of random data (256 by default), built
in Python and pushed byte for byte to a local docker-registry. Two fault proxies
(tests/support/faultproxy.py) stand in front of that registry: the origin, a counting
proxy in "pass" mode (what it sent is the origin's bytes), and per round a fresh mirror in
"stall-after" mode, which sends half of the layer's bytes, whichever ranges were asked for,
and then nothing on any connection. Each round, into a fresh empty store each time:

- origin: `fetchd pull docker://ORIGIN/NAME:TAG`;
- mirror: `fetchd pull --stall-timeout S --mirror MIRROR docker://ORIGIN/NAME:TAG`.

Both arms go through the origin proxy, so the proxy's own cost is in both. Before the timed
rounds one origin pull runs, checked but not counted (the registry's blob files are cold in
the page cache right after the push). A run counts only if fetchd printed the registry's
manifest digest and stored the layer at its size.

Printed per run: wall and CPU seconds, peak RSS, the MiB the origin and the mirror sent, and
for the mirror arm the seconds from the mirror's silence to the end of the pull (a hedging
engine needs about one --stall-timeout plus the missing half from the origin). Then the
medians, the median of per-round ratios mirror/origin, and the origin's bytes in the mirror
arm as a fraction of the layer (the aim: about a half, at most a half + one 8 MiB segment).

``--baseline DIR`` adds both arms again in every round, "base-origin" and "base-mirror",
with the fetchd of another checkout (`git worktree add DIR REV`), run with `python -P` and
`PYTHONPATH=DIR`: the before and after in one run, for the origin-only pull too.

    python benchmarks/mirror_hedge.py [--rounds N] [--layer-mib N] [--stall-timeout S]
                                      [--baseline DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so that `python benchmarks/mirror_hedge.py` finds tests/

from benchmarks.measure import (  # noqa: E402
    BenchmarkFailed,
    check_exit,
    child_env,
    compile_fetchd,
    gnu_time_missing,
    median_ratio,
    median_s,
    peak_mib,
    run_child,
)
from tests.support.faultproxy import FaultProxy  # noqa: E402
from tests.support.images import (  # noqa: E402
    BuiltImage,
    build_image,
    push,
    random_layer,
    registry_manifest_digest,
)
from tests.support.registry import Registry, start_registry  # noqa: E402

MIB = 1024 * 1024
SEGMENT = 8 * MIB  # the range downloader's segment
PYTHON = REPO / ".venv" / "bin" / "python"
NAME, TAG = "bench/hedge", "latest"
RUN_TIMEOUT = 300.0  # seconds for one pull


@dataclass(frozen=True)
class Run:
    arm: str  # "origin", "mirror"; "base-origin", "base-mirror" (another checkout's fetchd)
    round: int
    wall: float  # seconds
    cpu: float  # user + system seconds of the child
    max_rss_mib: float
    origin_bytes: int  # what the origin proxy sent of the layer during this run
    mirror_bytes: int  # what the mirror sent of the layer (0 in the origin arm)
    after_silence: float | None  # seconds from the mirror's silence to the pull's end

    def line(self, layer_size: int) -> str:
        silence = "" if self.after_silence is None else f"  end {self.after_silence:5.2f} s after"
        return (
            f"round {self.round}  {self.arm:<11}  {self.wall:6.2f} s  cpu {self.cpu:5.2f} s  "
            f"peak RSS {self.max_rss_mib:5.1f} MiB  origin {self.origin_bytes / MIB:6.1f} MiB "
            f"({self.origin_bytes / layer_size:4.2f} × layer)  mirror "
            f"{self.mirror_bytes / MIB:6.1f} MiB{silence}"
        )


@dataclass(frozen=True)
class Setup:
    registry: Registry
    origin: FaultProxy
    image: BuiltImage
    env: Mapping[str, str]
    stall_timeout: float

    @property
    def layer(self) -> tuple[str, int]:
        (layer,) = self.image.layers
        return layer.digest, layer.size


def pull(
    setup: Setup,
    dest: Path,
    arm: str,
    round_: int,
    mirror: FaultProxy | None,
    checkout: Path | None = None,
) -> Run:
    """One checked `fetchd pull` into the empty store `dest` (through `mirror` if given)."""
    digest, size = setup.layer
    env = dict(setup.env)
    flags: list[str] = []
    if checkout is not None:
        # -P: the child runs in this repository, whose fetchd/ would come first otherwise.
        env["PYTHONPATH"] = str(checkout)
        flags.append("-P")
    argv = [str(PYTHON), *flags, "-m", "fetchd", "--store", str(dest), "-q", "pull"]
    argv += ["--insecure-options", "http"]
    if mirror is not None:
        argv += ["--stall-timeout", f"{setup.stall_timeout:g}", "--mirror", mirror.url]
    argv.append(f"docker://{setup.origin.host}/{NAME}:{TAG}")
    before = setup.origin.bytes_sent(digest=digest)
    exited = run_child(argv, env, dest.parent / f"{arm}-{round_}", RUN_TIMEOUT)
    ended = time.monotonic()
    check_exit(f"fetchd ({arm})", exited)
    printed = exited.stdout.strip()
    if printed != setup.image.digest:
        raise BenchmarkFailed(f"fetchd printed {printed!r}, the registry has {setup.image.digest}")
    blob = dest / "layout" / "blobs" / "sha256" / digest.removeprefix("sha256:")
    if not blob.is_file() or blob.stat().st_size != size:
        raise BenchmarkFailed(f"fetchd's store lacks layer {digest} at {size} B")
    silent_at = mirror.stalled_at if mirror is not None else None
    if mirror is not None and silent_at is None:
        raise BenchmarkFailed("the mirror never stalled: the run did not test a stalling mirror")
    return Run(
        arm,
        round_,
        exited.wall,
        exited.cpu,
        exited.max_rss_mib,
        setup.origin.bytes_sent(digest=digest) - before,
        mirror.bytes_sent(digest=digest) if mirror is not None else 0,
        None if silent_at is None else ended - silent_at,
    )


def pull_origin(setup: Setup, dest: Path, round_: int, checkout: Path | None = None) -> Run:
    """The origin arm: no mirror."""
    arm = "origin" if checkout is None else "base-origin"
    return pull(setup, dest, arm, round_, None, checkout)


def pull_with_mirror(setup: Setup, dest: Path, round_: int, checkout: Path | None = None) -> Run:
    """The mirror arm: a fresh stalling mirror for this run only (its allowance, its
    stalled connections released when it stops)."""
    digest, size = setup.layer
    with FaultProxy(setup.registry.url) as mirror:
        mirror.set_mode("stall-after", digests={digest}, after=size // 2)
        arm = "mirror" if checkout is None else "base-mirror"
        return pull(setup, dest, arm, round_, mirror, checkout)


Arm = Callable[[Setup, Path, int], Run]


def baseline_arms(checkout: Path) -> list[tuple[str, Arm]]:
    """Both arms with the fetchd of another checkout."""

    def origin(setup: Setup, dest: Path, round_: int) -> Run:
        return pull_origin(setup, dest, round_, checkout)

    def mirror(setup: Setup, dest: Path, round_: int) -> Run:
        return pull_with_mirror(setup, dest, round_, checkout)

    return [("base-origin", origin), ("base-mirror", mirror)]


def publish(workdir: Path, registry: Registry, layer_mib: int) -> BuiltImage:
    """Build the one-layer random image, push it, check that the registry serves it."""
    layout = workdir / "layout"
    image = build_image(layout, TAG, [random_layer(layer_mib * MIB, 1, compression="none")])
    push(layout, TAG, f"{registry.host}/{NAME}:{TAG}")
    served = registry_manifest_digest(registry.host, NAME, TAG)
    if served != image.digest:
        raise BenchmarkFailed(f"the registry serves {served}, built {image.digest}")
    shutil.rmtree(layout)  # only the registry's copy is read from here on
    return image


def summary(runs: Sequence[Run], args: argparse.Namespace, setup: Setup) -> dict[str, object]:
    _, size = setup.layer

    def walls(arm: str) -> dict[int, float]:
        return {r.round: r.wall for r in runs if r.arm == arm}

    def origin_share(arm: str) -> float | None:
        shares = [r.origin_bytes / size for r in runs if r.arm == arm]
        return round(statistics.median(shares), 3) if shares else None

    def after_silence(arm: str) -> float | None:
        return median_s(r.after_silence for r in runs if r.arm == arm and r.after_silence)

    return {
        "benchmark": "mirror_hedge",
        "image": setup.image.digest,
        "layer_mib": args.layer_mib,
        "stall_timeout_s": args.stall_timeout,
        "rounds": args.rounds,
        "origin_s": [round(w, 3) for w in walls("origin").values()],
        "mirror_s": [round(w, 3) for w in walls("mirror").values()],
        "base_origin_s": [round(w, 3) for w in walls("base-origin").values()],
        "base_mirror_s": [round(w, 3) for w in walls("base-mirror").values()],
        "origin_median_s": median_s(walls("origin").values()),
        "mirror_median_s": median_s(walls("mirror").values()),
        "base_origin_median_s": median_s(walls("base-origin").values()),
        "base_mirror_median_s": median_s(walls("base-mirror").values()),
        "ratio_mirror_origin": median_ratio(walls("mirror"), walls("origin")),
        "ratio_base_mirror_origin": median_ratio(walls("base-mirror"), walls("base-origin")),
        "ratio_origin_base": median_ratio(walls("origin"), walls("base-origin")),
        "ratio_mirror_base": median_ratio(walls("mirror"), walls("base-mirror")),
        "mirror_after_silence_s": after_silence("mirror"),
        "base_after_silence_s": after_silence("base-mirror"),
        "origin_share_in_mirror_arm": origin_share("mirror"),
        "origin_share_in_base_mirror_arm": origin_share("base-mirror"),
        "origin_bound_share": round((size - size // 2 + SEGMENT) / size, 3),
        "peak_rss_mib": peak_mib(r.max_rss_mib for r in runs),
    }


def report(result: Mapping[str, object]) -> None:
    print(
        f"median  origin {result['origin_median_s']} s  mirror {result['mirror_median_s']} s"
        f"  ratio mirror/origin {result['ratio_mirror_origin']} (median of per-round ratios)"
    )
    print(
        f"mirror arm: the pull ended {result['mirror_after_silence_s']} s after the mirror went "
        f"silent (--stall-timeout {result['stall_timeout_s']:g}); the origin sent "
        f"{result['origin_share_in_mirror_arm']} × the layer (bound: a half + one segment = "
        f"{result['origin_bound_share']})"
    )
    if result["base_mirror_median_s"] is not None:
        print(
            f"--baseline: origin {result['base_origin_median_s']} s  mirror "
            f"{result['base_mirror_median_s']} s  ratio mirror/origin "
            f"{result['ratio_base_mirror_origin']}; ended {result['base_after_silence_s']} s "
            f"after the silence; the origin sent {result['origin_share_in_base_mirror_arm']} × "
            "the layer"
        )
        print(
            f"this fetchd / --baseline's: origin arm {result['ratio_origin_base']}  mirror arm "
            f"{result['ratio_mirror_base']} (medians of per-round ratios)"
        )
    print(f"peak RSS {result['peak_rss_mib']} MiB")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="origin+mirror pairs (default 3)")
    parser.add_argument("--layer-mib", type=int, default=256, help="MiB of the layer (256)")
    parser.add_argument(
        "--stall-timeout", type=float, default=3.0, help="fetchd's --stall-timeout (default 3)"
    )
    parser.add_argument(
        "--baseline", type=Path, help="also run both arms with fetchd from this checkout"
    )
    parser.add_argument("--json", action="store_true", help="also print a JSON summary line")
    args = parser.parse_args(argv)
    for name in ("rounds", "layer_mib"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.stall_timeout > 0:
        parser.error("--stall-timeout must be positive")
    if args.baseline is not None and not (args.baseline / "fetchd" / "__init__.py").is_file():
        parser.error(f"--baseline {args.baseline}: no fetchd/ in it")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    compile_fetchd(REPO)
    if args.baseline is not None:
        compile_fetchd(args.baseline)
    missing = gnu_time_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    if not PYTHON.exists():
        print(f"error: {PYTHON} is missing: run `make deps` first", file=sys.stderr)
        return 1
    # skopeo splits oci:PATH:REF at the first ':', so the work dir must not contain one.
    workdir = Path(tempfile.mkdtemp(prefix="fetchd-bench-", dir="/tmp"))
    try:
        (workdir / "home").mkdir()
        runs_dir = workdir / "runs"
        runs_dir.mkdir()
        with (
            start_registry(workdir / "registry") as registry,
            FaultProxy(registry.url) as origin,
        ):
            started = time.perf_counter()
            image = publish(workdir, registry, args.layer_mib)
            setup = Setup(registry, origin, image, child_env(workdir / "home"), args.stall_timeout)
            _, size = setup.layer
            print(
                f"image {registry.host}/{NAME}:{TAG} {image.digest}: one {args.layer_mib} MiB "
                f"uncompressed random layer (built and pushed in "
                f"{time.perf_counter() - started:.1f} s); origin proxy {origin.url}",
                flush=True,
            )
            dest = runs_dir / "warmup.d"
            try:
                warm = pull_origin(setup, dest, 0)
            finally:
                shutil.rmtree(dest, ignore_errors=True)
            print(f"warm-up: one origin pull, checked, not counted ({warm.wall:.2f} s)", flush=True)
            arms: list[tuple[str, Arm]] = [("origin", pull_origin), ("mirror", pull_with_mirror)]
            if args.baseline is not None:
                arms += baseline_arms(args.baseline.resolve())
            runs: list[Run] = []
            for round_ in range(1, args.rounds + 1):
                for arm, one in arms:
                    dest = runs_dir / f"{arm}-{round_}.d"
                    try:
                        run = one(setup, dest, round_)
                    finally:
                        shutil.rmtree(dest, ignore_errors=True)
                    runs.append(run)
                    print(run.line(size), flush=True)
            result = summary(runs, args, setup)
        report(result)
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
