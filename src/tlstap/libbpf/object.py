"""BpfObject, Program and Map: an ELF object from open to close.

A BpfObject owns its libbpf object; Programs and Maps are views that live as
long as it. close() is idempotent and also runs on `with` exit.
"""
from __future__ import annotations

import ctypes
import threading
from typing import Iterator

from ..errors import AttachError, LoadError
from . import _lib
from ._lib import lib

# libbpf reports through one process-wide print callback. We keep recent
# warnings so a failed load can show the verifier's words.
_log_lock = threading.Lock()
_log: list[str] = []
_LOG_KEEP = 2000  # lines; a verifier log for one program fits easily


@_lib.PRINT_FN
def _print(level: int, fmt: bytes, args: int) -> int:
    if level > 1:  # LIBBPF_DEBUG
        return 0
    buf = ctypes.create_string_buffer(1 << 20)  # a verifier log arrives as one message
    _lib.libc.vsnprintf(buf, len(buf), fmt, args)
    with _log_lock:
        _log.extend(buf.value.decode(errors="replace").rstrip("\n").split("\n"))
        del _log[:-_LOG_KEEP]
    return 0


lib.libbpf_set_print(_print)


def _take_log() -> str:
    with _log_lock:
        out = "\n".join(_log)
        _log.clear()
    return out


class Map:
    def __init__(self, ptr: int, owner: "BpfObject"):
        self._ptr, self._owner = ptr, owner

    @property
    def name(self) -> str:
        return lib.bpf_map__name(self._ptr).decode()

    @property
    def fd(self) -> int:
        return lib.bpf_map__fd(self._ptr)

    @property
    def max_entries(self) -> int:
        return lib.bpf_map__max_entries(self._ptr)

    @max_entries.setter
    def max_entries(self, n: int) -> None:
        if lib.bpf_map__set_max_entries(self._ptr, n):
            raise LoadError(_lib.err(f"set max_entries of map {self.name} to {n}"))

    @property
    def value_size(self) -> int:
        return lib.bpf_map__value_size(self._ptr)

    def initial_value(self, ctype: type) -> ctypes.Structure:
        """A ctypes view of the map's initial data (.rodata/.data), writable until load()."""
        size = ctypes.c_size_t()
        p = lib.bpf_map__initial_value(self._ptr, ctypes.byref(size))
        if not p or size.value < ctypes.sizeof(ctype):
            raise LoadError(f"map {self.name} has no initial value of {ctypes.sizeof(ctype)} bytes")
        return ctype.from_address(p)

    def lookup_percpu_u64(self, key: int, ncpus: int) -> list[int]:
        """Per-CPU values of a u64 PERCPU_ARRAY slot."""
        k = ctypes.c_uint32(key)
        vals = (ctypes.c_uint64 * ncpus)()
        if lib.bpf_map_lookup_elem(self.fd, ctypes.byref(k), vals):
            raise LoadError(_lib.err(f"lookup in map {self.name}"))
        return list(vals)


class Program:
    def __init__(self, ptr: int, owner: "BpfObject"):
        self._ptr, self._owner = ptr, owner

    @property
    def name(self) -> str:
        return lib.bpf_program__name(self._ptr).decode()

    @property
    def autoload(self) -> bool:
        return bool(lib.bpf_program__autoload(self._ptr))

    @autoload.setter
    def autoload(self, on: bool) -> None:
        lib.bpf_program__set_autoload(self._ptr, on)

    def attach_uprobe(self, path: str, offset: int, *, pid: int = -1, retprobe: bool = False,
                      cookie: int = 0) -> "Link":
        """Uprobe at file offset `offset` of `path`; pid -1 = every process mapping it.

        A pid makes the kernel install the breakpoint in that process only, so no
        other process pays the trap."""
        from .link import Link
        opts = _lib.UprobeOpts(sz=ctypes.sizeof(_lib.UprobeOpts), bpf_cookie=cookie, retprobe=retprobe)
        ptr = lib.bpf_program__attach_uprobe_opts(self._ptr, pid, path.encode(), offset, ctypes.byref(opts))
        kind = "uretprobe" if retprobe else "uprobe"
        if not ptr:
            raise AttachError(_lib.err(f"attach {kind} {path}+{offset:#x}"))
        return Link(ptr, f"{kind}:{path}+{offset:#x}")

    def attach(self) -> "Link":
        """Attach by the program's SEC() name (tracepoints)."""
        from .link import Link
        ptr = lib.bpf_program__attach(self._ptr)
        if not ptr:
            raise AttachError(_lib.err(f"attach program {self.name}") + _last_log_line())
        return Link(ptr, self.name)


def _last_log_line() -> str:
    log = _take_log().strip().splitlines()
    return f" ({log[-1].strip()})" if log else ""


class BpfObject:
    """An opened (and later loaded) BPF ELF object."""

    def __init__(self, ptr: int, path: str):
        self._ptr, self.path = ptr, path
        self.loaded = False

    @classmethod
    def open(cls, path: str) -> "BpfObject":
        _take_log()
        ptr = lib.bpf_object__open_file(path.encode(), None)
        if not ptr:
            raise LoadError(_lib.err(f"open BPF object {path}"), _take_log())
        return cls(ptr, path)

    def programs(self) -> Iterator[Program]:
        p = lib.bpf_object__next_program(self._ptr, None)
        while p:
            yield Program(p, self)
            p = lib.bpf_object__next_program(self._ptr, p)

    def maps(self) -> Iterator[Map]:
        m = lib.bpf_object__next_map(self._ptr, None)
        while m:
            yield Map(m, self)
            m = lib.bpf_object__next_map(self._ptr, m)

    def program(self, name: str) -> Program:
        p = lib.bpf_object__find_program_by_name(self._ptr, name.encode())
        if not p:
            raise LoadError(f"{self.path}: no program named {name}")
        return Program(p, self)

    def map(self, name: str) -> Map:
        m = lib.bpf_object__find_map_by_name(self._ptr, name.encode())
        if not m:
            raise LoadError(f"{self.path}: no map named {name}")
        return Map(m, self)

    def rodata(self, ctype: type) -> ctypes.Structure:
        """The load-time config struct at offset 0 of .rodata (see abi.Config)."""
        for m in self.maps():
            if m.name.endswith(".rodata"):
                return m.initial_value(ctype)
        raise LoadError(f"{self.path}: no .rodata map")

    def load(self) -> None:
        _take_log()
        if lib.bpf_object__load(self._ptr):
            msg = _lib.err(f"load BPF object {self.path}")
            raise LoadError(msg, _take_log())
        self.loaded = True

    def close(self) -> None:
        if self._ptr:
            lib.bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
