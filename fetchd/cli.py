"""The command line (DESIGN.md §5): parse arguments, call the library, print, exit.

Exit codes: 0 ok · 1 failure (one line ``error: …`` on stderr) · 2 usage.
Only this module configures logging and decides what reaches the terminal.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fetchd import __version__
from fetchd.config import (
    BT_ALLOW_DEFAULT,
    PULL_FROM_MIRROR,
    PULL_POLICIES,
    Config,
    default_store,
    parse_insecure,
    parse_resolve,
)
from fetchd.engine import Engine, PullResult
from fetchd.engine.pull import is_url
from fetchd.errors import DiskFull, FetchdError, StoreCorrupt, Terminated, UsageError
from fetchd.model import Digest, Platform
from fetchd.progress import Progress, TerminalBars, current_image
from fetchd.sources.http import preload_aiohttp
from fetchd.store import Store, layout
from fetchd.store import maintenance as mt
from fetchd.store.diskfull import is_full, is_read_only
from fetchd.units import format_size, parse_size

if TYPE_CHECKING:
    from fetchd.bt.session import Swarm

log = logging.getLogger("fetchd")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UsageError(f"{message}; see: {self.prog} --help")


class _CommandParser(_Parser):
    """A subcommand's parser: it takes the global options too (``fetchd pull -q REF``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _global_options(self, after=True)


