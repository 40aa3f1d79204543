"""Registry authentication: credentials, ``WWW-Authenticate`` challenges, token cache.

Follows the Docker token spec (also what the OCI distribution spec defers to): a 401
carries ``Bearer realm=…,service=…,scope=…`` or ``Basic realm=…``; for Bearer we ask the
realm for a token for that scope, with Basic credentials when we have them, and cache
it until shortly before it expires. Credentials come from ``$REGISTRY_AUTH_FILE`` or
``~/.docker/config.json`` (the ``auths`` map written by ``docker/podman login``) and are
only ever sent to the host they are configured for.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from fetchd.errors import AccessDenied, AuthenticationFailed, TransferFailed
from fetchd.sources.http import redact

_PARAM_RE = re.compile(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')
MAX_TOKEN_RESPONSE = 1 << 20


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str

    def basic(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    params: dict[str, str]

    @classmethod
    def parse(cls, header: str) -> Challenge | None:
        scheme, _, rest = header.strip().partition(" ")
        if not scheme:
            return None
        params = {
            m.group(1).lower(): m.group(2) or m.group(3) or "" for m in _PARAM_RE.finditer(rest)
        }
        return cls(scheme.lower(), params)


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


class Authenticator:
    """Answers challenges for one registry host; caches tokens per scope. Task-safe."""

    def __init__(self, host: str, credentials: Credentials | None) -> None:
        self.host = host
        self.credentials = credentials
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
        self, session: aiohttp.ClientSession, challenge_header: str, scope: str
    ) -> None:
        """Handle a 401's ``WWW-Authenticate``; afterwards :meth:`header` has an answer.

        Raises :class:`AuthenticationFailed` when credentials are missing or refused.
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
                f"registry {self.host} asks for unsupported authentication {ch.scheme!r}"
            )
        if ch.params.get("error") == "insufficient_scope":
            if self.credentials is None:
                raise AuthenticationFailed(self._need_login())
            raise AccessDenied(
                f"registry {self.host} denies access to {scope or 'this resource'} "
                "(insufficient_scope); check the name and your permissions"
            )
        self._tokens[scope] = await self._fetch_token(session, ch.params, scope)

    async def _fetch_token(
        self, session: aiohttp.ClientSession, params: dict[str, str], scope: str
    ) -> _Token:
        realm = params["realm"]
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
            async with session.get(realm, params=query, headers=headers) as resp:
                body = await resp.content.read(MAX_TOKEN_RESPONSE)
                status = resp.status
        except aiohttp.ClientError as exc:
            raise TransferFailed(
                f"cannot get a token for {self.host} from {redact(realm)}: {exc}"
            ) from exc
        if status in (401, 403):
            raise AuthenticationFailed(self._refused() if self.credentials else self._need_login())
        if status != 200:
            raise AuthenticationFailed(
                f"the token server {redact(realm)} for {self.host} answered HTTP {status}"
            )
        try:
            doc = json.loads(body)
            value = doc.get("token") or doc.get("access_token")
            expires_in = float(doc.get("expires_in") or 60)
        except (ValueError, AttributeError, TypeError) as exc:
            raise AuthenticationFailed(
                f"the token server {redact(realm)} for {self.host} sent an unreadable answer"
            ) from exc
        if not isinstance(value, str) or not value:
            raise AuthenticationFailed(f"the token server {redact(realm)} sent no token")
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
