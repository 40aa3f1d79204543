"""``fetchd trust``: rkt trust's words and flags, on fetchd's keystore.

::

    fetchd trust --prefix example.com/app [--skip-fingerprint-review] [--insecure-allow-http]
                 [KEYFILE|https://…|http://…]…
    fetchd trust --root KEYFILE…
    fetchd trust --list [--json]
    fetchd trust --remove FINGERPRINT [--prefix P]
    fetchd trust --prefix docker://HOST[:PORT]/REPO KEYFILE|COSIGN_PUBKEY…

- Neither ``--prefix`` nor ``--root`` with keys: refused as rkt did ("aborting due to
  implicit unbounded trust"). A prefix is an AC identifier compared by path component;
  ``..``, ``//`` and URL schemes are refused.
- A ``docker://`` prefix is read as ``fetchd pull`` reads that name
  (:func:`fetchd.trust.keystore.oci_prefix`): ``docker://busybox`` is
  ``docker.io/library/busybox``, the Docker Hub's aliases are ``docker.io``,
  ``docker://HOST`` alone is the whole registry; the normalised prefix is what is shown.
- No key with ``--prefix``: the prefix's ``ac-discovery-pubkeys`` walk
  (:func:`fetchd.appc.discovery.discover_pubkeys`, https only unless ``--insecure-options
  http``), as rkt's ``GetPubKeyLocations``.
- Keys come from a file, an ``https://`` URL (verified TLS; ``--insecure-options tls`` to
  skip, with a warning), or ``http://`` with ``--insecure-allow-http``. Bounded: 1 MiB per
  key file, 120 s per URL, ≤ 5 redirects, and an https URL that redirects to http:// needs
  ``--insecure-allow-http`` too.
- Each key is shown on stderr as rkt does (prefix, key location, "gpg key fingerprint is:",
  subkeys, identities) and must pass fetchd's policy (not revoked, not expired, RSA ≥ 2048…)
  before anything is written. Review: "Are you sure you want to trust this key (yes/no)?"
  on a terminal (stdin and stderr); without one and without ``--skip-fingerprint-review``
  the command refuses (exit 1) and says how to proceed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from fetchd.errors import FetchdError, KeyRefused, TrustError, UsageError
from fetchd.trust.keystore import (
    DOCKER,
    CosignKey,
    Keystore,
    TrustedKey,
    normalize_fingerprint,
    oci_prefix,
    spki_digest,
    validate_prefix,
)
from fetchd.trust.openpgp import (
    MAX_KEY_FILE,
    KeyInfo,
    display_fingerprint,
    policy_problem,
    read_keys,
)

if TYPE_CHECKING:
    import aiohttp

    from fetchd.config import Config

URL_TIMEOUT = 120.0
MAX_REDIRECTS = 5
MAX_REVIEW_ANSWERS = 10


@dataclass(frozen=True)
class _Source:
    location: str  # what the user gave (or discovery found)
    data: bytes
    https: bool  # came over verified https (or is a local file: False)


def _err(*lines: str) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def run(args: argparse.Namespace, config: Config) -> int:
    keystore = Keystore.default(getattr(args, "trust_dir", None) or config.trust_dir)
    keys: list[str] = list(getattr(args, "keys", None) or [])
    prefix: str | None = getattr(args, "prefix", None)
    root = bool(getattr(args, "root", False))
    if getattr(args, "list", False):
        if keys or args.remove or root:
            raise UsageError("--list takes no KEYFILE, --remove or --root")
        return _list(keystore, json_output=bool(getattr(args, "json", False)))
    if getattr(args, "json", False):
        raise UsageError("--json goes with --list")
    if getattr(args, "remove", None):
        if keys or root:
            raise UsageError("--remove FINGERPRINT takes no KEYFILE and no --root")
        return _remove(keystore, args.remove, prefix)
    if root and prefix is not None:
        raise TrustError("--root and --prefix usage mutually exclusive")
    if not root and prefix is None:
        if not keys:
            raise UsageError(
                "fetchd trust needs --prefix PREFIX or --root with a key (or --list, --remove)"
            )
        raise TrustError(
            "aborting due to implicit unbounded trust (root domain); trust a key for the "
            "names of one publisher with fetchd trust --prefix example.com/app KEYFILE, or "
            "for every name with fetchd trust --root KEYFILE"
        )
    if prefix is not None:
        try:
            prefix = validate_prefix(prefix)
        except UsageError as exc:  # a bad --prefix is refused like any untrusted input
            raise TrustError(exc.message) from None
    if root and not keys:
        raise TrustError("--root needs a KEYFILE (root keys are never discovered)")
    if prefix is not None and prefix.startswith(DOCKER) and not keys:
        raise TrustError(
            f"--prefix {prefix} needs a KEYFILE or COSIGN_PUBKEY (OCI publishers publish no "
            "discovery)"
        )
    for key in keys:
        _check_location(key, bool(getattr(args, "insecure_allow_http", False)))
    sources = asyncio.run(_gather(keys, prefix, args, config))
    return _trust(keystore, sources, prefix, args)


# --- getting the keys --------------------------------------------------------------------


def _check_location(location: str, allow_http: bool) -> None:
    scheme = urlsplit(location).scheme if "://" in location else ""
    if scheme == "http" and not allow_http:
        raise TrustError(f"--insecure-allow-http required for http URLs ({location})")
    if scheme not in ("", "http", "https"):
        raise TrustError(f"{location}: only local files and http or https URLs supported as keys")


async def _gather(
    keys: Sequence[str], prefix: str | None, args: argparse.Namespace, config: Config
) -> list[_Source]:
    allow_http = bool(getattr(args, "insecure_allow_http", False))
    urls = [k for k in keys if "://" in k]
    sources: list[_Source] = []
    if not keys or urls:
        from fetchd.sources.http import new_session

        if "tls" in config.insecure:
            _err("warning: TLS verification has been disabled")
        async with new_session(config) as session:
            if not keys:
                assert prefix is not None
                found = await _discover(prefix, config, session)
                allow_http = allow_http or "pubkey" in config.insecure
                for url in found:
                    _check_location(url, allow_http)
                    sources.append(await _fetch_url(session, url, config, allow_http))
            else:
                for key in keys:
                    if "://" in key:
                        sources.append(await _fetch_url(session, key, config, allow_http))
                    else:
                        sources.append(await asyncio.to_thread(_read_file, key))
            return sources
    return [await asyncio.to_thread(_read_file, key) for key in keys]


async def _discover(prefix: str, config: Config, session: aiohttp.ClientSession) -> list[str]:
    from fetchd.appc.discovery import discover_pubkeys

    hint = f"give the key: fetchd trust --prefix {prefix} KEYFILE"
    try:
        found, attempts = await discover_pubkeys(prefix, config, session)
    except FetchdError as exc:
        raise TrustError(f"error determining key location: {exc}; {hint}") from exc
    if not found:
        tried = "; ".join(f"{a.prefix}: {a.error or 'no keys'}" for a in attempts)
        raise TrustError(
            f"meta discovery on {prefix} resulted in no keys"
            + (f" ({tried})" if tried else "")
            + f"; {hint}"
        )
    return list(found)


def _read_file(location: str) -> _Source:
    path = Path(location)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise TrustError(f"cannot read the key {location}: {exc.strerror or exc}") from exc
    if len(data) > MAX_KEY_FILE:
        raise TrustError(f"the key {location} is larger than 1 MiB; it is not a public key")
    return _Source(location, data, https=False)


async def _fetch_url(
    session: aiohttp.ClientSession, url: str, config: Config, allow_http: bool
) -> _Source:
    from fetchd.sources.http import redact, translate

    shown = redact(url)
    try:
        async with asyncio.timeout(URL_TIMEOUT):
            current = url
            for _ in range(MAX_REDIRECTS + 1):
                async with session.get(current, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308):
                        location = resp.headers.get("Location", "")
                        nxt = urljoin(current, location)
                        scheme = urlsplit(nxt).scheme
                        if scheme not in ("http", "https"):
                            raise TrustError(f"{shown} redirects to {location!r}; refused")
                        if scheme == "http" and not allow_http:
                            raise TrustError(
                                f"{shown} redirects to {redact(nxt)} (plain http); refused "
                                "without --insecure-allow-http"
                            )
                        current = nxt
                        continue
                    if resp.status != 200:
                        raise TrustError(f"cannot fetch the key {shown}: HTTP {resp.status}")
                    data = await _read_key_body(resp, shown)
                    https = urlsplit(current).scheme == "https" and "tls" not in config.insecure
                    return _Source(url, data, https=https)
            raise TrustError(f"{shown}: more than {MAX_REDIRECTS} redirects")
    except TimeoutError:
        raise TrustError(f"cannot fetch the key {shown}: no answer in {URL_TIMEOUT:g} s") from None
    except FetchdError:
        raise
    except Exception as exc:
        raise TrustError(f"cannot fetch the key: {translate(exc, shown, config)}") from exc


async def _read_key_body(resp: aiohttp.ClientResponse, shown: str) -> bytes:
    """The whole body, to its end (one read returns only what has arrived), ≤ 1 MiB."""
    too_big = f"the key {shown} is larger than 1 MiB; it is not a public key"
    if resp.content_length is not None and resp.content_length > MAX_KEY_FILE:
        raise TrustError(too_big)
    pieces: list[bytes] = []
    got = 0
    while more := await resp.content.read(MAX_KEY_FILE + 1 - got):
        pieces.append(more)
        got += len(more)
        if got > MAX_KEY_FILE:
            raise TrustError(too_big)
    return b"".join(pieces)


# --- showing, reviewing, storing ---------------------------------------------------------


def _show_openpgp(key: KeyInfo, where: str, location: str) -> None:
    _err(
        where,
        f"key: {json.dumps(location)}",
        f"gpg key fingerprint is: {display_fingerprint(key.fingerprint)}",
    )
    for part in key.parts[1:]:
        _err(f"    Subkey fingerprint: {display_fingerprint(part.fingerprint)}")
    for uid in key.user_ids:
        _err(f"\t{uid}")


def _show_cosign(digest: str, where: str, location: str) -> None:
    _err(where, f"key: {json.dumps(location)}", f"cosign public key sha256 (SPKI): {digest}")


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def can_review() -> bool:
    """A person can be asked: stdin and stderr are both terminals (rkt's rule)."""
    return _is_tty(sys.stdin) and _is_tty(sys.stderr)


def review_key(key: KeyInfo, prefix: str, location: str) -> bool:
    """Show ``key`` as ``fetchd trust`` does and ask on the terminal whether to trust it for
    ``prefix`` (blocking: call it on a thread). False on "no", or without a terminal."""
    if not can_review():
        return False
    _show_openpgp(key, f"prefix: {json.dumps(prefix)}", location)
    return _ask()


def _ask() -> bool:
    for _ in range(MAX_REVIEW_ANSWERS):
        print("Are you sure you want to trust this key (yes/no)?", file=sys.stderr, flush=True)
        answer = sys.stdin.readline()
        if answer == "yes\n":
            return True
        if answer == "no\n" or answer == "":
            return False
        _err("Please enter 'yes' or 'no'")
    return False


def _review(prefix: str | None, location: str, args: argparse.Namespace) -> bool:
    """True to trust; False when the user says no. Refuses without a terminal."""
    target = f"prefix {json.dumps(prefix)}" if prefix else "all names (root)"
    if getattr(args, "skip_fingerprint_review", False):
        _err(f"Trusting {json.dumps(location)} for {target} without fingerprint review.")
        return True
    if not can_review():
        how = f"--prefix {prefix}" if prefix else "--root"
        if prefix and not prefix.startswith(DOCKER):
            _err(
                f"To trust the key for {json.dumps(prefix)}, do one of the following:",
                " - call fetchd pull with --trust-keys-from-https",
                f" - run: fetchd trust --prefix {prefix} (on a terminal)",
            )
        raise TrustError(
            "error reviewing key: unable to ask user to review fingerprint due to lack of "
            f"tty; check the fingerprint above and run fetchd trust {how} "
            "--skip-fingerprint-review …"
        )
    return _ask()


def _trust(
    keystore: Keystore, sources: list[_Source], prefix: str | None, args: argparse.Namespace
) -> int:
    where = f"prefix: {json.dumps(prefix)}" if prefix else "root: all names"
    oci = prefix is not None and prefix.startswith(DOCKER)
    # Parse and judge everything first: nothing is written if one key is refused.
    plans: list[tuple[_Source, list[KeyInfo], str | None]] = []
    now = time.time()
    for src in sources:
        if oci and src.data.lstrip().startswith(b"-----BEGIN PUBLIC KEY-----"):
            plans.append((src, [], spki_digest(src.data, f"the key {src.location}")))
            continue
        keys = read_keys(src.data, f"the key {src.location}")
        for key in keys:
            problem = policy_problem(key, now)
            if problem is not None:
                _show_openpgp(key, where, src.location)
                raise KeyRefused(
                    f"the key {key.describe()} from {src.location} is refused: {problem}; "
                    "nothing was trusted"
                )
        plans.append((src, keys, None))
    added = 0
    for src, keys, digest in plans:
        if digest is not None:
            _show_cosign(digest, where, src.location)
            if not _review(prefix, src.location, args):
                _err(f"Not trusting {json.dumps(src.location)}")
                continue
            host, repo = oci_prefix(prefix or "")
            for path in keystore.add_oci(src.data, host, repo):
                _err(f"Added key for prefix {json.dumps(prefix)} at {json.dumps(str(path))}")
                added += 1
            continue
        for key in keys:
            _show_openpgp(key, where, src.location)
            if not _review(prefix, src.location, args):
                _err(f"Not trusting {json.dumps(src.location)}")
                continue
            for path in keystore.add(key.raw, prefix):
                if prefix is None:
                    _err(f"Added root key at {json.dumps(str(path))}")
                else:
                    _err(f"Added key for prefix {json.dumps(prefix)} at {json.dumps(str(path))}")
                added += 1
    if not added:
        raise TrustError("no key was trusted")
    return 0


# --- --list and --remove -----------------------------------------------------------------


def _system(keystore: Keystore, path: Path) -> bool:
    return keystore.system is not None and path.is_relative_to(keystore.system)


def _key_json(keystore: Keystore, k: TrustedKey, now: float) -> dict[str, Any]:
    info = k.info
    return {
        "kind": "openpgp",
        "prefix": k.prefix,
        "root": k.prefix is None,
        "fingerprint": info.fingerprint,
        "user_ids": list(info.user_ids),
        "algorithm": info.algorithm,
        "signing_keys": list(info.signing_keys),
        "subkeys": [p.fingerprint for p in info.parts[1:]],
        "expires": info.expires,
        "revoked": info.revoked,
        "problem": policy_problem(info, now),
        "path": str(k.path),
        "system": _system(keystore, k.path),
    }


def _cosign_json(keystore: Keystore, c: CosignKey) -> dict[str, Any]:
    return {
        "kind": "cosign",
        "prefix": c.prefix,
        "root": False,
        "fingerprint": c.digest,
        "path": str(c.path),
        "system": _system(keystore, c.path),
        "problem": None,
    }


def _list(keystore: Keystore, *, json_output: bool) -> int:
    now = time.time()
    entries = [_key_json(keystore, k, now) for k in keystore.entries()]
    gpg, cosign = keystore.oci_entries()
    entries += [_key_json(keystore, k, now) for k in gpg]
    entries += [_cosign_json(keystore, c) for c in cosign]
    if json_output:
        doc = {"local": str(keystore.local), "system": str(keystore.system or ""), "keys": entries}
        print(json.dumps(doc, indent=2))
        return 0
    if not entries:
        _err(
            f"no trusted keys in {keystore.local}"
            + (f" or {keystore.system}" if keystore.system else "")
        )
        return 0
    for e in entries:
        who = "(root)" if e["root"] else e["prefix"]
        label = (
            display_fingerprint(e["fingerprint"])
            if e["kind"] == "openpgp"
            else f"cosign sha256:{e['fingerprint']}"
        )
        uid = e.get("user_ids") or []
        line = f"{who}\t{label}\t{uid[0] if uid else ''}"
        if e["problem"]:
            line += f"\t(refused: {e['problem']})"
        if e["system"]:
            line += "\t(system)"
        print(line)
    return 0


def _remove(keystore: Keystore, fingerprint: str, prefix: str | None) -> int:
    text = fingerprint.strip().removeprefix("cosign-").removesuffix(".pub")
    fpr = normalize_fingerprint(text.removeprefix("sha256:"))
    if prefix is not None:
        try:
            prefix = validate_prefix(prefix)
        except UsageError as exc:
            raise TrustError(exc.message) from None
    for path in keystore.remove(fpr, prefix):
        if path.exists():
            _err(f"Masked the system key {fpr} with {json.dumps(str(path))}")
        else:
            _err(f"Removed {json.dumps(str(path))}")
    return 0
