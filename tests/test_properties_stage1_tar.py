"""Property tests: tar headers as stage1 reads them (issue 9).

Arbitrary and mutated members - names with NUL, ``..``, absolute paths, whiteouts; huge
sizes; PAX records; GNU sparse maps; link names; modes, ids and times; flipped header
bytes with and without a repaired checksum; truncation - go through stage1's layer
application into a temporary root. Each layer either applies or raises stage1's own error
(Stage1Error): never another exception, nothing written outside the root, no descriptor
left open, bounded time and memory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from stage1.errors import Stage1Error
from stage1.model import Descriptor, Digest
from stage1.render import Limits, render

TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ESCAPE = "escape-9f3c"  # a name no test tree outside the root may ever hold
LIMITS = Limits(data=16 << 20, data_why="test", size=1 << 40, entries=5000, seconds=20.0)

_component = st.sampled_from(
    [
        "a",
        "b",
        "etc",
        "..",
        ".",
        "",
        ESCAPE,
        ".wh.a",
        ".wh..wh..opq",
        ".wh.",
        "a\0b",
        "é",
        "x" * 300,
    ]
)
_name = st.builds(
    lambda lead, parts, tail: lead + "/".join(parts) + tail,
    st.sampled_from(["", "", "", "/", "./", "../", "../../"]),
    st.lists(_component, min_size=1, max_size=5),
    st.sampled_from(["", "/"]),
)
_number_text = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.sampled_from(["", "nan", "inf", "-inf", "1e300", "0x10", " 7", "1,2", "9" * 40]),
)
_sparse_map = st.lists(st.integers(min_value=-10, max_value=2**41), max_size=7).map(
    lambda xs: ",".join(map(str, xs))
)
_pax_key = st.sampled_from(
    [
        "path",
        "linkpath",
        "size",
        "mtime",
        "uid",
        "gid",
        "uname",
        "GNU.sparse.size",
        "GNU.sparse.realsize",
        "GNU.sparse.name",
        "GNU.sparse.major",
        "GNU.sparse.minor",
        "SCHILY.xattr.user.x",
        "hdrcharset",
    ]
)
_pax_value = st.one_of(_number_text, _name, st.text(max_size=20))
_pax = st.one_of(
    st.dictionaries(_pax_key, _pax_value, max_size=4),
    st.builds(
        lambda m, size, extra: {"GNU.sparse.map": m, "GNU.sparse.size": size, **extra},
        _sparse_map,
        _number_text,
        st.dictionaries(_pax_key, _pax_value, max_size=2),
    ),
)
_types = st.sampled_from(
    [
        tarfile.REGTYPE,
        tarfile.AREGTYPE,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.FIFOTYPE,
        tarfile.CHRTYPE,
        tarfile.CONTTYPE,
        b"V",
        b"Z",
    ]
)


@st.composite
def _member(draw: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(draw(_name))
    info.type = draw(_types)
    info.linkname = draw(_name)
    info.mode = draw(st.integers(min_value=0, max_value=0o7777))
    info.uid = draw(st.integers(min_value=0, max_value=2**21 - 1))
    info.gid = draw(st.integers(min_value=0, max_value=2**21 - 1))
    info.mtime = draw(st.integers(min_value=0, max_value=2**33 - 1))
    data = draw(st.binary(max_size=1500)) if info.type in (tarfile.REGTYPE, b"V") else b""
    info.size = len(data)
    info.pax_headers = draw(_pax)
    return info, data


@st.composite
def _layer(draw: Any) -> tuple[bytes, str]:
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for info, data in draw(st.lists(_member(), min_size=1, max_size=6)):
            try:
                tar.addfile(info, io.BytesIO(data))
            except (ValueError, tarfile.TarError, UnicodeError, OverflowError):
                continue  # tarfile itself will not write this one
    raw = bytearray(out.getvalue())
    headers = [i for i in range(0, len(raw), 512) if _checksum_ok(raw[i : i + 512])]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 4]))):
        pos = draw(st.integers(min_value=0, max_value=len(raw) - 1))
        raw[pos] = draw(st.integers(min_value=0, max_value=255))
    if draw(st.sampled_from([True, True, True, False])):
        for i in headers:  # repair checksums: the mutation gets past tarfile's first check
            _set_checksum(raw, i)
    if draw(st.sampled_from([False, False, False, True])):
        raw = raw[: draw(st.integers(min_value=0, max_value=len(raw)))]
    compressed = draw(st.booleans())
    return (gzip.compress(bytes(raw), 1) if compressed else bytes(raw)), (
        TAR_GZIP if compressed else TAR
    )


def _checksum_ok(block: bytes | bytearray) -> bool:
    if len(block) != 512 or not any(block):
        return False
    try:
        stored = int(bytes(block[148:156]).rstrip(b" \0").decode() or "x", 8)
    except ValueError:
        return False
    return stored in tarfile.calc_chksums(bytes(block))


def _set_checksum(raw: bytearray, at: int) -> None:
    block = bytes(raw[at : at + 512])
    if len(block) == 512:
        chksum = tarfile.calc_chksums(block)[0]
        raw[at + 148 : at + 156] = b"%06o\0 " % chksum


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _outside(box: Path) -> dict[str, bytes]:
    """What the test put beside the root, and the names in the directories above it."""
    seen = {p.name: (p.read_bytes() if p.is_file() else b"dir") for p in box.iterdir()}
    seen |= {f"sibling/{p.name}": p.read_bytes() for p in (box / "sibling").iterdir()}
    return seen


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
    database=None,
)
@given(_layer())
def test_any_tar_applies_inside_the_root_or_is_a_stage1_error(layer: tuple[bytes, str]) -> None:
    blob, media_type = layer
    desc = Descriptor(media_type, Digest("sha256", hashlib.sha256(blob).hexdigest()), len(blob))
    box = Path(tempfile.mkdtemp(prefix="stage1-prop-"))
    try:
        (box / "root").mkdir()
        (box / "outside").write_bytes(b"outside\n")
        (box / "sibling").mkdir()
        (box / "sibling" / "file").write_bytes(b"sibling\n")
        before = _outside(box)
        fds = _open_fds()
        tree = os.open(box / "root", os.O_RDONLY | os.O_DIRECTORY)
        warnings: list[str] = []
        tracemalloc.start()
        started = time.monotonic()
        try:
            render(tree, [(desc, io.BytesIO(blob))], warnings.append, LIMITS)
            event("applied")
        except Stage1Error as exc:
            assert str(exc) and "\n" not in str(exc)
            event(f"refused: {str(exc).rpartition(': ')[2][:40]}")
        finally:
            elapsed = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            os.close(tree)
        assert elapsed < 5, elapsed
        assert peak < 32 << 20, peak
        assert _open_fds() == fds
        assert _outside(box) == before
        assert not os.path.lexists(box.parent / ESCAPE)
        assert not os.path.lexists(f"/{ESCAPE}")
        assert all(w.startswith("warning: ") for w in warnings)
    finally:
        shutil.rmtree(box)


def _single(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _apply(blob: bytes, media_type: str, tmp_path: Path) -> str:
    desc = Descriptor(media_type, Digest("sha256", hashlib.sha256(blob).hexdigest()), len(blob))
    (tmp_path / "root").mkdir()
    tree = os.open(tmp_path / "root", os.O_RDONLY | os.O_DIRECTORY)
    try:
        render(tree, [(desc, io.BytesIO(blob))], lambda _: None, LIMITS)
    except Stage1Error as exc:
        return str(exc)
    finally:
        os.close(tree)
    return ""


def test_an_extended_header_claiming_a_terabyte_is_refused_without_reading_it(
    tmp_path: Path,
) -> None:
    # A PAX header block whose size says 1 TiB, followed by 64 MiB of compressed zeros.
    info = tarfile.TarInfo("PaxHeader")
    info.type = tarfile.XHDTYPE
    info.size = 1 << 40
    header = info.tobuf(tarfile.GNU_FORMAT)  # GNU: base-256 for the huge size
    blob = gzip.compress(header + bytes(64 << 20), 1)
    tracemalloc.start()
    try:
        message = _apply(blob, TAR_GZIP, tmp_path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message.endswith(": a member's headers take more than 1048576 bytes"), message
    assert peak < 16 << 20, peak


def test_a_damaged_header_in_the_middle_is_an_error_not_the_end(tmp_path: Path) -> None:
    first = tarfile.TarInfo("first")
    second = tarfile.TarInfo("second")
    raw = bytearray(_single(first)[:512] + _single(second))
    raw[512 + 148] ^= 0x01  # the second header's checksum no longer matches
    message = _apply(bytes(raw), TAR, tmp_path)
    assert message.endswith("is not a valid tar: bad header at offset 512"), message
