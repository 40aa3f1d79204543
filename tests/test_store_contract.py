"""The store's contract, as containerd's ``content/testsuite`` states a content store's.

Every test runs the store itself (``fetchd.store.cas``: it is the code under test, not a
double) in this process, against a real directory; where two writers must be two
processes, the other one is a small ``python -c`` child holding :meth:`Store.ingest`.
The tests that hold for both kinds of ingest run against each (``sequential``: written in
order and hashed as it goes; ``segmented``: written at any offset, hashed by a follower).

What is checked, each time from what is on disk:

* an ingest is invisible until commit (no blob file, ``layout/`` byte for byte as
  before, another process's ``Store.has`` is False);
* a commit with the wrong size or the wrong digest raises, shows nothing and leaves
  the ingest empty;
* "already exists" is success: the second writer's copy is discarded;
* resume: a writer that leaves partial data is resumed at that offset by the next;
* two processes writing one digest: the second waits for the first's lock, then finds
  the blob committed;
* abort (leaving without commit) keeps the partial data; discard drops it;
* bad resumed data: only the resumed ranges are dropped and fetched again;
* writing past the size raises :class:`SizeMismatch`; the :class:`Sink` face of a
  sequential ingest refuses what it cannot do.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

import fetchd
from fetchd.errors import DigestMismatch, SizeMismatch, StoreError
from fetchd.model import Digest
from fetchd.store import Ingest, Store
from fetchd.store.cas import UNKNOWN_END, ResumedDataBad, SegmentedIngest, _add_range, _merge
from tests.support.locks import CountingLock

T = TypeVar("T")

KINDS = [pytest.param(False, id="sequential"), pytest.param(True, id="segmented")]
#: a few of the store's write chunks and more than one of the follower's reads
SIZE = (5 << 20) + 12345
Q = SIZE // 4
WAIT = 60.0
#: How long the second writer is given to (wrongly) get past a lock the first holds: a
#: check that something does not happen; a store without the lock gets in at once.
HOLD = 1.0


def run(coro: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro()

    return asyncio.run(main())


def content(seed: int, n: int = SIZE) -> bytes:
    return random.Random(seed).randbytes(n)


def layout_files(store: Store) -> dict[str, str]:
    """Every file under layout/ with the sha256 of its bytes."""
    return {
        str(p.relative_to(store.layout)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.layout.rglob("*"))
        if p.is_file()
    }


def child_env() -> dict[str, str]:
    """The environment of a child that imports the same fetchd as this process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(fetchd.__file__).resolve().parent.parent)
    return env


_HAS = """
import sys
from pathlib import Path
from fetchd.model import Digest
from fetchd.store import Store
print(Store(Path(sys.argv[1])).has(Digest.parse(sys.argv[2])))
"""


def other_process_has(store: Store, digest: Digest) -> bool:
    out = subprocess.run(
        [sys.executable, "-c", _HAS, str(store.root), str(digest)],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=WAIT,
        check=True,
    ).stdout.strip()
    assert out in ("True", "False"), out
    return out == "True"


def ingest_dirs(store: Store) -> list[str]:
    return sorted(p.name for p in store.ingests.iterdir())


async def put(ing: Ingest, data: bytes, ranges: Sequence[tuple[int, int]]) -> None:
    """Write ``data[a:b]`` for each range, in the order given, in several pieces a call."""
    for a, b in ranges:
        piece = data[a:b]
        third = len(piece) // 3
        await ing.write_at(a, [piece[:third], piece[third : 2 * third], piece[2 * third :]])


async def fill_gaps(ing: Ingest, data: bytes) -> None:
    """What a fetcher does: write what the sink says is missing (the last gap first when
    the ingest takes any order)."""
    gaps = ing.gaps()
    await put(ing, data, gaps[::-1] if isinstance(ing, SegmentedIngest) else gaps)


def order(segmented: bool) -> list[tuple[int, int]]:
    """All of SIZE in four ranges: out of order when the ingest allows it."""
    quarters = [(i * Q, (i + 1) * Q if i < 3 else SIZE) for i in range(4)]
    return [quarters[2], quarters[0], quarters[3], quarters[1]] if segmented else quarters


