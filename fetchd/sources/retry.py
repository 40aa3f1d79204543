"""The one retry table: which answers and exceptions are worth another attempt, how long
to wait before it, and which error a status means. Every fetcher (registry requests,
segment transfers on threads, plain URLs) decides with these functions and no other.

=====================  ==========================================================
answer                 what happens
=====================  ==========================================================
429, 502, 503, 504     retried (up to ``Config.attempts``) after ``Retry-After`` or
                       an exponential backoff with full jitter; a ``Retry-After``
                       over ``Config.max_retry_after`` fails at once
connection errors,     retried the same way (a stall: ``SILENT_ATTEMPTS`` times when
stalls, short bodies   no byte came at all)
401                    the registry's challenge is answered once, then
                       :class:`AuthenticationFailed`
403                    :class:`AccessDenied`, not retried
404                    :class:`BlobNotFound` / :class:`ManifestNotFound`: not retried;
                       for a blob the engine skips this fetcher for this blob only
other statuses         :class:`TransferFailed`, not retried
=====================  ==========================================================
"""

from __future__ import annotations

import asyncio
import http.client
import random
from collections.abc import Mapping
from functools import cache

from fetchd.config import Config
from fetchd.errors import (
    AccessDenied,
    AuthenticationFailed,
    BlobNotFound,
    FetchdError,
    ManifestNotFound,
    TransferFailed,
)
from fetchd.sources.http import retry_after

#: statuses that say "not now": the next attempt may succeed
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: statuses a client follows to another URL
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


def backoff(attempt: int, base: float = 0.2, cap: float = 10.0) -> float:
    """Exponential backoff with full jitter (attempt 1 → up to ``base`` seconds)."""
    return random.uniform(0, min(cap, base * (2 ** (attempt - 1))))


def should_retry_status(status: int) -> bool:
    return status in RETRY_STATUSES


def retry_delay(
    status: int, headers: Mapping[str, str], attempt: int, config: Config, what: str
) -> float:
    """Seconds to wait before retrying after ``status``: the server's ``Retry-After``
    (delta-seconds or a date) or, without one, the backoff for ``attempt``. Raises
    :class:`TransferFailed` when the server asks for more than ``max_retry_after``:
    a peer's number is a request, not an order, and fetchd does not sit out an hour."""
    delay = retry_after(headers, backoff(attempt))
    if delay > config.max_retry_after:
        raise TransferFailed(
            f"{what}: HTTP {status} asking to retry after {delay:.0f} s, longer than fetchd "
            f"waits ({config.max_retry_after:g} s); try again later"
        )
    return delay


@cache
def retryable(*extra: type[BaseException]) -> tuple[type[BaseException], ...]:
    """The exceptions worth retrying (the next attempt may succeed), and ``extra``. A
    function, so that ``except retryable():`` imports aiohttp only when an exception is
    being matched."""
    import aiohttp

    return (
        aiohttp.ClientError,
        asyncio.TimeoutError,
        ConnectionError,
        http.client.HTTPException,
        *extra,
    )


def status_error(
    status: int, what: str, detail: str = "", *, manifest: bool = False
) -> FetchdError:
    """The error a final, unretried status means (``detail``: the server's own words)."""
    if status == 401:
        return AuthenticationFailed(f"{what}: the server requires login (HTTP 401){detail}")
    if status == 403:
        return AccessDenied(f"{what}: the server denies access (HTTP 403){detail}")
    if status == 404:
        cls = ManifestNotFound if manifest else BlobNotFound
        return cls(f"{what}: not found (HTTP 404){detail}")
    return TransferFailed(f"{what}: the server answered HTTP {status}{detail}")
