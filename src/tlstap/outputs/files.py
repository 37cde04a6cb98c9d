"""Opening output files: 0600 (they hold plaintext or secrets), one-line errors."""
from __future__ import annotations

import os
import stat
import sys
from typing import BinaryIO

from ..errors import UsageError


def open_private(path: str, append: bool = False, buffered: bool = True) -> BinaryIO | int:
    """Create or open `path` for writing with mode 0600, even if it existed with wider bits.
    buffered=False returns the raw file descriptor."""
    if path == "-":
        return sys.stdout.buffer if buffered else sys.stdout.fileno()
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o600)
        if stat.S_ISREG(os.fstat(fd).st_mode):   # narrow a file, never a device (-o /dev/null) or FIFO
            os.fchmod(fd, 0o600)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror}") from None
    return os.fdopen(fd, "wb", buffering=1 << 20) if buffered else fd
