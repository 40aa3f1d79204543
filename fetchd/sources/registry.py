"""The registry source: OCI distribution / Docker Registry HTTP API v2, pull side.

A :class:`Registry` is the authority that turns ``NAME:TAG`` into a manifest digest
(:meth:`Registry.manifest`) and a fetcher of blobs by digest (:meth:`Registry.fetch_blob`).

Who verifies: manifests are checked here against the digest asked for (by-digest
references, a parent descriptor) or reported (``Docker-Content-Digest``); blobs are
handed to an :class:`~fetchd.store.Ingest`, whose ``commit`` verifies them. Retries
(connection errors, stalls, 429/502/503/504 with ``Retry-After``), authentication
challenges and redirects are handled here; ``Authorization`` is never sent to a host
other than the registry's (blob storage behind a redirect gets none).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from urllib.parse import quote, urljoin, urlsplit

import aiohttp

from fetchd.config import Config
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
)
from fetchd.model import (
    MANIFEST_ACCEPT,
    MAX_MANIFEST_SIZE,
    NONDISTRIBUTABLE_TYPES,
    Descriptor,
    Digest,
    Reference,
)
from fetchd.sources.auth import Authenticator, load_credentials
from fetchd.sources.http import (
    backoff,
    origin,
    pump,
    redact,
    retry_after,
    retryable,
    translate,
)
from fetchd.sources.ranges import SegmentedDownload, Source
from fetchd.store.cas import Ingest, ResumedDataBad, SegmentedIngest

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
_CONTENT_RANGE_RE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class _ShortBody(Exception):
    """The body ended before the blob did: resume from where it stopped."""


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
        self.auth = Authenticator(auth_host, load_credentials(auth_host, config.auth_file))
        self._base: str | None = base.rstrip("/") if base else None
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
            async with self.session.get(f"{https}/v2/", allow_redirects=False) as resp:
                await resp.read()
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

    async def _send(
        self, method: str, path: str, scope: str, headers: dict[str, str], what: str
    ) -> aiohttp.ClientResponse:
        """Send a request with auth, redirects and retries; the caller releases the response.

        Returns the final response whatever its status, except: 401 after the
        challenge was answered raises :class:`AuthenticationFailed`; 429/5xx are
        retried up to ``config.attempts`` times, honouring ``Retry-After``.
        """
        url = f"{await self.base()}{path}"
        attempt = 0
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
                if attempt >= self.config.attempts:
                    raise translate(exc, what, self.config) from exc
                log.info("%s: %s; retrying", what, exc)
                await asyncio.sleep(backoff(attempt))
                continue
            if resp.status == 401:
                challenge = resp.headers.get("WWW-Authenticate", "")
                resp.release()
                if auth_rounds >= 2:
                    raise AuthenticationFailed(
                        f"registry {self.host} keeps refusing access to {what} (HTTP 401); "
                        "check your credentials"
                    )
                auth_rounds += 1
                attempt -= 1  # answering a challenge is not a failed attempt
                self.auth.forget(scope)
                await self.auth.answer(self.session, challenge, scope)
                continue
            if resp.status in RETRY_STATUSES and attempt < self.config.attempts:
                delay = retry_after(resp.headers, backoff(attempt))
                resp.release()
                if delay > self.config.max_retry_after:
                    raise TransferFailed(
                        f"{what}: the registry answered HTTP {resp.status} and asks to retry "
                        f"after {delay:.0f} s; try again later"
                    )
                log.info("%s: HTTP %d, retrying in %.1f s", what, resp.status, delay)
                await asyncio.sleep(delay)
                continue
            return resp

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
        detail = ""
        try:
            body = await resp.content.read(64 * 1024)
            errors = json.loads(body).get("errors") or []
            if errors and isinstance(errors[0], dict):
                detail = f" ({errors[0].get('code', '')}: {errors[0].get('message', '')})"
        except (TimeoutError, ValueError, AttributeError, aiohttp.ClientError):
            pass
        if resp.status == 401:
            return AuthenticationFailed(f"{what}: registry {self.host} requires login{detail}")
        if resp.status == 403:
            return AccessDenied(f"{what}: registry {self.host} denies access{detail}")
        if resp.status == 404:
            cls = ManifestNotFound if "manifest" in what else BlobNotFound
            return cls(f"{what}: not found on {self.host}{detail}")
        return TransferFailed(f"{what}: registry {self.host} answered HTTP {resp.status}{detail}")

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
            if resp.content_length is not None and resp.content_length > MAX_MANIFEST_SIZE:
                raise ManifestTooLarge(
                    f"{what} is {resp.content_length} bytes, "
                    f"over the {MAX_MANIFEST_SIZE} byte limit"
                )
            try:
                raw = await resp.content.read(MAX_MANIFEST_SIZE + 1)
                while len(raw) <= MAX_MANIFEST_SIZE and not resp.content.at_eof():
                    more = await resp.content.read(MAX_MANIFEST_SIZE + 1 - len(raw))
                    if not more:
                        break
                    raw += more
            except retryable() as exc:
                raise translate(exc, what, self.config) from exc
            if len(raw) > MAX_MANIFEST_SIZE:
                raise ManifestTooLarge(f"{what} is over the {MAX_MANIFEST_SIZE} byte limit")
            content_type = resp.headers.get("Content-Type")
            reported = resp.headers.get("Docker-Content-Digest")
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
        resp = await self._send(
            "GET", f"/v2/{name}/tags/list{self.query}", f"repository:{name}:pull", {}, what
        )
        async with resp:
            if resp.status != 200:
                raise await self._error(resp, what)
            try:
                doc = json.loads(await resp.content.read(MAX_MANIFEST_SIZE))
                tags = doc.get("tags") or []
            except (ValueError, AttributeError) as exc:
                raise TransferFailed(f"{what}: not a tag list") from exc
        if not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            raise TransferFailed(f"{what}: not a tag list")
        return tags

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

    async def fetch_blob(
        self,
        name: str,
        desc: Descriptor,
        ingest: Ingest,
        on_bytes: Callable[[int], None],
        on_connections: Callable[[int], None] = lambda n: None,
    ) -> None:
        """Stream blob ``desc`` of repository ``name`` into ``ingest`` and commit it.

        Resumes from ``ingest.offset`` with ``Range``; restarts if the server ignores
        it. Raises :class:`DigestMismatch`/:class:`SizeMismatch` (data discarded) or a
        :class:`SourceError` once retries are exhausted (partial data kept to resume).
        """
        what = f"blob {desc.digest.short} of {self.host}/{name}"
        # Non-distributable layers live where their descriptor's urls say (OCI image
        # spec); the registry is asked when none of those answers.
        urls: list[str | None] = []
        if desc.media_type in NONDISTRIBUTABLE_TYPES:
            urls += [u for u in desc.urls if u.startswith(("https://", "http://"))]
        urls.append(None)
        if isinstance(ingest, SegmentedIngest):
            # A big blob: several range requests at once (registries serve Range).
            path = f"/v2/{name}/blobs/{desc.digest}{self.query}"
            scope = f"repository:{name}:pull"

            async def open_registry(headers: dict[str, str]) -> aiohttp.ClientResponse:
                return await self._send("GET", path, scope, headers, what)

            sources = [Source(f"{self.host}/{name}@{desc.digest.short}", open_registry)]
            download = SegmentedDownload(ingest, sources, self.config, on_bytes, on_connections)
            try:
                await download.run()
                await ingest.commit()
            except ResumedDataBad:
                await SegmentedDownload(
                    ingest, sources, self.config, on_bytes, on_connections
                ).run()
                await ingest.commit()
            return
        for url in urls:
            try:
                try:
                    await self._fill(name, desc, ingest, on_bytes, what, url)
                    await ingest.commit()
                except ResumedDataBad:
                    log.warning("%s: resumed data did not verify; fetching it whole", what)
                    await self._fill(name, desc, ingest, on_bytes, what, url)
                    await ingest.commit()
                return
            except SourceError as exc:
                if url is None:
                    raise
                log.warning("%s: %s; trying the next source", what, exc)

    async def _fill(
        self,
        name: str,
        desc: Descriptor,
        ingest: Ingest,
        on_bytes: Callable[[int], None],
        what: str,
        url: str | None,
    ) -> None:
        failures = 0
        while ingest.offset < desc.size or desc.size == 0:
            before = ingest.offset
            try:
                await self._stream(name, desc, ingest, on_bytes, what, url)
                break
            except retryable(_ShortBody) as exc:
                # Progress resets the count: a flaky but moving transfer goes on.
                failures = 1 if ingest.offset > before else failures + 1
                if failures >= self.config.attempts:
                    if isinstance(exc, _ShortBody):
                        # Not a flaky network: the source disagrees with the descriptor.
                        await ingest.discard()
                        raise TransferFailed(
                            f"{what}: the source keeps ending the body early "
                            f"({ingest.offset} of {desc.size} bytes)"
                        ) from None
                    raise translate(exc, what, self.config) from exc
                log.info("%s: %s at %d bytes; resuming", what, type(exc).__name__, ingest.offset)
                await asyncio.sleep(backoff(failures))

    async def _stream(
        self,
        name: str,
        desc: Descriptor,
        ingest: Ingest,
        on_bytes: Callable[[int], None],
        what: str,
        url: str | None,
    ) -> None:
        """One GET of the blob from the registry (``url`` None) or from ``url``.

        Appends to ``ingest`` from its offset; raises a ``retryable()`` error or
        :class:`_ShortBody` when the body ends early, after keeping what arrived.
        """
        headers = {}
        if ingest.offset:
            headers["Range"] = f"bytes={ingest.offset}-"
        if url is None:
            resp = await self._send(
                "GET",
                f"/v2/{name}/blobs/{desc.digest}{self.query}",
                f"repository:{name}:pull",
                headers,
                what,
            )
        else:  # another host: no registry credentials, ordinary redirects
            resp = await self.session.get(url, headers=headers)
        async with resp:
            if resp.status == 206:
                m = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != ingest.offset:
                    await ingest.restart()
                    raise _ShortBody("bad Content-Range")
            elif resp.status == 200:
                if ingest.offset:
                    await ingest.restart()  # the server ignored Range: take it whole
            elif resp.status == 416:
                await ingest.restart()
                raise _ShortBody("range not satisfiable")
            else:
                raise await self._error(resp, what)

            async def sink(pieces: list[bytes], n: int) -> None:
                await ingest.write(pieces)
                on_bytes(n)

            # what arrived before a cut is kept: the next attempt resumes after it
            await pump(resp, sink)
        await ingest.flush()
        if ingest.offset < desc.size:
            raise _ShortBody(f"body ended at {ingest.offset}")