def _size_arg(text: str) -> int:
    """A size with a unit (fetchd/units.py); anything else is a usage error (exit 2)."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _platform_arg(text: str) -> str:
    """OS/ARCH[/VARIANT], checked here so that a malformed one is a usage error (exit 2)."""
    try:
        Platform.parse(text)
    except FetchdError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _seconds(minimum: float, strict: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a number of seconds") from None
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            bound = "more than" if strict else "at least"
            raise argparse.ArgumentTypeError(f"{text[:40]!r}: give {bound} {minimum:g} seconds")
        return value

    return parse


_positive_seconds = _seconds(0.0, strict=True)
_seconds_or_zero = _seconds(0.0, strict=False)


def _whole(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text[:40]!r}: give at least {minimum}")
        if value > 1 << 20:
            raise argparse.ArgumentTypeError(f"{text[:40]!r}: give at most {1 << 20}")
        return value

    return parse


_positive_int = _whole(1)
_count_arg = _whole(0)


def _global_options(p: argparse.ArgumentParser, after: bool) -> None:
    """--store, -v, -q: before the subcommand (DESIGN.md §5) and, as podman and skopeo
    allow, after it. The copies after it land in their own ``*_after`` dests (default
    unset) so that neither occurrence overwrites the other; ``_globals`` merges them."""
    tail = "_after" if after else ""
    unset = argparse.SUPPRESS if after else None
    p.add_argument(
        "--store",
        dest="store" + tail,
        type=Path,
        default=unset,
        metavar="DIR",
        help="the store directory (default: $FETCHD_STORE, else /var/lib/fetchd as root, "
        "else ~/.local/share/fetchd)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "-v",
        "--verbose",
        dest="verbose" + tail,
        action="count",
        default=unset if after else 0,
        help="more detail on stderr (-vv: debug; an internal error shows its traceback)",
    )
    g.add_argument(
        "-q",
        "--quiet",
        dest="quiet" + tail,
        action="store_true",
        default=unset if after else False,
        help="only errors on stderr, no progress",
    )


def _globals(args: argparse.Namespace) -> None:
    """Merge the global options given after the subcommand into those given before it."""
    args.store = getattr(args, "store_after", None) or args.store
    args.verbose += getattr(args, "verbose_after", 0)
    args.quiet = args.quiet or getattr(args, "quiet_after", False)
    if args.verbose and args.quiet:
        raise UsageError("-v and -q cannot be used together")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fetchd", description="Fetch container images into a verified store.")
    p.add_argument("--version", action="version", version=f"fetchd {__version__}")
    _global_options(p, after=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_CommandParser)

    def trust_dir_option(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--trust-dir",
            type=Path,
            metavar="DIR",
            help="the keystore (default /etc/fetchd for root, ~/.config/fetchd for others; "
            "--trust-dir /etc/rkt reads rkt's as it is)",
        )

    def fetch_options(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--json",
            action="store_true",
            help="print one JSON document: each image pulled and the bytes received",
        )
        plat = sp.add_mutually_exclusive_group()
        plat.add_argument(
            "--platform",
            type=_platform_arg,
            metavar="OS/ARCH[/VARIANT]",
            help="the platform to pull from an index (default: this machine's); the name "
            "keeps the platforms it has",
        )
        plat.add_argument(
            "--all-platforms", action="store_true", help="pull every platform of an index"
        )
        sp.add_argument("--pull-policy", choices=PULL_POLICIES, default="new")
        sp.add_argument("--insecure-options", default="none", metavar="LIST")
        sp.add_argument("--resolve", action="append", default=[], metavar="HOST:PORT:ADDR")
        sp.add_argument(
            "--stall-timeout",
            type=_positive_seconds,
            default=30.0,
            metavar="SECONDS",
            help="give up on a connection that sends nothing for this long (default 30)",
        )
        sp.add_argument(
            "--max-connections",
            type=int,
            default=8,
            metavar="N",
            help="connections per download at most (adaptive below that; default 8)",
        )
        sp.add_argument(
            "--deadline",
            type=_positive_seconds,
            metavar="SECONDS",
            help="fail a pull that takes longer",
        )
        trust_dir_option(sp)
        g = sp.add_argument_group("signatures (appc ACIs; OCI images of trusted publishers)")
        g.add_argument(
            "--trust-keys-from-https",
            action="store_true",
            help="trust the keys an appc name's discovery publishes over https "
            "(ac-discovery-pubkeys) when none is trusted for it yet (rkt's flag)",
        )
        g.add_argument(
            "--signature",
            type=Path,
            metavar="FILE",
            help="the detached signature of a local FILE.aci (default FILE.aci.asc)",
        )
        g.add_argument(
            "--lookaside",
            metavar="URL",
            help="where simple signatures of OCI images live (registries.d's lookaside: "
            "URL/REPO@sha256=HEX/signature-N)",
        )

    def bt_options(sp: argparse.ArgumentParser, *, client: bool) -> None:
        g = sp.add_argument_group("BitTorrent")
        g.add_argument(
            "--torrent",
            action="store_true",
            help="layer blobs of at least --torrent-min-size come through a swarm: the torrent "
            "from the mirror (a fetchd serve), the bytes from the hosts that hold them; HTTP "
            "from the mirror or the origin takes over when the swarm stalls"
            if client
            else "pull blobs from the upstream fetchd serve through its swarm",
        )
        g.add_argument(
            "--torrent-min-size",
            type=_size_arg,
            default=16 << 20,
            metavar="SIZE",
            help="smaller blobs come over HTTP (one HTTP GET beats a swarm below it; default 16M)",
        )
        g.add_argument(
            "--bt-listen",
            metavar="ADDR[:PORT]",
            help="the one address BitTorrent listens on (default: the address this host "
            "uses to reach the cache, any free port; never a wildcard)",
        )
        g.add_argument(
            "--bt-allow",
            metavar="CIDR,...",
            help="peers allowed (default: loopback and private ranges: "
            "10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7, fe80::/10)",
        )
        g.add_argument(
            "--lsd",
            action="store_true",
            help="local service discovery (multicast on the listen interface; off by default)",
        )
        if not client:
            g.add_argument(
                "--bt-seeds",
                type=_positive_int,
                default=64,
                metavar="N",
                help="blobs loaded in the seeding session at once (default 64; the others "
                "are loaded when a peer asks for their torrent or announces their swarm, "
                "the least recently used unloaded first)",
            )
        if client:
            g.add_argument(
                "--seed-linger",
                type=_seconds_or_zero,
                default=0.0,
                metavar="SECONDS",
                help="keep seeding what was fetched this long after the pull (default 0)",
            )

    sp = sub.add_parser("pull", help="fetch images into the store")
    sp.add_argument("refs", nargs="+", metavar="REF")
    fetch_options(sp)
    bt_options(sp, client=True)
    sp.add_argument("--digest", help="for https:// URLs: the sha256 the bytes must have")
    sp.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="URL",
        help="a registry mirror (fetchd serve) to ask first; for https:// URLs another URL "
        "with the same bytes (repeatable)",
    )
    sp.add_argument(
        "--mirror-only",
        action="store_true",
        help="never ask the origin (for when it is unreachable): the mirrors resolve tags too",
    )
    sp.add_argument(
        "--pull-from-mirror",
        choices=PULL_FROM_MIRROR,
        default="digest-only",
        help="as registries.conf: digest-only (default) resolves a tag at the origin and "
        "fetches only by digest from the mirrors, which the store verifies; all lets the "
        "mirrors resolve tags too (the mirror then decides what a tag means)",
    )

    sp = sub.add_parser("prefetch", help="pull all concurrently; idempotent; the pre-launch hook")
    sp.add_argument("refs", nargs="*", metavar="REF")
    sp.add_argument("--from", dest="from_file", type=Path, help="a file with one REF per line")
    fetch_options(sp)
    sp.add_argument(
        "--mirror",
        action="append",
        default=[],
        metavar="URL",
        help="a registry mirror (fetchd serve) to ask first (repeatable); with --torrent, "
        "the first one's swarm",
    )
    bt_options(sp, client=True)

    sp = sub.add_parser("images", help="list what the store holds")
    sp.add_argument("--json", action="store_true", help="print one JSON document")

    sp = sub.add_parser("rm", help="forget names (gc frees the blobs)")
    sp.add_argument("refs", nargs="+", metavar="REF|DIGEST")
    sp.add_argument(
        "--platform",
        type=_platform_arg,
        metavar="OS/ARCH[/VARIANT]",
        help="forget only this platform of each name (the name goes with its last one)",
    )

    sp = sub.add_parser("gc", help="remove unreferenced blobs and stale ingests")
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.add_argument(
        "--max-size",
        type=_size_arg,
        metavar="SIZE",
        help="then evict least recently used images and URLs until the store holds at most "
        "SIZE, with a unit: 500M, 20G, 1.5T (M = MiB as in podman; MB = 10^6 bytes)",
    )

    sp = sub.add_parser("fsck", help="re-hash every blob; quarantine what is wrong")
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.add_argument(
        "--rebuild-db",
        action="store_true",
        help="make fetchd.db (an index of the layout) agree with the layout again",
    )
    sp.add_argument(
        "--trust-dir",
        type=Path,
        metavar="DIR",
        help="the keystore whose keys re-verify the stored appc signatures (default as for pull)",
    )

    sp = sub.add_parser("serve", help="the LAN cache: a read-only pull-through OCI registry")
    sp.add_argument("--listen", default="127.0.0.1:5050", metavar="ADDR:PORT")
    sp.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="[PREFIX=]URL",
        help="a registry to pull through (repeatable; the first without PREFIX is the default)",
    )
    sp.add_argument("--token-file", type=Path, help="bearer token for the admin API")
    sp.add_argument(
        "--max-size",
        type=_size_arg,
        metavar="SIZE",
        help="evict least recently used down to SIZE, with a unit: 500M, 20G, 1.5T",
    )
    sp.add_argument(
        "--grace",
        type=_seconds_or_zero,
        default=600.0,
        metavar="SECONDS",
        help="never evict a manifest used within this long (default 600)",
    )
    sp.add_argument(
        "--tag-ttl",
        type=_seconds_or_zero,
        default=60.0,
        metavar="SECONDS",
        help="ask upstream again for a tag after this long (default 60)",
    )
    sp.add_argument("--insecure-options", default="none", metavar="LIST")
    sp.add_argument("--stall-timeout", type=_positive_seconds, default=30.0, metavar="SECONDS")
    sp.add_argument(
        "--upstream-blobs",
        type=_count_arg,
        default=1,
        metavar="N",
        help="blobs of 16 MiB or more fetched from one upstream at once, in the order "
        "clients asked (default 1: each has the whole link, and the first is done first; "
        "the next starts as one ends or idles, or after 20 s); 0: all at once",
    )
    trust_dir_option(sp)
    sp.add_argument(
        "--lookaside",
        metavar="URL",
        help="where simple signatures of OCI images live (registries.d's lookaside: "
        "URL/REPO@sha256=HEX/signature-N)",
    )
    sp.add_argument(
        "--public-status",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show cached repositories and recent pulls on the status page to everyone "
        "(default: only when listening on loopback; else they need the admin token)",
    )
    sp.add_argument(
        "--max-connections",
        type=_positive_int,
        metavar="N",
        help="client connections at once (default 16384; never more than RLIMIT_NOFILE "
        "leaves after a reserve); at the limit the longest idle one is closed",
    )
    bt_options(sp, client=False)

    sp = sub.add_parser(
        "trust",
        help="trust a publisher's key for a name prefix (rkt trust), list or remove keys",
    )
    who = sp.add_mutually_exclusive_group()
    who.add_argument(
        "--prefix",
        metavar="PREFIX",
        help="the names the key may sign: an appc prefix (example.com/app) or "
        "docker://HOST/REPO for OCI images",
    )
    who.add_argument("--root", action="store_true", help="trust the key for every name")
    sp.add_argument(
        "--skip-fingerprint-review",
        action="store_true",
        help="accept the key without asking (scripts; check the fingerprint some other way)",
    )
    sp.add_argument(
        "--insecure-allow-http", action="store_true", help="allow keys from http:// URLs"
    )
    sp.add_argument("--list", action="store_true", help="list the trusted keys")
    sp.add_argument("--json", action="store_true", help="with --list: one JSON document")
    sp.add_argument(
        "--remove", metavar="FINGERPRINT", help="stop trusting a key (for --prefix only, if given)"
    )
    sp.add_argument("--insecure-options", default="none", metavar="LIST")
    sp.add_argument("--resolve", action="append", default=[], metavar="HOST:PORT:ADDR")
    trust_dir_option(sp)
    sp.add_argument(
        "keys",
        nargs="*",
        metavar="KEYFILE|URL",
        help="armored OpenPGP keys (or a PEM public key for docker://); none: the keys "
        "the prefix's meta discovery publishes",
    )

    sp = sub.add_parser(
        "export",
        help="add an image to an OCI layout directory (created if absent; the same name "
        "is replaced, others kept), or write a .tar of one",
    )
    sp.add_argument("ref", metavar="REF")
    sp.add_argument("dest", type=Path, metavar="DIR")
    sp.add_argument("--json", action="store_true", help="print one JSON document")
    sp.add_argument(
        "--platform",
        type=_platform_arg,
        metavar="OS/ARCH[/VARIANT]",
        help="export only this platform of a name stored for several (what umoci needs)",
    )
    return p


def _config(args: argparse.Namespace, store: Path, progress: bool) -> Config:
    if not 1 <= args.max_connections <= 64:
        raise UsageError("--max-connections must be between 1 and 64")
    return Config(
        store=store,
        insecure=parse_insecure(args.insecure_options),
        resolve=parse_resolve(args.resolve),
        platform=Platform.parse(args.platform) if args.platform else Platform.host(),
        all_platforms=args.all_platforms,
        pull_policy=args.pull_policy,
        pull_from_mirror=getattr(args, "pull_from_mirror", "digest-only"),
        stall_timeout=args.stall_timeout,
        progress=progress,
        max_connections=args.max_connections,
        deadline=args.deadline,
        trust_dir=args.trust_dir,
        trust_keys_from_https=args.trust_keys_from_https,
        signature=args.signature,
        lookaside=args.lookaside,
        **_bt_config(args),
    )


def _bt_config(args: argparse.Namespace) -> dict[str, Any]:
    """The BitTorrent fields of Config from the options bt_options() added."""
    allow = BT_ALLOW_DEFAULT
    if args.bt_allow:
        allow = tuple(n.strip() for n in args.bt_allow.split(",") if n.strip())
        for net in allow:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise UsageError(f"--bt-allow {net!r} is not a network (CIDR)") from None
    if args.bt_listen:
        host, _ = _split_listen(args.bt_listen)
        if ipaddress.ip_address(host).is_unspecified:
            raise UsageError(
                f"--bt-listen {args.bt_listen!r} is a wildcard: name the one address to "
                "listen on (peers on other interfaces are not meant to reach it)"
            )
    return {
        "torrent": args.torrent,
        "torrent_min_size": args.torrent_min_size,
        "seed_linger": getattr(args, "seed_linger", 0.0),
        "bt_listen": args.bt_listen,
        "bt_allow": allow,
        "lsd": args.lsd,
        "bt_seeds": getattr(args, "bt_seeds", 64),
    }


def _split_listen(text: str) -> tuple[str, int]:
    """``ADDR[:PORT]`` (IPv6 in brackets when a port follows) → (address, port or 0)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":") or "0"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, "0"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"--bt-listen {text!r}: {host!r} is not an IP address") from None
    if not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise UsageError(f"--bt-listen {text!r}: the port must be 0 to 65535")
    return host, int(port)


