"""Parsing of size flags like 8M, 256K, 1048576; the limits the kernel puts on them."""
from __future__ import annotations

from .errors import UsageError

#: text mode's --spool-max: the decoder process's backlog bound (spool.py); cli.py and commands/doctor.py
DEFAULT_SPOOL_MAX = "1G"

#: The largest BPF ring buffer: kernel/bpf/ringbuf.c (ringbuf_map_alloc) takes a max_entries
#: that is a power of two and page aligned, and max_entries is a __u32, so 2^31. Its other
#: bound, RINGBUF_MAX_DATA_SZ (~64 GiB on 64-bit), cannot be reached by a 32-bit value.
RING_MAX = 1 << 31

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40,
          "TIB": 1 << 40}


def parse_size(text: str, flag: str, bare_unit: int = 1) -> int:
    """'8M' -> 8388608; a bare number is multiplied by bare_unit. The error names `flag`."""
    s = text.strip().upper()
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        n = int(num)
    except ValueError:
        n = -1
    if unit not in _UNITS or n < 0 or not num.isdigit():
        raise UsageError(f"{flag} {text}: not a size (examples: 4096, 256K, 8M)")
    return n * (_UNITS[unit] if unit else bare_unit)


def format_size(n: int) -> str:
    """8388608 -> '8M': the largest unit that divides n, as the flags take it."""
    for suffix, unit in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
