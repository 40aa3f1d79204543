"""What keeps a store healthy: images listing, rm, gc, fsck, export.

The layout is the catalog: every name and every URL the store holds is an index.json
entry (layout.py), so gc's roots, ``images`` and ``rm`` come from it; fetchd.db only adds
times and validators (meta.py) and can be lost or rebuilt. (A URL recorded only in the
database, by a fetchd before the catalog, is still a root, and gc or
``fsck --rebuild-db`` moves it into the layout.)

All of these are safe to run while pulls and a server use the store: they change
index.json only under its lock, and gc never deletes a blob that a name references
at the moment it looks, nor one that a live lease protects (a pull in progress, see
leases.py), nor an ingest that a live process holds. None of the read-only ones
(images, fsck of a sound store) needs to write, so they work on a full disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import sqlite3
import tarfile
import time
from collections.abc import Iterator, Set
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fetchd.errors import FetchdError, ImageNotInStore, StoreCorrupt, StoreError, UsageError
from fetchd.manifest import ImageIndex, parse_manifest
from fetchd.model import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_SIZE,
    REF_NAME_ANNOTATION,
    Descriptor,
    Digest,
    Platform,
    Reference,
)
from fetchd.store import layout
from fetchd.store.cas import Store, atomic_write
from fetchd.store.leases import Lease, live_digests
from fetchd.store.locks import locked, remove_locked_dir, try_locked
from fetchd.store.meta import Meta, UrlRecord

if TYPE_CHECKING:
    from fetchd.trust.keystore import Keystore

log = logging.getLogger(__name__)

STALE_INGEST_SECONDS = 24 * 3600
HASH_CHUNK = 4 * 1024 * 1024
#: unpredictable temporary names tried beside an exported file before giving up
MAX_TEMP_TRIES = 16


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


def _times(meta: Meta) -> dict[str, tuple[float, float]]:
    """The index's times, or none if it cannot be read (they only order LRU gc)."""
    try:
        return meta.times()
    except StoreError as exc:
        log.warning("%s", exc)
        return {}


def _db_urls(meta: Meta) -> dict[str, UrlRecord]:
    try:
        return {u.url: u for u in meta.urls()}
    except StoreError as exc:
        log.warning("%s", exc)
        return {}


def url_records(store: Store) -> dict[str, UrlRecord]:
    """Every URL the store holds: the layout's records, with the database's validators
    and times where it agrees (else none), and the URLs only the database knows (from a
    fetchd before the catalog)."""
    db = _db_urls(Meta(store.db_path))
    out = dict(db)
    for u in layout.url_entries(store):
        known = db.get(u.url)
        if known is not None and known.digest == str(u.blob.digest):
            continue
        out[u.url] = UrlRecord(u.url, str(u.blob.digest), u.blob.size, None, None, None, 0, 0)
    return out


def images(store: Store) -> list[ImageInfo]:
    times = _times(Meta(store.db_path))
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
    for u in url_records(store).values():
        pulled, used = (u.checked_at or None), (u.last_used or None)
        out.append(ImageInfo(u.url, u.digest, u.digest, u.size, pulled, used))
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
    known_urls = url_records(store)
    urls = [t for t in texts if t in known_urls]
    names = [t for t in texts if t not in known_urls]
    targets = {e.name for e in resolve_names(store, names)} if names else set()
    removed = layout.remove_entries(store, lambda e: e.name in targets)
    layout.remove_url_entries(store, urls)  # the layout first: it is the truth
    meta.forget([e.name for e in removed])
    meta.forget_urls(urls)
    return [e.name for e in removed] + urls


@dataclass
class GcReport:
    removed_blobs: int = 0
    freed_bytes: int = 0
    removed_ingests: int = 0
    evicted_images: list[str] | None = None
    #: what ``stage1 gc`` would remove in trees/ (None: trees/ cannot be read by us)
    trees: TreesReport | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "evicted": list(self.evicted_images or []),
            "removed_blobs": self.removed_blobs,
            "freed_bytes": self.freed_bytes,
            "removed_ingests": self.removed_ingests,
            "stage1_trees": self.trees.to_json() if self.trees else None,
        }


