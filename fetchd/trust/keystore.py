"""The keystore: which OpenPGP keys (and cosign public keys) are trusted for which names.

rkt's layout and pkg/keystore semantics, so ``--trust-dir /etc/rkt`` reads an rkt keystore
as it is::

    LOCAL/trustedkeys/root.d/<fingerprint>                 trusted for every name
    LOCAL/trustedkeys/prefix.d/<a>/<b>/<fingerprint>       trusted for a/b and below
    SYSTEM/trustedkeys/…                                   the same, vendor keys (read only)
    LOCAL/trustedkeys/oci.d/<host[:port]>/<repo>/…         OCI publishers (beyond rkt):
        <fingerprint> (OpenPGP, simple signing) or cosign-<sha256 of the SPKI DER>.pub (PEM)

An OCI prefix is read as a pull name is (:meth:`fetchd.model.Reference.parse`), so the key
guards what ``fetchd pull`` of that name fetches: ``docker://busybox`` is
``docker.io/library/busybox``, ``docker://team/app`` is ``docker.io/team/app``; the Docker
Hub's names (``docker.io``, ``index.docker.io``, ``registry-1.docker.io``) are one host,
stored and looked up as ``docker.io``. ``docker://HOST`` alone (HOST with a '.' or a ':',
or ``localhost``) is the whole registry. A trailing '/' says "this path and below" without
Hub's ``library/``: ``docker://docker.io/team/`` covers ``docker.io/team/*``.

LOCAL is ``/etc/fetchd`` for root, ``${XDG_CONFIG_HOME:-~/.config}/fetchd`` for others, or
``--trust-dir``; SYSTEM is ``/usr/lib/fetchd`` (``/usr/lib/rkt`` with ``--trust-dir /etc/rkt``).

- A key file is named by its certificate's fingerprint (40 lowercase hex) and holds that one
  certificate, armored; a file whose first certificate has another fingerprint is an error
  ("fingerprint mismatch"), as in rkt. Files with other names are ignored.
- An **empty local file masks** the system key of that fingerprint (rkt's order: system
  root.d, local root.d, system prefix.d, local prefix.d; an empty file removes what was
  loaded before it).
- Which keys apply to a name: root.d plus every directory of prefix.d that is a **path
  component** prefix of the name (``example.com/app`` applies to ``example.com/app/x``,
  never to ``example.com/apple``: rkt compared strings, a key for ``example.com/ap`` applied
  to ``example.com/app``).
- Files are written 0644 through a temporary file and a rename, directories 0755.

Everything read is bounded (a key file ≤ 1 MiB, ≤ 1000 files per directory).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fetchd.errors import KeyRefused, TrustError, UsageError
from fetchd.model import DOCKER_HUB
from fetchd.trust.openpgp import MAX_KEY_FILE, KeyInfo, policy_problem, read_keys

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

AC_IDENTIFIER = re.compile(r"^[a-z0-9]+([-._~/][a-z0-9]+)*$")
FINGERPRINT = re.compile(r"^([0-9a-f]{40}|[0-9a-f]{64})$")
COSIGN_FILE = re.compile(r"^cosign-[0-9a-f]{64}\.pub$")
_HOST = re.compile(
    r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[0-9]{1,5})?$"
)
_REPO_COMPONENT = re.compile(r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*$")
MAX_PREFIX = 1024
MAX_FILES_PER_DIR = 1000
DOCKER = "docker://"
#: the Docker Hub's names; keys for any of them are stored and looked up under DOCKER_HUB
DOCKER_HUB_ALIASES = (DOCKER_HUB, "index.docker.io", "registry-1.docker.io")


def validate_prefix(prefix: str) -> str:
    """A ``--prefix`` value as stored: an AC identifier, or ``docker://HOST[:PORT][/REPO]``
    normalised as a pull name is (see the module docstring; idempotent)."""
    if prefix.startswith(DOCKER):
        host, repo = oci_prefix(prefix)
        return oci_label(host, repo)
    scheme, sep, _ = prefix.partition("://")
    if sep:
        raise UsageError(f"--prefix must not contain a URL scheme, omit {scheme}://")
    if len(prefix) > MAX_PREFIX:
        raise UsageError(f"--prefix is longer than {MAX_PREFIX} characters")
    if ".." in prefix.split("/") or "//" in prefix or prefix.startswith("/"):
        raise UsageError(f"--prefix {prefix!r} must not contain '..', '//' or start with '/'")
    if not AC_IDENTIFIER.match(prefix):
        raise UsageError(
            f"--prefix {prefix!r} is not an AC identifier (lower-case letters, digits and "
            "-._~ between them, components separated by '/', as example.com/app)"
        )
    return prefix


def _looks_like_host(first: str) -> bool:
    """Reference.parse's test for a registry host as the first component."""
    return "." in first or ":" in first or first == "localhost"


