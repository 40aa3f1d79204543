"""The stage1 command line: parse, call, print, exit status. Never a traceback.

Kept lean on purpose: a cached run imports only what it needs (no argparse, no tarfile).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from stage1.errors import InvalidImageConfig, Stage1Error, UsageError

USAGE = """\
usage: stage1 [--store DIR] [-v] run [--fetch [--insecure-options LIST]] [--net none|host]
                                     [--uid N] [--gid N] REF [-- ARGS...]
       stage1 [--store DIR] [-v] gc
       (--store may also follow the command: stage1 run --store DIR REF)

run   render the image REF from the store (cached in STORE/trees) and run its process in
      new user, mount, pid, uts, ipc and network namespaces, as an unprivileged uid.
      REF is what was given to `fetchd pull` (docker://HOST/NAME:TAG, docker://NAME@sha256:...),
      a name as `fetchd images` lists it, a manifest digest, or an appc name
      (example.com/app,version=1.0[,LABEL=VALUE...] or example.com/app:1.0; this machine's os
      and arch are added; without a version the one pulled as latest, else the newest).
      ARGS replace the image's Cmd (an appc image's are appended to its exec).
      Only this machine's platform runs (of a name stored for several, that one).
      --fetch      run `fetchd prefetch REF` first
      --insecure-options LIST   passed to fetchd prefetch (e.g. http for a plain registry)
      --net        none (default: a private network with only loopback) or host
      --uid/--gid  started as root: the unprivileged host uid/gid to run as
                   (default 2000000000)
gc    remove rendered trees that no image in the store's index refers to

