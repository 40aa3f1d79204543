"""appc peers for tests: an nginx discovery site over TLS, actool-built ACIs, `actool discover`.

Use it from a test file with

    from tests.support.appc import AppcSite, appc_site, build_aci  # noqa: F401

(the import registers the function-scoped pytest fixture ``appc_site`` in that module; it needs
the session fixture ``tls_ca`` of tests.support.fixtures, which tests/conftest.py registers).
A test or fixture that takes ``appc_site`` as a parameter then needs ``# noqa: F811`` on its
``def`` line (ruff sees the parameter shadow the import), unless tests/conftest.py lists
"tests.support.appc" in pytest_plugins, in which case no import is needed at all.
For another scope, use ``start_appc_site(workdir, ca)`` as a context manager.

AppcSite: nginx (Debian 1.22, ``daemon off``, stopped by its PID) on ADDR:443 with TLS and
ADDR:80 in plain HTTP, ADDR = 127.43.0.1 or, if something already listens there, 127.43.0.2, ….
The real port-less discovery URL ``https://example.com/…?ac-discovery=1`` then reaches it with
``--resolve example.com:443:ADDR`` (``resolve_args()``) and the test CA in ``SSL_CERT_FILE``
(``env()``); no /etc/hosts is touched. The server certificate names example.com, *.example.com,
example.org, *.example.org, 127.0.0.1 and ADDR. The site serves ``root``: extensionless files
(discovery pages) as text/html, ``/images/`` with ``Cache-Control: max-age=300`` and ETags (as
appc-peers.sh), and a few fixed locations for hostile cases (see ``_config``): ``/loop`` (a
redirect to itself), ``/downgrade`` (https → ``http://HOST/?ac-discovery=1``), ``/slow/…`` (files
sent at 1 byte per second), and the host loop.example.org where every path redirects to itself
(a loop at every level of the walk). ``requests()`` reads the access
log (after a marker request proves it complete) as ``"GET /uri?query 200"`` strings;
``entries()`` gives (method, uri, status, host, scheme) tuples.

build_aci(): ``actool build --owner-root`` of a busybox-static rootfs (app user 1000), with a
manifest made from the arguments; gzip (actool's), or bzip2/xz/none recompressed here.

actool_discover(): ``actool discover --json NAME`` inside a private mount namespace whose
/etc/hosts (bind-mounted over) maps the site's host names to ADDR, with ``SSL_CERT_FILE`` = the
test CA, exactly like ../shared/peers/appc-peers.sh. Go fills ``{arch}`` with Go's names
(``arm64``), fetchd with appc's (``aarch64``): give ``arch=…`` in the name to compare them.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import functools
import http.client
import json
import lzma
import os
import platform
import secrets
import shutil
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from .procs import Proc, wait_until
from .tls import TestCA

#: names the certificate covers and resolve_args() pins to the site's address
HOSTS = (
    "example.com",
    "mirror.example.com",
    "www.example.com",
    "example.org",
    "www.example.org",
    "loop.example.org",
)
CERT_NAMES = ("example.com", "*.example.com", "example.org", "*.example.org", "127.0.0.1")
ADDRS = tuple(f"127.43.0.{n}" for n in range(1, 21))
START_TIMEOUT = 15.0
SETTLE_PREFIX = "/.support-settle/"
TOKEN_PATH = "/.appc-site-token"
ACTOOL_TIMEOUT = 60.0
BUSYBOX = Path("/bin/busybox")

_APPC_ARCH = {
    "x86_64": "amd64",
    "aarch64": "aarch64",
    "arm64": "aarch64",
    "i686": "i386",
    "i386": "i386",
    "armv7l": "armv7l",
    "armv6l": "armv6l",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}


def appc_arch() -> str:
    """This machine's arch in appc's names (what fetchd and rkt add to a name)."""
    return _APPC_ARCH.get(platform.machine(), platform.machine())


def go_arch() -> str:
    """This machine's arch in Go's names (what actool discover renders for {arch})."""
    return {"aarch64": "arm64", "i386": "386", "armv7l": "arm", "armv6l": "arm"}.get(
        appc_arch(), appc_arch()
    )


def _bind_free(addr: str, ports: Sequence[int]) -> bool:
    """True if nothing listens on addr at any of ports (checked by binding, then closing)."""
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((addr, port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    return False
                raise
    return True


def _config(workdir: Path, root: Path, addr: str, cert: Path, key: Path, token: str) -> str:
    temps = " ".join(
        f'{kind}_temp_path "{workdir / "tmp" / kind}";'
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""  # else `nobody` cannot read a 0700 tmp
    return f"""{user}daemon off;
