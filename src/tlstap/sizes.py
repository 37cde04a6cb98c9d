"""Parsing of size flags like 8M, 256K, 1048576."""
from __future__ import annotations

from .errors import UsageError

#: text mode's --spool-max: the decoder process's backlog bound (spool.py); cli.py and doctor.py
DEFAULT_SPOOL_MAX = "1G"

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def parse_size(text: str, flag: str, bare_unit: int = 1) -> int:
    """'8M' -> 8388608; a bare number is multiplied by bare_unit."""
    s = text.strip().upper()
    num = s.rstrip("KMGIB")
    unit = s[len(num):]
    try:
        n = int(num)
    except ValueError:
        raise UsageError(f"{flag}: '{text}' is not a size (examples: 4096, 256K, 8M)") from None
    if unit not in _UNITS or n < 0:
        raise UsageError(f"{flag}: '{text}' is not a size (examples: 4096, 256K, 8M)")
    return n * (_UNITS[unit] if unit else bare_unit)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
