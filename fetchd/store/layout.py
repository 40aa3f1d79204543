"""The OCI layout's ``index.json``: one entry per pulled name, rewritten atomically.

Every entry is the descriptor of an image manifest with the annotation
``org.opencontainers.image.ref.name`` = the full reference, so ``skopeo`` and ``umoci``
read the store as they read any OCI layout. When the name resolved to an index (a
multi-arch image), the index is kept as a blob too and named by the annotation
``io.fetchd.index.digest``; a Docker schema 2 manifest is stored in its OCI form (what
skopeo and umoci read) and the original, named by ``io.fetchd.source.digest``, is kept
too — so gc keeps both and a mirror can serve what the registry served.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fetchd.errors import FetchdError, ImageNotInStore, ManifestInvalid, StoreError
from fetchd.manifest import ImageIndex, ImageManifest, parse_manifest
from fetchd.model import (
    MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    OCI_INDEX,
    REF_NAME_ANNOTATION,
    Descriptor,
    Digest,
    Platform,
    load_json,
    platform_text,
)
from fetchd.store.cas import Store, atomic_write
from fetchd.store.diskfull import writing
from fetchd.store.locks import locked

INDEX_DIGEST_ANNOTATION = "io.fetchd.index.digest"
SOURCE_DIGEST_ANNOTATION = "io.fetchd.source.digest"

# An appc image (an ACI and its dependencies, issue 13) is an entry like any other: an OCI
# image manifest whose layers are the ACIs as signed (dependencies first), with a config
# synthesised from the appc manifest. The entry, the manifest and each ACI layer carry:
APPC_NAME_ANNOTATION = "io.fetchd.appc.name"
#: the ACI's labels, a JSON object (version, os, arch, …)
APPC_LABELS_ANNOTATION = "io.fetchd.appc.labels"
#: ``sha512-`` + 128 hex: the appc image ID (sha512 of the uncompressed tar)
APPC_IMAGE_ID_ANNOTATION = "io.fetchd.appc.image-id"
#: the blob of the appc manifest JSON (the tar's ``manifest`` member, byte-equal)
APPC_MANIFEST_ANNOTATION = "io.fetchd.appc.manifest"
#: the blob of the detached signature (``.aci.asc``) as fetched; absent if unsigned
APPC_SIGNATURE_ANNOTATION = "io.fetchd.appc.signature"
#: the fingerprint of the key that signed it (40 hex)
APPC_SIGNER_ANNOTATION = "io.fetchd.appc.signer"
#: where the ACI came from (its URL, or ``file://`` path)
APPC_SOURCE_ANNOTATION = "io.fetchd.appc.source"

#: annotations naming blobs an entry (or a layer) needs besides what its manifest lists:
#: gc keeps them, ``image_blobs`` lists them
RECORDED_ANNOTATIONS = (
    INDEX_DIGEST_ANNOTATION,
    SOURCE_DIGEST_ANNOTATION,
    APPC_MANIFEST_ANNOTATION,
    APPC_SIGNATURE_ANNOTATION,
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in the store: the reference and its image manifest's descriptor."""

    name: str
    manifest: Descriptor

    @property
    def top_digest(self) -> Digest:
        """What the registry reported for the name: the index if there was one."""
        for key in (INDEX_DIGEST_ANNOTATION, SOURCE_DIGEST_ANNOTATION):
            text = self.manifest.annotations.get(key)
            if text:
                return Digest.parse(text)
        return self.manifest.digest


