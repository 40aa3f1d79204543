"""appc meta discovery (appc discovery/discovery.go), made safer and bounded.

For a name ``example.com/group/app`` the walk asks ``https://example.com/group/app?ac-discovery=1``,
then ``https://example.com/group?ac-discovery=1``, then ``https://example.com?ac-discovery=1``
(the name has no port: always 443, or 80 for the http fallback), and stops at the first level
whose page has at least one usable tag of the kind wanted: ``ac-discovery`` templates for
:func:`discover_endpoints`, ``ac-discovery-pubkeys`` URLs for :func:`discover_pubkeys` (two
separate walks, as appc's). A tag is ``<meta name="ac-discovery" content="PREFIX URI">`` anywhere
in the page; ``content`` is trimmed and split on its first space. Templates are rendered with
``{name}``, every label (``{version}`` is ``latest`` when not given) and ``{ext}`` (``aci`` /
``aci.asc``); a template with a variable left over (``{channel}`` for a name without that label)
is skipped. Every matching endpoint is returned, in document order.

Where appc/rkt were unsafe, fetchd is stricter (the README's differences list):

- a tag's PREFIX matches the name by path component (``example.com/mult`` does not match
  ``example.com/multi``; appc used a string prefix, appc/spec#592);
- the http fallback (``--insecure-options http``) happens only when the https attempt failed
  in transport or TLS, not on a 404 or other answer; an https page that redirects to
  ``http://`` is refused without ``--insecure-options http`` (Go's client followed it);
- bounded: ≤ 5 redirects per level (Go: 10), a page ≤ 1 MiB (read bounded; no limit in appc),
  ≤ 64 matching tags of the wanted kind per level (more fails that level; appc took 10,000),
  each level ≤ min(stall timeout, 20 s), the whole discovery ≤ 60 s (or ``--deadline``),
  names of at most 32 path components (refused before any request);
- the page is scanned for tags by a small linear scanner, not a full HTML parser (the
  stdlib's html.parser takes seconds on 1 MiB of ``<!``: it is quadratic on hostile input);
  comments and raw-text elements (script, style, …) are skipped, as the HTML tokenizer does;
- label values are checked (no ``/ ? # %``, whitespace, control characters) before any request,
  other characters are percent-encoded, and rendering is one pass (appc replaced variables one
  after the other in map order, so a value containing ``{os}`` could be rendered again);
- a rendered URI that is not an absolute http(s) URL is skipped;
- a failed discovery says, for each level tried, what went wrong, including levels whose page
  had no matching tag (appc recorded only errors, and actool shows none on failure);
- no credentials are sent with discovery requests (rkt sent its per-host auth headers).
"""

from __future__ import annotations

import asyncio
import html
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, urljoin, urlsplit

from fetchd.appc.names import AC_IDENTIFIER, AppName, check_label_value
from fetchd.config import Config
from fetchd.errors import DiscoveryFailed, ReferenceInvalid
from fetchd.sources.http import redact, translate

if TYPE_CHECKING:
    import aiohttp

MAX_PAGE = 1 << 20
MAX_REDIRECTS = 5
MAX_TAGS = 64
#: path components of a name discovery walks (each is a request)
MAX_LEVELS = 32
#: whole discovery (one walk), unless --deadline is shorter
DISCOVERY_TIMEOUT = 60.0
#: one level (page, redirects and http fallback), unless the stall timeout is shorter
LEVEL_TIMEOUT = 20.0
DEFAULT_VERSION = "latest"
ENDPOINTS, PUBKEYS = "ac-discovery", "ac-discovery-pubkeys"
_REDIRECTS = (301, 302, 303, 307, 308)
_LEFTOVER = re.compile(r"\{.*?\}")
_VARIABLE = re.compile(r"\{([^{}]*)\}")
#: characters a rendered label value keeps as they are (RFC 3986 unreserved + sub-delims, ':@')
_SAFE = "-._~!$&'()*+,;=:@"


@dataclass(frozen=True)
class Endpoint:
    aci: str
    asc: str


@dataclass(frozen=True)
class Attempt:
    """One level of a walk: the prefix, the URL asked (redacted) and why it gave nothing
    (None: this level answered)."""

    prefix: str
    url: str
    error: str | None


@dataclass(frozen=True)
class Discovered:
    """The endpoints of the first level that had any, that level's prefix, every level tried."""

    endpoints: tuple[Endpoint, ...]
    prefix: str
    attempts: tuple[Attempt, ...]


