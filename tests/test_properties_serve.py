"""Property tests of what `fetchd serve` parses from a client's bytes (issue 9).

The parsers (fetchd.server.request: the /v2/ path, ``Range``, ``Accept``; the upstream
router's ``ns=``) either return a value or raise fetchd's own error that the server maps
to a 4xx, never another exception, and take time in proportion to their input. Then the
same inputs go to a real `fetchd serve` over raw sockets: never a 500.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fetchd.errors import DigestInvalid, RangeNotSatisfiable, ReferenceInvalid
from fetchd.model import is_valid_repository_name
from fetchd.server.request import ByteRange, accepts, parse_path, parse_range
from fetchd.server.upstreams import Upstream, Upstreams
from tests.support.fakeregistry import Answer, FakeRegistry, sha256
from tests.support.serve import ServeProcess, start_serve

FAST = settings(max_examples=100, deadline=1000, derandomize=True, database=None)
E2E = settings(
    max_examples=40,
    derandomize=True,
    database=None,
    deadline=None,  # bounded by the socket's timeout instead: the machine may be loaded
    suppress_health_check=[HealthCheck.too_slow],
)

# --- Range ------------------------------------------------------------------------------------

positions = st.one_of(
    st.integers(0, 2000).map(str),
    st.integers(0, 1 << 70).map(str),
    st.text("0123456789", min_size=1, max_size=40),
    st.sampled_from(["", " ", "-1", "+1", "1.5", "0x10", "١", "²", "9" * 5000]),
)
range_specs = st.one_of(
    st.builds(lambda a, b: f"{a}-{b}", positions, positions),
    st.builds(lambda a: f"-{a}", positions),
    st.builds(lambda a: f"{a}-", positions),
    st.text(max_size=60),
)
range_headers = st.one_of(
    st.builds(
        lambda unit, spec: f"{unit}={spec}",
        st.sampled_from(["bytes", "Bytes", " bytes "]),
        range_specs,
    ),
    st.builds(lambda a, b: f"bytes={a},{b}", range_specs, range_specs),
    st.text(max_size=200),
)
sizes = st.one_of(st.integers(0, 2000), st.integers(0, (1 << 63) - 1))


def model_range(header: str, size: int) -> tuple[int, int] | str | None:
    """What RFC 9110 says for one well-formed bytes=FIRST-LAST / bytes=-SUFFIX ("416")."""
    m = re.fullmatch(r"bytes=([0-9]*)-([0-9]*)", header)
    assert m
    first, last = m.groups()
    if not first:
        n = int(last)
        return "416" if n == 0 or size == 0 else (max(0, size - n), size - 1)
    start = int(first)
    end = int(last) if last else size - 1
    if end < start or start >= size:
        return "416"
    return (start, min(end, size - 1))


@FAST
@given(range_headers, sizes)
def test_parse_range_returns_a_range_of_the_blob_or_refuses(header: str, size: int) -> None:
    started = time.monotonic()
    try:
        rng = parse_range(header, size)
    except RangeNotSatisfiable as exc:
        assert exc.size == size
        rng = None
    if rng is not None:
        assert isinstance(rng, ByteRange)
        assert 0 <= rng.start <= rng.end < size
        assert rng.content_range(size) == f"bytes {rng.start}-{rng.end}/{size}"
    assert time.monotonic() - started < 0.5


@FAST
@given(
    st.integers(0, 1 << 40).map(str) | st.just(""),
    st.integers(0, 1 << 40).map(str) | st.just(""),
    sizes,
)
def test_parse_range_agrees_with_rfc_9110(first: str, last: str, size: int) -> None:
    if not first and not last:
        return
    header = f"bytes={first}-{last}"
    want = model_range(header, size)
    try:
        rng = parse_range(header, size)
        got: tuple[int, int] | str | None = None if rng is None else (rng.start, rng.end)
    except RangeNotSatisfiable:
        got = "416"
    assert got == want, header


# --- the /v2/ path, Accept, ns= -----------------------------------------------------------------

components = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,4})?", fullmatch=True)
names = st.lists(components, min_size=1, max_size=4).map("/".join)
lasts = st.one_of(
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
    st.builds(lambda h: f"sha256:{h}", st.text("0123456789abcdef", min_size=60, max_size=68)),
    st.sampled_from(["list", "..", ".", "", "sha256:", "md5:00", "a\n", "t" * 129]),
    st.text(max_size=80),
)
paths = st.one_of(
    st.builds(
        lambda n, k, last: f"{n}/{k}/{last}",
        names | st.text(max_size=40),
        st.sampled_from(["manifests", "blobs", "tags", "other"]),
        lasts,
    ),
    st.text(max_size=300),
)


@FAST
@given(paths)
def test_parse_path_returns_an_endpoint_or_a_name_or_digest_error(raw: str) -> None:
    try:
        path = parse_path(raw)
    except (ReferenceInvalid, DigestInvalid):
        return
    if path is None:
        return
    assert is_valid_repository_name(path.name)
    assert ".." not in path.name.split("/") and "%" not in raw
    assert path.kind in ("manifests", "blobs", "tags")
    if path.kind == "blobs":
        assert path.digest is not None
    if path.kind == "manifests":
        assert (path.digest is None) != (path.tag is None)
        if path.tag is not None:
            assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", path.tag)


@FAST
@given(st.lists(st.text(max_size=100), max_size=4), st.text(max_size=60))
def test_accepts_is_a_yes_or_no(values: list[str], media_type: str) -> None:
    assert accepts(values, media_type) in (True, False)
    assert accepts([], media_type)
    assert accepts(["*/*"], media_type)


UPSTREAMS = Upstreams(
    [
        Upstream.parse("http://127.0.0.1:1"),
        Upstream.parse("docker.io=http://127.0.0.1:2"),
        Upstream.parse("quay.io=http://127.0.0.1:3"),
    ]
)


@FAST
@given(names, st.none() | st.text(max_size=100))
def test_routing_by_ns_returns_a_route_or_none(name: str, ns: str | None) -> None:
    route = UPSTREAMS.route(name, ns)
    if route is not None:
        assert route.upstream in UPSTREAMS.all
        assert is_valid_repository_name(route.repository)


# --- the same bytes against a real fetchd serve ------------------------------------------------

BLOB = os.urandom(3000)


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with FakeRegistry() as fake:
        fake.image("prop/img", {"digest": sha256(BLOB), "size": len(BLOB)}, Answer(BLOB))
        store = tmp_path_factory.mktemp("serve-properties") / "store"
        with start_serve(store, [fake.url]) as cache:
            assert cache.get("/v2/prop/img/manifests/1").status == 200
            assert cache.get(f"/v2/prop/img/blobs/{sha256(BLOB)}").body == BLOB
            yield cache


def exchange(port: int, request: bytes) -> int | None:
    """The status of the server's answer; None if it closed or reset the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        try:
            sock.sendall(request)
            head = b""
            while b"\r\n" not in head and len(head) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                head += chunk
        except (ConnectionResetError, BrokenPipeError):
            return None
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.") else None


