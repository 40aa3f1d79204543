"""fetchd.sources.registry.pump: a body paced by its sender is read in gathered pieces,
and the connection it came on is fit for the next response.

The server is a few lines of our own: a sender that writes its body 1 KiB at a time
(as a rate-limited link delivers packets). Without the low water mark each write woke
the client's loop: about one piece per KiB.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import random
import threading
import time

import aiohttp

from fetchd.sources.registry import LOW_WATER, WRITE_BATCH, pump
from tests.support.servers import QuietHandler, ServerThread

SIZE = 2 << 20
STEP = 1024
PACE = 0.0005  # seconds between the sender's writes


def body() -> bytes:
    return hashlib.sha256(b"paced").digest() * (SIZE // 32)


class _Paced(QuietHandler):
    def do_GET(self) -> None:
        if self.path == "/held":
            self._held()
            return
        data = body() if self.path == "/big" else b"small body"
        gzipped = self.path == "/gzip"
        if gzipped:  # random bytes: the encoded body is longer than the decoded one
            data = gzip.compress(random.Random(7).randbytes(SIZE // 8))
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        self.wfile.flush()
        for i in range(0, len(data), STEP):
            self.wfile.write(data[i : i + STEP])
            self.wfile.flush()
            if self.path == "/big":
                time.sleep(PACE)
        self.owner.served += 1

    def _held(self) -> None:
        """WRITE_BATCH bytes of a longer body, 1 KiB at a time; the rest once released."""
        data = body()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for i in range(0, len(data), STEP):
            if i == WRITE_BATCH:
                self.owner.release.wait(30)
            self.wfile.write(data[i : i + STEP])
            self.wfile.flush()


class Paced(ServerThread):
    def __init__(self) -> None:
        self.served = 0
        self.release = threading.Event()
        super().__init__(_Paced)


def test_a_paced_body_arrives_in_gathered_pieces_and_the_connection_is_reused() -> None:
    async def pull() -> tuple[bytes, int, bytes]:
        pieces: list[bytes] = []

        async def sink(batch: list[bytes], n: int) -> None:
            pieces.extend(batch)

        connector = aiohttp.TCPConnector(limit=1)  # one connection: the second GET reuses it
        async with asyncio.timeout(60), aiohttp.ClientSession(connector=connector) as session:
            async with session.get(f"{server.url}/big") as resp:
                assert resp.status == 200
                await pump(resp, sink)
            # A low water mark left on the socket would keep this small answer (and its
            # head) from ever waking the loop: it would hang until the timeout.
            async with asyncio.timeout(10), session.get(f"{server.url}/small") as resp:
                small = await resp.read()
        return b"".join(pieces), len(pieces), small

    with Paced() as server:
        data, count, small = asyncio.run(pull())
        assert server.served == 2
    assert data == body()
    assert small == b"small body"
    # about SIZE / LOW_WATER pieces (32), and never one per write (2048)
    assert count <= 4 * SIZE // LOW_WATER, count


def test_an_encoded_body_is_read_to_its_end() -> None:
    """A gzip-encoded body: aiohttp hands over decoded pieces while Content-Length
    counts encoded bytes, so no low water mark may be set from it (one above the encoded
    bytes left would never wake the reader: the read would hang)."""

    async def pull() -> bytes:
        pieces: list[bytes] = []

        async def sink(batch: list[bytes], n: int) -> None:
            pieces.extend(batch)

        async with (
            asyncio.timeout(30),
            aiohttp.ClientSession() as session,
            session.get(f"{server.url}/gzip") as resp,
        ):
            assert resp.status == 200
            await pump(resp, sink)
        return b"".join(pieces)

    with Paced() as server:
        assert asyncio.run(pull()) == random.Random(7).randbytes(SIZE // 8)


def test_the_bytes_a_sender_holds_back_after_are_read_while_it_holds() -> None:
    """A sender that stops for a while (a held or stalled answer): what it sent is read
    within GATHER_FOR, not kept in the socket under the low water mark until more comes
    (the engine's cancellation test saw an empty ingest for 20 s)."""

    async def pull() -> int:
        handed: list[int] = []
        first = asyncio.Event()

        async def sink(batch: list[bytes], n: int) -> None:
            handed.append(n)
            first.set()

        async with asyncio.timeout(60), aiohttp.ClientSession() as session:
            resp = await session.get(f"{server.url}/held")
            task = asyncio.create_task(pump(resp, sink))
            try:
                async with asyncio.timeout(10):
                    await first.wait()  # the first batch, while the sender holds
                got = sum(handed)
            finally:
                server.release.set()
            await task
            resp.release()
        assert sum(handed) == SIZE
        return got

    with Paced() as server:
        assert asyncio.run(pull()) == WRITE_BATCH
