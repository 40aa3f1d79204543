"""Which upstream registry a requested name belongs to (DESIGN.md §7).

``--upstream [PREFIX=]URL`` (repeatable). The first one without a prefix is the
default. A request is routed, in this order, by the OCI ``ns=`` query parameter (a
registry host: ``ns=docker.io``), by the longest prefix that starts the name
(``docker.io/library/alpine`` with ``docker.io=https://registry-1.docker.io`` → that
upstream, repository ``library/alpine``), else to the default with the name as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from fetchd.errors import UsageError
from fetchd.model import is_valid_repository_name


@dataclass(frozen=True, slots=True)
class Upstream:
    prefix: str | None
    url: str  # scheme://host[:port], no trailing slash

    @property
    def host(self) -> str:
        """The registry's name: the prefix if given (docker.io), else URL's host:port."""
        return self.prefix or urlsplit(self.url).netloc

    @classmethod
    def parse(cls, text: str) -> Upstream:
        prefix, eq, url = text.partition("=")
        if not eq:
            prefix, url = "", text
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise UsageError(f"--upstream {text!r}: expected [PREFIX=]http(s)://HOST[:PORT]")
        if prefix and not all(p and p.strip(".-") for p in prefix.split("/")):
            raise UsageError(f"--upstream {text!r}: bad prefix {prefix!r}")
        return cls(prefix or None, f"{parts.scheme}://{parts.netloc}")


@dataclass(frozen=True, slots=True)
class Route:
    upstream: Upstream
    repository: str  # the name on the upstream

    @property
    def key(self) -> str:
        """Where this name lives, as fetchd names images: HOST/REPOSITORY."""
        return f"{self.upstream.host}/{self.repository}"


class Upstreams:
    def __init__(self, upstreams: list[Upstream]) -> None:
        self.all = upstreams
        self.default = next((u for u in upstreams if u.prefix is None), None)
        self.by_prefix = sorted(
            (u for u in upstreams if u.prefix), key=lambda u: len(u.prefix or ""), reverse=True
        )

    def route(self, name: str, ns: str | None) -> Route | None:
        """The upstream and repository for ``name`` (already grammar-checked), or None."""
        if ns:
            for u in self.all:
                if ns in (u.host, urlsplit(u.url).netloc):
                    return Route(u, name)
            return None
        for u in self.by_prefix:
            p = u.prefix or ""
            if name.startswith(p + "/") and is_valid_repository_name(name[len(p) + 1 :]):
                rest = name[len(p) + 1 :]
                # Docker Hub's official images live under library/.
                if u.host == "docker.io" and "/" not in rest:
                    rest = f"library/{rest}"
                return Route(u, rest)
        return Route(self.default, name) if self.default else None