@dataclass(frozen=True, slots=True)
class TreesReport:
    """Rendered trees no index entry leads to (and partial renders of dead runs)."""

    count: int
    bytes: int

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "bytes": self.bytes}


def referenced(store: Store) -> set[Digest]:
    """Every blob a name uses: images in index.json, blobs pulled by URL, and the
    manifests a cache server holds (with what they reference)."""
    meta = Meta(store.db_path)
    keep: set[Digest] = {Digest.parse(u.digest) for u in url_records(store).values()}
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
    keep |= layout_roots(store)
    return keep


#: Blobs the root walk visits at most: a store past this is refused, not half-walked.
MAX_WALK = 1_000_000


def layout_roots(store: Store) -> set[Digest]:
    """Every blob an ``index.json`` entry leads to, named or not (an image another tool
    wrote, a URL record): the entries' descriptors, the blobs their annotations record
    (the registry's index, a Docker original), and everything a manifest or index among
    them lists, read leniently (any ``config``/``layers``/``manifests`` descriptor), each
    child on its own, so one unreadable platform costs no other platform anything.

    Fails closed: a manifest that is present but is not JSON raises StoreError, and gc
    then deletes nothing (``fetchd fsck`` quarantines a corrupt one; a missing manifest
    names nothing to keep)."""
    pending: list[tuple[Descriptor, bool]] = []
    for i, obj in enumerate(layout.read_index(store).get("manifests", [])):
        with contextlib.suppress(FetchdError):
            pending.append((Descriptor.from_json(obj, f"index.json manifests[{i}]"), True))
    keep: set[Digest] = set()
    while pending:
        desc, known = pending.pop()
        if desc.digest in keep:
            continue
        if len(keep) >= MAX_WALK:
            raise StoreError(f"{store.root}: more than {MAX_WALK} blobs referenced; gc refused")
        keep.add(desc.digest)
        for key in layout.RECORDED_ANNOTATIONS:  # the index, a Docker original, appc blobs
            text = desc.annotations.get(key)
            if text:
                with contextlib.suppress(FetchdError, ValueError):
                    recorded = Descriptor("application/octet-stream", Digest.parse(text), 0)
                    pending.append((recorded, False))  # a blob of unknown type: may be JSON
        typed = desc.media_type in MANIFEST_TYPES or desc.media_type in INDEX_TYPES
        if (known and not typed) or layout.URL_ANNOTATION in desc.annotations:
            continue  # a layer, a config or a URL blob: no children
        size = store.blob_size(desc.digest)
        if size is None or size > MAX_MANIFEST_SIZE:
            continue  # absent (nothing to name), or too big to be a manifest
        try:
            doc = json.loads(store.read_blob(desc.digest, MAX_MANIFEST_SIZE))
        except (ValueError, RecursionError) as exc:
            if not typed:
                continue  # a recorded blob that is not JSON: not a manifest
            raise StoreError(
                f"manifest {desc.digest} in {store.root} cannot be read ({exc}); gc removed "
                "nothing: run fetchd fsck"
            ) from None
        except OSError as exc:
            raise StoreError(f"cannot read {desc.digest} in {store.root}: {exc}") from exc
        if not isinstance(doc, dict):
            continue
        children = [doc.get("config")]
        for key in ("layers", "manifests", "blobs"):
            listed = doc.get(key)
            if isinstance(listed, list):
                children.extend(listed)
        for j, child in enumerate(children):
            if isinstance(child, dict):
                with contextlib.suppress(FetchdError):
                    pending.append((Descriptor.from_json(child, f"{desc.digest}[{j}]"), True))
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
    the same lock after checking its blobs are present (:func:`layout.set_platforms`), so
    no name can ever point at a blob deleted here. It holds the gc lock too, under
    which leases add digests (leases.py). Returns digest → bytes freed.

    The torrent rows (meta.py) of the blobs it deleted are forgotten afterwards, outside
    the locks. Either way a stray outcome costs nothing: a row that stays (the write
    failed) names a blob that is gone, and who seeds from the rows checks the blob first;
    a row dropped just after the same blob came back is built again from it. It stops
    no seeding: whoever seeds a blob unseeds it before it can be removed here.
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
    if freed:
        try:
            Meta(store.db_path).forget_torrents([str(d) for d in freed])
        except (FetchdError, OSError, sqlite3.Error) as exc:
            log.warning("kept the torrent rows of %d removed blobs: %s", len(freed), exc)
    return freed