def read_index(store: Store) -> dict[str, Any]:
    try:
        doc = json.loads(store.index_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {store.index_path}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
        raise StoreError(f"{store.index_path} is not an OCI image index")
    return doc


def entries(store: Store) -> list[Entry]:
    out = []
    for i, obj in enumerate(read_index(store).get("manifests", [])):
        try:
            desc = Descriptor.from_json(obj, f"index.json manifests[{i}]")
        except Exception:
            continue  # a foreign entry we cannot parse: leave it alone
        name = desc.annotations.get(REF_NAME_ANNOTATION)
        if name:
            out.append(Entry(name, desc))
    return out


def find(store: Store, name: str) -> Entry | None:
    for e in entries(store):
        if e.name == name:
            return e
    return None


class BlobsMissing(StoreError):
    """A name was about to be published while some of its blobs are gone (gc ran)."""

    def __init__(self, name: str, missing: list[Digest]) -> None:
        listed = ", ".join(str(d) for d in missing)
        super().__init__(f"{name}: blobs vanished before it was recorded: {listed}")
        self.missing = missing


def _update(
    store: Store, change: Callable[[list[Any]], list[Any]], check: Callable[[], None] = lambda: None
) -> None:
    with locked(store.index_lock):
        check()
        doc = read_index(store)
        doc["manifests"] = change(list(doc.get("manifests", [])))
        with writing("layout/index.json", store.root):
            atomic_write(store.index_path, json.dumps(doc, indent=2).encode())


def _name_of(obj: Any) -> str | None:
    if isinstance(obj, dict):
        ann = obj.get("annotations")
        if isinstance(ann, dict):
            name = ann.get(REF_NAME_ANNOTATION)
            return name if isinstance(name, str) else None
    return None


# --- platforms: one name, one or more image manifests ---------------------------------
#
# A name stored for one platform is one index.json entry naming that platform's OCI
# image manifest (with its ``platform``), as skopeo and umoci expect of a tag. A name
# stored for two or more is one entry naming an OCI image index that fetchd writes (a
# blob), listing exactly the stored platforms' manifests, each with its ``platform``:
# skopeo picks one of them (``--override-arch``), umoci calls the tag ambiguous
# (``fetchd export --platform`` writes a layout of one). Either way the entry carries
# ``io.fetchd.index.digest``, the registry's index, when the name came from one.

_ENTRY_ONLY = (REF_NAME_ANNOTATION, INDEX_DIGEST_ANNOTATION)


def _child(desc: Descriptor) -> Descriptor:
    """``desc`` as an item of fetchd's index: without the annotations of an entry."""
    kept = {k: v for k, v in desc.annotations.items() if k not in _ENTRY_ONLY}
    return Descriptor(desc.media_type, desc.digest, desc.size, desc.urls, kept, desc.platform)


def _read_manifest(store: Store, desc: Descriptor, where: str) -> ImageManifest | ImageIndex:
    try:
        raw = store.read_blob(desc.digest, MAX_MANIFEST_SIZE)
        return parse_manifest(raw, desc.media_type, where)
    except (OSError, ManifestInvalid, StoreError) as exc:
        raise StoreError(f"{where}: its manifest cannot be read: {exc}") from exc


def config_platform(store: Store, manifest: ImageManifest) -> Platform | None:
    """The platform an image config names (``os``, ``architecture``, ``variant``), or
    None if the config is absent, unreadable or names none."""
    try:
        raw = store.read_blob(manifest.config.digest, MAX_MANIFEST_SIZE)
        doc = load_json(raw, "the image config")
    except (OSError, FetchdError):
        return None
    return Platform.from_json(doc) if isinstance(doc, dict) else None


def manifests(store: Store, entry: Entry) -> tuple[Descriptor, ...]:
    """The entry's image manifests, one per stored platform, each with its ``platform``
    (for an image that came without an index, the one its config names, if any).

    Raises :class:`StoreError` if the entry's manifest or index cannot be read.
    """
    parsed = _read_manifest(store, entry.manifest, entry.name)
    if isinstance(parsed, ImageIndex):
        return tuple(d for d in parsed.manifests if d.media_type in MANIFEST_TYPES)
    desc = _child(entry.manifest)
    if desc.platform is None:
        plat = config_platform(store, parsed)
        if plat is not None:
            desc = replace(desc, platform=plat.to_json())
    return (desc,)


def platforms(store: Store, entry: Entry) -> list[str]:
    """What ``fetchd images`` shows: the stored platforms, ``OS/ARCH[/VARIANT]`` each
    ("unknown" for an image whose config names none); empty if unreadable."""
    try:
        return [platform_text(d.platform) or "unknown" for d in manifests(store, entry)]
    except StoreError:
        return []


def for_platform(store: Store, entry: Entry, platform: Platform) -> Entry:
    """The entry narrowed to the one manifest that suits ``platform`` best (as a pull
    selects), as if the name had been pulled for it alone (``export --platform``).

    Raises :class:`PlatformNotFound` naming the stored platforms if none suits.
    """
    stored = manifests(store, entry)
    chosen = ImageIndex(OCI_INDEX, stored).select(platform, f"{entry.name} in the store")
    annotations = dict(chosen.annotations)
    index_digest = entry.manifest.annotations.get(INDEX_DIGEST_ANNOTATION)
    if index_digest:
        annotations[INDEX_DIGEST_ANNOTATION] = index_digest
    return Entry(entry.name, replace(chosen, annotations=annotations))


def _same_platform(a: Descriptor, b: Descriptor) -> bool:
    pa, pb = Platform.from_json(a.platform), Platform.from_json(b.platform)
    return pa is not None and pa == pb


def _entry_json(store: Store, name: str, children: list[Descriptor], index: str | None) -> Any:
    """The index.json entry for ``children``; for two or more, fetchd's index is
    committed as a blob first (the caller holds the index lock: gc cannot take it)."""
    if len(children) == 1:
        obj = children[0].to_json()
    else:
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [c.to_json() for c in children],
        }
        data = json.dumps(doc, separators=(",", ":")).encode()
        digest = Digest.of(data)
        store.put(data, digest)
        obj = {"mediaType": OCI_INDEX, "digest": str(digest), "size": len(data)}
    annotations = obj.setdefault("annotations", {})
    if index:
        annotations[INDEX_DIGEST_ANNOTATION] = index
    annotations[REF_NAME_ANNOTATION] = name
    return obj