# ------------------------------------------------------------------ the page


_RAW_TEXT = ("script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes")
_TAG_NAME = re.compile(r"[a-zA-Z][^\s/>]*")
#: between attributes: space, '/', and stray quotes or '=' where a name should start
_SPACE = re.compile(r"""[\s/"'=]*""")
_OPEN = re.compile(r"<[a-zA-Z!?]")
_ATTR = re.compile(
    r"""(?P<key>[^\s"'>/=]+)(?:\s*=\s*(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<uq>[^\s>]*)))?"""
)
_CLOSE = {tag: re.compile(f"</{tag}", re.IGNORECASE) for tag in _RAW_TEXT}


def _tag_attrs(text: str, pos: int) -> tuple[list[tuple[str, str]], int] | None:
    """The name and content attributes of the tag whose name ends at pos and where the tag
    ends, or None when it never ends (the rest of the page belongs to it). Each step moves
    forward."""
    attrs: list[tuple[str, str]] = []
    n = len(text)
    while True:
        pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]  # [..]* always matches
        if pos >= n:
            return None
        if text[pos] == ">":
            return attrs, pos + 1
        m = _ATTR.match(text, pos)
        if m is None:  # cannot happen after _SPACE; move on all the same
            pos += 1
            continue
        key = m.group("key").lower()
        if key in ("name", "content"):
            value = next((v for v in m.group("dq", "sq", "uq") if v is not None), "")
            attrs.append((key, html.unescape(value)))
        pos = m.end()


def parse_meta(page: bytes | str) -> list[tuple[str, str, str]]:
    """Every ``<meta name="ac-…" content="PREFIX URI">`` as (tagname, prefix, uri), in
    document order: ``name`` starting with ``ac-``, ``content`` trimmed and split on its first
    space (a tab does not split), both parts non-empty. Linear in the page's size."""
    text = page.decode("utf-8", "replace") if isinstance(page, bytes) else page
    out: list[tuple[str, str, str]] = []
    i = 0
    while True:
        opening = _OPEN.search(text, i)
        if opening is None:
            return out
        j = opening.start()
        if text.startswith("<!--", j):
            k = text.find("-->", j + 4)
            if k < 0:
                return out
            i = k + 3
            continue
        if text[j + 1] in "!?":
            k = text.find(">", j + 2)
            if k < 0:
                return out
            i = k + 1
            continue
        m = _TAG_NAME.match(text, j + 1)
        if m is None:
            i = j + 1
            continue
        tag = m.group().lower()
        parsed = _tag_attrs(text, m.end())
        if parsed is None:
            return out
        attrs, i = parsed
        if tag in _RAW_TEXT:
            close = _CLOSE[tag].search(text, i)
            if close is None:
                return out
            i = close.start()
            continue
        if tag != "meta":
            continue
        name = content = ""
        for key, value in attrs:  # a repeated attribute: the last one counts, as in Go
            if key == "name":
                name = value
            elif key == "content":
                content = value
        prefix, sep, uri = content.strip().partition(" ")
        uri = uri.strip()
        if name.startswith("ac-") and sep and prefix and uri:
            out.append((name, prefix, uri))


def prefix_matches(name: str, prefix: str) -> bool:
    """The tag's prefix is the name or a parent of it, by path component."""
    prefix = prefix.rstrip("/")
    return bool(prefix) and (name == prefix or name.startswith(prefix + "/"))


def render(template: str, app: AppName, ext: str) -> str | None:
    """The template with {name}, every label ({version} = latest if not given) and {ext}
    filled in one pass; None if a {…} is left (or the result is not an http(s) URL).
    Label values with ``/ ? # %`` are refused (ReferenceInvalid)."""
    values = {"name": app.name}
    for key, value in app.labels:
        check_label_value(key, value, repr(str(app)))
        values[key] = quote(value, safe=_SAFE)
    values.setdefault("version", DEFAULT_VERSION)
    values["ext"] = ext

    def fill(m: re.Match[str]) -> str:
        return values.get(m.group(1), m.group())

    out = _VARIABLE.sub(fill, template)
    if _LEFTOVER.search(out):
        return None
    parts = urlsplit(out)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return None
    return out


# ------------------------------------------------------------------ one level


class _LevelFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _reason(exc: BaseException, url: str, config: Config) -> str:
    what = redact(url)
    text = translate(exc, what, config).message
    return text.removeprefix(f"{what}: ")


