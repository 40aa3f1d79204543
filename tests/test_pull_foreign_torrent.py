"""``fetchd pull --torrent FILE.torrent|URL`` (issue 12, acceptance 3): the single file of a
torrent someone else made, from someone else's seeders.

Real peers only, all on 127.0.0.1 (BITTORRENT.md §3; PEERS.md "BitTorrent peers"):
opentracker (Debian's build: whitelist only, ``-i 127.0.0.1`` first so it binds nothing
else), and an aria2c, a qBittorrent-nox and a transmission-cli seeder, each with DHT, LSD,
PeX and port mapping off. Torrents come from mktorrent, libtorrent's own creator (a hybrid,
as qBittorrent makes them) and transmission-create. A seeder is ready once the tracker's
scrape counts it complete: fetchd then gets it in its first announce. Files are small
(transmission unchokes after ~7 s and sends ~4.5 MiB/s).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import random
import shutil
import subprocess
import tempfile
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from fetchd.bt.metainfo import bdecode, bencode
from tests.support.cli import Fetchd, assert_stored, failed, ok
from tests.support.procs import Proc, free_port, wait_http, wait_until
from tests.support.qbittorrent import QBittorrent

MiB = 1 << 20
RUN_LIMIT = 90.0
READY = 30.0

pytestmark = pytest.mark.skipif(
    not all(
        shutil.which(p)
        for p in ("opentracker", "aria2c", "qbittorrent-nox", "transmission-cli", "mktorrent")
    ),
    reason="needs opentracker, aria2c, qbittorrent-nox, transmission-cli and mktorrent",
)


def make_file(directory: Path, name: str, size: int, seed: int) -> tuple[Path, str]:
    directory.mkdir(parents=True, exist_ok=True)
    data = random.Random(seed).randbytes(size)
    path = directory / name
    path.write_bytes(data)
    return path, "sha256:" + hashlib.sha256(data).hexdigest()


class Tracker:
    """opentracker on 127.0.0.1 for the given info-hashes (its whitelist, v1 and a
    hybrid's truncated v2 hash, written before it starts: it drops to nobody)."""

    def __init__(self, work: Path, port: int, hashes: list[bytes]) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}/announce"
        self._dir = Path(tempfile.mkdtemp(prefix="fd-ot-"))  # readable by nobody
        self._dir.chmod(0o755)
        whitelist = self._dir / "whitelist"
        whitelist.write_text("".join(h.hex() + "\n" for h in hashes))
        whitelist.chmod(0o644)
        argv = ["opentracker", "-i", "127.0.0.1", "-p", str(self.port), "-P", str(self.port)]
        self.proc = Proc([*argv, "-w", str(whitelist), "-d", "/"], work / "opentracker.log")
        wait_http(f"http://127.0.0.1:{self.port}/scrape", 10, proc=self.proc)

    def complete(self, ih: bytes) -> int:
        """Seeders the tracker counts for ``ih`` (its scrape)."""
        q = urllib.parse.quote_from_bytes(ih)
        url = f"http://127.0.0.1:{self.port}/scrape?info_hash={q}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            doc = bdecode(resp.read())
        assert isinstance(doc, dict)
        entry = doc.get(b"files", {}).get(ih, {})
        return int(entry.get(b"complete", 0))

    def wait_seeded(self, ih: bytes, log: Path) -> None:
        wait_until(lambda: self.complete(ih) >= 1, READY, "the seeder to announce itself", log)

    def close(self) -> None:
        self.proc.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


ARIA2 = [
    "aria2c",
    "--enable-dht=false",
    "--enable-dht6=false",
    "--bt-enable-lpd=false",
    "--enable-peer-exchange=false",
    "--disable-ipv6=true",
    "--interface=127.0.0.1",
    "--summary-interval=0",
    "--console-log-level=warn",
    "--file-allocation=none",
    "--auto-save-interval=0",
    "--follow-torrent=false",
    "--seed-ratio=0.0",
    "--check-integrity=true",
]


class Aria2Seed:
    def __init__(self, torrent: Path, data_dir: Path, work: Path) -> None:
        self.log = work / f"aria2-{torrent.stem}.log"
        argv = [*ARIA2, f"--listen-port={free_port()}", "-d", str(data_dir), str(torrent)]
        self.proc = Proc(argv, self.log)


def start_tracker(work: Path, torrent: Path, port: int) -> tuple[Tracker, bytes]:
    """opentracker for ``torrent`` (on the ``port`` its announce URL names); a hybrid's
    truncated v2 hash is whitelisted too (its leechers announce both)."""
    top = bdecode(torrent.read_bytes())
    assert isinstance(top, dict)
    info = bencode(top[b"info"])
    ih = hashlib.sha1(info).digest()
    return Tracker(work, port, [ih, hashlib.sha256(info).digest()[:20]]), ih


