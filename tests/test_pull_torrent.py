"""``fetchd pull --torrent``: layers through the swarm of a ``fetchd serve`` cache (issue 12).

Real peers only: the distribution registry as the origin, ``fetchd serve`` as the cache
(tracker, torrents, seed), the ``fetchd`` CLI as the clients. A fault-injecting proxy in
front of the cache stands in for a cache that hands out a bad torrent (someone else's
misbehaving server). Blobs are small (a few MiB) with ``--torrent-min-size 1M``.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fetchd.bt.metainfo import bdecode, bencode, build_from_file
from fetchd.server.torrents import SLICE_ROUND
from tests.support.badcache import bad_cache
from tests.support.cli import Fetchd, ok
from tests.support.images import BuiltImage, build_image, push, random_layer
from tests.support.procs import Proc, log_tail, wait_until
from tests.support.registry import Registry
from tests.support.serve import ServeProcess, start_serve

HTTP = ("--insecure-options", "http")
TORRENT = ("--torrent", "--torrent-min-size", "1M")
ARCH = "amd64"
LAYER = 3 << 20
RUN_LIMIT = 120.0
#: seconds host A seeds after its pull (host B pulls meanwhile)
LINGER = 20


def publish(registry: Registry, tmp_path: Path, name: str, seed: int) -> BuiltImage:
    layout = tmp_path / f"layout-{name.replace('/', '-')}"
    specs = [random_layer(LAYER + i * 4099, seed + i) for i in range(2)]
    image = build_image(layout, "1", specs, arch=ARCH)
    push(layout, "1", f"{registry.host}/{name}:1")
    return image


def run(fetchd: Fetchd, *args: str) -> subprocess.CompletedProcess[str]:
    return fetchd(*args, timeout=RUN_LIMIT)


@pytest.fixture
def warm_cache(
    registry: Registry, tmp_path: Path
) -> Iterator[tuple[ServeProcess, BuiltImage, Fetchd]]:
    """A `fetchd serve` (seeding blobs of >= 1 MiB) that already holds the image: warmed by
    one HTTP pull through it."""
    image = publish(registry, tmp_path, "bt/app", seed=500)
    cache_store = Fetchd(tmp_path / "cache-store", tmp_path / "cache-home")
    cache_store.home.mkdir()
    with start_serve(
        cache_store, [f"{registry.host}={registry.url}"], extra=["--torrent-min-size", "1M"]
    ) as cache:
        warmer = Fetchd(tmp_path / "warmer", tmp_path / "warmer-home")
        warmer.home.mkdir()
        ok(run(warmer, "pull", *HTTP, "--mirror", cache.url, f"docker://{registry.host}/bt/app:1"))
        yield cache, image, cache_store


def _layer_bytes(image: BuiltImage) -> int:
    return sum(layer.size for layer in image.layers)


def test_a_lone_host_takes_every_slice_over_http_through_the_swarm(
    registry: Registry, warm_cache: tuple[ServeProcess, BuiltImage, Fetchd], fetchd: Fetchd
) -> None:
    cache, image, _ = warm_cache
    res = run(
        fetchd,
        "-v",
        "pull",
        *HTTP,
        *TORRENT,
        "--mirror",
        cache.url,
        f"docker://{registry.host}/bt/app:1",
    )
    out = ok(res)
    assert out.strip().splitlines()[-1] == image.digest
    assert {layer.digest for layer in image.layers} <= fetchd.blobs()
    assert "ok" in ok(fetchd("fsck"))
    # One host alone takes every slice of each layer over HTTP and adds it to the swarm.
    assert "from the swarm of" in res.stderr
    assert cache.metrics().get("fetchd_bt_slices_total", 0.0) >= len(image.layers)
    # The client keeps the torrents it validated (fetchd.db), byte for byte the cache's
    # canonical form (the served one adds only announce and url-list, outside info).
    db = sqlite3.connect(fetchd.store / "fetchd.db")
    try:
        kept = dict(db.execute("SELECT digest, raw FROM torrents").fetchall())
    finally:
        db.close()
    for layer in image.layers:
        served = bdecode(cache.get(f"/fetchd/v1/torrents/{layer.digest}").body)
        assert isinstance(served, dict)
        assert kept[layer.digest] == bencode({b"info": served[b"info"]})


def test_a_second_host_gets_the_layers_from_the_first_not_from_the_cache(
    registry: Registry,
    warm_cache: tuple[ServeProcess, BuiltImage, Fetchd],
    fetchd: Fetchd,
    tmp_path: Path,
) -> None:
    """Host A pulls and lingers as a seed; host B, right after, finds every slice handed
    out and the cache's own seed not listed to fetchd peers: its layers come from A."""
    cache, image, _ = warm_cache
    ref = f"docker://{registry.host}/bt/app:1"
    first = Fetchd(tmp_path / "host-a", tmp_path / "host-a-home")
    first.home.mkdir()
    argv = first.argv(
        "-v", "pull", *HTTP, *TORRENT, "--seed-linger", str(LINGER), "--mirror", cache.url, ref
    )
    with Proc(argv, tmp_path / "host-a.log", env=first.env()) as host_a:
        wanted = {layer.digest for layer in image.layers}
        wait_until(lambda: wanted <= first.blobs(), 60, "host A to commit the layers")
        wait_until(
            lambda: "seeding sha256:" in (tmp_path / "host-a.log").read_text(),
            30,
            "host A to seed",
        )
        served_before = cache.metrics()["fetchd_bytes_served_total"]

        res = run(fetchd, "-v", "pull", *HTTP, *TORRENT, "--mirror", cache.url, ref)

        served = cache.metrics()["fetchd_bytes_served_total"] - served_before
        host_a.check_running()
        # A stops seeding after --seed-linger and says how much it sent to peers.
        wait_until(lambda: not host_a.running(), LINGER + 60, "host A to end its linger")
    sent = re.search(r"BitTorrent: sent (\d+) bytes", (tmp_path / "host-a.log").read_text())
    assert ok(res).strip() == image.digest, res.stderr
    assert sent is not None and int(sent.group(1)) >= _layer_bytes(image)
    assert wanted <= fetchd.blobs()
    assert "ok" in ok(fetchd("fsck"))
    # The manifest and config came over HTTP from the cache; the layers did not.
    assert served < LAYER, res.stderr