# --- ingest invisible until commit ------------------------------------------------------


@pytest.mark.parametrize("segmented", KINDS)
def test_an_ingest_is_invisible_until_commit(tmp_path: Path, segmented: bool) -> None:
    store = Store.open(tmp_path / "store")
    store.put(b"another blob\n", Digest.of(b"another blob\n"))
    data = content(1)
    digest = Digest.of(data)
    before = layout_files(store)

    async def go() -> None:
        async with store.ingest(digest, SIZE, segmented=segmented) as ing:
            await put(ing, data, order(segmented))
            await ing.flush()  # every byte on disk, hashed
            assert ing.gaps() == []
            assert ing.data_path.read_bytes() == data
            assert not store.blob_path(digest).exists()
            assert layout_files(store) == before
            assert not other_process_has(store, digest)

            await ing.commit()

            assert store.blob_path(digest).read_bytes() == data
            assert other_process_has(store, digest)

    run(go)
    assert layout_files(store) == {**before, f"blobs/sha256/{digest.hex}": digest.hex}
    assert store.blob_path(digest).stat().st_mode & 0o222 == 0  # immutable
    assert ingest_dirs(store) == []


# --- commit with the wrong size or digest ------------------------------------------------


@pytest.mark.parametrize("segmented", KINDS)
def test_a_commit_with_the_wrong_size_raises_and_shows_nothing(
    tmp_path: Path, segmented: bool
) -> None:
    store = Store.open(tmp_path / "store")
    data = content(2)
    digest = Digest.of(data)
    before = layout_files(store)

    async def go() -> None:
        # The descriptor says one byte more than the source sent.
        async with store.ingest(digest, SIZE + 1, segmented=segmented) as ing:
            await put(ing, data, order(segmented))
            with pytest.raises(SizeMismatch) as caught:
                await ing.commit()
            assert (caught.value.expected, caught.value.actual) == (SIZE + 1, SIZE)
            assert not store.has(digest)
            assert ing.data_path.stat().st_size == 0  # the ingest is left empty

    run(go)
    assert layout_files(store) == before
    assert not other_process_has(store, digest)
    assert ingest_dirs(store) == []


@pytest.mark.parametrize("segmented", KINDS)
def test_a_commit_with_the_wrong_digest_raises_and_shows_nothing(
    tmp_path: Path, segmented: bool
) -> None:
    store = Store.open(tmp_path / "store")
    data = content(3)
    expected = Digest.of(content(4))  # what the descriptor says: not these bytes
    before = layout_files(store)

    async def go() -> None:
        async with store.ingest(expected, SIZE, segmented=segmented) as ing:
            await put(ing, data, order(segmented))
            with pytest.raises(DigestMismatch) as caught:
                await ing.commit()
            # Nothing was resumed: a plain mismatch, not the retry of bad resumed data.
            assert type(caught.value) is DigestMismatch
            assert caught.value.actual == str(Digest.of(data))
            assert ing.data_path.stat().st_size == 0

    run(go)
    assert not store.has(expected) and not store.has(Digest.of(data))
    assert layout_files(store) == before
    assert ingest_dirs(store) == []

    async def again() -> int:
        async with store.ingest(expected, SIZE, segmented=segmented) as ing:
            return ing.offset

    assert run(again) == 0  # the next writer starts from nothing


# --- already exists is success -------------------------------------------------------------


@pytest.mark.parametrize("segmented", KINDS)
def test_a_commit_of_a_blob_that_exists_is_success_and_discards_the_copy(
    tmp_path: Path, segmented: bool
) -> None:
    store = Store.open(tmp_path / "store")
    data = content(5)
    digest = Digest.of(data)

    async def go() -> None:
        async with store.ingest(digest, SIZE, segmented=segmented) as ing:
            await put(ing, data, order(segmented))
            # Meanwhile another writer (one that takes no ingest: Store.put) commits it.
            store.put(data, digest)
            first = store.blob_path(digest).stat().st_ino
            await ing.commit()  # no error
            assert ing.digest == digest
            assert store.blob_path(digest).stat().st_ino == first  # ours was not renamed

    run(go)
    assert store.blob_path(digest).read_bytes() == data
    assert ingest_dirs(store) == []


