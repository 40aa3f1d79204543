"""The whole path: an image pushed to the real registry, pulled by fetchd, run by stage1."""

from __future__ import annotations

from pathlib import Path

from tests.support.cli import Fetchd, failed, ok
from tests.support.images import File, Layer, build_image, push
from tests.support.registry import Registry
from tests.support.stage1 import Stage1


def test_pulled_by_fetchd_run_by_stage1(
    registry: Registry, fetchd: Fetchd, busybox_layer: Layer, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    build_image(
        layout,
        "app",
        [busybox_layer, Layer([File("etc/motd", b"from the registry\n")], "zstd")],
        config={"Cmd": ["/bin/cat", "/etc/motd"], "WorkingDir": "/etc"},
    )
    ref = f"{registry.host}/stage1/app:1"
    push(layout, "app", ref)
    stage1 = Stage1(fetchd.store)

    ok(fetchd("pull", "--insecure-options", "http", f"docker://{ref}"))

    for name in (ref, f"docker://{ref}"):
        r = stage1.run("run", name)
        assert (r.returncode, r.stdout) == (0, "from the registry\n"), r.stderr
    r = stage1.run("run", ref, "--", "/bin/echo", "hi")
    assert (r.returncode, r.stdout) == (0, "hi\n"), r.stderr
    r = stage1.run("run", ref, "--", "/bin/sh", "-c", "exit 7")
    assert r.returncode == 7, r.stderr


def test_fetch_runs_the_real_fetchd_prefetch_first(
    registry: Registry, fetchd: Fetchd, busybox_layer: Layer, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    build_image(layout, "app", [busybox_layer], config={"Cmd": ["/bin/echo", "fetched"]})
    ref = f"{registry.host}/stage1/fetch-me:1"
    push(layout, "app", ref)
    stage1 = Stage1(fetchd.store)
    before = registry.blob_get_count()

    missing = stage1.run("run", ref)
    assert missing.returncode == 1
    hint = f"fetchd pull docker://{ref}"
    assert missing.stderr.splitlines()[-1].endswith(f"run: {hint}")
    # fetchd accepts the hint's reference (it is not in the store yet, so never says so)
    failed(fetchd("pull", "--pull-policy", "never", hint.split()[2]), "--pull-policy never")

    r = stage1.run("run", "--fetch", "--insecure-options", "http", ref)
    assert (r.returncode, r.stdout) == (0, "fetched\n"), r.stderr
    assert registry.blob_get_count() > before
    assert ref in ok(fetchd("images"))

    # present now: prefetch is idempotent and asks the registry for nothing
    requests = len(registry.requests())
    r = stage1.run("run", "--fetch", "--insecure-options", "http", ref)
    assert (r.returncode, r.stdout) == (0, "fetched\n"), r.stderr
    assert len(registry.requests()) == requests

    bad = stage1.run("run", "--fetch", "--insecure-options", "http", f"{registry.host}/no/such:1")
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[-1] == (
        f"error: fetchd prefetch {registry.host}/no/such:1 failed (exit status 1)"
    )
    assert "not found" in bad.stderr