async def _pull_all(
    store: Store,
    config: Config,
    progress: Progress,
    refs: list[str],
    digest: Digest | None = None,
    mirrors: tuple[str, ...] = (),
    mirror_only: bool = False,
) -> list[PullResult | FetchdError]:
    bars = TerminalBars(progress) if config.progress else None
    async with Engine(store, config, progress) as engine:

        async def one(ref: str) -> PullResult | FetchdError:
            current_image.set(ref)  # this task's progress rows and bytes are REF's
            try:
                return await engine.pull(ref, digest, mirrors, mirror_only)
            except FetchdError as exc:
                return exc
            except TimeoutError:
                return FetchdError(f"{ref}: not done within --deadline {config.deadline:g} s")
            except OSError as exc:  # this REF's alone: the other pulls go on
                error = _translate(exc)
                if error is None:
                    raise
                return FetchdError(f"{ref}: {error}")

        async def every() -> list[PullResult | FetchdError]:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(one(r)) for r in refs]
            return [t.result() for t in tasks]

        if bars is None:
            return await every()
        async with bars.running():
            return await every()


T = TypeVar("T")


async def _until_sigterm(work: Coroutine[Any, Any, T]) -> T:
    """``work``, cancelled by a SIGTERM as Ctrl-C cancels it (asyncio.run's SIGINT): its
    cleanup runs (an ingest's state saved, the swarm's "stopped" announce, each cache
    told that this pull no longer seeds), then Terminated (exit 143). A second SIGTERM
    kills at once (the default action is back)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        loop.remove_signal_handler(signal.SIGTERM)
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        return await work
    except asyncio.CancelledError:
        if terminated:
            raise Terminated("terminated (SIGTERM)") from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def cmd_pull(args: argparse.Namespace, store: Store, prefetch: bool = False) -> int:
    refs = list(args.refs)
    if prefetch and args.from_file:
        try:
            lines = args.from_file.read_text().splitlines()
        except OSError as exc:
            raise FetchdError(f"cannot read {args.from_file}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            raise UsageError(f"{args.from_file} is not UTF-8 text: give one REF per line") from None
        refs += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not refs:
        raise UsageError("no image references given")
    tty = sys.stderr.isatty() and not args.quiet
    config = _config(args, store.root, progress=tty)
    started = time.monotonic()
    digest = Digest.parse(args.digest) if getattr(args, "digest", None) else None
    mirrors = tuple(getattr(args, "mirror", ()))
    mirror_only = bool(getattr(args, "mirror_only", False))
    if digest and len(refs) != 1:
        raise UsageError("--digest needs exactly one URL")
    if mirror_only and not mirrors:
        raise UsageError("--mirror-only needs --mirror")
    progress = Progress(count_images=True)
    if config.torrent or not all(is_url(r) and not r.endswith(".aci") for r in refs):
        preload_aiohttp()  # a registry, appc or the swarm: aiohttp; a file's URL never
    results = asyncio.run(
        _until_sigterm(_pull_all(store, config, progress, refs, digest, mirrors, mirror_only))
    )
    failed = 0
    pulled: list[dict[str, Any]] = []
    for ref, res in zip(refs, results, strict=True):
        if isinstance(res, FetchdError):
            failed += 1
            print(f"error: {res}", file=sys.stderr)
            continue
        pulled.append(_pull_json(ref, res, progress.received_for(ref)))
        if args.json or prefetch:
            pass
        elif len(refs) == 1:
            print(res.digest)  # DESIGN.md §5: `digest=$(fetchd pull REF)` in scripts
        else:
            print(f"{res.name} {res.digest}")  # which digest is whose, as `images` names it
        log.info("%s: %s (%s)", res.name, res.digest, "fetched" if res.fetched else "present")
    if args.json:
        total = sum(progress.received.values())  # each byte once, whoever asked
        print(json.dumps({"images": pulled, "bytes_fetched": total}, indent=2))
    log.debug("done in %.2f s", time.monotonic() - started)
    return 1 if failed else 0


def _pull_json(ref: str, res: PullResult, received: int) -> dict[str, Any]:
    """One pulled REF in ``pull --json`` / ``prefetch --json`` (README: JSON output)."""
    url = res.manifest.media_type == "application/octet-stream" and not res.manifests
    return {
        "ref": ref,
        "name": res.name,
        "digest": str(res.digest),
        "manifest": None if url else str(res.manifest.digest),
        "platform": None if url else res.platforms[0],
        "platforms": [] if url else res.platforms,
        "size": res.manifest.size if url else None,
        "fetched": res.fetched,
        "bytes_fetched": received,
    }


def cmd_images(args: argparse.Namespace, store: Store) -> int:
    infos = mt.images(store)
    if args.json:
        print(json.dumps([i.to_json() for i in infos], indent=2))
        return 0
    print(f"{'NAME':<50} {'PLATFORM':<24} {'DIGEST':<20} {'SIZE':>10}  LAST USED")
    for i in infos:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(i.last_used)) if i.last_used else "-"
        plats = ",".join(i.platforms) or "-"
        print(f"{i.name:<50} {plats:<24} {i.digest[:19]:<20} {format_size(i.size):>10}  {used}")
    return 0


def cmd_rm(args: argparse.Namespace, store: Store) -> int:
    if args.platform:
        return _rm_platform(store, args.refs, Platform.parse(args.platform))
    for name in mt.remove(store, args.refs):
        print(name)
    return 0


def _rm_platform(store: Store, refs: list[str], platform: Platform) -> int:
    """``rm --platform``: one platform of each name; with its last, the name."""
    for entry in mt.resolve_names(store, refs):
        stored = [Platform.from_json(d.platform) for d in layout.manifests(store, entry)]
        if stored and all(p == platform for p in stored):
            mt.remove(store, [entry.name])  # its last platform: the name goes (and its times)
            print(f"{entry.name} {platform}")
            continue
        removed, _ = layout.remove_platform(store, entry.name, platform)
        for text in removed:
            print(f"{entry.name} {text}")
    return 0


def cmd_gc(args: argparse.Namespace, store: Store) -> int:
    r = mt.gc(store, args.max_size)
    if args.json:
        print(json.dumps(r.to_json(), indent=2))
        return 0
    for name in r.evicted_images or []:
        print(f"evicted {name}")
    print(
        f"removed {r.removed_blobs} blobs ({format_size(r.freed_bytes)}), "
        f"{r.removed_ingests} stale ingests"
    )
    if r.trees is None:
        print("stage1 gc: cannot read trees/ as this user (run it as the store's owner)")
    elif r.trees.count:
        print(
            f"stage1 gc would free {r.trees.count} trees ({format_size(r.trees.bytes)}) in trees/"
        )
    return 0


def cmd_fsck(args: argparse.Namespace, store: Store) -> int:
    r = mt.fsck(store, rebuild_db=args.rebuild_db, trust_dir=args.trust_dir)
    if args.json:
        print(json.dumps({**r.to_json(), "quarantine": str(store.quarantine)}, indent=2))
        if not r.ok:
            raise StoreCorrupt("the store has problems (in the JSON document); pull them again")
        return 0
    if r.rebuilt_db is not None:
        print(
            f"fetchd.db rebuilt from the layout ({r.rebuilt_db[0]} names and "
            f"{r.rebuilt_db[1]} URLs added, {r.adopted_urls} URLs moved into the layout)"
        )
    for d in r.corrupt or []:
        print(f"corrupt: {d} (moved to {store.quarantine})")
    for m in r.missing or []:
        print(f"missing: {m}")
    for sig in r.signatures or []:
        print(f"signature: {sig}")
    print(f"checked {r.checked} blobs: {'ok' if r.ok else 'PROBLEMS FOUND'}")
    if not r.ok:
        raise StoreCorrupt("the store has problems (listed above); pull the affected images again")
    return 0


def cmd_export(args: argparse.Namespace, store: Store) -> int:
    platform = Platform.parse(args.platform) if args.platform else None
    result = mt.export(store, args.ref, args.dest, platform)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.dest)
    return 0


def cmd_trust(args: argparse.Namespace, store: Store) -> int:
    from fetchd.trust import command

    config = Config(
        store=store.root,
        insecure=parse_insecure(args.insecure_options),
        resolve=parse_resolve(args.resolve),
        trust_dir=args.trust_dir,
    )
    return command.run(args, config)


def cmd_serve(args: argparse.Namespace, store: Store) -> int:
    preload_aiohttp()  # before fetchd.server imports it, while this is the one thread
    from fetchd.server.app import Server, read_token, serve
    from fetchd.server.cache import Cache
    from fetchd.server.upstreams import Upstream, Upstreams

    host, sep, port = args.listen.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise UsageError(f"--listen {args.listen!r} is not ADDR:PORT (a port is 0 to 65535)")
    if not args.upstream:
        raise UsageError("serve needs at least one --upstream URL")
    upstreams = Upstreams([Upstream.parse(u) for u in args.upstream])
    config = Config(
        store=store.root,
        insecure=parse_insecure(args.insecure_options),
        stall_timeout=args.stall_timeout,
        trust_dir=args.trust_dir,
        lookaside=args.lookaside,
        **_bt_config(args),
    )
    token = read_token(args.token_file)
    swarm = _serve_swarm(config, host.strip("[]"), lambda hex: server.torrents.corrupt(hex))
    cache = Cache(store, config, upstreams, args.tag_ttl, swarm, args.upstream_blobs)
    server = Server(cache, token, args.max_size, args.grace, args.public_status, swarm=swarm)

    def ready(url: str) -> None:
        print(f"fetchd serve: listening on {url}", flush=True)

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(server, host.strip("[]"), int(port), ready, args.max_connections)

    asyncio.run(main())
    return 0


def _serve_swarm(config: Config, http_host: str, on_corrupt: Callable[[str], None]) -> Swarm | None:
    """serve's seeding session (a fetchd.bt.session.Swarm), or None when it cannot have
    one (torrents, slices and the tracker still work: fetchd hosts take the blob over
    HTTP in slices and trade it among themselves). It listens on --bt-listen, else on
    --listen's address with a free port, never on a wildcard: a --listen of 0.0.0.0, ::
    or a host name without --bt-listen runs without a seed, with a warning."""
    if config.bt_listen:
        addr, port = _split_listen(config.bt_listen)
    else:
        addr, port = http_host, 0
        try:
            wildcard = ipaddress.ip_address(addr).is_unspecified
        except ValueError:
            wildcard = True
        if wildcard:
            log.warning(
                "serve does not seed over BitTorrent: --listen %s is not one address, and "
                "BitTorrent listens on one; name it with --bt-listen ADDR[:PORT] (an address "
                "of the LAN the peers are on)",
                http_host or "*",
            )
            return None
    try:
        from fetchd.bt.session import Swarm
    except ImportError as exc:
        log.warning("libtorrent does not import (%s): serve will not seed", exc)
        return None
    listen = f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
    return Swarm(config, listen, on_corrupt=on_corrupt)


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(argv)
    _globals(args)
    level = (
        logging.WARNING
        if not args.verbose
        else (logging.INFO if args.verbose == 1 else logging.DEBUG)
    )
    if args.quiet:
        level = logging.ERROR
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        if args.verbose > 1
        else "%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    store = Store.open(args.store or default_store())
    commands = {
        "pull": cmd_pull,
        "images": cmd_images,
        "rm": cmd_rm,
        "gc": cmd_gc,
        "fsck": cmd_fsck,
        "export": cmd_export,
        "serve": cmd_serve,
        "trust": cmd_trust,
    }
    if args.command == "prefetch":
        return cmd_pull(args, store, prefetch=True)
    return commands[args.command](args, store)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


def _translate(exc: BaseException) -> FetchdError | None:
    """The user's error an exception that no seam translated stands for, if any.

    A TaskGroup wraps what its tasks raised: the first deliberate error inside counts.
    An OSError the user can cause (a full disk, permissions, a missing directory) is
    said as such; anything else is a bug (None).
    """
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, FetchdError):
            return leaf
    for leaf in leaves:
        if is_full(leaf):  # a write into the store that no seam translated
            return DiskFull("data", "the store")
        if is_read_only(leaf):
            where = getattr(leaf, "filename", None) or "the store"
            return FetchdError(
                f"cannot write {where}: {getattr(leaf, 'strerror', None) or leaf}; run as "
                "a user who may write there (the store's owner), or use --store DIR with a "
                "store you can write"
            )
        if isinstance(leaf, OSError) and leaf.errno in (errno.ENOENT, errno.ENOTDIR):
            return FetchdError(
                f"{leaf.filename or 'a file'}: {leaf.strerror}; check the path "
                "(--store, or the file given)"
            )
        if isinstance(leaf, OSError) and leaf.strerror:
            where = f"{leaf.filename}: " if leaf.filename else ""
            return FetchdError(f"{where}{leaf.strerror}")
    return None


def _verbose(argv: Sequence[str]) -> bool:
    for arg in argv:
        if arg == "--":
            break
        if arg == "--verbose" or (len(arg) > 1 and arg.strip("v") == "-"):
            return True
    return False


def main(argv: Sequence[str] | None = None) -> None:
    args = list(argv) if argv is not None else sys.argv[1:]
    try:
        code = run(args)
    except FetchdError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except Exception as exc:  # the one place that decides what a bug shows
        if _verbose(args):
            raise
        error = _translate(exc)
        if error is not None:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(error.exit_code)
        # A bug: still one line unless -v asks for the traceback.
        print(
            f"error: internal error: {type(exc).__name__}: {exc}; this is a bug in fetchd: "
            "please report it with the output of the same command run with -v",
            file=sys.stderr,
        )
        code = 1
    sys.exit(code)
