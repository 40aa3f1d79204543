"""BitTorrent peers for tests: blobs and their torrents, fetchd Swarms in subprocesses,
a plain libtorrent seeder with an upload limit (the "someone else's client" of a swarm),
and a lying raw peer (a test double of someone else's misbehaving peer).

Adapted from the probes in ../shared/peers/bt/ (btcommon.py, rawpeer.py, ltpeer.py).
Everything listens on 127.0.0.x only. Run as a module for the subprocess roles:

  python -m tests.support.btpeers seed --listen ADDR:PORT --blobs DIR [--lsd] TORRENT...
      a fetchd Swarm seeding each TORRENT file (named HEX.torrent) from DIR; prints
      {"address": [host, port]} once seeding, then {"corrupt": HEX} per on_corrupt; runs
      until stdin closes.
  python -m tests.support.btpeers ltseed --host ADDR --blobs DIR --torrent F [--rate B/s]
      a plain libtorrent seeder (LtSeeder) in its own process, to be killed; prints
      {"address": …}; runs until stdin closes.
  python -m tests.support.btpeers download --listen ADDR:PORT --torrent F --dir D
          --name N --peer HOST:PORT [--stall S]
      a fetchd Swarm download; prints {"address": …}, then {"piece": i} per on_piece and
      {"done": true} or {"failed": message}.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
BLOCK = 16 << 10


# ----------------------------------------------------------------------------- blobs
def make_blob(directory: Path, size: int, seed: int, mode: int = 0o444) -> tuple[Path, str]:
    """A file of ``size`` pseudo-random bytes named by its sha256 hex: (path, hex)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = random.Random(seed).randbytes(size)
    hex = hashlib.sha256(data).hexdigest()
    path = directory / hex
    path.write_bytes(data)
    path.chmod(mode)
    return path, hex


def torrent_of(path: Path, hex: str) -> Any:
    """fetchd's canonical torrent of the blob at ``path`` (metainfo.build_from_file when
    helper A's module is there; until then a stand-in with the same attributes)."""
    try:
        from fetchd.bt import metainfo
    except ImportError:
        return _StandIn.build(path.read_bytes(), hex)
    return metainfo.build_from_file(path, hex, path.stat().st_size)


def torrent_from_raw(raw: bytes, hex: str, size: int) -> Any:
    """The torrent whose canonical file is ``raw`` (metainfo.canonical when there)."""
    try:
        from fetchd.bt import metainfo
    except ImportError:
        return _StandIn.from_raw(raw, hex, size)
    return metainfo.canonical(raw, hex, size)


def _bencode(v: object) -> bytes:
    if isinstance(v, int):
        return b"i%de" % v
    if isinstance(v, bytes):
        return b"%d:%s" % (len(v), v)
    if isinstance(v, dict):
        return b"d" + b"".join(_bencode(k) + _bencode(v[k]) for k in sorted(v)) + b"e"
    raise TypeError(type(v))


def _piece_length(size: int) -> int:
    p = 256 << 10
    while p < 16 * MiB and (size + p - 1) // p > 2048:
        p *= 2
    return p


@dataclass(frozen=True)
class _StandIn:
    """The attributes of metainfo.Torrent that tests and fetchd.bt.session use."""

    hex: str
    size: int
    piece_length: int
    pieces: bytes

    @classmethod
    def build(cls, data: bytes, hex: str) -> _StandIn:
        plen = _piece_length(len(data))
        pieces = b"".join(
            hashlib.sha1(data[o : o + plen]).digest() for o in range(0, len(data), plen)
        )
        return cls(hex, len(data), plen, pieces)

    @classmethod
    def from_raw(cls, raw: bytes, hex: str, size: int) -> _StandIn:
        plen = _piece_length(size)
        n = (size + plen - 1) // plen
        t = cls(hex, size, plen, raw[-(20 * n) - 2 : -2])
        assert t.raw == raw
        return t

    @property
    def info(self) -> bytes:
        return _bencode(
            {
                b"length": self.size,
                b"name": self.hex.encode(),
                b"piece length": self.piece_length,
                b"pieces": self.pieces,
            }
        )

    @property
    def raw(self) -> bytes:
        return b"d4:info" + self.info + b"e"

    @property
    def info_hash(self) -> bytes:
        return hashlib.sha1(self.info).digest()

    @property
    def num_pieces(self) -> int:
        return len(self.pieces) // 20

    def span(self, i: int) -> tuple[int, int]:
        return i * self.piece_length, min(self.size, (i + 1) * self.piece_length)


# ------------------------------------------------------------ torrents made by others
def mktorrent(
    path: Path,
    name: str,
    piece_log2: int,
    *,
    announce: str | None = None,
    web_seed: str | None = None,
) -> bytes:
    """The .torrent mktorrent makes of the file at ``path`` (name ``name``, pieces of
    2**piece_log2 bytes; it adds "created by" and "creation date" too)."""
    import subprocess

    out = path.parent / f"{name}.{os.getpid()}.torrent"
    argv = ["mktorrent", "-l", str(piece_log2), "-n", name, "-o", str(out)]
    if announce:
        argv += ["-a", announce]
    if web_seed:
        argv += ["-w", web_seed]
    subprocess.run([*argv, str(path)], check=True, capture_output=True, timeout=60)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


