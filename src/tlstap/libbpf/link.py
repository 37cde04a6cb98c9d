"""Link: one attachment of a program; detached by close() (idempotent)."""
from __future__ import annotations

from ._lib import lib


class Link:
    def __init__(self, ptr: int, desc: str):
        self._ptr, self.desc = ptr, desc

    def close(self) -> None:
        if self._ptr:
            lib.bpf_link__destroy(self._ptr)
            self._ptr = None

    def __enter__(self) -> "Link":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Link({self.desc})"
