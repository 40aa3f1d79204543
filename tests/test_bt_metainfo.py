"""fetchd's deterministic torrents (issue 12, acceptance item 1): golden info-hashes, two
stores agree byte for byte, mktorrent agrees, the streaming builder equals the file
builder, and hostile or non-canonical torrents are refused with a reason.

Real peers: libtorrent (in the venv) is the oracle for every golden value, checked again
at test time; mktorrent and transmission-create make the foreign torrents. The torrents
table of fetchd.db and gc (through the ``fetchd gc`` CLI) at the end.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import libtorrent as lt  # the oracle only: fetchd/ never imports it outside fetchd/bt/session.py
import pytest

from fetchd.bt.metainfo import (
    MAX_TORRENT_BYTES,
    Torrent,
    TorrentBuilder,
    bdecode,
    bencode,
    build_from_file,
    canonical,
    parse_foreign,
    piece_length,
)
from fetchd.errors import BadTorrent
from fetchd.model import Digest
from fetchd.store import maintenance
from fetchd.store.cas import Store
from fetchd.store.meta import Meta, UrlRecord
from tests.support.cli import REPO, Fetchd, ok

KiB, MiB = 1 << 10, 1 << 20

# --- the content: deterministic, cheap to make --------------------------------------------

#: 1 MiB of a SHA-256 counter stream; MiB number k of a blob is this unit with its first
#: 8 bytes replaced by k (big-endian), so no two MiB of a blob (and so no two pieces) repeat.
_UNIT = b"".join(hashlib.sha256(b"fetchd-bt-golden %d" % i).digest() for i in range(MiB // 32))


def content(size: int) -> Iterator[bytes]:
    """The first ``size`` bytes of the test stream, in chunks of at most 1 MiB."""
    for k in range(math.ceil(size / MiB)):
        yield (k.to_bytes(8, "big") + _UNIT[8:])[: min(MiB, size - k * MiB)]


def make_blob(directory: Path, size: int) -> tuple[Path, str]:
    """The test blob of ``size`` bytes as ``directory/HEX``; returns (path, hex)."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".partial"
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for chunk in content(size):
            h.update(chunk)
            f.write(chunk)
    path = directory / h.hexdigest()
    os.replace(tmp, path)
    return path, h.hexdigest()


def lt_torrent(path: Path, plen: int | None = None, flags: int | None = None) -> bytes:
    """libtorrent's torrent of ``path`` (named by its file name), built from an explicit
    file entry, with no creation date and no creator: the oracle."""
    size = path.stat().st_size
    ct = lt.create_torrent(
        [lt.create_file_entry(path.name, size)],
        plen or piece_length(size),
        lt.create_torrent.v1_only if flags is None else flags,
    )
    lt.set_piece_hashes(ct, str(path.parent))
    ct.set_creation_date(0)
    ct.set_creator("")
    return bytes(lt.bencode(ct.generate()))


def lt_info_hash(raw: bytes) -> str:
    return str(lt.torrent_info(lt.bdecode(raw)).info_hashes().v1)


# --- golden info-hashes ------------------------------------------------------------------

#: size → v1 info-hash of fetchd's torrent of content(size), computed once with libtorrent
#: 2.1.1 (lt_torrent) and hard-coded; the test checks the oracle still agrees.
GOLDEN = {
    1: "b78a550cab58d91a8e51059385290374d7e47cab",
    16 * KiB: "bc6b2ed97b14f402340e4b44becaee3475b982c5",
    16 * KiB + 1: "0a2f9fdd13878fbe31b96a556f94bdc11f4dd1ab",
    256 * KiB - 1: "0e8a5757950260bf304964c6b2e546f902cb70e7",
    256 * KiB: "1c0060460d6c8e6eab6c612c4cd4360a4ad84700",
    256 * KiB + 1: "422012b734efd57bce42b7ad34eb63ed9e36fc79",
    300 * MiB: "079462a15775638e84ca51ae3ff10cd6e79d545c",
}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Blobs]:
    """Test blobs by size, each made once per module and deleted after it (300 MiB)."""
    made = Blobs(tmp_path_factory.mktemp("blobs"))
    yield made
    shutil.rmtree(made.directory)


