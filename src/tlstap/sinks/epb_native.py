"""ctypes face of native/epb.c (pcapng EPBs from a piece of the packet ring, in C) and
native/ring.c (the ring reader's acquire/release accesses on CPUs other than x86-64).

Built into the package at install time next to the BPF objects (setup.py); pcapng_mode.py
uses it for every piece and keeps its Python encoder for what this leaves to it (a piece
whose packets crossed in time, the first packet after a loss).
"""
from __future__ import annotations

import ctypes
import os
from importlib import resources

from ..errors import TlstapError

LIB_NAME = "libtlstap_epb.so"
DONE, NEED_TRAILER, OUT_FULL, BAD = 0, 1, 2, -1
NO_HOLD = (1 << 64) - 1


class Result(ctypes.Structure):
    """struct epb_result (checked against epb_result_layout() by the tests)."""
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("pos", "out_len", "count", "first_ts", "last_ts", "crossed", "hold_idx", "hold_off")] \
        + [("status", ctypes.c_int64)]

    def reset(self) -> None:
        ctypes.memset(ctypes.addressof(self), 0, ctypes.sizeof(self))
        self.hold_off = NO_HOLD


class _PyBuffer(ctypes.Structure):
    """Py_buffer (Include/pybuffer.h): how to get the address of a read-only mmap view."""
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.py_object), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_PYBUF_WRITABLE = 1


class Pinned:
    """The address of a buffer, pinned (not resizable, not freed) until close()."""

    def __init__(self, obj, writable: bool = False):
        self._b = _PyBuffer()
        _get_buffer(obj, ctypes.byref(self._b), _PYBUF_WRITABLE if writable else 0)
        self.addr, self.len = self._b.buf, self._b.len

    def close(self) -> None:
        if self._b is not None:
            _release_buffer(ctypes.byref(self._b))
            self._b = None

    def __enter__(self) -> "Pinned":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def library_path() -> str:
    path = str(resources.files("tlstap") / "native" / LIB_NAME)
    if not os.path.exists(path):
        raise TlstapError(f"{path} is missing: reinstall tlstap (pip install . builds it with clang)")
    return path


_lib = None


def _load():
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(library_path())
        lib.epb_table_size.restype = ctypes.c_size_t
        lib.epb_key_len.restype = ctypes.c_size_t
        lib.epb_add_trailer.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint32]
        lib.epb_key_at.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_char_p]
        lib.epb_encode.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p,
                                   ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_uint32, ctypes.POINTER(Result)]
        lib.epb_encode.restype = None
        try:        # native/ring.c: the ring reader's ordered loads and stores off x86-64
            lib.ring_load_acquire64.argtypes = [ctypes.c_void_p]
            lib.ring_load_acquire64.restype = ctypes.c_uint64
            lib.ring_load_acquire32.argtypes = [ctypes.c_void_p]
            lib.ring_load_acquire32.restype = ctypes.c_uint32
            lib.ring_store_release64.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
            lib.ring_store_release64.restype = None
        except AttributeError as e:
            raise TlstapError(f"{library_path()} is out of date ({e}): reinstall tlstap") from None
        _lib = lib
    return _lib


def ring_atomics():
    """The library, for ringbuf.py's ring_load_acquire64/32 and ring_store_release64."""
    return _load()


class EpbEncoder:
    """The trailer table and the calls; see native/epb.c for the contract."""

    def __init__(self):
        self._lib = _load()
        self._table = ctypes.create_string_buffer(self._lib.epb_table_size())
        self.key_len = self._lib.epb_key_len()
        self._pids = (ctypes.c_uint32 * 64)()
        self._npids = 0

    def set_key_pids(self, pids) -> None:
        """Processes that have logged secrets (the first 64: more only means more waiting)."""
        pids = list(pids)[:len(self._pids)]
        for i, p in enumerate(pids):
            self._pids[i] = p
        self._npids = len(pids)

    def key_at(self, piece_addr: int, length: int, pos: int) -> bytes:
        key = ctypes.create_string_buffer(self.key_len)
        if self._lib.epb_key_at(piece_addr, length, pos, key) < 0:
            raise ValueError("no record there")
        return key.raw

    def add_trailer(self, key: bytes, trailer: bytes) -> None:
        if self._lib.epb_add_trailer(self._table, key, trailer, len(trailer)) < 0:
            # full (connections come and go): start again, the Python side re-adds what it meets
            self._table = ctypes.create_string_buffer(self._lib.epb_table_size())
            if self._lib.epb_add_trailer(self._table, key, trailer, len(trailer)) < 0:
                raise ValueError(f"EPB trailer of {len(trailer)} bytes is too long")

    def encode(self, piece_addr: int, length: int, out_addr: int, cap: int, if_id: int, wall: int,
               res: Result) -> None:
        self._lib.epb_encode(self._table, piece_addr, length, out_addr, cap, if_id, wall,
                             self._pids, self._npids, ctypes.byref(res))
