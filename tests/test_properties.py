"""Property-based tests of every parser that reads a peer's bytes on the client side.

The property is the same for each: any input either gives a value or raises the
project's own error (a FetchdError) — never another exception (TypeError, KeyError,
RecursionError, ValueError …) — and costs bounded time. Inputs are drawn both at
random and from the grammar (so they get past the first check); each bug found keeps
its regression as an ``@example``. Deterministic (derandomize): CI never flakes on it.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fetchd.errors import FetchdError
from fetchd.manifest import ImageIndex, ImageManifest, docker_to_oci, parse_manifest
from fetchd.model import (
    DOCKER_MANIFEST,
    MAX_BLOB_SIZE,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    Digest,
    Platform,
    Reference,
    load_json,
)
from fetchd.sources.auth import Challenge
from fetchd.sources.http import (
    MAX_DELTA_SECONDS,
    cache_max_age,
    content_range,
    retry_after,
    unsatisfied_length,
)
from fetchd.sources.registry import oci_error_detail

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,  # nothing remembered between runs: each run the same, no .hypothesis/
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

HEX = "0123456789abcdef"
DIGEST = "sha256:" + "a" * 64


def returns_or_fetchd_error(parse: Callable[[], Any]) -> Any:
    """parse()'s value, or None when it raised a FetchdError; anything else fails."""
    try:
        return parse()
    except FetchdError as exc:
        assert "\n" not in str(exc), f"a multi-line error: {exc!r}"
        return None


# --- strategies ----------------------------------------------------------------------

digest_texts = st.one_of(
    st.text(max_size=80),
    st.builds(
        lambda alg, hexpart, tail: f"{alg}:{hexpart}{tail}",
        st.sampled_from(["sha256", "sha512", "md5", "SHA256", "sha256+b64", ""]),
        st.text(alphabet=HEX + "ABCDEF=_-", min_size=0, max_size=130),
        st.sampled_from(["", "\n", " ", "\x00", "²"]),
    ),
)

# mostly valid components, now and then not ("a..b", "-a", "A")
component = st.text(alphabet="ab09._-", min_size=1, max_size=8) | st.sampled_from(["A", ".."])
reference_texts = st.one_of(
    st.text(max_size=120),
    st.builds(
        lambda host, comps, tag, digest, tail: f"{host}{'/'.join(comps)}{tag}{digest}{tail}",
        st.sampled_from(["", "docker://", "127.0.0.1:5000/", "localhost/", "[::1]:5/", "a..b/"]),
        st.lists(component, min_size=1, max_size=4),
        st.sampled_from(["", ":1", ":latest", ":-x", ":" + "t" * 130, ":a\n"]),
        st.sampled_from(["", "@" + DIGEST, "@md5:00", "@" + DIGEST + "\n", "@"]),
        st.sampled_from(["", "\n", "/", ":", "@", " "]),
    ),
)

# JSON values from a peer: any shape, with the fields a descriptor has now and then
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from([DIGEST, "md5:00", OCI_MANIFEST, "application/vnd.oci.image.layer.v1.tar"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(
                ["mediaType", "digest", "size", "urls", "annotations", "platform", "os", "x"]
            ),
            inner,
            max_size=5,
        ),
    ),
    max_leaves=20,
)
descriptor_objects = st.fixed_dictionaries(
    {},
    optional={
        "mediaType": st.one_of(
            st.sampled_from(
                [
                    OCI_MANIFEST,
                    DOCKER_MANIFEST,
                    "application/vnd.oci.image.layer.v1.tar",
                    "application/vnd.docker.image.rootfs.diff.tar.gzip",
                ]
            ),
            json_values,
        ),
        "digest": st.one_of(st.just(DIGEST), digest_texts, json_values),
        "size": st.one_of(
            st.integers(min_value=-1, max_value=2**64), st.just(MAX_BLOB_SIZE), json_values
        ),
        "urls": st.one_of(st.lists(st.text(max_size=10), max_size=2), json_values),
        "annotations": st.one_of(
            st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2), json_values
        ),
        "platform": st.one_of(
            st.fixed_dictionaries(
                {"os": st.just("linux"), "architecture": st.sampled_from(["amd64", "arm64"])},
                optional={"variant": json_values, "os.features": json_values},
            ),
            json_values,
        ),
    },
)
manifest_docs = st.fixed_dictionaries(
    {},
    optional={
        "schemaVersion": st.one_of(st.just(2), json_values),
        "mediaType": st.one_of(
            st.sampled_from([OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST]), json_values
        ),
        "config": st.one_of(descriptor_objects, json_values),
        "layers": st.one_of(st.lists(descriptor_objects, max_size=3), json_values),
        "manifests": st.one_of(st.lists(descriptor_objects, max_size=3), json_values),
    },
)


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc).encode()  # NaN and Infinity as Python writes them: peers do too