def mktorrent(path: Path, out: Path, announce: str) -> None:
    argv = ["mktorrent", "-a", announce, "-l", "18", "-o", str(out), str(path)]
    subprocess.run(argv, check=True, capture_output=True)


def run(fetchd: Fetchd, *args: str) -> subprocess.CompletedProcess[str]:
    return fetchd(*args, timeout=RUN_LIMIT)


def torrent_entries(fetchd: Fetchd) -> dict[str, str]:
    """The store's URL records of torrents: name → digest."""
    if not (fetchd.store / "layout" / "index.json").exists():
        return {}
    out = {}
    for m in fetchd.index().get("manifests", []):
        url = m.get("annotations", {}).get("io.fetchd.url", "")
        if url.startswith("torrent:"):
            out[url] = m["digest"]
    return out


# ----------------------------------------------------------------------------- aria2c
@pytest.fixture
def aria2_swarm(tmp_path: Path) -> Iterator[tuple[Path, str, bytes, Proc]]:
    """A 6 MiB file seeded by aria2c; its torrent made by mktorrent; opentracker."""
    data_dir = tmp_path / "aria2-data"
    path, digest = make_file(data_dir, "payload.bin", 6 * MiB + 12345, seed=1201)
    torrent = tmp_path / "payload.torrent"
    port = free_port()
    mktorrent(path, torrent, f"http://127.0.0.1:{port}/announce")
    tracker, ih = start_tracker(tmp_path, torrent, port)
    log = tmp_path / "aria2.log"
    argv = [*ARIA2, f"--listen-port={free_port()}", "-d", str(data_dir), str(torrent)]
    try:
        with Proc(argv, log) as seeder:
            tracker.wait_seeded(ih, log)
            yield torrent, digest, ih, seeder
    finally:
        tracker.close()


def test_aria2c_seeder_to_pull_torrent_with_digest(
    aria2_swarm: tuple[Path, str, bytes, Proc], fetchd: Fetchd
) -> None:
    torrent, digest, ih, seeder = aria2_swarm
    res = run(fetchd, "-v", "pull", "--torrent", str(torrent), "--digest", digest)
    assert ok(res).strip() == digest
    assert_stored(fetchd, digest, 6 * MiB + 12345)
    assert torrent_entries(fetchd) == {f"torrent:{ih.hex()}": digest}
    # The record keeps it: gc leaves it, and the next pull needs no peer at all.
    seeder.stop()
    ok(fetchd("gc"))
    again = run(fetchd, "-v", "pull", "--torrent", str(torrent))
    assert ok(again).strip() == digest
    assert "(present)" in again.stderr
    assert_stored(fetchd, digest, 6 * MiB + 12345)


def test_a_wrong_digest_fails_and_leaves_nothing_visible(
    aria2_swarm: tuple[Path, str, bytes, Proc], fetchd: Fetchd
) -> None:
    torrent, digest, _, _ = aria2_swarm
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    res = run(fetchd, "pull", "--torrent", str(torrent), "--digest", wrong)
    failed(res, "does not match its digest", wrong, digest)
    assert fetchd.blobs() == set()
    assert torrent_entries(fetchd) == {}
    assert fetchd.ingests() == []


# ----------------------------------------------------------------------------- qBittorrent
def hybrid_torrent(path: Path, out: Path, announce: str) -> None:
    """A hybrid (v1 + v2) torrent, as qBittorrent 4.5 makes them (libtorrent's default)."""
    import libtorrent as lt

    ct = lt.create_torrent(lt.list_files(str(path)))
    ct.add_tracker(announce)
    lt.set_piece_hashes(ct, str(path.parent))
    out.write_bytes(lt.bencode(ct.generate()))


