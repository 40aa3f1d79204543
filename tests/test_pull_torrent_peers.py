"""``fetchd pull --torrent`` among real peers that misbehave (issue 12, acceptance 3, 4, 6).

CLI level: the distribution registry as the origin, ``fetchd serve`` as the cache (tracker,
torrents, slices, seed), the ``fetchd`` CLI as the hosts, a stock libtorrent seeder
(tests/support/btpeers.py LtSeeder, upload-limited so a test can act half-way), a raw lying
peer (btpeers.Liar: claims every piece, answers with random bytes; a test double of someone
else's misbehaving client) and transmission-cli. Peers other than fetchd's are put in a
swarm by announcing them to the cache's tracker from their own address (the tracker takes
the address from the connection). On loopback everything listens on its own 127.0.0.x;
the namespace tests build a tests/support/lan.py rig (fd-*) and tear it down.

The proxy of tests/support/badcache.py (``bad_cache(slices=False)``) stands for a cache
that hands out no slices, so the swarm's peers are the only source of a layer's bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote_from_bytes

import pytest

from fetchd.bt import metainfo
from fetchd.bt.metainfo import Torrent, bdecode, bencode
from tests.support import lan as lanmod
from tests.support.badcache import bad_cache
from tests.support.btpeers import Liar, LtSeeder, sockets_of
from tests.support.cli import Fetchd, blob_file, ok
from tests.support.images import BuiltImage, build_image, push, random_layer
from tests.support.procs import Proc, wait_until
from tests.support.registry import Registry
from tests.support.serve import ServeProcess, start_serve

HTTP = ("--insecure-options", "http")
TORRENT = ("--torrent", "--torrent-min-size", "1M")
MiB = 1 << 20
RUN_LIMIT = 120.0
PIECE = 256 << 10  # the canonical piece length of every blob here (< 512 MiB)
LSD = "0.0.0.0:6771"  # libtorrent's LSD socket: the multicast port, bound on the wildcard


# ----------------------------------------------------------------------------- helpers
def publish(
    registry: Registry, tmp_path: Path, name: str, sizes: list[int], seed: int
) -> BuiltImage:
    layout = tmp_path / f"layout-{name.replace('/', '-')}"
    image = build_image(layout, "1", [random_layer(s, seed + i) for i, s in enumerate(sizes)])
    push(layout, "1", f"{registry.host}/{name}:1")
    return image


def new_fetchd(tmp_path: Path, name: str) -> Fetchd:
    f = Fetchd(tmp_path / name, tmp_path / f"{name}-home")
    f.home.mkdir(parents=True, exist_ok=True)
    return f


@contextlib.contextmanager
def warm_cache(
    registry: Registry, tmp_path: Path, image: BuiltImage, name: str, extra: tuple[str, ...] = ()
) -> Iterator[tuple[ServeProcess, Fetchd]]:
    """A `fetchd serve` (seeding blobs of >= 1 MiB) holding ``image``, warmed by one HTTP
    pull through it."""
    store = new_fetchd(tmp_path, "cache-store")
    with start_serve(
        store, [f"{registry.host}={registry.url}"], extra=["--torrent-min-size", "1M", *extra]
    ) as cache:
        warmer = new_fetchd(tmp_path, "warmer")
        ref = f"docker://{registry.host}/{name}:1"
        ok(warmer("pull", *HTTP, "--mirror", cache.url, ref, timeout=RUN_LIMIT))
        wanted = {layer.digest for layer in image.layers}
        wait_until(lambda: wanted <= store.blobs(), 30, "the cache to hold the layers")
        yield cache, store


def torrent_from(cache: ServeProcess, digest: str, size: int) -> Torrent:
    """The cache's torrent of a blob (asking for it also allows it at the tracker)."""
    reply = cache.get(f"/fetchd/v1/torrents/{digest}")
    assert reply.status == 200, reply
    return metainfo.canonical(reply.body, digest.removeprefix("sha256:"), size)


def announce(cache: ServeProcess, t: Torrent, peer: tuple[str, int], peer_id: bytes) -> None:
    """Announce ``peer`` (a seed) to the cache's tracker from the peer's own address."""
    query = (
        f"info_hash={quote_from_bytes(t.info_hash)}&peer_id={quote_from_bytes(peer_id)}"
        f"&port={peer[1]}&uploaded=0&downloaded=0&left=0&event=started&compact=1&numwant=0"
    )
    reply = cache.get(f"/announce?{query}", source=peer[0])
    doc = bdecode(reply.body)
    assert reply.status == 200 and isinstance(doc, dict), reply
    assert b"failure reason" not in doc, doc


