"""Human-readable records: a header line, then the plaintext or a hexdump."""
from __future__ import annotations

import time

from ..abi import Direction
from ..events import Lost, TlsData
from . import direct
from .base import Sink

# Bytes shown as they are. Anything else (controls, escape sequences, binary)
# gets a hexdump: captured plaintext is attacker-controlled and must not drive
# the reader's terminal.
_TEXT_BYTES = bytes(range(0x20, 0x7F)) + b"\t\r\n"


def is_text(data: bytes) -> bool:
    return data.isascii() and not data.translate(None, _TEXT_BYTES)


def hexdump(data: bytes, width: int = 16) -> bytes:
    lines = []
    for off in range(0, len(data), width):
        chunk = data[off:off + width]
        hx = " ".join(f"{b:02x}" for b in chunk)
        asc = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in chunk)
        lines.append(f"{off:08x}  {hx:<{width * 3 - 1}}  |{asc}|")
    return ("\n".join(lines) + "\n").encode()


class _Clock:
    """Formats wall-clock ns; the date part is cached per second (hot path)."""

    def __init__(self):
        self._sec, self._prefix = -1, ""

    def __call__(self, ts_ns: int) -> str:
        sec, ns = divmod(ts_ns, 1_000_000_000)
        if sec != self._sec:
            self._sec = sec
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._prefix}.{ns // 1000:06d}Z"


class TextSink(Sink):
    def __init__(self, out, hex_: bool = False):
        super().__init__(direct.wrap(out))
        self.hex = hex_
        self.clock = _Clock()
        self._where: dict = {}   # (conn, direction) -> "a -> b": formatted once per connection

    def _where_of(self, c, d) -> str:
        if c is None:
            return "conn ?"
        w = self._where.get((c, d))
        if w is None:
            if len(self._where) > 65536:
                self._where.clear()
            w = self._where[(c, d)] = f"{c.local} {'->' if d is Direction.WRITE else '<-'} {c.remote}"
        return w

    def on_data(self, ev: TlsData) -> None:
        where = self._where_of(ev.conn, ev.direction)
        extra = ""
        if ev.truncated:
            extra += f" [truncated {ev.truncated} bytes over --max-payload]"
        if ev.lost:
            extra += f" [lost {ev.lost} bytes: ring buffer full]"
        head = (f"{self.clock(ev.ts_ns)} {ev.comm} pid={ev.pid} tid={ev.tid} uid={ev.uid} fd={ev.fd} "
                f"{ev.direction.name} {where} {ev.total} bytes{extra}\n")
        out = self.out
        out.write(head.encode())
        data = ev.data
        if not self.hex and is_text(data):
            out.write(data)
            if not data.endswith(b"\n"):
                out.write(b"\n")
        else:
            out.write(hexdump(data))

    def raw_data_handler(self, decoder):
        """RecordDecoder's fast path (see records.py): writes what on_data would
        write for a single-chunk, untruncated call, without a TlsData."""
        from ..records import _HDR, IDENT_OFF, HDR_SIZE, identity
        wall = decoder.wall_offset
        idents: dict[bytes, tuple] = {}   # header bytes IDENT_OFF.. -> (None, READ part, WRITE part)
        clock = self.clock
        write = self.out.write
        hex_ = self.hex
        text_bytes = _TEXT_BYTES
        state = [-1, ""]   # the second and its formatted date

        def handler(rec, direction, ts, total, payload):
            key = rec[IDENT_OFF:HDR_SIZE].tobytes()
            parts = idents.get(key)
            if parts is None:
                if len(idents) > 65536:
                    idents.clear()
                h = _HDR.unpack_from(rec, 0)
                conn, comm = identity(h)
                parts = idents[key] = (None,) + tuple(
                    f"{comm} pid={h[9]} tid={h[10]} uid={h[11]} fd={h[12]} {d.name} {self._where_of(conn, d)} "
                    for d in (Direction.READ, Direction.WRITE))
            sec, ns = divmod(ts + wall, 1_000_000_000)
            if sec != state[0]:
                clock(ts + wall)
                state[0], state[1] = sec, clock._prefix
            data = payload.tobytes()
            write(f"{state[1]}.{ns // 1000:06d}Z {parts[direction]}{total} bytes\n".encode())
            if not hex_ and data.isascii() and not data.translate(None, text_bytes):
                write(data)
                if data[-1:] != b"\n":
                    write(b"\n")
            else:
                write(hexdump(data))
        return handler

    def on_lost(self, ev: Lost) -> None:
        self.out.write(f"[lost {ev.records} records, {ev.bytes} bytes: ring buffer full]\n".encode())

    def on_summary(self, counters: dict[str, int], line: str) -> None:
        self.out.write(f"-- tlstap {line}\n".encode())