@pytest.mark.parametrize("segmented", KINDS)
def test_two_writers_of_one_unnamed_blob_both_succeed(tmp_path: Path, segmented: bool) -> None:
    """Two URLs with the same content (no digest given, so two ingests): the second
    commit finds the blob there and discards its copy."""
    store = Store.open(tmp_path / "store")
    data = content(6)
    digest = Digest.of(data)

    async def write(key: str) -> Digest:
        async with store.ingest(None, SIZE, key=key, segmented=segmented) as ing:
            await put(ing, data, order(segmented))
            await ing.commit()
            return ing.digest

    assert run(lambda: write("url-a")) == digest
    first = store.blob_path(digest).stat().st_ino
    assert run(lambda: write("url-b")) == digest
    assert store.blob_path(digest).stat().st_ino == first
    assert store.blob_path(digest).read_bytes() == data
    assert ingest_dirs(store) == []


# --- resume --------------------------------------------------------------------------------


@pytest.mark.parametrize("segmented", KINDS)
def test_a_writer_resumes_what_the_previous_one_left(tmp_path: Path, segmented: bool) -> None:
    store = Store.open(tmp_path / "store")
    data = content(7)
    digest = Digest.of(data)
    # sequential: the first half; segmented: the first and the third quarter
    left = [(0, Q), (2 * Q, 3 * Q)] if segmented else [(0, 2 * Q)]

    async def first() -> None:
        async with store.ingest(digest, SIZE, segmented=segmented) as ing:
            await put(ing, data, left)

    async def second() -> None:
        async with store.ingest(digest, SIZE, segmented=segmented) as ing:
            assert ing.offset == ing.resumed_from == 2 * Q
            assert ing.gaps() == ([(Q, 2 * Q), (3 * Q, SIZE)] if segmented else [(2 * Q, SIZE)])
            await fill_gaps(ing, data)
            assert ing.gaps() == []
            await ing.commit()

    run(first)
    assert not store.has(digest)
    run(second)
    assert store.blob_path(digest).read_bytes() == data
    assert ingest_dirs(store) == []