def _current(store: Store, name: str, ms: list[Any]) -> Entry | None:
    for i, obj in enumerate(ms):
        if _name_of(obj) == name:
            try:
                return Entry(name, Descriptor.from_json(obj, f"index.json manifests[{i}]"))
            except FetchdError:
                return None  # an entry we cannot parse: replaced
    return None


def set_platforms(
    store: Store,
    name: str,
    pulled: Sequence[Descriptor],
    index: Digest | None,
    required: Iterable[Digest] = (),
) -> Entry:
    """Record that ``name`` has the image manifests ``pulled`` (each with its platform).

    From the same registry index (``index``) as what the name holds already, they join
    it: each replaces a stored manifest of the same platform, the others stay. From
    another index, or without one (a single-platform image), they replace it. Decided
    and written under the index lock, so two pulls of two platforms of one name both
    land. ``required`` (the blobs) are checked under that lock: :class:`BlobsMissing`
    if any is gone, and nothing is written. Returns the new entry.
    """
    news = [_child(d) for d in pulled]
    needed = [d.digest for d in news] + list(required)
    out: list[Entry] = []

    def check() -> None:
        missing = [d for d in needed if not store.has(d)]
        if missing:
            raise BlobsMissing(name, missing)

    def change(ms: list[Any]) -> list[Any]:
        children = list(news)
        current = _current(store, name, ms)
        if current is not None and is_appc(current) != any(
            APPC_NAME_ANNOTATION in d.annotations for d in news
        ):
            # ``example.com/app:1.0`` is both an appc name and the index name of
            # docker://example.com/app:1.0: one kind never silently replaces the other
            # (stage1 would then run an image another authority vouched for).
            held = "an appc image" if is_appc(current) else "a registry image"
            raise StoreError(
                f"{name} in the store is {held}; remove it first (fetchd rm {name}) to "
                "store the other kind under that name"
            )
        if current is not None and index is not None and current.top_digest == index:
            # An entry that cannot be read is not silently replaced by this one platform:
            # StoreError ("run fetchd fsck") goes up instead, and nothing changes.
            old = manifests(store, current)
            kept = [
                o
                for o in old
                if not any(_same_platform(o, n) or o.digest == n.digest for n in news)
            ]
            children = kept + children
        obj = _entry_json(store, name, children, str(index) if index else None)
        out.append(Entry(name, Descriptor.from_json(obj, name)))
        return [m for m in ms if _name_of(m) != name] + [obj]

    _update(store, change, check)
    return out[0]