def abandon(store: Store, lease: Lease) -> dict[Digest, int]:
    """A pull failed: release its lease, then delete the blobs it committed itself that
    no name and no other live lease uses (what others committed, or what was there
    before, stays). Partial ingests stay too, to be resumed."""
    lease.release()
    if not lease.committed:
        return {}
    try:
        return remove_unreferenced(store, set(lease.committed))
    except StoreError as exc:  # the pull's own error is the one to report
        log.warning("left the blobs a failed pull committed for a later gc: %s", exc)
        return {}


def record_url(store: Store, rec: UrlRecord, media_type: str = "application/octet-stream") -> None:
    """Name a blob pulled by URL: an index.json entry (checked under the lock gc deletes
    under, see set_url_entry), then its validators and times in the database."""
    blob = Descriptor(media_type, Digest.parse(rec.digest), rec.size)
    layout.set_url_entry(store, rec.url, blob)
    Meta(store.db_path).put_url(rec)


def _adopt_legacy_urls(store: Store) -> int:
    """URLs only the database records (a fetchd before the catalog): into the layout."""
    recorded = {u.url for u in layout.url_entries(store)}
    moved = 0
    for rec in _db_urls(Meta(store.db_path)).values():
        if rec.url in recorded:
            continue
        with contextlib.suppress(layout.BlobsMissing):
            blob = Descriptor("application/octet-stream", Digest.parse(rec.digest), rec.size)
            layout.set_url_entry(store, rec.url, blob)
            moved += 1
    return moved


def gc(
    store: Store, max_size: int | None = None, *, ingest_age: float = STALE_INGEST_SECONDS
) -> GcReport:
    """Delete unreferenced blobs and stale ingests; with ``max_size`` (bytes, above
    zero), evict least recently used images and URLs until the rest fit. Also says what
    ``stage1 gc`` would free in trees/ (which it leaves alone: stage1 owns it)."""
    if max_size is not None and max_size <= 0:
        raise UsageError("--max-size must be above zero")
    report = GcReport(evicted_images=[])
    meta = Meta(store.db_path)
    # A corrupt index is set aside and rebuilt (the layout is the truth); a store we may
    # not write, or a full disk, fails at the first delete instead, with its own error.
    with contextlib.suppress(FetchdError, OSError):
        meta.ensure()
    _adopt_legacy_urls(store)
    if max_size is not None:
        # Least recently used first: images and URLs alike (each row has its last use).
        by_age = sorted(images(store), key=lambda i: i.last_used or 0.0)
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
    report.trees = unreferenced_trees(store)
    return report


_TREE_PARTIAL = ".partial-"  # stage1/trees.py's prefix for a render in progress


def rendered_manifests(store: Store) -> set[str]:
    """The hex of every manifest an index.json entry leads to (through indexes): the
    trees stage1 gc keeps (stage1/layout.py referenced_manifests, same walk)."""
    pending: list[Descriptor] = []
    for i, obj in enumerate(layout.read_index(store).get("manifests", [])):
        with contextlib.suppress(FetchdError):
            pending.append(Descriptor.from_json(obj, f"index.json manifests[{i}]"))
    keep: set[str] = set()
    while pending:
        desc = pending.pop()
        if desc.digest.hex in keep or layout.URL_ANNOTATION in desc.annotations:
            continue
        keep.add(desc.digest.hex)
        if desc.media_type in MANIFEST_TYPES or desc.size > MAX_MANIFEST_SIZE:
            continue
        try:
            raw = json.loads(store.read_blob(desc.digest, MAX_MANIFEST_SIZE))
        except (OSError, ValueError, FetchdError, RecursionError):
            continue
        if isinstance(raw, dict) and (
            desc.media_type in INDEX_TYPES or isinstance(raw.get("manifests"), list)
        ):
            for j, child in enumerate(raw.get("manifests") or []):
                with contextlib.suppress(FetchdError):
                    pending.append(Descriptor.from_json(child, f"{desc.digest}[{j}]"))
    return keep