async def _get_page(url: str, config: Config, session: aiohttp.ClientSession) -> tuple[str, bytes]:
    """GET url (redirects followed by hand, bounded), the body bounded; _LevelFailed.
    Returns (the URL that answered, or the first plain-http one on the way; the body): a
    caller that must know whether anyone could have changed the page looks at it."""
    allow_http = "http" in config.insecure
    plain = url if url.startswith("http://") else None
    for _ in range(MAX_REDIRECTS + 1):
        async with session.get(
            url,
            allow_redirects=False,
            headers={"Accept": "text/html", "Accept-Encoding": "identity"},
        ) as resp:
            if resp.status in _REDIRECTS:
                location = resp.headers.get("Location")
                if not location:
                    raise _LevelFailed(f"{resp.status} without a Location")
                target = urljoin(url, location)
                scheme = urlsplit(target).scheme
                if scheme == "http" and urlsplit(url).scheme == "https" and not allow_http:
                    raise _LevelFailed(
                        f"redirected to {redact(target)}: an https page may not redirect to "
                        "http:// (pass --insecure-options http to allow it)"
                    )
                if scheme not in ("http", "https"):
                    raise _LevelFailed(f"redirected to a {scheme or 'relative'} URL")
                url = target
                if scheme == "http" and plain is None:
                    plain = url
                continue
            if resp.status != 200:
                raise _LevelFailed(f"{resp.status}")
            encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                raise _LevelFailed(f"the page is compressed ({encoding}); it must not be")
            length = resp.content_length
            if length is not None and length > MAX_PAGE:
                raise _LevelFailed("page is larger than 1 MiB")
            body = bytearray()
            while len(body) <= MAX_PAGE:
                chunk = await resp.content.read(MAX_PAGE + 1 - len(body))
                if not chunk:
                    return plain or url, bytes(body)
                body += chunk
            raise _LevelFailed("page is larger than 1 MiB")
    raise _LevelFailed(f"more than {MAX_REDIRECTS} redirects")


async def _level(
    prefix: str, config: Config, session: aiohttp.ClientSession
) -> tuple[str, list[tuple[str, str, str]]]:
    """The tags of one level's page: (the URL that answered, tags); _LevelFailed."""
    import aiohttp

    url = f"https://{prefix}?ac-discovery=1"
    try:
        url, page = await _get_page(url, config, session)
    except (aiohttp.ClientError, OSError) as exc:
        if "http" not in config.insecure:
            raise _LevelFailed(_reason(exc, url, config)) from exc
        first = _reason(exc, url, config)
        url = f"http://{prefix}?ac-discovery=1"
        try:
            url, page = await _get_page(url, config, session)
        except (aiohttp.ClientError, OSError) as exc2:
            raise _LevelFailed(f"{first}; over http: {_reason(exc2, url, config)}") from exc2
        except _LevelFailed as exc2:
            raise _LevelFailed(f"{first}; over http: {exc2.reason}") from exc2
    if len(page) > (64 << 10):
        tags = await asyncio.to_thread(parse_meta, page)
    else:
        tags = parse_meta(page)
    return url, tags


# ------------------------------------------------------------------ the walk


def _levels(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:n]) for n in range(len(parts), 0, -1)]


def _budget(config: Config) -> tuple[float, float]:
    total = DISCOVERY_TIMEOUT
    if config.deadline is not None:
        total = min(total, config.deadline)
    return total, min(LEVEL_TIMEOUT, config.stall_timeout, total)


def _kind_name(kind: str) -> str:
    return "ac-discovery-pubkeys" if kind == PUBKEYS else "ac-discovery"