header_values = st.text(
    st.characters(codec="latin-1", blacklist_characters="\r\n\x00"), max_size=300
)


@E2E
@given(range_headers.filter(lambda h: not set(h) & set("\r\n\x00") and h.isascii()))
def test_serve_answers_any_range_with_200_206_or_416(serve: ServeProcess, header: str) -> None:
    request = (
        f"GET /v2/prop/img/blobs/{sha256(BLOB)} HTTP/1.1\r\nHost: x\r\nRange: {header}\r\n"
        "Connection: close\r\n\r\n"
    )
    assert exchange(serve.port, request.encode()) in (200, 206, 416, 400)


@E2E
@given(
    paths.filter(lambda p: p.isprintable() and " " not in p and p.isascii()),
    st.none() | st.text("abcdefghijklmnopqrstuvwxyz0123456789.:-%", max_size=30),
    header_values,
)
def test_serve_never_answers_a_path_ns_or_accept_with_a_500(
    serve: ServeProcess, raw: str, ns: str | None, accept: str
) -> None:
    target = f"/v2/{raw}" + (f"?ns={ns}" if ns is not None else "")
    request = (
        f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
        + b"Accept: "
        + accept.encode("latin-1")
        + b"\r\nAuthorization: "
        + accept.encode("latin-1")
        + b"\r\n\r\n"
    )
    status = exchange(serve.port, request)
    assert status is None or status < 500 or status in (502, 504), (target, status)


def test_the_serve_properties_left_the_server_healthy(serve: ServeProcess) -> None:
    assert serve.get("/healthz").status == 200
    assert json.loads(serve.get("/fetchd/v1/status").body)["hits"] >= 1
