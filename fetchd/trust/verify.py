"""The verifying child: ``python -m fetchd.trust.verify DATAFILE`` (used by
:func:`fetchd.trust.openpgp.verify_detached`, never run by hand).

stdin: one JSON object ``{"sig": base64, "cert": base64}`` (≤ 2 MiB): the detached
signature and the one certificate the caller matched to its issuer. It verifies the
signature over DATAFILE with pysequoia (Sequoia's standard policy, at the signature's
creation time; the caller adds "valid now") and writes one JSON line to stdout:
``{"ok": true, "primary": FPR, "signer": FPR}`` and exits 0, or ``{"ok": false, "kind":
"data"|"key", "error": "…"}`` and exits 1. pysequoia holds the GIL while it hashes, which
is why this runs in its own process: the parent's event loop is never stalled.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

MAX_REQUEST = 2 << 20


def _answer(obj: dict[str, Any], code: int) -> int:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()
    return code


def main(argv: list[str]) -> int:
    os.environ["RUST_BACKTRACE"] = "0"
    if len(argv) != 1:
        return _answer({"ok": False, "kind": "key", "error": "usage: verify DATAFILE"}, 2)
    data = Path(argv[0])
    try:
        request = json.loads(sys.stdin.buffer.read(MAX_REQUEST + 1)[:MAX_REQUEST])
        sig_bytes = base64.b64decode(request["sig"])
        cert_bytes = base64.b64decode(request["cert"])
    except (ValueError, KeyError, TypeError) as exc:
        return _answer({"ok": False, "kind": "key", "error": f"bad request: {exc}"}, 2)
    import pysequoia as ps

    from fetchd.trust.openpgp import _reason

    try:
        sig = ps.Sig.from_bytes(sig_bytes)
        cert = ps.Cert.from_bytes(cert_bytes)
    except Exception as exc:
        return _answer({"ok": False, "kind": "key", "error": _reason(exc)}, 1)
    if not data.is_file():
        return _answer({"ok": False, "kind": "data", "error": f"{data} is not a file"}, 1)
    try:
        result = ps.verify(file=str(data), signature=sig, store=lambda _ids: [cert])
    except Exception as exc:
        reason = _reason(exc)
        if "no valid signatures" in reason:
            reason = (
                "the signature does not match the data (the data was changed after it "
                "was signed, or the signature is corrupt)"
            )
            return _answer({"ok": False, "kind": "data", "error": reason}, 1)
        return _answer({"ok": False, "kind": "key", "error": reason}, 1)
    if not result.valid_sigs:
        return _answer({"ok": False, "kind": "data", "error": "no valid signature"}, 1)
    valid = result.valid_sigs[0]
    return _answer(
        {
            "ok": True,
            "primary": str(valid.certificate).lower(),
            "signer": str(valid.signing_key).lower(),
        },
        0,
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