def test_a_segmented_writer_resumes_a_sequential_prefix(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    data = content(8)
    digest = Digest.of(data)

    async def first() -> None:
        async with store.ingest(digest, SIZE) as ing:
            await put(ing, data, [(0, Q + 7)])

    async def second() -> None:
        async with store.ingest(digest, SIZE, segmented=True) as ing:
            assert ing.resumed_from == Q + 7
            assert ing.gaps() == [(Q + 7, SIZE)]
            await fill_gaps(ing, data)
            await ing.commit()

    run(first)
    run(second)
    assert store.blob_path(digest).read_bytes() == data


# --- concurrent writers of one digest ------------------------------------------------------

_HOLDER = """
import asyncio, sys
from pathlib import Path
from fetchd.model import Digest
from fetchd.store import Store

async def main():
    store, digest = Store.open(Path(sys.argv[1])), Digest.parse(sys.argv[2])
    data, segmented = Path(sys.argv[3]).read_bytes(), sys.argv[4] == "1"
    async with store.ingest(digest, len(data), segmented=segmented) as ing:
        half = len(data) // 2
        await ing.write_at(0, [data[:half]])
        await ing.flush()
        print("holding", flush=True)
        sys.stdin.readline()
        await ing.write_at(half, [data[half:]])
        await ing.commit()
    print("committed", store.has(digest), flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("segmented", KINDS)
def test_a_second_process_waits_for_the_first_and_finds_the_blob(
    tmp_path: Path, segmented: bool
) -> None:
    store = Store.open(tmp_path / "store")
    data = content(9)
    digest = Digest.of(data)
    source = tmp_path / "source"
    source.write_bytes(data)
    argv = [sys.executable, "-c", _HOLDER, str(store.root), str(digest), str(source)]
    holder = subprocess.Popen(
        [*argv, "1" if segmented else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "holding"

        async def second() -> str:
            async with store.ingest(digest, SIZE, segmented=segmented) as ing:
                if ing.exists:
                    return "found it committed"
                await fill_gaps(ing, data)
                await ing.commit()
                return f"wrote it (resumed at {ing.resumed_from})"

        async def go() -> tuple[bool, str]:
            task = asyncio.create_task(second())
            done, _ = await asyncio.wait({task}, timeout=HOLD)
            assert holder.stdin is not None
            holder.stdin.write("go\n")
            holder.stdin.flush()
            return bool(done), await asyncio.wait_for(task, WAIT)

        got_in_early, outcome = asyncio.run(go())
        assert not got_in_early, f"the second writer did not wait for the lock: {outcome}"
        assert outcome == "found it committed"
        assert holder.wait(WAIT) == 0
        assert holder.stdout.read().strip() == "committed True"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(WAIT)
    assert store.blob_path(digest).read_bytes() == data
    assert [p.name for p in (store.blobs / "sha256").iterdir()] == [digest.hex]
    assert ingest_dirs(store) == []


# --- abort and discard ---------------------------------------------------------------------


class Abort(Exception):
    pass


@pytest.mark.parametrize("how", ["return", "raise"])
@pytest.mark.parametrize("segmented", KINDS)
def test_leaving_without_commit_keeps_the_partial_data_and_shows_nothing(
    tmp_path: Path, segmented: bool, how: str
) -> None:
    store = Store.open(tmp_path / "store")
    data = content(10)
    digest = Digest.of(data)
    before = layout_files(store)

    async def abort() -> None:
        async with store.ingest(digest, SIZE, segmented=segmented) as ing:
            await put(ing, data, [(0, Q)])
            if how == "raise":
                raise Abort  # a failed fetch

    if how == "raise":
        with pytest.raises(Abort):
            run(abort)
    else:
        run(abort)
    assert not store.has(digest) and not other_process_has(store, digest)
    assert layout_files(store) == before
    assert ingest_dirs(store) == [f"sha256-{digest.hex}"]
    assert (store.ingests / f"sha256-{digest.hex}" / "data").read_bytes() == data[:Q]

    async def resume() -> int:
        async with store.ingest(digest, SIZE, segmented=segmented) as ing:
            return ing.offset

    assert run(resume) == Q


@pytest.mark.parametrize("segmented", KINDS)
def test_discard_drops_the_partial_data(tmp_path: Path, segmented: bool) -> None:
    store = Store.open(tmp_path / "store")
    data = content(11)
    digest = Digest.of(data)

    async def go() -> None:
        async with store.ingest(digest, SIZE, segmented=segmented) as ing:
            await put(ing, data, [(0, Q)])
            generation = ing.generation
            await ing.discard()
            assert ing.offset == 0 and ing.gaps() == [(0, SIZE)]
            assert ing.generation != generation  # readers of the old bytes must stop
            assert ing.data_path.stat().st_size == 0

    run(go)
    assert not store.has(digest)
    assert ingest_dirs(store) == []


# --- bad resumed data ----------------------------------------------------------------------


def _corrupt(store: Store, digest: Digest, at: int) -> None:
    """Flip one byte of the partial data an earlier writer left (a bad disk, tampering)."""
    with open(store.ingests / f"sha256-{digest.hex}" / "data", "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_bad_resumed_ranges_are_dropped_and_only_they_are_fetched_again(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    data = content(12)
    digest = Digest.of(data)
    resumed = [(0, Q), (2 * Q, 3 * Q)]
    written = [(Q, 2 * Q), (3 * Q, SIZE)]

    async def first() -> None:
        async with store.ingest(digest, SIZE, segmented=True) as ing:
            await put(ing, data, resumed)

    async def second() -> list[tuple[int, int]]:
        async with store.ingest(digest, SIZE, segmented=True) as ing:
            assert ing.resumed_from == 2 * Q
            await fill_gaps(ing, data)
            generation = ing.generation
            with pytest.raises(ResumedDataBad):
                await ing.commit()
            assert not store.has(digest)
            # What this writer wrote is kept; the resumed ranges are gaps again.
            assert ing.gaps() == resumed
            assert ing.offset == sum(b - a for a, b in written)
            assert ing.generation != generation
            refetched = ing.gaps()
            await fill_gaps(ing, data)
            await ing.commit()
            return refetched

    run(first)
    _corrupt(store, digest, 2 * Q + 1000)
    assert run(second) == resumed
    assert store.blob_path(digest).read_bytes() == data
    assert ingest_dirs(store) == []


def test_the_dropped_ranges_stay_dropped_for_the_next_writer(tmp_path: Path) -> None:
    """The state on disk says what is kept: a writer stopped (or killed) after the
    ResumedDataBad resumes only the ranges written since, never the bad ones."""
    store = Store.open(tmp_path / "store")
    data = content(13)
    digest = Digest.of(data)

    async def write(ranges: list[tuple[int, int]]) -> None:
        async with store.ingest(digest, SIZE, segmented=True) as ing:
            await put(ing, data, ranges)

    async def fail_once() -> None:
        async with store.ingest(digest, SIZE, segmented=True) as ing:
            await fill_gaps(ing, data)
            with pytest.raises(ResumedDataBad):
                await ing.commit()

    async def last() -> None:
        async with store.ingest(digest, SIZE, segmented=True) as ing:
            assert ing.gaps() == [(0, Q)]
            await fill_gaps(ing, data)
            await ing.commit()

    run(lambda: write([(0, Q)]))
    _corrupt(store, digest, 5)
    run(fail_once)
    run(last)
    assert store.blob_path(digest).read_bytes() == data


def test_bad_bytes_again_after_the_retry_discard_everything(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    data = content(14)
    digest = Digest.of(data)
    bad = bytearray(data)
    bad[7] ^= 0xFF  # the source itself sends a wrong byte: it is not the old data's fault

    async def first() -> None:
        async with store.ingest(digest, SIZE, segmented=True) as ing:
            await put(ing, bytes(bad), [(0, Q)])

    async def second() -> None:
        async with store.ingest(digest, SIZE, segmented=True) as ing:
            await fill_gaps(ing, data)
            with pytest.raises(ResumedDataBad):
                await ing.commit()
            await fill_gaps(ing, bytes(bad))
            with pytest.raises(DigestMismatch) as caught:
                await ing.commit()
            assert type(caught.value) is DigestMismatch
            assert ing.data_path.stat().st_size == 0

    run(first)
    run(second)
    assert not store.has(digest)
    assert ingest_dirs(store) == []


def test_a_sequential_ingest_with_bad_resumed_data_starts_over(tmp_path: Path) -> None:
    """Its resumed part is a prefix and the rest follows it: all of it is fetched again."""
    store = Store.open(tmp_path / "store")
    data = content(15)
    digest = Digest.of(data)

    async def first() -> None:
        async with store.ingest(digest, SIZE) as ing:
            await put(ing, data, [(0, 2 * Q)])

    async def second() -> None:
        async with store.ingest(digest, SIZE) as ing:
            assert ing.resumed_from == 2 * Q
            await fill_gaps(ing, data)
            with pytest.raises(ResumedDataBad):
                await ing.commit()
            assert ing.gaps() == [(0, SIZE)] and ing.data_path.stat().st_size == 0
            await fill_gaps(ing, data)
            await ing.commit()

    run(first)
    _corrupt(store, digest, Q)
    run(second)
    assert store.blob_path(digest).read_bytes() == data


# --- sizes and the Sink face ---------------------------------------------------------------


@pytest.mark.parametrize("segmented", KINDS)
def test_writing_past_the_size_raises_size_mismatch_and_drops_everything(
    tmp_path: Path, segmented: bool
) -> None:
    store = Store.open(tmp_path / "store")
    data = content(16)
    digest = Digest.of(data)

    async def go() -> None:
        async with store.ingest(digest, SIZE, segmented=segmented) as ing:
            await put(ing, data, [(0, SIZE - 10)])
            with pytest.raises(SizeMismatch) as caught:
                await ing.write_at(SIZE - 10, [data[SIZE - 10 :], b"one too many"])
            assert caught.value.expected == SIZE and caught.value.actual > SIZE
            assert ing.gaps() == [(0, SIZE)] and ing.offset == 0

    run(go)
    assert not store.has(digest)
    assert ingest_dirs(store) == []


def test_a_sequential_ingest_takes_writes_only_at_its_offset(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    data = content(17)
    digest = Digest.of(data)

    async def go() -> None:
        async with store.ingest(digest, SIZE) as ing:
            await put(ing, data, [(0, Q)])
            with pytest.raises(StoreError, match=r"written in order: asked to write at 0"):
                await ing.write_at(0, [data[:Q]])
            with pytest.raises(StoreError, match=r"cannot count bytes written by another"):
                ing.record(Q, 100)
            assert ing.offset == Q and ing.gaps() == [(Q, SIZE)]
            await fill_gaps(ing, data)
            await ing.commit()

    run(go)
    assert store.blob_path(digest).read_bytes() == data


def test_a_segmented_ingest_counts_bytes_another_writer_placed(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "store")
    data = content(18)
    digest = Digest.of(data)

    async def go() -> None:
        async with store.ingest(digest, SIZE, segmented=True) as ing:
            fd = os.open(ing.data_path, os.O_WRONLY)  # as a transfer thread or a swarm would
            try:
                os.pwrite(fd, data[Q:], Q)
            finally:
                os.close(fd)
            ing.record(Q, SIZE - Q)
            assert ing.gaps() == [(0, Q)]
            await fill_gaps(ing, data)
            await ing.commit()

    run(go)
    assert store.blob_path(digest).read_bytes() == data


def test_bytes_handed_over_where_hashing_stands_are_hashed_at_once(tmp_path: Path) -> None:
    """``record(offset, n, pieces)`` where hashing has reached: the pieces are hashed on
    the caller's thread before it returns (no follower, no re-read of the file). Bytes
    placed ahead wait; the follower takes them once the prefix before them is there."""
    store = Store.open(tmp_path / "store")
    data = content(21)
    digest = Digest.of(data)

    def followers() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("fetchd-hash")]

    async def go() -> None:
        async with store.ingest(digest, SIZE, segmented=True) as ing:
            assert isinstance(ing, SegmentedIngest)
            fd = os.open(ing.data_path, os.O_WRONLY)  # as a transfer thread would

            def place(a: int, b: int) -> None:
                os.pwrite(fd, data[a:b], a)
                ing.record(a, b - a, [memoryview(data)[a:b]])

            try:
                place(0, Q)
                assert ing.hashed == Q and followers() == []
                place(2 * Q, SIZE)  # ahead of the hash: left for the follower
                assert ing.hashed == Q
                place(Q, 2 * Q)  # hashed here; what follows it, by the follower
                assert ing.hashed >= 2 * Q
            finally:
                os.close(fd)
            await ing.commit()

    run(go)
    assert store.blob_path(digest).read_bytes() == data


@pytest.mark.parametrize("segmented", KINDS)
def test_also_is_fed_every_byte_in_order_across_a_resume(tmp_path: Path, segmented: bool) -> None:
    """``Store.ingest(also=)``: a reader (serve's torrent builder) sees the blob's bytes in
    order as they are hashed, and a new one sees them all again when an ingest resumes
    (the bytes already there are hashed again)."""
    store = Store.open(tmp_path / "store")
    data = content(20)
    digest = Digest.of(data)
    fed: list[bytearray] = []

    class Collect:
        def __init__(self) -> None:
            fed.append(bytearray())

        def feed(self, chunk: bytes | memoryview) -> None:
            fed[-1] += chunk

    async def go() -> None:
        async with store.ingest(digest, SIZE, segmented=segmented, also=Collect) as ing:
            await put(ing, data, [(0, Q)])
        async with store.ingest(digest, SIZE, segmented=segmented, also=Collect) as ing:
            await fill_gaps(ing, data)
            await ing.commit()

    run(go)
    assert store.blob_path(digest).read_bytes() == data
    assert bytes(fed[-1]) == data


def _swarm_file(tmp_path: Path, seed: int) -> tuple[Store, bytes, Digest, Path]:
    """A store, a blob's bytes and digest, and a file holding them (and more past the
    end), as libtorrent's download file holds a swarm's pieces."""
    data = content(seed)
    other = tmp_path / "swarm"
    other.write_bytes(data + b"past the end")
    return Store.open(tmp_path / "store"), data, Digest.of(data), other


def test_a_segmented_ingest_copies_from_another_file_and_refuses_past_its_size(
    tmp_path: Path,
) -> None:
    """copy_at (the swarm's verified pieces, copied in the kernel): the bytes count as
    written; a copy that would run past the size drops everything (SizeMismatch)."""
    store, data, digest, other = _swarm_file(tmp_path, 19)

    async def go() -> None:
        async with store.ingest(digest, SIZE, segmented=True) as ing:
            assert isinstance(ing, SegmentedIngest)
            fd = os.open(other, os.O_RDONLY)
            try:
                await ing.copy_at(fd, Q, SIZE - Q)
                assert ing.gaps() == [(0, Q)]
                with pytest.raises(SizeMismatch):
                    await ing.copy_at(fd, Q, SIZE - Q + 1)
                assert ing.gaps() == [(0, SIZE)]
                await ing.copy_at(fd, 0, SIZE)
            finally:
                os.close(fd)
            await ing.commit()

    run(go)
    assert store.blob_path(digest).read_bytes() == data


@pytest.mark.parametrize("segmented", KINDS)
def test_every_write_into_the_data_file_holds_the_write_lock(
    tmp_path: Path, segmented: bool
) -> None:
    """Writers of one file take turns on ``Ingest.write_lock`` (the Sink contract): the
    ingest's own writes hold it, as do a segmented ingest's copies from another file
    (ext4 makes writers waiting on the inode spin on the CPU; on the lock they sleep)."""
    store, data, digest, other = _swarm_file(tmp_path, 29)

    async def go() -> None:
        async with store.ingest(digest, SIZE, segmented=segmented) as ing:
            lock = CountingLock()
            ing.write_lock = lock  # type: ignore[assignment]
            await put(ing, data, [(0, Q), (Q, 2 * Q)])
            await ing.flush()
            assert lock.entries >= 2  # one or more per write call
            written = lock.entries
            if isinstance(ing, SegmentedIngest):
                fd = os.open(other, os.O_RDONLY)
                try:
                    await ing.copy_at(fd, 2 * Q, SIZE - 2 * Q)
                finally:
                    os.close(fd)
                assert lock.entries > written
            else:
                await put(ing, data, [(2 * Q, SIZE)])
            await ing.commit()

    run(go)
    assert store.blob_path(digest).read_bytes() == data


def test_copy_gaps_copies_only_what_is_missing_and_refuses_past_its_size(
    tmp_path: Path,
) -> None:
    """copy_gaps (a batch of the swarm's pieces, one job): only the missing parts of the
    spans are copied (bytes already written by another writer stay as they are, and are
    not counted twice); a span past the size drops everything (SizeMismatch)."""
    store, data, digest, other = _swarm_file(tmp_path, 23)

    async def go() -> None:
        async with store.ingest(digest, SIZE, segmented=True) as ing:
            assert isinstance(ing, SegmentedIngest)
            await ing.write_at(Q, [data[Q : 2 * Q]])  # another writer's bytes
            fd = os.open(other, os.O_RDONLY)
            try:
                with pytest.raises(SizeMismatch):
                    await ing.copy_gaps(fd, [(0, Q), (SIZE - Q, SIZE + 1)])
                assert ing.gaps() == [(0, SIZE)]
                await ing.write_at(Q, [data[Q : 2 * Q]])
                copied = await ing.copy_gaps(fd, [(0, 2 * Q), (3 * Q, SIZE)])
                assert copied == Q + (SIZE - 3 * Q)
                assert ing.gaps() == [(2 * Q, 3 * Q)]
                assert await ing.copy_gaps(fd, [(0, SIZE)]) == Q
                assert ing.offset == SIZE and not ing.gaps()
            finally:
                os.close(fd)
            await ing.commit()

    run(go)
    assert store.blob_path(digest).read_bytes() == data


def test_add_range_equals_sorting_and_merging() -> None:
    """The segmented ingest's in-place range insert gives what re-sorting and merging
    every range gave (the function it replaced in record), and counts only new bytes."""
    rng = random.Random(4711)
    for _ in range(300):
        ranges: list[tuple[int, int]] = []
        covered = 0
        for _ in range(rng.randrange(1, 40)):
            a = rng.randrange(0, 200)
            b = a + rng.randrange(1, 30)
            expect = _merge([*ranges, (a, b)])
            added = _add_range(ranges, a, b)
            assert ranges == expect
            assert added == sum(y - x for x, y in expect) - covered
            covered += added


@pytest.mark.parametrize("segmented", KINDS)
def test_the_gaps_of_an_ingest_of_unknown_size_run_to_2_62(tmp_path: Path, segmented: bool) -> None:
    store = Store.open(tmp_path / "store")
    data = content(19, 3000)

    async def go() -> None:
        async with store.ingest(None, None, key="url-unknown", segmented=segmented) as ing:
            assert ing.gaps() == [(0, UNKNOWN_END)] and UNKNOWN_END == 2**62
            if segmented:
                await put(ing, data, [(0, 1000), (2000, 3000)])
                assert ing.gaps() == [(1000, 2000), (3000, UNKNOWN_END)]
            else:
                await put(ing, data, [(0, 1000)])
                assert ing.gaps() == [(1000, UNKNOWN_END)]
            await ing.discard()

    run(go)


@pytest.mark.parametrize("segmented", KINDS)
def test_after_a_mismatch_the_same_ingest_takes_the_blob_from_another_source(
    tmp_path: Path, segmented: bool
) -> None:
    """The engine drops a lying mirror and fetches the blob again in the ingest it holds:
    a mismatch leaves the ingest empty and writable, and the right bytes then commit."""
    store = Store.open(tmp_path / "store")
    data = content(2)
    digest = Digest.of(data)
    wrong = bytes(b ^ 0xFF for b in data)

    async def go() -> None:
        async with store.ingest(digest, SIZE, segmented=segmented) as ing:
            await put(ing, wrong, order(segmented))
            with pytest.raises(DigestMismatch):
                await ing.commit()
            assert not store.has(digest) and ing.offset == 0
            await put(ing, data, order(segmented))
            await ing.commit()

    run(go)
    assert store.blob_path(digest).read_bytes() == data
    assert ingest_dirs(store) == []


def test_a_sequential_writer_resumes_only_the_first_range_a_segmented_one_left(
    tmp_path: Path,
) -> None:
    """Data a segmented writer left has holes: a sequential writer of the same digest
    (the engine chose otherwise this time) resumes its range from 0 only, not the zeros
    of the holes after it, and the segmented state goes."""
    store = Store.open(tmp_path / "store")
    data = content(2)
    digest = Digest.of(data)
    cut = SIZE // 4

    async def go() -> None:
        async with store.ingest(digest, SIZE, segmented=True) as ing:
            await ing.write_at(0, [data[:cut]])
            await ing.write_at(SIZE // 2, [data[SIZE // 2 :]])
        async with store.ingest(digest, SIZE) as ing:
            assert ing.offset == cut
            assert not (ing.path / "state.json").exists()
            await ing.write_at(cut, [data[cut:]])
            await ing.commit()

    run(go)
    assert store.blob_path(digest).read_bytes() == data
