"""The whole exception hierarchy of fetchd, in one file.

Every error fetchd raises on purpose derives from :class:`FetchdError`. Its message is
one sentence that says what failed and, where there is one, what to do about it; the
CLI prints it as ``error: <message>`` and exits with :attr:`FetchdError.exit_code`.
Foreign exceptions (aiohttp, ssl, OSError, json) are translated into these at the seam
where the foreign library is called, always with ``raise ... from exc``.
"""

from __future__ import annotations


class FetchdError(Exception):
    """Base of every deliberate fetchd failure. ``exit_code`` is the CLI's exit status."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(FetchdError):
    """The command line itself is wrong (exit 2)."""

    exit_code = 2


class Terminated(FetchdError):
    """SIGTERM stopped the command after it cleaned up (exit 143, as a shell reports it)."""

    exit_code = 143


# --- input that does not parse -------------------------------------------------------


class ReferenceInvalid(FetchdError):
    """A reference (docker://…, URL, name) does not follow its grammar."""


class DigestInvalid(FetchdError):
    """A digest string is malformed or names an algorithm fetchd does not support."""


class ManifestInvalid(FetchdError):
    """A manifest or index is not valid JSON of a supported schema."""


class ManifestTooLarge(ManifestInvalid):
    """A manifest is larger than the limit (4 MiB, as the distribution spec suggests)."""


class TagInvalid(ReferenceInvalid):
    """A tag does not follow the distribution spec's grammar."""


class RangeNotSatisfiable(FetchdError):
    """A client's ``Range`` header names no byte of the blob (or does not parse)."""

    def __init__(self, message: str, size: int) -> None:
        super().__init__(message)
        self.size = size


class UnsupportedMediaType(FetchdError):
    """A manifest or layer has a media type fetchd cannot handle."""


class PlatformNotFound(FetchdError):
    """An image index has no manifest for the requested platform."""


# --- verification --------------------------------------------------------------------


class DigestMismatch(FetchdError):
    """Bytes received do not hash to the digest that was asked for; they were discarded."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(
            f"{what}: content does not match its digest (expected {expected}, got {actual}); "
            "the data was discarded — the source is corrupt or tampered with"
        )
        self.expected = expected
        self.actual = actual


class SizeMismatch(FetchdError):
    """A blob is larger or smaller than its descriptor says; the data was discarded."""

    def __init__(self, what: str, expected: int, actual: int) -> None:
        relation = "more than" if actual > expected else "only"
        super().__init__(
            f"{what}: the source sent {relation} {actual} bytes but the descriptor says "
            f"{expected}; the data was discarded"
        )
        self.expected = expected
        self.actual = actual


# --- sources -------------------------------------------------------------------------


class SourceError(FetchdError):
    """A remote source failed in a way that is not the content's fault."""


class BlobNotFound(SourceError):
    """The source does not have the blob."""


class ManifestNotFound(SourceError):
    """The source has no manifest for that name and tag or digest."""


class AuthenticationFailed(SourceError):
    """The registry refused the credentials (or wants some and none were configured)."""


class AccessDenied(SourceError):
    """Authenticated, but not allowed to read this repository."""


class TransferTimeout(SourceError):
    """A source stopped sending bytes for longer than the stall timeout."""


class TransferFailed(SourceError):
    """A connection or HTTP exchange failed and retries did not help."""


class InsecureRefused(SourceError):
    """Plain HTTP or unverified TLS would be needed; the user did not allow it."""


# --- the store -----------------------------------------------------------------------


class StoreError(FetchdError):
    """The store on disk is unusable or inconsistent."""


class ImageNotInStore(StoreError):
    """The name is not in the store (and the pull policy forbids fetching it)."""


class StoreCorrupt(StoreError):
    """fsck found blobs whose bytes do not match their digest."""


class NotEnoughSpace(StoreError):
    """A blob is bigger than the free space of the store's disk: refused before any byte."""


class DiskFull(StoreError):
    """The store's disk ran out of space (ENOSPC, EDQUOT) while writing; nothing was
    committed half-way (the write's temporary file is gone)."""

    def __init__(self, what: str, store: object) -> None:
        super().__init__(
            f"no space left on device while writing {what} in {store}; free space or use fetchd gc"
        )
        self.what = what


class StoreReadOnly(StoreError):
    """The store (or a file in it) may not be written by this user, or its filesystem is
    read-only. Reading still works: images, fsck, export, a pull of what is there."""

    def __init__(self, what: str, store: object, reason: str = "permission denied") -> None:
        super().__init__(
            f"cannot write {what} in {store}: {reason}; the store is read-only for this "
            "user: run as its owner, or use --store DIR with a store you can write"
        )
        self.what = what


def unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report for a failed TaskGroup: its first FetchdError, else the group.

    Sibling tasks are cancelled when one fails, so the first real failure is the cause.
    """
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = unwrap(exc)
        if isinstance(exc, FetchdError):
            return exc
    return group


class BadTorrent(FetchdError):
    """A torrent (metainfo) fetchd will not use: not bencode, not canonical, not the
    blob's deterministic torrent, or beyond a bound. The blob then comes over HTTP."""


class TrustError(FetchdError):
    """The keystore or a ``fetchd trust`` request cannot be used as asked (a bad prefix,
    an unreadable key file, a key that would need review without a terminal)."""


class KeyRefused(TrustError):
    """A key fails fetchd's policy: revoked (for any reason), expired, or too weak."""


class SignatureInvalid(FetchdError):
    """A signature that does not verify: tampered data, an unreadable signature, or one
    made by no key given."""


class NotTrusted(SignatureInvalid):
    """Signed, but by a key not trusted for the image's name (or no key is trusted)."""


class DiscoveryFailed(SourceError):
    """appc meta discovery found no endpoint (or no key) at any level of the name."""


class ImageInvalid(FetchdError):
    """An ACI or its appc manifest is malformed, breaks a bound, or is not what was
    asked for (another name, a label that differs)."""


class SwarmFailed(SourceError):
    """A BitTorrent download that cannot go on (stalled, too many hash failures, the
    session could not start): the engine hands the missing ranges to the next fetcher."""