worker_processes 1;
pid "{workdir / "nginx.pid"}";
error_log "{workdir / "error.log"}" info;
events {{ worker_connections 256; }}
http {{
  log_format appc '$request_method\\t$request_uri\\t$status\\t$host\\t$scheme';
  access_log "{workdir / "access.log"}" appc;
  {temps}
  types {{ text/html html; application/pgp-keys gpg; application/pgp-signature asc; }}
  default_type text/html;
  server {{
    listen {addr}:443 ssl; listen {addr}:80;
    server_name _;
    ssl_certificate "{cert}"; ssl_certificate_key "{key}";
    root "{root}"; etag on;
    location /images/ {{ default_type application/octet-stream;
                        add_header Cache-Control "max-age=300"; }}
    location = /loop {{ return 302 https://$host/loop?ac-discovery=1; }}
    location = /downgrade {{ return 302 http://$host/?ac-discovery=1; }}
    location /slow/ {{ limit_rate 1; default_type text/html; }}
    location ^~ {SETTLE_PREFIX} {{ access_log "{workdir / "settle.log"}" appc; return 204; }}
    location = {TOKEN_PATH} {{ access_log off; return 200 "{token}"; }}
  }}
  server {{
    listen {addr}:443 ssl; listen {addr}:80;
    server_name loop.example.org;
    ssl_certificate "{cert}"; ssl_certificate_key "{key}";
    location / {{ return 302 https://$host$uri?ac-discovery=1; }}
  }}
}}
"""


@dataclass
class AppcSite:
    """A running discovery site (see the module docstring)."""

    root: Path
    ca: Path
    addr: str
    access_log: Path
    workdir: Path
    proc: Proc
    hosts: tuple[str, ...] = HOSTS
    _marker: int = field(default=0, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    # --- what fetchd (or curl) needs to reach it --------------------------------------

    def resolve_args(self, *extra_hosts: str) -> list[str]:
        """``--resolve HOST:443:ADDR`` and ``HOST:80:ADDR`` for every site host name."""
        out: list[str] = []
        for host in (*self.hosts, *extra_hosts):
            for port in (443, 80):
                out += ["--resolve", f"{host}:{port}:{self.addr}"]
        return out

    def resolve_map(self, *extra_hosts: str) -> dict[tuple[str, int], str]:
        """The same as Config.resolve: {(host, port): addr}."""
        return {
            (host, port): self.addr for host in (*self.hosts, *extra_hosts) for port in (443, 80)
        }

    def env(self) -> dict[str, str]:
        return {"SSL_CERT_FILE": str(self.ca)}

    # --- content --------------------------------------------------------------------

    def _path(self, path: str) -> Path:
        rel = path.lstrip("/")
        if not rel or ".." in rel.split("/"):
            raise ValueError(f"not a file path on the site: {path!r}")
        return self.root / rel

    def page(self, path: str, html: str) -> None:
        """Write a discovery page: ``page("/", …)`` is index.html, ``page("/hello", …)`` is
        the extensionless file ``hello`` (served as text/html)."""
        target = self.root / "index.html" if path.strip("/") == "" else self._path(path)
        if target.is_dir():
            target = target / "index.html"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(html)

    def put(self, path: str, data: bytes | Path) -> None:
        """Serve bytes (or a copy of a file) at path, e.g. ``put("/images/x.aci", aci)``."""
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Path):
            shutil.copyfile(data, target)
        else:
            target.write_bytes(data)

    def remove(self, path: str) -> None:
        self._path(path).unlink(missing_ok=True)

    @staticmethod
    def meta(*tags: tuple[str, str, str], body: str = "") -> str:
        """An HTML page of ``<meta name=N content="PREFIX URI">`` tags (tagname, prefix, uri)."""
        lines = [f'<meta name="{n}" content="{p} {u}">' for n, p, u in tags]
        return (
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8">\n'
            + "\n".join(lines)
            + f"\n</head><body>{body}</body></html>\n"
        )

    # --- the access log -------------------------------------------------------------

    def url(self, path: str, *, host: str = "example.com", scheme: str = "https") -> str:
        return f"{scheme}://{host}{path}"

    def _settle(self) -> None:
        """Wait until every request that ended before this call is in the access log."""
        if not self.proc.running():
            return
        self._marker += 1
        marker = f"{SETTLE_PREFIX}{self._marker}"
        settle_log = self.workdir / "settle.log"
        with contextlib.suppress(OSError):
            urllib.request.urlopen(f"http://{self.addr}{marker}", timeout=2).close()

        def logged() -> bool:
            try:
                return f"\t{marker}\t" in settle_log.read_text(errors="replace")
            except FileNotFoundError:
                return False

        wait_until(logged, 5.0, f"nginx to log {marker}", self.workdir / "error.log")

    def entries(self) -> list[tuple[str, str, int, str, str]]:
        """(method, uri with query, status, Host, scheme) of every request so far."""
        self._settle()
        try:
            text = self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for raw in text.split("\n")[:-1]:
            method, uri, status, host, scheme = raw.split("\t")
            out.append((method, uri, int(status), host, scheme))
        return out

    def requests(self) -> list[str]:
        """Access-log lines so far as ``"METHOD URI STATUS"`` (the URI with its query)."""
        return [f"{m} {u} {s}" for m, u, s, _h, _sch in self.entries()]

    def clear_log(self) -> None:
        """Forget the requests so far (requests() then lists only later ones)."""
        self._settle()
        with contextlib.suppress(FileNotFoundError):
            self.access_log.write_bytes(b"")

    def stop(self) -> None:
        self.proc.stop()


@contextlib.contextmanager
def start_appc_site(workdir: Path, ca: TestCA) -> Iterator[AppcSite]:
    """Start nginx on the first free 127.43.0.N (N = 1…20) for :443 and :80; stop it after."""
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (workdir / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    root = workdir / "www"
    (root / "images").mkdir(parents=True, exist_ok=True)
    last = ""
    for addr in ADDRS:
        if not _bind_free(addr, (443, 80)):
            last = f"{addr}:443 or :80 is in use"
            continue
        cert, key = ca.issue_server(workdir / "tls" / addr, (*CERT_NAMES, addr))
        conf = workdir / f"nginx-{addr}.conf"
        token = secrets.token_hex(16)
        conf.write_text(_config(workdir, root, addr, cert, key, token))
        for name in ("access.log", "settle.log", "error.log"):
            (workdir / name).write_bytes(b"")
        proc = Proc(
            ["nginx", "-c", str(conf), "-p", str(workdir), "-e", str(workdir / "error.log")],
            workdir / f"nginx-{addr}.out",
        )
        site = AppcSite(root, ca.ca_path, addr, workdir / "access.log", workdir, proc)
        try:
            # Ours, not another test process's nginx that won the address: nginx retries a
            # busy bind for a while, and meanwhile the other one answers.
            wait_until(
                functools.partial(_answers, proc, addr, token, ca.ssl_context()),
                START_TIMEOUT,
                f"nginx on {addr}",
                workdir / "error.log",
            )
        except RuntimeError:  # exited: lost a race for the address? try the next one
            proc.stop()
            last = (workdir / "error.log").read_text(errors="replace")
            if "Address already in use" in last:
                continue
            raise
        except BaseException:
            proc.stop()
            raise
        try:
            yield site
        finally:
            proc.stop()
        return
    raise RuntimeError(f"no 127.43.0.N address free for the appc site: {last}")


def _answers(proc: Proc, addr: str, token: str, ctx: ssl.SSLContext) -> bool:
    proc.check_running()
    for scheme, port in (("http", 80), ("https", 443)):
        conn: http.client.HTTPConnection
        if scheme == "https":
            conn = http.client.HTTPSConnection(addr, port, timeout=2, context=ctx)
        else:
            conn = http.client.HTTPConnection(addr, port, timeout=2)
        try:
            conn.request("GET", TOKEN_PATH)
            if conn.getresponse().read().decode(errors="replace") != token:
                return False
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()
    return True


@pytest.fixture
def appc_site(tmp_path: Path, tls_ca: TestCA) -> Iterator[AppcSite]:
    """A fresh appc site for one test (its own root, log and nginx)."""
    with start_appc_site(tmp_path / "appc-site", tls_ca) as site:
        yield site


# ------------------------------------------------------------------ ACIs (actool build)


def build_aci(
    tmp: Path,
    name: str,
    version: str | None = "1.0.0",
    *,
    out: Path,
    labels: Mapping[str, str | None] | None = None,
    exec_: Sequence[str] | None = None,
    user: str = "1000",
    group: str = "1000",
    environment: Mapping[str, str] | None = None,
    working_directory: str = "/",
    deps: Sequence[Mapping[str, Any]] = (),
    extra_files: Mapping[str, bytes] | None = None,
    annotations: Mapping[str, str] | None = None,
    app: bool = True,
    compression: str | None = "gzip",
    manifest_extra: Mapping[str, Any] | None = None,
) -> Path:
    """Build an ACI with ``actool build --owner-root`` and return ``out``.

    Labels: version (if given), os=linux, arch=<appc arch of this machine>, then ``labels``
    (a value None removes that label). rootfs: /bin/busybox (static) with sh, echo, cat, ls,
    id, env links, /etc/passwd and /etc/group with app 1000, plus ``extra_files`` (paths
    relative to rootfs). ``exec_`` defaults to ``/bin/echo hello from NAME``. ``deps`` are
    manifest ``dependencies`` entries as given (imageName, imageID, labels as a list of
    {name, value}, size). ``compression``: "gzip" (actool's), "bzip2", "xz" or None."""
    if not BUSYBOX.exists():
        raise RuntimeError("build_aci needs busybox-static (/bin/busybox)")
    layout = tmp / f"layout-{name.replace('/', '_')}-{version}-{os.getpid()}"
    shutil.rmtree(layout, ignore_errors=True)
    rootfs = layout / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "etc").mkdir()
    shutil.copyfile(BUSYBOX, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "busybox").chmod(0o755)
    for cmd in ("sh", "echo", "cat", "ls", "id", "env"):
        (rootfs / "bin" / cmd).symlink_to("busybox")
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0:root:/:/bin/sh\napp:x:1000:1000:app:/:/bin/sh\n"
    )
    (rootfs / "etc" / "group").write_text("root:x:0:\napp:x:1000:\n")
    for rel, data in (extra_files or {}).items():
        target = rootfs / rel.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    all_labels: dict[str, str | None] = {}
    if version is not None:
        all_labels["version"] = version
    all_labels.update({"os": "linux", "arch": appc_arch()})
    all_labels.update(labels or {})
    manifest: dict[str, Any] = {
        "acKind": "ImageManifest",
        "acVersion": "0.8.11",
        "name": name,
        "labels": [{"name": k, "value": v} for k, v in all_labels.items() if v is not None],
    }
    if app:
        manifest["app"] = {
            "exec": list(exec_ or ["/bin/echo", f"hello from {name}"]),
            "user": user,
            "group": group,
            "workingDirectory": working_directory,
            "environment": [{"name": k, "value": v} for k, v in (environment or {}).items()],
        }
    if deps:
        manifest["dependencies"] = [dict(d) for d in deps]
    if annotations:
        manifest["annotations"] = [{"name": k, "value": v} for k, v in annotations.items()]
    manifest.update(manifest_extra or {})
    (layout / "manifest").write_text(json.dumps(manifest, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = ["actool", "build", "--owner-root", "--overwrite"]
    if compression != "gzip":
        argv.append("--no-compression")
    run = subprocess.run(
        [*argv, str(layout), str(out)], capture_output=True, text=True, timeout=ACTOOL_TIMEOUT
    )
    if run.returncode != 0:
        raise RuntimeError(f"actool build {name} failed: {run.stderr.strip()}")
    if compression in ("bzip2", "xz"):
        raw = out.read_bytes()
        out.write_bytes(bz2.compress(raw) if compression == "bzip2" else lzma.compress(raw))
    elif compression not in ("gzip", None):
        raise ValueError(f"compression {compression!r}: gzip, bzip2, xz or None")
    shutil.rmtree(layout, ignore_errors=True)
    return out


# ------------------------------------------------------------------ actool discover


@dataclass(frozen=True)
class ActoolDiscovery:
    """What ``actool discover --json`` said: its JSON (None when it failed) and its output."""

    returncode: int
    result: dict[str, Any] | None
    output: str

    @property
    def endpoints(self) -> list[tuple[str, str]]:
        eps = (self.result or {}).get("ACIEndpoints") or []
        return [(e["ACI"], e["ASC"]) for e in eps]

    @property
    def pubkeys(self) -> list[str]:
        return list((self.result or {}).get("PublicKeys") or [])


def actool_run(
    site: AppcSite, argv: Sequence[str], *, ca: bool = True, timeout: float = ACTOOL_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run argv inside a private mount namespace whose /etc/hosts names the site's hosts,
    with SSL_CERT_FILE = the test CA (or /dev/null with ca=False)."""
    hosts = site.workdir / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{site.addr} {' '.join(site.hosts)}\n")
    if os.geteuid() == 0:
        ns = ["unshare", "--mount", "--propagation", "private"]
    else:
        ns = ["unshare", "--user", "--map-root-user", "--mount"]
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    env["SSL_CERT_FILE"] = str(site.ca) if ca else "/dev/null"
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        env.pop(k, None)
    return subprocess.run(
        [*ns, "--", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def actool_discover(site: AppcSite, name: str, *, insecure: bool = False) -> dict[str, Any]:
    """The JSON of ``actool discover --json NAME`` ({"ACIEndpoints": [{"ACI", "ASC"}, …],
    "PublicKeys": [...]}); RuntimeError with actool's output if it fails."""
    found = actool_discovery(site, name, insecure=insecure)
    if found.result is None:
        raise RuntimeError(f"actool discover {name} failed ({found.returncode}): {found.output}")
    return found.result


def actool_discovery(
    site: AppcSite, name: str, *, insecure: bool = False, ca: bool = True
) -> ActoolDiscovery:
    """``actool discover --json [--insecure] NAME`` against the site (see actool_run), failed
    or not: the exit status, the JSON and the whole output (the walk's attempts)."""
    argv = ["actool", "discover", "--json", *(["--insecure"] if insecure else []), name]
    run = actool_run(site, argv, ca=ca)
    output = run.stdout + run.stderr
    result: dict[str, Any] | None = None
    start = run.stdout.find("\n{")
    text = (
        run.stdout if run.stdout.startswith("{") else run.stdout[start + 1 :] if start >= 0 else ""
    )
    if run.returncode == 0 and text:
        result = json.JSONDecoder().raw_decode(text)[0]
    return ActoolDiscovery(run.returncode, result, output)