class _Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_qbittorrent_seeder_to_pull_torrent_by_url(tmp_path: Path, fetchd: Fetchd) -> None:
    """A hybrid torrent fetched over http:// (refused without --insecure-options http),
    qBittorrent-nox seeding; no --digest: stored under the sha256 fetchd computed."""
    data_dir = tmp_path / "qbt-data"
    size = 5 * MiB + 777
    path, digest = make_file(data_dir, "image.raw", size, seed=1202)
    served = tmp_path / "served"
    served.mkdir()
    torrent = served / "image.torrent"
    port = free_port()
    hybrid_torrent(path, torrent, f"http://127.0.0.1:{port}/announce")
    assert b"meta version" in torrent.read_bytes() and b"pieces" in torrent.read_bytes()
    tracker, ih = start_tracker(tmp_path, torrent, port)
    handler = lambda *a: _Files(*a, directory=str(served))  # noqa: E731
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{files.server_address[1]}/image.torrent"
    try:
        with QBittorrent(tmp_path / "qbt") as qbt:
            qbt.seed(torrent, data_dir)
            tracker.wait_seeded(ih, qbt.proc.log_path)
            qbt.proc.check_running()

            plain = run(fetchd, "pull", "--torrent", url)
            failed(plain, "plain HTTP", "--insecure-options http")
            res = run(fetchd, "pull", "--torrent", "--insecure-options", "http", url)
    finally:
        files.shutdown()
        files.server_close()
        tracker.close()
    assert ok(res).strip() == digest
    assert_stored(fetchd, digest, size)
    assert torrent_entries(fetchd) == {f"torrent:{ih.hex()}": digest}


# ----------------------------------------------------------------------------- transmission
def test_transmission_seeder_to_pull_torrent(tmp_path: Path, fetchd: Fetchd) -> None:
    data_dir = tmp_path / "tr-data"
    size = 4 * MiB + 4321
    path, digest = make_file(data_dir, "disk.img", size, seed=1203)
    torrent = tmp_path / "disk.torrent"
    port = free_port()
    argv = ["transmission-create", "-o", str(torrent), "-t", f"http://127.0.0.1:{port}/announce"]
    subprocess.run([*argv, "-s", "256", str(path)], check=True, capture_output=True)
    tracker, ih = start_tracker(tmp_path, torrent, port)
    cfg = tmp_path / "tr-config"
    cfg.mkdir()
    peer_port = free_port()
    settings = {
        "dht-enabled": False,
        "lpd-enabled": False,
        "pex-enabled": False,
        "utp-enabled": False,
        "port-forwarding-enabled": False,
        "bind-address-ipv4": "127.0.0.1",
        "bind-address-ipv6": "::1",
        "peer-port": peer_port,
        "peer-port-random-on-start": False,
        "rpc-enabled": False,
        "blocklist-enabled": False,
        "start-added-torrents": True,
    }
    (cfg / "settings.json").write_text(json.dumps(settings))
    log = tmp_path / "transmission.log"
    seed = ["transmission-cli", "-g", str(cfg), "-w", str(data_dir), "-p", str(peer_port)]
    try:
        with Proc([*seed, "-M", "-B", "-U", "-D", str(torrent)], log):
            tracker.wait_seeded(ih, log)
            res = run(fetchd, "pull", "--torrent", str(torrent), "--digest", digest)
    finally:
        tracker.close()
    assert ok(res).strip() == digest
    assert_stored(fetchd, digest, size)


# ----------------------------------------------------------------------------- refused
def test_hostile_torrents_are_refused_before_any_peer(tmp_path: Path, fetchd: Fetchd) -> None:
    port = free_port()  # nothing listens: a refused torrent never gets that far
    tree = tmp_path / "tree"
    make_file(tree, "a", 40000, seed=1)
    make_file(tree, "b", 50000, seed=2)
    multi = tmp_path / "multi.torrent"
    mktorrent(tree, multi, f"http://127.0.0.1:{port}/announce")
    top = bdecode(multi.read_bytes())
    assert isinstance(top, dict)
    top[b"info"][b"files"][0][b"path"] = [b"..", b"..", b"etc", b"cron.d", b"x"]
    evil = tmp_path / "evil.torrent"
    evil.write_bytes(bencode(top))
    res = run(fetchd, "pull", "--torrent", str(evil))
    failed(res, "torrent refused", "multi-file")

    huge = tmp_path / "huge.torrent"
    with huge.open("wb") as f:
        f.truncate(9 * MiB)
    failed(run(fetchd, "pull", "--torrent", str(huge)), "torrent refused", "bytes")

    garbage = tmp_path / "garbage.torrent"
    garbage.write_bytes(b"<html>not a torrent</html>")
    failed(run(fetchd, "pull", "--torrent", str(garbage)), "torrent refused")

    magnet = "magnet:?xt=urn:btih:" + "ab" * 20
    failed(run(fetchd, "pull", "--torrent", magnet), "magnet links need DHT or a peer")
    failed(run(fetchd, "pull", str(multi)), "pass --torrent")

    assert fetchd.blobs() == set()
    assert torrent_entries(fetchd) == {}
    assert not (tmp_path / "etc").exists()