def unreferenced_trees(store: Store) -> TreesReport | None:
    """What ``stage1 gc`` would remove from trees/ and the disk space that frees (blocks
    used, hard links once). None when trees/ cannot be read (stage1 keeps it 0700, and
    another user may own it)."""
    trees = store.root / "trees"
    try:
        names = os.listdir(trees)
    except FileNotFoundError:
        return TreesReport(0, 0)
    except OSError:
        return None
    try:
        keep = rendered_manifests(store)
    except FetchdError:
        return None
    count = size = 0
    seen: set[tuple[int, int]] = set()
    for name in names:
        if name.startswith(_TREE_PARTIAL):
            pid = name.rpartition("-")[2]
            if pid.isascii() and pid.isdigit() and _alive(int(pid)):
                continue
        elif name in keep or not all(c in "0123456789abcdef" for c in name):
            continue
        try:
            size += sum(_usage(trees / name, seen))
        except OSError:
            return None
        count += 1
    return TreesReport(count, size)


def _usage(path: Path, seen: set[tuple[int, int]]) -> Iterator[int]:
    """Bytes on disk under ``path`` (not following symlinks), each inode once."""
    st = os.lstat(path)
    if (st.st_dev, st.st_ino) not in seen:
        seen.add((st.st_dev, st.st_ino))
        yield st.st_blocks * 512
    if not os.path.isdir(path) or os.path.islink(path):
        return
    with os.scandir(path) as it:
        for entry in it:
            if entry.is_dir(follow_symlinks=False):
                yield from _usage(Path(entry.path), seen)
                continue
            est = entry.stat(follow_symlinks=False)
            if (est.st_dev, est.st_ino) not in seen:
                seen.add((est.st_dev, est.st_ino))
                yield est.st_blocks * 512


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live_size(store: Store) -> int:
    keep = referenced(store)
    return sum(p.stat().st_size for d, p in store.iter_blobs() if d in keep)


@dataclass
class FsckReport:
    checked: int = 0
    corrupt: list[str] | None = None
    missing: list[str] | None = None
    #: appc images whose stored signature no longer verifies with the keys trusted now
    signatures: list[str] | None = None
    #: with --rebuild-db: (names, URLs) the database lacked and now indexes
    rebuilt_db: tuple[int, int] | None = None
    #: with --rebuild-db: URLs only the database knew, now recorded in the layout
    adopted_urls: int = 0

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing and not self.signatures

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "corrupt": list(self.corrupt or []),
            "missing": list(self.missing or []),
            "signatures": list(self.signatures or []),
            "rebuilt_db": (
                {"names_added": self.rebuilt_db[0], "urls_added": self.rebuilt_db[1]}
                if self.rebuilt_db is not None
                else None
            ),
            "adopted_urls": self.adopted_urls,
        }


def fsck(store: Store, *, rebuild_db: bool = False, trust_dir: Path | None = None) -> FsckReport:
    """Re-hash every blob; move mismatches to quarantine/; report names and URLs missing
    blobs; re-verify every stored ACI signature with the keys trusted now (the keystore
    of ``trust_dir``, Keystore.default) and report those that no longer verify (the bytes
    are intact: nothing is moved). With ``rebuild_db``, make fetchd.db agree with the
    layout (a corrupt one is set aside as fetchd.db.corrupt and made anew)."""
    report = FsckReport(corrupt=[], missing=[], signatures=[])
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
    for u in layout.url_entries(store):
        if not store.has(u.blob.digest):
            report.missing.append(f"{u.url}: {u.blob.digest}")
    report.signatures = _appc_signatures(store, trust_dir)
    if rebuild_db:
        report.adopted_urls = _adopt_legacy_urls(store)
        report.rebuilt_db = Meta(store.db_path).rebuild()
    return report


