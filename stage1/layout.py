"""Reading the store's OCI image layout (``$STORE/layout``), verifying every blob as it is read.

stage1 never writes here; fetchd commits blobs and rewrites index.json atomically, so a
reader sees either the old or the new index and only blobs that were verified once. stage1
verifies them again as it reads: every JSON blob in full before it is parsed, every layer
as it streams (``VerifiedReader``), so a corrupted store is reported, never run.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator
from typing import IO, Any

from stage1 import appc, platforms
from stage1.errors import DigestMismatch, Stage1Error
from stage1.model import Descriptor, Digest, Image, ImageConfig, Reference

REF_NAME = "org.opencontainers.image.ref.name"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
_INDEXES = (OCI_INDEX, DOCKER_LIST)
_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)

_MAX_JSON = 16 << 20  # manifests and configs are small; refuse to load a huge "JSON" blob
_CHUNK = 1 << 20


def default_store() -> str:
    """--store is handled by the CLI; this is $FETCHD_STORE, else the per-user default."""
    env = os.environ.get("FETCHD_STORE")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/fetchd"
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return os.path.join(data, "fetchd")


class VerifiedReader(io.RawIOBase):
    """A file read front to back; at EOF its size and digest must match the descriptor.

    Reading raises DigestMismatch at EOF on a mismatch, or as soon as more bytes than the
    descriptor's size arrive. ``drain`` reads what is left and verifies. Not thread-safe.
    """

    def __init__(self, file: IO[bytes], desc: Descriptor, what: str) -> None:
        super().__init__()
        self._file = file
        self._desc = desc
        self._what = what
        self._hash = hashlib.new(desc.digest.algorithm)
        self._count = 0
        self.verified = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.chunk(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def chunk(self, size: int) -> bytes:
        """Up to SIZE bytes; b"" at the end, once the blob is verified."""
        if self.verified:
            return b""
        data = self._file.read(min(size, self._desc.size - self._count + 1))
        if data:
            self._count += len(data)
            if self._count > self._desc.size:
                raise self._mismatch(f"it is larger than its size {self._desc.size}")
            self._hash.update(data)
            return data
        if self._count != self._desc.size:
            raise self._mismatch(f"it has {self._count} bytes, not {self._desc.size}")
        if self._hash.hexdigest() != self._desc.digest.hex:
            raise self._mismatch("its bytes hash to a different digest")
        self.verified = True
        return b""

    def drain(self) -> None:
        while self.chunk(_CHUNK):
            pass

    def _mismatch(self, why: str) -> DigestMismatch:
        return DigestMismatch(
            f"{self._what} {self._desc.digest} is corrupt ({why}); run: fetchd fsck"
        )


class Layout:
    """The OCI image layout at ``STORE/layout``, read-only."""

    def __init__(self, store: str) -> None:
        self.store = store
        self.path = os.path.join(store, "layout")

    def blob_path(self, digest: Digest) -> str:
        return os.path.join(self.path, "blobs", digest.algorithm, digest.hex)

    def open_blob(self, desc: Descriptor, ref: str) -> IO[bytes]:
        """Open a blob for reading (not yet verified: wrap it in a VerifiedReader)."""
        try:
            return open(self.blob_path(desc.digest), "rb")  # the caller closes it
        except FileNotFoundError:
            raise Stage1Error(
                f"blob {desc.digest} of {ref} is missing from the store at {self.store}; "
                f"run: {pull_hint(ref)}"
            ) from None
        except OSError as exc:
            raise Stage1Error(f"cannot read blob {desc.digest}: {exc.strerror}") from exc

    def read_json(self, desc: Descriptor, ref: str, what: str) -> Any:
        if desc.size > _MAX_JSON:
            raise Stage1Error(f"{what} {desc.digest} of {ref} is too large ({desc.size} bytes)")
        with self.open_blob(desc, ref) as file:
            reader = VerifiedReader(file, desc, what)
            data = b"".join(iter(lambda: reader.chunk(_CHUNK), b""))
        try:
            return json.loads(data)
        except RecursionError:
            raise Stage1Error(
                f"image {ref} cannot be run: its {what} {desc.digest} is JSON nested too "
                f"deeply; it needs a corrected image (remove it with: fetchd rm {ref})"
            ) from None
        except ValueError as exc:
            raise Stage1Error(f"{what} {desc.digest} of {ref} is not valid JSON: {exc}") from exc

    def index(self) -> list[Descriptor]:
        """The entries of index.json; an absent layout is an empty one."""
        path = os.path.join(self.path, "index.json")
        try:
            with open(path, "rb") as file:
                raw = json.load(file)
            manifests = raw.get("manifests") or []
        except FileNotFoundError:
            return []
        except RecursionError:
            raise Stage1Error(f"cannot read {path}: JSON nested too deeply") from None
        except (OSError, ValueError, AttributeError) as exc:
            raise Stage1Error(f"cannot read {path}: {exc}") from exc
        if not isinstance(manifests, list):
            raise Stage1Error(f"cannot read {path}: manifests is not a list")
        return [Descriptor.parse(m, path) for m in manifests]

    def find(self, ref: Reference) -> Descriptor:
        """The index entry (or, for a digest, the blob) that REF names.

        An appc name with labels (``example.com/hello,version=1.0.0``) is looked up by its
        appc annotations (stage1.appc); any other name by its ref.name first, then, if
        none has it and it could be appc's ``NAME[:VERSION]``, by the appc annotations.
        """
        entries = self.index()
        if appc.looks_appc(ref.text):
            return self._find_appc(entries, appc.AppcName.parse(ref.text))
        names = ref.candidates()
        for name in names:
            # The newest entry wins if a name was ever recorded twice.
            for entry in reversed(entries):
                if entry.annotation(REF_NAME) == name:
                    return entry
        if ref.digest is not None:
            for entry in reversed(entries):
                if entry.digest == ref.digest:
                    return entry
            if os.path.exists(self.blob_path(ref.digest)):
                # A manifest by digest: content-addressed, so no index entry is needed.
                return Descriptor("", ref.digest, os.stat(self.blob_path(ref.digest)).st_size)
        app = _appc_name(ref)
        if app is not None and any(e.annotation(appc.NAME_ANNOTATION) for e in entries):
            choice = appc.choose(entries, app)
            if choice.entry is not None:
                return choice.entry
        raise Stage1Error(
            f"image {ref.text} is not in the store at {self.store}; run: {ref.pull_hint()}"
        )

    def _find_appc(self, entries: list[Descriptor], app: appc.AppcName) -> Descriptor:
        choice = appc.choose(entries, app)
        if choice.entry is not None:
            return choice.entry
        held = ""
        if choice.others:
            shown = "; ".join(choice.others[:4]) + ("; …" if len(choice.others) > 4 else "")
            held = f" (it holds {shown})"
        raise Stage1Error(
            f"image {app.text} is not in the store at {self.store}{held}; run: {app.pull_hint()}"
        )

    def image(self, ref: Reference) -> Image:
        """Resolve REF to the manifest for this machine, its layers and its config.

        Only this machine's platform runs (or one it also runs, as containerd decides):
        any other is one error naming the platforms the store holds for REF.
        """
        desc = self.find(ref)
        for _ in range(4):  # an index may (rarely) point at another index
            raw = self.read_json(desc, ref.text, "manifest")
            if not isinstance(raw, dict):
                raise Stage1Error(f"manifest {desc.digest} of {ref.text} is not a JSON object")
            kind = desc.media_type or str(raw.get("mediaType") or "")
            if kind in _INDEXES or (kind not in _MANIFESTS and "manifests" in raw):
                desc = _choose_platform(raw, desc, ref)
                continue
            if kind and kind not in _MANIFESTS:
                raise Stage1Error(f"{ref.text}: unsupported manifest media type {kind}")
            return self._image_from_manifest(raw, desc, ref)
        raise Stage1Error(f"{ref.text}: image indexes nested too deeply")

    def _image_from_manifest(self, raw: dict[str, Any], desc: Descriptor, ref: Reference) -> Image:
        where = f"manifest {desc.digest}"
        layers_raw = raw.get("layers")
        if not isinstance(layers_raw, list) or "config" not in raw:
            raise Stage1Error(f"{where} of {ref.text} has no config or layers")
        config_desc = Descriptor.parse(raw["config"], where)
        layers = tuple(Descriptor.parse(layer, where) for layer in layers_raw)
        config_raw = self.read_json(config_desc, ref.text, "config")
        plat = _platform_of(desc.platform) or _platform_of(_config_platform(config_raw))
        if plat is not None and plat not in platforms.accepted(platforms.host()):
            raise _not_for_host(ref, [plat])
        config = ImageConfig.parse(config_raw, where)
        return Image(ref=ref.text, manifest=desc.digest, layers=layers, config=config)

    def referenced_manifests(self) -> Iterator[Digest]:
        """Every manifest digest an index entry leads to (all platforms of an index)."""
        pending = self.index()
        seen: set[Digest] = set()
        while pending:
            desc = pending.pop()
            if desc.digest in seen:
                continue
            seen.add(desc.digest)
            yield desc.digest
            if desc.media_type in _MANIFESTS:
                continue
            try:
                raw = self.read_json(desc, str(desc.digest), "manifest")
            except Stage1Error:
                continue  # a missing or corrupt blob leads nowhere; fetchd fsck reports it
            if isinstance(raw, dict) and isinstance(raw.get("manifests"), list):
                pending.extend(Descriptor.parse(m, str(desc.digest)) for m in raw["manifests"])


def _appc_name(ref: Reference) -> appc.AppcName | None:
    """REF read as appc's ``NAME[:VERSION]`` (typed without docker:// and without a digest)."""
    if "://" in ref.text or ref.digest is not None:
        return None
    try:
        return appc.AppcName.parse(ref.text)
    except Stage1Error:
        return None


