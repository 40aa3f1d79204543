"""Test images without Docker: OCI image layouts written in Python, pushed with skopeo.

Layers are streamed tar -> compressor -> blob file with both digests computed on the way,
so a 256 MiB layer is never held in memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import ssl
import subprocess
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, cast

import zstandard

Compression = Literal["gzip", "zstd", "none"]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
LAYER_MEDIA_TYPES: dict[Compression, str] = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}
REF_NAME = "org.opencontainers.image.ref.name"
MTIME = 1_700_000_000  # fixed, so that a layer spec always gives the same digest
SKOPEO_TIMEOUT = 300.0


# --- layer specs ------------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """File content produced on demand: `open()` returns a reader of exactly `size` bytes."""

    size: int
    open: Callable[[], BinaryIO]


@dataclass(frozen=True)
class File:
    path: str
    data: bytes | Stream = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Dir:
    path: str
    mode: int = 0o755


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str


@dataclass(frozen=True)
class Hardlink:
    path: str
    target: str


@dataclass(frozen=True)
class Raw:
    """A tar member exactly as given, for hostile layers (../ paths, devices, bad sizes)."""

    info: tarfile.TarInfo
    data: bytes = b""


Entry = File | Dir | Symlink | Hardlink | Raw


@dataclass(frozen=True)
class Layer:
    entries: Sequence[Entry]
    compression: Compression = "gzip"


# --- what was built -----------------------------------------------------------------------


@dataclass(frozen=True)
class Blob:
    """A descriptor of a blob in the layout."""

    digest: str
    size: int
    media_type: str

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class BuiltLayer(Blob):
    diff_id: str  # digest of the uncompressed tar


@dataclass(frozen=True)
class BuiltImage:
    manifest: Blob
    config: Blob
    layers: tuple[BuiltLayer, ...]

    @property
    def digest(self) -> str:
        return self.manifest.digest


# --- writing the layout -------------------------------------------------------------------


class _Writer(Protocol):
    def write(self, data: bytes, /) -> int: ...

    def close(self) -> None: ...


class _Digester:
    """Counts and hashes what passes through to `inner`; close() leaves `inner` open."""

    def __init__(self, inner: _Writer | BinaryIO) -> None:
        self.inner = inner
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        self.inner.write(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def digest(self) -> str:
        return f"sha256:{self.hash.hexdigest()}"


def _blobs_dir(layout: Path) -> Path:
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    oci_layout = layout / "oci-layout"
    if not oci_layout.exists():
        oci_layout.write_text('{"imageLayoutVersion":"1.0.0"}')
    return blobs


def _write_json_blob(layout: Path, obj: dict[str, Any], media_type: str) -> Blob:
    data = json.dumps(obj, separators=(",", ":")).encode()
    hexdigest = hashlib.sha256(data).hexdigest()
    (_blobs_dir(layout) / hexdigest).write_bytes(data)
    return Blob(f"sha256:{hexdigest}", len(data), media_type)


def _tar_member(tar: tarfile.TarFile, entry: Entry) -> None:
    if isinstance(entry, Raw):
        tar.addfile(entry.info, io.BytesIO(entry.data) if entry.info.isreg() else None)
        return
    info = tarfile.TarInfo(entry.path.lstrip("/"))
    info.mtime = MTIME
    if isinstance(entry, File):
        info.mode, info.uid, info.gid = entry.mode, entry.uid, entry.gid
        if isinstance(entry.data, Stream):
            info.size = entry.data.size
            with entry.data.open() as reader:
                tar.addfile(info, reader)
        else:
            info.size = len(entry.data)
            tar.addfile(info, io.BytesIO(entry.data))
        return
    if isinstance(entry, Dir):
        info.type, info.mode = tarfile.DIRTYPE, entry.mode
    elif isinstance(entry, Symlink):
        info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, entry.target
    else:
        info.type, info.mode, info.linkname = tarfile.LNKTYPE, 0o644, entry.target.lstrip("/")
    tar.addfile(info)


def _compressor(compression: Compression, out: BinaryIO) -> _Writer:
    if compression == "gzip":
        # Level 1: test layers are large and random; the ratio does not matter.
        return gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1, mtime=0)
    if compression == "zstd":
        writer: _Writer = zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
        return writer
    return out


def _write_layer(layout: Path, layer: Layer) -> BuiltLayer:
    blobs = _blobs_dir(layout)
    with tempfile.NamedTemporaryFile(dir=blobs, prefix=".ingest-", delete=False) as out:
        try:
            blob = _Digester(out)
            compressor = _compressor(layer.compression, cast(BinaryIO, blob))
            tar_stream = _Digester(compressor)
            tar_file = cast(BinaryIO, tar_stream)
            with tarfile.open(fileobj=tar_file, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for entry in layer.entries:
                    _tar_member(tar, entry)
            compressor.close()
        except BaseException:
            os.unlink(out.name)
            raise
    os.replace(out.name, blobs / blob.hash.hexdigest())
    return BuiltLayer(
        blob.digest, blob.size, LAYER_MEDIA_TYPES[layer.compression], tar_stream.digest
    )


def _add_to_index(layout: Path, descriptor: dict[str, Any], tag: str) -> None:
    """Point `tag` at descriptor in index.json, replacing what the tag named before."""
    path = layout / "index.json"
    index: dict[str, Any] = (
        json.loads(path.read_text())
        if path.exists()
        else {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    )
    index["manifests"] = [
        m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag
    ]
    index["manifests"].append({**descriptor, "annotations": {REF_NAME: tag}})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, path)


def build_image(
    layout: Path,
    tag: str,
    layers: Sequence[Layer],
    *,
    config: dict[str, Any] | None = None,
    os: str = "linux",
    arch: str = "amd64",
    variant: str | None = None,
    annotate: bool = True,
) -> BuiltImage:
    """Write an image (layers, config, OCI manifest) into the OCI layout at `layout`.

    config is the image config's `config` object (Entrypoint, Cmd, Env, WorkingDir, User).
    With annotate, index.json names the manifest `tag`; without, only the blobs are written
    (for the children of build_index).
    """
    built = tuple(_write_layer(layout, layer) for layer in layers)
    platform = {"architecture": arch, "os": os} | ({"variant": variant} if variant else {})
    image_config = platform | {
        "created": "2024-01-01T00:00:00Z",
        "config": config or {},
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in built]},
    }
    config_blob = _write_json_blob(layout, image_config, OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [layer.descriptor() for layer in built],
    }
    manifest_blob = _write_json_blob(layout, manifest, OCI_MANIFEST)
    if annotate:
        _add_to_index(layout, manifest_blob.descriptor(), tag)
    return BuiltImage(manifest_blob, config_blob, built)


def build_index(layout: Path, tag: str, images: Sequence[tuple[BuiltImage, str]]) -> Blob:
    """Write an OCI image index of images, each with its platform "os/arch[/variant]"."""
    manifests = []
    for image, platform in images:
        os_, arch, *variant = platform.split("/")
        fields = {"os": os_, "architecture": arch} | ({"variant": variant[0]} if variant else {})
        manifests.append(image.manifest.descriptor() | {"platform": fields})
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
    blob = _write_json_blob(layout, index, OCI_INDEX)
    _add_to_index(layout, blob.descriptor(), tag)
    return blob


# --- ready-made layers ----------------------------------------------------------------------

BUSYBOX_APPLETS = (
    "sh",
    "echo",
    "cat",
    "ls",
    "sleep",
    "env",
    "id",
    "pwd",
    "true",
    "false",
    "touch",
    "mkdir",
)


def busybox_rootfs_layer(compression: Compression = "gzip") -> Layer:
    """/bin/busybox (Debian busybox-static) with applet symlinks, /etc/passwd, /etc/group, /tmp."""
    return Layer(
        [
            Dir("bin"),
            File("bin/busybox", Path("/bin/busybox").read_bytes(), mode=0o755),
            *(Symlink(f"bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS),
            Dir("etc"),
            File(
                "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"
            ),
            File("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
            Dir("root", mode=0o700),
            Dir("tmp", mode=0o1777),
        ],
        compression,
    )


class _RandomReader(io.RawIOBase):
    """`size` deterministic pseudo-random bytes from `seed`, generated as they are read."""

    def __init__(self, seed: int, size: int) -> None:
        self._random = random.Random(seed)
        self._left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        self._left -= n
        return self._random.randbytes(n)


def random_layer(size: int, seed: int, compression: Compression = "none") -> Layer:
    """One file, /random-SEED.bin, of `size` pseudo-random bytes (cheap even for 256 MiB)."""
    content = Stream(size, lambda: cast(BinaryIO, _RandomReader(seed, size)))
    return Layer([File(f"random-{seed}.bin", content)], compression)


# --- skopeo and the registry API --------------------------------------------------------------


class SkopeoError(RuntimeError):
    pass


def skopeo(*args: str) -> str:
    """Run skopeo; its stdout, or SkopeoError carrying its stderr."""
    argv = ["skopeo", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=SKOPEO_TIMEOUT)
    if result.returncode != 0:
        raise SkopeoError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr}")
    return result.stdout


def _registry_flags(
    prefix: str, tls_verify: bool, cert_dir: Path | None, creds: str | None
) -> list[str]:
    flags = [f"--{prefix}tls-verify={'true' if tls_verify else 'false'}"]
    if cert_dir is not None:
        flags.append(f"--{prefix}cert-dir={cert_dir}")
    if creds is not None:
        flags.append(f"--{prefix}creds={creds}")
    return flags


def push(
    layout: Path,
    tag: str,
    dest: str,
    *,
    fmt: str | None = None,
    all_: bool = False,
    tls_verify: bool = False,
    cert_dir: Path | None = None,
    creds: str | None = None,
) -> None:
    """skopeo copy oci:LAYOUT:TAG docker://DEST ("127.0.0.1:PORT/name:tag").

    Without fmt the manifests arrive byte for byte (--preserve-digests: otherwise skopeo
    gzips uncompressed layers on the way and every digest changes). fmt "v2s2" converts to
    Docker schema 2 (with all_, an index becomes a manifest list), which changes the digests.
    all_ copies every image of an index; creds is "user:password".
    """
    if ":" in str(layout):
        raise ValueError(f"skopeo splits oci:PATH:REF at the first ':'; {layout} has one")
    flags = _registry_flags("dest-", tls_verify, cert_dir, creds)
    flags.append("--preserve-digests" if fmt is None else f"--format={fmt}")
    if all_:
        flags.append("--all")
    skopeo("copy", "--quiet", *flags, f"oci:{layout}:{tag}", f"docker://{dest}")


def skopeo_inspect_raw(
    ref: str, *, tls_verify: bool = False, cert_dir: Path | None = None, creds: str | None = None
) -> dict[str, Any]:
    """The manifest (or index) of ref ("docker://…" or "oci:…") exactly as stored, parsed."""
    raw: dict[str, Any] = json.loads(
        skopeo("inspect", "--raw", *_registry_flags("", tls_verify, cert_dir, creds), ref)
    )
    return raw


MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST))


def registry_manifest_digest(
    host: str, name: str, tag: str, *, ssl_context: ssl.SSLContext | None = None
) -> str:
    """Docker-Content-Digest of GET /v2/NAME/manifests/TAG (https when ssl_context is given)."""
    scheme = "https" if ssl_context is not None else "http"
    request = urllib.request.Request(
        f"{scheme}://{host}/v2/{name}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT}
    )
    with urllib.request.urlopen(request, timeout=10, context=ssl_context) as resp:
        digest: str = resp.headers["Docker-Content-Digest"]
        return digest