# --- appc images: are their signers still trusted? ----------------------------------------

#: the largest stored detached signature read back (as the pull reads them)
MAX_APPC_SIGNATURE = 64 << 10


def appc_layers(store: Store, entry: layout.Entry) -> list[Descriptor]:
    """The ACI layers of an appc entry, each with its ``io.fetchd.appc.*`` annotations
    (StoreError if its manifest cannot be read)."""
    blobs = layout.image_blobs(store, entry)
    next(blobs)  # the entry's own manifest (it carries the top ACI's annotations too)
    return [d for d in blobs if layout.APPC_NAME_ANNOTATION in d.annotations]


def appc_trust_problem(
    store: Store, entry: layout.Entry, keystore: Keystore, now: float
) -> str | None:
    """Why the stored appc image ``entry`` may not answer a verified pull now, or None:
    every ACI of it must have been verified when pulled (its signer annotation) by a key
    still trusted for that ACI's name, which the key policy accepts now (the (sub)key its
    stored signature names included). Cheap: no signature is re-verified (fsck does)."""
    from fetchd.trust.openpgp import display_fingerprint, policy_problem, signature_info

    try:
        layers = appc_layers(store, entry)
    except StoreError as exc:
        return str(exc)
    if not layers:
        return "it holds no ACI"
    for layer in layers:
        ann = layer.annotations
        name = ann[layout.APPC_NAME_ANNOTATION]
        signer = ann.get(layout.APPC_SIGNER_ANNOTATION)
        sig_text = ann.get(layout.APPC_SIGNATURE_ANNOTATION)
        if not signer or not sig_text:
            return f"{name} was stored without a signature check (--insecure-options image)"
        try:
            keys = keystore.keys_for(name)
            sig = store.read_blob(Digest.parse(sig_text), MAX_APPC_SIGNATURE)
            hinted = signature_info(sig, f"the stored signature of {name}").issuer_fingerprint
        except (OSError, FetchdError) as exc:
            return f"{name}: {exc}"
        key = next(
            (k.info for k in keys if signer == k.info.fingerprint or signer in k.info.signing_keys),
            None,
        )
        if key is None:
            return f"its signer {display_fingerprint(signer)} is no longer trusted for {name}"
        problem = policy_problem(key, now, signer=hinted)
        if problem:
            return f"its signer {key.describe()} is refused now: {problem}"
    return None


def _appc_signatures(store: Store, trust_dir: Path | None) -> list[str]:
    """fsck's signature pass: each ACI layer's stored signature over its stored blob, with
    the keys trusted now for its name (a child process per signature, as the pull)."""
    import asyncio

    from fetchd.trust.keystore import Keystore

    todo: dict[tuple[Digest, Digest, str], list[str]] = {}
    for a in layout.appc_entries(store):
        try:
            layers = appc_layers(store, a.entry)
        except StoreError:
            continue  # reported as missing
        for layer in layers:
            text = layer.annotations.get(layout.APPC_SIGNATURE_ANNOTATION)
            if not text:
                continue  # pulled with --insecure-options image: nothing to re-check
            try:
                sig = Digest.parse(text)
            except FetchdError:
                continue
            if not store.has(sig) or not store.has(layer.digest):
                continue  # missing or quarantined: reported above
            name = layer.annotations[layout.APPC_NAME_ANNOTATION]
            todo.setdefault((layer.digest, sig, name), []).append(a.entry.name)
    if not todo:
        return []
    keystore = Keystore.default(trust_dir)
    return asyncio.run(_verify_appc(store, keystore, todo))