def pull_hint(ref: str) -> str:
    """``fetchd pull docker://NAME`` for what the user typed as REF (fetchd's form)."""
    if appc.looks_appc(ref):
        return f"fetchd pull {ref}"
    try:
        return Reference.parse(ref).pull_hint()
    except Stage1Error:
        return f"fetchd pull {ref}"


def _platform_of(plat: tuple[str, str, str] | None) -> platforms.Platform | None:
    """A descriptor's (os, architecture, variant), normalised; None without os or arch."""
    if plat is None or not plat[0] or not plat[1]:
        return None
    return platforms.normalize(*plat)


def _config_platform(config: Any) -> tuple[str, str, str] | None:
    """What an image config says it is for (its os, architecture and variant)."""
    if not isinstance(config, dict):
        return None

    def field(key: str) -> str:
        value = config.get(key)
        return value if isinstance(value, str) else ""

    return field("os"), field("architecture"), field("variant")


def _not_for_host(ref: Reference, stored: list[platforms.Platform]) -> Stage1Error:
    listed = ", ".join(platforms.text(p) for p in stored) or "no platform"
    return Stage1Error(
        f"image {ref.text} is in the store for {listed}, not for this machine "
        f"({platforms.text(platforms.host())}); run: {pull_hint(ref.text)}"
    )


def _choose_platform(raw: dict[str, Any], desc: Descriptor, ref: Reference) -> Descriptor:
    """The manifest of the index RAW that suits this machine best (containerd's ``Only``:
    the first of equals, in the index's order)."""
    manifests = raw.get("manifests")
    if not isinstance(manifests, list):
        raise Stage1Error(f"image index {desc.digest} of {ref.text} has no manifests")
    candidates = [Descriptor.parse(m, f"image index {desc.digest}") for m in manifests]
    accepted = platforms.accepted(platforms.host())
    best: tuple[int, Descriptor] | None = None
    stored = []
    for m in candidates:
        plat = _platform_of(m.platform)
        if plat is None or (m.media_type and m.media_type not in _MANIFESTS):
            continue
        stored.append(plat)
        rank = accepted.index(plat) if plat in accepted else None
        if rank is not None and (best is None or rank < best[0]):
            best = (rank, m)
    if best is None:
        raise _not_for_host(ref, sorted(set(stored)))
    return best[1]
