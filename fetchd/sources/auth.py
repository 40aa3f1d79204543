"""Registry authentication: credentials, ``WWW-Authenticate`` challenges, token cache.

Follows the Docker token spec (also what the OCI distribution spec defers to): a 401
carries ``Bearer realm=…,service=…,scope=…`` or ``Basic realm=…``; for Bearer we ask the
realm for a token for that scope, with Basic credentials when we have them, and cache
it until shortly before it expires. Credentials come from ``$REGISTRY_AUTH_FILE`` or
``~/.docker/config.json`` (the ``auths`` map written by ``docker/podman login``) and are
only ever sent to the host they are configured for and to the token realm its challenge
names — and to that realm only over https, or over plain http when the realm is on the
registry's own host and the registry itself is reached over http (which needs
``--insecure-options http``). A challenge may name any realm: over plain http a machine
in the middle could name its own, so credentials never go to another host in clear.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from fetchd.errors import (
    AccessDenied,
    AuthenticationFailed,
    InsecureRefused,
    TransferFailed,
    TransferTimeout,
)
from fetchd.model import load_json
from fetchd.sources.http import redact

# RFC 9110 section 11: challenges are ``scheme [token68 | #auth-param]``, several may
# share one header (comma-separated), and schemes and parameter names are
# case-insensitive. A quoted-string is taken up to its closing quote, escapes undone.
# Every loop below consumes input or stops, so a hostile header costs linear time.
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_SCHEME_RE = re.compile(rf"[ \t,]*({_TOKEN})")
_PARAM_RE = re.compile(
    # a bare value as lenient as before (real servers quote; a bare URL is seen too)
    rf'[ \t]*({_TOKEN})[ \t]*=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^ \t,"]+))[ \t]*'
)
_TOKEN68_RE = re.compile(r"[ \t]+[A-Za-z0-9._~+/-]+=*[ \t]*(?=,|$)")
_COMMA_RE = re.compile(r"[ \t]*,")
_ESCAPE_RE = re.compile(r"\\(.)")
#: challenges read from one 401 at most (a header is at most a few KiB anyway)
MAX_CHALLENGES = 16
MAX_TOKEN_RESPONSE = 1 << 20
#: a bearer token goes into a header: visible ASCII only (no CR/LF, no spaces)
_TOKEN_VALUE_RE = re.compile(r"[\x21-\x7e]{1,65536}")
#: longest token lifetime believed (a day); absent: 60 s, as the token spec says
MAX_TOKEN_LIFETIME = 86400.0


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower case: "bearer", "basic", …
    params: dict[str, str]  # names lower case

    @classmethod
    def parse_all(cls, header: str) -> list[Challenge]:
        """Every challenge of a ``WWW-Authenticate`` value (several headers joined by
        ", " are one value). Stops at the first thing that is no challenge."""
        out: list[Challenge] = []
        pos = 0
        while pos < len(header) and len(out) < MAX_CHALLENGES:
            m = _SCHEME_RE.match(header, pos)
            if not m:
                break
            scheme, pos = m.group(1).lower(), m.end()
            params: dict[str, str] = {}
            t68 = _TOKEN68_RE.match(header, pos)
            if t68 and not _PARAM_RE.match(header, pos):
                pos = t68.end()  # a token68 credential (Negotiate …): nothing we use
            else:
                while p := _PARAM_RE.match(header, pos):
                    quoted, bare = p.group(2), p.group(3)
                    value = _ESCAPE_RE.sub(r"\1", quoted) if quoted is not None else bare
                    params.setdefault(p.group(1).lower(), value)
                    pos = p.end()
                    comma = _COMMA_RE.match(header, pos)
                    if not comma:
                        break
                    pos = comma.end()  # another parameter, or the next challenge
            out.append(cls(scheme, params))
        return out

    @classmethod
    def parse(cls, header: str) -> Challenge | None:
        """The challenge to answer: Bearer if offered, else Basic, else the first."""
        found = cls.parse_all(header)
        for scheme in ("bearer", "basic"):
            for ch in found:
                if ch.scheme == scheme:
                    return ch
        return found[0] if found else None


def auth_file_candidates(explicit: Path | None) -> list[Path]:
    if explicit:
        return [explicit]
    out = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        out.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        out.append(Path(xdg) / "containers" / "auth.json")
    docker_config = os.environ.get("DOCKER_CONFIG")
    out.append(
        Path(docker_config) / "config.json"
        if docker_config
        else Path.home() / ".docker" / "config.json"
    )
    return out


def load_credentials(host: str, explicit: Path | None = None) -> Credentials | None:
    """Credentials for registry ``host`` from the first auth file that has an entry."""
    keys = {host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"}
    if host in ("docker.io", "registry-1.docker.io"):
        keys |= {"https://index.docker.io/v1/", "docker.io", "index.docker.io"}
    for path in auth_file_candidates(explicit):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict):
            continue
        for key, entry in auths.items():
            if key.rstrip("/") not in {k.rstrip("/") for k in keys} or not isinstance(entry, dict):
                continue
            if isinstance(entry.get("auth"), str):
                try:
                    user, _, pw = base64.b64decode(entry["auth"]).decode().partition(":")
                except ValueError:
                    continue
                return Credentials(user, pw)
            if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
                return Credentials(entry["username"], entry["password"])
    return None


@dataclass
class _Token:
    value: str
    expires: float


def _lifetime(value: object) -> float:
    """A token answer's ``expires_in``: a positive number of seconds, at most a day;
    60 (the token spec's default) when absent or not a sane number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 60.0
    seconds = float(min(value, MAX_TOKEN_LIFETIME))  # min() first: 10**400 has no float
    return seconds if math.isfinite(seconds) and seconds > 0 else 60.0


class Authenticator:
    """Answers challenges for one registry host; caches tokens per scope. Task-safe."""

    def __init__(self, host: str, credentials: Credentials | None, *, budget: float = 60.0) -> None:
        """``budget``: seconds a token request may take in all (``Config.request_budget``)."""
        self.host = host
        self.credentials = credentials
        self.budget = budget
        self._tokens: dict[str, _Token] = {}
        self._basic = False

    def header(self, scope: str) -> str | None:
        """The Authorization header to send for ``scope`` now, if we know one."""
        tok = self._tokens.get(scope)
        if tok and tok.expires > time.monotonic():
            return f"Bearer {tok.value}"
        if self._basic and self.credentials:
            return self.credentials.basic()
        return None

    async def answer(
        self,
        session: aiohttp.ClientSession,
        challenge_header: str,
        scope: str,
        registry_url: str = "",
    ) -> None:
        """Handle a 401's ``WWW-Authenticate``; afterwards :meth:`header` has an answer.

        ``registry_url`` is the URL that answered 401: a plain-http realm gets the
        credentials only if it is on that URL's host and that URL is plain http too.
        Raises :class:`AuthenticationFailed` when credentials are missing or refused,
        :class:`InsecureRefused` when they would go to another host in clear.
        """
        ch = Challenge.parse(challenge_header)
        if ch is None:
            raise AuthenticationFailed(f"registry {self.host} answered 401 without a challenge")
        if ch.scheme == "basic":
            if self.credentials is None:
                raise AuthenticationFailed(self._need_login())
            if self._basic:
                raise AuthenticationFailed(self._refused())
            self._basic = True
            return
        if ch.scheme != "bearer" or "realm" not in ch.params:
            raise AuthenticationFailed(
                f"registry {self.host} asks for unsupported authentication {ch.scheme[:40]!r}"
            )
        if ch.params.get("error") == "insufficient_scope":
            if self.credentials is None:
                raise AuthenticationFailed(self._need_login())
            raise AccessDenied(
                f"registry {self.host} denies access to {scope or 'this resource'} "
                "(insufficient_scope); check the name and your permissions"
            )
        try:
            async with asyncio.timeout(self.budget):
                token = await self._fetch_token(session, ch.params, scope, registry_url)
        except TimeoutError:
            raise TransferTimeout(
                f"cannot get a token for {self.host} from {redact(ch.params['realm'])}: "
                f"no complete answer within {self.budget:g} s; check that server "
                "(or raise --stall-timeout)"
            ) from None
        self._tokens[scope] = token

    def _may_send_credentials(self, realm: str, registry_url: str) -> bool:
        """A registry over https (its challenge came over TLS) may name any https realm.
        A registry over plain http (the user allowed that in clear) only a realm on its
        own host: anyone in the middle could have written the challenge, naming a realm
        of theirs, https or not."""
        r, reg = urlsplit(realm), urlsplit(registry_url)
        if reg.scheme == "https":
            return r.scheme == "https"
        return r.scheme in ("http", "https") and bool(r.hostname) and r.hostname == reg.hostname

    async def _fetch_token(
        self,
        session: aiohttp.ClientSession,
        params: dict[str, str],
        scope: str,
        registry_url: str,
    ) -> _Token:
        realm = params["realm"]
        try:
            scheme = urlsplit(realm).scheme
        except ValueError:
            scheme = ""
        if scheme not in ("https", "http"):
            raise AuthenticationFailed(
                f"registry {self.host} names a token realm {realm[:80]!r} that is no http(s) URL"
            )
        if self.credentials and not self._may_send_credentials(realm, registry_url):
            raise InsecureRefused(
                f"registry {self.host} wants the credentials sent to the token realm "
                f"{redact(realm)}, a realm on another host named over plain HTTP (or a "
                "plain-HTTP realm); fetchd sends them only to an https realm named by an "
                "https registry, or to the registry's own host when the registry is plain "
                "http (--insecure-options http): serve the registry over https, or remove "
                f"the credentials for {self.host} to pull anonymously"
            )
        query = []
        if params.get("service"):
            query.append(("service", params["service"]))
        for s in (scope or params.get("scope", "")).split(" "):
            if s:
                query.append(("scope", s))
        if self.credentials:
            query.append(("account", self.credentials.username))
        headers = {}
        if self.credentials:
            headers["Authorization"] = self.credentials.basic()
        started = time.monotonic()
        try:
            # aiohttp drops Authorization on a redirect to another origin (scheme too)
            async with session.get(realm, params=query, headers=headers) as resp:
                body = await resp.content.read(MAX_TOKEN_RESPONSE)
                status = resp.status
        except (aiohttp.ClientError, ValueError, OSError) as exc:
            raise TransferFailed(
                f"cannot get a token for {self.host} from {redact(realm)}: {exc}"
            ) from exc
        if status in (401, 403):
            raise AuthenticationFailed(self._refused() if self.credentials else self._need_login())
        if status != 200:
            raise AuthenticationFailed(
                f"the token server {redact(realm)} for {self.host} answered HTTP {status}"
            )
        doc = load_json(
            body,
            f"the answer of the token server {redact(realm)} for {self.host}",
            AuthenticationFailed,
        )
        if not isinstance(doc, dict):
            raise AuthenticationFailed(
                f"the token server {redact(realm)} for {self.host} sent an unreadable answer"
            )
        value = doc.get("token") or doc.get("access_token")
        if not isinstance(value, str) or not _TOKEN_VALUE_RE.fullmatch(value):
            raise AuthenticationFailed(f"the token server {redact(realm)} sent no usable token")
        expires_in = _lifetime(doc.get("expires_in"))
        # Renew a little early: a token that expires in flight costs a 401 round trip.
        return _Token(value, started + max(1.0, expires_in * 0.9 - 1))

    def forget(self, scope: str) -> None:
        self._tokens.pop(scope, None)

    def _need_login(self) -> str:
        return (
            f"registry {self.host} requires credentials; log in (podman login / docker login) "
            "or add them to $REGISTRY_AUTH_FILE or ~/.docker/config.json"
        )

    def _refused(self) -> str:
        user = self.credentials.username if self.credentials else "?"
        return (
            f"registry {self.host} refused the credentials of user {user!r}; "
            "check them in $REGISTRY_AUTH_FILE or ~/.docker/config.json"
        )
