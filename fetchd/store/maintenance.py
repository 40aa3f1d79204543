"""What keeps a store healthy: images listing, rm, gc, fsck, export.

All of these are safe to run while pulls and a server use the store: they change
index.json only under its lock, and gc never deletes a blob that a name references
at the moment it looks, nor one that a live lease protects (a pull in progress, see
leases.py), nor an ingest that a live process holds. None of the read-only ones
(images, fsck of a sound store) needs to write, so they work on a full disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tarfile
import time
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fetchd.errors import FetchdError, ImageNotInStore, StoreError
from fetchd.manifest import ImageIndex, parse_manifest
from fetchd.model import MAX_MANIFEST_SIZE, REF_NAME_ANNOTATION, Digest, Platform, Reference
from fetchd.store import layout
from fetchd.store.cas import Store, atomic_write
from fetchd.store.leases import Lease, live_digests
from fetchd.store.locks import locked, remove_locked_dir, try_locked
from fetchd.store.meta import Meta, UrlRecord

STALE_INGEST_SECONDS = 24 * 3600
HASH_CHUNK = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class ImageInfo:
    name: str
    digest: str
    manifest: str
    size: int
    pulled_at: float | None
    last_used: float | None
    #: the stored platforms, OS/ARCH[/VARIANT] each (layout.platforms); none for a URL
    platforms: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "digest": self.digest,
            "manifest": self.manifest,
            "size": self.size,
            "pulled_at": self.pulled_at,
            "last_used": self.last_used,
            "platforms": list(self.platforms),
        }


def images(store: Store) -> list[ImageInfo]:
    times = Meta(store.db_path).times()
    out = []
    for e in layout.entries(store):
        try:
            size = sum(d.size for d in layout.image_blobs(store, e))
        except FetchdError:
            size = -1
        pulled, used = times.get(e.name, (None, None))
        plats = tuple(layout.platforms(store, e))
        out.append(
            ImageInfo(e.name, str(e.top_digest), str(e.manifest.digest), size, pulled, used, plats)
        )
    for u in Meta(store.db_path).urls():
        out.append(ImageInfo(u.url, u.digest, u.digest, u.size, u.checked_at, u.last_used))
    return sorted(out, key=lambda i: i.name)


def resolve_names(store: Store, texts: list[str]) -> list[layout.Entry]:
    """Entries named by ``texts``: full names, docker:// references, or digests."""
    found: list[layout.Entry] = []
    all_entries = layout.entries(store)
    for text in texts:
        hits = []
        if text.startswith(("sha256:", "sha512:")):
            d = Digest.parse(text)
            hits = [e for e in all_entries if d in (e.manifest.digest, e.top_digest)]
        else:
            try:
                name = str(Reference.parse(text))
            except FetchdError:
                name = text
            hits = [e for e in all_entries if e.name in (name, text)]
        if not hits:
            raise ImageNotInStore(f"{text!r} is not in the store; see fetchd images")
        found.extend(h for h in hits if h not in found)
    return found


def remove(store: Store, texts: list[str]) -> list[str]:
    """Forget names (images or URLs); the blobs stay until gc. Returns what was removed."""
    meta = Meta(store.db_path)
    known_urls = {u.url for u in meta.urls()}
    urls = [t for t in texts if t in known_urls]
    names = [t for t in texts if t not in known_urls]
    targets = {e.name for e in resolve_names(store, names)} if names else set()
    removed = layout.remove_entries(store, lambda e: e.name in targets)
    meta.forget([e.name for e in removed])
    meta.forget_urls(urls)
    return [e.name for e in removed] + urls


@dataclass
class GcReport:
    removed_blobs: int = 0
    freed_bytes: int = 0
    removed_ingests: int = 0
    evicted_images: list[str] | None = None


def referenced(store: Store) -> set[Digest]:
    """Every blob a name uses: images in index.json, blobs pulled by URL, and the
    manifests a cache server holds (with what they reference)."""
    meta = Meta(store.db_path)
    keep: set[Digest] = {Digest.parse(u.digest) for u in meta.urls()}
    for digest_text, _, media_type, _ in meta.cached_manifests():
        digest = Digest.parse(digest_text)
        if not store.has(digest):
            continue
        keep.add(digest)
        try:
            parsed = parse_manifest(
                store.read_blob(digest, MAX_MANIFEST_SIZE), media_type, digest_text
            )
        except (FetchdError, OSError):
            continue
        children = parsed.manifests if isinstance(parsed, ImageIndex) else parsed.blobs()
        keep.update(d.digest for d in children)
    for e in layout.entries(store):
        try:
            keep.update(d.digest for d in layout.image_blobs(store, e))
        except FetchdError:
            keep.add(e.manifest.digest)  # unreadable: keep what we can name, fsck reports
    return keep


def store_size(store: Store) -> int:
    return sum(p.stat().st_size for _, p in store.iter_blobs())


def remove_unreferenced(
    store: Store, candidates: set[Digest] | None = None, spare: Set[Digest] = frozenset()
) -> dict[Digest, int]:
    """Delete blobs no name references and no live lease protects (only among
    ``candidates``, if given; never those in ``spare``, such as blobs a server is
    sending right now).

    Holds the index lock while deciding and deleting; a pull publishes a name under
    the same lock after checking its blobs are present (:func:`layout.set_entry`), so
    no name can ever point at a blob deleted here. It holds the gc lock too, under
    which leases add digests (leases.py). Returns digest → bytes freed.
    """
    freed: dict[Digest, int] = {}
    with locked(store.index_lock), locked(store.gc_lock):
        keep = referenced(store) | live_digests(store)
        for digest, path in list(store.iter_blobs()):
            if digest in keep or digest in spare:
                continue
            if candidates is not None and digest not in candidates:
                continue
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                path.unlink()
                freed[digest] = size
    return freed