def ingest_progress(store: Path) -> list[int]:
    """Bytes each segmented ingest of ``store`` has on record (its state.json ranges)."""
    done = []
    root = store / "ingest"
    for state in root.glob("*/state.json") if root.exists() else []:
        with contextlib.suppress(OSError, ValueError):
            ranges = json.loads(state.read_bytes()).get("ranges", [])
            done.append(sum(int(b) - int(a) for a, b in ranges))
    return done


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def local_address(line: str) -> str:
    """ss's local address of a "PROTO LOCAL PEER" line, without the "%lo" that
    libtorrent's bind-to-device adds."""
    host, _, port = line.split()[1].rpartition(":")
    return f"{host.partition('%')[0]}:{port}"


def sample_sockets(pids: list[int], running: Any, limit: float) -> list[set[str]]:
    """Every socket line (``sockets_of``) of each of ``pids`` seen while ``running()``,
    sampled for at most ``limit`` seconds (a bounded loop; an ss call takes a few ms)."""
    seen: list[set[str]] = [set() for _ in pids]
    deadline = time.monotonic() + limit
    while running() and time.monotonic() < deadline:
        for pid, lines in zip(pids, seen, strict=True):
            lines.update(sockets_of(pid))
        time.sleep(0.05)  # pacing of the sampling, not synchronisation
    return seen


# --------------------------------------------------------------------------- acceptance 4
def test_a_lying_peer_next_to_an_honest_seeder(
    registry: Registry, tmp_path: Path, fetchd: Fetchd
) -> None:
    """The cache hands out no slices; the swarm holds a liar (announced first) and an
    honest stock seeder. The pull commits the right blob: libtorrent bans the liar and
    completes, or the hash-failure bound hands the rest to the cache's HTTP; either way
    the log says which, and the swarm's bytes never fail the commit (the liar's blocks
    never reach the ingest)."""
    image = publish(registry, tmp_path, "btp/liar", [4 * MiB], seed=1200)
    layer = image.layers[0]
    with warm_cache(registry, tmp_path, image, "btp/liar") as (cache, store):
        t = torrent_from(cache, layer.digest, layer.size)
        liar = Liar("127.0.0.25", t.info_hash, t.num_pieces)
        honest = LtSeeder(t, blob_file(store, layer.digest).parent, "127.0.0.24", rate=1 * MiB)
        try:
            announce(cache, t, liar.address, b"-XX0001-" + b"l" * 12)
            announce(cache, t, honest.address, b"-LT2110-" + b"h" * 12)
            with bad_cache(cache.url, slices=False) as proxy:
                res = fetchd(
                    "-v", "pull", *HTTP, *TORRENT, "--bt-listen", "127.0.0.23",
                    "--mirror", proxy.url, f"docker://{registry.host}/btp/liar:1",
                    timeout=RUN_LIMIT,
                )  # fmt: skip
            honest_sent = honest.uploaded()
        finally:
            honest.close()
            liar.close()
    assert ok(res).strip() == image.digest, res.stderr
    assert layer.digest in fetchd.blobs()
    assert "ok" in ok(fetchd("fsck"))
    assert "from the swarm of" in res.stderr
    assert liar.connections > 0 and liar.bad_blocks > 0, "the liar was never asked"
    banned = f"banned peer {liar.address[0]}:{liar.address[1]}" in res.stderr
    handed = "continuing from" in res.stderr and (
        "failed their hash check" in res.stderr or "stalled" in res.stderr
    )
    assert banned or handed, res.stderr
    # Only verified pieces reach the ingest: the commit never blamed the swarm.
    assert "failed verification" not in res.stderr, res.stderr
    print(
        f"liar: {liar.bad_blocks} random blocks sent; banned={banned} handed-over={handed}; "
        f"honest seeder sent {honest_sent} of {layer.size} bytes"
    )


