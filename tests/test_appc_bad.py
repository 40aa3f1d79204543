"""Bad input for appc pulls (issue 13, the **Bad input** paragraph), each through the real CLI
(``fetchd pull`` / ``fetchd trust`` as a process) against real peers: nginx over TLS with the
test CA (tests.support.appc), actool-built or hand-made ACIs signed by gpg/sq keys
(tests.support.pgp), and, for the answers nginx cannot give (a signature that stalls after its
headers, one that never ends, 202 with a count), a few lines of real HTTPS server here (asyncio
in a thread, a certificate of the same CA).

Every case asserts: exit 1, exactly one ``error:`` line naming what failed, nothing in
STORE/layout/index.json, no blob at all in STORE/layout/blobs (so none of the ACI), no ingest
left with bytes a retry would resume, and a bounded time. The refusals that must come before
the ACI is requested also check the servers' logs for that.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import io
import itertools
import json
import shutil
import ssl
import subprocess
import tarfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.appc import AppcSite, appc_arch, build_aci
from tests.support.cli import Fetchd
from tests.support.pgp import PgpCases
from tests.support.tls import TestCA
from tests.test_pull_appc import NAME, TEMPLATE, aci_path, error_line, publish, root_page, trust

pytest_plugins = ["tests.support.appc", "tests.support.pgp"]

#: every refusal here ends well within this (the slow ones: a stall timeout of 2 s, a request
#: budget of 5 s, three 202 retries of 1 s)
BOUND = 30.0
ARCH = appc_arch()
#: GNU time (package time), for the peak RSS of a pull; an idle pull peaks at 30-60 MiB
TIME = "/usr/bin/time"
MAX_RSS_MIB = 150


# ------------------------------------------------------------------ helpers


def pull(
    fetchd: Fetchd,
    site: AppcSite,
    tmp: Path,
    *args: str,
    peer: Peer | None = None,
    stall: str = "2",
    rss: Path | None = None,
) -> tuple[subprocess.CompletedProcess[str], float]:
    """``fetchd pull`` with the site's --resolve (and the peer's), timed; with ``rss``, run
    under GNU time, which writes the peak resident set (KiB) there (see ``refused``)."""
    extra = []
    if peer:
        for port in (peer.port, peer.http_port):
            extra += ["--resolve", f"peer.example.com:{port}:127.0.0.1"]
    argv = [
        "pull",
        "--trust-dir",
        str(tmp / "trust"),
        "--stall-timeout",
        stall,
        *site.resolve_args(),
        *extra,
        *args,
    ]
    started = time.monotonic()
    got = run_measured(fetchd, argv, site.env(), rss)
    return got, time.monotonic() - started


def run_measured(
    fetchd: Fetchd, argv: list[str], env: dict[str, str] | None, rss: Path | None
) -> subprocess.CompletedProcess[str]:
    if rss is None:
        return fetchd(*argv, env=env, timeout=BOUND * 2)
    return subprocess.run(
        [TIME, "-f", "%M", "-o", str(rss), *fetchd.argv(*argv)],
        capture_output=True,
        text=True,
        env=fetchd.env(env),
        timeout=BOUND * 2,
    )


def peak_rss_mib(rss: Path) -> float:
    """What GNU time wrote: its last line is the peak RSS in KiB."""
    return int(rss.read_text().split()[-1]) / 1024


def refused(
    fetchd: Fetchd,
    got: subprocess.CompletedProcess[str],
    took: float,
    *words: str,
    rss: Path | None = None,
) -> str:
    """The common assertions of a refusal; returns the error line (which has ``words``).
    With ``rss`` (a run under ``pull(…, rss=…)``): its peak RSS stayed under MAX_RSS_MIB."""
    assert got.returncode == 1, got.stderr
    if rss is not None:
        peak = peak_rss_mib(rss)
        assert peak < MAX_RSS_MIB, f"peak RSS {peak:.0f} MiB: {got.stderr}"
    line = error_line(got)
    for w in words:
        assert w in line, line
    assert "internal error" not in got.stderr and "Traceback" not in got.stderr, got.stderr
    assert took < BOUND, f"{took:.1f} s: {line}"
    index = fetchd.store / "layout" / "index.json"
    if index.exists():
        assert json.loads(index.read_text()).get("manifests", []) == [], index.read_text()
    assert fetchd.blobs() == set()
    leftover = [p for p in fetchd.ingests() if p.is_dir() and any(p.iterdir())]
    assert leftover == [], leftover
    return line


def aci_requested(site: AppcSite) -> bool:
    return any(r.split()[1].split("?")[0].endswith(".aci") for r in site.requests())


def tar_aci(out: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    """A gzip'd tar of exactly these members (hand-made: actool would refuse to build them)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    out.write_bytes(gzip.compress(buf.getvalue()))
    return out