def abandon(store: Store, lease: Lease) -> dict[Digest, int]:
    """A pull failed: release its lease, then delete the blobs it committed itself that
    no name and no other live lease uses (what others committed, or what was there
    before, stays). Partial ingests stay too, to be resumed."""
    lease.release()
    if not lease.committed:
        return {}
    return remove_unreferenced(store, set(lease.committed))


def record_url(store: Store, rec: UrlRecord) -> None:
    """Name a blob pulled by URL, under the lock gc deletes under (see set_entry)."""
    with locked(store.index_lock):
        digest = Digest.parse(rec.digest)
        if not store.has(digest):
            raise layout.BlobsMissing(rec.url, [digest])
        Meta(store.db_path).put_url(rec)


def gc(
    store: Store, max_size: int | None = None, *, ingest_age: float = STALE_INGEST_SECONDS
) -> GcReport:
    """Delete unreferenced blobs and stale ingests; with ``max_size``, evict LRU images."""
    report = GcReport(evicted_images=[])
    if max_size is not None:
        times = Meta(store.db_path).times()
        by_age = sorted(images(store), key=lambda i: times.get(i.name, (0.0, 0.0))[1])
        while by_age and _live_size(store) > max_size:
            victim = by_age.pop(0)
            remove(store, [victim.name])
            assert report.evicted_images is not None
            report.evicted_images.append(victim.name)
    freed = remove_unreferenced(store)
    report.removed_blobs, report.freed_bytes = len(freed), sum(freed.values())
    now = time.time()
    for d in store.ingests.iterdir() if store.ingests.is_dir() else []:
        lock = d / "lock"
        try:
            age = now - max(p.stat().st_mtime for p in [d, *d.iterdir()])
        except (FileNotFoundError, ValueError):
            continue
        if age < ingest_age or not d.is_dir():
            continue
        with try_locked(lock) as ours:
            if ours:  # nobody writes it: remove it as its writer would (locks.py)
                remove_locked_dir(d, lock)
                report.removed_ingests += 1
    return report


def _live_size(store: Store) -> int:
    keep = referenced(store)
    return sum(p.stat().st_size for d, p in store.iter_blobs() if d in keep)


@dataclass
class FsckReport:
    checked: int = 0
    corrupt: list[str] | None = None
    missing: list[str] | None = None

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing


def fsck(store: Store) -> FsckReport:
    """Re-hash every blob; move mismatches to quarantine/; report names missing blobs."""
    report = FsckReport(corrupt=[], missing=[])
    assert report.corrupt is not None and report.missing is not None
    for digest, path in list(store.iter_blobs()):
        h = hashlib.new(digest.algorithm)
        try:
            with open(path, "rb") as f:
                while chunk := f.read(HASH_CHUNK):
                    h.update(chunk)
        except FileNotFoundError:
            continue
        report.checked += 1
        if h.hexdigest() != digest.hex:
            store.quarantine.mkdir(parents=True, exist_ok=True)
            os.replace(path, store.quarantine / f"{digest.algorithm}-{digest.hex}")
            report.corrupt.append(str(digest))
    for e in layout.entries(store):
        try:
            for d in layout.image_blobs(store, e):
                if not store.has(d.digest):
                    report.missing.append(f"{e.name}: {d.digest}")
        except StoreError as exc:
            report.missing.append(str(exc))
    return report


def export(store: Store, text: str, dest: Path, platform: Platform | None = None) -> Path:
    """Write the image as an OCI layout directory, or a tar of one if ``dest`` ends .tar."""
    (entry,) = resolve_names(store, [text])[:1]
    if platform is not None:  # one platform of a name stored for several
        entry = layout.for_platform(store, entry, platform)
    blobs = list(layout.image_blobs(store, entry))
    for d in blobs:
        if not store.has(d.digest):
            raise StoreError(f"{entry.name}: blob {d.digest.short} is missing; pull it again")
    desc = entry.manifest.to_json()
    desc.setdefault("annotations", {})[REF_NAME_ANNOTATION] = entry.name
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [desc],
    }
    index_bytes = json.dumps(index, indent=2).encode()
    oci_layout = b'{"imageLayoutVersion": "1.0.0"}'
    if dest.suffix == ".tar":
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        with tarfile.open(tmp, "w") as tar:
            for arcname, data in (("oci-layout", oci_layout), ("index.json", index_bytes)):
                info = tarfile.TarInfo(arcname)
                info.size = len(data)
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(data))
            for d in blobs:
                tar.add(store.blob_path(d.digest), f"blobs/{d.digest.algorithm}/{d.digest.hex}")
        os.replace(tmp, dest)
        return dest
    for d in blobs:
        target = dest / "blobs" / d.digest.algorithm / d.digest.hex
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(store.blob_path(d.digest), target)  # same filesystem: no copy
        except OSError:
            shutil.copyfile(store.blob_path(d.digest), target)
    atomic_write(dest / "oci-layout", oci_layout)
    atomic_write(dest / "index.json", index_bytes)
    return dest
