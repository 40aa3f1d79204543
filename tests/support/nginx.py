"""nginx (Debian 1.22) on free loopback ports: the real range server, and a speed anchor.

start_nginx() writes a config into workdir and runs `nginx -c CONF -p WORKDIR -e ERRLOG` in the
foreground (`daemon off`), stopped by its PID. It serves `root` as static files over HTTP and,
given a certificate and key, over HTTPS too; Range (206, 416, If-Range), ETag, Last-Modified
and conditional GETs (304) work out of the box. Running as root, the config says `user root;`:
otherwise the worker runs as `nobody` and cannot read files under a 0700 temporary directory
(every open fails with 403).

The access log is one JSON object per line (`log_format … escape=json`, see LOG_FORMAT): method,
URI, status, $body_bytes_sent, the Range / If-Range / If-None-Match / If-Modified-Since request
headers, $connection and whether the request completed. nginx writes a request's line when the
request ends, including a request whose client went away mid-body: then `completed` is False
and `body_bytes` is what nginx wrote into the socket, which is MORE than the client received by
whatever sat in the kernel's socket buffers (the server's send buffer plus the client's receive
buffer). Measured here with a client reading N bytes then killing itself with SIGKILL, over
HTTP (sendfile) and HTTPS: N = 1 MB → 4.9 / 2.7 MB logged, 10 MB → 10.3 / 13.7 MB, 30 MB →
31.8 / 32.7 MB, i.e. up to ~4 MB more per connection (tcp_wmem max is 4 MiB; tcp_rmem max,
which receive autotuning may reach, is 32 MiB). Count that slack per connection when bounding
"bytes sent over two runs".

`settle()` makes the log complete up to now: it sends a marker request of its own and polls until
the marker's line is there. A response still being written (a live client that stalls, or one
nginx has not yet noticed is gone) is not logged yet: `wait_idle()` polls nginx's stub_status
until no response other than its own is being written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .procs import Proc, free_port, http_status, wait_http, wait_until

START_TIMEOUT = 15.0
SETTLE_TIMEOUT = 5.0
IDLE_TIMEOUT = 10.0
SETTLE_PREFIX = "/.support-settle/"
STATUS_PATH = "/.support-status"
MAKE_FILE_CHUNK = 8 * 1024 * 1024

# One JSON object per request. escape=json: unset variables are "", quotes/controls escaped.
LOG_FORMAT = (
    '{"msec":"$msec","method":"$request_method","uri":"$request_uri","status":"$status",'
    '"body_bytes":"$body_bytes_sent","bytes_sent":"$bytes_sent","range":"$http_range",'
    '"if_range":"$http_if_range","if_none_match":"$http_if_none_match",'
    '"if_modified_since":"$http_if_modified_since","connection":"$connection",'
    '"connection_requests":"$connection_requests","completion":"$request_completion",'
    '"https":"$https","user_agent":"$http_user_agent"}'
)
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_UNSAFE_VALUE = re.compile(r'["\\${};\x00-\x1f\x7f]')


@dataclass(frozen=True)
class NginxLogLine:
    """One access-log line. Request headers that were absent are None."""

    msec: float  # when the request ended (Unix time, ms resolution)
    method: str
    uri: str  # as requested, with the query string
    status: int
    body_bytes: int  # $body_bytes_sent: body bytes written to the socket (see module doc)
    bytes_sent: int  # headers included
    range: str | None
    if_range: str | None
    if_none_match: str | None
    if_modified_since: str | None
    connection: int  # nginx's connection serial number: same number, same TCP connection
    connection_requests: int  # the request's number on its connection (1 = first)
    completed: bool  # False when the client went away before the response was written
    https: bool
    user_agent: str

    @property
    def path(self) -> str:
        """The URI without its query string."""
        return self.uri.split("?", 1)[0]

    @classmethod
    def parse(cls, raw: str) -> NginxLogLine:
        fields = json.loads(raw)

        def header(name: str) -> str | None:
            value: str = fields[name]
            return value or None

        return cls(
            msec=float(fields["msec"]),
            method=fields["method"],
            uri=fields["uri"],
            status=int(fields["status"]),
            body_bytes=int(fields["body_bytes"] or 0),
            bytes_sent=int(fields["bytes_sent"] or 0),
            range=header("range"),
            if_range=header("if_range"),
            if_none_match=header("if_none_match"),
            if_modified_since=header("if_modified_since"),
            connection=int(fields["connection"]),
            connection_requests=int(fields["connection_requests"]),
            completed=fields["completion"] == "OK",
            https=fields["https"] == "on",
            user_agent=fields["user_agent"],
        )


class Nginx:
    """An nginx started by start_nginx; a context manager that stops it (by PID)."""

    def __init__(
        self, proc: Proc, workdir: Path, root: Path, port: int, tls_port: int | None
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.workdir = workdir
        self.root = root
        self.port = port
        self.tls_port = tls_port
        self.url = f"http://127.0.0.1:{port}"
        self.access_log = workdir / "access.log"
        self.error_log = workdir / "error.log"
        self._markers = itertools.count()

    @property
    def https_url(self) -> str:
        if self.tls_port is None:
            raise ValueError("this nginx was started without tls")
        return f"https://127.0.0.1:{self.tls_port}"

    def stop(self) -> None:
        """SIGTERM to the master (fast shutdown, workers included), SIGKILL after 10 s."""
        self.proc.stop()

    def __enter__(self) -> Nginx:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _log_lines(self) -> list[NginxLogLine]:
        try:
            text = self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        # The last line may be half written: only complete lines count.
        return [NginxLogLine.parse(raw) for raw in text.split("\n")[:-1] if raw]

    def settle(self) -> None:
        """Wait until every request that ended before this call is in the access log."""
        if not self.proc.running():
            return  # stopped: the log is complete
        marker = f"{SETTLE_PREFIX}{next(self._markers)}"
        http_status(f"{self.url}{marker}")
        wait_until(
            lambda: any(line.uri == marker for line in self._log_lines()),
            SETTLE_TIMEOUT,
            f"nginx to log {marker}",
            self.error_log,
        )

    def status(self) -> dict[str, int]:
        """nginx's stub_status: active, accepts, handled, requests, reading, writing, waiting."""
        with urllib.request.urlopen(f"{self.url}{STATUS_PATH}", timeout=2) as resp:
            text = resp.read().decode()
        numbers = [int(n) for n in re.findall(r"\d+", text)]
        keys = ("active", "accepts", "handled", "requests", "reading", "writing", "waiting")
        return dict(zip(keys, numbers, strict=True))

    def wait_idle(self, timeout: float = IDLE_TIMEOUT) -> None:
        """Wait until no response is being written but the status request's own, then settle."""
        wait_until(
            lambda: self.status()["writing"] <= 1,
            timeout,
            "nginx to finish every response in flight",
            self.error_log,
        )
        self.settle()

    def requests(self, path: str | None = None) -> list[NginxLogLine]:
        """Access-log lines so far (after settle()), without our own markers; of one path
        (compared with the URI without its query string) if given."""
        self.settle()
        return [
            line
            for line in self._log_lines()
            if not line.uri.startswith(SETTLE_PREFIX) and (path is None or line.path == path)
        ]

    def bytes_sent(self, path: str) -> int:
        """Body bytes nginx wrote for every request of path so far (all statuses, both ports)."""
        return sum(line.body_bytes for line in self.requests(path))