def member(
    name: str, data: bytes | None = b"", typ: bytes = tarfile.REGTYPE, **kw: Any
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = typ
    info.mode = 0o755 if typ == tarfile.DIRTYPE else 0o644
    for k, v in kw.items():
        setattr(info, k, v)
    if typ == tarfile.REGTYPE and data is not None:
        info.size = len(data)
        return info, data
    return info, None


def manifest_bytes(name: str = NAME, version: str = "1.0.0", **extra: Any) -> bytes:
    doc = {
        "acKind": "ImageManifest",
        "acVersion": "0.8.11",
        "name": name,
        "labels": [
            {"name": "version", "value": version},
            {"name": "os", "value": "linux"},
            {"name": "arch", "value": ARCH},
        ],
        **extra,
    }
    return json.dumps(doc).encode()


def serve_signed(site: AppcSite, pgp: PgpCases, aci: Path, signer: str = "ed") -> None:
    path = aci_path(NAME, "1.0.0")
    site.put(path, aci)
    site.put(path + ".asc", pgp.sign(signer, aci))


# ------------------------------------------------------------------ a few lines of real server


Handler = Callable[[asyncio.StreamWriter, int], Awaitable[None]]


@dataclass
class Peer:
    """HTTPS on 127.0.0.1:port (certificate of the test CA, names peer.example.com): each
    request's path is looked up in ``routes`` (the handler gets the writer and how many times
    that path was asked, from 1); ``seen`` lists (path, monotonic time) in arrival order."""

    port: int = 0
    #: the same handler over plain http (routes are shared)
    http_port: int = 0
    routes: dict[str, Handler] = field(default_factory=dict)
    seen: list[tuple[str, float]] = field(default_factory=list)
    #: the request headers of each of ``seen`` (lower-case names)
    headers: list[dict[str, str]] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None

    def url(self, path: str) -> str:
        return f"https://peer.example.com:{self.port}{path}"

    def asked(self, path: str) -> list[float]:
        return [t for p, t in self.seen if p == path]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode().split("?")[0]
                lines = head.decode("latin-1").split("\r\n")[1:]
                fields = [ln.split(":", 1) for ln in lines if ":" in ln]
                self.headers.append({k.strip().lower(): v.strip() for k, v in fields})
                self.seen.append((path, time.monotonic()))
                n = sum(1 for p, _ in self.seen if p == path)
                route = self.routes.get(path)
                if route is None:
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                else:
                    await route(writer, n)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


def ok(body: bytes, ctype: str = "application/octet-stream") -> Handler:
    async def answer(w: asyncio.StreamWriter, n: int) -> None:
        w.write(
            f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n".encode()
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    return answer


def redirect(location: str) -> Handler:
    async def answer(w: asyncio.StreamWriter, n: int) -> None:
        w.write(f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode())

    return answer


def deferred(then: bytes | None, times: int = 1, retry: str = "1") -> Handler:
    """202 with Retry-After for the first ``times`` requests, then 200 ``then`` (None: 202
    forever)."""

    async def answer(w: asyncio.StreamWriter, n: int) -> None:
        if then is None or n <= times:
            w.write(
                b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n"
                + f"Retry-After: {retry}\r\n\r\n".encode()
            )
        else:
            await ok(then, "application/pgp-signature")(w, n)

    return answer


async def stall_after_headers(w: asyncio.StreamWriter, n: int) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n-----BEGIN PGP")
    await w.drain()
    await asyncio.sleep(3600)


async def endless(w: asyncio.StreamWriter, n: int) -> None:
    w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    for _ in range(4096):  # 32 MiB at most, whatever the client does
        w.write(b"A" * 8192)
        await w.drain()
        await asyncio.sleep(0)


async def trickle(w: asyncio.StreamWriter, n: int) -> None:
    """A byte every 0.2 s, forever: never stalls, never reaches the size bound."""
    w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
    while not w.is_closing():
        w.write(b"A")
        await w.drain()
        await asyncio.sleep(0.2)


@contextlib.contextmanager
def serve_peer(workdir: Path, ca: TestCA, addr: str = "127.0.0.1", port: int = 0) -> Iterator[Peer]:
    """A Peer on addr:port (0: a free port) for https, and a free port for http."""
    cert, key = ca.issue_server(workdir, ("peer.example.com", "example.com", "127.0.0.1", addr))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    p = Peer()
    ready = threading.Event()
    stop: list[asyncio.Event] = []
    failed: list[BaseException] = []

    async def main() -> None:
        p.loop = asyncio.get_running_loop()
        try:
            server = await asyncio.start_server(p.handle, addr, port, ssl=ctx)
        except OSError as exc:
            failed.append(exc)
            ready.set()
            return
        p.port = server.sockets[0].getsockname()[1]
        plain = await asyncio.start_server(p.handle, addr, 0)
        p.http_port = plain.sockets[0].getsockname()[1]
        done = asyncio.Event()
        stop.append(done)
        ready.set()
        async with server, plain:
            await done.wait()
            server.close()
            plain.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10), "the test server did not start"
    if failed:
        thread.join(10)
        raise failed[0]
    try:
        yield p
    finally:
        assert p.loop is not None
        p.loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)


@pytest.fixture
def peer(tmp_path: Path, tls_ca: TestCA) -> Iterator[Peer]:
    with serve_peer(tmp_path / "peer-tls", tls_ca) as p:
        yield p


def peer_page(site: AppcSite, peer: Peer) -> None:
    """Discovery on nginx (the walk up to the host's page); the endpoints on the peer."""
    template = peer.url("/{name}-{version}-{os}-{arch}.{ext}")
    site.page("/", site.meta(("ac-discovery", "example.com", template)))


PEER_ACI = f"/{NAME}-1.0.0-linux-{ARCH}.aci"


# ------------------------------------------------------------------ signatures and keys