def oci_prefix(prefix: str) -> tuple[str, str]:
    """``docker://[HOST[:PORT]/]REPO[/]`` or ``docker://HOST[:PORT]`` → (host[:port], repo
    or "" for the whole registry), as a pull of that name would look it up: docker.io is
    the default host, a one-component Hub name gains ``library/`` (not with a trailing
    '/'), and the Hub's aliases become docker.io."""
    rest = prefix.removeprefix(DOCKER)
    subtree = rest.endswith("/")
    rest = rest.removesuffix("/")
    first, slash, remainder = rest.partition("/")
    if _looks_like_host(first) or not rest:
        host, repo = first.lower(), remainder
    else:  # as Reference.parse: no host given, so Docker Hub
        host, repo = DOCKER_HUB, rest
    if not host or not _HOST.match(host):
        raise UsageError(f"--prefix {prefix!r}: {host!r} is not a registry HOST[:PORT]")
    if ":" in host and int(host.rsplit(":", 1)[1]) > 65535:
        raise UsageError(f"--prefix {prefix!r}: the port is above 65535")
    if slash and not repo:
        raise UsageError(f"--prefix {prefix!r}: '//' is not a repository path")
    if repo and (
        len(repo) > MAX_PREFIX or not all(_REPO_COMPONENT.match(c) for c in repo.split("/"))
    ):
        raise UsageError(
            f"--prefix {prefix!r}: {repo!r} is not a repository path (lower-case "
            "components separated by '/', no tag or digest)"
        )
    host = canonical_host(host)
    if host == DOCKER_HUB and repo and "/" not in repo and not subtree:
        repo = f"library/{repo}"
    return host, repo


def canonical_host(host: str) -> str:
    """The registry host as keys are stored: the Docker Hub's aliases are docker.io, and
    https's own port is no part of the name (``registry-1.docker.io:443`` is the Hub)."""
    host = host.lower().removesuffix(":443")
    return DOCKER_HUB if host in DOCKER_HUB_ALIASES else host


def oci_label(host: str, repo: str) -> str:
    """The ``docker://`` prefix of a stored (host, repo), parsed back to the same pair by
    :func:`oci_prefix` (a one-component Hub path keeps its trailing '/')."""
    if not repo:
        return f"{DOCKER}{host}"
    tail = "/" if host == DOCKER_HUB and "/" not in repo else ""
    return f"{DOCKER}{host}/{repo}{tail}"


def oci_name(host: str, name: str) -> tuple[str, str]:
    """A pulled repository (``Reference.host``, ``Reference.name``) as keys are looked up
    for it: the Hub's aliases are docker.io, a one-component Hub name is ``library/NAME``."""
    host = canonical_host(host)
    if host == DOCKER_HUB and name and "/" not in name:
        name = f"library/{name}"
    return host, name


def normalize_fingerprint(text: str) -> str:
    """``9EF1 776C …`` or ``0x9ef1…`` → 40 lowercase hex (UsageError otherwise)."""
    fpr = text.replace(" ", "").lower().removeprefix("0x")
    if not FINGERPRINT.match(fpr):
        raise UsageError(
            f"{text!r} is not a key fingerprint (40 hex digits; see fetchd trust --list)"
        )
    return fpr


def _components(path: str) -> list[str]:
    """``a/b/c`` → ``["a", "a/b", "a/b/c"]``."""
    parts = path.split("/")
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


@dataclass(frozen=True)
class TrustedKey:
    info: KeyInfo
    path: Path
    prefix: str | None  # None = root


@dataclass(frozen=True)
class CosignKey:
    """A PEM public key trusted for OCI images (cosign format signatures)."""

    pem: bytes
    path: Path
    prefix: str  # docker://HOST/REPO
    digest: str  # sha256 hex of the SPKI DER (the file's name)


