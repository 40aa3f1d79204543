"""The HTTP face of ``fetchd serve``: the OCI distribution pull API, admin, metrics.

Read-only for everyone: ``GET /v2/``, ``GET|HEAD /v2/<name>/manifests/<ref>``,
``GET|HEAD /v2/<name>/blobs/<digest>`` (with a single ``Range``). Every write is 405
``UNSUPPORTED``, except the admin API (``POST /fetchd/v1/prefetch``, ``POST
/fetchd/v1/gc``), which needs ``Authorization: Bearer <token>``. Names and digests
are checked against the spec grammars before anything touches the disk; blobs are
read only through the store, by digest. One table maps fetchd's errors to HTTP
statuses and OCI error codes.

What one client may cost the server is bounded: request headers (32 KiB, 8 KiB a
line), an admin request body (1 MiB), the time to send a request (10 s), and the
number of connections (below the descriptor limit; idle ones are shed first when a
new one arrives at the limit). The status page shows counters to everyone, and the
cached repositories and recent pulls only with ``--public-status`` (the default on
loopback) or the admin token.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hmac
import html
import ipaddress
import json
import logging
import os
import resource
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from aiohttp import StreamReader, web
from aiohttp.http_exceptions import HttpProcessingError

from fetchd.errors import (
    AccessDenied,
    AuthenticationFailed,
    BlobNotFound,
    DigestInvalid,
    FetchdError,
    ManifestInvalid,
    ManifestNotFound,
    NotTrusted,
    RangeNotSatisfiable,
    ReferenceInvalid,
    StoreError,
    TagInvalid,
    TransferFailed,
    TransferTimeout,
    UnsupportedMediaType,
)
from fetchd.model import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Digest, Platform
from fetchd.server.cache import Cache
from fetchd.server.request import ByteRange, accepts, parse_path, parse_range
from fetchd.server.torrents import Torrents
from fetchd.server.upstreams import Route
from fetchd.store import maintenance as mt
from fetchd.store.cas import Store
from fetchd.store.leases import live_digests

if TYPE_CHECKING:
    from fetchd.bt.session import Swarm

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # bytes of an admin request body
_KINDS = {
    OCI_MANIFEST: "OCI manifest",
    OCI_INDEX: "OCI index",
    DOCKER_MANIFEST: "Docker schema 2 manifest",
    DOCKER_LIST: "Docker manifest list",
}

# fetchd error → (HTTP status, OCI error code). The first matching class wins.
ERROR_TABLE: list[tuple[type[FetchdError], int, str]] = [
    (BlobNotFound, 404, "BLOB_UNKNOWN"),
    (ManifestNotFound, 404, "MANIFEST_UNKNOWN"),
    (DigestInvalid, 400, "DIGEST_INVALID"),
    (TagInvalid, 400, "TAG_INVALID"),
    (ReferenceInvalid, 400, "NAME_INVALID"),
    (RangeNotSatisfiable, 416, "RANGE_INVALID"),
    (ManifestInvalid, 502, "MANIFEST_INVALID"),
    (UnsupportedMediaType, 502, "UNSUPPORTED"),
    (AuthenticationFailed, 502, "UNAUTHORIZED"),
    (AccessDenied, 502, "DENIED"),
    (NotTrusted, 403, "DENIED"),  # no trusted publisher's signature (this server refuses)
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
            resp = oci_error(status, code, str(exc))
            if isinstance(exc, RangeNotSatisfiable):
                resp.headers["Content-Range"] = f"bytes */{exc.size}"
            return resp
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
        self,
        cache: Cache,
        token: str | None,
        max_size: int | None,
        grace: float = 600.0,
        public_status: bool | None = None,
        swarm: Swarm | None = None,
    ) -> None:
        self.cache = cache
        #: torrents, the tracker and the seeding session (``swarm``: None without libtorrent)
        self.torrents = Torrents(cache, swarm)
        cache.on_commit = self.torrents.committed
        self.token = token
        self.max_size = max_size
        self.grace = grace
        #: whether everyone sees cached repositories and recent pulls; None: decided by
        #: :func:`serve` (yes when every listening address is a loopback one)
        self.public_status = public_status
        self.jobs: dict[str, Job] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._job_tasks: set[asyncio.Task[None]] = set()

    # --- the app ---------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count, self._errors], client_max_size=MAX_BODY)
        r = app.router
        r.add_get("/", self.status_page)
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.metrics)
        r.add_get("/fetchd/v1/status", self.status_json)
        r.add_post("/fetchd/v1/prefetch", self.prefetch)
        r.add_get("/fetchd/v1/jobs/{id}", self.job)
        r.add_post("/fetchd/v1/gc", self.gc)
        r.add_get("/fetchd/v1/torrents/{digest}", self.torrents.handle_torrent)
        r.add_get("/announce", self.torrents.handle_announce)
        r.add_get("/fetchd/v1/slices/{digest}", self.torrents.handle_slice)
        r.add_delete("/fetchd/v1/slices/{digest}", self.torrents.handle_slice_done)
        r.add_get("/v2/", self.base)
        r.add_route("*", "/v2/{tail:.*}", self.v2)
        app.cleanup_ctx.append(self._lifetime)
        return app

    async def _lifetime(self, app: web.Application) -> AsyncIterator[None]:
        async with self.cache.running(), self.torrents.running(), asyncio.TaskGroup() as tg:
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
        except _ClientGone as exc:
            log.debug("%s %s: the client went away: %s", request.method, request.path[:200], exc)
            if request.transport is not None:
                request.transport.abort()
            # Never sent (the connection is gone): aiohttp's writing it fails quietly.
            return web.Response(status=499)

    # --- the distribution API ----------------------------------------------------------

    async def base(self, request: web.Request) -> web.Response:
        return web.json_response({}, headers={"Docker-Distribution-API-Version": "registry/2.0"})

    async def v2(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return oci_error(405, "UNSUPPORTED", "this registry is a read-only cache")
        # raw_path: an encoded slash (%2F) must not become a path separator here.
        path = parse_path(request.rel_url.raw_path.removeprefix("/v2/"))
        if path is None:
            return oci_error(404, "NAME_UNKNOWN", "no such endpoint")
        route = self.cache.upstreams.route(path.name, request.query.get("ns"))
        if route is None:
            return oci_error(404, "NAME_UNKNOWN", "no upstream serves this name")
        if path.kind == "blobs":
            assert path.digest is not None
            return await self._blob(request, route, path.digest)
        if path.kind == "tags":
            tags = await self.cache.tags(route)
            return web.json_response({"name": path.name, "tags": tags})
        ref = str(path.digest) if path.digest is not None else str(path.tag)
        return await self._manifest(request, route, ref)

    async def _manifest(self, request: web.Request, route: Route, ref: str) -> web.Response:
        m = await self.cache.manifest(route, ref)
        if not accepts(request.headers.getall("Accept", []), m.media_type):
            # What distribution/registry answers ("OCI manifest found, but accept header
            # does not support OCI manifests"): the client cannot use what there is.
            kind = _KINDS.get(m.media_type, m.media_type)
            raise ManifestNotFound(
                f"{route.key}:{ref}: {kind} found ({m.media_type}), but the request's "
                "Accept header does not list that media type"
            )
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
                return await self._stored_blob(request, digest, headers)
            stream = web.StreamResponse(status=200, headers=headers)
            stream.content_length = flight.size
            with _to_client(request):
                await stream.prepare(request)
            transport = request.transport
            assert transport is not None
            loop = asyncio.get_running_loop()

            async def send(f: BinaryIO, offset: int, count: int) -> None:
                # What aiohttp's FileResponse does: the kernel copies file to socket.
                with _to_client(request):
                    await loop.sendfile(transport, f, offset, count)

            try:
                await self.cache.stream(flight, send)
            except StoreError:
                # Never complete a bad blob: break the connection instead.
                if request.transport is not None:
                    request.transport.abort()
                raise
            with _to_client(request):
                await stream.write_eof()
            return stream
        finally:
            self.cache.serving[digest] -= 1
            if self.cache.serving[digest] <= 0:
                del self.cache.serving[digest]

    async def _stored_blob(
        self, request: web.Request, digest: Digest, headers: dict[str, str]
    ) -> web.StreamResponse:
        """A committed blob, whole or one range of it, sent with sendfile (the kernel copies
        file to socket). The range is parsed here, not by aiohttp (which answered
        ``bytes=-0`` with the whole blob); ``If-Range`` must be the blob's ETag."""
        try:
            f = await asyncio.to_thread(open, self.cache.store.blob_path(digest), "rb")
        except FileNotFoundError:
            raise BlobNotFound(f"blob {digest.short} left the store meanwhile") from None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                busy = oci_error(503, "UNAVAILABLE", "the server is out of file descriptors")
                busy.headers["Retry-After"] = "1"
                return busy
            raise StoreError(f"blob {digest.short}: {exc.strerror}") from exc
        try:
            size = os.fstat(f.fileno()).st_size
            rng: ByteRange | None = None
            header = request.headers.get("Range")
            if_range = request.headers.get("If-Range")
            if header is not None and (if_range is None or if_range.strip() == headers["ETag"]):
                rng = parse_range(header, size)
            resp = web.StreamResponse(status=200 if rng is None else 206, headers=headers)
            offset, count = (0, size) if rng is None else (rng.start, rng.length)
            if rng is not None:
                resp.headers["Content-Range"] = rng.content_range(size)
            resp.content_length = count
            with _to_client(request):
                await resp.prepare(request)
                if count:
                    transport = request.transport
                    if transport is None:
                        raise ConnectionResetError("the client went away")
                    await asyncio.get_running_loop().sendfile(transport, f, offset, count)
                    self.cache.stats.bytes_served += count
                await resp.write_eof()
            return resp
        finally:
            f.close()

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
        lines += self.torrents.metrics()
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    def _status(self, full: bool) -> dict[str, Any]:
        s = self.cache.stats
        asked = s.hits + s.misses
        counters: dict[str, Any] = {
            "hit_rate": s.hits / asked if asked else None,
            "hits": s.hits,
            "misses": s.misses,
            "bytes_served": s.bytes_served,
            "bytes_upstream": s.bytes_upstream,
        }
        if not full:
            return counters
        cached = [
            {"digest": d, "repository": r, "media_type": m, "last_used": t}
            for d, r, m, t in reversed(self.cache.meta.cached_manifests())
        ][:100]
        flights = [
            {"digest": str(f.digest), "size": f.size, "done": f.contiguous}
            for f in self.cache.engine.flights.values()
        ]
        return counters | {"cached": cached, "recent": list(s.recent), "fetches": flights}

    def _details_for(self, request: web.Request) -> bool:
        """Whether this request may see what the cache holds and who pulled what."""
        return self.public_status is True or self._authorized(request)

    async def status_json(self, request: web.Request) -> web.Response:
        full = self._details_for(request)
        bt = self.torrents.status(full)
        return web.json_response(await asyncio.to_thread(self._status, full) | bt)

    async def status_page(self, request: web.Request) -> web.Response:
        if self._details_for(request):
            upstreams = ", ".join(
                html.escape(f"{u.host} → {u.url}") for u in self.cache.upstreams.all
            )
        else:
            upstreams = "(shown with --public-status or the admin token)"
        return web.Response(
            text=STATUS_PAGE.replace("{upstreams}", upstreams), content_type="text/html"
        )

    # --- admin ---------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "")
        # A header value is bytes aiohttp decoded leniently; a token is ASCII, so
        # anything else is simply not it (and could not be encoded back: it was a 500).
        if not self.token or not given.isascii():
            return False
        # The scheme is case-insensitive (RFC 9110 §11.1): curl and Go send "Bearer",
        # some clients "bearer"; the token itself is compared exactly, in constant time.
        scheme, _, token = given.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), self.token.encode())

    def _unauthorized(self) -> web.Response:
        resp = oci_error(401, "UNAUTHORIZED", "the admin API needs the server's bearer token")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="fetchd-admin"'
        return resp

    async def prefetch(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        too_large = oci_error(
            413,
            "SIZE_INVALID",
            f"the request body is over the admin API's {MAX_BODY} bytes (1 MiB)",
        )
        if request.content_length is not None and request.content_length > MAX_BODY:
            return too_large
        try:
            data = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return too_large
        try:
            body = json.loads(data)
            refs = body["references"]
            platforms = [Platform.parse(p) for p in body.get("platforms", [])]
            if not (isinstance(refs, list) and refs and all(isinstance(r, str) for r in refs)):
                raise ValueError("references must be a non-empty list of strings")
        except RecursionError:
            return oci_error(400, "UNSUPPORTED", "bad prefetch request: JSON nested too deeply")
        except (ValueError, KeyError, TypeError, FetchdError) as exc:
            return oci_error(400, "UNSUPPORTED", f"bad prefetch request: {exc}")
        job = Job(uuid.uuid4().hex[:16], refs, results={r: {"state": "queued"} for r in refs})
        self.jobs[job.id] = job
        assert self._tasks is not None
        task = self._tasks.create_task(self._run_job(job, platforms))
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)
        return web.json_response(job.to_json(), status=202)

    async def _run_job(self, job: Job, platforms: list[Platform]) -> None:
        async def one(ref: str) -> None:
            try:
                async with self.cache.job_slots:
                    job.results[ref] = {"state": "running"}
                    digest = await self.cache.prefetch(ref, platforms)
                job.results[ref] = {"state": "done", "digest": str(digest)}
            except Exception as exc:  # a job must never take the server down
                job.results[ref] = {"state": "failed", "error": str(exc)}

        async with asyncio.TaskGroup() as tg:
            for ref in dict.fromkeys(job.references):
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
            evict,
            self.cache,
            self.max_size,
            set(self.cache.serving),
            collect,
            self.grace,
            self.torrents,
        )


