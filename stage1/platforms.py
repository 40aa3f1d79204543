"""Which platforms this machine runs: containerd's rules (github.com/containerd/platforms
``Normalize`` and ``Only``), which fetchd follows too (stage1 imports nothing of fetchd).

A platform is ``(os, architecture, variant)``, normalised: os lowercased; x86_64 is
amd64, aarch64 arm64; arm64/v8 is arm64, amd64/v1 amd64, a bare arm arm/v7. This machine
runs, best first: its own platform, then what it also runs (amd64: 386; arm64: arm/v8
down to arm/v5; arm/v7: arm/v6 and arm/v5).
"""

from __future__ import annotations

import os

Platform = tuple[str, str, str]

# os.uname().machine -> (OCI architecture, variant), as containerd's DefaultSpec
_MACHINE = {
    "x86_64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "armv8l": ("arm", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i686": ("386", ""),
    "i386": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "loongarch64": ("loong64", ""),
}


def normalize(os_: str, arch: str, variant: str) -> Platform:
    """containerd's ``Normalize`` (``normalizeOS``, ``normalizeArch``)."""
    os_, arch, variant = os_.lower(), arch.lower(), variant.lower()
    if os_ == "macos":
        os_ = "darwin"
    if arch == "i386":
        arch, variant = "386", ""
    elif arch in ("x86_64", "x86-64", "amd64"):
        arch, variant = "amd64", "" if variant == "v1" else variant
    elif arch in ("aarch64", "arm64"):
        arch = "arm64"
        variant = {"8": "", "v8": "", "v8.0": "", "9": "v9", "9.0": "v9", "v9.0": "v9"}.get(
            variant, variant
        )
    elif arch == "armhf":
        arch, variant = "arm", "v7"
    elif arch == "armel":
        arch, variant = "arm", "v6"
    elif arch == "arm" and variant in ("", "7"):
        variant = "v7"
    elif arch == "arm" and variant in ("5", "6", "8"):
        variant = "v" + variant
    return os_, arch, variant


def host() -> Platform:
    machine = os.uname().machine.lower()
    arch, variant = _MACHINE.get(machine, (machine, ""))
    return normalize("linux", arch, variant)


def accepted(platform: Platform) -> list[Platform]:
    """What ``platform`` runs, best first (containerd's ``platformVector``; for arm64 only
    its v8 and v9 variants are listed in full, as this machine's variant is v8)."""
    os_, arch, variant = platform
    level = variant.removeprefix("v")
    if arch == "arm64":
        out = [platform]
        arm = "v8" if variant in ("", "v8") or variant.startswith(("v8", "v9")) else variant
        return out + accepted(normalize(os_, "arm", arm))
    out = [platform]
    if arch == "amd64":
        if level.isdigit():
            out += [normalize(os_, "amd64", f"v{n}") for n in range(int(level) - 1, 0, -1)]
        out.append((os_, "386", ""))
    elif arch == "arm" and level.isdigit():
        out += [(os_, "arm", f"v{n}") for n in range(int(level) - 1, 4, -1)]
    return out


def text(platform: Platform) -> str:
    return "/".join(p for p in platform if p)