async def _verify_appc(
    store: Store, keystore: Keystore, todo: dict[tuple[Digest, Digest, str], list[str]]
) -> list[str]:
    from fetchd.trust.openpgp import verify_detached

    problems: list[str] = []
    for (aci, sig_digest, name), entries in todo.items():
        what = f"the signature of {name}"
        try:
            sig = store.read_blob(sig_digest, MAX_APPC_SIGNATURE)
            keys = keystore.keys_for(name)
            await verify_detached(sig, store.blob_path(aci), [k.info for k in keys], what)
        except (OSError, FetchdError) as exc:
            detail = str(exc).removeprefix(f"{what}: ")
            detail = f"it{detail.removeprefix(what)}" if detail.startswith(what) else detail
            for entry in entries:
                problems.append(
                    f"{entry}: the signature of {name} ({aci.short}) no longer verifies: {detail}"
                )
    return problems


@dataclass(frozen=True, slots=True)
class ExportResult:
    dest: Path
    name: str
    #: what the registry reported for the name (the index of a multi-arch image)
    digest: str
    manifest: str
    blobs: int
    bytes: int
    #: the destination already held this name, and now holds the exported image instead
    replaced: bool
    #: the other names the destination holds (kept)
    kept: tuple[str, ...]
    #: the detached signature written beside a .aci (None: none, or not an ACI export)
    signature: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "dest": str(self.dest),
            "name": self.name,
            "digest": self.digest,
            "manifest": self.manifest,
            "blobs": self.blobs,
            "bytes": self.bytes,
            "replaced": self.replaced,
            "kept": list(self.kept),
            **({"signature": str(self.signature)} if self.signature else {}),
        }


def export(store: Store, text: str, dest: Path, platform: Platform | None = None) -> ExportResult:
    """Write the image as an OCI layout directory, or a tar of one if ``dest`` ends .tar,
    or, for an appc image and a ``dest`` ending .aci, the ACI and its signature.

    Into a directory that already is an OCI layout, the image is added, as skopeo copy
    adds to an ``oci:`` layout: an entry with the same name is replaced, every other
    entry is kept. The blobs go in first, then index.json by one atomic rename, under an
    flock on the directory (so two exports into it do not lose each other's names); a
    crash leaves the layout as it was plus some unreferenced blobs.

    ``DEST.aci``: the image's own ACI exactly as it was fetched and signed, and its
    detached signature as ``DEST.aci.asc`` (what ``actool validate`` and ``sqv`` take);
    its dependencies are not written (rkt's ``image export``). ``text`` may be an appc
    name with labels (``example.com/app,version=1.0``), found as ``stage1 run`` finds it.
    """
    entry = _resolve_export(store, text)
    if platform is not None:  # one platform of a name stored for several
        entry = layout.for_platform(store, entry, platform)
    if dest.suffix == ".aci":
        return _export_aci(store, entry, dest)
    blobs = list({d.digest: d for d in layout.image_blobs(store, entry)}.values())
    for d in blobs:
        if not store.has(d.digest):
            raise StoreError(f"{entry.name}: blob {d.digest.short} is missing; pull it again")
    desc = entry.manifest.to_json()
    desc.setdefault("annotations", {})[REF_NAME_ANNOTATION] = entry.name
    size = sum(store.blob_size(d.digest) or 0 for d in blobs)
    try:
        if dest.suffix == ".tar":
            _export_tar(store, dest, desc, blobs)
            kept: tuple[str, ...] = ()
            replaced = False
        else:
            replaced, kept = _export_dir(store, dest, entry.name, desc, blobs)
    except OSError as exc:
        raise StoreError(
            f"cannot export to {dest}: {exc.strerror or exc}; give a directory you can write"
        ) from exc
    return ExportResult(
        dest,
        entry.name,
        str(entry.top_digest),
        str(entry.manifest.digest),
        len(blobs),
        size,
        replaced,
        kept,
    )


