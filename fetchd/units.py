"""Sizes with units, as a user types them: ``500M``, ``20G``, ``1.5T``, ``10MiB``, ``1GB``.

One convention for every size fetchd takes (``gc --max-size``, ``serve --max-size``):

* a bare suffix letter is binary, as podman and docker read ``--memory 500m``:
  ``K`` = KiB, ``M`` = MiB, ``G`` = GiB, ``T`` = TiB, ``P`` = PiB;
* IEC is explicit and binary: ``Ki``/``KiB``, ``Mi``/``MiB``, ``Gi``/``GiB`` …;
* SI is explicit and decimal: ``kB``/``KB`` = 1000, ``MB`` = 10^6, ``GB`` = 10^9 …;
* ``B`` is bytes. Case does not matter; a space before the unit is allowed; the number
  may have a fraction (``1.5T``), the result is rounded down to whole bytes.

A bare number, zero, a negative size or a fraction of a byte is refused: a size with no
unit is far more often a mistake (``--max-size 1`` would evict everything) than a
wish for one byte.
"""

from __future__ import annotations

import re
from decimal import Decimal

_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
_SIZE = re.compile(r"(?P<num>\d+(?:\.\d*)?|\.\d+) ?(?P<unit>[kmgtpe]?(?:i?b|i)?)", re.IGNORECASE)
EXAMPLES = "e.g. 500M, 20G, 1.5T (M = MiB as in podman; MB = 10^6 bytes, MiB = 2^20)"


def parse_size(text: str) -> int:
    """Bytes in ``text``; ValueError (a message that says what to write) if it is no size."""
    m = _SIZE.fullmatch(text.strip())
    if m is None and text.strip().startswith("-"):
        raise ValueError(f"{text[:40]!r} is negative; give a size above zero, {EXAMPLES}")
    if m is None:
        raise ValueError(f"{text[:40]!r} is not a size; {EXAMPLES}")
    unit = m["unit"].lower()
    if not unit:
        raise ValueError(f"{text[:40]!r} has no unit; add one, {EXAMPLES}")
    letter = unit[0] if unit[0] in _POWERS else ""
    rest = unit[len(letter) :]
    if not letter:
        if rest != "b":
            raise ValueError(f"{text[:40]!r} is not a size; {EXAMPLES}")
        mult = 1
    elif rest == "b":  # kB, MB, GB: SI, decimal
        mult = 1000 ** _POWERS[letter]
    else:  # K, M, Ki, MiB: binary
        mult = 1024 ** _POWERS[letter]
    size = int(Decimal(m["num"]) * mult)
    if size <= 0:
        raise ValueError(f"{text[:40]!r} is not a size above zero; {EXAMPLES}")
    return size


def format_size(n: int) -> str:
    """``n`` bytes for people: binary units (what ``parse_size`` reads back)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
