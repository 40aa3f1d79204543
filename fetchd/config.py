"""Config: built once by the CLI (or a test) and passed down, never read from globals."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fetchd.errors import UsageError
from fetchd.model import Platform

INSECURE_OPTIONS = frozenset({"none", "http", "tls", "image", "pubkey", "all-fetch"})
PULL_POLICIES = ("new", "update", "never")
#: registries.conf's pull-from-mirror: who may say which digest a tag means
PULL_FROM_MIRROR = ("digest-only", "all")
#: a request's whole budget, in stall timeouts (see Config.request_budget) ...
REQUEST_BUDGET_STALLS = 4
#: ... but never less than this many seconds (a 4 MiB manifest at 1 MiB/s fits)
MIN_REQUEST_BUDGET = 5.0
#: waits for a response head that time out (a server that accepts, then says nothing)
#: before a request fails: one retry, not config.attempts of them
SILENT_ATTEMPTS = 2
#: peers a BitTorrent session accepts by default: loopback, RFC 1918, CGNAT, IPv6
#: unique-local and link-local (a LAN's addresses; never the internet). Not IPv4
#: link-local: 169.254.169.254 is a cloud's metadata service.
BT_ALLOW_DEFAULT = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)


def default_store() -> Path:
    """``$FETCHD_STORE``, else /var/lib/fetchd for root, else the XDG data directory."""
    env = os.environ.get("FETCHD_STORE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/fetchd")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "fetchd"


def parse_insecure(text: str) -> frozenset[str]:
    """rkt's ``--insecure-options``: a comma list; ``all-fetch`` means every fetch check."""
    opts = {o.strip() for o in text.split(",") if o.strip()}
    unknown = opts - INSECURE_OPTIONS
    if unknown:
        raise UsageError(
            f"unknown --insecure-options {', '.join(sorted(unknown))} "
            f"(choose from {', '.join(sorted(INSECURE_OPTIONS))})"
        )
    if "all-fetch" in opts:
        opts |= {"http", "tls", "image", "pubkey"}
    opts -= {"none", "all-fetch"}
    return frozenset(opts)


def parse_resolve(items: list[str]) -> dict[tuple[str, int], str]:
    """curl's ``--resolve HOST:PORT:ADDR`` (ADDR may be a bracketed IPv6 address)."""
    out: dict[tuple[str, int], str] = {}
    for item in items:
        host, sep1, rest = item.partition(":")
        port, sep2, addr = rest.partition(":")
        if not (sep1 and sep2 and host and port.isdigit() and addr):
            raise UsageError(f"--resolve {item!r} is not HOST:PORT:ADDR")
        out[(host.lower(), int(port))] = addr.strip("[]")
    return out


@dataclass(frozen=True)
class Config:
    store: Path
    insecure: frozenset[str] = frozenset()
    resolve: Mapping[tuple[str, int], str] = field(default_factory=dict)
    platform: Platform = field(default_factory=Platform.host)
    #: pull every platform of an index (``--all-platforms``), not only ``platform``
    all_platforms: bool = False
    pull_policy: str = "new"
    #: ``digest-only``: tags are resolved at the origin, mirrors serve digests only;
    #: ``all``: mirrors resolve tags too (``--mirror-only`` implies it)
    pull_from_mirror: str = "digest-only"
    #: seconds without a byte before a transfer counts as stalled
    stall_timeout: float = 30.0
    connect_timeout: float = 15.0
    #: attempts per request (connection errors, stalls, 429/5xx) before giving up
    attempts: int = 5
    #: blobs transferred at once across the whole process
    max_parallel_blobs: int = 8
    #: longest Retry-After fetchd honours; a longer one fails the request at once
    max_retry_after: float = 30.0
    auth_file: Path | None = None
    progress: bool = False
    #: connections per segmented download (adaptive up to this)
    max_connections: int = 8
    #: registry blobs at least this big come over several range requests
    segmented_threshold: int = 64 << 20
    #: seconds for a whole pull, if set
    deadline: float | None = None
    # --- BitTorrent (issue 12) ---
    #: ``--torrent``: layer blobs of at least ``torrent_min_size`` come through a swarm
    torrent: bool = False
    torrent_min_size: int = 16 << 20
    #: seconds a finished pull keeps seeding what it fetched (``--seed-linger``)
    seed_linger: float = 0.0
    #: ``--bt-listen ADDR[:PORT]``: the one address the BitTorrent session listens on;
    #: None: the address this host uses to reach the cache (never a wildcard)
    bt_listen: str | None = None
    #: ``--bt-allow CIDR,…``: peers outside these networks are refused
    bt_allow: tuple[str, ...] = BT_ALLOW_DEFAULT
    #: ``serve --bt-seeds``: blobs loaded in the seeding session at once (the others are
    #: loaded when a peer asks for them, least recently used out first)
    bt_seeds: int = 64
    #: ``--lsd``: local service discovery (multicast on the listen interface)
    lsd: bool = False
    #: seconds without a verified piece before a swarm download is handed to HTTP
    bt_stall_timeout: float = 10.0
    #: hash failures in one swarm download before it is handed to HTTP
    bt_max_hash_failures: int = 3
    #: ``--trust-dir``: the keystore's local directory (``/etc/rkt`` reads rkt's as is);
    #: None: /etc/fetchd for root, ${XDG_CONFIG_HOME:-~/.config}/fetchd for others
    trust_dir: Path | None = None
    #: ``--trust-keys-from-https``: trust keys an appc name's https discovery publishes
    #: (``ac-discovery-pubkeys``) when no key is trusted for it yet, without review
    trust_keys_from_https: bool = False
    #: ``--signature FILE``: the detached signature of a local ACI (default FILE.aci.asc)
    signature: Path | None = None
    #: ``--lookaside URL``: containers/image's simple-signing lookaside (registries.d)
    lookaside: str | None = None

    @property
    def request_budget(self) -> float:
        """Seconds one registry request may take in all: every attempt, backoff and
        Retry-After wait until a usable answer, and for the small documents (manifests,
        indexes, token answers, error bodies: at most 4 MiB) the whole body too. Blob
        bodies are bounded by the stall timeout alone: they may be big and slow. A
        manifest dripping a byte a second beats any stall timeout; this bounds it."""
        return max(REQUEST_BUDGET_STALLS * self.stall_timeout, MIN_REQUEST_BUDGET)