class Blobs:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.made: dict[int, tuple[Path, str]] = {}

    def __call__(self, size: int) -> tuple[Path, str]:
        if size not in self.made:
            self.made[size] = make_blob(self.directory, size)
        return self.made[size]


@pytest.mark.parametrize("size", list(GOLDEN), ids=lambda s: f"{s}B")
def test_golden_info_hashes(tmp_path: Path, blobs: Blobs, size: int) -> None:
    path, hexd = blobs(size)
    t = build_from_file(path, hexd, size)
    assert t.info_hash_hex == GOLDEN[size]
    info = bdecode(t.raw)[b"info"]  # type: ignore[index]
    assert t.info_hash == hashlib.sha1(bencode(info)).digest()
    assert set(info) == {b"length", b"name", b"piece length", b"pieces"}
    assert t.piece_length == 256 * KiB and t.num_pieces == math.ceil(size / (256 * KiB))
    # the oracle: libtorrent's file is byte-identical, so its info-hash is the golden one
    oracle = lt_torrent(path)
    assert t.raw == oracle
    assert lt_info_hash(oracle) == GOLDEN[size]
    # mktorrent reproduces the rule: -l log2(piece length) -n HEX
    out = tmp_path / "mk.torrent"
    subprocess.run(
        ["mktorrent", "-l", str(t.piece_length.bit_length() - 1), "-n", hexd, "-o", out, path],
        check=True,
        capture_output=True,
        timeout=120,
    )
    mk = parse_foreign(out.read_bytes())
    assert mk.info_hash == t.info_hash and mk.name == hexd and mk.pieces == t.pieces
    assert b"creation date" in bdecode(out.read_bytes())  # type: ignore[operator]
    # canonical() takes mktorrent's file: what it adds (creation date, created by) is
    # outside info, and is dropped
    assert canonical(out.read_bytes(), hexd, size) == t


def test_piece_length_rule() -> None:
    rule = {
        1: 256 * KiB,
        512 * MiB: 256 * KiB,
        512 * MiB + 1: 512 * KiB,
        1 << 30: 512 * KiB,
        4 << 30: 2 * MiB,
        32 << 30: 16 * MiB,
        1 << 40: 16 * MiB,
    }
    assert {size: piece_length(size) for size in rule} == rule


def test_two_stores_give_byte_identical_torrents(tmp_path: Path, blobs: Blobs) -> None:
    """The same blob in two stores, different modes and mtimes: the same torrent file."""
    src, hexd = blobs(300 * MiB)
    digest = Digest("sha256", hexd)
    raws = []
    for name, mode, mtime in (("a", 0o444, 1_000_000_000), ("b", 0o755, time.time())):
        store = Store.open(tmp_path / name)
        path = store.blob_path(digest)
        shutil.copyfile(src, path)  # a copy: its own inode, mode and times
        os.chmod(path, mode)
        os.utime(path, (mtime, mtime))
        t = build_from_file(path, hexd, path.stat().st_size)
        Meta(store.db_path).put_torrent(str(digest), t.raw)
        raws.append(Meta(store.db_path).torrent(str(digest)))
        path.unlink()
    assert raws[0] == raws[1] and raws[0] is not None
    assert hashlib.sha1(raws[0]).hexdigest() == hashlib.sha1(raws[1]).hexdigest()
    assert canonical(raws[0], hexd, 300 * MiB).info_hash_hex == GOLDEN[300 * MiB]


