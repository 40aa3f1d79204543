"""`make demo`: fetchd's main job end to end, on this machine alone (no internet).

Builds a small image from Debian's busybox-static, serves it from a real local
docker-registry on a free loopback port, pushes it with skopeo, pulls it with
`fetchd pull`, lists the store, stops everything it started, and runs the image
with stage1 (no root process creates the container). The store is left in
./demo-store for a look around (skopeo inspect oci:demo-store/layout:…, umoci unpack).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the image builder and registry runner live in tests/support

from tests.support.images import File, Layer, build_image, busybox_rootfs_layer, push  # noqa: E402
from tests.support.registry import start_registry  # noqa: E402

STORE = REPO / "demo-store"


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def run(*argv: str) -> None:
    print("$ " + " ".join(argv), flush=True)
    subprocess.run(argv, check=True, timeout=300)


def main() -> int:
    fetchd = [sys.executable, "-m", "fetchd", "--store", str(STORE)]
    with tempfile.TemporaryDirectory(prefix="fetchd-demo-") as tmp:
        work = Path(tmp)
        step("building a busybox image (OCI layout, written in Python)")
        hello = b"Hello from an image that fetchd pulled and verified.\n"
        build_image(
            work / "layout",
            "latest",
            [busybox_rootfs_layer(), Layer([File("etc/motd", hello)], "zstd")],
            config={"Cmd": ["/bin/cat", "/etc/motd"], "Env": ["PATH=/bin"]},
        )
        step("starting a local docker-registry on a free loopback port")
        with start_registry(work / "registry") as registry:
            print(f"registry at {registry.url} (pid {registry.proc.pid})")
            ref = f"{registry.host}/demo/busybox:latest"
            step(f"pushing it with skopeo to {ref}")
            push(work / "layout", "latest", ref)
            shutil.rmtree(STORE, ignore_errors=True)
            step("pulling it with fetchd (progress on a terminal, digest on stdout)")
            run(*fetchd, "-v", "pull", "--insecure-options", "http", f"docker://{ref}")
            step("a second pull: already complete in the store, no network")
            run(*fetchd, "pull", "--insecure-options", "http", f"docker://{ref}")
            step("what the store holds")
            run(*fetchd, "images")
            run(*fetchd, "fsck")
            step("other tools read the store as a plain OCI layout")
            run(
                "skopeo",
                "inspect",
                "--format",
                "{{.Digest}} {{.Layers}}",
                f"oci:{STORE}/layout:{ref}",
            )
        step("registry stopped; running the image with stage1 (unprivileged, from the store)")
        stage1 = [sys.executable, "-m", "stage1", "--store", str(STORE), "run", ref]
        run(*stage1)
        run(
            *stage1,
            "--",
            "/bin/sh",
            "-c",
            "echo inside: $(id); echo host uid map: $(cat /proc/self/uid_map)",
        )
        step("done; the store stays in ./demo-store")
    return 0


if __name__ == "__main__":
    sys.exit(main())