STORE: --store, else $FETCHD_STORE, else /var/lib/fetchd (root) or
       ${XDG_DATA_HOME:-~/.local/share}/fetchd. Exit status: the process's (128+N when
       killed by signal N); 1 when stage1 fails; 2 for usage errors."""

# The host uid (and gid) a container runs as when stage1 is started by root: no login,
# above the subordinate-id ranges useradd hands out (100000-600100000) and systemd-nspawn's
# dynamic range, below 2**31 for tools that treat ids as signed.
DEFAULT_ID = 2_000_000_000


@dataclass
class Options:
    command: str = ""
    store: str = ""
    verbose: bool = False  # an internal error shows its traceback
    fetch: bool = False
    insecure: str = ""
    net: str = "none"
    uid: int | None = None
    gid: int | None = None
    ref: str = ""
    args: list[str] = field(default_factory=list)


def _value(args: list[str], i: int, option: str) -> tuple[str, int]:
    """The value of OPTION at ARGS[i] (``--opt VALUE`` or ``--opt=VALUE``), next index."""
    arg = args[i]
    if arg.startswith(option + "="):
        return arg[len(option) + 1 :], i + 1
    if i + 1 >= len(args):
        raise UsageError(f"{option} needs a value")
    return args[i + 1], i + 2


def _id(text: str, option: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 2**32 - 1:
        raise UsageError(f"{option} must be a non-zero number, not {text!r}")
    return int(text)


def parse(args: list[str]) -> Options:
    opts = Options()
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("-h", "--help"):
            opts.command = "help"
            return opts
        if arg in ("-v", "--verbose"):
            opts.verbose = True  # before or after the command, as fetchd's -v
            i += 1
            continue
        if not opts.command:
            if arg == "--store" or arg.startswith("--store="):
                opts.store, i = _value(args, i, "--store")
                continue
            if arg in ("run", "gc"):
                opts.command = arg
                i += 1
                continue
            raise UsageError(f"unknown command or option {arg!r}")
        if opts.command == "run" and arg == "--":
            opts.args = args[i + 1 :]
            break
        if arg == "--store" or arg.startswith("--store="):  # after the command too, as fetchd
            opts.store, i = _value(args, i, "--store")
            continue
        if opts.command == "run" and arg == "--fetch":
            opts.fetch = True
            i += 1
        elif opts.command == "run" and (
            arg == "--insecure-options" or arg.startswith("--insecure-options=")
        ):
            opts.insecure, i = _value(args, i, "--insecure-options")
        elif opts.command == "run" and (arg == "--net" or arg.startswith("--net=")):
            opts.net, i = _value(args, i, "--net")
            if opts.net not in ("none", "host"):
                raise UsageError(f"--net must be none or host, not {opts.net!r}")
        elif opts.command == "run" and (arg == "--uid" or arg.startswith("--uid=")):
            value, i = _value(args, i, "--uid")
            opts.uid = _id(value, "--uid")
        elif opts.command == "run" and (arg == "--gid" or arg.startswith("--gid=")):
            value, i = _value(args, i, "--gid")
            opts.gid = _id(value, "--gid")
        elif opts.command == "run" and not arg.startswith("-") and not opts.ref:
            opts.ref = arg
            i += 1
        else:
            raise UsageError(f"unexpected argument {arg!r} for {opts.command}")
    if not opts.command:
        raise UsageError("missing command (run or gc)")
    if opts.command == "run" and not opts.ref:
        raise UsageError("run needs an image reference: stage1 run REF [-- ARGS...]")
    return opts


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        opts = parse(args)
        if opts.command == "help":
            print(USAGE)
            return 0
        if opts.command == "gc":
            return _gc(opts)
        return _run(opts)
    except Stage1Error as exc:
        if isinstance(exc, UsageError):
            print(f"error: {exc}; see: stage1 --help", file=sys.stderr)
        else:
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # one the user can cause: permissions, a full disk, a path
        if _verbose(args):
            raise
        print(f"error: {_os_error(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line, the traceback only under -v
        if _verbose(args):
            raise
        print(
            f"error: internal error in stage1: {exc!r}; this is a bug: please report it "
            "with the output of the same command run with -v",
            file=sys.stderr,
        )
        return 1


def _verbose(args: list[str]) -> bool:
    head = args[: args.index("--")] if "--" in args else args
    return "-v" in head or "--verbose" in head


def _os_error(exc: OSError) -> str:
    """An OSError no seam translated, said as what to do (stage1's error contract)."""
    import errno

    where = f"{exc.filename}: " if exc.filename else ""
    what = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"{where}{what}; run as a user who may use the store (its owner or root), or "
            "use --store DIR with a store you can write"
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{where}{what}; free space (stage1 gc removes trees no image uses)"
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"{where}{what}; check the path (--store)"
    return f"{where}{what}"


def _store(opts: Options) -> str:
    from stage1.layout import default_store

    return opts.store or default_store()


def _gc(opts: Options) -> int:
    from stage1.layout import Layout
    from stage1.trees import Trees

    store = _store(opts)
    for name in Trees(store).gc(Layout(store)):
        print(f"removed trees/{name}", flush=True)
    return 0


def _run(opts: Options) -> int:
    from stage1 import linux, process, sandbox
    from stage1.inroot import Root
    from stage1.layout import Layout
    from stage1.model import Reference
    from stage1.trees import Owner, Trees

    ref = Reference.parse(opts.ref)
    store = _store(opts)
    owner = None
    if os.geteuid() == 0:
        uid = DEFAULT_ID if opts.uid is None else opts.uid
        owner = Owner(uid, uid if opts.gid is None else opts.gid)
    elif opts.uid is not None or opts.gid is not None:
        raise UsageError("--uid and --gid are for stage1 started as root")
    if opts.fetch:
        _prefetch(store, opts.ref, opts.insecure)
    layout = Layout(store)
    try:
        image = layout.image(ref)
    except InvalidImageConfig as exc:
        raise Stage1Error(
            f"image {opts.ref} cannot be run: {exc}; it needs a corrected image "
            f"(remove it with: fetchd rm {opts.ref})"
        ) from exc
    except RecursionError:
        # json.loads of a manifest or config nested deeper than the interpreter recurses.
        raise Stage1Error(
            f"image {opts.ref} cannot be run: its manifest or config is JSON nested too "
            f"deeply; it needs a corrected image (remove it with: fetchd rm {opts.ref})"
        ) from None
    tree_fd = Trees(store).prepare(layout, image, owner)
    files: tuple[tuple[str, bytes], ...] = ()
    if opts.net == "host":
        files = tuple((path, _read_host_file(path)) for path in ("/etc/resolv.conf", "/etc/hosts"))
    if owner is not None:
        # Root's work ends here: the tree is the owner's, the rest runs as the owner.
        linux.drop_privileges(owner.uid, owner.gid)
    hostname = image.manifest.hex[:12]
    proc = process.build(image.config, opts.args, Root(tree_fd), opts.ref, hostname)
    container = sandbox.Container(
        tree_fd=tree_fd, process=proc, net_host=opts.net == "host", hostname=hostname, files=files
    )
    sys.stdout.flush()
    return sandbox.run(container)


def _read_host_file(path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read(1 << 20)
    except OSError:
        return b""


def _prefetch(store: str, ref: str, insecure: str) -> None:
    import shutil
    import subprocess

    fetchd = shutil.which("fetchd") or ""
    beside = os.path.join(os.path.dirname(sys.executable), "fetchd")  # same virtualenv
    if not fetchd and os.access(beside, os.X_OK):
        fetchd = beside
    if not fetchd:
        from stage1.layout import pull_hint

        raise Stage1Error(
            f"--fetch needs fetchd, which is not installed; install it, or run: {pull_hint(ref)}"
        )
    # stage1 reads HOST/NAME:TAG as a registry image; fetchd wants that said (docker://).
    # An appc name with labels (example.com/app,version=1.0) is fetchd's appc reference as is.
    plain = "://" in ref or ref.startswith("sha256:") or ("," in ref)
    target = ref if plain else f"docker://{ref}"
    argv = [fetchd, "--store", store, "prefetch", target]
    if insecure:
        argv += ["--insecure-options", insecure]
    # fetchd prints digests on stdout; stdout belongs to the container, so send them to stderr.
    result = subprocess.run(argv, stdout=2, check=False)
    if result.returncode != 0:
        raise Stage1Error(f"fetchd prefetch {ref} failed (exit status {result.returncode})")
