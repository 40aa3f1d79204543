"""The HTTP face of ``fetchd serve``: the OCI distribution pull API, admin, metrics.

Read-only for everyone: ``GET /v2/``, ``GET|HEAD /v2/<name>/manifests/<ref>``,
``GET|HEAD /v2/<name>/blobs/<digest>`` (with a single ``Range``). Every write is 405
``UNSUPPORTED``, except the admin API (``POST /fetchd/v1/prefetch``, ``POST
/fetchd/v1/gc``), which needs ``Authorization: Bearer <token>``. Names and digests
are checked against the spec grammars before anything touches the disk; blobs are
read only through the store, by digest. One table maps fetchd's errors to HTTP
statuses and OCI error codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from aiohttp import web

from fetchd.errors import (
    AccessDenied,
    AuthenticationFailed,
    BlobNotFound,
    DigestInvalid,
    FetchdError,
    ManifestInvalid,
    ManifestNotFound,
    ReferenceInvalid,
    StoreError,
    TransferFailed,
    TransferTimeout,
    UnsupportedMediaType,
)
from fetchd.model import Digest, Platform, is_valid_repository_name
from fetchd.server.cache import Cache
from fetchd.server.upstreams import Route
from fetchd.store import maintenance as mt

log = logging.getLogger(__name__)

_TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")

# fetchd error → (HTTP status, OCI error code). The first matching class wins.
ERROR_TABLE: list[tuple[type[FetchdError], int, str]] = [
    (BlobNotFound, 404, "BLOB_UNKNOWN"),
    (ManifestNotFound, 404, "MANIFEST_UNKNOWN"),
    (DigestInvalid, 400, "DIGEST_INVALID"),
    (ReferenceInvalid, 400, "NAME_INVALID"),
    (ManifestInvalid, 502, "MANIFEST_INVALID"),
    (UnsupportedMediaType, 502, "UNSUPPORTED"),
    (AuthenticationFailed, 502, "UNAUTHORIZED"),
    (AccessDenied, 502, "DENIED"),
    (TransferTimeout, 504, "UNAVAILABLE"),
    (TransferFailed, 502, "UNAVAILABLE"),
    (StoreError, 500, "UNKNOWN"),
    (FetchdError, 502, "UNKNOWN"),
]


def oci_error(status: int, code: str, message: str) -> web.Response:
    body = {"errors": [{"code": code, "message": message, "detail": None}]}
    return web.json_response(body, status=status)


def error_response(exc: FetchdError) -> web.Response:
    for cls, status, code in ERROR_TABLE:
        if isinstance(exc, cls):
            return oci_error(status, code, str(exc))
    return oci_error(500, "UNKNOWN", str(exc))  # unreachable: FetchdError is in the table


@dataclass
class Job:
    id: str
    references: list[str]
    state: str = "running"
    results: dict[str, dict[str, str]] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "state": self.state,
            "references": self.results,
            "started": self.started,
        }


class Server:
    """Handlers over one :class:`Cache`. Build the app with :meth:`app`."""

    def __init__(
        self, cache: Cache, token: str | None, max_size: int | None, grace: float = 600.0
    ) -> None:
        self.cache = cache
        self.token = token
        self.max_size = max_size
        self.grace = grace
        self.jobs: dict[str, Job] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._job_tasks: set[asyncio.Task[None]] = set()

    # --- the app ---------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count, self._errors], client_max_size=1 << 20)
        r = app.router
        r.add_get("/", self.status_page)
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/fetchd/v1/status", self.status_json)
        r.add_post("/fetchd/v1/prefetch", self.prefetch)
        r.add_get("/fetchd/v1/jobs/{id}", self.job)
        r.add_post("/fetchd/v1/gc", self.gc)
        r.add_get("/v2/", self.base)
        r.add_route("*", "/v2/{tail:.*}", self.v2)
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        async with self.cache.running(), asyncio.TaskGroup() as tg:
            self._tasks = tg
            evictor = tg.create_task(self._evict_now_and_then()) if self.max_size else None
            yield
            self._tasks = None
            for task in self._job_tasks:
                task.cancel()
            if evictor is not None:
                evictor.cancel()

    async def _evict_now_and_then(self) -> None:
        """Keep the store under --max-size while clients pull (also after each job)."""
        while True:
            await asyncio.sleep(EVICT_INTERVAL)
            try:
                await self._evict()
            except (OSError, FetchdError) as exc:
                log.warning("eviction failed: %s", exc)

    @web.middleware
    async def _count(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        route = (
            request.match_info.route.resource.canonical
            if request.match_info.route.resource
            else "?"
        )
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            self.cache.stats.requests[(route if len(route) < 64 else "?", status)] += 1

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except FetchdError as exc:
            log.info("%s %s: %s", request.method, request.path[:200], exc)
            return error_response(exc)

    # --- the distribution API ----------------------------------------------------------

    async def base(self, request: web.Request) -> web.Response:
        return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})

    async def v2(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return oci_error(405, "UNSUPPORTED", "this registry is a read-only cache")
        # raw_path: an encoded slash (%2F) must not become a path separator here.
        path = request.rel_url.raw_path.removeprefix("/v2/")
        if "%" in path or "//" in path or "\\" in path:
            return oci_error(400, "NAME_INVALID", "encoded characters are not allowed")
        name, sep, last = path.rpartition("/")
        name, sep2, kind = name.rpartition("/")
        if not sep or not sep2 or kind not in ("manifests", "blobs", "tags"):
            return oci_error(404, "NAME_UNKNOWN", "no such endpoint")
        if kind == "tags" and last != "list":
            return oci_error(404, "NAME_UNKNOWN", "no such endpoint")
        if not is_valid_repository_name(name):
            return oci_error(400, "NAME_INVALID", "invalid repository name")
        route = self.cache.upstreams.route(name, request.query.get("ns"))
        if route is None:
            return oci_error(404, "NAME_UNKNOWN", "no upstream serves this name")
        if kind == "blobs":
            return await self._blob(request, route, Digest.parse(last))
        if kind == "tags":
            tags = await self.cache.tags(route)
            return web.json_response({"name": name, "tags": tags})
        if not last.startswith(("sha256:", "sha512:")) and (
            len(last) > 128 or not set(last) <= _TAG_CHARS
        ):
            return oci_error(400, "TAG_INVALID", "invalid tag")
        if last.startswith(("sha256:", "sha512:")):
            Digest.parse(last)
        return await self._manifest(request, route, last)

    async def _manifest(self, request: web.Request, route: Route, ref: str) -> web.Response:
        m = await self.cache.manifest(route, ref)
        headers = {
            "Content-Type": m.media_type,
            "Docker-Content-Digest": str(m.digest),
            "ETag": f'"{m.digest}"',
        }
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(m.data))
            return web.Response(status=200, headers=headers)
        self.cache.stats.bytes_served += len(m.data)
        return web.Response(body=m.data, headers=headers)

    async def _blob(self, request: web.Request, route: Route, digest: Digest) -> web.StreamResponse:
        headers = {
            "Docker-Content-Digest": str(digest),
            "Content-Type": "application/octet-stream",
            "ETag": f'"{digest}"',
            "Accept-Ranges": "bytes",
            "Cache-Control": "max-age=31536000, immutable",
        }
        if request.method == "HEAD":
            size = await self.cache.blob_size(route, digest)
            headers["Content-Length"] = str(size)
            return web.Response(status=200, headers=headers)
        self.cache.serving[digest] += 1
        try:
            flight = await self.cache.blob(route, digest)
            if flight is not None and request.http_range.start is not None:
                # A range of a blob still arriving: wait for it, then serve it whole.
                outcome = await asyncio.shield(flight.done)
                if outcome is not None:
                    raise TransferFailed(f"blob {digest.short}: {outcome}")
                flight = None
            if flight is None:
                return _BlobFile(self.cache, digest, headers)
            stream = web.StreamResponse(status=200, headers=headers)
            stream.content_length = flight.size
            await stream.prepare(request)
            transport = request.transport
            assert transport is not None
            loop = asyncio.get_running_loop()

            async def send(f: BinaryIO, offset: int, count: int) -> None:
                # What aiohttp's FileResponse does: the kernel copies file to socket.
                await loop.sendfile(transport, f, offset, count)

            try:
                await self.cache.stream(flight, send)
            except StoreError:
                # Never complete a bad blob: break the connection instead.
                if request.transport is not None:
                    request.transport.abort()
                raise
            await stream.write_eof()
            return stream
        finally:
            self.cache.serving[digest] -= 1
            if self.cache.serving[digest] <= 0:
                del self.cache.serving[digest]

    # --- health, metrics, status ---------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def metrics(self, request: web.Request) -> web.Response:
        s = self.cache.stats
        size = await asyncio.to_thread(mt.store_size, self.cache.store)
        lines = [
            "# HELP fetchd_requests_total HTTP requests by route and status.",
            "# TYPE fetchd_requests_total counter",
        ]
        for (route, status), n in sorted(s.requests.items()):
            route_label = route.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'fetchd_requests_total{{route="{route_label}",status="{status}"}} {n}')
        for name, kind, value, text in (
            ("fetchd_cache_hits_total", "counter", s.hits, "Requests served from the store."),
            ("fetchd_cache_misses_total", "counter", s.misses, "Requests that went upstream."),
            ("fetchd_bytes_served_total", "counter", s.bytes_served, "Body bytes sent."),
            ("fetchd_upstream_bytes_total", "counter", s.bytes_upstream, "Bytes fetched."),
            ("fetchd_inflight_fetches", "gauge", len(self.cache.engine.flights), "Blob fetches."),
            ("fetchd_store_size_bytes", "gauge", size, "Bytes of blobs in the store."),
        ):
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    def _status(self) -> dict[str, Any]:
        s = self.cache.stats
        asked = s.hits + s.misses
        cached = [
            {"digest": d, "repository": r, "media_type": m, "last_used": t}
            for d, r, m, t in reversed(self.cache.meta.cached_manifests())
        ][:100]
        flights = [
            {"digest": str(f.digest), "size": f.size, "done": f.contiguous}
            for f in self.cache.engine.flights.values()
        ]
        return {
            "hit_rate": s.hits / asked if asked else None,
            "hits": s.hits,
            "misses": s.misses,
            "bytes_served": s.bytes_served,
            "bytes_upstream": s.bytes_upstream,
            "cached": cached,
            "recent": list(s.recent),
            "fetches": flights,
        }

    async def status_json(self, request: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(self._status))

    async def status_page(self, request: web.Request) -> web.Response:
        upstreams = ", ".join(html.escape(f"{u.host} → {u.url}") for u in self.cache.upstreams.all)
        return web.Response(
            text=STATUS_PAGE.replace("{upstreams}", upstreams), content_type="text/html"
        )

    # --- admin ---------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        if not self.token:
            return False
        given = request.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode())

    def _unauthorized(self) -> web.Response:
        resp = oci_error(401, "UNAUTHORIZED", "the admin API needs the server's bearer token")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="fetchd-admin"'
        return resp

    async def prefetch(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        try:
            body = await request.json()
            refs = body["references"]
            platforms = [Platform.parse(p) for p in body.get("platforms", [])]
            if not (isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)):
                raise ValueError("references must be a non-empty list of strings")
        except (ValueError, KeyError, TypeError, FetchdError) as exc:
            return oci_error(400, "UNSUPPORTED", f"bad prefetch request: {exc}")
        job = Job(uuid.uuid4().hex[:16], refs)
        self.jobs[job.id] = job
        assert self._tasks is not None
        task = self._tasks.create_task(self._run_job(job, platforms))
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)
        return web.json_response(job.to_json(), status=202)

    async def _run_job(self, job: Job, platforms: list[Platform]) -> None:
        async def one(ref: str) -> None:
            try:
                digest = await self.cache.prefetch(ref, platforms)
                job.results[ref] = {"state": "done", "digest": str(digest)}
            except Exception as exc:  # a job must never take the server down
                job.results[ref] = {"state": "failed", "error": str(exc)}

        async with asyncio.TaskGroup() as tg:
            for ref in job.references:
                job.results[ref] = {"state": "running"}
                tg.create_task(one(ref))
        failed = any(r["state"] == "failed" for r in job.results.values())
        job.state = "failed" if failed else "done"
        await self._evict()

    async def job(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        job = self.jobs.get(request.match_info["id"])
        if job is None:
            return oci_error(404, "UNKNOWN", "no such job")
        return web.json_response(job.to_json())

    async def gc(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        report = await self._evict(collect=True)
        return web.json_response(report)

    async def _evict(self, collect: bool = False) -> dict[str, Any]:
        """LRU down to --max-size, sparing blobs being served and manifests used lately."""
        return await asyncio.to_thread(
            evict, self.cache, self.max_size, set(self.cache.serving), collect, self.grace
        )


class _BlobFile(web.FileResponse):
    """A stored blob, sent with sendfile. Its ETag is the digest (aiohttp would make one
    from mtime and size, which would differ from HEAD's), and it counts what it sends."""

    def __init__(self, cache: Cache, digest: Digest, headers: dict[str, str]) -> None:
        super().__init__(cache.store.blob_path(digest), headers=headers)
        self._cache = cache
        self._digest_etag = f'"{digest}"'

    @property
    def etag(self) -> Any:
        return self.headers.get("ETag")

    @etag.setter
    def etag(self, value: Any) -> None:
        self.headers["ETag"] = self._digest_etag

    async def prepare(self, request: web.BaseRequest) -> Any:
        # FileResponse sends the whole body here, after the handler (and so the guard
        # middleware) returned: the connection is busy until the last byte is out, or
        # the guard would cut a slow reader of a big blob after HEADER_TIMEOUT.
        with _busy(request):
            writer = await super().prepare(request)
        if request.method == "GET" and self.content_length:
            self._cache.stats.bytes_served += self.content_length
        return writer


EVICT_INTERVAL = 30.0


def evict(
    cache: Cache,
    max_size: int | None,
    serving: set[Digest],
    collect: bool,
    grace: float,
) -> dict[str, Any]:
    store = cache.store
    evicted: list[str] = []
    freed: dict[Digest, int] = {}
    if max_size is not None:
        now = time.time()
        size = mt.store_size(store)
        for digest, _, _, used in cache.meta.cached_manifests():
            if size <= max_size:
                break
            if now - used < grace:  # never a manifest used lately
                break  # the rest are newer still
            cache.meta.forget_cached([digest])
            evicted.append(digest)
            gone = mt.remove_unreferenced(store, spare=serving)
            size -= sum(gone.values())
            freed |= gone
    if collect:
        freed |= mt.remove_unreferenced(store, spare=serving)
    return {
        "evicted_manifests": evicted,
        "removed_blobs": len(freed),
        "freed_bytes": sum(freed.values()),
    }


STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fetchd cache</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:20px} table{border-collapse:collapse;margin:1em 0}
td,th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left;font-family:monospace}
.bar{background:#eee;width:200px;height:10px}.bar div{background:#2a7;height:10px}
.num{font-size:24px;font-weight:bold;margin-right:2em}
</style></head><body>
<h1>fetchd LAN cache</h1>
<p>Upstreams: {upstreams}</p>
<p><span class="num" id="hitrate">–</span> hit rate &nbsp;
<span class="num" id="served">–</span> served &nbsp;
<span class="num" id="upstream">–</span> from upstream</p>
<h2>Live fetches</h2><table id="fetches"><tr><th>blob</th><th>progress</th></tr></table>
<h2>Recent pulls</h2><table id="recent"><tr><th>name</th><th>digest</th></tr></table>
<h2>Cached manifests</h2>
<table id="cached"><tr><th>repository</th><th>digest</th><th>type</th></tr></table>
<script>
function mib(n){return (n/1048576).toFixed(1)+" MiB"}
function row(t,cells){const r=t.insertRow();for(const c of cells){const d=r.insertCell();
  if(c instanceof Node){d.appendChild(c)}else{d.textContent=c}}}
function clear(t){while(t.rows.length>1)t.deleteRow(1)}
async function refresh(){
  const s=await (await fetch("/fetchd/v1/status")).json();
  document.getElementById("hitrate").textContent=
    s.hit_rate===null?"–":(100*s.hit_rate).toFixed(0)+"%";
  document.getElementById("served").textContent=mib(s.bytes_served);
  document.getElementById("upstream").textContent=mib(s.bytes_upstream);
  const f=document.getElementById("fetches");clear(f);
  for(const x of s.fetches){const b=document.createElement("div");b.className="bar";
    const i=document.createElement("div");i.style.width=(100*x.done/x.size)+"%";b.appendChild(i);
    row(f,[x.digest.slice(0,19),b])}
  const r=document.getElementById("recent");clear(r);
  for(const x of s.recent){row(r,[x.name,x.digest.slice(0,19)])}
  const c=document.getElementById("cached");clear(c);
  for(const x of s.cached){row(c,[x.repository,x.digest.slice(0,19),x.media_type])}
}
refresh();setInterval(refresh,1000);
</script></body></html>
"""


def read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    token = path.read_text().strip()
    if len(token) < 16:
        raise FetchdError(f"{path}: the admin token must be at least 16 characters")
    return token


# --- running it ------------------------------------------------------------------------

HEADER_TIMEOUT = 10.0  # seconds a connection may take to send a request's headers
MAX_HEADER_BYTES = 32 * 1024  # bytes a connection may send before a request starts
_guards: dict[asyncio.BaseTransport, _Guard] = {}


class _Guard(asyncio.Protocol):
    """Wraps aiohttp's protocol: drops a connection that has no request in progress
    and has not completed one for HEADER_TIMEOUT seconds (slow or idle clients), so
    trickling clients cannot hold connections forever. Requests mark themselves busy
    through :func:`_guard_middleware`."""

    def __init__(self, inner: asyncio.Protocol) -> None:
        self.inner = inner
        self.busy = 0
        self.unclaimed = 0
        self.last = time.monotonic()
        self.transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        _guards[transport] = self
        self.inner.connection_made(transport)
        self._arm(HEADER_TIMEOUT)

    def _arm(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._check)

    def _check(self) -> None:
        idle = time.monotonic() - self.last
        if (
            self.busy == 0
            and idle >= HEADER_TIMEOUT
            and isinstance(self.transport, asyncio.Transport)
        ):
            log.info("dropping a connection with no complete request for %.0f s", idle)
            self.transport.abort()
            return
        self._arm(max(0.5, HEADER_TIMEOUT - idle))

    def data_received(self, data: bytes) -> None:
        if self.busy == 0:
            # Everything before a request starts is its request line and headers:
            # aiohttp bounds each line, this bounds them all together.
            self.unclaimed += len(data)
            if self.unclaimed > MAX_HEADER_BYTES and isinstance(self.transport, asyncio.Transport):
                log.info("dropping a connection that sent %d bytes of headers", self.unclaimed)
                self.transport.abort()
                return
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.transport is not None:
            _guards.pop(self.transport, None)
        self.inner.connection_lost(exc)


@contextlib.contextmanager
def _busy(request: web.BaseRequest) -> Iterator[None]:
    """Mark the request's connection busy (the guard leaves it alone) while inside."""
    guard = _guards.get(request.transport) if request.transport is not None else None
    if guard is not None:
        guard.busy += 1
        guard.unclaimed = 0
    try:
        yield
    finally:
        if guard is not None:
            guard.busy -= 1
            guard.last = time.monotonic()


@web.middleware
async def _guard_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    with _busy(request):
        return await handler(request)


async def serve(server: Server, host: str, port: int, ready: Callable[[str], None]) -> None:
    """Serve until cancelled. ``ready`` gets the URL once the socket listens."""
    app = server.app()
    app.middlewares.insert(0, _guard_middleware)
    runner = web.AppRunner(
        app,
        access_log=None,
        max_line_size=8190,
        max_field_size=8190,
        keepalive_timeout=75,
        shutdown_timeout=5.0,  # on SIGTERM, responses still running get 5 s, not 60
    )
    await runner.setup()
    try:
        loop = asyncio.get_running_loop()
        factory = runner.server
        assert factory is not None
        listener = await loop.create_server(
            lambda: _Guard(factory()), host, port, reuse_address=True, backlog=1024
        )
        try:
            sock = listener.sockets[0].getsockname()
            ready(
                f"http://{sock[0]}:{sock[1]}"
                if ":" not in sock[0]
                else f"http://[{sock[0]}]:{sock[1]}"
            )
            await asyncio.Event().wait()
        finally:
            listener.close()
            await listener.wait_closed()
    finally:
        await runner.cleanup()
