"""The registry source: OCI distribution / Docker Registry HTTP API v2, pull side.

A :class:`Registry` is the authority that turns ``NAME:TAG`` into a manifest digest
(:meth:`Registry.manifest`) and a fetcher of blobs by digest (:meth:`Registry.fetch_blob`).

Who verifies: manifests are checked here against the digest asked for (by-digest
references, a parent descriptor) or reported (``Docker-Content-Digest``); blobs are
handed to an :class:`~fetchd.store.Ingest`, whose ``commit`` verifies them. Retries
(connection errors, stalls, 429/502/503/504 with ``Retry-After``), authentication
challenges and redirects are handled here; ``Authorization`` is never sent to a host
other than the registry's (blob storage behind a redirect gets none).

Time bounds (see ``Config.request_budget``): a request's retries, backoffs and
``Retry-After`` waits together stay within the request budget, a ``Retry-After`` over
``config.max_retry_after`` fails at once, a server that accepts and never answers is
given ``SILENT_ATTEMPTS`` stall timeouts, and a manifest or tag list (head and body)
arrives whole within the budget or the request fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from urllib.parse import quote, urljoin, urlsplit

import aiohttp

from fetchd.config import SILENT_ATTEMPTS, Config
from fetchd.errors import (
    AccessDenied,
    AuthenticationFailed,
    BlobNotFound,
    DigestMismatch,
    FetchdError,
    InsecureRefused,
    ManifestNotFound,
    ManifestTooLarge,
    SizeMismatch,
    SourceError,
    TransferFailed,
    TransferTimeout,
)
from fetchd.model import (
    MANIFEST_ACCEPT,
    MAX_MANIFEST_SIZE,
    NONDISTRIBUTABLE_TYPES,
    Descriptor,
    Digest,
    Reference,
    load_json,
)
from fetchd.sources.auth import Authenticator, load_credentials
from fetchd.sources.base import Location, Resolved, Sink
from fetchd.sources.http import content_range, origin, redact, translate
from fetchd.sources.retry import (
    REDIRECT_STATUSES,
    backoff,
    retry_delay,
    retryable,
    should_retry_status,
)

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
#: bytes of an error body read for its OCI error (a hostile one may be endless)
MAX_ERROR_BODY = 64 * 1024


class Registry:
    """One registry host. Calls may overlap (one instance serves a whole pull)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: Config,
        host: str,
        *,
        base: str | None = None,
        ns: str | None = None,
        patient: bool = True,
    ) -> None:
        """``host`` names the registry (and its credentials). ``base`` pins the API's URL
        (``http://cache:5050``: a mirror, or a server's configured upstream) instead of
        probing https then http; ``ns`` adds the OCI ``ns=`` parameter a mirror needs to
        know which registry a name belongs to."""
        self.session = session
        self.config = config
        self.host = host
        # docker.io names the registry; its API lives on another host (as docker does).
        self.api_host = "registry-1.docker.io" if host == "docker.io" else host
        auth_host = urlsplit(base).netloc if base else host
        self.auth = Authenticator(
            auth_host,
            load_credentials(auth_host, config.auth_file),
            budget=config.request_budget,
        )
        self._base: str | None = base.rstrip("/") if base else None
        self._pinned = base is not None
        #: retry what retry.py calls retryable (False: a mirror another source follows)
        self.patient = patient
        #: who answers, for messages: a mirror by its URL, the registry by its name
        self.where = f"mirror {redact(base)}" if base and ns else f"registry {host}"
        self._base_lock = asyncio.Lock()
        self.query = f"?ns={quote(ns, safe='')}" if ns else ""

    # --- the base URL: https, or http when the user allowed it ---------------------

    async def base(self) -> str:
        """``https://HOST`` or, if TLS fails to connect and ``http`` is allowed, ``http://``."""
        async with self._base_lock:
            if self._base is None:
                self._base = await self._probe()
            return self._base

    async def _probe(self) -> str:
        https = f"https://{self.api_host}"
        try:
            # Only the status line matters; the body is not read (it may be endless).
            async with self.session.get(f"{https}/v2/", allow_redirects=False):
                pass
            return https
        except aiohttp.ClientConnectorCertificateError as exc:
            raise translate(exc, f"registry {self.host}", self.config) from exc
        except (aiohttp.ClientError, OSError) as exc:
            if "http" not in self.config.insecure:
                err = translate(exc, f"registry {self.host}", self.config)
                raise InsecureRefused(
                    f"{err}; if {self.host} serves plain HTTP, pass --insecure-options http"
                ) from exc
        return f"http://{self.api_host}"

    # --- requests ------------------------------------------------------------------

    @property
    def pinned_base(self) -> str | None:
        """The API's URL when it was given (a mirror, a server's upstream), else None."""
        return self._base if self._pinned else None

    async def _send(
        self,
        method: str,
        path: str,
        scope: str,
        headers: dict[str, str],
        what: str,
        *,
        patient: bool | None = None,
    ) -> aiohttp.ClientResponse:
        """Send a request with auth, redirects and retries; the caller releases the response.

        Returns the final response whatever its status, except: 401 after the
        challenge was answered raises :class:`AuthenticationFailed`; what the retry
        table (retry.py) calls retryable is retried up to ``config.attempts`` times
        within the request budget, honouring ``Retry-After`` — or, not ``patient`` (a
        mirror, with another source to ask), not at all.
        """
        url = f"{await self.base()}{path}"
        budget = self.config.request_budget
        if patient is None:
            patient = self.patient
        attempts = self.config.attempts if patient else 1
        started = time.monotonic()
        attempt = 0
        silent = 0
        auth_rounds = 0
        while True:
            attempt += 1
            sent = dict(headers)
            authz = self.auth.header(scope)
            if authz:
                sent["Authorization"] = authz
            try:
                resp = await self._follow(method, url, sent)
            except aiohttp.ClientConnectorCertificateError as exc:
                raise translate(exc, what, self.config) from exc
            except retryable() as exc:
                if isinstance(exc, TimeoutError):
                    # Accepted (or not) and then nothing: retried once, not attempts times.
                    silent += 1
                    if silent >= SILENT_ATTEMPTS or not patient:
                        raise TransferTimeout(self._silent(what, silent)) from exc
                delay = backoff(attempt)
                if attempt >= attempts or not self._fits(started, delay):
                    raise translate(exc, what, self.config) from exc
                log.info("%s: %s; retrying", what, exc)
                await asyncio.sleep(delay)
                continue
            if resp.status == 401:
                challenge = ", ".join(resp.headers.getall("WWW-Authenticate", []))
                resp.release()
                if auth_rounds >= 2:
                    raise AuthenticationFailed(
                        f"{self.where} keeps refusing access to {what} (HTTP 401); "
                        "check your credentials"
                    )
                auth_rounds += 1
                attempt -= 1  # answering a challenge is not a failed attempt
                self.auth.forget(scope)
                await self.auth.answer(self.session, challenge, scope, str(resp.url))
                continue
            if should_retry_status(resp.status) and attempt < attempts:
                resp.release()
                delay = retry_delay(
                    resp.status, resp.headers, attempt, self.config, f"{what}: the registry"
                )
                if not self._fits(started, delay):
                    raise TransferFailed(
                        f"{what}: the registry answered HTTP {resp.status} {attempt} times in "
                        f"{time.monotonic() - started:.0f} s (a request may take "
                        f"{budget:g} s in all, waits included); try again later"
                    )
                log.info("%s: HTTP %d, retrying in %.1f s", what, resp.status, delay)
                await asyncio.sleep(delay)
                continue
            return resp

    def _fits(self, started: float, delay: float) -> bool:
        """Whether waiting ``delay`` more still ends within the request budget."""
        return time.monotonic() - started + delay <= self.config.request_budget

    def _silent(self, what: str, times: int) -> str:
        wait = self.config.stall_timeout
        return (
            f"{what}: {self.where} did not answer (no data for {wait:g} s, "
            f"{times} times); the server is down or overloaded: check it or try again "
            "later (or raise --stall-timeout if it is only slow)"
        )

    async def _follow(
        self, method: str, url: str, headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        first = origin(url)
        for _ in range(MAX_REDIRECTS + 1):
            resp = await self.session.request(method, url, headers=headers, allow_redirects=False)
            location = resp.headers.get("Location")
            if resp.status not in REDIRECT_STATUSES or not location:
                return resp
            resp.release()
            url = urljoin(url, location)
            if origin(url) != first:
                # Blob storage (S3, a CDN) gets no registry credentials.
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
        raise TransferFailed(f"{redact(url)}: more than {MAX_REDIRECTS} redirects")

    async def _error(self, resp: aiohttp.ClientResponse, what: str) -> FetchdError:
        """Translate a non-success status (OCI error body included) into an error."""
        try:
            body = await resp.content.read(MAX_ERROR_BODY)
        except (TimeoutError, aiohttp.ClientError):
            body = b""
        detail = oci_error_detail(body)
        if resp.status == 401:
            return AuthenticationFailed(f"{what}: {self.where} requires login{detail}")
        if resp.status == 403:
            return AccessDenied(f"{what}: {self.where} denies access{detail}")
        if resp.status == 404:
            cls = ManifestNotFound if "manifest" in what else BlobNotFound
            return cls(f"{what}: not found on {self.where.removeprefix('registry ')}{detail}")
        return TransferFailed(f"{what}: {self.where} answered HTTP {resp.status}{detail}")

    async def _document(self, resp: aiohttp.ClientResponse, what: str) -> bytes:
        """The whole body of a manifest or tag list, at most MAX_MANIFEST_SIZE bytes."""
        if resp.content_length is not None and resp.content_length > MAX_MANIFEST_SIZE:
            raise ManifestTooLarge(
                f"{what} is {resp.content_length} bytes, over the {MAX_MANIFEST_SIZE} byte limit"
            )
        pieces: list[bytes] = []
        got = 0
        try:
            while got <= MAX_MANIFEST_SIZE:
                more = await resp.content.read(MAX_MANIFEST_SIZE + 1 - got)
                if not more:
                    break
                pieces.append(more)
                got += len(more)
        except retryable() as exc:
            raise translate(exc, what, self.config) from exc
        if got > MAX_MANIFEST_SIZE:
            raise ManifestTooLarge(f"{what} is over the {MAX_MANIFEST_SIZE} byte limit")
        return b"".join(pieces)

    def _too_slow(self, what: str) -> TransferTimeout:
        return TransferTimeout(
            f"{what}: not complete within {self.config.request_budget:g} s (registry "
            f"{self.where} sends it too slowly or not at all); check the server or the "
            "network, or raise --stall-timeout (the bound is 4 × --stall-timeout, at least 5 s)"
        )

    # --- manifests -----------------------------------------------------------------

    async def manifest(
        self, ref: Reference, expected: Descriptor | None = None
    ) -> tuple[bytes, str | None, Digest]:
        """Fetch the manifest for ``ref`` (or for ``expected``, a child of an index).

        Returns (bytes, Content-Type, digest). The digest is verified against the one
        asked for (a by-digest reference or ``expected``) or, for a tag, against the
        registry's ``Docker-Content-Digest`` when it sends one.
        """
        want = expected.digest if expected else ref.digest
        target = str(want) if want else str(ref.tag)
        what = f"manifest {ref.repository}{'@' if want else ':'}{target}"
        try:
            async with asyncio.timeout(self.config.request_budget):
                resp = await self._send(
                    "GET",
                    f"/v2/{ref.name}/manifests/{target}{self.query}",
                    f"repository:{ref.name}:pull",
                    {"Accept": ", ".join(MANIFEST_ACCEPT)},
                    what,
                )
                async with resp:
                    if resp.status != 200:
                        raise await self._error(resp, what)
                    raw = await self._document(resp, what)
                    content_type = resp.headers.get("Content-Type")
                    reported = resp.headers.get("Docker-Content-Digest")
        except TimeoutError:
            raise self._too_slow(what) from None
        if want is None and reported:
            want = Digest.parse(reported.strip())
        digest = Digest.of(raw, want.algorithm if want else "sha256")
        if want is not None and digest != want:
            raise DigestMismatch(what, str(want), str(digest))
        if expected is not None and len(raw) != expected.size:
            raise SizeMismatch(what, expected.size, len(raw))
        return raw, content_type, digest

    async def tags(self, name: str) -> list[str]:
        """``GET /v2/NAME/tags/list`` (first page: up to the registry's default count)."""
        what = f"tags of {self.host}/{name}"
        try:
            async with asyncio.timeout(self.config.request_budget):
                resp = await self._send(
                    "GET", f"/v2/{name}/tags/list{self.query}", f"repository:{name}:pull", {}, what
                )
                async with resp:
                    if resp.status != 200:
                        raise await self._error(resp, what)
                    body = await self._document(resp, what)
        except TimeoutError:
            raise self._too_slow(what) from None
        doc = load_json(body, what, TransferFailed)
        tags = doc.get("tags") if isinstance(doc, dict) else None
        if not (isinstance(tags, list | None) and all(isinstance(t, str) for t in tags or [])):
            raise TransferFailed(f"{what}: not a tag list")
        return list(tags or [])

    # --- blobs ---------------------------------------------------------------------

    async def blob_size(self, name: str, digest: Digest) -> int:
        """The size of a blob, from a HEAD (for a client that asks before any manifest)."""
        what = f"blob {digest.short} of {self.host}/{name}"
        resp = await self._send(
            "HEAD", f"/v2/{name}/blobs/{digest}{self.query}", f"repository:{name}:pull", {}, what
        )
        async with resp:
            if resp.status != 200:
                raise await self._error(resp, what)
            if resp.content_length is None:
                raise TransferFailed(f"{what}: the registry sent no Content-Length")
            return resp.content_length

    def blobs(self, name: str, *, mirror: bool = False) -> RegistryBlobs:
        """The fetcher of repository ``name``'s blobs on this registry (see base.py)."""
        return RegistryBlobs(self, name, mirror=mirror)

    # --- the authority -------------------------------------------------------------

    async def resolve(self, ref: Reference) -> Resolved:
        """:class:`~fetchd.sources.base.Resolver`: the top manifest of ``ref``."""
        raw, ctype, digest = await self.manifest(ref)
        media_type = ctype.split(";")[0].strip() if ctype else ""
        return Resolved(Descriptor(media_type, digest, len(raw)), raw, self.where)

    async def child(self, ref: Reference, desc: Descriptor) -> bytes:
        """:class:`~fetchd.sources.base.Resolver`: a manifest of an index, by digest."""
        raw, _, _ = await self.manifest(ref, desc)
        return raw


class _ShortBody(Exception):
    """The body ended before the blob did: resume from where it stopped."""


class RegistryBlobs:
    """Blobs of one repository on one registry: a :class:`~fetchd.sources.base.Fetcher`
    (one streamed GET, resumed with ``Range``) and a ``RangeFetcher`` (:meth:`locate`:
    the blob URL after authentication and redirects, for the segment scheduler).

    Never verifies, never commits (the engine does both). ``mirror``: a cache asked
    before the origin (it names itself so in logs). A fetch that another fetcher follows
    (``last`` False) is not retried: the next one is asked instead. Calls may overlap.
    """

    def __init__(self, registry: Registry, name: str, *, mirror: bool = False) -> None:
        self.registry = registry
        self.name = name
        self.mirror = mirror
        base = registry.pinned_base
        where = redact(base) if base else f"registry {registry.host}"
        self.label = f"{where} ({'mirror' if mirror else 'origin'})"

    def _what(self, desc: Descriptor) -> str:
        return f"blob {desc.digest.short} of {self.registry.host}/{self.name}"

    def _path(self, desc: Descriptor) -> str:
        return f"/v2/{self.name}/blobs/{desc.digest}{self.registry.query}"

    async def locate(self, desc: Descriptor) -> Location:
        """Ask for the blob's first byte (answering any challenge, following redirects):
        the URL that answered and the Authorization it took, if that is the registry's."""
        reg = self.registry
        what = self._what(desc)
        resp = await reg._send(
            "GET",
            self._path(desc),
            f"repository:{self.name}:pull",
            {"Range": "bytes=0-0"},
            what,
        )
        async with resp:
            if resp.status not in (200, 206):
                raise await reg._error(resp, what)
            sent = resp.request_info.headers.get("Authorization")
            url = str(resp.url)
        return Location(url, {"Authorization": sent} if sent else {})

    async def fetch(
        self, desc: Descriptor, sink: Sink, on_bytes: Callable[[int], None], *, last: bool = True
    ) -> None:
        """Stream ``desc`` into ``sink`` from its offset (see base.Fetcher). Non-
        distributable layers are asked where their descriptor's urls say first."""
        what = self._what(desc)
        urls: list[str | None] = []
        if desc.media_type in NONDISTRIBUTABLE_TYPES:
            urls += [u for u in desc.urls if u.startswith(("https://", "http://"))]
        urls.append(None)
        for url in urls:
            try:
                await self._fill(desc, sink, on_bytes, what, url, patient=last)
                return
            except SourceError as exc:
                if url is None:
                    raise
                log.warning("%s: %s; trying the next source", what, exc)

    async def _fill(
        self,
        desc: Descriptor,
        sink: Sink,
        on_bytes: Callable[[int], None],
        what: str,
        url: str | None,
        *,
        patient: bool,
    ) -> None:
        config = self.registry.config
        attempts = config.attempts if patient else 1
        failures = 0
        while sink.offset < desc.size or desc.size == 0:
            before = sink.offset
            try:
                await self._stream(desc, sink, on_bytes, what, url, patient)
                break
            except retryable(_ShortBody) as exc:
                # Progress resets the count: a flaky but moving transfer goes on.
                failures = 1 if sink.offset > before else failures + 1
                if failures >= attempts:
                    if isinstance(exc, _ShortBody) and patient:
                        # Not a flaky network: the source disagrees with the descriptor.
                        await sink.restart()
                        raise TransferFailed(
                            f"{what}: the source keeps ending the body early "
                            f"({sink.offset} of {desc.size} bytes)"
                        ) from None
                    if isinstance(exc, _ShortBody):
                        raise TransferFailed(f"{what}: {self.label}: {exc}") from None
                    raise translate(exc, f"{what} from {self.label}", config) from exc
                log.info("%s: %s at %d bytes; resuming", what, type(exc).__name__, sink.offset)
                await asyncio.sleep(backoff(failures))

    async def _stream(
        self,
        desc: Descriptor,
        sink: Sink,
        on_bytes: Callable[[int], None],
        what: str,
        url: str | None,
        patient: bool,
    ) -> None:
        """One GET of the blob from the registry (``url`` None) or from ``url``.

        Appends to ``sink`` from its offset; raises a ``retryable()`` error or
        :class:`_ShortBody` when the body ends early, after keeping what arrived.
        """
        reg = self.registry
        headers = {}
        if sink.offset:
            headers["Range"] = f"bytes={sink.offset}-"
        if url is None:
            resp = await reg._send(
                "GET",
                self._path(desc),
                f"repository:{self.name}:pull",
                headers,
                what,
                patient=patient,
            )
        else:  # another host: no registry credentials, ordinary redirects
            resp = await reg.session.get(url, headers=headers)
        async with resp:
            if resp.status == 206:
                got = content_range(resp.headers.get("Content-Range"))
                if got is None or got[0] != sink.offset:
                    await sink.restart()
                    raise _ShortBody("bad Content-Range")
            elif resp.status == 200:
                if sink.offset:
                    await sink.restart()  # the server ignored Range: take it whole
            elif resp.status == 416:
                await sink.restart()
                raise _ShortBody("range not satisfiable")
            else:
                raise await reg._error(resp, what)

            async def write(pieces: list[bytes], n: int) -> None:
                await sink.write_at(sink.offset, pieces)
                on_bytes(n)

            # what arrived before a cut is kept: the next attempt resumes after it
            await pump(resp, write)
        if sink.offset < desc.size:
            raise _ShortBody(f"body ended at {sink.offset}")


WRITE_BATCH = 1 << 20
MAX_PIECES = 256  # pieces per batch: pwritev takes at most IOV_MAX (1024) buffers
#: bytes the kernel gathers before the loop is woken for a body (SO_RCVLOWAT; see pump)
LOW_WATER = 64 << 10
#: seconds without a piece after which what waits in the socket is read however little
GATHER_FOR = 0.05


async def pump(
    resp: aiohttp.ClientResponse, sink: Callable[[list[bytes], int], Awaitable[None]]
) -> None:
    """Hand ``resp``'s body to ``sink`` in batches of about 1 MiB (the pieces as read:
    nothing is joined on the event loop). On a retryable error the pieces that arrived
    are handed over before it propagates."""
    pending: list[bytes] = []
    buffered = 0
    with _low_water(resp) as arrived:
        try:
            async for piece, _ in resp.content.iter_chunks():
                arrived(len(piece))
                pending.append(piece)
                buffered += len(piece)
                if buffered >= WRITE_BATCH or len(pending) >= MAX_PIECES:
                    await sink(pending, buffered)
                    pending, buffered = [], 0
        except retryable():
            if pending:
                await sink(pending, buffered)
            raise
    if pending:
        await sink(pending, buffered)


@contextlib.contextmanager
def _low_water(resp: aiohttp.ClientResponse) -> Iterator[Callable[[int], None]]:
    """While a body of known length is read: the socket wakes the loop only once
    LOW_WATER bytes (or the rest of the body, if less) wait in it (``SO_RCVLOWAT``).

    A body paced by its sender (one stream with a rate-limited link to itself) woke
    the loop for every packet: ``fetchd serve`` spent twice the CPU on a layer that had
    the whole 100 Mbit/s link, 38,281 pieces of 1.7 KiB on average against 2,880 when
    four layers shared it (benchmarks/lan_swarm.py --wan). The kernel still ACKs as
    the bytes come, and wakes the reader early when the receive window runs out. The
    low water mark follows the bytes left, so the body's last bytes wake it; it is set
    back to 1 before the connection goes back to the pool, and for GATHER_FOR s after
    the last piece whenever none came (a sender that pauses, or holds its last bytes,
    has what it sent read within that time). Not for an encoded body
    (``Content-Encoding``): its pieces are decoded, its length is not, and a mark above
    what is left of the encoded bytes would never wake the reader."""
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    left = resp.content_length if encoding in ("", "identity") else None
    transport = resp.connection.transport if resp.connection is not None else None
    sock = transport.get_extra_info("socket") if transport is not None else None
    loop = asyncio.get_running_loop()
    mark = 1
    timer: asyncio.TimerHandle | None = None

    def set_mark(want: int) -> None:
        nonlocal left, mark
        if sock is None or want == mark:
            return
        try:
            # Linux signals readiness at once if the new mark is already met.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
            mark = want
        except OSError:  # not a TCP socket here: nothing gathered
            left = None

    def arrived(n: int) -> None:
        nonlocal left, timer
        if left is None or sock is None:
            return
        left -= n
        set_mark(max(1, min(LOW_WATER, left)))
        if timer is not None:
            timer.cancel()
        timer = loop.call_later(GATHER_FOR, set_mark, 1) if mark > 1 else None

    arrived(0)
    try:
        yield arrived
    finally:
        if timer is not None:
            timer.cancel()
        with contextlib.suppress(OSError):
            set_mark(1)


def oci_error_detail(body: bytes) -> str:
    """`` (CODE: message)`` of an OCI error body's first error, or "" if it has none.

    The body is a peer's: any bytes at all, so anything unreadable is just no detail,
    and what is shown is printable and short (an error stays one line)."""
    try:
        doc = load_json(body, "the error body")
    except FetchdError:
        return ""
    errors = doc.get("errors") if isinstance(doc, dict) else None
    first = errors[0] if isinstance(errors, list) and errors else None
    if not isinstance(first, dict):
        return ""
    code, message = first.get("code", ""), first.get("message", "")
    text = f"{code if isinstance(code, str) else ''}: {message if isinstance(message, str) else ''}"
    text = "".join(c if c.isprintable() else " " for c in text[:200])
    return f" ({text})"
