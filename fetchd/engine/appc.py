"""pull_appc(): an appc image — by name (meta discovery), by ``https://…/x.aci`` URL, or a
local ``.aci`` file — verified by a key trusted for its name, into the store as an OCI
image (../shared/APPC.md §1.4-1.6, §2.4, §2.5, §6).

The contract, for a name (rkt's fetch, made safer):

* the store is asked first (pull policy ``new``/``never``: rkt's GetACI by name and labels,
  the host's os/arch added to the request);
* keys: those trusted for the name (root keys and every path prefix); when none is trusted
  for a prefix of it and ``--trust-keys-from-https`` is given, the ``ac-discovery-pubkeys``
  of the name are fetched (https only, unless ``--insecure-options pubkey``) and trusted
  for the name (rkt's TOFU);
* discovery gives endpoints, tried in document order (the next one on a transport error
  or a 404). For each, **the signature first**: its issuer must be a trusted key for the
  name, valid now, before the ACI is requested. A 202 on the signature defers it: the ACI
  is fetched into the ingest, then the signature asked again (Retry-After honoured, at
  most 3 times and 60 s);
* the ACI comes through the engine's URL machinery (a segmented, resumable ingest; rkt's
  remote cache: within ``max-age`` no request at all, past it a conditional GET, a 304
  reuses the stored blob) but is **committed only after** the signature verified (in a
  child process), the tar's structure passed, and the manifest's name and the requested
  labels equal the request; a failure discards the bytes, so nothing resumes them;
* dependencies follow, each discovered and verified for its own name and labels (no
  os/arch added), its ``imageID`` and ``size`` checked; cycles, more than 16 levels or
  64 dependencies are refused;
* the store then holds the ACIs as signed, their ``.asc`` and appc manifests as blobs,
  a synthesised OCI config and an OCI image manifest whose layers are the ACIs in render
  order (dependencies first), named ``NAME:VERSION`` in index.json (layout.set_appc_entry).
  Nothing is visible before that; a failure leaves no name and no blob of this pull.

``--torrent`` (quayctl's ``rkt torrent pull``, APPC.md §2.6): the ACI's URL is first asked
with ``Accept: application/x-bittorrent``; an answer of that type is a torrent of its bytes,
whose swarm (foreign.TorrentFetcher) is asked ahead of the URL, into the same kind of
ingest, judged by the same signature and checks before commit. Any other answer: HTTP.

``--insecure-options image`` skips the signature alone (a warning says so); the structure,
name, label and image ID checks stay.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import urljoin

from fetchd.engine.fetching import Sources, UrlFetcher
from fetchd.engine.pull import PullResult, is_url
from fetchd.errors import (
    BlobNotFound,
    FetchdError,
    ImageInvalid,
    ImageNotInStore,
    InsecureRefused,
    KeyRefused,
    NotTrusted,
    SignatureInvalid,
    SourceError,
    TransferFailed,
    TransferTimeout,
    TrustError,
    UsageError,
)
from fetchd.model import OCI_MANIFEST, Descriptor, Digest
from fetchd.sources.http import redact, retry_after, translate
from fetchd.sources.retry import retryable
from fetchd.store import layout
from fetchd.store.cas import Ingest
from fetchd.store.maintenance import appc_trust_problem, record_url
from fetchd.store.meta import UrlRecord

if TYPE_CHECKING:
    import aiohttp

    from fetchd.appc.aci import Inspected
    from fetchd.appc.names import AppName
    from fetchd.engine.foreign import ForeignTorrent
    from fetchd.engine.pull import Engine
    from fetchd.trust.keystore import Keystore, TrustedKey
    from fetchd.trust.openpgp import KeyInfo, SigInfo, Verified

log = logging.getLogger(__name__)

#: the largest detached signature read (one signature packet is far smaller)
MAX_SIGNATURE = 64 << 10
#: the largest key file ``ac-discovery-pubkeys`` may serve
MAX_PUBKEY = 1 << 20
#: dependency depth and count (the spec names no bound; a hostile tree could be endless)
MAX_DEPTH = 16
MAX_DEPENDENCIES = 64
#: a deferred (202) signature: asked again at most this many times, within this budget
DEFER_TRIES = 3
DEFER_BUDGET = 60.0
#: ceiling on any single request for a signature or a key (also bounded by the stall timeout)
SMALL_REQUEST_BUDGET = 60.0
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
#: what ``--torrent`` asks an ACI's URL for (Quay's answer for quayctl)
TORRENT_TYPE = "application/x-bittorrent"
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True, slots=True)
class _Want:
    """What one image of the pull must be: checked against its manifest."""

    #: None: whatever the manifest names (a direct URL or a local file)
    name: str | None
    labels: dict[str, str]
    image_id: str | None = None
    size: int | None = None
    #: how messages name it ("example.com/hello:1.0.0")
    shown: str = ""


@dataclass(slots=True)
class _Aci:
    """One ACI of the pull, verified and committed (not yet named)."""

    layer: Descriptor
    inspected: Inspected
    deps: list[_Aci] = field(default_factory=list)


@dataclass(slots=True)
class _Checked:
    inspected: Inspected
    signer: str | None


def _shown(name: str, labels: dict[str, str]) -> str:
    version = labels.get("version")
    return f"{name}:{version}" if version else name


def _say(line: str) -> None:
    """rkt's stderr lines ("signature verified:", warnings) — the user's, not the log's."""
    print(line, file=sys.stderr, flush=True)