manifest_bytes = st.one_of(
    st.binary(max_size=200),
    manifest_docs.map(_dumps),
    st.builds(lambda n, c: c * n, st.integers(1, 3000), st.sampled_from([b"[", b'{"a":'])),
    st.sampled_from(
        [
            b'{"schemaVersion": 2, "size": ' + b"9" * 5000 + b"}",  # over int's digit limit
            b"\xff\xfe{\x00}\x00",  # UTF-16: the specs say UTF-8
            b'{"schemaVersion": 2, "layers": [], "config": {"a": "\\ud800"}}',
        ]
    ),
)


# --- digests and references ----------------------------------------------------------


@PROPERTY
@given(digest_texts)
@example("sha256:" + "a" * 64 + "\n")  # "$" matched before a trailing newline
@example("sha256:" + "a" * 64)
def test_digest_parse(text: str) -> None:
    d = returns_or_fetchd_error(lambda: Digest.parse(text))
    if d is not None:
        assert str(d) == text  # whatever parses is exactly what was given, nothing added
        assert Digest.parse(str(d)) == d


@PROPERTY
@given(reference_texts)
@example("127.0.0.1:5000/app:1\n")  # a tag with a trailing newline passed
@example("127.0.0.1:5000/app\n")  # so did a name
@example("127.0.0.1:5000\n/app:1")  # and a host
@example("app@" + DIGEST + "\n")
def test_reference_parse(text: str) -> None:
    ref = returns_or_fetchd_error(lambda: Reference.parse(text))
    if ref is not None:
        assert not any(c in str(ref) for c in "\n\r\t \x00")
        assert Reference.parse(str(ref)) == ref  # normalised form is a fixed point


@PROPERTY
@given(st.text(max_size=40))
@example("linux/amd64\n")
def test_platform_parse(text: str) -> None:
    returns_or_fetchd_error(lambda: Platform.parse(text))


# --- descriptors, manifests, indexes -------------------------------------------------


@PROPERTY
@given(st.one_of(descriptor_objects, json_values))
@example({"digest": DIGEST, "size": 2**64})  # beyond int64: no size is that big
@example({"digest": DIGEST, "size": 1, "annotations": {"a": {"b": 1}}})  # not strings
@example({"digest": DIGEST, "size": 1, "platform": {"os": ["linux"]}})
def test_descriptor_from_json(obj: Any) -> None:
    d = returns_or_fetchd_error(lambda: Descriptor.from_json(obj, "descriptor"))
    if d is not None:
        assert 0 <= d.size <= MAX_BLOB_SIZE
        assert all(isinstance(v, str) for v in d.annotations.values())
        assert Descriptor.from_json(d.to_json(), "again") == d


@PROPERTY
@given(manifest_bytes, st.sampled_from([None, OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, "x"]))
@example(b"[" * 100_000, None)  # RecursionError escaped as "internal error"
@example(b'{"schemaVersion": 2, "size": ' + b"9" * 5000 + b"}", None)
@example(b'{"schemaVersion": "' + b"x" * 100_000 + b'"}', None)  # the error quoted it all
def test_parse_manifest(raw: bytes, content_type: str | None) -> None:
    parsed = returns_or_fetchd_error(lambda: parse_manifest(raw, content_type, "m"))
    if isinstance(parsed, ImageIndex):
        returns_or_fetchd_error(lambda: parsed.select(Platform("linux", "amd64"), "m"))
    elif parsed is not None:
        assert isinstance(parsed, ImageManifest)


@PROPERTY
@given(manifest_bytes)
@example(b'{"mediaType": "' + DOCKER_MANIFEST.encode() + b'"}')  # KeyError: 'config'
@example(
    b'{"mediaType": "' + DOCKER_MANIFEST.encode() + b'", "config": {}, "layers": [{}]}'
)  # KeyError: 'mediaType'
@example(
    b'{"mediaType": "'
    + DOCKER_MANIFEST.encode()
    + b'", "config": {}, "layers": [{"mediaType": []}]}'
)  # TypeError: unhashable
@example(b"[]")  # AttributeError on a list
def test_docker_to_oci(raw: bytes) -> None:
    out = returns_or_fetchd_error(lambda: docker_to_oci(raw))
    if out is not None:
        assert json.loads(out)["mediaType"] == OCI_MANIFEST


@PROPERTY
@given(manifest_bytes)
def test_load_json_and_oci_error_bodies(raw: bytes) -> None:
    returns_or_fetchd_error(lambda: load_json(raw, "a document"))
    detail = oci_error_detail(raw)  # never raises at all: a bad body is just no detail
    assert "\n" not in detail and len(detail) < 300