EVICT_INTERVAL = 30.0


def evict(
    cache: Cache,
    max_size: int | None,
    serving: set[Digest],
    collect: bool,
    grace: float,
    torrents: Torrents | None = None,
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
            gone = _remove_unreferenced(store, serving, torrents)
            size -= sum(gone.values())
            freed |= gone
    if collect:
        freed |= _remove_unreferenced(store, serving, torrents)
    return {
        "evicted_manifests": evicted,
        "removed_blobs": len(freed),
        "freed_bytes": sum(freed.values()),
    }


def _remove_unreferenced(
    store: Store, spare: set[Digest], torrents: Torrents | None
) -> dict[Digest, int]:
    """mt.remove_unreferenced, with the blobs it may delete unseeded first (libtorrent
    would go on serving a deleted blob from its open descriptor, and its space would
    stay taken). The candidates are decided before the unseeding, and only they may be
    deleted: a blob committed meanwhile is not among them; one referenced again
    meanwhile is kept and seeded again."""
    if torrents is None or torrents.swarm is None:
        return mt.remove_unreferenced(store, spare=spare)
    doomed = {d for d, _ in store.iter_blobs()} - mt.referenced(store) - live_digests(store)
    doomed -= spare
    if not doomed:
        return {}
    torrents.before_delete(doomed)
    removed: dict[Digest, int] = {}
    try:
        removed = mt.remove_unreferenced(store, doomed, spare)
    finally:
        torrents.after_delete(doomed, removed)
    return removed


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
<p id="private" hidden>Cached images and recent pulls are shown with <code>--public-status</code>
or the admin token.</p>
<p><span class="num" id="hitrate">–</span> hit rate &nbsp;
<span class="num" id="served">–</span> served &nbsp;
<span class="num" id="upstream">–</span> from upstream</p>
<h2>Live fetches</h2><table id="fetches"><tr><th>blob</th><th>progress</th></tr></table>
<h2>Swarms</h2><p><span class="num" id="torrents">–</span> torrents seeded &nbsp;
<span class="num" id="btup">–</span> sent over BitTorrent &nbsp;
<span class="num" id="tpeers">–</span> tracker peers</p>
<table id="swarms"><tr><th>blob</th><th>peers</th><th>sent</th></tr></table>
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
  document.getElementById("private").hidden=s.cached!==undefined;
  const f=document.getElementById("fetches");clear(f);
  for(const x of s.fetches||[]){const b=document.createElement("div");b.className="bar";
    const i=document.createElement("div");i.style.width=(100*x.done/x.size)+"%";b.appendChild(i);
    row(f,[x.digest.slice(0,19),b])}
  document.getElementById("torrents").textContent=s.torrents;
  document.getElementById("btup").textContent=mib(s.bt_uploaded);
  document.getElementById("tpeers").textContent=s.tracker_peers;
  const w=document.getElementById("swarms");clear(w);
  for(const x of s.swarms||[]){row(w,[x.hex,x.peers,mib(x.uploaded)])}
  const r=document.getElementById("recent");clear(r);
  for(const x of s.recent||[]){row(r,[x.name,x.digest.slice(0,19)])}
  const c=document.getElementById("cached");clear(c);
  for(const x of s.cached||[]){row(c,[x.repository,x.digest.slice(0,19),x.media_type])}
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
MAX_HEADER_BYTES = 32 * 1024  # bytes of request line and headers, all lines together
BACKLOG = 4096
# Descriptors kept for what is not a client connection: store files, upstream
# connections, sqlite, the threads' work. The connection limit is the rest.
FD_RESERVE_MIN = 64
FD_RESERVE_FRACTION = 4  # ... or a quarter of the limit, whichever is more
DEFAULT_MAX_CONNECTIONS = 16384  # when the descriptor limit would allow more still
WARN_INTERVAL = 60.0  # seconds between two log lines about the same overload
ACCEPT_PAUSE = 0.1  # seconds accepting pauses when the process is out of descriptors
_guards: dict[asyncio.BaseTransport, _Guard] = {}


class _NoClientFaults(logging.Filter):
    """aiohttp logs every malformed request as an ERROR with a traceback, though the
    client got its 400: a client could fill the disk with them. They are the client's
    fault, not the server's, and are logged only at debug level."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError) or log.isEnabledFor(logging.DEBUG)


_http_log = logging.getLogger("fetchd.server.http")
_http_log.addFilter(_NoClientFaults())


class _ClientGone(Exception):
    """The client closed or reset its connection while a response went out to it."""


@contextlib.contextmanager
def _to_client(request: web.Request) -> Iterator[None]:
    """Around writes to the client: its going away (reset, broken pipe, a transport
    closing under sendfile) is the client's business, not a server error; aiohttp would
    log each as an ERROR with a traceback, and a client killed mid-blob is routine."""
    try:
        yield
    except ConnectionError as exc:
        raise _ClientGone(str(exc)) from exc
    except RuntimeError as exc:
        transport = request.transport
        if transport is not None and not transport.is_closing():
            raise
        raise _ClientGone(str(exc)) from exc


def connection_limit(requested: int | None) -> int:
    """Client connections to allow: ``requested`` (--max-connections, default
    DEFAULT_MAX_CONNECTIONS), never more than the descriptors RLIMIT_NOFILE leaves once
    a reserve is set aside."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = max(16, soft - max(FD_RESERVE_MIN, soft // FD_RESERVE_FRACTION))
    if requested is not None and requested > room:
        log.warning(
            "--max-connections %d is more than RLIMIT_NOFILE %d leaves room for: using %d",
            requested,
            soft,
            room,
        )
    wanted = DEFAULT_MAX_CONNECTIONS if requested is None else requested
    return max(1, min(wanted, room))


def raise_nofile_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one, as Go's runtime does for servers."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class _Throttled:
    """A warning logged at most once per WARN_INTERVAL, with how often it happened."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.count = 0
        self.logged = -WARN_INTERVAL

    def __call__(self, *args: object) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged >= WARN_INTERVAL:
            log.warning(self.text + " (%d times since the last such message)", *args, self.count)
            self.count = 0
            self.logged = now


class Connections:
    """The open client connections: how many, and which may be shed, most idle first —
    accepted sockets that have not sent a byte yet (no protocol is built for them until
    they do: a flood of silent connections costs an accept and a close each), then
    connections with no request in progress, longest idle first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        #: accepted, nothing received yet: socket → when it was accepted (monotonic)
        self.silent: collections.OrderedDict[socket.socket, float] = collections.OrderedDict()
        self.idle: collections.OrderedDict[_Guard, None] = collections.OrderedDict()
        self._warn_shed = _Throttled("at the limit of %d connections: closed idle ones")

    def opened(self, guard: _Guard) -> None:
        self.open += 1
        guard.counted = True
        self.idle[guard] = None

    def gone(self, guard: _Guard) -> None:
        if guard.counted:
            guard.counted = False
            self.open -= 1
        self.idle.pop(guard, None)

    def active(self, guard: _Guard) -> None:
        """The connection sent bytes, or a request of it ended: it is idle the least."""
        if guard in self.idle:
            self.idle.move_to_end(guard)

    def add_silent(self, sock: socket.socket) -> None:
        self.open += 1
        self.silent[sock] = time.monotonic()

    def spoke(self, sock: socket.socket) -> float:
        """``sock`` sent its first bytes: it leaves the silent ones (its protocol, once
        built, counts it again). Returns when it was accepted."""
        asyncio.get_running_loop().remove_reader(sock.fileno())
        self.open -= 1
        return self.silent.pop(sock)

    def close_silent(self, sock: socket.socket) -> None:
        asyncio.get_running_loop().remove_reader(sock.fileno())
        self.silent.pop(sock, None)
        self.open -= 1
        sock.close()

    def sweep(self) -> None:
        """Close silent sockets older than HEADER_TIMEOUT (the oldest are first)."""
        now = time.monotonic()
        while self.silent:
            sock, since = next(iter(self.silent.items()))
            if now - since < HEADER_TIMEOUT:
                break
            self.close_silent(sock)

    def shed(self) -> bool:
        """Close the most idle connection; False if every connection is busy."""
        if self.silent:
            sock = next(iter(self.silent))
            self.close_silent(sock)
        elif self.idle:
            guard, _ = self.idle.popitem(last=False)
            guard.abort()
            self.gone(guard)
        else:
            return False
        self._warn_shed(self.limit)
        return True

    def close_all_silent(self) -> None:
        for sock in list(self.silent):
            self.close_silent(sock)


class _Guard(asyncio.Protocol):
    """Wraps aiohttp's protocol: drops a connection that has no request in progress
    and has not completed one for HEADER_TIMEOUT seconds (slow or idle clients), so
    trickling clients cannot hold connections forever; bounds the bytes of a request's
    line and headers together (aiohttp bounds each line). Requests mark themselves busy
    through :func:`_guard_middleware`."""

    def __init__(
        self, inner: asyncio.Protocol, connections: Connections, since: float | None = None
    ) -> None:
        self.inner = inner
        self.connections = connections
        self.counted = False
        self.busy = 0
        self.unclaimed = 0  # header bytes of the request now arriving
        self.in_body = False  # its headers ended: what follows is its body, not counted
        self.started = False  # its request line began (blank lines before it are skipped)
        self.draining: StreamReader | None = None  # a body the handler left unread
        self._tail = b""
        self.last = time.monotonic() if since is None else since  # since it was accepted
        self.transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        _guards[transport] = self
        self.connections.opened(self)
        self.inner.connection_made(transport)
        self._arm(max(0.5, HEADER_TIMEOUT - (time.monotonic() - self.last)))

    def abort(self) -> None:
        if isinstance(self.transport, asyncio.Transport):
            self.transport.abort()

    def _arm(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._check)

    def _check(self) -> None:
        idle = time.monotonic() - self.last
        if self.busy == 0 and idle >= HEADER_TIMEOUT:
            log.info("dropping a connection with no complete request for %.0f s", idle)
            self.abort()
            return
        self._arm(max(0.5, HEADER_TIMEOUT - idle))

    def data_received(self, data: bytes) -> None:
        if self.busy == 0:
            self.connections.active(self)
            if self.draining is not None and self.draining.is_eof():
                self.draining = None
            if self.draining is None and not self.in_body:
                # Count up to the blank line that ends the headers: a body is bounded by
                # its handler (MAX_BODY for admin JSON), not as headers.
                window, skip = self._tail + data, 0
                if not self.started:
                    # HTTP parsers skip blank lines before a request line (RFC 9112 §2.2):
                    # they are not the blank line that ends its headers.
                    stripped = window.lstrip(b"\r\n")
                    skip, window = len(window) - len(stripped), stripped
                    self.started = bool(window)
                end = window.find(b"\r\n\r\n")
                if end < 0:
                    self.unclaimed += len(data)
                else:
                    self.unclaimed += max(0, skip + end + 4 - len(self._tail))
                    self.in_body = True
                self._tail = window[-3:]
                if self.unclaimed > MAX_HEADER_BYTES:
                    log.info("dropping a connection that sent %d bytes of headers", self.unclaimed)
                    self.abort()
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
        self.connections.gone(self)
        self.inner.connection_lost(exc)


@contextlib.contextmanager
def _busy(request: web.BaseRequest) -> Iterator[None]:
    """Mark the request's connection busy (the guard leaves it alone) while inside."""
    guard = _guards.get(request.transport) if request.transport is not None else None
    if guard is not None:
        guard.busy += 1
        guard.connections.idle.pop(guard, None)
    try:
        yield
    finally:
        if guard is not None:
            guard.busy -= 1
            guard.last = time.monotonic()
            if guard.busy == 0:
                # The next request's headers start now; a body the handler did not
                # read (aiohttp discards it) is not theirs.
                guard.unclaimed, guard.in_body, guard._tail = 0, False, b""
                guard.started = False
                guard.draining = None if request.content.is_eof() else request.content
                if guard.counted:
                    guard.connections.idle[guard] = None


@web.middleware
async def _guard_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    with _busy(request):
        return await handler(request)


def _listen(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for every address ``host`` names (all of them for "")."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise FetchdError(f"--listen {host}:{port}: {exc.strerror}") from exc
    socks: list[socket.socket] = []
    seen: set[tuple[int, Any]] = set()
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise FetchdError(f"cannot listen on {host}:{port}: {_listen_advice(exc)}") from exc
    return socks


def _listen_advice(exc: OSError) -> str:
    """Why a listening socket could not be opened, and what to do, for the error line."""
    if exc.errno == errno.EADDRINUSE:
        return (
            "address already in use; stop what listens there (ss -ltnp shows it) or pick "
            "another port with --listen ADDR:PORT"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return (
            "permission denied; ports below 1024 need root (or CAP_NET_BIND_SERVICE): "
            "pick a port above 1023 with --listen ADDR:PORT"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return "no interface of this machine has that address; give one of its addresses"
    return f"{exc.strerror or exc}; check --listen ADDR:PORT"


def _is_loopback(sock: socket.socket) -> bool:
    address = str(sock.getsockname()[0]).split("%", 1)[0]
    return ipaddress.ip_address(address).is_loopback


# accept() failures that say the process or the machine is out of something (the
# connection stays in the backlog), and those that say the peer already gave up.
_OUT_OF = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_PEER_GONE = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
ACCEPT_BATCH = 256  # connections accepted per wake-up of a listening socket


class _Acceptor:
    """Accepts on the listening sockets, within the connection limit.

    At the limit the most idle connection makes room for a new one; with every
    connection busy, new ones wait in the kernel's backlog (accepting pauses). Out of
    descriptors, accepting pauses briefly after shedding one, instead of spinning, and
    says so once a minute, not per accept. An accepted socket gets its protocol (the
    guard around aiohttp's) only once it sends something; silent ones are shed first
    and closed after HEADER_TIMEOUT."""

    def __init__(
        self,
        socks: list[socket.socket],
        factory: Callable[[], asyncio.Protocol],
        connections: Connections,
        tg: asyncio.TaskGroup,
    ) -> None:
        self.socks = socks
        self.factory = factory
        self.connections = connections
        self.tg = tg
        self.loop = asyncio.get_running_loop()
        self._timers: dict[socket.socket, asyncio.TimerHandle] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._warn_fds = _Throttled("out of file descriptors: accept() failed: %s")
        self._warn_other = _Throttled("accept() failed: %s")

    def start(self) -> None:
        for sock in self.socks:
            self.loop.add_reader(sock.fileno(), self._accept, sock)
        self._sweep()

    def stop(self) -> None:
        for sock in self.socks:
            self.loop.remove_reader(sock.fileno())
        for timer in self._timers.values():
            timer.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.connections.close_all_silent()

    def _sweep(self) -> None:
        self.connections.sweep()
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def _pause(self, sock: socket.socket, delay: float) -> None:
        self.loop.remove_reader(sock.fileno())
        self._timers[sock] = self.loop.call_later(delay, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        self._timers.pop(sock, None)
        self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        conns = self.connections
        for _ in range(ACCEPT_BATCH):
            if conns.open >= conns.limit and not conns.shed():
                self._pause(sock, ACCEPT_PAUSE)  # every connection is busy
                return
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _PEER_GONE:
                    continue
                if exc.errno in _OUT_OF:
                    self._warn_fds(exc.strerror)
                    conns.shed()
                else:
                    self._warn_other(exc.strerror or exc)
                self._pause(sock, ACCEPT_PAUSE)
                return
            conn.setblocking(False)
            conns.add_silent(conn)
            self.loop.add_reader(conn.fileno(), self._spoke, conn)

    def _spoke(self, conn: socket.socket) -> None:
        since = self.connections.spoke(conn)
        self.tg.create_task(self._wrap(conn, since))

    async def _wrap(self, conn: socket.socket, since: float) -> None:
        def guarded() -> asyncio.Protocol:
            return _Guard(self.factory(), self.connections, since)

        try:
            await self.loop.connect_accepted_socket(guarded, conn)
        except OSError:
            conn.close()


async def serve(
    server: Server,
    host: str,
    port: int,
    ready: Callable[[str], None],
    max_connections: int | None = None,
) -> None:
    """Serve until cancelled. ``ready`` gets the URL once the socket listens."""
    raise_nofile_limit()
    connections = Connections(connection_limit(max_connections))
    socks = _listen(host, port)
    try:
        if server.public_status is None:
            server.public_status = all(_is_loopback(sock) for sock in socks)
        app = server.app()
        app.middlewares.insert(0, _guard_middleware)
        runner = web.AppRunner(
            app,
            access_log=None,
            logger=_http_log,
            max_line_size=8190,
            max_field_size=8190,
            keepalive_timeout=75,
            shutdown_timeout=5.0,  # on SIGTERM, responses still running get 5 s, not 60
        )
        await runner.setup()
        try:
            factory = runner.server
            assert factory is not None
            async with asyncio.TaskGroup() as tg:
                acceptor = _Acceptor(socks, factory, connections, tg)
                acceptor.start()
                try:
                    name = socks[0].getsockname()
                    ready(
                        f"http://{name[0]}:{name[1]}"
                        if ":" not in name[0]
                        else f"http://[{name[0]}]:{name[1]}"
                    )
                    await asyncio.Event().wait()
                finally:
                    acceptor.stop()
        finally:
            await runner.cleanup()
    finally:
        for sock in socks:
            sock.close()