def _can_review() -> bool:
    from fetchd.trust.command import can_review

    return can_review()


async def _reviewed(data: bytes, name: str, location: str) -> bool:
    """Every key of a discovered key file shown and accepted at the terminal (each one
    asked; one "no" trusts none of the file). Blocking reads on a thread."""
    from fetchd.trust.command import review_key
    from fetchd.trust.openpgp import read_keys

    keys = await asyncio.to_thread(read_keys, data, location)
    for key in keys:
        if not await asyncio.to_thread(review_key, key, name, location):
            return False
    return True


async def pull_appc(engine: Engine, text: str) -> PullResult:
    """Pull the appc image ``text`` names (a name, an https ACI URL or a local .aci
    file) into the store, verified; returns the OCI manifest's digest as ``digest``."""
    return await _Pull(engine).run(text)


def _local_path(text: str) -> Path | None:
    """A local ACI file: ``….aci`` that exists or is written as a path."""
    if not text.endswith(".aci"):
        return None
    path = Path(text)
    if path.exists() or text.startswith(("/", "./", "../", "~")):
        return path.expanduser()
    return None


class _Pull:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config = engine.config
        self.store = engine.store
        self.unsigned = "image" in self.config.insecure
        self._keystore: Keystore | None = None
        #: URL records to write once the image is named (rkt's remote rows)
        self.records: list[UrlRecord] = []
        #: small blobs (signatures, appc manifests) committed with the image
        self.small: dict[Digest, bytes] = {}
        self.count = 0
        #: the Retry-After of the last 202 for a signature
        self.retry_after = 1.0

    @property
    def keystore(self) -> Keystore:
        if self._keystore is None:
            from fetchd.trust.keystore import Keystore

            self._keystore = Keystore.default(self.config.trust_dir)
        return self._keystore

    # --- entry points ---------------------------------------------------------------------

    async def run(self, text: str) -> PullResult:
        local = None if is_url(text) else _local_path(text)
        app = None
        if not is_url(text) and local is None:
            from fetchd.appc.names import AppName

            app = AppName.parse(text).with_host_defaults()
            found = await self._stored(app)
            if found is not None:
                return found
            if self.config.pull_policy == "never":
                raise ImageNotInStore(
                    f"{app} is not in the store and --pull-policy never forbids fetching it"
                )
        if self.unsigned:
            _say("warning: image signature verification has been disabled")
        async with self.engine.leased([]):
            if app is not None:
                labels = dict(app.labels)
                want = _Want(app.name, labels, shown=_shown(app.name, labels))
                top = await self._tree(want, app, ())
            elif local is not None:
                top = await self._local(local)
                await self._deps(top, ())
            else:
                top = await self._direct(text)
                await self._deps(top, ())
            return await self._publish(top)

    async def _stored(self, app: AppName) -> PullResult | None:
        """rkt's GetACI: an image of this name with every requested label, complete."""
        if self.config.pull_policy not in ("new", "never"):
            return None
        labels = dict(app.labels)
        try:
            times = {k: v[0] for k, v in self.engine.meta.times().items()}
        except FetchdError:
            times = {}
        entry = await asyncio.to_thread(layout.find_appc, self.store, app.name, labels, times)
        if entry is None or not self.engine.complete(entry):
            return None
        if not self.unsigned:
            problem = await asyncio.to_thread(
                appc_trust_problem, self.store, entry, self.keystore, time.time()
            )
            if problem is not None:
                # pulled unsigned, or by a key no longer trusted: a verified pull fetches
                # (and verifies) it again, and the result replaces the stored entry
                _say(f"{entry.name} in the store is not used: {problem}; fetching it again")
                return None
        await asyncio.to_thread(self.engine._touch_image, entry.name, str(entry.manifest.digest))
        desc = (await asyncio.to_thread(layout.manifests, self.store, entry))[0]
        return PullResult(entry.name, entry.manifest.digest, desc, False, (desc,))

    # --- one image by name, then its dependencies -----------------------------------------

    async def _tree(
        self, want: _Want, app: AppName, chain: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    ) -> _Aci:
        key = (want.name or "", tuple(sorted(want.labels.items())))
        if key in chain:
            names = " → ".join([c[0] for c in chain[chain.index(key) :]] + [key[0]])
            raise ImageInvalid(f"dependency cycle: {names}")
        if len(chain) > MAX_DEPTH:
            raise ImageInvalid(
                f"{want.shown}: dependencies nest deeper than {MAX_DEPTH} levels "
                f"({' → '.join(c[0] for c in chain)})"
            )
        aci = await self._by_name(want, app)
        await self._deps(aci, (*chain, key))
        return aci

    async def _deps(
        self, aci: _Aci, chain: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    ) -> None:
        m = aci.inspected.manifest
        if not m.dependencies:
            return
        from fetchd.appc.names import AppName

        if not chain:
            chain = ((m.name, tuple(sorted(m.labels.items()))),)
        for dep in m.dependencies:
            self.count += 1
            if self.count > MAX_DEPENDENCIES:
                raise ImageInvalid(
                    f"{m.name}: more than {MAX_DEPENDENCIES} dependencies in all; refused"
                )
            labels = dict(dep.labels)
            dapp = AppName(dep.image_name, tuple(sorted(labels.items())))
            dwant = _Want(
                dep.image_name,
                labels,
                dep.image_id,
                dep.size,
                f"{_shown(dep.image_name, labels)} (a dependency of {m.name})",
            )
            aci.deps.append(await self._tree(dwant, dapp, chain))

    async def _by_name(self, want: _Want, app: AppName) -> _Aci:
        from fetchd.appc.discovery import discover_endpoints

        assert want.name is not None
        keys: list[TrustedKey] | None = None
        if not self.unsigned:
            keys = await asyncio.to_thread(self.keystore.keys_for, want.name)
            has_prefix = await asyncio.to_thread(self.keystore.has_prefix_keys, want.name)
            # rkt's maybeFetchPubKeys: AcceptForce with --trust-keys-from-https, else
            # AcceptAsk, which needs a person at a terminal
            ask = not self.config.trust_keys_from_https and _can_review()
            if not has_prefix and (self.config.trust_keys_from_https or ask):
                await self._fetch_pubkeys(want.name, review=ask)
                keys = await asyncio.to_thread(self.keystore.keys_for, want.name)
        found = await discover_endpoints(app, self.config, self.engine.session())
        failures: list[str] = []
        for ep in found.endpoints:
            try:
                return await self._endpoint(want, ep.aci, ep.asc, keys)
            except SourceError as exc:
                failures.append(str(exc))
                log.info("%s: %s; trying the next endpoint", want.shown, exc)
        if not failures:
            raise TransferFailed(f"{want.shown}: discovery found no endpoint")
        raise TransferFailed(f"{want.shown}: no endpoint delivered it ({'; '.join(failures[:4])})")

    # --- keys -----------------------------------------------------------------------------

    async def _fetch_pubkeys(self, name: str, review: bool = False) -> None:
        """rkt's maybeFetchPubKeys with --trust-keys-from-https: failures are reported and
        the pull goes on (it then fails at the signature, with the hint). Keys that came
        over a channel nobody authenticated — unverified TLS (``--insecure-options tls``)
        or a discovery page answered over plain http — are trusted only with
        ``--insecure-options pubkey`` as well; otherwise the pull is refused (TrustError)."""
        from fetchd.appc.discovery import discover_pubkeys

        if "tls" in self.config.insecure and "pubkey" not in self.config.insecure:
            raise TrustError(
                f"not discovering keys for {name}: --insecure-options tls leaves https "
                "unverified, so the keys could come from anyone; trust the key with fetchd "
                f"trust --prefix {name} KEYFILE (or add pubkey to --insecure-options to "
                "trust keys fetched so)"
            )
        try:
            urls, attempts = await discover_pubkeys(name, self.config, self.engine.session())
        except FetchdError as exc:
            _say(f"warning: no keys discovered for {name}: {exc}")
            return
        answered = next((a.url for a in reversed(attempts) if a.error is None), "")
        if answered.startswith("http://") and "pubkey" not in self.config.insecure:
            raise TrustError(
                f"not trusting keys for {name}: their discovery page came over plain http "
                f"({answered}), so anyone could have named them; trust the key with fetchd "
                f"trust --prefix {name} KEYFILE (or add pubkey to --insecure-options to trust "
                "keys found so)"
            )
        for url in urls:
            if not url.startswith("https://") and "pubkey" not in self.config.insecure:
                _say(
                    f"warning: {redact(url)} is not https; not trusting keys from it "
                    "(--insecure-options pubkey allows it)"
                )
                continue
            try:
                data = await self._small_get(url, MAX_PUBKEY, f"the key at {redact(url)}", key=True)
                if data is None:
                    raise TransferFailed(f"{redact(url)}: the server deferred it (202)")
                if review and not await _reviewed(data, name, redact(url)):
                    _say(f"warning: not trusting the key at {redact(url)} for {name}")
                    continue
                # the key policy judges every certificate of the file (Keystore.add)
                paths = await asyncio.to_thread(self.keystore.add, data, name)
            except FetchdError as exc:
                _say(f"warning: error adding keys for {name}: {exc}")
                continue
            if not review:
                _say(f"Trusting {redact(url)!r} for prefix {name!r} without fingerprint review.")
            for p in paths:
                _say(f"Added key for prefix {name!r} at {str(p)!r}")

    async def _untrusted(self, sig: SigInfo, name: str | None, shown: str) -> NotTrusted:
        from fetchd.trust.openpgp import issuer_of, issuer_text

        who = ""
        try:
            pool = await asyncio.to_thread(self.keystore.entries)
            known = issuer_of(sig, [k.info for k in pool])
        except FetchdError:
            known = None
        if known is not None and known.user_ids:
            who = f" ({known.user_ids[0]})"
        prefix = name or "NAME"
        where = f"for {name}" if name else "for any name"
        return NotTrusted(
            f"{shown} is signed by {issuer_text(sig)}{who} which is not trusted {where}; "
            f"run fetchd trust --prefix {prefix} KEYFILE (or pass --trust-keys-from-https)"
        )

    async def _early(self, sig: bytes, keys: list[TrustedKey] | None, want: _Want) -> None:
        """The signature's issuer against the keys, before the ACI is requested: an
        unknown issuer or a key refused by policy (revoked, expired, weak) ends here."""
        from fetchd.trust.openpgp import issuer_of, policy_problem, signature_info

        info = signature_info(sig, f"the signature of {want.shown}")
        pool = keys if keys is not None else await asyncio.to_thread(self.keystore.entries)
        key = issuer_of(info, [k.info for k in pool])
        if key is None:
            raise await self._untrusted(info, want.name, want.shown)
        problem = policy_problem(key, time.time(), signer=info.issuer_fingerprint)
        if problem:
            raise KeyRefused(
                f"{want.shown}: the signing key {key.describe()} is refused: {problem}"
            )

    # --- HTTP for the small things -------------------------------------------------------

    def _check_scheme(self, url: str, *, key: bool = False) -> None:
        if url.startswith("http://") and "http" not in self.config.insecure:
            raise InsecureRefused(
                f"{redact(url)} is plain HTTP; pass --insecure-options http to allow it"
            )
        if url.startswith("http://") and key and "pubkey" not in self.config.insecure:
            raise InsecureRefused(
                f"{redact(url)} is plain HTTP; keys are trusted from it only with "
                "--insecure-options pubkey"
            )
        if not is_url(url):
            raise ImageInvalid(f"{url[:80]!r} is not an http(s) URL")

    async def _small_get(
        self, url: str, limit: int, what: str, *, key: bool = False
    ) -> bytes | None:
        """GET a small document (a signature, a key): its bytes, or None on 202 (with
        ``self.retry_after`` set from its Retry-After). Bounded in size and time. Redirects
        are followed here (at most MAX_REDIRECTS), each hop checked: an http:// hop
        anywhere in the chain needs ``--insecure-options http`` (and ``pubkey`` for a key)."""
        from fetchd.appc.discovery import MAX_REDIRECTS

        self._check_scheme(url, key=key)
        budget = min(self.config.request_budget, SMALL_REQUEST_BUDGET)
        deadline = asyncio.timeout(budget)
        first = url
        try:
            async with deadline:
                for _ in range(MAX_REDIRECTS + 1):
                    async with self.engine.session().get(url, allow_redirects=False) as resp:
                        if resp.status in _REDIRECTS:
                            location = resp.headers.get("Location")
                            if not location:
                                raise TransferFailed(
                                    f"{what}: HTTP {resp.status} without a Location from "
                                    f"{redact(url)}"
                                )
                            target = urljoin(url, location)
                            try:
                                self._check_scheme(target, key=key)
                            except InsecureRefused:
                                need = "pubkey" if "http" in self.config.insecure else "http"
                                raise InsecureRefused(
                                    f"{what}: {redact(url)} redirected to plain HTTP "
                                    f"({redact(target)}); pass --insecure-options {need} to "
                                    "allow it"
                                ) from None
                            url = target
                            continue
                        return await self._small_body(resp, limit, what, url)
                raise TransferFailed(
                    f"{what}: more than {MAX_REDIRECTS} redirects from {redact(first)}"
                )
        except TimeoutError:
            if not deadline.expired():  # aiohttp's read timeout: nothing came for a while
                raise TransferTimeout(
                    f"{what}: {redact(url)} sent nothing for {self.config.stall_timeout:g} s "
                    "(--stall-timeout)"
                ) from None
            raise SignatureInvalid(
                f"{what}: not complete within {budget:g} s (the server sends it too slowly "
                "or never ends it); refused"
            ) from None
        except FetchdError:
            raise
        except retryable() as exc:
            raise translate(exc, what, self.config) from exc

    async def _small_body(
        self, resp: aiohttp.ClientResponse, limit: int, what: str, url: str
    ) -> bytes | None:
        if resp.status == 202:
            self.retry_after = retry_after(resp.headers, 1.0)
            return None
        if resp.status in (404, 410):
            raise BlobNotFound(f"{what}: {resp.status} from {redact(url)}")
        if resp.status != 200:
            raise TransferFailed(f"{what}: HTTP {resp.status} from {redact(url)}")
        data = bytearray()
        async for chunk in resp.content.iter_chunked(16 << 10):
            data += chunk
            if len(data) > limit:
                raise SignatureInvalid(f"{what} is larger than {limit >> 10} KiB; refused")
        return bytes(data)

    async def _signature(self, url: str, want: _Want) -> bytes | None:
        return await self._small_get(url, MAX_SIGNATURE, f"the signature of {want.shown}")

    async def _deferred(self, url: str, want: _Want) -> bytes:
        """The signature the server deferred (202), asked again after the ACI came."""
        started = time.monotonic()
        asked = 1
        for _ in range(DEFER_TRIES):
            left = DEFER_BUDGET - (time.monotonic() - started)
            cap = min(self.config.max_retry_after, left)
            if self.retry_after > cap:
                # waiting less than asked would only be answered 202 again: say so now
                raise SignatureInvalid(
                    f"the signature of {want.shown} never came: {redact(url)} answered 202 "
                    f"(deferred) with Retry-After {self.retry_after:g} s, more than the "
                    f"{max(cap, 0):.0f} s fetchd waits for a deferred signature"
                )
            await asyncio.sleep(self.retry_after)
            sig = await self._signature(url, want)
            asked += 1
            if sig is not None:
                return sig
        raise SignatureInvalid(
            f"the signature of {want.shown} never came: {redact(url)} answered 202 "
            f"(deferred) {asked} times over {time.monotonic() - started:.0f} s"
        )

    # --- one endpoint: signature, ACI, checks ----------------------------------------------

    async def _endpoint(
        self, want: _Want, aci_url: str, asc_url: str, keys: list[TrustedKey] | None
    ) -> _Aci:
        self._check_scheme(aci_url)
        self._check_scheme(asc_url)
        now = time.time()
        rec, listed = await asyncio.to_thread(self.engine._url_record, aci_url)
        if rec is not None and not self.store.has(Digest.parse(rec.digest)):
            rec = None
        sig: bytes | None = None
        deferred = False
        fresh = rec is not None and rec.fresh(now) and self.config.pull_policy != "update"
        stored = None
        if fresh and rec is not None:
            stored = await asyncio.to_thread(layout.appc_signature_for, self.store, aci_url)
            if stored is None or str(stored[0]) != rec.digest:
                stored, fresh = None, False
        if not self.unsigned and stored is not None:
            # rkt's remote cache within max-age: the signature kept with the image, judged
            # by the keys trusted now; one they no longer accept is asked for again
            sig = await asyncio.to_thread(self.store.read_blob, stored[1], MAX_SIGNATURE)
            try:
                await self._early(sig, keys, want)
            except (NotTrusted, KeyRefused) as exc:
                log.info("%s: the stored signature is refused now (%s); asking again", aci_url, exc)
                sig, stored, fresh = None, None, False
        if not self.unsigned and stored is None:
            sig = await self._signature(asc_url, want)
            deferred = sig is None
            if sig is not None:
                await self._early(sig, keys, want)

        async def check(path: Path) -> _Checked:
            nonlocal sig
            if not self.unsigned and sig is None:
                sig = await self._deferred(asc_url, want)
                await self._early(sig, keys, want)
            return await self._check(path, want, sig, keys)

        if rec is not None and (
            fresh or (bool(rec.etag or rec.last_modified) and await self._not_modified(rec, listed))
        ):
            digest = Digest.parse(rec.digest)
            checked = await check(self.store.blob_path(digest))
            size = rec.size
        else:
            digest, size, meta, checked = await self._download(aci_url, check)
            self.records.append(UrlRecord.fetched(aci_url, str(digest), size, meta, now))
        if deferred and sig is not None:
            log.info("%s: the deferred signature came after the image", want.shown)
        return self._aci(digest, size, checked, sig, aci_url)

    async def _not_modified(self, rec: UrlRecord, listed: bool) -> bool:
        return await self.engine._still_valid(rec.url, rec, listed)

    def _aci(
        self, digest: Digest, size: int, checked: _Checked, sig: bytes | None, source: str
    ) -> _Aci:
        ins = checked.inspected
        m = ins.manifest
        mdigest = Digest.of(m.raw)
        self.small[mdigest] = m.raw
        ann = {
            layout.APPC_NAME_ANNOTATION: m.name,
            layout.APPC_LABELS_ANNOTATION: json.dumps(m.labels, sort_keys=True),
            layout.APPC_IMAGE_ID_ANNOTATION: ins.image_id,
            layout.APPC_MANIFEST_ANNOTATION: str(mdigest),
            layout.APPC_SOURCE_ANNOTATION: source,
        }
        if sig is not None:
            sdigest = Digest.of(sig)
            self.small[sdigest] = sig
            ann[layout.APPC_SIGNATURE_ANNOTATION] = str(sdigest)
        if checked.signer:
            ann[layout.APPC_SIGNER_ANNOTATION] = checked.signer
        return _Aci(Descriptor(ins.media_type, digest, size, (), ann), ins)

    async def _check(
        self, path: Path, want: _Want, sig: bytes | None, keys: list[TrustedKey] | None
    ) -> _Checked:
        """Everything an ACI must pass before it is committed (on the bytes as fetched)."""
        from fetchd.appc.aci import inspect_aci
        from fetchd.appc.manifest import check_request
        from fetchd.trust.openpgp import display_fingerprint

        what = want.shown
        verified = None
        if sig is not None:
            # the signature first, on the bytes as fetched: nothing unauthenticated is
            # decompressed. A name asked for: its keys; a URL or a file (the name is in the
            # manifest, not read yet): every trusted key, the name's checked below
            pool = keys if keys is not None else await asyncio.to_thread(self.keystore.entries)
            verified = await self._verify(sig, path, pool, what, name=want.name)
        ins = await asyncio.to_thread(inspect_aci, path, what, max_uncompressed=want.size)
        m = ins.manifest
        if want.name is not None:
            check_request(m, want.name, want.labels, what)
        if want.image_id is not None and not ins.image_id.startswith(want.image_id):
            raise ImageInvalid(
                f"{what}: its image ID is {ins.image_id[: 7 + 32]}…, not the "
                f"{want.image_id[: 7 + 32]}… its parent's manifest requires"
            )
        if not self.unsigned:
            assert verified is not None
            named = await asyncio.to_thread(self.keystore.keys_for, m.name)
            if not any(k.info.fingerprint == verified.primary for k in named):
                who = f" ({verified.user_ids[0]})" if verified.user_ids else ""
                raise NotTrusted(
                    f"{what} is signed by {display_fingerprint(verified.primary)}{who} which "
                    f"is not trusted for {m.name}, the name in its manifest; run fetchd trust "
                    f"--prefix {m.name} KEYFILE"
                )
            _say("signature verified:")
            for uid in verified.user_ids:
                _say(f"  {uid}")
        return _Checked(ins, verified.primary if verified is not None else None)

    async def _verify(
        self,
        sig: bytes,
        path: Path,
        keys: list[TrustedKey],
        what: str,
        name: str | None = None,
    ) -> Verified:
        from fetchd.trust.openpgp import issuer_of, signature_info, verify_detached

        infos: list[KeyInfo] = [k.info for k in keys]
        sinfo = signature_info(sig, f"the signature of {what}")
        if issuer_of(sinfo, infos) is None:
            raise await self._untrusted(sinfo, name, what)
        return await verify_detached(sig, path, infos, what)

    # --- the ACI's bytes ------------------------------------------------------------------

    async def _download(
        self, url: str, check: Callable[[Path], Awaitable[_Checked]]
    ) -> tuple[Digest, int, dict[str, Any], _Checked]:
        """``url`` into a segmented ingest of its own (resumable), committed only once
        ``check`` passed on the complete bytes (Engine.fill_url, as Engine._download_url)."""
        engine = self.engine
        key = "aci-" + hashlib.sha256(url.encode()).hexdigest()[:40]
        result: list[_Checked] = []

        async def before_commit(ingest: Ingest) -> None:
            result.clear()
            result.append(await check(ingest.data_path))

        torrent = await self._torrent_for(url) if self.config.torrent else None
        size = None
        if torrent is not None:  # the swarm's file has the torrent's length: its own ingest
            key = f"aci-torrent-{torrent.hex}"
            size = torrent.size
        async with self.store.ingest(None, size, key=key, segmented=True) as ingest:
            origin = UrlFetcher(url, self.config)
            if torrent is not None:
                from fetchd.engine.foreign import TorrentFetcher

                swarm = TorrentFetcher(torrent, engine.swarms, self.config)
                # tiers: the swarm first, the URL when the swarm fails; the signature and
                # the checks in before_commit judge the bytes whoever sent them
                sources = Sources([swarm, origin], origin)
            else:
                sources = Sources([origin], origin, peers=True)
            await engine.fill_url(url, ingest, sources, before_commit)
            return ingest.digest, ingest.size or 0, dict(ingest.meta), result[0]

    async def _torrent_for(self, url: str) -> ForeignTorrent | None:
        """``--torrent`` (quayctl's ``rkt torrent pull``): ``url`` asked with ``Accept:
        application/x-bittorrent``; an answer of that type is a torrent of the ACI's bytes
        (single file, parsed strictly, at most MAX_TORRENT_BYTES, within the request
        budget). Anything else — another type, an error, a torrent refused — is logged and
        None: the torrent only moves bytes, so the pull goes on over HTTP."""
        from fetchd.bt.metainfo import MAX_TORRENT_BYTES, parse_foreign
        from fetchd.engine.foreign import ForeignTorrent
        from fetchd.sources.swarm import read_body

        what = f"the torrent of {redact(url)}"
        try:
            async with (
                asyncio.timeout(min(self.config.request_budget, SMALL_REQUEST_BUDGET)),
                self.engine.session().get(
                    url, headers={"Accept": TORRENT_TYPE}, max_redirects=5
                ) as resp,
            ):
                hops = [*(h.url for h in resp.history), resp.url]
                if "http" not in self.config.insecure and any(u.scheme == "http" for u in hops):
                    raise InsecureRefused(f"{what}: redirected through plain HTTP")
                if resp.status != 200 or resp.content_type != TORRENT_TYPE:
                    log.info(
                        "%s: HTTP %d, %s, not a torrent; fetching over HTTP",
                        what,
                        resp.status,
                        resp.content_type,
                    )
                    resp.close()  # not the torrent: do not read a body that may be the ACI
                    return None
                raw = await read_body(resp, MAX_TORRENT_BYTES)
            torrent = ForeignTorrent(parse_foreign(raw))
        except TimeoutError:
            _say(f"warning: {what}: no answer in time; fetching over HTTP")
            return None
        except retryable(FetchdError) as exc:
            _say(f"warning: {what}: {exc}; fetching over HTTP")
            return None
        log.info("%s: torrent %s, %d bytes", what, torrent.hex, torrent.size)
        return torrent

    async def _direct(self, url: str) -> _Aci:
        """``https://…/x.aci``: the signature beside it, keys of the manifest's name."""
        want = _Want(None, {}, shown=redact(url))
        base = url.split("?", 1)[0].split("#", 1)[0]
        asc = base[: -len(".aci")] + ".aci.asc"
        keys = None  # the manifest's name decides; the early check uses every trusted key
        return await self._endpoint(want, url, asc, keys)

    async def _local(self, path: Path) -> _Aci:
        """A local file: copied into an ingest, checked there, committed."""
        want = _Want(None, {}, shown=str(path))
        sig: bytes | None = None
        if not self.unsigned:
            sig_path = self.config.signature or path.with_name(path.name + ".asc")
            try:
                sig = await asyncio.to_thread(_read_regular, sig_path, MAX_SIGNATURE + 1)
            except OSError as exc:
                raise UsageError(
                    f"cannot read the signature {sig_path}: {exc.strerror}; pass "
                    "--signature FILE.aci.asc (or --insecure-options image to skip it)"
                ) from exc
            if len(sig) > MAX_SIGNATURE:
                raise SignatureInvalid(f"{sig_path} is larger than 64 KiB; refused")
            await self._early(sig, None, want)
        try:
            src, key, uri = await asyncio.to_thread(_open_local, path)
        except OSError as exc:
            raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
        with src:
            async with self.store.ingest(None, None, key=key) as ingest:
                if ingest.offset:
                    await ingest.restart()
                while True:
                    chunk = await asyncio.to_thread(src.read, 1 << 20)
                    if not chunk:
                        break
                    await ingest.write([chunk])
                await ingest.flush()
                try:
                    checked = await self._check(ingest.data_path, want, sig, None)
                except BaseException:
                    await ingest.discard()
                    raise
                await ingest.commit()
                digest, size = ingest.digest, ingest.offset
        return self._aci(digest, size, checked, sig, uri)

    # --- naming it ------------------------------------------------------------------------

    async def _publish(self, top: _Aci) -> PullResult:
        from fetchd.appc.manifest import appc_platform, oci_config

        order = _render_order(top)
        m = top.inspected.manifest
        config_raw = oci_config(m, [a.inspected.diff_id for a in order])
        config = Descriptor(OCI_CONFIG, Digest.of(config_raw), len(config_raw))
        ann = dict(top.layer.annotations)
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config.to_json(),
            "layers": [a.layer.to_json() for a in order],
            "annotations": ann,
        }
        raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        digest = Digest.of(raw)
        desc = Descriptor(OCI_MANIFEST, digest, len(raw), (), ann, appc_platform(m))
        ref_name = f"{m.name}:{m.labels.get('version') or 'latest'}"
        small = {**self.small, config.digest: config_raw, digest: raw}
        required = [*small, *(a.layer.digest for a in order)]

        def write() -> None:
            for d, data in small.items():
                self.store.put(data, d)
            layout.set_appc_entry(self.store, ref_name, desc, required)
            for rec in self.records:
                record_url(self.store, rec, "application/octet-stream")

        await asyncio.to_thread(write)
        await asyncio.to_thread(self.engine.meta.touch_image, ref_name, str(digest), pulled=True)
        return PullResult(ref_name, digest, desc, True, (desc,))


