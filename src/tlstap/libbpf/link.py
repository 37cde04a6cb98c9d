"""Link, FdLink: one attachment of a program; detached by close() (idempotent)."""
from __future__ import annotations

import os

from ._lib import lib


class Attachment:
    """What every attachment kind shares: `with` closes it (close() detaches, idempotent)."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Link(Attachment):
    def __init__(self, ptr: int, desc: str):
        self._ptr, self.desc = ptr, desc

    def close(self) -> None:
        if self._ptr:
            lib.bpf_link__destroy(self._ptr)
            self._ptr = None

    def __repr__(self) -> str:
        return f"Link({self.desc})"


class FdLink(Attachment):
    """A BPF link held as its bare file descriptor (what bpf_link_create returns). The
    kernel detaches the program when the last descriptor closes: on close(), or when the
    process ends, however it ends (descriptors of BPF objects are close-on-exec)."""

    def __init__(self, fd: int, desc: str):
        self.fd, self.desc = fd, desc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"FdLink({self.desc})"