def test_once_every_pull_of_a_round_ended_the_next_pull_gets_slices_at_once(
    registry: Registry, warm_cache: tuple[ServeProcess, BuiltImage, Fetchd], fetchd: Fetchd
) -> None:
    """A pull that took slices tells the cache when it ends (it no longer takes nor seeds
    the blob); then the next pull of the blob (a new rollout) gets slices at once, not
    only SLICE_ROUND (8 s) after the last one was handed out. A pull that gives no name
    for itself, or one still running, keeps the round going (the 204)."""
    cache, image, _ = warm_cache
    ref = f"docker://{registry.host}/bt/app:1"
    started = time.monotonic()
    ok(run(fetchd, "pull", *HTTP, *TORRENT, "--mirror", cache.url, ref))
    # The pull's last slice went out after `started`: until SLICE_ROUND after it, only
    # the pull's saying it ended can start a new round (later, time does too).
    for layer in image.layers:
        # No name: nobody can tell that this one ended, so it does not start a round.
        unnamed = cache.get(f"/fetchd/v1/slices/{layer.digest}")
        got = cache.get(f"/fetchd/v1/slices/{layer.digest}?pull=next-rollout-1")
        _within_round(started)
        assert unnamed.status == 204
        assert got.status == 200, got
        assert got.json()["first"] == 0
        # The new round's taker has not ended: a third pull waits for the swarm.
        rest = [
            cache.get(f"/fetchd/v1/slices/{layer.digest}?pull=next-rollout-2") for _ in range(64)
        ]
        assert rest[-1].status == 204
        assert cache.request("DELETE", f"/fetchd/v1/slices/{layer.digest}").status == 400
        assert cache.get(f"/fetchd/v1/slices/{layer.digest}?pull=next-rollout-3").status == 204


