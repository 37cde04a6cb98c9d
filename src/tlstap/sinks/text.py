"""Human-readable records: a header line, then the plaintext or a hexdump."""
from __future__ import annotations

import time

from ..abi import Direction
from ..decode.events import Side
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
        self.out.write(head.encode())
        self._payload(ev.data)

    def _payload(self, data: bytes) -> None:
        """Printable ASCII as it is (ending in a newline), anything else as a hexdump."""
        if not self.hex and is_text(data):
            self.out.write(data)
            if not data.endswith(b"\n"):
                self.out.write(b"\n")
        else:
            self.out.write(hexdump(data))

    def raw_data_handler(self, decoder):
        """RecordDecoder's fast path (see records.py): writes what on_data would
        write for a single-chunk, untruncated call, without a TlsData."""
        from ..decode.records import HDR, HDR_SIZE, IDENT_OFF, identity
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
                h = HDR.unpack_from(rec, 0)
                conn, comm = identity(h)
                parts = idents[key] = (None,) + tuple(
                    f"{comm} pid={h[10]} tid={h[11]} uid={h[12]} fd={h[13]} {d.name} {self._where_of(conn, d)} "
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
        self.out.write(f"[lost {ev.records} records, {ev.bytes} bytes: {ev.why}]\n".encode())

    def on_summary(self, counters: dict[str, int], line: str) -> None:
        self.out.write(f"-- tlstap {line}\n".encode())

    # ---- decoded HTTP (httpview.HttpView calls these) --------------------------------------

    headers_only = False

    def _body(self, m) -> None:
        if self.headers_only or not m.body_len:
            return
        body = m.decoded_body if m.decoded_body is not None else m.body
        notes = []
        if m.decoded_body is not None:
            notes.append(f"{m.header('content-encoding')} decoded: {len(m.body)} -> {len(body)} bytes")
        elif m.decode_error:
            notes.append(m.decode_error)
        if m.body_truncated:
            notes.append(f"first {len(m.body)} of {m.body_len} bytes (--max-body)")
        if not m.complete:
            notes.append("incomplete: the capture ended or the stream was reset")
        if m.grpc:
            notes.append(f"{len(m.grpc)} gRPC message(s): " + ", ".join(
                f"{len(g.data)} bytes{' compressed' if g.compressed else ''}" for g in m.grpc[:8]))
        if notes:
            self.out.write(f"  [{'; '.join(notes)}]\n".encode())
        self._payload(body)

    def _message(self, m, mark: str) -> None:
        if m.side is Side.CLIENT:
            first = f"{mark} {m.method} {m.target} {m.proto}\n"
        else:
            first = f"{mark} {m.proto} {m.status}{' ' + m.reason if m.reason else ''}\n"
        lines = [first]
        lines += [f"{mark} {k}: {v}\n" for k, v in m.headers]
        if m.trailers:
            lines += [f"{mark} {k}: {v}\n" for k, v in m.trailers]
        self.out.write("".join(lines).encode("utf-8", "replace"))
        self._body(m)

    def _who(self, meta, ts_ns: int) -> str:
        where = self._where_of(meta.conn, Direction.WRITE)
        return (f"{self.clock(ts_ns)} {meta.comm} pid={meta.pid} tid={meta.tid} uid={meta.uid} fd={meta.fd} "
                f"{where}")

    def on_exchange(self, meta, ex) -> None:
        req, resp = ex.request, ex.response
        m = req or resp
        title = f"{m.proto}"
        if m.proto == "HTTP/2":
            title += f" stream {m.stream_id}"
        if req is not None:
            title += f" {req.method} {req.target}"
        title += f" -> {resp.status}" if resp is not None else " -> (no response)"
        if ex.latency_ns is not None:
            title += f" ({ex.latency_ns / 1e6:.2f} ms)"
        self.out.write(f"{self._who(meta, m.ts_start_ns)} {title}\n".encode())
        if req is not None:
            self._message(req, ">")
        else:
            self.out.write(b"> (request not captured)\n")
        if resp is not None:
            self._message(resp, "<")

    def on_frame(self, meta, f) -> None:
        info = " ".join(f"{k}={v}" for k, v in f.info)
        flags = f" [{','.join(f.flags)}]" if f.flags else ""
        self.out.write(f"{self._who(meta, f.ts_ns)} {f.proto} {f.side.value} {f.type}{flags} stream={f.stream_id}"
                       f"{' ' + info if info else ''}\n".encode("utf-8", "replace"))
        if f.payload and f.proto == "WebSocket" and not self.headers_only:
            self._payload(f.payload)

    def on_note(self, meta, n) -> None:
        who = self._who(meta, n.ts_ns) if meta is not None else self.clock(n.ts_ns)
        self.out.write(f"{who} [{n.text}]\n".encode("utf-8", "replace"))
