"""The one seam to aiohttp: sessions, TLS, ``--resolve``, and error translation.

Everything else in fetchd calls HTTP through the session built here, and every
aiohttp/ssl exception that escapes a request is translated by :func:`translate`
into a :class:`~fetchd.errors.FetchdError` with ``raise … from exc``.

aiohttp is imported when first needed, not with this module: a plain URL pull runs on
threads (``fetchd.sources.transport``) and never needs it, and importing it
is ~40 % of fetchd's start (80-140 ms here, of a 2 s download of 1 GiB).
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Mapping
from email.utils import parsedate_to_datetime
from functools import cache
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from fetchd.config import Config
from fetchd.errors import FetchdError, TransferFailed, TransferTimeout

if TYPE_CHECKING:
    import aiohttp
    from aiohttp.abc import AbstractResolver

USER_AGENT = "fetchd/0.1"
READ_BUFSIZE = 1 << 20


@cache
def _pinned_resolver() -> Callable[[Mapping[tuple[str, int], str]], AbstractResolver]:
    """The resolver class for ``--resolve`` (a subclass of aiohttp's: built on first use)."""
    from aiohttp.abc import AbstractResolver, ResolveResult
    from aiohttp.resolver import DefaultResolver

    class PinnedResolver(AbstractResolver):
        """curl's ``--resolve``: fixed addresses for some host:port pairs, DNS for the rest."""

        def __init__(self, pins: Mapping[tuple[str, int], str]) -> None:
            self._pins = dict(pins)
            self._default = DefaultResolver()

        async def resolve(
            self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[ResolveResult]:
            addr = self._pins.get((host.lower(), port))
            if addr is None:
                return await self._default.resolve(host, port, family)
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            return [
                ResolveResult(
                    hostname=host,
                    host=addr,
                    port=port,
                    family=fam,
                    proto=0,
                    flags=socket.AI_NUMERICHOST,
                )
            ]

        async def close(self) -> None:
            await self._default.close()

    return PinnedResolver


def ssl_context(config: Config) -> ssl.SSLContext | bool:
    """Verified TLS with the system CAs (and ``SSL_CERT_FILE``), unless ``tls`` is insecure.

    One per ``SSL_CERT_FILE``/``SSL_CERT_DIR`` pair as set at the call; the CA store is
    read at the context's first handshake (:class:`ClientContext`), not at import.
    """
    if "tls" in config.insecure:
        return False
    # One per process: sessions, threads and mirrors all use it. SSL_CERT_FILE/DIR are
    # part of the key.
    key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        ctx = _CONTEXTS[key] = ClientContext(ssl.PROTOCOL_TLS_CLIENT)
    return ctx


_CONTEXTS: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def preload_aiohttp() -> None:
    """Import aiohttp now, without the CA loads it does at import: its connector module
    builds two default SSL contexts (verified and not), each loading the system CA
    bundle, ~94 ms of CPU per process here, and fetchd never uses either (every session
    gets :func:`ssl_context`'s, or ``ssl=False``). While it imports, ``SSL_CERT_FILE``
    names an empty file, so those two contexts hold no CA from a file (the hashed
    ``SSL_CERT_DIR`` still counts; they fail closed, never open). Only while this is the
    process's one thread, before any work starts: no other thread can read the variable
    meanwhile. Else (or if aiohttp is in already) a plain import."""
    if "aiohttp" in sys.modules or threading.active_count() != 1:
        import aiohttp

        return
    saved = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = os.devnull
    try:
        import aiohttp  # noqa: F401
    finally:
        if saved is None:
            del os.environ["SSL_CERT_FILE"]
        else:
            os.environ["SSL_CERT_FILE"] = saved


class ClientContext(ssl.SSLContext):
    """What ``ssl.create_default_context()`` makes (hostname checked, certificate
    required: PROTOCOL_TLS_CLIENT's defaults; SSLKEYLOGFILE honoured), except that the CA
    store is loaded at the first handshake, with the same ``load_default_certs``.
    Loading it costs ~47 ms of CPU per process here (OpenSSL 3 parsing the system
    bundle), and a pull that speaks plain HTTP to its LAN cache never needs it.
    Handshakes may run on several threads at once."""

    def __init__(self, protocol: int) -> None:
        self._loaded = False
        self._lock = threading.Lock()
        if sys.version_info >= (3, 13):  # as create_default_context() since 3.13
            self.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | ssl.VERIFY_X509_STRICT
        keylog = os.environ.get("SSLKEYLOGFILE")
        if keylog and not sys.flags.ignore_environment:
            self.keylog_filename = keylog

    def _load(self) -> None:
        with self._lock:
            if not self._loaded:
                self.load_default_certs(ssl.Purpose.SERVER_AUTH)
                self._loaded = True

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self._load()
        return super().wrap_socket(*args, **kwargs)

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        self._load()
        return super().wrap_bio(*args, **kwargs)


def new_session(config: Config, *, limit_per_host: int = 16) -> aiohttp.ClientSession:
    import aiohttp

    connector = aiohttp.TCPConnector(
        limit=64,
        limit_per_host=limit_per_host,
        ssl=ssl_context(config),
        resolver=_pinned_resolver()(config.resolve),
    )
    # Connecting includes the TLS handshake: a server that accepts and then says nothing
    # has stalled, so that wait is bounded by the stall timeout too.
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=min(config.connect_timeout, config.stall_timeout),
        sock_read=config.stall_timeout,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers={"User-Agent": USER_AGENT},
        read_bufsize=READ_BUFSIZE,
        auto_decompress=False,
        trust_env=False,
    )


def redact(url: str) -> str:
    """A URL fit for logs and errors: no userinfo, no query (it may carry tokens)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    port = p.port or {"http": 80, "https": 443}.get(p.scheme)
    return p.scheme, (p.hostname or "").lower(), port


#: the longest wait a ``Retry-After`` or ``max-age`` is taken to state (a year): anything
#: longer is read as this, so callers compare finite numbers and print short ones
MAX_DELTA_SECONDS = 365 * 86400.0
_DIGITS = re.compile(r"[0-9]+")
#: a byte position of 19 digits or fewer fits int64 (sizes beyond are refused anyway)
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,19})-([0-9]{1,19})/([0-9]{1,19}|\*)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/([0-9]{1,19})")


def _delta_seconds(text: str) -> float | None:
    """RFC 9111 delta-seconds (ASCII digits only; ``str.isdigit`` would accept "²")."""
    if not _DIGITS.fullmatch(text):
        return None
    return MAX_DELTA_SECONDS if len(text) > 9 else min(float(text), MAX_DELTA_SECONDS)


def retry_after(headers: Mapping[str, str], default: float) -> float:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date),
    from 0 to :data:`MAX_DELTA_SECONDS`; ``default`` when absent or unreadable. Callers
    cap it (``Config.max_retry_after``): a peer's number is a request, not an order."""
    value = headers.get("Retry-After", "").strip()
    if not value:
        return default
    delta = _delta_seconds(value)
    if delta is not None:
        return delta
    try:
        when = parsedate_to_datetime(value)
        if when.tzinfo is None:  # "-0000": UTC, its source unknown (RFC 5322)
            when = when.replace(tzinfo=datetime.UTC)
        wait = (when - datetime.datetime.now(datetime.UTC)).total_seconds()
    except (TypeError, ValueError, OverflowError, IndexError):
        return default
    return min(max(0.0, wait), MAX_DELTA_SECONDS)


def cache_max_age(header: str | None) -> float | None:
    """``max-age`` of a Cache-Control header; 0 for no-cache/no-store; None if absent."""
    if not header:
        return None
    max_age = None
    for part in header.lower().split(","):
        name, _, value = part.strip().partition("=")
        if name in ("no-cache", "no-store"):
            return 0.0
        if name == "max-age":
            age = _delta_seconds(value.strip().strip('"'))
            if age is not None:
                max_age = age
    return max_age


def content_range(header: str | None) -> tuple[int, int, int | None] | None:
    """``(first, last, complete length or None)`` of a 206's ``Content-Range:
    bytes FIRST-LAST/LENGTH``, or None unless it is well formed and consistent
    (first <= last < length: RFC 9110 calls anything else invalid)."""
    m = _CONTENT_RANGE.fullmatch((header or "").strip())
    if not m:
        return None
    first, last = int(m.group(1)), int(m.group(2))
    complete = None if m.group(3) == "*" else int(m.group(3))
    if last < first or (complete is not None and last >= complete):
        return None
    return first, last, complete


def unsatisfied_length(header: str | None) -> int | None:
    """The complete length of a 416's ``Content-Range: bytes */LENGTH``, or None."""
    m = _UNSATISFIED_RANGE.fullmatch((header or "").strip())
    return int(m.group(1)) if m else None


def translate(exc: BaseException, what: str, config: Config) -> FetchdError:
    """Turn an aiohttp/ssl/OS exception from a transfer into a FetchdError."""
    if isinstance(exc, FetchdError):
        return exc
    import aiohttp

    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return TransferTimeout(
            f"{what}: no data for {config.stall_timeout:g} s; the source stalled "
            "(check the network or the server, or raise --stall-timeout)"
        )
    if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError):
        return TransferFailed(
            f"{what}: the TLS certificate is not trusted ({_reason(exc)}); add its CA to the "
            "system store or SSL_CERT_FILE, or pass --insecure-options tls"
        )
    if isinstance(exc, aiohttp.ClientConnectorError):
        return TransferFailed(f"{what}: cannot connect ({_reason(exc)})")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return TransferFailed(f"{what}: the connection ended before the body was complete")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return TransferFailed(f"{what}: {type(exc).__name__}: {_reason(exc)}")
    return TransferFailed(f"{what}: {type(exc).__name__}: {exc}")


def _reason(exc: BaseException) -> str:
    text: Any = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text).splitlines()[0][:200]
