"""Passive WebSocket (RFC 6455) frame decoder for one direction of an upgraded connection.

Used by http1.Http1Decoder after a ``101 Switching Protocols`` to ``websocket``. Sans-IO like
the rest of decode/: bytes in (split anywhere), events out.

Rules:

1. One ``Frame(proto="WebSocket")`` per *message*: the fragments of a text or binary
   message (RFC 6455 §5.4) are joined, and ``info`` says how many there were. Control
   frames (close, ping, pong; §5.5), which may come between fragments, are emitted on
   their own as they complete.
2. Payloads stream: a frame that announces 2**63 bytes is never buffered whole. Only the
   first ``max_payload`` bytes of a message are kept (``info`` has ``truncated``); the
   ``length`` in ``info`` counts them all.
3. Masked payloads (client to server, §5.3) are unmasked with one big-integer XOR per
   piece: O(n) in C, no per-byte Python loop.
4. permessage-deflate (RFC 7692) is undone when the 101 response negotiated it: one raw
   inflater per direction, kept across messages unless ``*_no_context_takeover`` was
   agreed. Its output is bounded like HTTP bodies (encoding.DEFAULT_MAX_DECODED).
5. Protocol violations that mean "this is not WebSocket" (reserved opcodes, fragmented or
   oversized control frames, a 64-bit length with the top bit set, a continuation with no
   message, a new message inside a fragmented one) raise DecodeError.
"""
from __future__ import annotations

import zlib

from .encoding import DEFAULT_MAX_DECODED
from .events import DecodeError, Frame, Side

_OPCODES = {0x0: "continuation", 0x1: "text", 0x2: "binary", 0x8: "close", 0x9: "ping",
            0xA: "pong"}
_TAIL = b"\x00\x00\xff\xff"   # RFC 7692 §7.2.2: removed by the sender, appended back here
_INFLATE_STEP = 64 << 10      # inflate in bounded steps so a bomb cannot allocate at once