def _config(
    workdir: Path,
    root: Path,
    port: int,
    tls: tuple[Path, Path] | None,
    tls_port: int | None,
    headers: dict[str, str],
    workers: int,
    ipv6: bool = False,
) -> str:
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name) or _UNSAFE_VALUE.search(value):
            raise ValueError(f"header {name!r}: {value!r} cannot go into nginx.conf verbatim")
    listen = [f"listen 127.0.0.1:{port};"]
    if ipv6:
        listen.append(f"listen [::1]:{port};")
    if tls is not None:
        listen += [
            f"listen 127.0.0.1:{tls_port} ssl;",
            f'ssl_certificate "{tls[0]}";',
            f'ssl_certificate_key "{tls[1]}";',
        ]
    add = [f'add_header {name} "{value}" always;' for name, value in headers.items()]
    temps = [
        f'{kind}_temp_path "{workdir / "tmp" / kind}";'
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    ]
    lines = [
        # As root without it the worker is `nobody`, which cannot read a 0700 tmp dir.
        "user root;" if os.geteuid() == 0 else "",
        "daemon off;",
        f"worker_processes {workers};",
        f'pid "{workdir / "nginx.pid"}";',
        f'error_log "{workdir / "error.log"}" info;',
        "events { worker_connections 1024; }",
        "http {",
        "    default_type application/octet-stream;",
        f"    log_format support escape=json '{LOG_FORMAT}';",
        f'    access_log "{workdir / "access.log"}" support;',
        *(f"    {t}" for t in temps),
        "    sendfile on;",
        "    server {",
        *(f"        {x}" for x in listen),
        f'        root "{root}";',
        *(f"        {x}" for x in add),
        f"        location = {STATUS_PATH} {{ stub_status; access_log off; }}",
        f"        location ^~ {SETTLE_PREFIX} {{ return 204; }}",
        "    }",
        "}",
    ]
    return "\n".join(line for line in lines if line) + "\n"