def test_kill_9_half_way_then_the_next_run_fetches_only_the_rest(
    registry: Registry, tmp_path: Path, fetchd: Fetchd
) -> None:
    """No slices; the only peer is an upload-limited stock seeder. `pull --torrent` is
    killed -9 once its ingest holds half the layer; the next run commits the right
    digest, and the seeder and the cache together send it no more than what the killed
    run had not recorded, plus a few pieces in flight."""
    size = 4 * MiB
    image = publish(registry, tmp_path, "btp/resume", [size], seed=1300)
    layer = image.layers[0]
    ref = f"docker://{registry.host}/btp/resume:1"
    with warm_cache(registry, tmp_path, image, "btp/resume") as (cache, store):
        t = torrent_from(cache, layer.digest, layer.size)
        seeder = LtSeeder(t, blob_file(store, layer.digest).parent, "127.0.0.34", rate=512 << 10)
        try:
            announce(cache, t, seeder.address, b"-LT2110-" + b"s" * 12)
            with bad_cache(cache.url, slices=False) as proxy:
                argv = fetchd.argv(
                    "-v", "pull", *HTTP, *TORRENT, "--bt-listen", "127.0.0.33",
                    "--mirror", proxy.url, ref,
                )  # fmt: skip
                with Proc(argv, tmp_path / "first.log", env=fetchd.env()) as first:

                    def partly() -> bool:
                        first.check_running()
                        return any(half <= n < layer.size for n in ingest_progress(fetchd.store))

                    half = layer.size // 2
                    wait_until(partly, 60, "the ingest to hold half the layer", first.log_path)
                    os.kill(first.pid, signal.SIGKILL)
                    assert first.stop() == -signal.SIGKILL
                had = max(ingest_progress(fetchd.store))
                assert layer.size // 2 <= had < layer.size
                assert layer.digest not in fetchd.blobs()
                seeder.set_rate(2 * MiB)
                sent_before = seeder.uploaded()
                served_before = cache.metrics()["fetchd_bytes_served_total"]

                res = fetchd(
                    "-v", "pull", *HTTP, *TORRENT, "--bt-listen", "127.0.0.33",
                    "--mirror", proxy.url, ref, timeout=RUN_LIMIT,
                )  # fmt: skip

                served = cache.metrics()["fetchd_bytes_served_total"] - served_before
            sent = seeder.uploaded() - sent_before
        finally:
            seeder.close()
    assert ok(res).strip() == image.digest, res.stderr
    assert layer.digest in fetchd.blobs()
    assert "ok" in ok(fetchd("fsck"))
    assert f"resuming at {had} bytes" in res.stderr, res.stderr
    missing = layer.size - had
    assert sent + served <= missing + 3 * PIECE, (sent, served, missing)
    print(
        f"kill -9 with {had} of {layer.size} bytes recorded; the next run got {sent} bytes "
        f"from the seeder and {served} over HTTP (missing {missing})"
    )


def lan_or_skip(hosts: int, rate: str) -> lanmod.Lan:
    why = lanmod.unavailable()
    if why is not None:
        pytest.skip(why)
    return lanmod.Lan(hosts, rate)


def serve_in(
    lan: lanmod.Lan, cache_store: Fetchd, registry: Registry, log: Path, extra: list[str]
) -> subprocess.Popen[Any]:
    """`fetchd serve` on host 0 of the rig (its store filled beforehand: the registry on
    127.0.0.1 is not reachable from there); HTTP on :5050, BitTorrent on :6881."""
    argv = cache_store.argv(
        "-v", "serve", "--listen", f"{lan.addr(0)}:5050", *HTTP,
        "--upstream", f"{registry.host}={registry.url}", "--bt-listen", f"{lan.addr(0)}:6881",
        "--torrent-min-size", "1M", *extra,
    )  # fmt: skip
    with log.open("ab") as out:
        proc = lan.popen(0, argv, env=cache_store.env(), stdout=out, stderr=subprocess.STDOUT)
    lan.wait_tcp(1, lan.addr(0), 5050, timeout=30)
    return proc