def unmask(data: bytes, mask: bytes, offset: int = 0) -> bytes:
    """XOR ``data`` with the 4-byte ``mask``, starting ``offset`` bytes into the payload."""
    n = len(data)
    if not n:
        return b""
    k = offset & 3
    m = (mask[k:] + mask[:k]) * (n // 4 + 1)
    return (int.from_bytes(data, "little") ^ int.from_bytes(m[:n], "little")).to_bytes(n, "little")


def parse_deflate_offer(extensions: str | None) -> tuple[bool, bool, bool]:
    """From a 101 response's Sec-WebSocket-Extensions: (deflate on, server resets its
    context per message, client resets its context per message)."""
    if not extensions:
        return False, False, False
    for ext in extensions.split(","):
        parts = [p.strip().lower() for p in ext.split(";")]
        if parts[0] == "permessage-deflate":
            params = {p.split("=")[0].strip() for p in parts[1:]}
            return True, "server_no_context_takeover" in params, "client_no_context_takeover" in params
    return False, False, False


class WebSocketParser:
    """Frames of one direction. ``feed()`` may raise DecodeError; after it, stop using it."""

    def __init__(self, side: Side, max_payload: int | None = None, deflate: bool = False,
                 no_context_takeover: bool = False, max_decoded: int = DEFAULT_MAX_DECODED):
        self.side = side
        self.max_payload = max_payload
        self.deflate = deflate
        self.no_context_takeover = no_context_takeover
        self.max_decoded = max_decoded
        self._inflater = zlib.decompressobj(-15) if deflate else None
        self._inflate_broken: str | None = None
        self._buf = bytearray()
        # current frame
        self._in_frame = False
        self._fin = False
        self._rsv = 0
        self._op = 0
        self._mask: bytes | None = None
        self._remaining = 0
        self._done = 0
        self._ctl = bytearray()
        # current message (text/binary, possibly fragmented)
        self._msg_op: int | None = None
        self._msg = bytearray()
        self._msg_len = 0        # payload bytes on the wire
        self._msg_out_len = 0    # bytes after inflation (== _msg_len when not compressed)
        self._msg_trunc = False
        self._msg_frags = 0
        self._msg_flags: tuple[str, ...] = ()
        self._msg_compressed = False
        self._msg_error: str | None = None

    # -- feeding ---------------------------------------------------------------------------
    def feed(self, data: bytes, ts: int) -> list[Frame]:
        out: list[Frame] = []
        buf = self._buf
        buf += data
        pos = 0
        n = len(buf)
        while pos < n:
            if not self._in_frame:
                if n - pos < 2:
                    break
                b0, b1 = buf[pos], buf[pos + 1]
                ln = b1 & 0x7F
                hl = 2 + (2 if ln == 126 else 8 if ln == 127 else 0) + (4 if b1 & 0x80 else 0)
                if n - pos < hl:
                    break
                if ln == 126:
                    ln = int.from_bytes(buf[pos + 2:pos + 4], "big")
                elif ln == 127:
                    ln = int.from_bytes(buf[pos + 2:pos + 10], "big")
                    if ln >> 63:
                        raise DecodeError("websocket: 64-bit frame length with the top bit set")
                self._start_frame(b0, b1, ln, bytes(buf[pos + hl - 4:pos + hl]) if b1 & 0x80 else None)
                pos += hl
                if self._remaining == 0:
                    self._end_frame(ts, out)
                continue
            take = min(self._remaining, n - pos)
            piece = bytes(buf[pos:pos + take])
            pos += take
            self._payload(piece)
            self._remaining -= take
            if self._remaining == 0:
                self._end_frame(ts, out)
        del buf[:pos]
        return out

    def close(self, ts: int) -> list[Frame]:
        """End of data: a message or frame cut short comes out with ``complete=false``."""
        out: list[Frame] = []
        if self._in_frame and self._op >= 8:
            out.append(self._frame(_OPCODES[self._op], bytes(self._ctl), ts,
                                   (("complete", "false"),), self._flags()))
        if self._msg_op is not None:
            out.append(self._message_frame(ts, complete=False))
        if self._buf:
            out.append(Frame(self.side, "WebSocket", "incomplete", payload=bytes(self._buf),
                             info=(("complete", "false"),), ts_ns=ts))
            self._buf.clear()
        self._in_frame = False
        self._msg_op = None
        return out

    # -- frames ----------------------------------------------------------------------------
    def _start_frame(self, b0: int, b1: int, ln: int, mask: bytes | None) -> None:
        op = b0 & 0x0F
        if op not in _OPCODES:
            raise DecodeError(f"websocket: reserved opcode {op:#x}")
        fin = bool(b0 & 0x80)
        if op >= 8:
            if not fin:
                raise DecodeError("websocket: fragmented control frame")
            if ln > 125:
                raise DecodeError("websocket: control frame over 125 bytes")
            self._ctl = bytearray()
        elif op == 0:
            if self._msg_op is None:
                raise DecodeError("websocket: continuation frame with no message")
        else:
            if self._msg_op is not None:
                raise DecodeError("websocket: new message inside a fragmented one")
            self._begin_message(op, b0)
        if op < 8:
            self._msg_frags += 1
        self._in_frame = True
        self._fin, self._rsv, self._op, self._mask = fin, (b0 >> 4) & 7, op, mask
        self._remaining, self._done = ln, 0
        if op in (1, 2):
            self._msg_flags = tuple(f for f in self._flags() if f != "FIN")

    def _flags(self) -> tuple[str, ...]:
        f = []
        if self._fin:
            f.append("FIN")
        for bit, name in ((4, "RSV1"), (2, "RSV2"), (1, "RSV3")):
            if self._rsv & bit:
                f.append(name)
        if self._mask is not None:
            f.append("MASKED")
        return tuple(f)

    def _payload(self, piece: bytes) -> None:
        if self._mask is not None:
            piece = unmask(piece, self._mask, self._done)
        self._done += len(piece)
        if self._op >= 8:
            self._ctl += piece
            return
        self._msg_len += len(piece)
        if self._msg_compressed:
            piece = self._inflate(piece)
            if piece is None:
                return
        self._keep(piece)

    def _keep(self, piece: bytes) -> None:
        self._msg_out_len += len(piece)
        cap = self.max_payload
        if cap is None:
            self._msg += piece
            return
        room = cap - len(self._msg)
        if room > 0:
            self._msg += piece[:room]
        if len(piece) > room:
            self._msg_trunc = True

    def _inflate(self, piece: bytes) -> bytes | None:
        if self._inflate_broken:
            return None
        assert self._inflater is not None
        out = bytearray()
        try:
            chunk = self._inflater.decompress(piece, _INFLATE_STEP)
            while True:
                if self._msg_out_len + len(out) < self.max_decoded:
                    out += chunk
                else:
                    self._msg_error = f"inflated message over {self.max_decoded} bytes; truncated"
                tail = self._inflater.unconsumed_tail
                if not tail:
                    break
                chunk = self._inflater.decompress(tail, _INFLATE_STEP)
        except zlib.error as e:
            self._inflate_broken = f"permessage-deflate: {e}"
            self._msg_error = self._inflate_broken
            return None
        return bytes(out)

    def _end_frame(self, ts: int, out: list[Frame]) -> None:
        self._in_frame = False
        if self._op >= 8:
            payload = bytes(self._ctl)
            info: tuple[tuple[str, str], ...] = ()
            if self._op == 8:
                if len(payload) >= 2:
                    info = (("code", str(int.from_bytes(payload[:2], "big"))),
                            ("reason", payload[2:].decode("utf-8", "replace")))
                elif len(payload) == 1:
                    info = (("error", "close payload of 1 byte"),)
            out.append(self._frame(_OPCODES[self._op], payload, ts, info, self._flags()))
            return
        if self._fin:
            if self._msg_compressed and not self._inflate_broken:
                piece = self._inflate(_TAIL)
                if piece is not None:
                    self._keep(piece)
                if self.no_context_takeover and not self._inflate_broken:
                    self._inflater = zlib.decompressobj(-15)
            out.append(self._message_frame(ts, complete=True))

    def _begin_message(self, op: int, b0: int) -> None:
        self._msg_op = op
        self._msg = bytearray()
        self._msg_len = self._msg_out_len = self._msg_frags = 0
        self._msg_trunc = False
        self._msg_error = None
        self._msg_compressed = bool(b0 & 0x40) and self.deflate
        self._msg_flags = ()
        if self._msg_compressed and self._inflate_broken:
            self._msg_error = f"{self._inflate_broken} (earlier message); not inflated"

    def _message_frame(self, ts: int, complete: bool) -> Frame:
        info: list[tuple[str, str]] = [("length", str(self._msg_len))]
        if self._msg_frags > 1:
            info.append(("fragments", str(self._msg_frags)))
        if self._msg_compressed:
            info.append(("permessage-deflate", "inflated" if not self._msg_error else "failed"))
            info.append(("inflated_length", str(self._msg_out_len)))
        if self._msg_trunc:
            info.append(("truncated", "true"))
        if self._msg_error:
            info.append(("decode_error", self._msg_error))
        if not complete:
            info.append(("complete", "false"))
        assert self._msg_op is not None
        f = self._frame(_OPCODES[self._msg_op], bytes(self._msg), ts, tuple(info),
                        (("FIN",) if complete else ()) + self._msg_flags)
        self._msg_op = None
        self._msg = bytearray()
        return f

    def _frame(self, type_: str, payload: bytes, ts: int, info: tuple[tuple[str, str], ...],
               flags: tuple[str, ...]) -> Frame:
        return Frame(self.side, "WebSocket", type_, flags=flags, info=info, payload=payload,
                     ts_ns=ts)