def remove_platform(store: Store, name: str, platform: Platform) -> tuple[list[str], bool]:
    """Forget the manifests of ``name`` for ``platform`` (normalised, compared exactly:
    ``linux/arm64`` is ``linux/arm64/v8``, but not ``linux/arm/v7``). Returns the
    platforms removed and whether the name is gone with them (its last platform).

    Raises :class:`ImageNotInStore`, naming what is stored, if none is for ``platform``.
    """
    result: list[tuple[list[str], bool]] = []

    def change(ms: list[Any]) -> list[Any]:
        current = _current(store, name, ms)
        if current is None:
            raise ImageNotInStore(f"{name!r} is not in the store; see fetchd images")
        stored = manifests(store, current)
        drop = [d for d in stored if Platform.from_json(d.platform) == platform]
        if not drop:
            have = ", ".join(platform_text(d.platform) or "unknown" for d in stored)
            raise ImageNotInStore(
                f"{name} is not in the store for {platform} (it is for {have}); see fetchd images"
            )
        rest = [d for d in stored if d not in drop]
        result.append(([platform_text(d.platform) or "unknown" for d in drop], not rest))
        others = [m for m in ms if _name_of(m) != name]
        if not rest:
            return others
        index = current.manifest.annotations.get(INDEX_DIGEST_ANNOTATION)
        return [*others, _entry_json(store, name, rest, index)]

    _update(store, change)
    return result[0]


def remove_entries(store: Store, match: Callable[[Entry], bool]) -> list[Entry]:
    """Forget every name ``match`` selects; returns what was removed."""
    removed = [e for e in entries(store) if match(e)]
    names = {e.name for e in removed}
    if names:
        _update(store, lambda ms: [m for m in ms if _name_of(m) not in names])
    return removed


def _recorded(desc: Descriptor, store: Store) -> Iterator[Descriptor]:
    """The blobs ``desc``'s annotations name: the registry's index, a Docker original,
    an ACI's appc manifest and signature."""
    for key in RECORDED_ANNOTATIONS:
        text = desc.annotations.get(key)
        if text:
            digest = Digest.parse(text)
            yield Descriptor("application/octet-stream", digest, store.blob_size(digest) or 0)


def _blobs_of(manifest: ImageManifest, store: Store) -> Iterator[Descriptor]:
    for desc in manifest.blobs():
        yield desc
        yield from _recorded(desc, store)


def image_blobs(store: Store, entry: Entry) -> Iterator[Descriptor]:
    """Every blob the entry needs: its manifest, config and layers (and its index) —
    for a name of several platforms, fetchd's index and each platform's.

    Raises :class:`StoreError` if a manifest that is present cannot be read, or the
    entry's own manifest is missing.
    """
    yield entry.manifest
    yield from _recorded(entry.manifest, store)
    manifest = _read_manifest(store, entry.manifest, entry.name)
    if isinstance(manifest, ImageManifest):
        yield from _blobs_of(manifest, store)
        return
    for child in manifest.manifests:
        yield child
        yield from _recorded(child, store)
        if child.media_type in MANIFEST_TYPES and store.has(child.digest):
            inner = _read_manifest(store, child, f"{entry.name} ({child.digest.short})")
            if isinstance(inner, ImageManifest):
                yield from _blobs_of(inner, store)


# --- URL records: a blob pulled by URL is an index.json entry too ---------------------
#
# ``{"mediaType": "application/octet-stream" (or the server's type), "digest", "size",
#   "annotations": {"io.fetchd.url": URL}}`` and no ref.name, so skopeo and umoci never
# take it for an image name and gc keeps the blob whatever happens to fetchd.db.

URL_ANNOTATION = "io.fetchd.url"


@dataclass(frozen=True, slots=True)
class UrlEntry:
    """One URL in the store: the URL and its blob's descriptor."""

    url: str
    blob: Descriptor


def _url_of(obj: Any) -> str | None:
    if isinstance(obj, dict):
        ann = obj.get("annotations")
        if isinstance(ann, dict) and REF_NAME_ANNOTATION not in ann:
            url = ann.get(URL_ANNOTATION)
            return url if isinstance(url, str) else None
    return None


def url_entries(store: Store) -> list[UrlEntry]:
    out = []
    for i, obj in enumerate(read_index(store).get("manifests", [])):
        url = _url_of(obj)
        if url is None:
            continue
        try:
            desc = Descriptor.from_json(obj, f"index.json manifests[{i}]")
        except Exception:
            continue  # unparsable: leave it alone, as a foreign entry
        out.append(UrlEntry(url, desc))
    return out


def find_url(store: Store, url: str) -> UrlEntry | None:
    for e in url_entries(store):
        if e.url == url:
            return e
    return None


