"""Pull one big image from a local docker-registry with fetchd and with skopeo, alternating.

The image is LAYERS layers of LAYER_MIB MiB of random data each, uncompressed, so neither
side can win by compressing; it is built in Python and pushed with skopeo byte for byte.
Each round runs `fetchd pull` into a fresh empty store, then `skopeo copy --preserve-digests
docker://… oci:…` into a fresh empty directory; both are deleted outside the timed region.
Before the timed rounds each tool pulls the image once, checked but not counted: right
after the push the registry's blob files are cold in the page cache, which penalised
whichever tool read them first. The page cache is not dropped after that.

Every run is checked before it counts (fetchd must print the registry's manifest digest and
store every layer at its size; skopeo must exit 0 and write the same manifest), because a
benchmark that times a failed run is worthless.

Wall time is from just before fork to the moment the child is reaped; CPU time comes from
os.wait4's rusage, peak RSS from GNU time (see benchmarks/measure.py run_child).

    python benchmarks/pull_registry.py [--rounds N] [--layers N] [--layer-mib N] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # so that `python benchmarks/pull_registry.py` finds tests/

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
from tests.support.images import (  # noqa: E402
    LAYER_MEDIA_TYPES,
    BuiltImage,
    build_image,
    push,
    random_layer,
    registry_manifest_digest,
    skopeo_inspect_raw,
)
from tests.support.registry import Registry, start_registry  # noqa: E402

MIB = 1024 * 1024
PYTHON = REPO / ".venv" / "bin" / "python"
NAME, TAG = "bench/random", "latest"
RUN_TIMEOUT = 300.0  # seconds for one pull; issue 2 measured ~3.5 s for the default image


@dataclass(frozen=True)
class Run:
    tool: str
    round: int
    wall: float  # seconds
    cpu: float  # user + system seconds of the child
    max_rss_mib: float

    def line(self, total_mib: int) -> str:
        return (
            f"round {self.round}  {self.tool:<6}  {self.wall:6.2f} s  "
            f"{total_mib / self.wall:6.0f} MiB/s  cpu {self.cpu:5.2f} s  "
            f"peak RSS {self.max_rss_mib:6.1f} MiB"
        )


def _measured(tool: str, round_: int, exited: Exited) -> Run:
    return Run(tool, round_, exited.wall, exited.cpu, exited.max_rss_mib)


def pull_fetchd(
    registry: Registry, image: BuiltImage, dest: Path, env: Mapping[str, str], round_: int
) -> Run:
    argv = [
        str(PYTHON),
        "-m",
        "fetchd",
        "--store",
        str(dest),
        "-q",
        "pull",
        "--insecure-options",
        "http",
        f"docker://{registry.host}/{NAME}:{TAG}",
    ]
    exited = run_child(argv, env, dest.parent / f"fetchd-{round_}", RUN_TIMEOUT)
    check_exit("fetchd", exited)
    printed = exited.stdout.strip()
    if printed != image.digest:
        raise BenchmarkFailed(f"fetchd printed {printed!r}, the registry has {image.digest}")
    blobs = dest / "layout" / "blobs" / "sha256"
    for layer in image.layers:
        path = blobs / layer.digest.removeprefix("sha256:")
        if not path.is_file() or path.stat().st_size != layer.size:
            raise BenchmarkFailed(f"fetchd's store lacks layer {layer.digest} at {layer.size} B")
    return _measured("fetchd", round_, exited)


def pull_skopeo(
    registry: Registry, image: BuiltImage, dest: Path, env: Mapping[str, str], round_: int
) -> Run:
    argv = [
        "skopeo",
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        # Without it skopeo gzips uncompressed layers on the way into oci: (a new manifest
        # digest, and work fetchd does not do): keep the layers as served, like fetchd.
        "--preserve-digests",
        f"docker://{registry.host}/{NAME}:{TAG}",
        f"oci:{dest}:x",
    ]
    exited = run_child(argv, env, dest.parent / f"skopeo-{round_}", RUN_TIMEOUT)
    check_exit("skopeo", exited)
    # Same manifest as the registry's: skopeo rewrote nothing, so both tools did the same work.
    index = json.loads((dest / "index.json").read_text())
    digests = [m["digest"] for m in index["manifests"]]
    if digests != [image.digest]:
        raise BenchmarkFailed(f"skopeo wrote manifests {digests}, the registry has {image.digest}")
    return _measured("skopeo", round_, exited)


def publish(workdir: Path, registry: Registry, layers: int, layer_mib: int) -> BuiltImage:
    """Build the random image, push it, and check that the registry holds it as built."""
    layout = workdir / "layout"
    image = build_image(
        layout,
        TAG,
        [random_layer(layer_mib * MIB, seed, compression="none") for seed in range(1, layers + 1)],
    )
    push(layout, TAG, f"{registry.host}/{NAME}:{TAG}")
    served = registry_manifest_digest(registry.host, NAME, TAG)
    if served != image.digest:
        raise BenchmarkFailed(f"the registry serves {served}, built {image.digest}")
    manifest = skopeo_inspect_raw(f"docker://{registry.host}/{NAME}:{TAG}")
    types = {layer["mediaType"] for layer in manifest["layers"]}
    if types != {LAYER_MEDIA_TYPES["none"]}:
        raise BenchmarkFailed(f"the registry's layers are {types}, not uncompressed tar")
    shutil.rmtree(layout)  # only the registry's copy is read from here on
    return image


def summary(runs: Sequence[Run], args: argparse.Namespace, image: BuiltImage) -> dict[str, object]:
    def walls(tool: str) -> dict[int, float]:
        return {r.round: r.wall for r in runs if r.tool == tool}

    def peak(tool: str) -> float | None:
        return peak_mib(r.max_rss_mib for r in runs if r.tool == tool)

    return {
        "benchmark": "pull_registry",
        "image": image.digest,
        "layers": args.layers,
        "layer_mib": args.layer_mib,
        "rounds": args.rounds,
        "fetchd_s": [round(w, 3) for w in walls("fetchd").values()],
        "skopeo_s": [round(w, 3) for w in walls("skopeo").values()],
        "fetchd_median_s": median_s(walls("fetchd").values()),
        "skopeo_median_s": median_s(walls("skopeo").values()),
        "ratio_median": median_ratio(walls("fetchd"), walls("skopeo")),
        "fetchd_peak_rss_mib": peak("fetchd"),
        "skopeo_peak_rss_mib": peak("skopeo"),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3, help="fetchd+skopeo pairs (default 3)")
    parser.add_argument("--layers", type=int, default=4, help="layers in the image (default 4)")
    parser.add_argument("--layer-mib", type=int, default=256, help="MiB per layer (default 256)")
    parser.add_argument("--json", action="store_true", help="also print a JSON summary line")
    args = parser.parse_args(argv)
    for name in ("rounds", "layers", "layer_mib"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    compile_fetchd(REPO)
    missing = gnu_time_missing()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 1
    if not PYTHON.exists():
        print(f"error: {PYTHON} is missing: run `make deps` first", file=sys.stderr)
        return 1
    total_mib = args.layers * args.layer_mib
    # skopeo splits oci:PATH:REF at the first ':', so the work dir must not contain one.
    workdir = Path(tempfile.mkdtemp(prefix="fetchd-bench-", dir="/tmp"))
    try:
        env = child_env(workdir / "home")
        (workdir / "home").mkdir()
        runs_dir = workdir / "runs"
        runs_dir.mkdir()
        with start_registry(workdir / "registry") as registry:
            started = time.perf_counter()
            image = publish(workdir, registry, args.layers, args.layer_mib)
            print(
                f"image {registry.host}/{NAME}:{TAG} {image.digest}: {args.layers} × "
                f"{args.layer_mib} MiB uncompressed random layers (built and pushed in "
                f"{time.perf_counter() - started:.1f} s)",
                flush=True,
            )
            tools = (("fetchd", pull_fetchd), ("skopeo", pull_skopeo))
            # Round 0, not counted: one checked pull by each tool, so that the registry's
            # blob files, cold in the page cache after the push, are warm for round 1.
            warmups: list[str] = []
            for tool, pull in tools:
                dest = runs_dir / f"{tool}-0.d"
                try:
                    run = pull(registry, image, dest, env, 0)
                finally:
                    shutil.rmtree(dest, ignore_errors=True)
                warmups.append(f"{tool} {run.wall:.2f} s")
            print(
                f"warm-up: one pull by each tool first, checked, not counted "
                f"({', '.join(warmups)})",
                flush=True,
            )
            runs: list[Run] = []
            for round_ in range(1, args.rounds + 1):
                for tool, pull in tools:
                    dest = runs_dir / f"{tool}-{round_}.d"
                    try:
                        run = pull(registry, image, dest, env, round_)
                    finally:
                        shutil.rmtree(dest, ignore_errors=True)
                    runs.append(run)
                    print(run.line(total_mib), flush=True)
        result = summary(runs, args, image)
        print(
            f"median  fetchd {result['fetchd_median_s']} s  skopeo {result['skopeo_median_s']} s"
            f"  ratio fetchd/skopeo {result['ratio_median']} (median of per-round ratios)"
        )
        print(
            f"peak RSS  fetchd {result['fetchd_peak_rss_mib']} MiB"
            f"  skopeo {result['skopeo_peak_rss_mib']} MiB"
        )
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