@pytest.mark.parametrize("size", [1, 16 * KiB + 1, 256 * KiB, 5 * MiB + 7, 300 * MiB])
def test_streaming_builder_equals_file_builder(blobs: Blobs, size: int) -> None:
    """Random chunk sizes (empty ones, single bytes, several pieces at once), as bytes,
    bytearray and memoryview: the same torrent as build_from_file."""
    path, hexd = blobs(size)
    rnd = random.Random(size)
    builder = TorrentBuilder(hexd, size)
    plen = piece_length(size)
    fed = 0
    with open(path, "rb") as f:
        for i in range(10 * size + 10):  # bounded: most reads return at least one byte
            n = rnd.choice([0, 1, 7, rnd.randrange(plen), rnd.randrange(3 * plen)])
            chunk = f.read(n)
            if not chunk and n:
                break
            fed += len(chunk)
            kind = i % 3
            builder.feed(
                chunk if kind == 0 else bytearray(chunk) if kind == 1 else memoryview(chunk)
            )
    assert fed == size
    assert builder.finish() == build_from_file(path, hexd, size)
    if size in GOLDEN:
        assert builder.finish().info_hash_hex == GOLDEN[size]


def test_builder_refuses_wrong_sizes(tmp_path: Path, blobs: Blobs) -> None:
    path, hexd = blobs(256 * KiB + 1)
    b = TorrentBuilder(hexd, 256 * KiB)
    with pytest.raises(BadTorrent, match="fed 262145 bytes, its size is 262144"):
        b.feed(path.read_bytes())
    b = TorrentBuilder(hexd, 256 * KiB + 2)
    b.feed(path.read_bytes())
    with pytest.raises(BadTorrent, match="fed 262145 bytes, its size is 262146"):
        b.finish()
    with pytest.raises(BadTorrent, match="its size is 262144"):
        build_from_file(path, hexd, 256 * KiB)
    with pytest.raises(BadTorrent, match="its size is 262146"):
        build_from_file(path, hexd, 256 * KiB + 2)
    with pytest.raises(BadTorrent, match="0 bytes has no torrent"):
        TorrentBuilder(hexd, 0)
    with pytest.raises(ValueError, match="not a sha256"):
        TorrentBuilder("../../etc/passwd", 1)
    good = build_from_file(path, hexd, 256 * KiB + 1)
    with pytest.raises(ValueError, match="breaks the rule"):
        Torrent(hexd, good.size, 16 * KiB, good.pieces)


def test_spans_and_pieces_within(blobs: Blobs) -> None:
    size = 5 * MiB + 7  # 21 pieces of 256 KiB, the last one 7 bytes
    path, hexd = blobs(size)
    t = build_from_file(path, hexd, size)
    p = 256 * KiB
    assert t.num_pieces == 21
    assert t.span(0) == (0, p) and t.span(20) == (20 * p, size)
    with pytest.raises(IndexError):
        t.span(21)
    assert t.pieces_within([]) == set()
    assert t.pieces_within([(0, size)]) == set(range(21))
    assert t.pieces_within([(1, size - 1)]) == set(range(1, 20))
    assert t.pieces_within([(0, p - 1)]) == set()
    assert t.pieces_within([(p, 2 * p), (2 * p, 3 * p + 5)]) == {1, 2}  # adjacent ranges join
    assert t.pieces_within([(3 * p, 5 * p), (2 * p, 4 * p)]) == {2, 3, 4}  # overlapping, unsorted
    assert t.pieces_within([(20 * p, size + 100)]) == {20}  # the short last piece


def test_served_form_keeps_the_info_hash(blobs: Blobs) -> None:
    path, hexd = blobs(5 * MiB + 7)
    t = build_from_file(path, hexd, 5 * MiB + 7)
    announce = "http://127.0.0.1:5050/announce"
    seed = f"http://127.0.0.1:5050/v2/library/x/blobs/sha256:{hexd}"
    served = t.served(announce, [seed])
    assert served != t.raw
    atp = lt.load_torrent_buffer(served)
    assert str(atp.ti.info_hashes().v1) == t.info_hash_hex
    assert (atp.trackers, atp.url_seeds) == ([announce], [seed])
    assert canonical(served, hexd, t.size) == t  # and the extras are dropped again
    assert canonical(served, hexd, t.size).raw == t.raw
    foreign = parse_foreign(served)
    assert foreign.info_hash == t.info_hash
    assert (foreign.announce, foreign.url_list) == ([announce], [seed])
    assert t.served(None, []) == t.raw


