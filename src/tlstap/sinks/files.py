"""Opening output files: 0600 (they hold plaintext or secrets), one-line errors, and a refused
command leaves the user's file as it was (OutputFile)."""
from __future__ import annotations

import os
import stat
import sys
from typing import BinaryIO

from ..errors import TlstapError, UsageError


def open_private(path: str, append: bool = False, buffered: bool = True) -> BinaryIO | int:
    """Create or open `path` for writing with mode 0600, even if it existed with wider bits.
    buffered=False returns the raw file descriptor."""
    if path == "-":
        return sys.stdout.buffer if buffered else sys.stdout.fileno()
    f = OutputFile(path, append)
    f.commit()
    return os.fdopen(f.fd, "wb", buffering=1 << 20) if buffered else f.fd


class OutputFile:
    """An output file opened before the capture starts, so that an unwritable path is refused
    before any probe is attached, but changed only by commit(), once the capture has started.

    The open has no O_TRUNC and changes no mode: until commit() the user's file is as it was,
    bytes, mode and mtime. commit() truncates it (not with append) and narrows it to 0600;
    discard() closes it and removes it if this open created it (an attach or load failure
    leaves no stray file). Why not write a new file and rename it over the old one: rename
    replaces a symlink instead of writing through it, loses hard links, owner and ACLs, needs
    a writable directory, and text mode's decoder process would have to learn the new name.
    "-" is stdout: nothing to commit or remove."""

    def __init__(self, path: str, append: bool = False):
        self.path = path
        self.append = append
        self.created = False
        self.committed = False
        if path == "-":
            self.fd: int | None = sys.stdout.fileno()
            return
        flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_APPEND if append else 0)
        try:
            try:
                self.fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                self.created = True
            except FileExistsError:
                try:
                    self.fd = os.open(path, flags)
                except FileNotFoundError:   # a symlink to nothing (yet): create its target
                    self.fd = os.open(path, flags | os.O_CREAT, 0o600)
                    self.created = True
        except OSError as e:
            raise UsageError(f"cannot write {path}: {e.strerror}") from None

    @property
    def is_stdout(self) -> bool:
        return self.path == "-"

    def commit(self) -> None:
        """The capture runs: empty the file (unless appending) and narrow it to 0600; a device
        (-o /dev/null) or FIFO is left as it is."""
        if self.committed or self.is_stdout:
            self.committed = True
            return
        self.committed = True
        try:
            if stat.S_ISREG(os.fstat(self.fd).st_mode):
                os.fchmod(self.fd, 0o600)      # first: should it fail, the content is intact
                if not self.append:
                    os.ftruncate(self.fd, 0)
        except OSError as e:
            raise TlstapError(f"cannot write {self.path}: {e.strerror}") from None

    def discard(self) -> None:
        """The command was refused: close; remove the file if this open created it. A file
        that existed is left as it was (nothing was written to it)."""
        if self.fd is None or self.is_stdout:
            self.fd = None
            return
        fd, self.fd = self.fd, None
        try:
            if self.created and not self.committed:
                st = os.fstat(fd)
                try:
                    now = os.stat(self.path)
                except OSError:
                    return
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):   # still ours, not a newcomer
                    os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.fd is not None and not self.is_stdout:
            os.close(self.fd)
        self.fd = None
