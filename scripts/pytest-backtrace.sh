#!/usr/bin/env bash
# `make pytest`: the suite, and if the pytest process dies of a signal, every thread's
# native backtrace from its core file. libtorrent's own threads have no Python frame, so
# pytest's faulthandler cannot show where they crashed (it happened once in a CI run of
# tests/test_bt_session.py; not reproduced since). Needs gdb and a core_pattern that
# writes a file into the working directory (Debian's default, "core"); otherwise it says
# why there is no backtrace. The exit status is pytest's.
set -uo pipefail
cd "$(dirname "$0")/.."
ulimit -c unlimited 2>/dev/null || true
stamp=$(mktemp)
trap 'rm -f "$stamp"' EXIT
.venv/bin/pytest -q "${@:-tests}"
rc=$?
if [ "$rc" -gt 128 ]; then
  echo "pytest died of signal $((rc - 128))" >&2
  core=$(find . -maxdepth 1 -name 'core*' -type f -newer "$stamp" | head -n 1)
  if [ -z "$core" ]; then
    echo "no core file here (core_pattern: $(cat /proc/sys/kernel/core_pattern))" >&2
  elif ! command -v gdb >/dev/null; then
    echo "core file $core kept; gdb is not installed" >&2
  else
    timeout 300 gdb -q -batch -ex "info sharedlibrary libtorrent" \
      -ex "thread apply all bt 40" "$(readlink -f .venv/bin/python)" "$core" >&2
    rm -f "$core"
  fi
fi
exit "$rc"