def test_a_seed_stopped_by_sigterm_ends_its_round_of_slices(
    registry: Registry,
    warm_cache: tuple[ServeProcess, BuiltImage, Fetchd],
    tmp_path: Path,
) -> None:
    """While a pull lingers as a seed its round of slices goes on (the next pull gets
    the blob from it); stopped with SIGTERM it says it ended, and the next pull gets
    slices at once."""
    cache, image, _ = warm_cache
    host = Fetchd(tmp_path / "host-a", tmp_path / "host-a-home")
    host.home.mkdir()
    argv = host.argv(
        "-v", "pull", *HTTP, *TORRENT, "--seed-linger", "600", "--mirror", cache.url,
        f"docker://{registry.host}/bt/app:1",
    )  # fmt: skip
    log_path = tmp_path / "host-a.log"
    started = time.monotonic()
    with Proc(argv, log_path, env=host.env()) as host_a:
        wait_until(lambda: "seeding for" in log_path.read_text(), 60, "host A to linger")
        for layer in image.layers:
            got = cache.get(f"/fetchd/v1/slices/{layer.digest}?pull=next-rollout")
            _within_round(started)
            assert got.status == 204, "a new round began while host A seeds"
        assert host_a.stop() == 143, log_tail(log_path)
    for layer in image.layers:
        got = cache.get(f"/fetchd/v1/slices/{layer.digest}?pull=next-rollout")
        _within_round(started)
        assert got.status == 200, (got, log_tail(log_path))
        assert got.json()["first"] == 0


def _within_round(started: float) -> None:
    """Skip (saying why) when SLICE_ROUND passed since ``started``, the start of the pull
    whose slices these are: then time alone may have started a new round, and what was
    just seen proves nothing about the pull's saying it ended."""
    if time.monotonic() - started > SLICE_ROUND - 0.5:
        pytest.skip(f"this machine took over {SLICE_ROUND} s: the round may have ended by time")


def test_a_non_canonical_torrent_is_refused_and_the_blob_comes_over_http(
    registry: Registry, warm_cache: tuple[ServeProcess, BuiltImage, Fetchd], fetchd: Fetchd
) -> None:
    cache, image, _ = warm_cache
    with bad_cache(cache.url, private=True) as proxy:
        res = run(
            fetchd,
            "pull",
            *HTTP,
            *TORRENT,
            "--mirror",
            proxy.url,
            f"docker://{registry.host}/bt/app:1",
        )
    out = ok(res)
    assert out.strip() == image.digest
    assert proxy.torrents_served >= 1
    assert "refused the torrent" in res.stderr and "private" in res.stderr
    assert {layer.digest for layer in image.layers} <= fetchd.blobs()
    assert "ok" in ok(fetchd("fsck"))
    assert cache.metrics().get("fetchd_bt_uploaded_bytes_total", 0.0) == 0


def test_a_swarm_that_cannot_be_reached_hands_the_blob_to_http(
    registry: Registry, tmp_path: Path, fetchd: Fetchd
) -> None:
    """The cache seeds, but its tracker serves only peers in 10.0.0.0/8 and it hands out
    no slices (through a proxy that answers 404 to them): the loopback client finds no
    peer, the swarm stalls, and HTTP from the cache finishes the blob."""
    image = publish(registry, tmp_path, "bt/walled", seed=700)
    cache_store = Fetchd(tmp_path / "walled-store", tmp_path / "walled-home")
    cache_store.home.mkdir()
    with start_serve(
        cache_store,
        [f"{registry.host}={registry.url}"],
        extra=["--torrent-min-size", "1M", "--bt-allow", "10.0.0.0/8"],
    ) as cache:
        warmer = Fetchd(tmp_path / "w2", tmp_path / "w2-home")
        warmer.home.mkdir()
        ref = f"docker://{registry.host}/bt/walled:1"
        ok(run(warmer, "pull", *HTTP, "--mirror", cache.url, ref))
        wait_until(lambda: len(cache_store.blobs()) >= 3, 30, "the cache to hold the image")

        with bad_cache(cache.url, slices=False) as proxy:
            res = run(fetchd, "pull", *HTTP, *TORRENT, "--mirror", proxy.url, ref)

    assert ok(res).strip() == image.digest, res.stderr
    assert (
        "stalled" in res.stderr
        and "continuing from" in res.stderr
        and "continuing from" in res.stderr
    )
    assert {layer.digest for layer in image.layers} <= fetchd.blobs()
    assert "ok" in ok(fetchd("fsck"))