@pytest.mark.parametrize(
    ("signer", "prefix", "words"),
    [
        ("ed", "example.com/other", ("not trusted for example.com/hello", "fetchd trust --prefix")),
        ("stranger", NAME, ("is signed by", "not trusted for example.com/hello")),
        ("exp", NAME, ("expired",)),
        ("rev", NAME, ("revoked",)),
        ("hard", NAME, ("revoked",)),
        ("soft", NAME, ("revoked",)),
        ("weak", NAME, ("RSA-1024", "weaker than RSA-2048")),
    ],
)
def test_signer_refused_before_the_aci(
    fetchd: Fetchd,
    appc_site: AppcSite,
    tmp_path: Path,
    pgp_cases: PgpCases,
    signer: str,
    prefix: str,
    words: tuple[str, ...],
) -> None:
    """A key trusted for another prefix, an untrusted key, expired / hard- / soft-revoked
    keys: refused from the signature alone, with no request for the ACI."""
    publish(appc_site, tmp_path, pgp_cases, signer=signer)
    root_page(appc_site)
    # `fetchd trust` refuses bad keys itself: put the file where the keystore reads it
    d = tmp_path / "trust/trustedkeys/prefix.d" / prefix
    d.mkdir(parents=True)
    key = "ed" if signer == "stranger" else signer
    (d / pgp_cases.fingerprint(key)).write_bytes(pgp_cases.key(key).read_bytes())
    got, took = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    refused(fetchd, got, took, NAME, *words)
    assert not aci_requested(appc_site), appc_site.requests()