def test_a_host_killed_mid_swarm_does_not_stop_the_other(
    registry: Registry, tmp_path: Path
) -> None:
    """Two hosts of a slow LAN pull one image through the cache's swarm at once: each
    takes its slices over HTTP and trades the rest with the other. Host A is killed -9
    once it has sent pieces to B and B holds part of a layer; B still commits (the
    pieces only A had come from the cache: a new slice round, or HTTP after a stall)."""
    image = publish(registry, tmp_path, "btp/twohosts", [3 * MiB, 3 * MiB + 4099], seed=1400)
    cache_store = new_fetchd(tmp_path, "lan-cache")
    ok(cache_store("pull", *HTTP, f"docker://{registry.host}/btp/twohosts:1", timeout=RUN_LIMIT))
    ref = f"docker://{registry.host}/btp/twohosts@{image.digest}"
    hosts = {i: new_fetchd(tmp_path, f"lan-host{i}") for i in (1, 2)}
    with lan_or_skip(2, "8mbit") as lan:
        serve_in(lan, cache_store, registry, tmp_path / "lan-serve.log", [])
        mirror = f"http://{lan.addr(0)}:5050"
        procs = {}
        for i, host in hosts.items():
            linger = ["--seed-linger", "60"] if i == 1 else []  # A stays until killed
            argv = host.argv(
                "-v", "pull", *HTTP, *TORRENT, "--mirror", mirror, "--mirror-only",
                "--bt-listen", f"{lan.addr(i)}:6881", *linger, ref,
            )  # fmt: skip
            with (tmp_path / f"host{i}.log").open("ab") as out:
                procs[i] = lan.popen(i, argv, env=host.env(), stdout=out, stderr=subprocess.STDOUT)
        a, b = procs[1], procs[2]
        a_base = lan.egress_bytes(1)

        def halfway() -> bool:
            assert b.poll() is None and a.poll() is None, "a pull ended before the kill"
            b_part = any(n >= PIECE for n in ingest_progress(hosts[2].store))
            # A's link carried more than its HTTP requests: pieces went to B
            return b_part and lan.egress_bytes(1) - a_base > 2 * PIECE

        wait_until(halfway, 60, "B to hold part of a layer and A to have sent pieces")
        a_sent = lan.egress_bytes(1) - a_base
        b_had = sum(ingest_progress(hosts[2].store))
        os.kill(a.pid, signal.SIGKILL)
        assert a.wait(10) == -signal.SIGKILL
        assert not {layer.digest for layer in image.layers} <= hosts[2].blobs()
        wait_until(lambda: b.poll() is not None, 90, "B to end", tmp_path / "host2.log")
    log_b = (tmp_path / "host2.log").read_text()
    assert b.returncode == 0, log_b
    assert image.digest in log_b.splitlines()
    # B got pieces from A over BitTorrent before A died (libtorrent's count, at B's exit)
    got = re.search(r"BitTorrent: sent \d+ bytes to peers, received (\d+)", log_b)
    assert got is not None and int(got.group(1)) >= PIECE, log_b
    for layer in image.layers:
        assert sha256_of(blob_file(hosts[2], layer.digest)) == layer.digest.removeprefix("sha256:")
    assert "ok" in ok(hosts[2]("fsck"))
    print(
        f"A killed after sending {a_sent} bytes; B had {b_had} bytes recorded, received "
        f"{got.group(1)} over BitTorrent in all, then committed"
    )


