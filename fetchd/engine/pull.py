"""pull(): a name → its manifest → every blob, concurrently, into the verified store.

Order matters for "nothing unverified is ever visible" and "nothing is lost": blobs
first (each committed only after verification), then the manifest (and index) blobs,
then the index.json entry. A crash at any point leaves the store consistent: at worst
some committed blobs no name uses yet (gc frees them) and partial ingests (resumed).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from fetchd.config import Config
from fetchd.engine.fetching import SingleFlight, Sources, UrlFetcher, fill_and_commit
from fetchd.errors import (
    FetchdError,
    ImageNotInStore,
    InsecureRefused,
    ManifestInvalid,
    PlatformNotFound,
    ReferenceInvalid,
    TransferFailed,
    TransferTimeout,
    UsageError,
    unwrap,
)
from fetchd.manifest import ImageIndex, ImageManifest, docker_to_oci, parse_manifest
from fetchd.model import (
    DOCKER_MANIFEST,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Digest,
    Platform,
    Reference,
    platform_text,
)
from fetchd.progress import Progress, blob_kind
from fetchd.sources.base import Fetcher, RangeFetcher, Resolver
from fetchd.sources.http import cache_max_age, new_session, redact, translate
from fetchd.sources.retry import retryable
from fetchd.sources.swarm import SwarmFetcher, Swarms
from fetchd.store import layout
from fetchd.store.cas import Feeder, Ingest, SegmentedIngest, Store
from fetchd.store.leases import Lease
from fetchd.store.leases import current as current_lease
from fetchd.store.maintenance import abandon, record_url
from fetchd.store.meta import Meta, UrlRecord
from fetchd.store.space import ensure_room

if TYPE_CHECKING:
    import aiohttp

    from fetchd.bt.session import Swarm
    from fetchd.sources.registry import Registry

log = logging.getLogger(__name__)

#: The most layers one image manifest may list. Docker stops at 127 (overlayfs depth);
#: OCI names no bound, but a manifest under the 4 MiB limit could list ~30,000.
MAX_LAYERS = 10_000


@dataclass(frozen=True, slots=True)
class _Resolved:
    """What an authority said an image is: its manifests, verified by digest."""

    top: Digest
    #: what the authority served, committed as blobs once the layers are in
    keep: dict[Digest, bytes]
    #: the descriptors the store records, one per image manifest pulled
    pulled: list[Descriptor]
    images: list[ImageManifest]
    index_digest: Digest | None


@dataclass(frozen=True, slots=True)
class PullResult:
    name: str
    #: what the registry reported for the name (the index digest of a multi-arch image)
    digest: Digest
    manifest: Descriptor
    #: False when policy ``new`` found the image complete in the store (no network)
    fetched: bool
    #: the image manifests pulled (or found), each with its ``platform``; the first is
    #: ``manifest``. More than one with ``--all-platforms``.
    manifests: tuple[Descriptor, ...] = ()

    @property
    def platforms(self) -> list[str]:
        """``OS/ARCH[/VARIANT]`` of each of ``manifests`` ("unknown" if it names none)."""
        return [platform_text(d.platform) or "unknown" for d in self.manifests or (self.manifest,)]


def distinct_blobs(manifest: ImageManifest, name: str) -> tuple[Descriptor, ...]:
    """The manifest's config and layers, each digest once (an image may repeat a layer),
    in order; at most MAX_LAYERS layers, and one size per digest."""
    if len(manifest.layers) > MAX_LAYERS:
        raise ManifestInvalid(
            f"{name}: the manifest lists {len(manifest.layers)} layers, more than the "
            f"{MAX_LAYERS} fetchd accepts"
        )
    seen: dict[Digest, Descriptor] = {}
    for desc in manifest.blobs():
        first = seen.setdefault(desc.digest, desc)
        if first.size != desc.size:
            raise ManifestInvalid(
                f"{name}: the manifest gives blob {desc.digest.short} two sizes "
                f"({first.size} and {desc.size})"
            )
    return tuple(seen.values())


def is_url(text: str) -> bool:
    return text.startswith(("https://", "http://"))


def _is_appc(text: str) -> bool:
    """An appc reference: a bare name (rkt's; registry images are docker://), a direct
    ``https://…/IMAGE.aci`` URL, or a local ``.aci`` file."""
    if text.startswith("docker://") or text.startswith("magnet:"):
        return False
    if is_url(text):
        return text.split("?", 1)[0].split("#", 1)[0].endswith(".aci")
    return "://" not in text and not text.endswith(".torrent")


def parse_registry_ref(text: str) -> Reference:
    """The registry reference in ``text``; other kinds are refused with a clear message."""
    if text.startswith("docker://"):
        return Reference.parse(text)
    if "://" in text or text.startswith("magnet:") or text.endswith((".torrent", ".aci")):
        raise ReferenceInvalid(
            f"{text[:80]!r}: this fetchd pulls docker:// references, https:// URLs and, "
            "with --torrent, .torrent files; appc images are not implemented yet"
        )
    raise ReferenceInvalid(
        f"{text[:80]!r}: write registry images as docker://HOST/NAME:TAG "
        "(a bare HOST/NAME is an appc name, which this fetchd cannot discover yet)"
    )


class Flight:
    """A blob on its way into the store, which others may read as it arrives.

    ``ingest.contiguous`` bytes from the start are in ``path`` (whose inode becomes the
    blob at commit, so an fd opened on it stays valid). :meth:`wait` returns when more
    bytes arrived, when they verified (``ingest.verified``: size and digest checked, the
    store's fsync and rename may still be going on) or the flight ended; ``done`` holds
    the outcome (None: verified and committed; an exception: failed, and what was read
    must not be trusted).
    """

    def __init__(self, digest: Digest, size: int, ingest: Ingest) -> None:
        loop = asyncio.get_running_loop()
        self.digest = digest
        self.size = size
        self.ingest = ingest
        self.path = ingest.data_path
        self.generation = ingest.generation
        self.done: asyncio.Future[BaseException | None] = loop.create_future()
        self._tick: asyncio.Future[None] = loop.create_future()
        # commit's thread says when the bytes verified (before its fsync): wake readers
        ingest.on_verified = self._verified

    @property
    def contiguous(self) -> int:
        return self.ingest.contiguous

    @property
    def reset(self) -> bool:
        """The data was thrown away and refetched since this flight began."""
        return self.ingest.generation != self.generation

    def _verified(self) -> None:
        """From commit's thread: wake the readers on the loop."""
        self.done.get_loop().call_soon_threadsafe(self.advanced)

    def advanced(self) -> None:
        tick, self._tick = self._tick, asyncio.get_running_loop().create_future()
        tick.set_result(None)

    def finish(self, exc: BaseException | None) -> None:
        if not self.done.done():
            self.done.set_result(exc)
        self.advanced()

    async def wait(self) -> None:
        """Until more bytes arrive or the flight ends (bound it with asyncio.timeout)."""
        await asyncio.shield(self._tick)


class Engine:
    """Pulls images into one store. Use as ``async with Engine(...) as e``.

    Many pulls may run at once on one engine; they share a connection pool, a bound
    on parallel blob transfers, and single flight (one transfer per digest).
    """

    def __init__(
        self,
        store: Store,
        config: Config,
        progress: Progress | None = None,
        swarm: Swarm | None = None,
    ) -> None:
        self.store = store
        self.config = config
        self.progress = progress or Progress()
        self.meta = Meta(store.db_path)
        self._session: aiohttp.ClientSession | None = None
        self._registries: dict[str, Registry] = {}
        self._blob_slots = asyncio.Semaphore(config.max_parallel_blobs)
        #: one transfer per digest (or URL) however it is asked for
        self.single = SingleFlight()
        #: blobs being transferred right now, for readers that stream them as they come
        self.flights: dict[Digest, Flight] = {}
        #: the process's one BitTorrent session (``swarm``: the server's; else started
        #: on first use by a swarm fetcher, and closed with the engine)
        self.swarms = Swarms(config, swarm)

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            swarm = self.swarms.started
            if exc[0] is None and swarm is not None and swarm.seeding() and self.config.seed_linger:
                log.info("seeding for %.0f s more (--seed-linger)", self.config.seed_linger)
                await asyncio.sleep(self.config.seed_linger)
        finally:
            try:
                await self.swarms.close()
            finally:  # also when a SIGTERM cancels the close itself
                if self._session is not None:
                    await self._session.close()
                    self._session = None

    def _registry(self, host: str) -> Registry:
        reg = self._registries.get(host)
        if reg is None:
            reg = self._registries[host] = _registry_class()(self.session(), self.config, host)
        return reg

    # --- the store side ------------------------------------------------------------

    def complete(self, entry: layout.Entry) -> bool:
        """Every blob of the entry is in the store."""
        try:
            return all(self.store.has(d.digest) for d in layout.image_blobs(self.store, entry))
        except FetchdError:
            return False

    # --- pull ----------------------------------------------------------------------

    async def pull(
        self,
        text: str,
        digest: Digest | None = None,
        mirrors: tuple[str, ...] = (),
        mirror_only: bool = False,
    ) -> PullResult:
        """Pull one reference: a registry image, or (``https://``) one blob by URL.

        ``digest`` pins a URL's content. ``mirrors``: for a URL, more URLs serving the
        same bytes (used together); for an image, registry mirrors (a fetchd cache) asked
        first, in order, before the origin — unless ``mirror_only``.
        """
        async with asyncio.timeout(self.config.deadline):
            from fetchd.engine import foreign  # it imports this module

            if foreign.wanted(text, self.config):
                return await foreign.pull_torrent(self, text, digest, mirrors)
            if _is_appc(text):
                if digest is not None or mirrors:
                    raise UsageError("--digest and --mirror do not apply to appc images")
                from fetchd.engine import appc  # it imports this module

                return await appc.pull_appc(self, text)
            if is_url(text):
                return await self.pull_url(text, digest, mirrors)
            if digest is not None:
                raise UsageError("--digest applies to https:// URLs only")
            return await self._pull_image(text, mirrors, mirror_only)

    async def _pull_image(
        self, text: str, mirrors: tuple[str, ...] = (), mirror_only: bool = False
    ) -> PullResult:
        ref = parse_registry_ref(text)
        name = str(ref)
        policy = self.config.pull_policy
        if policy in ("new", "never"):
            entry = await asyncio.to_thread(layout.find, self.store, name)
            if entry is not None and layout.is_appc(entry):
                entry = None  # an appc image of that name answers no docker:// pull
            have = None if entry is None else await asyncio.to_thread(self._stored, entry)
            if entry is not None and have:
                await asyncio.to_thread(self._touch_image, name, str(entry.top_digest))
                return PullResult(name, entry.top_digest, have[0], False, have)
            if policy == "never":
                what = "every platform of " if self.config.all_platforms else ""
                where = f" for {self.config.platform}" if entry and not what else ""
                raise ImageNotInStore(
                    f"{what}{name} is not in the store{where} and --pull-policy never "
                    "forbids fetching it"
                )
        return await self._pull_through(ref, name, mirrors, mirror_only)

    async def _pull_through(
        self, ref: Reference, name: str, mirrors: tuple[str, ...], mirror_only: bool
    ) -> PullResult:
        """Resolve ``ref`` at an authority, then fetch each blob from the mirrors first and
        the origin last (see fetching.py).

        Who resolves (``Config.pull_from_mirror``, after registries.conf): ``digest-only``
        (the default) asks the origin what a tag means, and a mirror only for bytes the
        store verifies against digests the origin gave; a by-digest reference may be
        resolved by a mirror too, as the digest checks its answer. ``all`` (implied by
        ``--mirror-only``) lets the mirrors resolve tags too, in order, then the origin."""
        for given in mirrors:
            if not is_url(given):
                raise UsageError(f"--mirror {given!r} is not an http(s):// URL")
        origin = self._registry(ref.host)
        reg = _registry_class()
        # A mirror retries only when nothing follows it (the last one, with --mirror-only).
        caches = [
            (
                m,
                reg(
                    self.session(),
                    self.config,
                    ref.host,
                    base=m,
                    ns=ref.host,
                    patient=mirror_only and i == len(mirrors) - 1,
                ),
            )
            for i, m in enumerate(mirrors)
        ]
        tags_too = mirror_only or self.config.pull_from_mirror == "all" or ref.digest is not None
        authorities: list[tuple[str | None, Registry]] = list(caches) if tags_too else []
        if not mirror_only:
            authorities.append((None, origin))
        failures: list[str] = []
        bad: set[str] = set()
        resolved: _Resolved | None = None
        for at, (url, authority) in enumerate(authorities):
            try:
                resolved = await self._resolve(ref, name, authority)
                break
            except UsageError:
                raise
            except Exception as exc:
                if url is None:
                    if mirrors and isinstance(exc, TransferFailed | TransferTimeout):
                        raise type(exc)(
                            f"{exc} (the origin resolves tags; --pull-from-mirror all lets "
                            "the mirrors do it)"
                        ) from exc
                    raise
                # A mirror is a cache: whatever it gets wrong (a captive portal's HTML, an
                # oversized, endless or deeply nested manifest, a bad digest, a bug it
                # trips in us), the next mirror or the origin may still answer. Only
                # cancellation and the deadline (BaseException) go straight on up. It is
                # not asked for blobs either.
                why = str(exc) if isinstance(exc, FetchdError) else type(exc).__name__
                after = authorities[at + 1][0] if at + 1 < len(authorities) else ""
                then = {None: "; trying the origin", "": ""}.get(after, "; trying the next mirror")
                log.warning("mirror %s failed for %s: %s%s", redact(url), name, why, then)
                log.debug("mirror %s failed", redact(url), exc_info=True)
                failures.append(f"{redact(url)}: {why}")
                bad.add(url)
        if resolved is None:
            raise TransferFailed(
                f"{name}: every mirror failed and --mirror-only forbids the origin "
                f"({'; '.join(failures)})"
            )
        from fetchd.trust import oci  # trusted publishers: before any blob is asked for

        await oci.check_publisher(self, ref, resolved.top, authorities[at][1])
        fetchers: list[Fetcher] = [
            c.blobs(ref.name, mirror=True) for u, c in caches if u not in bad
        ]
        good = [u for u, _ in caches if u not in bad]
        if self.config.torrent and good:
            # The swarm of the first cache that answered; its HTTP and the origin follow.
            fetchers.insert(
                0,
                SwarmFetcher(
                    good[0],
                    ref.name,
                    self.session(),
                    self.config,
                    self.swarms,
                    self.meta,
                    http=fetchers[0] if isinstance(fetchers[0], RangeFetcher) else None,
                ),
            )
        elif self.config.torrent:
            log.info("%s: --torrent needs a --mirror (a fetchd serve) to get torrents from", name)
        trusted = None
        if not mirror_only:
            trusted = origin.blobs(ref.name)
            fetchers.append(trusted)
        return await self._pull_resolved(ref, name, resolved, Sources(fetchers, trusted))

    def _touch_image(self, name: str, digest: str) -> None:
        """Note a use of an image already there. Best effort, as for a URL: a store this
        user may only read still serves what it holds."""
        try:
            self.meta.touch_image(name, digest, pulled=False)
        except (FetchdError, OSError) as exc:
            log.debug("%s: not recorded as used: %s", name, exc)

    def _stored(self, entry: layout.Entry) -> tuple[Descriptor, ...] | None:
        """The stored manifests that answer this pull without the network (policy
        ``new``), or None: the platform asked for (``--all-platforms``: each of the
        registry's index, which the store keeps) is not stored, or a blob is missing."""
        if not self.complete(entry):
            return None
        try:
            stored = layout.manifests(self.store, entry)
        except FetchdError:
            return None
        index_text = entry.manifest.annotations.get(layout.INDEX_DIGEST_ANNOTATION)
        if not index_text:
            # A single-platform image: present if its config names no platform, or one
            # that suits; else the registry decides (the tag may have become an index).
            plat = stored[0].platform
            ok = self.config.all_platforms or not plat or self.config.platform.matches(plat)
            return stored if ok else None
        if self.config.all_platforms:
            try:
                raw = self.store.read_blob(Digest.parse(index_text), MAX_MANIFEST_SIZE)
                index = parse_manifest(raw, None, entry.name)
            except (OSError, FetchdError):
                return None
            if not isinstance(index, ImageIndex):
                return None
            have = {d.digest for d in stored} | {
                Digest.parse(d.annotations[layout.SOURCE_DIGEST_ANNOTATION])
                for d in stored
                if layout.SOURCE_DIGEST_ANNOTATION in d.annotations
            }
            return stored if {d.digest for d in index.platforms()} <= have else None
        try:
            return (ImageIndex(OCI_INDEX, stored).select(self.config.platform, entry.name),)
        except PlatformNotFound:
            return None

    def _targets(
        self, index: ImageIndex, top: Digest, name: str, current: layout.Entry | None
    ) -> list[Descriptor]:
        """The manifests of the registry's ``index`` this pull fetches: the platform
        asked for (or all of them); if the tag moved to a new index, also the platforms
        the name holds, from the new index, so that the name stays one index's."""
        if self.config.all_platforms:
            targets = list(index.platforms())
            if not targets:
                raise PlatformNotFound(f"{name}: its index names no platform")
        else:
            targets = [index.select(self.config.platform, name)]
        if current is None or current.top_digest == top:
            return targets
        if layout.INDEX_DIGEST_ANNOTATION not in current.manifest.annotations:
            return targets
        try:
            stored = layout.manifests(self.store, current)
        except FetchdError:
            return targets
        offered = index.platforms()
        for d in stored:
            plat = Platform.from_json(d.platform)
            same = [
                o for o in offered if plat is not None and Platform.from_json(o.platform) == plat
            ]
            if same and same[0] not in targets:
                targets.append(same[0])
            elif not same:
                log.warning("%s: the registry's new index has no %s; it is dropped", name, plat)
        return targets

    def _stored_form(
        self,
        raw: bytes,
        parsed: ImageManifest,
        digest: Digest,
        platform: Any,
        keep: dict[Digest, bytes],
    ) -> Descriptor:
        """The descriptor the store records for a manifest (its OCI form: a Docker
        schema 2 manifest is converted, its original named by an annotation); what to
        commit as blobs goes into ``keep``."""
        keep[digest] = raw
        annotations: dict[str, str] = {}
        if parsed.media_type == DOCKER_MANIFEST:
            annotations[layout.SOURCE_DIGEST_ANNOTATION] = str(digest)
            raw = docker_to_oci(raw)
            digest = Digest.of(raw)
            keep[digest] = raw
        return Descriptor(OCI_MANIFEST, digest, len(raw), (), annotations, platform)

    async def _resolve(self, ref: Reference, name: str, authority: Resolver) -> _Resolved:
        """The manifests of ``ref`` from ``authority``: the top one and, of an index,
        the image manifests this pull takes; all verified by digest (base.Resolver)."""
        resolved = await authority.resolve(ref)
        raw, top = resolved.raw, resolved.descriptor.digest
        self.progress.fetched(top.short, len(raw))
        parsed = parse_manifest(raw, resolved.descriptor.media_type or None, name)
        keep: dict[Digest, bytes] = {top: raw}  # what the registry served, kept as blobs
        pulled: list[Descriptor] = []
        images: list[ImageManifest] = []
        index_digest = None
        if isinstance(parsed, ImageIndex):
            index_digest = top
            current = await asyncio.to_thread(layout.find, self.store, name)
            for chosen in self._targets(parsed, top, name, current):
                craw = await authority.child(ref, chosen)
                cdigest = chosen.digest
                self.progress.fetched(cdigest.short, len(craw))
                child = parse_manifest(craw, chosen.media_type, f"{name} ({chosen.digest.short})")
                if not isinstance(child, ImageManifest):
                    raise ManifestInvalid(f"{name}: an index inside an index is not supported")
                pulled.append(self._stored_form(craw, child, cdigest, chosen.platform, keep))
                images.append(child)
        else:
            pulled.append(self._stored_form(raw, parsed, top, None, keep))
            images.append(parsed)

        return _Resolved(top, keep, pulled, images, index_digest)

    async def _pull_resolved(
        self, ref: Reference, name: str, resolved: _Resolved, sources: Sources
    ) -> PullResult:
        top, keep, pulled, images = resolved.top, resolved.keep, resolved.pulled, resolved.images
        index_digest = resolved.index_digest
        seen: dict[Digest, Descriptor] = {}
        for image in images:
            for d in distinct_blobs(image, name):
                first = seen.setdefault(d.digest, d)
                if first.size != d.size:
                    raise ManifestInvalid(
                        f"{name}: its manifests give blob {d.digest.short} two sizes "
                        f"({first.size} and {d.size})"
                    )
        blobs = tuple(seen.values())
        # What is missing, once per pull (one stat per blob): per blob it was O(layers²).
        todo = [d for d in blobs if not self.store.has(d.digest)]
        missing = sum(d.size for d in todo)
        if todo:
            # Before any request for a blob: a size nothing could hold is refused now.
            big = max(todo, key=lambda d: d.size)
            ensure_room(
                self.store.ingests, big.size, f"{name}: blob {big.digest.short}", self.store.root
            )
        # A lease protects every blob of the image from gc until the name is published
        # (leases.py); the store records in it what this pull commits, through the
        # context the blob tasks and threads inherit.
        async with self.leased([*keep, *(d.digest for d in blobs)]):
            if index_digest is None:
                pulled[0] = await self._check_config(sources, name, images[0], pulled[0])
            # Twice at most: a gc running at the same moment may delete a blob we saw
            # present before we publish the name (set_platforms checks under gc's lock).
            for attempt in (1, 2):
                await self._fetch_all(sources, blobs, missing)
                for digest, data in keep.items():
                    await asyncio.to_thread(self.store.put, data, digest)
                try:
                    await asyncio.to_thread(
                        layout.set_platforms,
                        self.store,
                        name,
                        pulled,
                        index_digest,
                        [*keep, *(d.digest for d in blobs)],
                    )
                    break
                except layout.BlobsMissing:
                    if attempt == 2:
                        raise
        await asyncio.to_thread(self.meta.touch_image, name, str(top), pulled=True)
        return PullResult(name, top, pulled[0], True, tuple(pulled))

    @contextlib.asynccontextmanager
    async def leased(self, digests: list[Digest]) -> AsyncIterator[Lease]:
        """A lease (leases.py) on ``digests`` for the block: gc keeps them, and the store
        records in it what the block commits, through the context the blob tasks and
        threads inherit. If the block fails the store is left as it was: the lease is
        released, then the blobs this pull committed itself that no name and no other
        pull's lease uses are removed (every commit ran to its end before)."""
        # Taking it may wait on a gc of another process: a cancellation returns at once,
        # and what the thread goes on to take is released when it does (else its file
        # would pin the digests for as long as this process lives).
        taking = asyncio.ensure_future(asyncio.to_thread(Lease.take, self.store, digests))
        try:
            lease = await asyncio.shield(taking)
        except asyncio.CancelledError:
            taking.add_done_callback(_release_taken)
            raise
        token = current_lease.set(lease)
        try:
            yield lease
        except BaseException:
            await asyncio.to_thread(abandon, self.store, lease)
            raise
        finally:
            current_lease.reset(token)
            lease.release()  # the name is published (or the pull failed): idempotent

    async def _check_config(
        self, sources: Sources, name: str, image: ImageManifest, desc: Descriptor
    ) -> Descriptor:
        """A single-platform image: fetch its config first, and refuse it (before any
        layer moves) if the platform it names cannot run as the one asked for; returns
        ``desc`` with that platform, which the store records."""
        await self.ensure_blob(image.config, sources)
        plat = await asyncio.to_thread(layout.config_platform, self.store, image)
        if plat is None:
            return desc
        if not self.config.all_platforms and not self.config.platform.matches(plat.to_json()):
            raise PlatformNotFound(
                f"{name} is an image for {plat} only, not for {self.config.platform}; "
                f"to store it anyway, pull it with --platform {plat}"
            )
        return replace(desc, platform=plat.to_json())

    async def _fetch_all(
        self, sources: Sources, blobs: tuple[Descriptor, ...], missing: int
    ) -> None:
        """:meth:`ensure_blob` for each of ``blobs``, in order, by as many workers as blobs
        may move at once: tasks O(parallel), not O(layers), and the first request goes
        out at once, not after a task for each of 5,000 layers was made."""
        queue = iter(blobs)

        async def worker() -> None:
            for desc in queue:  # shared: each blob goes to the next free worker
                segmented, stream = self._segment(desc, missing)
                await self.ensure_blob(desc, sources, segmented, one_stream=stream)

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(len(blobs), max(1, self.config.max_parallel_blobs))):
                    tg.create_task(worker())
        except BaseExceptionGroup as group:
            raise unwrap(group) from None

    def _segment(self, desc: Descriptor, missing: int) -> tuple[bool, bool]:
        """How ``desc`` comes: (into a segmented ingest?, as one stream?).

        Over several range requests only a big blob that dominates the image
        (``missing``: the bytes of its blobs not in the store): when several big blobs
        come at once they already fill the connections, and segmenting them only costs
        requests (and the server CPU: a registry served 8 MiB ranges on twice the CPU
        of whole GETs). Such a blob still goes through the transport, as one request on
        one connection (``one_stream``): its thread reads, writes and hashes
        without the event loop, which the body of an aiohttp response passes through
        piece by piece. An image of four 256 MiB layers from a local registry, 8 pulls
        alternating: 1.87 s against 2.39 s through aiohttp (medians), 2.3 s of CPU
        against 2.9 s, 6.6 k context switches against 16.5 k."""
        if self.config.torrent and desc.size >= self.config.torrent_min_size:
            return True, False  # a swarm writes pieces anywhere
        if desc.size < self.config.segmented_threshold:
            return False, False  # a small blob: one aiohttp GET into a sequential ingest
        return True, 2 * desc.size < missing

    async def ensure_blob(
        self,
        desc: Descriptor,
        sources: Sources | Sequence[Fetcher],
        segmented: bool = False,
        also: Callable[[], Feeder] | None = None,
        *,
        one_stream: bool = False,
    ) -> None:
        """Make ``desc`` present in the store from ``sources`` (asked in order, see
        fetching.py); one transfer per digest however many ask (single flight). ``also``:
        as ``Store.ingest``'s, when this call is the one that transfers the blob."""
        if self.store.has(desc.digest):
            return
        if not isinstance(sources, Sources):
            sources = Sources(sources, sources[-1] if sources else None)
        chosen = sources
        await self.single.run(
            str(desc.digest),
            lambda: self._transfer(desc, chosen, segmented, also, one_stream=one_stream),
        )

    async def _transfer(
        self,
        desc: Descriptor,
        sources: Sources,
        segmented: bool,
        also: Callable[[], Feeder] | None = None,
        *,
        one_stream: bool = False,
    ) -> None:
        """Fetch and commit ``desc`` (unless another process committed it meanwhile)."""
        key = str(desc.digest)
        async with (
            self._blob_slots,
            self.store.ingest(desc.digest, desc.size, segmented=segmented, also=also) as ingest,
        ):
            if ingest.exists:
                return  # another process committed it while we waited for the lock
            need = desc.size - ingest.offset
            ensure_room(self.store.ingests, need, f"blob {desc.digest.short}", self.store.root)
            if ingest.resumed_from:
                log.info("%s: resuming at %d bytes", desc.digest.short, ingest.resumed_from)
            self.progress.start(
                key, desc.digest.short, desc.size, ingest.resumed_from, blob_kind(desc.media_type)
            )
            flight = Flight(desc.digest, desc.size, ingest)
            self.flights[desc.digest] = flight

            def advance(n: int) -> None:
                self.progress.advance(key, n)
                flight.advanced()

            try:
                await fill_and_commit(
                    desc,
                    ingest,
                    sources,
                    self.config,
                    advance,
                    lambda n: self.progress.connections(key, n),
                    one_stream=one_stream,
                )
            except BaseException as exc:
                flight.finish(exc)
                self.progress.drop(key)
                raise
            finally:
                del self.flights[desc.digest]
            flight.finish(None)
            self.progress.finish(key)
        for f in sources.live():
            if isinstance(f, SwarmFetcher):
                await f.committed(desc, self.store.blob_path(desc.digest).parent)

    # --- plain URLs ----------------------------------------------------------------------

    def session(self) -> aiohttp.ClientSession:
        """The engine's one HTTP session (connection pool), created on first use."""
        if self._session is None:
            self._session = new_session(self.config)
        return self._session

    async def pull_url(
        self, url: str, digest: Digest | None, mirrors: tuple[str, ...]
    ) -> PullResult:
        """One blob by URL, verified, with rkt's remote cache (ETag, Last-Modified, max-age)."""
        for u in (url, *mirrors):
            if not is_url(u):
                raise ReferenceInvalid(f"{u[:80]!r} is not an http(s) URL")
            if u.startswith("http://") and "http" not in self.config.insecure:
                raise InsecureRefused(
                    f"{redact(u)} is plain HTTP; pass --insecure-options http to allow it"
                )
        if mirrors and digest is None:
            raise UsageError(
                f"{redact(url)}: --mirror for a URL needs --digest sha256:…: without it "
                "nothing can check that the mirrors send the URL's bytes"
            )
        policy = self.config.pull_policy
        now = time.time()
        rec, listed = await asyncio.to_thread(self._url_record, url)
        if rec and not self.store.has(Digest.parse(rec.digest)):
            rec = None
        if rec and digest is not None and Digest.parse(rec.digest) != digest:
            rec = None
        if digest is not None and self.store.has(digest) and policy != "update":
            return self._url_result(url, digest, self.store.blob_size(digest) or 0, False)
        # ``new`` is rkt's "fetch what the store lacks": a stored URL is asked again only
        # when that is cheap, past its max-age with a validator for a conditional GET.
        # Without validators (a server that sent none, or fetchd.db lost) it is used as
        # stored; ``update`` always asks.
        cheap = rec is not None and bool(rec.etag or rec.last_modified) and not rec.fresh(now)
        if rec is not None and (policy == "never" or (policy == "new" and not cheap)):
            await asyncio.to_thread(self._touch_url, replace(rec, last_used=now), listed)
            return self._url_result(url, Digest.parse(rec.digest), rec.size, False)
        if policy == "never":
            raise ImageNotInStore(
                f"{redact(url)} is not in the store and --pull-policy never forbids fetching it"
            )
        if rec is not None and await self._still_valid(url, rec, listed):
            return self._url_result(url, Digest.parse(rec.digest), rec.size, False)
        # A lease, as for an image: the blob's digest (if not given) joins it at commit.
        # One download per URL (or pinned digest) however many ask, in this process
        # (single flight) and across processes (the ingest's lock, then the record).
        flight = str(digest) if digest is not None else f"url:{url}"
        async with self.leased([digest] if digest else []):
            for attempt in (1, 2):
                try:
                    download = lambda: self._download_url(url, digest, mirrors, rec, now)  # noqa: E731
                    result = await self.single.run(flight, download)
                    if result is None:  # the flight was an image's blob of that digest
                        result = await download()
                    got, size, fetched = result
                    break
                except layout.BlobsMissing:
                    if attempt == 2:  # a gc deleted it between our commit and now: twice
                        raise
        return self._url_result(url, got, size, fetched)

    async def _download_url(
        self,
        url: str,
        digest: Digest | None,
        mirrors: tuple[str, ...],
        seen: UrlRecord | None,
        now: float,
    ) -> tuple[Digest, int, bool]:
        """Download ``url`` (and ``mirrors``: the same bytes) into the store and name it,
        holding its ingest: one writer across processes. A writer that finds, once it
        holds the ingest, that another process fetched and named the URL meanwhile (the
        record differs from ``seen``, read before) takes that instead."""
        key = "url-" + hashlib.sha256(url.encode()).hexdigest()[:40]
        async with self.store.ingest(digest, None, key=key, segmented=True) as ingest:
            assert isinstance(ingest, SegmentedIngest)
            rec, _ = await asyncio.to_thread(self._url_record, url)
            if (
                rec is not None
                and _content(rec) != _content(seen)
                and self.store.has(Digest.parse(rec.digest))
                and (digest is None or Digest.parse(rec.digest) == digest)
            ):
                return Digest.parse(rec.digest), rec.size, False
            meta: dict[str, Any] = {}
            if ingest.exists:  # a pinned digest another writer committed meanwhile
                got, size, fetched = ingest.digest, self.store.blob_size(ingest.digest) or 0, False
            else:
                fetchers = [UrlFetcher(u, self.config) for u in (url, *mirrors)]
                await self.fill_url(url, ingest, Sources(fetchers, fetchers[0], peers=True))
                got, size, fetched = ingest.digest, ingest.size or 0, True
                meta = dict(ingest.meta)
            record = UrlRecord.fetched(url, str(got), size, meta, now)
            await asyncio.to_thread(record_url, self.store, record)
            return got, size, fetched

    async def fill_url(
        self,
        url: str,
        ingest: Ingest,
        sources: Sources,
        before_commit: Callable[[Ingest], Awaitable[None]] | None = None,
    ) -> None:
        """Fill ``ingest`` with the bytes of ``url`` from ``sources`` and commit it, under
        ``url``'s progress line; ``before_commit`` (fill_and_commit's) judges them first."""
        label = redact(url)
        self.progress.start(label, _short_label(url), ingest.size or 0, ingest.offset)

        def advance(n: int) -> None:
            self.progress.advance(label, n)
            self.progress.resize(label, ingest.size or 0)

        desc = Descriptor("application/octet-stream", ingest.digest, ingest.size or 0)
        try:
            await fill_and_commit(
                desc,
                ingest,
                sources,
                self.config,
                advance,
                lambda n: self.progress.connections(label, n),
                before_commit=before_commit,
            )
        except BaseException:
            self.progress.drop(label)
            raise
        self.progress.finish(label)

    def _url_record(self, url: str) -> tuple[UrlRecord | None, bool]:
        """What the store holds for ``url`` (the layout's record, with the validators and
        times fetchd.db has for the same content), and whether the layout records it (a
        URL only the database knows is from a fetchd before the catalog)."""
        entry = layout.find_url(self.store, url)
        try:
            rec = self.meta.url(url)
        except FetchdError as exc:  # a corrupt index: the layout still knows
            log.warning("%s", exc)
            rec = None
        if entry is None:
            return rec, False
        if rec is None or rec.digest != str(entry.blob.digest):
            blob = entry.blob
            return UrlRecord(url, str(blob.digest), blob.size, None, None, None, 0.0, 0.0), True
        return rec, True

    def _touch_url(self, rec: UrlRecord, listed: bool) -> None:
        """Note a use (and record a URL the layout lacks). Best effort: a store this user
        may only read still serves what it holds."""
        try:
            if listed:
                self.meta.put_url(rec)
            else:
                record_url(self.store, rec)
        except (FetchdError, OSError) as exc:
            log.debug("%s: not recorded as used: %s", redact(rec.url), exc)

    async def _still_valid(self, url: str, rec: UrlRecord, listed: bool = True) -> bool:
        """A conditional GET: True (and the record refreshed) if the server says 304."""
        headers = {}
        if rec.etag:
            headers["If-None-Match"] = rec.etag
        if rec.last_modified:
            headers["If-Modified-Since"] = rec.last_modified
        if not headers:
            return False
        try:
            async with self.session().get(url, headers=headers) as resp:
                if resp.status != 304:
                    return False
                max_age = cache_max_age(resp.headers.get("Cache-Control"))
        except retryable() as exc:
            raise translate(exc, redact(url), self.config) from exc
        now = time.time()
        await asyncio.to_thread(
            self._touch_url,
            replace(
                rec,
                max_age=max_age if max_age is not None else rec.max_age,
                checked_at=now,
                last_used=now,
            ),
            listed,
        )
        return True

    def _url_result(self, url: str, digest: Digest, size: int, fetched: bool) -> PullResult:
        return PullResult(
            url, digest, Descriptor("application/octet-stream", digest, size), fetched
        )


def _release_taken(taking: asyncio.Future[Lease]) -> None:
    if not taking.cancelled() and taking.exception() is None:
        taking.result().release()


def _content(rec: UrlRecord | None) -> tuple[object, ...] | None:
    """What a URL record says about the content (not when it was last used: a pull that
    only used the stored blob changes that, and is no newer download)."""
    if rec is None:
        return None
    return (rec.digest, rec.size, rec.etag, rec.last_modified, rec.checked_at)


def _registry_class() -> type[Registry]:
    """The registry source, imported on first use (it imports aiohttp; URL pulls don't)."""
    from fetchd.sources.registry import Registry

    return Registry


def _short_label(url: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1] or url
    return name if len(name) <= 22 else name[:10] + "…" + name[-11:]