@PROPERTY
@given(
    st.fixed_dictionaries(
        {
            "errors": st.lists(
                st.dictionaries(st.sampled_from(["code", "message"]), json_scalars),
                max_size=2,
            )
            | json_scalars
        }
    ).map(_dumps)
)
@example(b'{"errors": [{"code": "X", "message": "a\\nb"}]}')  # one line even so
def test_oci_error_detail_of_error_shaped_bodies(raw: bytes) -> None:
    detail = oci_error_detail(raw)
    assert "\n" not in detail and len(detail) < 300


# --- headers: WWW-Authenticate, Content-Range, Retry-After, Cache-Control ------------

header_text = st.text(
    alphabet=st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=200
)
challenge_headers = st.one_of(
    header_text,
    st.lists(
        st.builds(
            lambda scheme, params: f"{scheme} {params}",
            st.sampled_from(["Bearer", "bearer", "BASIC", "Negotiate", "x"]),
            st.lists(
                st.builds(
                    lambda k, v, q: f'{k}="{v}"' if q else f"{k}={v}",
                    st.sampled_from(["realm", "service", "scope", "error", "REALM"]),
                    st.text(alphabet=string.printable.replace("\n", ""), max_size=20),
                    st.booleans(),
                ),
                max_size=4,
            ).map(",".join),
        ),
        min_size=1,
        max_size=3,
    ).map(", ".join),
)


@PROPERTY
@given(challenge_headers)
@example('bearer realm="http://r/token",service="s"')
@example('Basic realm="a", Bearer realm="http://r/token"')  # Basic was taken, Bearer's realm
@example('Bearer\trealm="http://r/token"')  # a tab made the whole header the scheme
@example('Bearer realm="a\\"b"')  # escapes were kept
@example("Bearer realm=" + '"' * 5000)
def test_challenge_parse(header: str) -> None:
    chs = Challenge.parse_all(header)
    assert len(chs) <= 16
    for ch in chs:
        assert ch.scheme == ch.scheme.lower() and ch.scheme
        assert all(k == k.lower() for k in ch.params)
    best = Challenge.parse(header)
    assert (best is None) == (not chs)
    if any(ch.scheme == "bearer" for ch in chs):
        assert best is not None and best.scheme == "bearer"


def test_challenge_parse_reads_the_parameters_of_each_challenge() -> None:
    chs = Challenge.parse_all(
        'Basic realm="b", bearer realm="http://r/token",service="reg",scope="repository:a:pull"'
    )
    assert [(c.scheme, c.params) for c in chs] == [
        ("basic", {"realm": "b"}),
        (
            "bearer",
            {"realm": "http://r/token", "service": "reg", "scope": "repository:a:pull"},
        ),
    ]
    assert Challenge.parse('Bearer realm="a\\"b"') == Challenge("bearer", {"realm": 'a"b'})


@PROPERTY
@given(
    st.one_of(
        header_text,
        st.builds(
            lambda a, b, c: f"bytes {a}-{b}/{c}",
            st.integers(0, 2**70),
            st.integers(0, 2**70),
            st.one_of(st.integers(0, 2**70), st.just("*")),
        ),
    )
)
@example("bytes 0-1/2\n")
@example("bytes " + "1" * 5000 + "-2/3")  # int() of 5000 digits: ValueError
@example("bytes ١-٢/٣")  # Arabic-Indic digits are \d
@example("bytes 5-1/9")  # last before first
def test_content_range(header: str) -> None:
    got = content_range(header)
    if got is not None:
        first, last, complete = got
        assert 0 <= first <= last < 10**19
        assert complete is None or last < complete
    n = unsatisfied_length(header)
    assert n is None or 0 <= n < 10**19


@PROPERTY
@given(
    st.one_of(
        header_text,
        st.integers(0, 10**30).map(str),
        st.sampled_from(
            [
                "Wed, 21 Oct 2015 07:28:00 GMT",
                "Wed, 21 Oct 2015 07:28:00 -0000",  # naive datetime: TypeError
                "Wed, 21 Oct 99999 07:28:00 GMT",
                "Wed, 21 Oct 2015 07:28:00 +9999",  # offset out of range
                "²",  # isdigit() but not float()
                "9" * 5000,
            ]
        ),
    )
)
@example("Wed, 21 Oct 2015 07:28:00 -0000")
@example("²")
@example("Mon, 01 Jan 1 00:00:00 GMT")
def test_retry_after(value: str) -> None:
    wait = retry_after({"Retry-After": value}, 1.5)
    assert 0 <= wait <= MAX_DELTA_SECONDS


@PROPERTY
@given(
    st.one_of(
        header_text,
        st.lists(
            st.sampled_from(
                ["max-age=60", "max-age=²", "no-cache", "max-age=" + "9" * 400, "x", "max-age="]
            ),
            max_size=4,
        ).map(", ".join),
    )
)
@example("max-age=²")  # isdigit() but not float()
@example("max-age=" + "9" * 400)
def test_cache_max_age(header: str) -> None:
    age = cache_max_age(header)
    assert age is None or 0 <= age <= MAX_DELTA_SECONDS