def test_serve_pulls_through_another_serves_swarm(
    registry: Registry, tmp_path: Path, fetchd: Fetchd
) -> None:
    """A node agent: `serve --upstream http://CENTRAL --torrent` fetches the layers it is
    asked for through the central cache's swarm (taking its slices), not by plain GETs."""
    image = publish(registry, tmp_path, "bt/chain", seed=900)
    central_store = Fetchd(tmp_path / "central", tmp_path / "central-home")
    central_store.home.mkdir()
    agent_store = Fetchd(tmp_path / "agent", tmp_path / "agent-home")
    agent_store.home.mkdir()
    ref = f"docker://{registry.host}/bt/chain:1"
    small = ["--torrent-min-size", "1M"]
    with start_serve(central_store, [registry.url], extra=small) as central:
        ok(run(fetchd, "pull", *HTTP, "--mirror", central.url, ref))  # warms the central one
        wanted = {layer.digest for layer in image.layers}
        wait_until(lambda: wanted <= central_store.blobs(), 30, "the central cache to hold it")
        agent_up = [f"{registry.host}={central.url}"]
        with start_serve(agent_store, agent_up, extra=["-v", "--torrent", *small]) as agent:
            client = Fetchd(tmp_path / "client", tmp_path / "client-home")
            client.home.mkdir()

            res = run(client, "-v", "pull", *HTTP, "--mirror", agent.url, ref)

            wait_until(lambda: wanted <= agent_store.blobs(), 30, "the agent to commit")
            slices = central.metrics().get("fetchd_bt_slices_total", 0.0)
    assert ok(res).strip() == image.digest, res.stderr
    assert wanted <= client.blobs()
    assert "ok" in ok(agent_store("fsck"))
    assert slices >= len(image.layers)


def test_prefetch_takes_the_same_path(
    registry: Registry, warm_cache: tuple[ServeProcess, BuiltImage, Fetchd], fetchd: Fetchd
) -> None:
    """`fetchd prefetch --torrent --mirror CACHE` (the pre-launch hook) pulls through the
    swarm as `pull` does."""
    cache, image, _ = warm_cache
    ref = f"docker://{registry.host}/bt/app:1"
    res = run(fetchd, "-v", "prefetch", *HTTP, *TORRENT, "--mirror", cache.url, ref)
    ok(res)
    assert "from the swarm of" in res.stderr
    assert {layer.digest for layer in image.layers} <= fetchd.blobs()
    assert fetchd.entry(f"{registry.host}/bt/app:1")["digest"] == image.digest


def test_serve_builds_a_torrent_while_the_blob_streams_in(
    registry: Registry, tmp_path: Path, fetchd: Fetchd
) -> None:
    """A pull-through of a blob serve will seed: its torrent's pieces are hashed in the
    pass that checks the blob's digest, so serve never reads the stored blob again to
    build it; the torrent is fetchd's canonical one for the committed bytes."""
    image = publish(registry, tmp_path, "bt/stream", seed=1100)
    store = Fetchd(tmp_path / "stream-store", tmp_path / "stream-home")
    store.home.mkdir()
    extra = ["-v", "--torrent-min-size", "1M"]
    with start_serve(store, [f"{registry.host}={registry.url}"], extra=extra) as cache:
        ok(
            run(
                fetchd,
                "pull",
                *HTTP,
                "--mirror",
                cache.url,
                f"docker://{registry.host}/bt/stream:1",
            )
        )
        wanted = {layer.digest for layer in image.layers}
        wait_until(lambda: wanted <= store.blobs(), 30, "the cache to commit the layers")
        for layer in image.layers:
            reply = cache.get(f"/fetchd/v1/torrents/{layer.digest}")
            assert reply.status == 200, reply
            got = bdecode(reply.body)
            assert isinstance(got, dict)
            hexd = layer.digest.split(":", 1)[1]
            blob = store.store / "layout" / "blobs" / "sha256" / hexd
            assert bencode({b"info": got[b"info"]}) == build_from_file(blob, hexd, layer.size).raw
        log = cache.log()
    assert "from the stored blob" not in log, log
