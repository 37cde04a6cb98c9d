"""Ring-buffer records -> TlsData events, reassembling calls split into chunks.

Chunks of one call come from one BPF program run on one CPU, so they arrive
in order; records of other CPUs may sit between them. A call whose last chunk
was dropped is flushed by flush_stale() with what arrived.
"""
from __future__ import annotations

import struct
import time
from typing import Callable

from .. import abi
from ..abi import Direction
from ..events import Conn, TlsData, wall_clock_offset_ns

HDR = struct.Struct(abi.DATA_EVENT_FORMAT)
HDR_SIZE = HDR.size
assert HDR_SIZE == abi.ctypes.sizeof(abi.DataEvent)
#: the header up to `conn_id`: what changes per call or connection (kind, dir, flags, len,
#: ts_ns, ssl, call_id, total, offset, conn_id); the rest (pid .. tuple) says who and where
_PRE = struct.Struct("<BBBxIQQQQQQ")
IDENT_OFF = abi.DataEvent.pid.offset
assert _PRE.size == IDENT_OFF

_DIRS = {d.value: d for d in Direction}  # Direction(x) costs an enum lookup per record

#: a partial call older than this is flushed as is (its last chunk was lost)
STALE_PARTIAL_S = 1.0


class _Partial:
    __slots__ = ("hdr", "parts", "next_off", "lost", "born")

    def __init__(self, hdr, born):
        self.hdr, self.parts, self.next_off, self.lost, self.born = hdr, [], 0, 0, born


def identity(h) -> tuple[Conn | None, str]:
    """(conn, comm) of an unpacked header, uncached."""
    family, lport, rport, laddr, raddr = h[15:20]
    return Conn.from_raw(family, lport, rport, laddr, raddr), h[14].split(b"\0", 1)[0].decode(errors="replace")


class RecordDecoder:
    """Feed raw records; completed calls go to `sink(TlsData)`.

    Fast path: a sink that can take records unparsed says so by passing
    fast=its raw_data_handler; single-chunk calls then skip TlsData and go to
    the handler fast(decoder) returns: handler(rec, direction, ts_ns, total,
    payload) with rec the whole record (header fields from IDENT_OFF on say
    who and where) and ts_ns still monotonic; `rec` and `payload` are valid
    only during the call. The handler must do what `sink` would do."""

    def __init__(self, sink: Callable[[TlsData], None], max_payload: int, fast=None):
        self.sink = sink
        self.max_payload = max_payload
        self.wall_offset = wall_clock_offset_ns()
        self._partial: dict[int, _Partial] = {}
        self._conn_cache: dict[bytes, Conn | None] = {}
        self._comm_cache: dict[bytes, str] = {}
        self._raw = fast(self) if fast is not None else None

    def feed(self, rec: memoryview) -> None:
        kind, direction, flags, ln, ts, _ssl, call_id, total, offset, _conn_id = _PRE.unpack_from(rec, 0)
        if kind != abi.REC_DATA:
            return
        if flags & abi.DF_FIRST and flags & abi.DF_LAST:   # the common case: one chunk
            raw = self._raw
            if raw is not None and total == ln:   # (a truncated call takes the slow path)
                raw(rec, direction, ts, total, rec[HDR_SIZE:HDR_SIZE + ln])
            else:
                self._emit(HDR.unpack_from(rec, 0), bytes(rec[HDR_SIZE:HDR_SIZE + ln]), 0)
            return
        h = HDR.unpack_from(rec, 0)
        payload = rec[HDR_SIZE:HDR_SIZE + ln]
        p = self._partial.get(call_id)
        if p is None:
            p = self._partial[call_id] = _Partial(h, time.monotonic())
        if offset > p.next_off:          # chunks in between were lost
            p.lost += offset - p.next_off
        p.parts.append(bytes(payload))
        p.next_off = offset + ln
        if flags & abi.DF_LAST:
            del self._partial[call_id]
            self._emit(p.hdr, b"".join(p.parts), p.lost)

    def flush_stale(self, all_: bool = False) -> None:
        now = time.monotonic()
        for cid in [c for c, p in self._partial.items() if all_ or now - p.born > STALE_PARTIAL_S]:
            p = self._partial.pop(cid)
            captured = min(p.hdr[7], self.max_payload)   # what the kernel meant to send
            self._emit(p.hdr, b"".join(p.parts), p.lost + max(0, captured - p.next_off))

    def _emit(self, h, data: bytes, lost: int) -> None:
        (_kind, direction, flags, _ln, ts, ssl, _cid, total, _off, conn_id, pid, tid, uid, fd, comm,
         family, lport, rport, laddr, raddr) = h
        key = h[15:20]
        conn = self._conn_cache.get(key)
        if conn is None and key not in self._conn_cache:
            if len(self._conn_cache) > 65536:
                self._conn_cache.clear()
            conn = self._conn_cache[key] = Conn.from_raw(family, lport, rport, laddr, raddr)
        name = self._comm_cache.get(comm)
        if name is None:
            if len(self._comm_cache) > 4096:
                self._comm_cache.clear()
            name = self._comm_cache[comm] = comm.split(b"\0", 1)[0].decode(errors="replace")
        truncated = total - len(data) - lost
        self.sink(TlsData(ts + self.wall_offset, pid, tid, uid, name, fd, _DIRS[direction], conn, ssl, data,
                          total, truncated if truncated > 0 else 0, lost, bool(flags & abi.DF_FD_CACHED),
                          conn_id))
