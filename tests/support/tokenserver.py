"""A Docker token-spec auth server for the registry's `auth: token` mode.

Tokens are RS256 JWTs signed by a throwaway CA key; the header carries that CA certificate
in `x5c` and the registry trusts it through `rootcertbundle` (see PEERS.md, "Token auth").
Users with a right password get every action they ask for; anonymous callers get a token
granting pull only if `anonymous_pull`, else a token granting nothing (the registry then
answers insufficient_scope); a wrong user or password gets 401.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from .servers import QuietHandler, ServerThread
from .tls import TestCA, make_ca


@dataclass(frozen=True)
class TokenRequest:
    """What one GET /token asked for, and the status it got."""

    user: str | None  # the Basic auth user claimed (right password or not); None: anonymous
    service: str | None
    scopes: tuple[str, ...]
    status: int


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _parse_scope(scope: str) -> dict[str, Any]:
    """The access entry of a scope "repository:NAME:pull,push" (NAME may hold ':')."""
    kind, rest = scope.split(":", 1)
    name, actions = rest.rsplit(":", 1)
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


def _basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(user, password) of a Basic Authorization header; None without one; ("", "") if bad."""
    if header is None:
        return None
    kind, _, encoded = header.partition(" ")
    try:
        user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return ("", "")
    return (user, password) if kind.lower() == "basic" else ("", "")


class _TokenHandler(QuietHandler):
    def do_GET(self) -> None:
        server: TokenServer = self.owner
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        # skopeo may repeat `scope`; the spec also allows several scopes in one, space-separated.
        scopes = tuple(s for value in query.get("scope", []) for s in value.split())
        service = query.get("service", [None])[0]
        creds = _basic_credentials(self.headers.get("Authorization"))
        user = creds[0] if creds else None
        if url.path != "/token":
            status, body = 404, b'{"details":"not found"}'
        elif creds is not None and server.users.get(creds[0]) != creds[1]:
            status, body = 401, b'{"details":"bad credentials"}'
        else:
            status, body = 200, server.issue(user, service, scopes)
        server.requests.append(TokenRequest(user, service, scopes, status))
        self.send_response(status)
        if status == 401:
            self.send_header("WWW-Authenticate", 'Basic realm="test-token-server"')
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class TokenServer(ServerThread):
    def __init__(
        self,
        workdir: Path,
        users: dict[str, str],
        issuer: str,
        service: str,
        anonymous_pull: bool,
        expires_in: int,
    ) -> None:
        self.ca: TestCA = make_ca(workdir, name="test token signer")
        self.users = users
        self.issuer = issuer
        self.service = service
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.requests: list[TokenRequest] = []
        super().__init__(_TokenHandler)
        self.realm = f"{self.url}/token"
        self.rootcert_path = self.ca.ca_path

    def registry_auth_config(self) -> dict[str, Any]:
        """The `auth:` section for start_registry(auth=...)."""
        return {
            "token": {
                "realm": self.realm,
                "service": self.service,
                "issuer": self.issuer,
                "rootcertbundle": str(self.rootcert_path),
            }
        }

    def issue(self, user: str | None, service: str | None, scopes: tuple[str, ...]) -> bytes:
        """The JSON body of a token response granting what `user` may have of `scopes`."""
        access = [_parse_scope(scope) for scope in scopes]
        if user is None:
            for entry in access:
                entry["actions"] = (
                    ["pull"] if self.anonymous_pull and "pull" in entry["actions"] else []
                )
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "RS256",
            # x5c is standard padded base64 of DER, leaf first (here the leaf is the root).
            "x5c": [
                base64.b64encode(self.ca.cert.public_bytes(serialization.Encoding.DER)).decode()
            ],
        }
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": service or self.service,  # a string: the registry rejects a list
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        ).encode()
        signature = self.ca.key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        token = f"{signing_input.decode()}.{_b64url(signature)}"
        issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return json.dumps(
            {
                "token": token,
                "access_token": token,
                "expires_in": self.expires_in,
                "issued_at": issued_at,
            }
        ).encode()


def start_token_server(
    workdir: Path,
    users: dict[str, str] | None = None,
    issuer: str = "test-issuer",
    service: str = "test-registry",
    *,
    anonymous_pull: bool = False,
    expires_in: int = 300,
) -> TokenServer:
    """Start a token server on a free port; users defaults to {"alice": "s3cret"}."""
    workdir.mkdir(parents=True, exist_ok=True)
    return TokenServer(
        workdir,
        {"alice": "s3cret"} if users is None else users,
        issuer,
        service,
        anonymous_pull,
        expires_in,
    )