def set_url_entry(store: Store, url: str, blob: Descriptor) -> None:
    """Record that ``url`` gave ``blob`` (replacing what it gave before).

    The blob is checked under the index lock, the lock gc deletes under:
    :class:`BlobsMissing` if it is gone, and nothing is written.
    """
    obj = {"mediaType": blob.media_type, "digest": str(blob.digest), "size": blob.size}
    obj["annotations"] = {URL_ANNOTATION: url}

    def check() -> None:
        if not store.has(blob.digest):
            raise BlobsMissing(url, [blob.digest])

    _update(store, lambda ms: [m for m in ms if _url_of(m) != url] + [obj], check)


def remove_url_entries(store: Store, urls: Iterable[str]) -> list[str]:
    """Forget the URLs (their blobs stay until gc); returns the ones that were recorded."""
    gone = set(urls) & {e.url for e in url_entries(store)}
    if gone:
        _update(store, lambda ms: [m for m in ms if _url_of(m) not in gone])
    return sorted(gone)


# --- appc images: found by name and labels (rkt's GetACI) ------------------------------


@dataclass(frozen=True, slots=True)
class AppcEntry:
    """An entry that holds an appc image: its appc name and labels (from annotations)."""

    entry: Entry
    name: str
    labels: dict[str, str]


def _appc_labels(text: str | None) -> dict[str, str] | None:
    try:
        obj = json.loads(text or "{}")
    except ValueError:
        return None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in obj.items()
    ):
        return None
    return dict(obj)


def appc_entries(store: Store) -> list[AppcEntry]:
    """Every entry with an appc name, in index.json order (oldest first)."""
    out = []
    for e in entries(store):
        name = e.manifest.annotations.get(APPC_NAME_ANNOTATION)
        labels = _appc_labels(e.manifest.annotations.get(APPC_LABELS_ANNOTATION))
        if name and labels is not None:
            out.append(AppcEntry(e, name, labels))
    return out


def is_appc(entry: Entry) -> bool:
    """The entry is an appc image (an ACI described by fetchd), not a registry image."""
    return APPC_NAME_ANNOTATION in entry.manifest.annotations


def find_appc(
    store: Store,
    name: str,
    labels: Mapping[str, str],
    pulled_at: Mapping[str, float] | None = None,
) -> Entry | None:
    """The stored appc image for ``name`` with every one of ``labels`` equal (rkt's
    GetACI): with no ``version`` asked for, one labelled ``version=latest`` is preferred,
    else the newest (``pulled_at``: ref name → time; else the later in index.json)."""
    hits = [
        (i, a)
        for i, a in enumerate(appc_entries(store))
        if a.name == name and all(a.labels.get(k) == v for k, v in labels.items())
    ]
    if not hits:
        return None
    times = pulled_at or {}

    def rank(hit: tuple[int, AppcEntry]) -> tuple[bool, float, int]:
        i, a = hit
        latest = "version" not in labels and a.labels.get("version") == "latest"
        return (latest, times.get(a.entry.name, 0.0), i)

    return max(hits, key=rank)[1].entry


def set_appc_entry(
    store: Store, ref_name: str, desc: Descriptor, required: Iterable[Digest] = ()
) -> Entry:
    """Record the appc image ``desc`` (an OCI image manifest with the appc annotations and
    a platform) as ``ref_name`` (``NAME:VERSION``), replacing what that name held; under
    the index lock, with ``required`` checked there (:class:`BlobsMissing`)."""
    if APPC_NAME_ANNOTATION not in desc.annotations:
        raise StoreError(f"{ref_name}: an appc entry needs the {APPC_NAME_ANNOTATION} annotation")
    return set_platforms(store, ref_name, [desc], None, required)


def appc_signature_for(store: Store, source: str) -> tuple[Digest, Digest] | None:
    """(ACI blob, signature blob) a stored appc image took from ``source`` (an ACI URL),
    both present, or None: what rkt's remote cache reuses within max-age."""
    for a in appc_entries(store):
        try:
            manifest = _read_manifest(store, a.entry.manifest, a.entry.name)
        except StoreError:
            continue
        if not isinstance(manifest, ImageManifest):
            continue
        for layer in manifest.layers:
            if layer.annotations.get(APPC_SOURCE_ANNOTATION) != source:
                continue
            sig = layer.annotations.get(APPC_SIGNATURE_ANNOTATION)
            if not sig:
                continue
            try:
                sig_digest = Digest.parse(sig)
            except FetchdError:
                continue
            if store.has(layer.digest) and store.has(sig_digest):
                return layer.digest, sig_digest
    return None
