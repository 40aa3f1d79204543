#!/usr/bin/env bash
# Installs everything fetchd's demo, tests and benchmarks need on a fresh Debian 12
# machine (as root): the real peers from Debian, then a .venv with the project.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(docker-registry skopeo umoci nginx aria2 opentracker busybox-static
  bubblewrap uidmap zstd apache2-utils runc iproute2 procps openssl curl ca-certificates
  python3-venv time podman chromium gcc libc6-dev
  mktorrent qbittorrent-nox transmission-cli
  appc-spec gpg gpgv sqv sq gdb)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "error: missing Debian packages: ${missing[*]}; run this script as root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.fetchd-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
# An editable install leaves the project's modules uncompiled, and with
# PYTHONDONTWRITEBYTECODE set every `fetchd` start would compile them again (~40 ms).
.venv/bin/python -m compileall -q fetchd stage1 >/dev/null
