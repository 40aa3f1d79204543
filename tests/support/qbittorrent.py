"""qbittorrent-nox as a peer in tests: a profile of its own (DHT, LSD, PeX and UPnP off;
peers and its Web API on 127.0.0.1 only), driven through its Web API with curl."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from fetchd.bt.metainfo import bencode

from .procs import Proc, free_port, wait_until


def info_hash(torrent: dict[bytes, Any]) -> bytes:
    """The v1 info-hash of a decoded torrent."""
    return hashlib.sha1(bencode(torrent[b"info"])).digest()


QBT_CONF = r"""[LegalNotice]
Accepted=true

[BitTorrent]
Session\DHTEnabled=false
Session\LSDEnabled=false
Session\PeXEnabled=false
Session\Port={port}
Session\Interface=lo
Session\InterfaceName=lo
Session\InterfaceAddress=127.0.0.1
Session\MultiConnectionsPerIp=true
Session\BTProtocol=TCP
Session\QueueingSystemEnabled=false
Session\DefaultSavePath={save}
Session\TempPathEnabled=false
Session\AddTrackersEnabled=false

[Preferences]
Connection\UPnP=false
WebUI\Address=127.0.0.1
WebUI\Port={webui}
WebUI\LocalHostAuth=false
WebUI\CSRFProtection=false
WebUI\HostHeaderValidation=false
WebUI\UseUPnP=false
Advanced\trackerEnabled=false
"""
QBT_TIMEOUT = 60.0


class QBittorrent:
    """qbittorrent-nox with a profile of its own (DHT, LSD, PeX and UPnP off; peers and
    its Web API on 127.0.0.1 only), driven through its Web API with curl; stopped by PID."""

    def __init__(self, root: Path) -> None:
        config = root / "profile" / "qBittorrent" / "config"
        config.mkdir(parents=True)
        self.webui = free_port()
        config.joinpath("qBittorrent.conf").write_text(
            QBT_CONF.format(port=free_port(), webui=self.webui, save=root / "downloads")
        )
        self.api = f"http://127.0.0.1:{self.webui}/api/v2"
        argv = ["qbittorrent-nox", f"--profile={root / 'profile'}", f"--webui-port={self.webui}"]
        self.proc = Proc(argv, root / "qbittorrent.log")
        wait_until(self._up, 30, "qbittorrent-nox's Web API", self.proc.log_path)

    def _up(self) -> bool:
        self.proc.check_running()
        return self._curl("/app/version").returncode == 0

    def _curl(self, path: str, *form: str) -> subprocess.CompletedProcess[str]:
        argv = ["curl", "-sf", "-m", "10", f"{self.api}{path}"]
        for field in form:
            argv += ["-F", field]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    def seed(self, torrent: Path, save: Path) -> None:
        """Add ``torrent`` whose file is already in ``save``, unchecked: it seeds at once."""
        added = self._curl(
            "/torrents/add",
            f"torrents=@{torrent}",
            f"savepath={save}",
            "skip_checking=true",
            "paused=false",
        )
        assert added.returncode == 0, added

    def download(self, torrent: dict[bytes, Any], work: Path) -> Path:
        """Add ``torrent`` (saved into work/dl) and wait until qBittorrent has it all."""
        work.mkdir(parents=True)
        (work / "x.torrent").write_bytes(bencode(torrent))
        added = self._curl(
            "/torrents/add", f"torrents=@{work / 'x.torrent'}", f"savepath={work / 'dl'}"
        )
        assert added.returncode == 0, added
        ih = info_hash(torrent).hex()

        def done() -> bool:
            self.proc.check_running()
            listed = self._curl(f"/torrents/info?hashes={ih}")
            info = json.loads(listed.stdout or "[]")
            return bool(info) and info[0]["progress"] >= 1 and info[0]["state"] in SEEDING

        wait_until(done, QBT_TIMEOUT, "qBittorrent to download the blob", self.proc.log_path)
        name: bytes = torrent[b"info"][b"name"]
        path = work / "dl" / name.decode()
        # "Complete" is a state of its pieces; its last write may still be on its way.
        want = torrent[b"info"][b"length"]
        wait_until(lambda: path.exists() and path.stat().st_size == want, 10, "its file")
        return path

    def __enter__(self) -> QBittorrent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.stop()


SEEDING = ("uploading", "stalledUP", "forcedUP", "queuedUP", "pausedUP")