# --------------------------------------------------------------------------- acceptance 6
def test_sockets_of_pull_and_serve_only_on_the_bittorrent_address(
    registry: Registry, tmp_path: Path, fetchd: Fetchd
) -> None:
    """`ss -tuanp` of `pull --torrent --bt-listen 127.0.0.41` and of `serve --bt-listen
    127.0.0.42`: BitTorrent sockets on that address only, the pull's other sockets are
    its TCP connections to the cache (here a proxy in front of it, slices off, so the
    layer comes from a stock seeder the pull connects out to), serve's its HTTP port and
    its connections; no wildcard, nothing on 6771/1900/5351. With --lsd one socket more,
    udp 0.0.0.0:6771 (libtorrent binds the multicast port on the wildcard), nothing else."""
    image = publish(registry, tmp_path, "btp/ss", [4 * MiB], seed=1500)
    layer = image.layers[0]
    ref = f"docker://{registry.host}/btp/ss:1"
    pull_bt, serve_bt, seeder_host = "127.0.0.41", "127.0.0.42", "127.0.0.44"
    seen: dict[str, set[str]] = {}
    extra = ("--bt-listen", serve_bt)
    with warm_cache(registry, tmp_path, image, "btp/ss", extra) as (cache, store):
        t = torrent_from(cache, layer.digest, layer.size)
        seeder = LtSeeder(t, blob_file(store, layer.digest).parent, seeder_host, rate=1 * MiB)
        try:
            announce(cache, t, seeder.address, b"-LT2110-" + b"s" * 12)
            with bad_cache(cache.url, slices=False) as proxy:
                argv = fetchd.argv(
                    "pull", *HTTP, *TORRENT, "--bt-listen", pull_bt, "--seed-linger", "2",
                    "--mirror", proxy.url, ref,
                )  # fmt: skip
                with Proc(argv, tmp_path / "ss-pull.log", env=fetchd.env()) as pull:
                    pids = [pull.pid, cache.proc.pid]
                    seen["pull"], seen["serve"] = sample_sockets(pids, pull.running, 90)
                    assert pull.stop() == 0, (tmp_path / "ss-pull.log").read_text()
        finally:
            seeder.close()
        other = new_fetchd(tmp_path, "lsd-host")
        argv = other.argv(
            "pull", *HTTP, *TORRENT, "--bt-listen", pull_bt, "--lsd", "--seed-linger", "2",
            "--mirror", cache.url, ref,
        )  # fmt: skip
        with Proc(argv, tmp_path / "lsd-pull.log", env=other.env()) as pull:
            (seen["pull --lsd"],) = sample_sockets([pull.pid], pull.running, 90)
            assert pull.stop() == 0, (tmp_path / "lsd-pull.log").read_text()
        cache.stop()
        ups = [f"{registry.host}={registry.url}"]
        lsd_extra = ["--torrent-min-size", "1M", "--bt-listen", serve_bt, "--lsd"]
        with start_serve(store, ups, extra=lsd_extra) as lsd_cache:

            def seeding() -> bool:
                seen["serve --lsd"] = set(sockets_of(lsd_cache.proc.pid))
                return any(local_address(x).startswith(serve_bt) for x in seen["serve --lsd"])

            wait_until(seeding, 30, "serve --lsd to listen for BitTorrent")
            lsd_port = lsd_cache.port
    assert layer.digest in fetchd.blobs() and layer.digest in other.blobs()
    print(json.dumps({k: sorted(v) for k, v in seen.items()}, indent=1))
    http_peers = {f"127.0.0.1:{p}" for p in (proxy.server_address[1], cache.port)}
    http_peers.add(registry.host)
    for what in seen:
        for line in seen[what]:
            assert not any(f":{p}" in line for p in (6771, 1900, 5351)) or (
                "lsd" in what and line.startswith("udp ") and local_address(line) == LSD
            ), (what, line)

    def unexpected(lines: set[str], bt: str, http_port: int | None) -> list[str]:
        out = []
        for line in lines:
            proto, _, peer = line.split()
            here = local_address(line)
            if here.startswith(f"{bt}:"):
                continue  # BitTorrent: its listen sockets and its connections
            if proto == "tcp" and peer in http_peers:
                continue  # HTTP to the cache (or the proxy, or the origin)
            if http_port is not None and proto == "tcp" and here == f"127.0.0.1:{http_port}":
                continue  # serve's HTTP port: listening, and its accepted connections
            out.append(f"{proto} {here}")
        return sorted(out)

    # The BitTorrent session ran and used its address: listening, and connected out.
    assert any(x.startswith("tcp") and local_address(x).startswith(f"{pull_bt}:") and
               x.endswith(" 0.0.0.0:*") for x in seen["pull"]), seen["pull"]  # fmt: skip
    assert any(local_address(x).startswith(f"{pull_bt}:") and f" {seeder_host}:" in x
               for x in seen["pull"]), seen["pull"]  # fmt: skip
    assert any(local_address(x).startswith(f"{serve_bt}:") for x in seen["serve"]), seen
    assert unexpected(seen["pull"], pull_bt, None) == []
    assert unexpected(seen["serve"], serve_bt, cache.port) == []
    assert unexpected(seen["pull --lsd"], pull_bt, None) == [f"udp {LSD}"]
    assert unexpected(seen["serve --lsd"], serve_bt, lsd_port) == [f"udp {LSD}"]