def test_tampered_aci_by_name(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    aci = publish(appc_site, tmp_path, pgp_cases)
    data = bytearray(aci.read_bytes())
    data[len(data) // 2] ^= 0xFF
    appc_site.put(aci_path(NAME, "1.0.0"), bytes(data))
    root_page(appc_site)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    got, took = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    refused(fetchd, got, took, NAME)
    first = [r for r in appc_site.requests() if r.split()[1].endswith(".aci")]
    # a second try fetches it again as the first did (nothing resumed), refused the same way
    appc_site.clear_log()
    again, took = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    assert refused(fetchd, again, took, NAME) == error_line(got)
    acis = [r for r in appc_site.requests() if r.split()[1].endswith(".aci")]
    assert acis == first, (first, acis)


# ------------------------------------------------------------------ manifest against request


@pytest.mark.parametrize(
    ("build", "ref", "words"),
    [
        ({"manifest_name": "example.com/other"}, f"{NAME}:1.0.0", ("example.com/other",)),
        ({"labels": {"version": "2.0.0"}}, f"{NAME}:1.0.0", ("version", "2.0.0")),
        (
            {"labels": {"channel": "stable"}},
            f"{NAME},version=1.0.0,channel=beta",
            ("channel", "stable"),
        ),
        ({}, f"{NAME},version=1.0.0,channel=beta", ("channel",)),
    ],
    ids=["name", "version", "label-differs", "label-missing"],
)
def test_manifest_differs_from_the_request(
    fetchd: Fetchd,
    appc_site: AppcSite,
    tmp_path: Path,
    pgp_cases: PgpCases,
    build: dict[str, Any],
    ref: str,
    words: tuple[str, ...],
) -> None:
    publish(appc_site, tmp_path, pgp_cases, **build)
    root_page(appc_site)
    trust(fetchd, tmp_path, pgp_cases, "ed", "example.com")
    got, took = pull(fetchd, appc_site, tmp_path, ref)
    refused(fetchd, got, took, *words)


# ------------------------------------------------------------------ the ACI's structure


def _rootfs(
    *extra: tuple[tarfile.TarInfo, bytes | None],
) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    return [
        member("rootfs", typ=tarfile.DIRTYPE),
        member("rootfs/etc", typ=tarfile.DIRTYPE),
        member("rootfs/etc/hostname", b"x\n"),
        *extra,
        member("manifest", manifest_bytes()),
    ]


@pytest.mark.parametrize(
    ("members", "words"),
    [
        (_rootfs(member("extra.txt", b"x")), ("extra.txt",)),
        (_rootfs(member("rootfs2", typ=tarfile.DIRTYPE)), ("rootfs2",)),
        (_rootfs(member("rootfs/../evil", b"x")), ("..",)),
        (_rootfs(member("/rootfs/abs", b"x")), ("/rootfs/abs",)),
        (
            _rootfs(
                member("rootfs/out", typ=tarfile.SYMTYPE, linkname="/etc"),
                member("rootfs/out/passwd", b"root::0:0::/:/bin/sh\n"),
            ),
            ("rootfs/out",),
        ),
        (
            _rootfs(member("rootfs/hard", typ=tarfile.LNKTYPE, linkname="../../etc/passwd")),
            ("hard",),
        ),
        (_rootfs(member("rootfs/dev/sda", typ=tarfile.BLKTYPE, devmajor=8)), ("dev/sda",)),
        (_rootfs(member("rootfs/etc/hostname", b"y\n")), ("hostname",)),
    ],
    ids=[
        "extra-file",
        "extra-dir",
        "dotdot",
        "absolute",
        "below-symlink",
        "hardlink-out",
        "device",
        "duplicate",
    ],
)
def test_hostile_aci_structure(
    fetchd: Fetchd,
    appc_site: AppcSite,
    tmp_path: Path,
    pgp_cases: PgpCases,
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    words: tuple[str, ...],
) -> None:
    """Extra top-level entries and hostile paths in rootfs/, correctly signed by a trusted
    key: refused by the structure check, before commit."""
    aci = tar_aci(tmp_path / "hostile.aci", members)
    serve_signed(appc_site, pgp_cases, aci)
    root_page(appc_site)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    got, took = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    refused(fetchd, got, took, *words)


# ------------------------------------------------------------------ discovery


def test_discovery_page_of_20_mib(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    publish(appc_site, tmp_path, pgp_cases)
    page = appc_site.meta(("ac-discovery", "example.com", TEMPLATE), body="x" * (20 << 20))
    appc_site.page("/", page)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    rss = tmp_path / "rss"
    got, took = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0", rss=rss)
    line = refused(fetchd, got, took, "discovery of example.com/hello failed", rss=rss)
    assert "example.com:" in line, line
    assert not aci_requested(appc_site)


def test_discovery_page_with_10000_matching_tags(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    publish(appc_site, tmp_path, pgp_cases)
    # short tags, so that the page stays under the page-size bound (1 MiB)
    tags = [
        ("ac-discovery", "example.com", f"https://x/{n}/{{name}}.{{ext}}") for n in range(10_000)
    ]
    appc_site.page("/", appc_site.meta(*tags))
    trust(fetchd, tmp_path, pgp_cases, "ed")
    rss = tmp_path / "rss"
    got, took = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0", rss=rss)
    refused(fetchd, got, took, "discovery of example.com/hello failed", "10000", rss=rss)
    assert not aci_requested(appc_site)


def test_redirect_loop_at_one_level(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """The name's own page redirects to itself (nginx /loop) and the host has no page."""
    trust(fetchd, tmp_path, pgp_cases, "ed", "example.com")
    got, took = pull(fetchd, appc_site, tmp_path, "example.com/loop:1.0.0")
    line = refused(fetchd, got, took, "discovery of example.com/loop failed")
    assert "redirect" in line, line
    loops = [r for r in appc_site.requests() if r.startswith("GET /loop")]
    assert 1 < len(loops) <= 12, loops


def test_redirect_loop_at_every_level(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """loop.example.org redirects every path to itself: each level of the walk is bounded."""
    trust(fetchd, tmp_path, pgp_cases, "ed", "loop.example.org")
    got, took = pull(fetchd, appc_site, tmp_path, "loop.example.org/a/b/app:1.0.0")
    line = refused(fetchd, got, took, "discovery of loop.example.org/a/b/app failed")
    for level in ("loop.example.org/a/b/app", "loop.example.org/a/b", "loop.example.org/a"):
        assert f"{level}:" in line, line
    assert len(appc_site.requests()) <= 4 * 12


@pytest.mark.parametrize("value", ["1.0/x", "1.0?x", "1.0#x", "1%2e0"])
def test_label_values_that_would_change_the_url(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, value: str
) -> None:
    got, took = pull(fetchd, appc_site, tmp_path, f"{NAME},version={value}")
    refused(fetchd, got, took, "label version=", "may not contain")
    assert appc_site.requests() == []


@pytest.mark.parametrize(
    ("prefix", "words"),
    [
        ("example.com/../x", ("..",)),
        ("../x", ("..",)),
        ("example.com/a/..", ("..",)),
        ("https://example.com/app", ("URL scheme",)),
        ("docker+https://example.com/app", ("scheme",)),
    ],
)
def test_trust_prefix_refused(
    fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases, prefix: str, words: tuple[str, ...]
) -> None:
    started = time.monotonic()
    got = fetchd(
        "trust",
        "--trust-dir",
        str(tmp_path / "trust"),
        "--prefix",
        prefix,
        "--skip-fingerprint-review",
        str(pgp_cases.key("ed")),
    )
    refused(fetchd, got, time.monotonic() - started, "--prefix", *words)
    keys = tmp_path / "trust" / "trustedkeys"
    assert not keys.exists() or not any(p.is_file() for p in keys.rglob("*"))


# ------------------------------------------------------------------ signatures that misbehave


@pytest.mark.parametrize(
    ("handler", "words"),
    [
        (stall_after_headers, ("signature", "sent nothing for 1 s")),
        (endless, ("signature", "larger than 64 KiB")),
        (trickle, ("signature", "not complete within")),
    ],
    ids=["stall-after-headers", "endless", "trickle"],
)
def test_signature_that_never_finishes_or_never_ends(
    fetchd: Fetchd,
    appc_site: AppcSite,
    peer: Peer,
    tmp_path: Path,
    pgp_cases: PgpCases,
    handler: Handler,
    words: tuple[str, ...],
) -> None:
    aci = build_aci(tmp_path, NAME, out=tmp_path / "hello.aci")
    peer.routes[PEER_ACI] = ok(aci.read_bytes())
    peer.routes[PEER_ACI + ".asc"] = handler
    peer_page(appc_site, peer)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    # --stall-timeout 1: a stall ends after 1 s, a small request after 5 s in all
    rss = tmp_path / "rss"
    got, took = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0", peer=peer, stall="1", rss=rss)
    refused(fetchd, got, took, NAME, *words, rss=rss)
    assert took < 15, took
    assert peer.asked(PEER_ACI) == []  # the signature first: the ACI never asked


def test_signature_deferred_forever(
    fetchd: Fetchd, appc_site: AppcSite, peer: Peer, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """202 forever: the ACI comes into the ingest, the signature is asked again (Retry-After
    honoured) a bounded number of times, then a clear refusal and the ingest discarded."""
    aci = build_aci(tmp_path, NAME, out=tmp_path / "hello.aci")
    peer.routes[PEER_ACI] = ok(aci.read_bytes())
    peer.routes[PEER_ACI + ".asc"] = deferred(None)
    peer_page(appc_site, peer)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    got, took = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0", peer=peer)
    refused(fetchd, got, took, NAME, "202", "never came")
    asked = peer.asked(PEER_ACI + ".asc")
    assert len(asked) == 4, peer.seen  # once before the ACI, three retries after it
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(asked)), asked


def test_signature_deferred_with_a_huge_retry_after(
    fetchd: Fetchd, appc_site: AppcSite, peer: Peer, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """A Retry-After of a day is capped: the pull ends within the bound, not a day later."""
    aci = build_aci(tmp_path, NAME, out=tmp_path / "hello.aci")
    peer.routes[PEER_ACI] = ok(aci.read_bytes())
    peer.routes[PEER_ACI + ".asc"] = deferred(None, retry="86400")
    peer_page(appc_site, peer)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    got, took = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0", peer=peer)
    refused(fetchd, got, took, NAME, "202")


def test_signature_deferred_once_then_verified(
    fetchd: Fetchd, appc_site: AppcSite, peer: Peer, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """The 202 protocol (APPC.md 1.5): the .asc answers 202 + Retry-After: 1, then 200. The
    ACI is fetched into the ingest in between (not visible: no name, no blob), the second
    request for the signature waits the Retry-After, and the pull succeeds."""
    aci = build_aci(tmp_path, NAME, out=tmp_path / "hello.aci")
    data = aci.read_bytes()
    sig = pgp_cases.sign("ed", aci).read_bytes()
    seen_then: list[dict[str, Any]] = []
    give = deferred(sig, times=1)

    async def asc(w: asyncio.StreamWriter, n: int) -> None:
        if n == 2:  # the ACI is complete in the ingest now; nothing of it may be visible
            index = fetchd.store / "layout" / "index.json"
            ingests = [p / "data" for p in fetchd.ingests() if (p / "data").exists()]
            seen_then.append(
                {
                    "index": json.loads(index.read_text()).get("manifests", [])
                    if index.exists()
                    else [],
                    "blobs": fetchd.blobs(),
                    "ingested": [p.read_bytes() == data for p in ingests],
                }
            )
        await give(w, n)

    peer.routes[PEER_ACI] = ok(data)
    peer.routes[PEER_ACI + ".asc"] = asc
    peer_page(appc_site, peer)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    got, _took = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0", peer=peer)
    assert got.returncode == 0, got.stderr
    assert "signature verified:" in got.stderr
    order = [p for p, _ in peer.seen]
    assert order == [PEER_ACI + ".asc", PEER_ACI, PEER_ACI + ".asc"], order
    first, second = peer.asked(PEER_ACI + ".asc")
    assert second - first >= 1.0  # Retry-After: 1 honoured
    assert seen_then == [{"index": [], "blobs": set(), "ingested": [True]}], seen_then
    entry = fetchd.entry(f"{NAME}:1.0.0")
    assert entry["digest"] == got.stdout.strip()
    blob = fetchd.store / "layout/blobs/sha256" / hashlib.sha256(data).hexdigest()
    assert blob.read_bytes() == data


# ------------------------------------------------------------------ dependencies


def _dep(name: str, **extra: Any) -> dict[str, Any]:
    return {
        "imageName": name,
        "labels": [
            {"name": "version", "value": "1.0.0"},
            {"name": "os", "value": "linux"},
            {"name": "arch", "value": ARCH},
        ],
        **extra,
    }


def _image_id(aci: Path) -> str:
    return "sha512-" + hashlib.sha512(gzip.decompress(aci.read_bytes())).hexdigest()


@pytest.mark.parametrize("case", ["image-id", "size", "cycle", "self"])
def test_bad_dependency(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases, case: str
) -> None:
    base_name = "example.com/base"
    if case == "cycle":
        publish(appc_site, tmp_path, pgp_cases, name=base_name, app=False, deps=[_dep(NAME)])
        publish(appc_site, tmp_path, pgp_cases, deps=[_dep(base_name)])
        words: tuple[str, ...] = ("dependency cycle", f"{NAME} → {base_name} → {NAME}")
    elif case == "self":
        publish(appc_site, tmp_path, pgp_cases, deps=[_dep(NAME)])
        words = ("dependency cycle", f"{NAME} → {NAME}")
    else:
        base = publish(appc_site, tmp_path, pgp_cases, name=base_name, app=False)
        if case == "image-id":
            wrong = "sha512-" + ("0" * 32 if _image_id(base)[7] != "0" else "1" * 32)
            dep = _dep(base_name, imageID=wrong)
            words = (base_name, "image ID", "parent's manifest requires")
        else:
            size = len(gzip.decompress(base.read_bytes()))
            dep = _dep(base_name, size=size - 512)
            words = (base_name, f"larger than its size {size - 512}")
        publish(appc_site, tmp_path, pgp_cases, deps=[dep])
    root_page(appc_site)
    trust(fetchd, tmp_path, pgp_cases, "ed", "example.com")
    got, took = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    refused(fetchd, got, took, *words)


# ------------------------------------------------------------------ --torrent ("rkt torrent pull")

TORRENT = "application/x-bittorrent"


def _swarm_tools() -> bool:
    return all(shutil.which(p) for p in ("opentracker", "aria2c", "mktorrent"))


@contextlib.contextmanager
def seeded(tmp: Path, data: bytes) -> Iterator[bytes]:
    """``data`` as one file seeded by aria2c (tests/test_pull_foreign_torrent.py's setup:
    mktorrent, opentracker on 127.0.0.1, the seeder counted by the tracker first); yields
    the .torrent's bytes."""
    from tests.support.procs import Proc, free_port
    from tests.test_pull_foreign_torrent import ARIA2, mktorrent, start_tracker

    data_dir = tmp / "seed"
    data_dir.mkdir(parents=True)
    (data_dir / "image.aci").write_bytes(data)
    torrent = tmp / "image.torrent"
    port = free_port()
    mktorrent(data_dir / "image.aci", torrent, f"http://127.0.0.1:{port}/announce")
    tracker, ih = start_tracker(tmp, torrent, port)
    log = tmp / "aria2.log"
    argv = [*ARIA2, f"--listen-port={free_port()}", "-d", str(data_dir), str(torrent)]
    try:
        with Proc(argv, log):
            tracker.wait_seeded(ih, log)
            yield torrent.read_bytes()
    finally:
        tracker.close()


def torrent_or_aci(peer: Peer, torrent: bytes, aci: bytes) -> Handler:
    """Quay's answer: the .torrent to ``Accept: application/x-bittorrent``, else the ACI."""

    async def answer(w: asyncio.StreamWriter, n: int) -> None:
        wants = TORRENT in peer.headers[-1].get("accept", "")
        await (ok(torrent, TORRENT) if wants else ok(aci))(w, n)

    return answer


def aci_gets(peer: Peer) -> list[str]:
    """The Accept header of each request for the ACI."""
    return [
        h.get("accept", "")
        for (p, _), h in zip(peer.seen, peer.headers, strict=True)
        if p == PEER_ACI
    ]


@pytest.mark.skipif(not _swarm_tools(), reason="needs opentracker, aria2c and mktorrent")
@pytest.mark.parametrize("tampered", [False, True], ids=["swarm", "tampered-swarm"])
def test_torrent_pull(
    fetchd: Fetchd,
    appc_site: AppcSite,
    peer: Peer,
    tmp_path: Path,
    pgp_cases: PgpCases,
    tampered: bool,
) -> None:
    """--torrent: the ACI's URL answers a torrent to Accept: application/x-bittorrent; the
    bytes come from the swarm (an aria2c seeder), never from the URL, and discovery + the
    signature stay the authority: a swarm seeding other bytes (a torrent of a tampered ACI)
    is refused before commit, nothing stored, nothing to resume."""
    aci = build_aci(tmp_path, NAME, out=tmp_path / "hello.aci")
    data = aci.read_bytes()
    sig = pgp_cases.sign("ed", aci).read_bytes()
    seeded_bytes = bytearray(data)
    if tampered:
        seeded_bytes[len(data) // 2] ^= 0xFF
    with seeded(tmp_path / "bt", bytes(seeded_bytes)) as torrent:
        peer.routes[PEER_ACI] = torrent_or_aci(peer, torrent, data)
        peer.routes[PEER_ACI + ".asc"] = ok(sig, "application/pgp-signature")
        peer_page(appc_site, peer)
        trust(fetchd, tmp_path, pgp_cases, "ed")
        got, took = pull(fetchd, appc_site, tmp_path, "--torrent", f"{NAME}:1.0.0", peer=peer)
        # the signature first, then the torrent asked for; the ACI's body never over HTTP
        order = [p for p, _ in peer.seen]
        assert order[:1] == [PEER_ACI + ".asc"], (order, got.stderr)
        if tampered:
            refused(fetchd, got, took, NAME, "signature")
            assert aci_gets(peer) == [TORRENT], aci_gets(peer)
            return
    assert got.returncode == 0, got.stderr
    assert aci_gets(peer) == [TORRENT], aci_gets(peer)
    assert "signature verified:" in got.stderr
    entry = fetchd.entry(f"{NAME}:1.0.0")
    assert entry["digest"] == got.stdout.strip()
    blob = fetchd.store / "layout/blobs/sha256" / hashlib.sha256(data).hexdigest()
    assert blob.read_bytes() == data


def test_torrent_not_offered_is_plain_http(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """--torrent against a server that ignores the Accept header (nginx sends the ACI): the
    answer is not read as a torrent, the ACI comes over HTTP, verified as ever."""
    aci = publish(appc_site, tmp_path, pgp_cases)
    root_page(appc_site)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    got, _took = pull(fetchd, appc_site, tmp_path, "--torrent", f"{NAME}:1.0.0")
    assert got.returncode == 0, got.stderr
    assert "signature verified:" in got.stderr
    layer = hashlib.sha256(aci.read_bytes()).hexdigest()
    assert (fetchd.store / "layout/blobs/sha256" / layer).read_bytes() == aci.read_bytes()


# ------------------------------------------------------------------ review findings


def test_signature_hop_over_http_refused(
    fetchd: Fetchd, appc_site: AppcSite, peer: Peer, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """The signature's redirects are checked hop by hop: https → http → https is refused
    without --insecure-options http (not only the last hop), and the ACI is never asked."""
    aci = build_aci(tmp_path, NAME, out=tmp_path / "hello.aci")
    sig = pgp_cases.sign("ed", aci).read_bytes()
    peer.routes[PEER_ACI] = ok(aci.read_bytes())
    hop = f"http://peer.example.com:{peer.http_port}/hop.asc"
    peer.routes[PEER_ACI + ".asc"] = redirect(hop)
    peer.routes["/hop.asc"] = redirect(peer.url("/final.asc"))
    peer.routes["/final.asc"] = ok(sig, "application/pgp-signature")
    peer_page(appc_site, peer)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    got, took = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0", peer=peer)
    refused(fetchd, got, took, "redirected to plain HTTP", "--insecure-options http")
    assert peer.asked(PEER_ACI) == [] and peer.asked("/final.asc") == [], peer.seen


def test_local_junk_with_a_real_signature_of_other_bytes(
    fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """A local .aci is not unpacked before its signature verified: a gzip bomb signed by a
    trusted key, but the signature over other bytes, fails at the signature."""
    other = tmp_path / "other.bin"
    other.write_bytes(b"something else\n")
    sig = pgp_cases.sign("ed", other)
    bomb = tmp_path / "bomb.aci"
    bomb.write_bytes(gzip.compress(b"\0" * (64 << 20)))
    trust(fetchd, tmp_path, pgp_cases, "ed")
    started = time.monotonic()
    got = fetchd("pull", "--trust-dir", str(tmp_path / "trust"), "--signature", str(sig), str(bomb))
    line = refused(fetchd, got, time.monotonic() - started, "signature does not match")
    assert "not an ACI" not in line and "manifest" not in line, line


def test_signature_fifo_refused_at_once(
    fetchd: Fetchd, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """--signature naming a FIFO (or any non-regular file) is refused at once, not read
    forever on the event loop past --deadline."""
    import os

    aci = build_aci(tmp_path, NAME, out=tmp_path / "hello.aci")
    fifo = tmp_path / "sig.fifo"
    os.mkfifo(fifo)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    started = time.monotonic()
    got = fetchd(
        "pull",
        "--trust-dir",
        str(tmp_path / "trust"),
        "--deadline",
        "5",
        "--signature",
        str(fifo),
        str(aci),
        timeout=BOUND,
    )
    took = time.monotonic() - started
    assert got.returncode != 0 and took < 10, (took, got.stderr)
    assert "is not a regular file" in error_line(got)
    assert fetchd.blobs() == set()


# ------------------------------------------------------------------ acceptance audit (issue 13)


def test_bzip2_bomb_signed_by_a_trusted_key(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """A decompression bomb whose signature verifies (a trusted key signed it): the structure
    check stops it by its bound, streaming (peak RSS bounded), before commit. bzip2, since
    gzip cannot expand past the 1100x ratio: 20 streams of 16 MiB of zeros, 320 MiB in all,
    over the 256 MiB floor, from a few KiB."""
    import bz2

    bomb = tmp_path / "bomb.aci"
    bomb.write_bytes(bz2.compress(b"\0" * (16 << 20)) * 20)
    sig = pgp_cases.sign("ed", bomb)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    rss = tmp_path / "rss"
    argv = ["pull", "--trust-dir", str(tmp_path / "trust"), "--signature", str(sig), str(bomb)]
    started = time.monotonic()
    got = run_measured(fetchd, argv, None, rss)
    line = refused(fetchd, got, time.monotonic() - started, "decompression bomb", rss=rss)
    assert "signature does not match" not in line, line


def _two_endpoints(site: AppcSite, first: str, second: str) -> None:
    site.page(
        "/",
        site.meta(
            ("ac-discovery", "example.com", first + "/{name}-{version}-{os}-{arch}.{ext}"),
            ("ac-discovery", "example.com", second + "/{name}-{version}-{os}-{arch}.{ext}"),
        ),
    )


@pytest.mark.parametrize("first", ["asc-404", "connection-refused"])
def test_every_matching_endpoint_is_tried_in_order(
    fetchd: Fetchd,
    appc_site: AppcSite,
    peer: Peer,
    tmp_path: Path,
    pgp_cases: PgpCases,
    first: str,
) -> None:
    """Two ac-discovery templates for the name: the first endpoint's .asc is a 404 (or its
    host refuses connections), the second serves a good signed ACI: the pull succeeds, the
    first endpoint asked before the second."""
    aci = build_aci(tmp_path, NAME, out=tmp_path / "hello.aci")
    sig = pgp_cases.sign("ed", aci).read_bytes()
    peer.routes["/b" + PEER_ACI] = ok(aci.read_bytes())
    peer.routes["/b" + PEER_ACI + ".asc"] = ok(sig, "application/pgp-signature")
    extra: list[str] = []
    if first == "asc-404":
        _two_endpoints(appc_site, peer.url("/a"), peer.url("/b"))
    else:
        from tests.support.procs import free_port

        closed = free_port()
        extra = ["--resolve", f"closed.example.com:{closed}:127.0.0.1"]
        _two_endpoints(appc_site, f"https://closed.example.com:{closed}/a", peer.url("/b"))
    trust(fetchd, tmp_path, pgp_cases, "ed")
    got, _took = pull(fetchd, appc_site, tmp_path, *extra, f"{NAME}:1.0.0", peer=peer)
    assert got.returncode == 0, got.stderr
    assert "signature verified:" in got.stderr
    order = [p for p, _ in peer.seen]
    want = ["/b" + PEER_ACI + ".asc", "/b" + PEER_ACI]
    assert order == (["/a" + PEER_ACI + ".asc"] if first == "asc-404" else []) + want, order
    assert fetchd.entry(f"{NAME}:1.0.0")["digest"] == got.stdout.strip()


@pytest.mark.parametrize("case", ["name", "hostile-tar"])
def test_insecure_image_keeps_the_other_checks(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases, case: str
) -> None:
    """--insecure-options image skips the signature only: an unsigned ACI whose manifest names
    another image, or with an entry outside rootfs/, is still refused (with the warning)."""
    if case == "name":
        publish(appc_site, tmp_path, pgp_cases, signer=None, manifest_name="example.com/other")
        words: tuple[str, ...] = ("example.com/other",)
    else:
        aci = tar_aci(tmp_path / "hostile.aci", _rootfs(member("extra.txt", b"x")))
        appc_site.put(aci_path(NAME, "1.0.0"), aci)
        words = ("extra.txt",)
    root_page(appc_site)
    got, took = pull(fetchd, appc_site, tmp_path, "--insecure-options", "image", f"{NAME}:1.0.0")
    refused(fetchd, got, took, *words)
    assert "image signature verification has been disabled" in got.stderr
    assert aci_requested(appc_site)  # refused by the checks of the bytes, not earlier


def test_dependency_signed_by_a_key_of_its_parent_only(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """A dependency is verified for its own name: the key trusted for the parent's name
    (example.com/hello) does not vouch for example.com/base, and the base ACI is never asked."""
    base_name = "example.com/base"
    publish(appc_site, tmp_path, pgp_cases, name=base_name, app=False)
    publish(appc_site, tmp_path, pgp_cases, deps=[_dep(base_name)])
    root_page(appc_site)
    trust(fetchd, tmp_path, pgp_cases, "ed", NAME)
    got, took = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    line = refused(fetchd, got, took, base_name, f"not trusted for {base_name}")
    assert f"fetchd trust --prefix {base_name}" in line, line
    assert not any(aci_path(base_name, "1.0.0") == r.split()[1] for r in appc_site.requests())


def test_plain_http_aci_url_needs_insecure_http(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """http://HOST/….aci is refused without --insecure-options http (no request made), and
    pulled with it (nginx's :80 serves the same files)."""
    aci = publish(appc_site, tmp_path, pgp_cases)
    trust(fetchd, tmp_path, pgp_cases, "ed")
    url = appc_site.url(aci_path(NAME, "1.0.0"), scheme="http")
    got, took = pull(fetchd, appc_site, tmp_path, url)
    refused(fetchd, got, took, "plain HTTP", "--insecure-options http")
    assert appc_site.requests() == []
    got, _took = pull(fetchd, appc_site, tmp_path, "--insecure-options", "http", url)
    assert got.returncode == 0, got.stderr
    assert "signature verified:" in got.stderr
    schemes = {sch for _m, u, _s, _h, sch in appc_site.entries() if u.startswith("/images/")}
    assert schemes == {"http"}, appc_site.entries()
    layer = hashlib.sha256(aci.read_bytes()).hexdigest()
    assert (fetchd.store / "layout/blobs/sha256" / layer).read_bytes() == aci.read_bytes()


def _free_443() -> str:
    import socket

    for n in range(1, 21):
        addr = f"127.44.0.{n}"
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((addr, 443))
            except OSError:
                continue
            return addr
    raise RuntimeError("no 127.44.0.N:443 free")


@pytest.mark.parametrize("where", ["REGISTRY_AUTH_FILE", "docker-config"])
def test_no_credentials_on_discovery_requests(
    fetchd: Fetchd, tmp_path: Path, tls_ca: TestCA, pgp_cases: PgpCases, where: str
) -> None:
    """Registry credentials configured for the discovery host are not sent with discovery
    (nor the signature, nor the ACI): the page is on a Peer on :443 that logs headers."""
    aci = build_aci(tmp_path, NAME, out=tmp_path / "hello.aci")
    sig = pgp_cases.sign("ed", aci).read_bytes()
    secret = base64.b64encode(b"user:hunter2").decode()
    auths = json.dumps(
        {"auths": {h: {"auth": secret} for h in ("example.com", "https://example.com")}}
    )
    env: dict[str, str] = {"SSL_CERT_FILE": str(tls_ca.ca_path)}
    if where == "REGISTRY_AUTH_FILE":
        (tmp_path / "auth.json").write_text(auths)
        env["REGISTRY_AUTH_FILE"] = str(tmp_path / "auth.json")
    else:
        (fetchd.home / ".docker").mkdir()
        (fetchd.home / ".docker/config.json").write_text(auths)
    addr = _free_443()
    with serve_peer(tmp_path / "tls443", tls_ca, addr, 443) as p:
        template = "https://example.com/i/{name}-{version}-{os}-{arch}.{ext}"
        page = AppcSite.meta(("ac-discovery", "example.com", template)).encode()
        p.routes["/"] = ok(page, "text/html")
        p.routes["/i" + PEER_ACI] = ok(aci.read_bytes())
        p.routes["/i" + PEER_ACI + ".asc"] = ok(sig, "application/pgp-signature")
        trust(fetchd, tmp_path, pgp_cases, "ed")
        got = fetchd(
            "pull",
            "--trust-dir",
            str(tmp_path / "trust"),
            "--resolve",
            f"example.com:443:{addr}",
            f"{NAME}:1.0.0",
            env=env,
            timeout=BOUND * 2,
        )
    assert got.returncode == 0, got.stderr
    paths = [path for path, _ in p.seen]
    assert paths[:2] == ["/hello", "/"] and paths[-1] == "/i" + PEER_ACI, paths
    assert [h for h in p.headers if "authorization" in h] == [], p.headers


def test_trust_dir_reads_an_rkt_keystore_as_it_is(
    fetchd: Fetchd, appc_site: AppcSite, tmp_path: Path, pgp_cases: PgpCases
) -> None:
    """DIR/trustedkeys/prefix.d/example.com/hello/<fingerprint> laid out as `rkt trust`
    writes it (armored key, no fetchd command involved): `fetchd pull --trust-dir DIR` uses
    it. (The vendor dir is only /usr/lib/rkt behind --trust-dir /etc/rkt, so the masking
    of a vendor key by an empty local file is tested in tests/test_keystore.py.)"""
    publish(appc_site, tmp_path, pgp_cases)
    root_page(appc_site)
    d = tmp_path / "trust/trustedkeys/prefix.d/example.com/hello"
    d.mkdir(parents=True)
    (d / pgp_cases.fingerprint("ed")).write_bytes(pgp_cases.key("ed").read_bytes())
    got, _took = pull(fetchd, appc_site, tmp_path, f"{NAME}:1.0.0")
    assert got.returncode == 0, got.stderr
    assert fetchd.entry(f"{NAME}:1.0.0")["annotations"]["io.fetchd.appc.signer"] == (
        pgp_cases.fingerprint("ed")
    )