def _resolve_export(store: Store, text: str) -> layout.Entry:
    """The entry ``text`` names: as ``rm`` finds names, else as an appc name and labels
    by the rules ``stage1 run`` follows (stage1/appc.py, rkt's GetACI): every label asked
    for equal, this machine's os and arch unless given (an image without an os or arch
    label matches any), with no version asked for the one pulled as latest, else the newest
    (the later in index.json)."""
    try:
        return resolve_names(store, [text])[0]
    except ImageNotInStore:
        if "://" in text or not layout.appc_entries(store):
            raise
    from fetchd.appc.names import AppName

    try:
        app = AppName.parse(text)
        defaults = {k: v for k, v in app.with_host_defaults().labels if app.label(k) is None}
    except FetchdError:
        raise ImageNotInStore(f"{text!r} is not in the store; see fetchd images") from None
    wanted = dict(app.labels)
    hits = [
        a
        for a in layout.appc_entries(store)
        if a.name == app.name
        and all(a.labels.get(k) == v for k, v in wanted.items())
        and all(a.labels.get(k, v) == v for k, v in defaults.items())
    ]
    if not hits:
        raise ImageNotInStore(f"{text!r} is not in the store; see fetchd images")
    if "version" not in wanted:
        latest = [
            a
            for a in hits
            if a.entry.name == f"{app.name}:latest" or a.labels.get("version") == "latest"
        ]
        if latest:
            return max(latest, key=hits.index).entry
    return hits[-1].entry


def _export_aci(store: Store, entry: layout.Entry, dest: Path) -> ExportResult:
    """Write the entry's ACI (its last layer) to ``dest`` and its signature beside it, each
    by an atomic rename after its bytes were checked against their digest."""
    if layout.APPC_NAME_ANNOTATION not in entry.manifest.annotations:
        raise UsageError(
            f"{entry.name} is not an appc image: only an ACI exports to a .aci file; "
            "give a directory (an OCI layout) or a .tar"
        )
    manifest = parse_manifest(
        _read_blob(store, entry.manifest, MAX_MANIFEST_SIZE),
        entry.manifest.media_type or None,
        f"{entry.name} ({entry.manifest.digest.short})",
    )
    if isinstance(manifest, ImageIndex) or not manifest.layers:
        raise StoreError(f"{entry.name}: its manifest holds no ACI; pull it again")
    aci = manifest.layers[-1]
    sig_text = aci.annotations.get(layout.APPC_SIGNATURE_ANNOTATION) or (
        entry.manifest.annotations.get(layout.APPC_SIGNATURE_ANNOTATION)
    )
    blobs = [aci.digest]
    if sig_text:
        blobs.append(Digest.parse(sig_text))
    asc = dest.with_name(dest.name + ".asc")
    replaced = dest.exists()
    size = 0
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        for digest, target in zip(blobs, (dest, asc), strict=False):
            size += _copy_checked(store, digest, target, entry.name)
        if not sig_text:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(asc)  # a signature of another ACI must not sit beside this one
            log.warning(
                "warning: %s was pulled without a signature (--insecure-options image): "
                "only %s is written",
                entry.name,
                dest,
            )
    except OSError as exc:
        raise StoreError(
            f"cannot export to {dest}: {exc.strerror or exc}; give a path you can write"
        ) from exc
    return ExportResult(
        dest,
        entry.name,
        str(entry.top_digest),
        str(entry.manifest.digest),
        len(blobs),
        size,
        replaced,
        (),
        asc if sig_text else None,
    )


def _read_blob(store: Store, desc: Descriptor, limit: int) -> bytes:
    if desc.size > limit:
        raise StoreError(f"blob {desc.digest.short} is larger than {limit} bytes")
    try:
        data = store.blob_path(desc.digest).read_bytes()
    except FileNotFoundError:
        raise StoreError(f"blob {desc.digest.short} is missing; pull the image again") from None
    if Digest.of(data) != desc.digest:
        raise StoreCorrupt(f"blob {desc.digest.short} is corrupt; run: fetchd fsck")
    return data