# --------------------------------------------------------------------------- acceptance 3
def transmission_settings(directory: Path, ip: str, port: int) -> Path:
    """transmission-cli's config dir (after ../shared/peers/bt/t3_interop.py): no DHT,
    LPD, PEX, uTP or port mapping, bound to ``ip``."""
    directory.mkdir(parents=True)
    settings = {
        "dht-enabled": False, "lpd-enabled": False, "pex-enabled": False, "utp-enabled": False,
        "port-forwarding-enabled": False, "bind-address-ipv4": ip, "bind-address-ipv6": "::1",
        "peer-port": port, "peer-port-random-on-start": False, "rpc-enabled": False,
        "blocklist-enabled": False, "message-level": 2, "start-added-torrents": True,
    }  # fmt: skip
    (directory / "settings.json").write_text(json.dumps(settings))
    return directory


def metric(lan: lanmod.Lan, url: str, name: str) -> float:
    got = lan.run(1, ["curl", "-sf", f"{url}/metrics"], timeout=10)
    assert got.returncode == 0, got.stderr
    for line in got.stdout.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def test_transmission_leeches_from_serve_across_a_veth_pair(
    registry: Registry, tmp_path: Path
) -> None:
    """`fetchd serve` on one host of a LAN seeds a layer; transmission-cli on the other
    downloads it through serve's /announce, with the torrent from /fetchd/v1/torrents
    stripped of its url-list, so only the BitTorrent peer can deliver it."""
    image = publish(registry, tmp_path, "btp/transmission", [6 * MiB], seed=1600)
    layer = image.layers[0]
    hex = layer.digest.removeprefix("sha256:")
    cache_store = new_fetchd(tmp_path, "tr-cache")
    ok(
        cache_store(
            "pull", *HTTP, f"docker://{registry.host}/btp/transmission:1", timeout=RUN_LIMIT
        )
    )
    with lan_or_skip(1, "200mbit") as lan:
        serve = serve_in(lan, cache_store, registry, tmp_path / "tr-serve.log", [])
        url = f"http://{lan.addr(0)}:5050"
        served_file = tmp_path / "served.torrent"
        got = lan.run(
            1, ["curl", "-sf", "-o", str(served_file), f"{url}/fetchd/v1/torrents/{layer.digest}"]
        )
        assert got.returncode == 0, got.stderr
        doc = bdecode(served_file.read_bytes())
        assert isinstance(doc, dict) and doc[b"announce"] == f"{url}/announce".encode()
        assert b"url-list" in doc
        del doc[b"url-list"]
        torrent = tmp_path / f"{hex}.torrent"
        torrent.write_bytes(bencode(doc))
        up_before = metric(lan, url, "fetchd_bt_uploaded_bytes_total")
        http_before = metric(lan, url, "fetchd_bytes_served_total")
        cfg = transmission_settings(tmp_path / "tr-cfg", lan.addr(1), 51413)
        done = cfg / "done"
        script = cfg / "done.sh"
        script.write_text(f"#!/bin/sh\ntouch {done}\n")
        script.chmod(0o755)
        down = tmp_path / "tr-down"
        down.mkdir()
        argv = ["transmission-cli", "-g", str(cfg), "-w", str(down), "-p", "51413", "-M", "-B",
                "-U", "-D", "-f", str(script), str(torrent)]  # fmt: skip
        with (tmp_path / "transmission.log").open("ab") as out:
            leecher = lan.popen(1, argv, stdout=out, stderr=subprocess.STDOUT)
        wait_until(
            lambda: done.exists() or leecher.poll() is not None,
            90,
            "transmission to finish the download",
            tmp_path / "transmission.log",
        )
        assert done.exists(), (tmp_path / "transmission.log").read_text()[-2000:]
        lan.stop(leecher)
        wait_until(
            lambda: metric(lan, url, "fetchd_bt_uploaded_bytes_total") - up_before >= layer.size,
            10,
            "serve's fetchd_bt_uploaded_bytes_total to count the layer",
        )
        uploaded = metric(lan, url, "fetchd_bt_uploaded_bytes_total") - up_before
        http = metric(lan, url, "fetchd_bytes_served_total") - http_before
        lan.stop(serve)
    assert sha256_of(down / hex) == hex
    assert http < layer.size  # the bytes did not come over HTTP
    print(f"transmission got {layer.size} bytes; serve uploaded {uploaded:.0f}, HTTP {http:.0f}")
