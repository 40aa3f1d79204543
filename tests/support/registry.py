"""The real distribution registry (Debian `docker-registry` 2.8) on 127.0.0.1, and its access log.

The registry writes one combined-format access line per request when the handler returns,
which can be a moment after the client has read the whole response:

    127.0.0.1 - - [29/Nov/2026:09:09:06 +0000] "GET /v2/x/blobs/sha256:… HTTP/1.1" 200 134 "" "UA"

Request headers (Range included) are not logged; a 206 status tells a ranged GET. To read the
log without racing the registry, `requests()` first calls `settle()`: it sends a marker request
of its own and polls until the marker's line is in the log. Requests that are still in flight
at that moment (a client that has not finished reading) may be missing.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .procs import Proc, free_port, http_status, wait_http, wait_until

START_TIMEOUT = 15.0
SETTLE_TIMEOUT = 5.0
SETTLE_PATH = "/v2/?support-settle="

_ACCESS_LINE = re.compile(
    r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" '
    r'(?P<status>\d{3}) (?P<bytes>\d+|-) "[^"]*" "(?P<agent>[^"]*)"'
)


@dataclass(frozen=True)
class LogLine:
    """One access-log line; `path` includes the query string. (The line names no user.)"""

    method: str
    path: str
    status: int
    bytes: int
    user_agent: str

    @property
    def blob_digest(self) -> str | None:
        """The digest of a /v2/NAME/blobs/DIGEST request (uploads excluded), else None."""
        match = re.fullmatch(r"/v2/.+/blobs/([a-z0-9]+:[a-f0-9]+)", self.path.split("?", 1)[0])
        return match.group(1) if match else None


def _unverified_context() -> ssl.SSLContext:
    # Only for our own probes of our own registry: the registry does not know which CA signed it.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Registry:
    """A registry started by start_registry; a context manager that stops it."""

    def __init__(self, proc: Proc, host: str, url: str, storage_dir: Path) -> None:
        self.proc = proc
        self.host = host
        self.port = int(host.rsplit(":", 1)[1])
        self.url = url
        self.storage_dir = storage_dir
        self.log_path = proc.log_path
        self._probe_context = _unverified_context() if url.startswith("https:") else None
        self._markers = itertools.count()

    def wait_ready(self) -> None:
        """Wait until /v2/ answers (200, or 401 with auth); fail at once if the registry exits."""
        wait_http(f"{self.url}/v2/", START_TIMEOUT, self._probe_context, proc=self.proc)

    def stop(self) -> None:
        self.proc.stop()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _log_lines(self) -> list[LogLine]:
        lines = []
        for raw in self.log_path.read_text(errors="replace").splitlines():
            match = _ACCESS_LINE.match(raw)
            if match:
                lines.append(
                    LogLine(
                        method=match["method"],
                        path=match["path"],
                        status=int(match["status"]),
                        bytes=0 if match["bytes"] == "-" else int(match["bytes"]),
                        user_agent=match["agent"],
                    )
                )
        return lines

    def settle(self) -> None:
        """Wait until every request answered before this call is in the access log."""
        if not self.proc.running():
            return  # stopped: the log is complete
        marker = f"{SETTLE_PATH}{next(self._markers)}"
        http_status(f"{self.url}{marker}", self._probe_context)
        wait_until(
            lambda: any(line.path == marker for line in self._log_lines()),
            SETTLE_TIMEOUT,
            f"the registry to log {marker}",
            self.log_path,
        )

    def requests(
        self, method: str | None = None, path_contains: str | None = None
    ) -> list[LogLine]:
        """Access-log lines so far (after settle()), without our own markers, filtered."""
        self.settle()
        return [
            line
            for line in self._log_lines()
            if not line.path.startswith(SETTLE_PATH)
            and (method is None or line.method == method)
            and (path_contains is None or path_contains in line.path)
        ]

    def blob_gets(self, digest: str | None = None) -> list[LogLine]:
        """GETs of blobs (any status), of one digest if given."""
        return [
            line
            for line in self.requests("GET")
            if line.blob_digest is not None and digest in (None, line.blob_digest)
        ]

    def blob_get_count(self, digest: str | None = None) -> int:
        return len(self.blob_gets(digest))

    def blob_bytes_sent(self, digest: str) -> int:
        """Body bytes the registry wrote for GETs of this blob (full and ranged)."""
        return sum(line.bytes for line in self.blob_gets(digest))


def start_registry(
    workdir: Path,
    *,
    tls: tuple[Path, Path] | None = None,
    auth: dict[str, Any] | None = None,
    proxy_remote_url: str | None = None,
) -> Registry:
    """Start a registry on a free port and wait until /v2/ answers (200, or 401 with auth).

    tls is (certificate, key); auth goes verbatim into the config's `auth:` section;
    proxy_remote_url makes it a pull-through cache of that registry. Storage, config and
    log live in workdir.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    host = f"127.0.0.1:{free_port()}"
    storage_dir = workdir / "storage"
    http: dict[str, Any] = {"addr": host, "secret": secrets.token_hex(16)}
    if tls:
        http["tls"] = {"certificate": str(tls[0]), "key": str(tls[1])}
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "info", "accesslog": {"disabled": False}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage_dir)},
            "delete": {"enabled": True},
        },
        "http": http,
    }
    if auth is not None:
        config["auth"] = auth
    if proxy_remote_url is not None:
        config["proxy"] = {"remoteurl": proxy_remote_url}
    config_path = workdir / "config.yml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    proc = Proc(["docker-registry", "serve", str(config_path)], workdir / "registry.log")
    registry = Registry(proc, host, f"{'https' if tls else 'http'}://{host}", storage_dir)
    try:
        registry.wait_ready()
    except BaseException:
        registry.stop()
        raise
    return registry
