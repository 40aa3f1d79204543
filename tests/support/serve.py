"""`fetchd serve` (the LAN cache) as a separate process on 127.0.0.1, and small HTTP probes.

start_serve runs ``python -m fetchd --store STORE serve --listen 127.0.0.1:PORT --upstream …``
exactly as an operator would, waits until /healthz answers 200, and stops the process by
its PID (SIGTERM, then SIGKILL) when the context ends. Its stdout and stderr go to one log
file next to the store.
"""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .cli import Fetchd
from .procs import Proc, free_port, http_status, log_tail, wait_until

START_TIMEOUT = 30.0
REQUEST_TIMEOUT = 30.0

_METRIC_LINE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?P<labels>\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})?'  # label values may hold } and \"
    r" (?P<value>\S+)$"
)


@dataclass(frozen=True)
class Reply:
    """One HTTP answer, body read whole."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def oci_codes(self) -> list[str]:
        """The `code`s of an OCI error body (empty if the body is not one)."""
        try:
            doc = json.loads(self.body)
        except ValueError:
            return []
        if not isinstance(doc, dict):
            return []
        return [str(e.get("code")) for e in doc.get("errors", []) if isinstance(e, dict)]


class ServeProcess:
    """A running `fetchd serve`; a context manager that stops it by PID."""

    def __init__(self, proc: Proc, port: int, store: Path) -> None:
        self.proc = proc
        self.port = port
        self.host = f"127.0.0.1:{port}"
        self.url = f"http://{self.host}"
        self.store = store
        self.log_path = proc.log_path

    # --- lifetime --------------------------------------------------------------------------

    def wait_ready(self) -> None:
        def healthy() -> bool:
            self.proc.check_running()
            return http_status(f"{self.url}/healthz") == 200

        wait_until(healthy, START_TIMEOUT, f"{self.url}/healthz to answer 200", self.log_path)

    def stop(self) -> int:
        return self.proc.stop()

    def log(self) -> str:
        return log_tail(self.log_path, 200)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- probes ----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = REQUEST_TIMEOUT,
        source: str | None = None,
    ) -> Reply:
        """One request on a fresh connection; `path` is sent exactly as given (no quoting).
        ``source``: the local address to send from (another 127.0.0.x: another host)."""
        conn = http.client.HTTPConnection(
            "127.0.0.1",
            self.port,
            timeout=timeout,
            source_address=None if source is None else (source, 0),
        )
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            return Reply(resp.status, resp.headers, resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kwargs: Any) -> Reply:
        return self.request("GET", path, **kwargs)

    def status(self) -> dict[str, Any]:
        reply = self.get("/fetchd/v1/status")
        assert reply.status == 200, reply
        doc: dict[str, Any] = reply.json()
        return doc

    def metrics_text(self) -> str:
        reply = self.get("/metrics")
        assert reply.status == 200, reply
        return reply.body.decode()

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed "name" or "name{labels}" as printed."""
        samples: dict[str, float] = {}
        for line in self.metrics_text().splitlines():
            if not line or line.startswith("#"):
                continue
            match = _METRIC_LINE.match(line)
            assert match, f"not a Prometheus sample line: {line!r}"
            samples[match["name"] + (match["labels"] or "")] = float(match["value"])
        return samples


def start_serve(
    fetchd: Fetchd | Path,
    upstreams: Sequence[str],
    token_file: Path | None = None,
    extra: Sequence[str] = (),
    nofile: int | None = None,
) -> ServeProcess:
    """Start `fetchd serve` on a free port of 127.0.0.1 over fetchd's store (or a store path).

    upstreams are `--upstream` values ("[PREFIX=]http://HOST:PORT"); extra is appended to the
    serve arguments (e.g. ("--tag-ttl", "1")); nofile, if given, is the process's
    RLIMIT_NOFILE (soft and hard, set by prlimit(1), which then execs fetchd: the PID is
    fetchd's). Returns once /healthz answers 200.
    """
    if isinstance(fetchd, Path):
        home = fetchd.parent / f"{fetchd.name}-home"
        home.mkdir(parents=True, exist_ok=True)
        fetchd = Fetchd(fetchd, home)
    port = free_port()
    args = ["serve", "--listen", f"127.0.0.1:{port}"]
    for upstream in upstreams:
        args += ["--upstream", upstream]
    if token_file is not None:
        args += ["--token-file", str(token_file)]
    args += list(extra)
    log_path = fetchd.store.parent / f"serve-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = fetchd.argv(*args)
    if nofile is not None:
        argv = ["prlimit", f"--nofile={nofile}:{nofile}", "--", *argv]
    proc = Proc(argv, log_path, env=fetchd.env())
    serve = ServeProcess(proc, port, fetchd.store)
    try:
        serve.wait_ready()
    except BaseException:
        serve.stop()
        raise
    return serve