def test_metainfo_does_not_load_libtorrent() -> None:
    code = (
        "import sys, fetchd.bt.metainfo, fetchd.store.meta, fetchd.store.maintenance; "
        "sys.exit(int('libtorrent' in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert r.returncode == 0, r.stderr


# --- hostile and non-canonical torrents --------------------------------------------------

HOSTILE_SIZE = 5 * MiB + 7


@pytest.fixture(scope="module")
def good(blobs: Blobs) -> Torrent:
    path, hexd = blobs(HOSTILE_SIZE)
    return build_from_file(path, hexd, HOSTILE_SIZE)


def _info_dict(t: Torrent, **changes: object) -> dict[bytes, object]:
    info: dict[bytes, object] = {
        b"length": t.size,
        b"name": t.hex.encode(),
        b"piece length": t.piece_length,
        b"pieces": t.pieces,
    }
    for k, v in changes.items():
        key = k.replace("_", " ").encode()
        if v is None:
            info.pop(key)
        else:
            info[key] = v
    return info


def _with_info(t: Torrent, **changes: object) -> bytes:
    return bencode({b"info": _info_dict(t, **changes)})


def _swap_first_keys(t: Torrent) -> bytes:
    """info with 'name' written before 'length': every byte otherwise canonical."""
    length = b"6:lengthi%de" % t.size
    name = b"4:name%d:%s" % (len(t.hex), t.hex.encode())
    raw = t.raw
    assert raw.startswith(b"d4:infod" + length + name)
    return b"d4:infod" + name + length + raw[len(b"d4:infod" + length + name) :]


def _replace(raw: bytes, old: bytes, new: bytes) -> bytes:
    assert raw.count(old) == 1, old
    return raw.replace(old, new)


# name → (the torrent as received, a words of the reason)
HOSTILE: dict[str, tuple[object, str]] = {
    "name ../../etc/passwd": (
        lambda t: _with_info(t, name=b"../../etc/passwd"),
        "its name is '../../etc/passwd', not the blob's hex digest",
    ),
    "name of another blob": (
        lambda t: _with_info(t, name=b"0" * 64),
        "not the blob's hex digest",
    ),
    "private=1": (
        lambda t: _with_info(t, private=1),
        "its info has key 'private' (not fetchd's canonical form)",
    ),
    "private=0 (transmission-create)": (lambda t: _with_info(t, private=0), "key 'private'"),
    "multi-file": (
        lambda t: _with_info(t, length=None, files=[{b"length": t.size, b"path": [b"a"]}]),
        "it is a multi-file torrent",
    ),
    "length+1": (
        lambda t: _with_info(t, length=t.size + 1),
        f"its length is {HOSTILE_SIZE + 1}, the blob's size is {HOSTILE_SIZE}",
    ),
    "length as a string": (lambda t: _with_info(t, length=b"5"), "its length is b'5'"),
    "wrong piece length": (
        lambda t: _with_info(t, piece_length=16 * KiB),
        f"its piece length is 16384; fetchd's rule gives 262144 for {HOSTILE_SIZE} bytes",
    ),
    "one piece hash short": (
        lambda t: _with_info(t, pieces=t.pieces[:-20]),
        "its pieces are 400 bytes, 21 pieces need 420",
    ),
    "no pieces": (lambda t: _with_info(t, pieces=None), "its info lacks 'pieces'"),
    "attr=x": (lambda t: _with_info(t, attr=b"x"), "its info has key 'attr'"),
    "mtime": (lambda t: _with_info(t, mtime=1), "its info has key 'mtime'"),
    "hybrid keys": (
        lambda t: _with_info(
            t,
            meta_version=2,
            file_tree={t.hex.encode(): {b"": {b"length": t.size, b"pieces root": bytes(32)}}},
        ),
        "its info has keys 'file tree', 'meta version'",
    ),
    "no info": (lambda t: bencode({b"announce": b"http://x/"}), "it has no info dict"),
    "a list, not a dict": (lambda t: b"le", "it has no info dict"),
    "unsorted keys": (_swap_first_keys, "dict key 'length' out of order"),
    "a key twice": (
        lambda t: _replace(t.raw, b"4:infod", b"4:infod6:lengthi1e"),
        "dict key 'length' twice",
    ),
    "leading zero in an integer": (
        lambda t: _replace(t.raw, b"6:lengthi", b"6:lengthi0"),
        "with a leading zero or -0",
    ),
    "-0": (lambda t: _replace(t.raw, b"d4:info", b"d1:ai-0e4:info"), "integer '-0'"),
    "leading zero in a string length": (
        lambda t: _replace(t.raw, b"4:info", b"04:info"),
        "string length '04'",
    ),
    "trailing garbage": (lambda t: t.raw + b"\n", "it has 1 bytes after the bencoded value"),
    "truncated": (lambda t: t.raw[:-1], "truncated"),
    "empty": (lambda t: b"", "truncated"),
    "nested list bomb": (
        lambda t: b"d4:info" + b"l" * 100_000 + b"e" * 100_001,
        "nested deeper than 32",
    ),
    "nested dict bomb": (lambda t: b"d1:a" * 50_000 + b"e" * 50_000, "nested deeper than 32"),
    "huge length prefix": (
        lambda t: b"d4:info99999999999999999999:xe",
        "a string length too long or unterminated",
    ),
    "length prefix past the end": (
        lambda t: b"d4:info8000000:abce",
        "a string of 8000000 bytes where 4 remain",
    ),
    "huge integer": (
        lambda t: _replace(t.raw, b"6:lengthi", b"6:lengthi" + b"9" * 30),
        "an integer too long or unterminated",
    ),
    "too many values": (
        lambda t: _replace(t.raw, b"d4:info", b"d1:al" + b"i0e" * 70_000 + b"e4:info"),
        "more than 65536 values",
    ),
    "more than MAX_TORRENT_BYTES": (
        lambda t: bencode({b"comment": b"x" * MAX_TORRENT_BYTES, b"info": _info_dict(t)}),
        f"more than the {MAX_TORRENT_BYTES} allowed",
    ),
    "garbage": (lambda t: random.Random(12).randbytes(4096), "it is not canonical bencoding"),
    "an HTML error page": (
        lambda t: b"<html><body>404 Not Found</body></html>",
        "it is not canonical bencoding (unexpected b'<' at byte 0)",
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_torrents_are_refused_with_a_reason(good: Torrent, case: str) -> None:
    make, reason = HOSTILE[case]
    raw = make(good)  # type: ignore[operator]
    with pytest.raises(BadTorrent) as info:
        canonical(raw, good.hex, good.size)
    message = str(info.value)
    assert message.startswith(f"torrent for sha256:{good.hex[:12]}… refused: "), message
    assert reason in message
    assert len(message) < 300  # a sentence, not the torrent


def test_libtorrent_would_have_taken_some_of_them(good: Torrent) -> None:
    """Why the check is fetchd's own: libtorrent loads the traversal name (it sanitises it)
    and the torrent with unsorted keys (hashing the bytes as they are)."""
    ti = lt.torrent_info(lt.bdecode(_with_info(good, name=b"../../etc/passwd")))
    assert "/" not in ti.name()
    unsorted = lt.load_torrent_buffer(_swap_first_keys(good))
    assert str(unsorted.ti.info_hashes().v1) != good.info_hash_hex


def test_canonical_accepts_what_sits_outside_info(good: Torrent) -> None:
    raw = bencode(
        {
            b"announce": b"http://127.0.0.1:1/announce",
            b"url-list": [b"http://127.0.0.1:1/x"],
            b"comment": b"c",
            b"created by": b"mktorrent 1.1",
            b"creation date": 1_700_000_000,
            b"info": _info_dict(good),
        }
    )
    got = canonical(raw, good.hex, good.size)
    assert got == good and got.raw == good.raw


# --- torrents made by others ---------------------------------------------------------------


def test_parse_foreign_reads_transmission_create(tmp_path: Path, blobs: Blobs) -> None:
    """transmission-create 3.00 writes private=0 inside info: another info-hash than
    fetchd's, which parse_foreign reads and canonical refuses."""
    path, hexd = blobs(HOSTILE_SIZE)
    ours = build_from_file(path, hexd, HOSTILE_SIZE)
    out = tmp_path / "tr.torrent"
    announce = "http://127.0.0.1:1/announce"
    subprocess.run(
        ["transmission-create", "-s", "256", "-t", announce, "-o", out, path],
        check=True,
        capture_output=True,
        timeout=120,
    )
    raw = out.read_bytes()
    f = parse_foreign(raw)
    assert bdecode(raw)[b"info"][b"private"] == 0  # type: ignore[index]
    assert f.info_hash != ours.info_hash
    assert f.info_hash_hex == lt_info_hash(raw)
    assert (f.name, f.length, f.piece_length, f.pieces) == (
        hexd,
        ours.size,
        ours.piece_length,
        ours.pieces,
    )
    assert f.announce == [announce] and f.raw == raw
    assert hashlib.sha1(f.info_raw).digest() == f.info_hash
    with pytest.raises(BadTorrent, match="key 'private'"):
        canonical(raw, hexd, ours.size)


def test_parse_foreign_reads_a_hybrids_v1_part(blobs: Blobs) -> None:
    path, hexd = blobs(HOSTILE_SIZE)
    hybrid = lt_torrent(path, flags=0)
    f = parse_foreign(hybrid)
    assert f.info_hash_hex == lt_info_hash(hybrid)
    assert f.pieces == build_from_file(path, hexd, HOSTILE_SIZE).pieces
    with pytest.raises(BadTorrent, match="'file tree', 'meta version'"):
        canonical(hybrid, hexd, HOSTILE_SIZE)


def test_parse_foreign_refuses(tmp_path: Path, blobs: Blobs, good: Torrent) -> None:
    path, _ = blobs(HOSTILE_SIZE)
    v2 = lt_torrent(path, flags=lt.create_torrent.v2_only)
    with pytest.raises(BadTorrent, match="torrent refused: it is a BitTorrent v2-only torrent"):
        parse_foreign(v2)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a", "b"):
        (two / name).write_bytes(name.encode() * 1000)
    ct = lt.create_torrent(
        [lt.create_file_entry("two/a", 1000), lt.create_file_entry("two/b", 1000)],
        16 * KiB,
        lt.create_torrent.v1_only,
    )
    lt.set_piece_hashes(ct, str(tmp_path))
    with pytest.raises(BadTorrent, match="it is a multi-file torrent"):
        parse_foreign(bytes(lt.bencode(ct.generate())))
    bad = {
        "a piece longer": (
            _with_info(good, length=good.size + 256 * KiB),
            "its pieces are 420 bytes",
        ),
        "length 0": (_with_info(good, length=0), "its length is 0"),
        "piece length 1000": (_with_info(good, piece_length=1000), "its piece length is 1000"),
        "a symlink": (_with_info(good, attr=b"l"), "a symlink or pad file"),
        "hybrid of another file": (
            _with_info(
                good,
                meta_version=2,
                file_tree={b"other": {b"": {b"length": good.size, b"pieces root": bytes(32)}}},
            ),
            "describes other files",
        ),
        "unsorted keys": (_swap_first_keys(good), "out of order"),
        "garbage": (b"\x00" * 100, "not canonical bencoding"),
    }
    for case, (raw, reason) in bad.items():
        with pytest.raises(BadTorrent, match="torrent refused: ") as info:
            parse_foreign(raw)
        assert reason in str(info.value), case


@pytest.mark.parametrize(
    ("name", "want"),
    [
        (b"../../etc/passwd", "____etc_passwd"),
        (b"..", "_"),
        (b"...", "_."),
        (b"", "torrent"),
        (b"a\x00b\nc", "a_b_c"),
        (b"dir\\..\\x", "dir___x"),
        (b".hidden", "hidden"),
        ("é".encode() * 200, "é" * 127),
    ],
)
def test_parse_foreign_sanitises_the_name(good: Torrent, name: bytes, want: str) -> None:
    f = parse_foreign(_with_info(good, name=name))
    assert f.name == want
    assert "/" not in f.name and ".." not in f.name and "\x00" not in f.name
    assert f.info_hash == hashlib.sha1(bencode(_info_dict(good, name=name))).digest()


def test_parse_foreign_keeps_only_web_urls(good: Torrent) -> None:
    raw = bencode(
        {
            b"announce": b"udp://127.0.0.1:6969/announce",
            b"announce-list": [
                [b"http://127.0.0.1:1/announce", b"file:///etc/passwd"],
                [b"https://127.0.0.1:2/a b", b"http://127.0.0.1:1/announce", 7],
                [b"http://x/" + b"a" * 3000],
            ],
            b"url-list": b"http://127.0.0.1:3/blob",
            b"info": _info_dict(good),
        }
    )
    f = parse_foreign(raw)
    assert f.announce == ["udp://127.0.0.1:6969/announce", "http://127.0.0.1:1/announce"]
    assert f.url_list == ["http://127.0.0.1:3/blob"]
    many = bencode(
        {b"url-list": [b"http://h/%d" % i for i in range(500)], b"info": _info_dict(good)}
    )
    assert len(parse_foreign(many).url_list) == 64


# --- the torrents table and gc ---------------------------------------------------------


def _blob(store: Store, data: bytes) -> tuple[Digest, Torrent]:
    digest = Digest.of(data)
    store.put(data, digest)
    b = TorrentBuilder(digest.hex, len(data))
    b.feed(data)
    return digest, b.finish()


def test_torrents_table(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    meta = Meta(store.db_path)
    assert meta.torrent("sha256:" + "0" * 64) is None and meta.torrents() == []
    assert not store.db_path.exists()  # reads never write
    d1, t1 = _blob(store, b"one")
    d2, t2 = _blob(store, b"two")
    meta.put_torrent(str(d2), t2.raw)
    meta.put_torrent(str(d1), t1.raw)
    meta.put_torrent(str(d1), t1.raw)  # again: replaces
    assert meta.torrents() == sorted([str(d1), str(d2)])
    assert meta.torrent(str(d1)) == t1.raw and canonical(t1.raw, d1.hex, 3) == t1
    meta.forget_torrents([str(d1), "sha256:" + "f" * 64])
    assert meta.torrents() == [str(d2)] and meta.torrent(str(d1)) is None
    # derived data: a lost database is rebuilt from the layout without them
    store.db_path.unlink()
    assert meta.torrents() == []
    meta.put_torrent(str(d1), t1.raw)
    assert meta.torrents() == [str(d1)]


def test_gc_forgets_the_torrents_of_the_blobs_it_removes(fetchd: Fetchd) -> None:
    store = Store.open(fetchd.store)
    meta = Meta(store.db_path)
    kept, tk = _blob(store, b"a blob a URL names")
    gone, tg = _blob(store, b"a blob nothing names")
    now = time.time()
    maintenance.record_url(
        store, UrlRecord("http://127.0.0.1:1/kept", str(kept), 18, None, None, None, now, now)
    )
    meta.put_torrent(str(kept), tk.raw)
    meta.put_torrent(str(gone), tg.raw)
    out = ok(fetchd("gc"))
    assert not store.has(gone) and store.has(kept), out
    assert meta.torrents() == [str(kept)]
    assert meta.torrent(str(gone)) is None and meta.torrent(str(kept)) == tk.raw


def test_rebuild_db_drops_torrents_of_absent_blobs(fetchd: Fetchd) -> None:
    """A row whose blob went another way than gc (removed by hand): fsck --rebuild-db
    prunes it, as it prunes names the layout no longer holds."""
    store = Store.open(fetchd.store)
    meta = Meta(store.db_path)
    here, th = _blob(store, b"still here")
    lost, tl = _blob(store, b"removed by hand")
    meta.put_torrent(str(here), th.raw)
    meta.put_torrent(str(lost), tl.raw)
    meta.put_torrent("sha256:not-a-digest", b"x")
    store.blob_path(lost).unlink()
    ok(fetchd("fsck", "--rebuild-db"))
    assert meta.torrents() == [str(here)]