async def _walk(
    name: str,
    kind: str,
    pick: _Picker,
    config: Config,
    session: aiohttp.ClientSession,
) -> tuple[list[str] | list[Endpoint], str, tuple[Attempt, ...]]:
    total, per_level = _budget(config)
    start = time.monotonic()
    attempts: list[Attempt] = []
    for prefix in _levels(name):
        url = f"https://{prefix}?ac-discovery=1"
        left = total - (time.monotonic() - start)
        if left < 0.05:
            attempts.append(
                Attempt(prefix, redact(url), f"not tried: the discovery's {total:g} s are spent")
            )
            break
        try:
            async with asyncio.timeout(min(per_level, left)):
                url, tags = await _level(prefix, config, session)
        except _LevelFailed as exc:
            attempts.append(Attempt(prefix, redact(url), exc.reason))
            continue
        except TimeoutError:
            attempts.append(
                Attempt(
                    prefix, redact(url), f"no complete page in {round(min(per_level, left), 1):g} s"
                )
            )
            continue
        matching = [(p, uri) for tag, p, uri in tags if tag == kind and prefix_matches(name, p)]
        if len(matching) > MAX_TAGS:
            attempts.append(
                Attempt(
                    prefix,
                    redact(url),
                    f"{len(matching)} {_kind_name(kind)} tags for {name} (more than {MAX_TAGS})",
                )
            )
            continue
        found = pick([uri for _p, uri in matching])
        if not found:
            why = f"no {_kind_name(kind)} tag for {name}"
            if matching:
                why = (
                    f"no usable {_kind_name(kind)} tag for {name} ({len(matching)} skipped: "
                    f"{pick.skipped([uri for _p, uri in matching])})"
                )
            attempts.append(Attempt(prefix, redact(url), why))
            continue
        attempts.append(Attempt(prefix, redact(url), None))
        return found, prefix, tuple(attempts)
    what = "public keys of" if kind == PUBKEYS else ""
    tried = "; ".join(f"{a.prefix}: {a.error}" for a in attempts)
    raise DiscoveryFailed(f"discovery of {what + ' ' if what else ''}{name} failed: {tried}")


class _Picker:
    def __call__(self, uris: list[str]) -> list[str] | list[Endpoint]:
        raise NotImplementedError

    def skipped(self, uris: list[str]) -> str:
        """Why none of ``uris`` was usable (for the message)."""
        return "not an absolute http(s) URL"


class _Endpoints(_Picker):
    def __init__(self, app: AppName) -> None:
        self.app = app

    def __call__(self, uris: list[str]) -> list[Endpoint]:
        out = []
        for uri in uris:
            aci, asc = render(uri, self.app, "aci"), render(uri, self.app, "aci.asc")
            if aci is not None and asc is not None:
                out.append(Endpoint(aci, asc))
        return out

    def skipped(self, uris: list[str]) -> str:
        given = {"name", "ext", "version", *(k for k, _v in self.app.labels)}
        missing: list[str] = []
        other = 0
        for uri in uris:
            left = [v for v in _VARIABLE.findall(uri) if v not in given]
            missing += [v for v in left if v not in missing]
            other += not left
        why: list[str] = []
        if missing:
            wanted = ",".join(f"{v}=…" for v in missing[:8])
            why.append(", ".join(f"{{{v}}}" for v in missing[:8]) + " not given")
            if {"os", "arch"} & set(missing):
                why.append(f"dependencies get no os/arch defaults: give {wanted} labels")
            else:
                why.append(f"give {wanted} labels")
        if other:
            why.append(f"{other} not an absolute http(s) URL once rendered")
        return "; ".join(why)


class _Pubkeys(_Picker):
    def __call__(self, uris: list[str]) -> list[str]:
        return [u for u in uris if urlsplit(u).scheme in ("https", "http") and urlsplit(u).netloc]


def _check_name(name: str) -> None:
    if not AC_IDENTIFIER.match(name):
        raise ReferenceInvalid(f"{name[:80]!r} is not an appc name (like example.com/app)")
    if name.count("/") >= MAX_LEVELS:
        raise ReferenceInvalid(
            f"{name[:80]!r}…: more than {MAX_LEVELS} path components; discovery walks at most "
            f"{MAX_LEVELS} levels"
        )


async def discover_endpoints(
    app: AppName, config: Config, session: aiohttp.ClientSession
) -> Discovered:
    """The ACI endpoints for app (every match of the first level that has any, in document
    order). DiscoveryFailed lists each level tried; ReferenceInvalid for a label value that
    may not go into a URL (before any request)."""
    _check_name(app.name)
    for key, value in app.labels:
        check_label_value(key, value, repr(str(app)))
    found, prefix, attempts = await _walk(app.name, ENDPOINTS, _Endpoints(app), config, session)
    endpoints = tuple(e for e in found if isinstance(e, Endpoint))
    return Discovered(endpoints, prefix, attempts)


async def discover_pubkeys(
    name: str, config: Config, session: aiohttp.ClientSession
) -> tuple[tuple[str, ...], tuple[Attempt, ...]]:
    """The ``ac-discovery-pubkeys`` URLs for name (a name or a trust prefix): those of the
    first level that has any, in document order, and every level tried. DiscoveryFailed."""
    _check_name(name)
    found, _prefix, attempts = await _walk(name, PUBKEYS, _Pubkeys(), config, session)
    return tuple(u for u in found if isinstance(u, str)), attempts