def start_nginx(
    workdir: Path,
    root: Path,
    *,
    tls: tuple[Path, Path] | None = None,
    headers: dict[str, str] | None = None,
    workers: int = 1,
    ipv6: bool = False,
) -> Nginx:
    """Start nginx serving root on a free port of 127.0.0.1 (and a second one with TLS, given
    (certificate, key)); wait until it answers. `headers` are added to every response (e.g.
    {"Cache-Control": "max-age=60"}); `ipv6` adds [::1] on the same plain port. Config, pid,
    logs and temp dirs live in workdir."""
    workdir.mkdir(parents=True, exist_ok=True)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    port = free_port()
    tls_port = None
    if tls is not None:
        for _ in range(10):  # the OS may hand out the same free port twice in a row
            tls_port = free_port()
            if tls_port != port:
                break
    conf = workdir / "nginx.conf"
    conf.write_text(_config(workdir, root, port, tls, tls_port, headers or {}, workers, ipv6))
    proc = Proc(
        ["nginx", "-c", str(conf), "-p", str(workdir), "-e", str(workdir / "error.log")],
        workdir / "nginx.out",
    )
    server = Nginx(proc, workdir, root, port, tls_port)
    try:
        wait_http(f"{server.url}{STATUS_PATH}", START_TIMEOUT, proc=proc)
    except BaseException:
        server.stop()
        raise
    return server


def make_file(path: Path, size: int, seed: int = 0) -> str:
    """Write `size` deterministic pseudo-random bytes (random.Random(seed)) to path; return
    their "sha256:HEX". 8 MiB at a time; hashing and writing overlap the next chunk's
    generation in a thread (1 GiB in ~3–4 s here)."""
    rng = random.Random(seed)
    digest = hashlib.sha256()

    def consume(chunk: bytes) -> None:
        digest.update(chunk)  # both release the GIL on large buffers
        out.write(chunk)

    pending: Future[None] | None = None
    with path.open("wb") as out, ThreadPoolExecutor(1) as pool:
        for offset in range(0, size, MAKE_FILE_CHUNK):
            chunk = rng.randbytes(min(MAKE_FILE_CHUNK, size - offset))
            if pending is not None:
                pending.result()
            pending = pool.submit(consume, chunk)
        if pending is not None:
            pending.result()
    return f"sha256:{digest.hexdigest()}"