@dataclass(frozen=True)
class ForeignTorrent:
    """A foreign torrent as fetchd.bt.session.Metainfo: filed under its v1 info-hash."""

    raw: bytes
    hex: str
    size: int
    piece_length: int

    @property
    def num_pieces(self) -> int:
        return -(-self.size // self.piece_length)

    def span(self, i: int) -> tuple[int, int]:
        return i * self.piece_length, min(self.size, (i + 1) * self.piece_length)

    @property
    def info_only(self) -> ForeignTorrent:
        """The same torrent without announce, url-list or anything else outside info."""
        from fetchd.bt import metainfo

        info_raw = metainfo.parse_foreign(self.raw).info_raw
        return ForeignTorrent(b"d4:info" + info_raw + b"e", self.hex, self.size, self.piece_length)


def foreign_of(raw: bytes) -> ForeignTorrent:
    from fetchd.bt import metainfo

    f = metainfo.parse_foreign(raw)
    return ForeignTorrent(raw, f.info_hash_hex, f.length, f.piece_length)


class Listener:
    """A TCP port on (host, 0) that accepts and closes connections, counting them: stands
    for a tracker or web seed that must never be contacted."""

    def __init__(self, host: str) -> None:
        self.connections = 0
        self._srv = socket.socket()
        self._srv.bind((host, 0))
        self._srv.listen(16)
        self._srv.settimeout(0.2)
        self._stop = threading.Event()
        self.address: tuple[str, int] = self._srv.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            c.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._srv.close()


# ------------------------------------------------------------ a plain libtorrent seeder
class LtSeeder:
    """A stock libtorrent session seeding one blob (another client in the swarm), its
    upload limited to ``rate`` bytes/s (0: none) so that a test can act half-way. Every
    address is put in the global peer class: loopback peers are otherwise "local" and
    unlimited (BITTORRENT.md §6.3). Safe settings: one address, no DHT/LSD/UPnP."""

    def __init__(self, t: Any, blob_dir: Path, host: str, rate: int = 0) -> None:
        import libtorrent as lt

        self.lt = lt
        self.ses = lt.session(
            {
                "listen_interfaces": f"{host}:0",
                "outgoing_interfaces": host,
                "enable_dht": False,
                "enable_lsd": False,
                "enable_upnp": False,
                "enable_natpmp": False,
                "enable_incoming_utp": False,
                "enable_outgoing_utp": False,
                "allow_multiple_connections_per_ip": True,
                "upload_rate_limit": rate,
                "alert_mask": 0,
            }
        )
        if rate:
            f = lt.ip_filter()
            f.add_rule("0.0.0.0", "255.255.255.255", 1 << self.ses.global_peer_class_id)
            self.ses.set_peer_class_filter(f)
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(t.raw)
        atp.save_path = str(blob_dir)
        tf = lt.torrent_flags
        atp.flags = (int(tf.default_flags) & ~int(tf.auto_managed) & ~int(tf.paused)) | int(
            tf.seed_mode | tf.upload_mode
        )
        self.handle = self.ses.add_torrent(atp)
        deadline = time.monotonic() + 10
        while not self.ses.listen_port() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.address = (host, int(self.ses.listen_port()))

    def uploaded(self) -> int:
        return int(self.handle.status().total_payload_upload)

    def set_rate(self, rate: int) -> None:
        self.ses.apply_settings({"upload_rate_limit": rate})

    def connect(self, host: str, port: int) -> None:
        self.handle.connect_peer((host, port))

    def close(self) -> None:
        self.ses.remove_torrent(self.handle)
        del self.handle
        del self.ses  # the destructor stops libtorrent's threads


# ------------------------------------------------------------ a lying peer (rawpeer.py)
PSTR = b"\x13BitTorrent protocol"


def _msg(mid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IB", 1 + len(payload), mid) + payload


def _recv_exact(s: socket.socket, n: int) -> bytes:
    b = bytearray()
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise ConnectionError("eof")
        b += c
    return bytes(b)


class Liar:
    """A raw BEP 3 peer on (host, 0) that claims every piece (or only those of
    ``pieces``) and answers each request with random bytes; counts connections and the
    blocks it lied with."""

    def __init__(
        self, host: str, info_hash: bytes, num_pieces: int, pieces: Iterable[int] | None = None
    ) -> None:
        self.ih, self.n = info_hash, num_pieces
        self.pieces = sorted(range(num_pieces) if pieces is None else pieces)
        self.connections = 0
        self.bad_blocks = 0
        self._stop = threading.Event()
        self._srv = socket.socket()
        self._srv.bind((host, 0))
        self._srv.listen(16)
        self._srv.settimeout(0.2)
        self.address: tuple[str, int] = self._srv.getsockname()[:2]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(0.5)
        try:
            hs = _recv_exact(c, 68)
            if hs[28:48] != self.ih:
                return
            c.sendall(PSTR + bytes(8) + self.ih + b"-XX0001-" + os.urandom(6).hex().encode())
            bits = bytearray((self.n + 7) // 8)
            for i in self.pieces:
                bits[i // 8] |= 0x80 >> (i % 8)
            c.sendall(_msg(5, bytes(bits)) + _msg(1))  # bitfield, unchoke
            while not self._stop.is_set():
                try:
                    (n,) = struct.unpack(">I", _recv_exact(c, 4))
                except TimeoutError:
                    continue
                body = _recv_exact(c, n) if n else b""
                if body[:1] == b"\x06":  # request
                    idx, begin, ln = struct.unpack(">III", body[1:13])
                    self.bad_blocks += 1
                    c.sendall(_msg(7, struct.pack(">II", idx, begin) + os.urandom(ln)))
        except (OSError, ConnectionError, struct.error):
            pass
        finally:
            c.close()

    def close(self) -> None:
        self._stop.set()
        self._srv.close()
        for t in self._threads:
            t.join(5)


# ----------------------------------------------------------------------------- sockets of a process
def sockets_of(pid: int) -> list[str]:
    """``ss -tuanpH`` lines of process ``pid``, as "PROTO LOCAL PEER"."""
    import subprocess

    out = subprocess.run(["ss", "-tuanpH"], capture_output=True, text=True, check=True).stdout
    me = f"pid={pid},"
    return sorted(
        " ".join(line.split()[i] for i in (0, 4, 5)) for line in out.splitlines() if me in line
    )


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise LookupError("VmHWM")


# ----------------------------------------------------------------------------- subprocess roles
def _emit(obj: object) -> None:
    print(json.dumps(obj), flush=True)


async def _stdin_closed() -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.buffer.read)


def _config(lsd: bool) -> Any:
    from fetchd.config import Config

    return Config(store=Path("/nonexistent"), lsd=lsd)


def _load(torrent: str, blobs: str | None, size: int | None = None) -> Any:
    """The torrent in file ``torrent`` (named HEX.torrent) of a blob of ``size`` bytes
    (or of the blob HEX in ``blobs``)."""
    p = Path(torrent)
    hex = p.name.removesuffix(".torrent")
    if size is None:
        size = (Path(str(blobs)) / hex).stat().st_size
    return torrent_from_raw(p.read_bytes(), hex, size)


async def _seed(args: argparse.Namespace) -> None:
    from fetchd.bt.session import Swarm

    swarm = Swarm(_config(args.lsd), args.listen, on_corrupt=lambda h: _emit({"corrupt": h}))
    await swarm.start()
    try:
        for t in args.loaded:
            await swarm.seed(t, Path(args.blobs))
        _emit({"address": list(swarm.address), "seeding": len(swarm.seeding())})
        await _stdin_closed()
        _emit({"seeding": sorted(swarm.seeding())})
    finally:
        await swarm.close()


async def _download(args: argparse.Namespace) -> None:
    from fetchd.bt.session import Swarm
    from fetchd.errors import SwarmFailed

    swarm = Swarm(_config(False), args.listen)
    await swarm.start()
    try:
        _emit({"address": list(swarm.address)})
        t = args.loaded[0]
        host, _, port = args.peer.rpartition(":")
        try:
            await swarm.download(
                t,
                Path(args.dir),
                args.name,
                peers=[(host, int(port))],
                on_piece=lambda i: _emit({"piece": i}),
                stall_timeout=args.stall,
                max_hash_failures=3,
            )
            _emit({"done": True})
        except SwarmFailed as exc:
            _emit({"failed": str(exc)})
        await _stdin_closed()
    finally:
        await swarm.close()


async def _ltseed(args: argparse.Namespace) -> None:
    seeder = LtSeeder(args.loaded[0], Path(args.blobs), args.host, args.rate)
    _emit({"address": list(seeder.address)})
    await _stdin_closed()
    seeder.close()


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="btpeers")
    sub = ap.add_subparsers(dest="role", required=True)
    s = sub.add_parser("seed")
    s.add_argument("--listen", required=True)
    s.add_argument("--blobs", required=True)
    s.add_argument("--lsd", action="store_true")
    s.add_argument("torrents", nargs="+")
    d = sub.add_parser("download")
    d.add_argument("--listen", required=True)
    d.add_argument("--torrent", required=True)
    d.add_argument("--size", type=int, required=True)
    d.add_argument("--dir", required=True)
    d.add_argument("--name", required=True)
    d.add_argument("--peer", required=True)
    d.add_argument("--stall", type=float, default=10.0)
    t = sub.add_parser("ltseed")
    t.add_argument("--host", required=True)
    t.add_argument("--blobs", required=True)
    t.add_argument("--torrent", required=True)
    t.add_argument("--rate", type=int, default=0)
    args = ap.parse_args(argv)
    if args.role == "seed":
        args.loaded = [_load(f, args.blobs) for f in args.torrents]
    elif args.role == "download":
        args.loaded = [_load(args.torrent, None, args.size)]
    else:
        args.loaded = [_load(args.torrent, args.blobs)]
    roles = {"seed": _seed, "download": _download, "ltseed": _ltseed}
    asyncio.run(roles[args.role](args))


if __name__ == "__main__":
    main(sys.argv[1:])