def _open_regular(path: Path) -> BinaryIO:
    """``path`` open for reading if it is a regular file (UsageError if not). Opened
    non-blocking, so a FIFO (which would wait for a writer) or a device is refused at once."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UsageError(f"{path} is not a regular file; give a file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_regular(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file ``path`` (UsageError if not one)."""
    with _open_regular(path) as f:
        return f.read(limit)


def _open_local(path: Path) -> tuple[BinaryIO, str, str]:
    """The file, its ingest key (a resume only of the same file, unchanged) and its URI."""
    src = _open_regular(path)
    st = os.fstat(src.fileno())
    real = path.resolve()
    ident = f"{real}\0{st.st_dev}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}"
    return src, "file-" + hashlib.sha256(ident.encode()).hexdigest()[:40], real.as_uri()


def _render_order(top: _Aci) -> list[_Aci]:
    """The OCI layers, bottom first: pkg/acirenderer's depth-first flattening (the image,
    then its dependencies from the last to the first, each followed by its own; the first
    seen wins) reversed, each ACI once."""
    flat: list[_Aci] = []
    seen: set[Digest] = set()

    def walk(a: _Aci) -> None:
        if a.layer.digest not in seen:
            seen.add(a.layer.digest)
            flat.append(a)
        for d in reversed(a.deps):
            walk(d)

    walk(top)
    return list(reversed(flat))