def _new_temporary(target: Path) -> tuple[Path, int]:
    """A new file beside ``target`` with an unpredictable name, created by this call
    (O_EXCL|O_NOFOLLOW: never a file or symlink someone planted there), mode 0666 less
    the umask as open() would give. Returns its path and a write descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(MAX_TEMP_TRIES):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
    raise StoreError(
        f"cannot create a temporary file beside {target}: {MAX_TEMP_TRIES} names were taken"
    )


def _copy_checked(store: Store, digest: Digest, target: Path, name: str) -> int:
    """Copy the blob to ``target`` (through a new temporary file of an unpredictable
    name, fsynced, renamed), hashing it as it goes; a blob whose bytes do not match its
    digest is not written. Returns its size."""
    h = hashlib.new(digest.algorithm)
    size = 0
    try:
        source = open(store.blob_path(digest), "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        raise StoreError(f"{name}: blob {digest.short} is missing; pull it again") from None
    with source:
        tmp, fd = _new_temporary(target)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(HASH_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if h.hexdigest() != digest.hex:
                raise StoreCorrupt(f"{name}: blob {digest.short} is corrupt; run: fetchd fsck")
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    _fsync(target.parent)
    return size


_OCI_LAYOUT = b'{"imageLayoutVersion": "1.0.0"}'


def _index_doc(manifests: list[Any]) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }


def _export_tar(store: Store, dest: Path, desc: dict[str, Any], blobs: list[Descriptor]) -> None:
    index_bytes = json.dumps(_index_doc([desc]), indent=2).encode()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with tarfile.open(tmp, "w") as tar:
            for arcname, data in (("oci-layout", _OCI_LAYOUT), ("index.json", index_bytes)):
                info = tarfile.TarInfo(arcname)
                info.size = len(data)
                info.mtime = int(time.time())
                tar.addfile(info, io.BytesIO(data))
            for d in blobs:
                tar.add(store.blob_path(d.digest), f"blobs/{d.digest.algorithm}/{d.digest.hex}")
        _fsync(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _export_dir(
    store: Store, dest: Path, name: str, desc: dict[str, Any], blobs: list[Descriptor]
) -> tuple[bool, tuple[str, ...]]:
    """Add the image to the layout at ``dest``; (replaced, other names kept)."""
    dest.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        doc = _existing_index(dest)
        manifests = doc.get("manifests", [])
        others = [m for m in manifests if _ref_name(m) != name]
        replaced = len(others) != len(manifests)
        for d in blobs:
            target = dest / "blobs" / d.digest.algorithm / d.digest.hex
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(store.blob_path(d.digest), target)  # same filesystem: no copy
            except FileExistsError:
                continue
            except OSError:
                tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                shutil.copyfile(store.blob_path(d.digest), tmp)
                _fsync(tmp)  # on disk before index.json names it
                os.replace(tmp, target)
        if not (dest / "oci-layout").exists():
            atomic_write(dest / "oci-layout", _OCI_LAYOUT)
        doc["manifests"] = [*others, desc]
        atomic_write(dest / "index.json", json.dumps(doc, indent=2).encode())
    finally:
        os.close(fd)
    kept = tuple(n for n in (_ref_name(m) for m in others) if n)
    return replaced, kept


def _existing_index(dest: Path) -> dict[str, Any]:
    """The index.json at ``dest`` (a new one if there is none); a layout fetchd cannot
    read is refused, so nothing already there is ever dropped."""
    layout_file = dest / "oci-layout"
    index_file = dest / "index.json"
    try:
        version = json.loads(layout_file.read_bytes()).get("imageLayoutVersion")
    except FileNotFoundError:
        version = "1.0.0"
    except (ValueError, AttributeError) as exc:
        raise StoreError(f"{layout_file} is not an OCI layout file; export elsewhere") from exc
    if not isinstance(version, str) or not version.startswith("1."):
        raise StoreError(f"{dest} is an OCI layout of version {version!r}; export elsewhere")
    try:
        doc = json.loads(index_file.read_bytes())
    except FileNotFoundError:
        return _index_doc([])
    except ValueError as exc:
        raise StoreError(
            f"{index_file} is not valid JSON ({exc}); export elsewhere or remove it"
        ) from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests", []), list):
        raise StoreError(f"{index_file} is not an OCI image index; export elsewhere or remove it")
    return doc


def _ref_name(obj: Any) -> str | None:
    if isinstance(obj, dict) and isinstance(obj.get("annotations"), dict):
        name = obj["annotations"].get(REF_NAME_ANNOTATION)
        return name if isinstance(name, str) else None
    return None
