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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from fetchd.errors import ManifestInvalid, StoreError
from fetchd.manifest import ImageIndex, parse_manifest
from fetchd.model import MAX_MANIFEST_SIZE, REF_NAME_ANNOTATION, Descriptor, Digest
from fetchd.store.cas import Store, atomic_write
from fetchd.store.diskfull import writing
from fetchd.store.locks import locked

INDEX_DIGEST_ANNOTATION = "io.fetchd.index.digest"
SOURCE_DIGEST_ANNOTATION = "io.fetchd.source.digest"


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


def set_entry(
    store: Store, name: str, manifest: Descriptor, required: Iterable[Digest] = ()
) -> None:
    """Point ``name`` at ``manifest`` (replacing what it named before).

    ``required`` (the image's blobs) are checked under the index lock, the lock gc
    deletes under: :class:`BlobsMissing` if any is gone, and nothing is written.
    """
    obj = manifest.to_json()
    obj.setdefault("annotations", {})[REF_NAME_ANNOTATION] = name
    needed = [manifest.digest, *required]

    def check() -> None:
        missing = [d for d in needed if not store.has(d)]
        if missing:
            raise BlobsMissing(name, missing)

    _update(store, lambda ms: [m for m in ms if _name_of(m) != name] + [obj], check)


def remove_entries(store: Store, match: Callable[[Entry], bool]) -> list[Entry]:
    """Forget every name ``match`` selects; returns what was removed."""
    removed = [e for e in entries(store) if match(e)]
    names = {e.name for e in removed}
    if names:
        _update(store, lambda ms: [m for m in ms if _name_of(m) not in names])
    return removed


def image_blobs(store: Store, entry: Entry) -> Iterator[Descriptor]:
    """Every blob the entry needs: its manifest, config and layers (and its index).

    Raises :class:`StoreError` if the manifest itself is missing or unreadable.
    """
    yield entry.manifest
    for key in (INDEX_DIGEST_ANNOTATION, SOURCE_DIGEST_ANNOTATION):
        text = entry.manifest.annotations.get(key)
        if text:
            digest = Digest.parse(text)
            yield Descriptor("application/octet-stream", digest, store.blob_size(digest) or 0)
    try:
        raw = store.read_blob(entry.manifest.digest, MAX_MANIFEST_SIZE)
        manifest = parse_manifest(raw, entry.manifest.media_type, f"{entry.name}")
    except (OSError, ManifestInvalid) as exc:
        raise StoreError(f"{entry.name}: its manifest cannot be read: {exc}") from exc
    if isinstance(manifest, ImageIndex):
        yield from manifest.manifests  # a foreign entry naming an index: its children
    else:
        yield from manifest.blobs()
