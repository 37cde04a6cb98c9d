"""What the running kernel's BTF says: which functions and tp_btf tracepoints it has.

Why one copy: the captures ask several questions at start (the one-copy kfuncs, tcx, the
sock tracepoints), and each read of /sys/kernel/btf/vmlinux costs ~9 ms and ~6 MB. It is
read on the first question, kept for the next ones, and freed at exit (or by release());
answers are remembered, so a question asked again after release() reads nothing.
"""
from __future__ import annotations

import atexit
import threading

from ._lib import lib

BTF_KIND_TYPEDEF = 8
BTF_KIND_FUNC = 12

_lock = threading.Lock()
_btf: int | None = None      # struct btf *, or None: not read (or released)
_answers: dict[tuple[str, int], bool] = {}


def kernel_has(name: str, kind: int) -> bool:
    """Whether the kernel's BTF has a type `name` of BTF kind `kind` (False without BTF)."""
    global _btf
    key = (name, kind)
    with _lock:
        if key not in _answers:
            if _btf is None:
                _btf = lib.btf__load_vmlinux_btf() or 0
            _answers[key] = bool(_btf) and lib.btf__find_by_name_kind(_btf, name.encode(), kind) > 0
        return _answers[key]


@atexit.register
def release() -> None:
    """Free the kernel's BTF (a later new question reads it again)."""
    global _btf
    with _lock:
        if _btf:
            lib.btf__free(_btf)
        _btf = None


__all__ = ["BTF_KIND_FUNC", "BTF_KIND_TYPEDEF", "kernel_has", "release"]