class Keystore:
    def __init__(self, local: Path, system: Path | None) -> None:
        self.local = local
        self.system = system

    @classmethod
    def default(cls, trust_dir: Path | None) -> Keystore:
        if trust_dir is not None:
            system = Path("/usr/lib/rkt") if str(trust_dir) == "/etc/rkt" else None
            return cls(trust_dir, system)
        if os.geteuid() == 0:
            return cls(Path("/etc/fetchd"), Path("/usr/lib/fetchd"))
        config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return cls(Path(config) / "fetchd", Path("/usr/lib/fetchd"))

    def __repr__(self) -> str:
        return f"Keystore({self.local}, system={self.system})"

    # --- paths -----------------------------------------------------------------------

    def _roots(self) -> list[tuple[Path, bool]]:
        """(trustedkeys dir, is_local): system first (it may be masked by local)."""
        out: list[tuple[Path, bool]] = []
        if self.system is not None:
            out.append((self.system / "trustedkeys", False))
        out.append((self.local / "trustedkeys", True))
        return out

    @staticmethod
    def _dir(base: Path, prefix: str | None) -> Path:
        return base / "root.d" if prefix is None else base / "prefix.d" / prefix

    @staticmethod
    def _oci_dir(base: Path, host: str, repo: str) -> Path:
        return base / "oci.d" / host / repo if repo else base / "oci.d" / host

    # --- reading ---------------------------------------------------------------------

    @staticmethod
    def _files(directory: Path) -> list[Path]:
        try:
            entries = sorted(directory.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise TrustError(f"cannot read the keystore directory {directory}: {exc}") from exc
        files = [e for e in entries if e.is_file()]
        if len(files) > MAX_FILES_PER_DIR:
            raise TrustError(
                f"{directory} holds {len(files)} files; at most {MAX_FILES_PER_DIR} are read"
            )
        return files

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            with path.open("rb") as f:
                data = f.read(MAX_KEY_FILE + 1)
        except OSError as exc:
            raise TrustError(f"cannot read the trusted key {path}: {exc}") from exc
        if len(data) > MAX_KEY_FILE:
            raise TrustError(f"the trusted key {path} is larger than 1 MiB; remove it")
        return data

    def _load_key(self, path: Path) -> KeyInfo:
        data = self._read(path)
        keys = read_keys(data, f"the trusted key {path}")
        if keys[0].fingerprint != path.name:
            raise TrustError(
                f"fingerprint mismatch: {str(path)!r}:{keys[0].fingerprint!r}; the file must be "
                "named by its key's fingerprint (remove it, or add the key with fetchd trust)"
            )
        return keys[0]

    def _walk(self, dirs: list[tuple[Path, str | None, bool]], into: dict[str, TrustedKey]) -> None:
        for directory, prefix, _is_local in dirs:
            for path in self._files(directory):
                fpr = path.name
                if not FINGERPRINT.match(fpr):
                    continue
                try:
                    empty = path.stat().st_size == 0
                except OSError as exc:
                    raise TrustError(f"cannot read the trusted key {path}: {exc}") from exc
                if empty:
                    into.pop(fpr, None)  # an empty file masks what was loaded before it
                    continue
                into[fpr] = TrustedKey(self._load_key(path), path, prefix)

    def _prefix_dirs(self, name: str) -> list[tuple[Path, str | None, bool]]:
        return [
            (self._dir(base, p), p, is_local)
            for base, is_local in self._roots()
            for p in _components(name)
        ]

    def keys_for(self, name: str) -> list[TrustedKey]:
        """The keys that may sign the appc name ``name``: root.d + its path prefixes."""
        found: dict[str, TrustedKey] = {}
        self._walk([(self._dir(base, None), None, loc) for base, loc in self._roots()], found)
        self._walk(self._prefix_dirs(name), found)
        return list(found.values())

    def has_prefix_keys(self, name: str) -> bool:
        """Whether a key (not masked) is in prefix.d for ``name`` or a parent (not root.d):
        if not, a fetch may discover the name's keys (rkt's TrustedKeyPrefixExists)."""
        found: dict[str, TrustedKey] = {}
        self._walk(self._prefix_dirs(name), found)
        return bool(found)

    def entries(self) -> list[TrustedKey]:
        """Every OpenPGP key in root.d and prefix.d (local and system, masks applied)."""
        prefixes: set[str] = set()
        for base, _is_local in self._roots():
            top = base / "prefix.d"
            for dirpath, dirnames, _files in os.walk(top):
                dirnames.sort()
                rel = Path(dirpath).relative_to(top).as_posix()
                if rel != ".":
                    prefixes.add(rel)
                if len(prefixes) > MAX_FILES_PER_DIR:
                    raise TrustError(f"{top} holds more than {MAX_FILES_PER_DIR} prefixes")
        out: list[TrustedKey] = []
        for prefix in [None, *sorted(prefixes)]:
            level: dict[str, TrustedKey] = {}
            self._walk([(self._dir(b, prefix), prefix, loc) for b, loc in self._roots()], level)
            out.extend(sorted(level.values(), key=lambda k: k.info.fingerprint))
        return out

    # --- OCI publishers --------------------------------------------------------------

    @staticmethod
    def _host_dirs(host: str) -> list[str]:
        """The oci.d directories of a stored host: the Hub's keys may also sit under an
        alias (written before aliases were folded); they count as docker.io's."""
        return list(DOCKER_HUB_ALIASES) if host == DOCKER_HUB else [host]

    def _oci_dirs(self, host: str, repo: str) -> list[tuple[Path, str]]:
        repos = [""] + (_components(repo) if repo else [])
        return [
            (self._oci_dir(base, h, r), oci_label(host, r))
            for base, _ in self._roots()
            for h in self._host_dirs(host)
            for r in repos
        ]

    def oci_trusted(self, host: str, repo: str) -> tuple[list[TrustedKey], list[CosignKey]]:
        """The OpenPGP and cosign keys trusted for the pulled repository ``HOST/REPO`` (and
        its parent paths), the name normalised as :func:`oci_name` does."""
        return self._oci_collect(*oci_name(host, repo))

    def _oci_collect(self, host: str, repo: str) -> tuple[list[TrustedKey], list[CosignKey]]:
        gpg: dict[str, TrustedKey] = {}
        cosign: dict[str, CosignKey] = {}
        for directory, prefix in self._oci_dirs(host, repo):
            for path in self._files(directory):
                name = path.name
                is_cosign = bool(COSIGN_FILE.match(name))
                if not is_cosign and not FINGERPRINT.match(name):
                    continue
                data = self._read(path)
                if not data:
                    gpg.pop(name, None)
                    cosign.pop(name, None)
                elif is_cosign:
                    digest = spki_digest(data, str(path))
                    if f"cosign-{digest}.pub" != name:
                        raise TrustError(
                            f"fingerprint mismatch: {str(path)!r} holds the key cosign-{digest}"
                        )
                    cosign[name] = CosignKey(data, path, prefix, digest)
                else:
                    gpg[name] = TrustedKey(self._load_key(path), path, prefix)
        return list(gpg.values()), list(cosign.values())

    def oci_keys_for(self, host: str, repo: str) -> tuple[list[KeyInfo], list[bytes]]:
        """(OpenPGP keys, PEM cosign keys) trusted for the pulled repository ``HOST/REPO``
        (``Reference.host``, ``Reference.name``) or a parent path."""
        gpg, cosign = self.oci_trusted(host, repo)
        return [k.info for k in gpg], [c.pem for c in cosign]

    def oci_entries(self) -> tuple[list[TrustedKey], list[CosignKey]]:
        """Every OCI publisher key (for --list)."""
        gpg: list[TrustedKey] = []
        cosign: list[CosignKey] = []
        seen: set[Path] = set()
        for base, _ in self._roots():
            top = base / "oci.d"
            if not top.is_dir():
                continue
            for dirpath, dirnames, _files in os.walk(top):
                dirnames.sort()
                rel = Path(dirpath).relative_to(top).as_posix()
                if rel == ".":
                    continue
                host, _, repo = rel.partition("/")
                g, c = self._oci_collect(canonical_host(host), repo)
                for k in g:
                    if k.path.parent == Path(dirpath) and k.path not in seen:
                        seen.add(k.path)
                        gpg.append(k)
                for ck in c:
                    if ck.path.parent == Path(dirpath) and ck.path not in seen:
                        seen.add(ck.path)
                        cosign.append(ck)
        return gpg, cosign

    # --- writing ---------------------------------------------------------------------

    @staticmethod
    def _write(directory: Path, name: str, data: bytes) -> Path:
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o755)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, directory / name)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            raise TrustError(
                f"cannot write {directory / name}: {exc.strerror or exc}; run as the "
                "keystore's owner or use --trust-dir DIR"
            ) from exc
        return directory / name

    @staticmethod
    def _acceptable(data: bytes) -> list[KeyInfo]:
        """Every certificate in ``data``, each judged by the key policy first: one refused
        (revoked, expired, too weak…) refuses the whole file, so nothing is written."""
        keys = read_keys(data, "the key")
        now = time.time()
        for key in keys:
            problem = policy_problem(key, now)
            if problem is not None:
                raise KeyRefused(
                    f"the key {key.describe()} is refused: {problem}; nothing was trusted"
                    + (f" (the file holds {len(keys)} keys)" if len(keys) > 1 else "")
                )
        return keys

    def add(self, data: bytes, prefix: str | None) -> list[Path]:
        """Store each certificate in ``data`` for ``prefix`` (None = root): one file each,
        only if every one of them passes the key policy (:class:`KeyRefused` otherwise)."""
        if prefix is not None:
            prefix = validate_prefix(prefix)
            if prefix.startswith(DOCKER):
                host, repo = oci_prefix(prefix)
                return self.add_oci(data, host, repo)
        keys = self._acceptable(data)
        directory = self._dir(self.local / "trustedkeys", prefix)
        return [self._write(directory, k.fingerprint, k.raw) for k in keys]

    def add_oci(self, data: bytes, host: str, repo: str) -> list[Path]:
        """A PEM public key → ``cosign-<sha256 SPKI>.pub``; else OpenPGP certificates.
        ``host``/``repo`` as :func:`oci_prefix` returns them (the Hub's aliases folded)."""
        directory = self._oci_dir(self.local / "trustedkeys", canonical_host(host), repo)
        if data.lstrip().startswith(b"-----BEGIN PUBLIC KEY-----"):
            digest = spki_digest(data, "the key")
            return [self._write(directory, f"cosign-{digest}.pub", _pem(data))]
        keys = self._acceptable(data)
        return [self._write(directory, k.fingerprint, k.raw) for k in keys]

    def remove(self, fingerprint: str, prefix: str | None = None) -> list[Path]:
        """Stop trusting ``fingerprint`` (everywhere, or for ``prefix`` only). A local file
        is deleted; a system key is masked with an empty local file."""
        fpr = fingerprint.lower()
        names = {fpr, f"cosign-{fpr}.pub"}
        locations: list[tuple[Path, Path | None]] = []  # (local dir, system dir)
        local, system = (
            self.local / "trustedkeys",
            (self.system / "trustedkeys" if self.system else None),
        )
        if prefix is not None:
            prefix = validate_prefix(prefix)
            if prefix.startswith(DOCKER):
                host, repo = oci_prefix(prefix)
                rels = [self._oci_dir(Path(), h, repo) for h in self._host_dirs(host)]
            else:
                rels = [self._dir(Path(), prefix)]
            locations += [(local / r, system / r if system else None) for r in rels]
        else:
            found: set[Path] = set()
            for base in [b for b in (local, system) if b is not None]:
                for top in ("root.d", "prefix.d", "oci.d"):
                    for dirpath, dirnames, filenames in os.walk(base / top):
                        dirnames.sort()
                        if names & set(filenames):
                            found.add(Path(dirpath).relative_to(base))
            locations = [(local / r, system / r if system else None) for r in sorted(found)]
        touched: list[Path] = []
        for local_dir, system_dir in locations:
            for name in sorted(names):
                here = local_dir / name
                vendor = system_dir / name if system_dir else None
                vendor_key = vendor is not None and vendor.is_file() and vendor.stat().st_size
                if vendor_key:
                    touched.append(self._write(local_dir, name, b""))
                elif here.is_file() and here.stat().st_size:
                    try:
                        here.unlink()
                    except OSError as exc:
                        raise TrustError(f"cannot remove {here}: {exc.strerror or exc}") from exc
                    touched.append(here)
        if not touched:
            where = f" for prefix {prefix!r}" if prefix else ""
            raise TrustError(f"no trusted key {fpr}{where}; see fetchd trust --list")
        return touched


def _load_pem(data: bytes, what: str) -> PublicKeyTypes:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        return load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise TrustError(f"{what} is not a PEM public key ({exc})") from exc


def spki_digest(data: bytes, what: str) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = _load_pem(data, what)
    der = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _pem(data: bytes) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = _load_pem(data, "the key")
    return key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
