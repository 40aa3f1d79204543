"""``fetchd pull --torrent``: layers through the swarm of a ``fetchd serve`` cache (issue 12).

Real peers only: the distribution registry as the origin, ``fetchd serve`` as the cache
(tracker, torrents, seed), the ``fetchd`` CLI as the clients. A fault-injecting proxy in
front of the cache stands in for a cache that hands out a bad torrent (someone else's
misbehaving server). Blobs are small (a few MiB) with ``--torrent-min-size 1M``.
"""

from __future__ import annotations

import http.server
import sqlite3
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fetchd.bt.metainfo import bdecode, bencode
from tests.support.cli import Fetchd, ok
from tests.support.images import BuiltImage, build_image, push, random_layer
from tests.support.procs import wait_until
from tests.support.registry import Registry
from tests.support.serve import ServeProcess, start_serve

HTTP = ("--insecure-options", "http")
TORRENT = ("--torrent", "--torrent-min-size", "1M")
ARCH = "amd64"
LAYER = 3 << 20
RUN_LIMIT = 120.0


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


def test_layers_come_through_the_swarm_not_over_http(
    registry: Registry, warm_cache: tuple[ServeProcess, BuiltImage, Fetchd], fetchd: Fetchd
) -> None:
    cache, image, _ = warm_cache
    served_before = cache.metrics().get("fetchd_bytes_served_total", 0.0)

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
    # The layers left the cache through BitTorrent (its counters refresh every second);
    # HTTP carried the manifest and config.
    wait_until(
        lambda: cache.metrics().get("fetchd_bt_uploaded_bytes_total", 0.0) >= _layer_bytes(image),
        10,
        f"the cache to count the layers it seeded ({res.stderr})",
    )
    metrics = cache.metrics()
    assert metrics["fetchd_bytes_served_total"] - served_before < LAYER
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


class _BadTorrents(http.server.ThreadingHTTPServer):
    """A cache gone wrong: forwards everything to the real cache, but hands out torrents
    whose info dict carries private=1 (not fetchd's canonical form)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.torrents_served = 0
        super().__init__(("127.0.0.1", 0), _Forward)


class _Forward(http.server.BaseHTTPRequestHandler):
    server: _BadTorrents

    def do_GET(self) -> None:
        with urllib.request.urlopen(self.server.upstream + self.path, timeout=30) as resp:
            body = resp.read()
            ctype = resp.headers.get("Content-Type", "application/octet-stream")
            extra = {k: v for k, v in resp.headers.items() if k.startswith("Docker-")}
        if self.path.startswith("/fetchd/v1/torrents/"):
            doc = bdecode(body)
            assert isinstance(doc, dict)
            doc[b"info"][b"private"] = 1
            body = bencode(doc)
            self.server.torrents_served += 1
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_non_canonical_torrent_is_refused_and_the_blob_comes_over_http(
    registry: Registry, warm_cache: tuple[ServeProcess, BuiltImage, Fetchd], fetchd: Fetchd
) -> None:
    cache, image, _ = warm_cache
    proxy = _BadTorrents(cache.url)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
        res = run(
            fetchd, "pull", *HTTP, *TORRENT, "--mirror", url, f"docker://{registry.host}/bt/app:1"
        )
    finally:
        proxy.shutdown()
        proxy.server_close()
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
    """The cache seeds, but only to peers in 10.0.0.0/8: the loopback client's connection
    is refused, the swarm stalls, and HTTP from the cache finishes the blob."""
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

        res = run(fetchd, "pull", *HTTP, *TORRENT, "--mirror", cache.url, ref)

    assert ok(res).strip() == image.digest
    assert "swarm" in res.stderr and "continuing from" in res.stderr
    assert {layer.digest for layer in image.layers} <= fetchd.blobs()
    assert "ok" in ok(fetchd("fsck"))
