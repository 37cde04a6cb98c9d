"""Passive HTTP/2 decoder for one connection (RFC 9113 framing, RFC 7541 HPACK).

An observer is not an endpoint. h2.H2Connection rejects a response HEADERS on a stream it
did not open and answers errors with GOAWAY; we must accept what both endpoints say. So
this module takes h2's pieces, not its connection (STYLE.md h2 section, lesson 12):
hyperframe parses frame bodies, one ``hpack.Decoder`` per direction decodes header
blocks, and the frame buffer is ours.

Rules:

1. Bytes in, events out, nothing else (lesson 1). ``feed()`` takes one direction's bytes
   split anywhere; the same bytes split differently give the same events (timestamps
   aside). The only exception raised is DecodeError; after one, every later ``feed()``
   raises again and the caller shows the rest of the connection as Raw (lesson 7).
2. HPACK state is sacred. Every header block is decoded, in order, by the decoder of its
   direction, even when its message is then dropped (after RST_STREAM, past the stream
   limit), because skipping one block shifts every later dynamic-table index. The
   decoder of direction X (what X's peer encoded) is validated against the
   SETTINGS_HEADER_TABLE_SIZE announced by the *receiver* of X (RFC 9113 6.5.2). Its
   actual table size changes only through the dynamic table size updates inside the
   header blocks (RFC 7541 4.2, 6.3), which hpack applies. We allow the largest size the
   receiver ever announced: when it lowers the setting, the sender may go on using the
   old size until it has seen the SETTINGS, and an observer cannot see that moment.
3. Frame sizes: a frame in direction X may be as large as the largest
   SETTINGS_MAX_FRAME_SIZE the receiver of X announced (default 16384, RFC 9113 4.2);
   larger is DecodeError. Joined mid-stream we never saw SETTINGS, so 2**24-1 applies.
4. Joined mid-stream (``joined_mid_stream=True``), without the preface:
   - Frame boundaries. We never scan the byte stream for something that looks like a
     frame header. Instead each feed() while unsynchronised is tried as a frame boundary:
     SSL_write/SSL_read buffers usually begin at one (servers and clients write whole
     frames). A feed is accepted when it starts with a plausible frame header (known
     type, no undefined flags, reserved bit clear, right stream association, the fixed
     length of fixed-size frames, not CONTINUATION) and every further frame header inside
     the same feed is plausible too. Rejected feeds are skipped and counted in a Note.
     This relies on feed() boundaries being the captured calls' boundaries.
   - Headers. The HPACK decoder starts with a large, empty dynamic table. Entries
     inserted after we joined occupy the same indices in our table and in the real one,
     so blocks that refer only to them (or to the static table) decode correctly. The
     first block that refers to an entry from before we joined fails; from then on the
     direction's state is unknown, we emit ``Note("headers undecodable: joined
     mid-stream")`` once and never guess again: messages of that direction have
     ``headers=()``; DATA, trailers' END_STREAM and other frames still come through.
   - A stream whose HEADERS we never saw still yields a Message (``headers=()``,
     ``complete=False``) from its DATA.
   If the client's first feed is the preface, the connection start was seen after all:
   HPACK errors raise again, and a direction that has sent nothing yet starts clean
   (SETTINGS first, default frame size).
   Feeding byte by byte cannot synchronise (each feed is shorter than a frame header);
   unlike rule 1, joined mode depends on where feed() calls split the bytes.
5. Bounds, each with a reason (lesson 8): MAX_HEADER_LIST_SIZE, MAX_HEADER_BLOCK,
   CONTINUATION_BACKLOG, MAX_TABLE_SIZE and MAX_OPEN_MESSAGES below. Bodies keep at most
   ``max_body`` bytes each (events.Message); ``body_len`` counts them all. A frame is
   buffered whole before it is parsed, so one direction holds at most one frame (at most
   the announced max frame size, 2**24-1 when joined) plus the bytes of the current feed.
6. WINDOW_UPDATE (and PING, PRIORITY...) floods: every frame is emitted by default (a
   loss is data); ``skip_frames={"WINDOW_UPDATE"}`` processes them silently.
7. Speed: frame headers are unpacked with one struct call; DATA payloads are memoryview
   slices copied once into the message body; nothing loops per byte in Python.
"""
from __future__ import annotations

import struct
from typing import Iterable

import hpack
from hyperframe import frame as _hf
from hyperframe.exceptions import HyperframeError

from .events import DecodeError, Event, Frame, Message, Note, Side
from .grpc import is_grpc, split_messages

try:  # Content-Encoding undo lives in encoding.py (another module; optional here)
    from .encoding import DEFAULT_MAX_DECODED, decode_content as _decode_content
except ImportError:  # pragma: no cover - only while encoding.py is missing
    _decode_content = None
    DEFAULT_MAX_DECODED = 16 << 20

__all__ = ["Http2Decoder", "PREFACE"]

#: The client connection preface (RFC 9113 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: SETTINGS_MAX_FRAME_SIZE default and the largest value allowed (RFC 9113 6.5.2).
DEFAULT_MAX_FRAME_SIZE = 1 << 14
MAX_FRAME_SIZE_LIMIT = (1 << 24) - 1

#: Largest decoded header list per header block (RFC 7541 4.1 size: name + value + 32 per
#: field). Go's net/http accepts 1 MiB (DefaultMaxHeaderBytes); hpack's own default of
#: 64 KiB is below what real servers accept, and exceeding the limit mid-block leaves the
#: HPACK state unusable, so it must not be lower than what endpoints actually exchange.
MAX_HEADER_LIST_SIZE = 1 << 20

#: Largest compressed header block (HEADERS/PUSH_PROMISE plus its CONTINUATIONs) we
#: collect before decoding it. Compressed is never much larger than decoded.
MAX_HEADER_BLOCK = MAX_HEADER_LIST_SIZE

#: Most CONTINUATION frames after one HEADERS or PUSH_PROMISE. From h2's
#: CONTINUATION_BACKLOG = 64 (h2/connection.py): more is the CONTINUATION flood of
#: CVE-2024-27316 and friends, not a real header block.
CONTINUATION_BACKLOG = 64

#: Largest HPACK dynamic table we keep per direction. Browsers announce 64 KiB
#: (SETTINGS_HEADER_TABLE_SIZE=65536), nghttp2 and Go 4 KiB; an endpoint that really uses
#: more than 1 MiB is a DecodeError rather than unbounded memory on the observed host.
MAX_TABLE_SIZE = 1 << 20

#: Most messages in progress at once (two per stream: request and response). Servers
#: allow 100 to 250 concurrent streams (h2o 100, nginx 128, Go 250), so 1024 streams leave
#: room; past it the oldest message is emitted incomplete with a Note, to bound memory.
MAX_OPEN_MESSAGES = 2048

#: How many ended (direction, stream) pairs we remember, so that DATA still in flight
#: after an END_STREAM or RST_STREAM is dropped instead of starting a headless message.
MAX_CLOSED_REMEMBERED = 4096

_HDR = struct.Struct(">HBBBL")
_U32 = struct.Struct(">L")

_DATA, _HEADERS, _PRIORITY, _RST, _SETTINGS, _PUSH, _PING, _GOAWAY, _WINDOW, _CONT = range(10)

FRAME_TYPES = {
    0x0: "DATA", 0x1: "HEADERS", 0x2: "PRIORITY", 0x3: "RST_STREAM", 0x4: "SETTINGS",
    0x5: "PUSH_PROMISE", 0x6: "PING", 0x7: "GOAWAY", 0x8: "WINDOW_UPDATE",
    0x9: "CONTINUATION", 0xA: "ALTSVC", 0xC: "ORIGIN", 0x10: "PRIORITY_UPDATE",
}

#: Error codes (RFC 9113 7).
ERROR_CODES = {
    0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT", 0x5: "STREAM_CLOSED", 0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM", 0x8: "CANCEL", 0x9: "COMPRESSION_ERROR", 0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM", 0xC: "INADEQUATE_SECURITY", 0xD: "HTTP_1_1_REQUIRED",
}

#: SETTINGS parameters (RFC 9113 6.5.2, RFC 8441, RFC 9218).
SETTINGS_NAMES = {
    0x1: "HEADER_TABLE_SIZE", 0x2: "ENABLE_PUSH", 0x3: "MAX_CONCURRENT_STREAMS",
    0x4: "INITIAL_WINDOW_SIZE", 0x5: "MAX_FRAME_SIZE", 0x6: "MAX_HEADER_LIST_SIZE",
    0x8: "ENABLE_CONNECT_PROTOCOL", 0x9: "NO_RFC7540_PRIORITIES",
}

# Defined flag bits per frame type, stream association (True: needs a stream, False:
# stream 0, None: either) and fixed payload length, for the joined-mid-stream check.
_FLAGS = {0: 0x09, 1: 0x2D, 2: 0, 3: 0, 4: 0x01, 5: 0x0C, 6: 0x01, 7: 0, 8: 0, 9: 0x04}
_ON_STREAM = {0: True, 1: True, 2: True, 3: True, 4: False, 5: True, 6: False, 7: False,
              8: None, 9: True}
_FIXED_LEN = {2: 5, 3: 4, 6: 8, 8: 4}

_PSEUDO = frozenset((":method", ":path", ":authority", ":scheme", ":status"))

_PREFACE_LEN = len(PREFACE)
_UNSYNCED, _PREFACE, _FRAMES = "unsynced", "preface", "frames"


def _other(side: Side) -> Side:
    return Side.SERVER if side is Side.CLIENT else Side.CLIENT


def _type_name(typ: int) -> str:
    return FRAME_TYPES.get(typ) or f"0x{typ:02x}"


def _plausible(mv: memoryview) -> bool:
    """Whether ``mv`` (one feed) starts at a frame boundary; see rule 4."""
    n, pos, first = len(mv), 0, True
    if n < 9:
        return False
    while n - pos >= 9:
        hi, lo, typ, flags, sid = _HDR.unpack_from(mv, pos)
        length = hi << 8 | lo
        if sid & 0x80000000:
            return False
        if typ > 9:
            if first:
                return False
        else:
            if first and typ == _CONT:
                return False
            if flags & ~_FLAGS[typ]:
                return False
            on = _ON_STREAM[typ]
            if on is not None and on != (sid != 0):
                return False
            fixed = _FIXED_LEN.get(typ)
            if fixed is not None and length != fixed:
                return False
            if typ == _SETTINGS and (length % 6 or (flags & 1 and length)):
                return False
        pos += 9 + length
        first = False
    return True


class _Dir:
    """One direction: the bytes one side sends."""
    __slots__ = ("side", "state", "buf", "buf_ts", "need", "expect_settings", "hpack",
                 "hpack_ok", "max_frame", "block", "skipped", "frames", "blocks")

    def __init__(self, side: Side, joined: bool):
        self.side = side
        self.state = _UNSYNCED if joined else (_PREFACE if side is Side.CLIENT else _FRAMES)
        self.buf = bytearray()          # start of an incomplete frame (or of the preface)
        self.buf_ts = 0                 # when its first byte arrived
        self.need = 0                   # bytes buf must hold before anything can be parsed
        self.expect_settings = not joined   # RFC 9113 3.4: the first frame is SETTINGS
        self.hpack = _new_hpack(joined)
        self.hpack_ok = True            # False: header blocks of this direction undecodable
        self.max_frame = MAX_FRAME_SIZE_LIMIT if joined else DEFAULT_MAX_FRAME_SIZE
        self.block: _Block | None = None    # header block waiting for CONTINUATION
        self.skipped = 0                # bytes dropped while looking for a frame boundary
        self.frames = 0
        self.blocks = 0


def _new_hpack(joined: bool) -> hpack.Decoder:
    dec = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST_SIZE)
    if joined:
        # A table larger than the sender's keeps entries the sender has evicted; they sit
        # past the end of the sender's table, where it never refers. Too small would be
        # wrong: we would evict entries the sender still uses (rule 4).
        dec.max_allowed_table_size = MAX_TABLE_SIZE
        dec.header_table_size = MAX_TABLE_SIZE
    return dec


class _Block:
    """A header block being collected: HEADERS or PUSH_PROMISE plus CONTINUATIONs."""
    __slots__ = ("typ", "sid", "end_stream", "promised", "parts", "size", "frames", "ts")

    def __init__(self, typ: int, sid: int, end_stream: bool, promised: int, first: bytes,
                 ts: int):
        self.typ, self.sid, self.end_stream, self.promised = typ, sid, end_stream, promised
        self.parts = [first]
        self.size = len(first)
        self.frames = 1
        self.ts = ts


class _Msg:
    """A request or response being assembled on one stream."""
    __slots__ = ("side", "sid", "pseudo", "headers", "trailers", "chunks", "kept",
                 "body_len", "started", "ts_start", "ts_end")

    def __init__(self, side: Side, sid: int, ts: int):
        self.side, self.sid = side, sid
        self.pseudo: dict[str, str] = {}
        self.headers: tuple[tuple[str, str], ...] = ()
        self.trailers: tuple[tuple[str, str], ...] = ()
        self.chunks: list[bytes] = []
        self.kept = 0
        self.body_len = 0
        self.started = False            # True: we saw its first HEADERS
        self.ts_start = self.ts_end = ts


class Http2Decoder:
    """Decode one HTTP/2 connection, both directions, as a passive observer.

    :param max_body: keep at most this many bytes of each message body (None: all).
    :param joined_mid_stream: the capture did not start at the connection's start (rule 4
        of the module docstring): no preface or initial SETTINGS is required, frame
        boundaries are taken from feed() boundaries, and header blocks that refer to
        HPACK state from before we joined make that direction's headers undecodable
        instead of raising.
    :param skip_frames: names of frame types (``"WINDOW_UPDATE"``, ``"PING"``,
        ``"PRIORITY"``, ...) still processed but not emitted as Frame events; for
        connections whose flow-control chatter would drown the messages. Default: emit all.

    Emits Message (per request, response, 1xx response; trailers included), Frame (SETTINGS,
    PING, GOAWAY, RST_STREAM, WINDOW_UPDATE, PRIORITY, PUSH_PROMISE, ALTSVC, unknown
    types) and Note. Raises only DecodeError.
    """

    def __init__(self, max_body: int | None = None, joined_mid_stream: bool = False,
                 skip_frames: Iterable[str] = ()):
        if max_body is not None and max_body < 0:
            raise ValueError("max_body must be >= 0 or None")
        self.max_body = max_body
        self.joined_mid_stream = joined_mid_stream
        self.skip_frames = frozenset(skip_frames)
        unknown = self.skip_frames - set(FRAME_TYPES.values())
        if unknown:
            raise ValueError(f"unknown frame types in skip_frames: {sorted(unknown)}")
        self._clean = not joined_mid_stream     # saw the connection start
        self._dirs = {s: _Dir(s, joined_mid_stream) for s in Side}
        self._msgs: dict[tuple[Side, int], _Msg] = {}
        self._closed: dict[tuple[Side, int], None] = {}
        self._failed: str | None = None
        self._last_ts = 0

    # -- public -----------------------------------------------------------------------

    def feed(self, side: Side, data: bytes, ts_ns: int) -> list[Event]:
        """Decode the next bytes ``side`` sent (any split); return the events they complete.

        Raises DecodeError when the bytes are not HTTP/2 (and on every call after that)."""
        if self._failed is not None:
            raise DecodeError(f"HTTP/2 decoder stopped earlier: {self._failed}")
        self._last_ts = ts_ns
        if type(data) is not bytes:
            data = bytes(data)
        try:
            return self._feed(self._dirs[side], data, ts_ns)
        except DecodeError as e:
            self._failed = str(e)
            raise
        except Exception as e:  # a bug here must not take the pipeline down (lesson 7)
            self._failed = f"internal error: {type(e).__name__}: {e}"
            raise DecodeError(self._failed) from e

    def close(self) -> list[Event]:
        """End of capture: emit messages still in progress with ``complete=False`` and Notes
        for bytes left undecoded. Later feed() calls raise DecodeError."""
        if self._failed is not None:
            return []
        self._failed = "closed"
        ev: list[Event] = []
        ts = self._last_ts
        for d in self._dirs.values():
            if d.state == _UNSYNCED and d.skipped:
                ev.append(Note(d.side, f"joined mid-stream: skipped {d.skipped} bytes, "
                                       "no frame boundary found", ts))
            if d.block is not None:
                ev.append(Note(d.side, "capture ended inside a header block on stream "
                                       f"{d.block.sid}", ts))
            if d.buf:
                what = "the preface" if d.state == _PREFACE else "a frame"
                ev.append(Note(d.side, f"capture ended inside {what}: {len(d.buf)} bytes "
                                       "not decoded", ts))
        for m in list(self._msgs.values()):
            self._finish(m, False, ev)
        return ev

    # -- bytes to frames --------------------------------------------------------------

    def _feed(self, d: _Dir, data: bytes, ts: int) -> list[Event]:
        ev: list[Event] = []
        if not data:
            return ev
        if d.state == _UNSYNCED:
            data = self._sync(d, data, ts, ev)
            if not data:
                return ev
        first_ts = ts
        if d.buf:
            d.buf += data
            if len(d.buf) < d.need:
                return ev
            data, first_ts = bytes(d.buf), d.buf_ts
            d.buf = bytearray()
        if d.state == _PREFACE:
            if len(data) < _PREFACE_LEN:
                if not PREFACE.startswith(data):
                    raise DecodeError("client did not send the HTTP/2 connection preface")
                d.buf, d.buf_ts, d.need = bytearray(data), first_ts, _PREFACE_LEN
                return ev
            if not data.startswith(PREFACE):
                raise DecodeError("client did not send the HTTP/2 connection preface")
            data = data[_PREFACE_LEN:]
            d.state = _FRAMES
        mv = memoryview(data)
        pos = self._frames(d, mv, first_ts, ts, ev)
        if pos < len(data):
            d.buf = bytearray(mv[pos:])
            d.buf_ts = first_ts if pos == 0 else ts
            d.need = 9
            if len(d.buf) >= 9:
                d.need = 9 + self._frame_len(d, d.buf)
        return ev

    def _sync(self, d: _Dir, data: bytes, ts: int, ev: list[Event]) -> bytes:
        """Joined mid-stream, not yet at a frame boundary: accept or skip this feed."""
        if d.side is Side.CLIENT and (data.startswith(PREFACE)
                                      or (len(data) < _PREFACE_LEN and PREFACE.startswith(data))):
            self._saw_start()
            d.state = _PREFACE      # _feed checks and strips it
            d.expect_settings = True
            return data
        if _plausible(memoryview(data)):
            d.state = _FRAMES
            if d.skipped:
                ev.append(Note(d.side, f"joined mid-stream: skipped {d.skipped} bytes to the "
                                       "first frame boundary", ts))
            return data
        d.skipped += len(data)
        return b""

    def _saw_start(self) -> None:
        """The client preface arrived although we were told we joined mid-stream."""
        self._clean = True
        for d in self._dirs.values():
            if d.blocks == 0:
                d.hpack = _new_hpack(False)
            if d.frames == 0 and not d.skipped:
                d.max_frame = DEFAULT_MAX_FRAME_SIZE
                if d.state == _UNSYNCED:        # the server has sent nothing yet
                    d.state = _FRAMES
                    d.expect_settings = True

    def _frame_len(self, d: _Dir, header) -> int:
        hi, lo = _HDR.unpack_from(header, 0)[:2]
        length = hi << 8 | lo
        if length > d.max_frame:
            raise DecodeError(f"{d.side.value} frame of {length} bytes exceeds "
                              f"SETTINGS_MAX_FRAME_SIZE {d.max_frame}")
        return length

    def _frames(self, d: _Dir, mv: memoryview, first_ts: int, ts: int,
                ev: list[Event]) -> int:
        """Handle every whole frame in ``mv``; return the bytes consumed."""
        pos, n, fts = 0, len(mv), first_ts
        unpack = _HDR.unpack_from
        while n - pos >= 9:
            hi, lo, typ, flags, sid = unpack(mv, pos)
            length = hi << 8 | lo
            if length > d.max_frame:
                raise DecodeError(f"{d.side.value} frame of {length} bytes exceeds "
                                  f"SETTINGS_MAX_FRAME_SIZE {d.max_frame}")
            end = pos + 9 + length
            if end > n:
                break
            sid &= 0x7FFFFFFF       # reserved bit: ignored on receipt (RFC 9113 4.1)
            d.frames += 1
            if d.expect_settings:
                if typ != _SETTINGS or flags & 1:
                    raise DecodeError(f"{d.side.value}'s first frame is {_type_name(typ)}, "
                                      "not SETTINGS (RFC 9113 3.4)")
                d.expect_settings = False
            if d.block is not None:
                self._continuation(d, typ, flags, sid, mv[pos + 9:end], ts, ev)
            elif typ == _DATA:
                self._data(d, flags, sid, mv[pos + 9:end], fts, ts, ev)
            elif typ == _HEADERS or typ == _PUSH:
                self._headers(d, typ, flags, sid, mv[pos + 9:end], fts, ts, ev)
            elif typ == _CONT:
                if self._clean:
                    raise DecodeError(f"CONTINUATION on stream {sid} without HEADERS")
                self._lose_hpack(d, ts, ev)     # a block fragment we cannot apply
            else:
                self._control(d, typ, flags, sid, mv[pos + 9:end], fts, ev)
            pos, fts = end, ts
        return pos

    # -- frames -----------------------------------------------------------------------

    def _data(self, d: _Dir, flags: int, sid: int, body: memoryview, fts: int, ts: int,
              ev: list[Event]) -> None:
        if sid == 0:
            raise DecodeError("DATA frame on stream 0")
        if flags & 0x08:            # PADDED (RFC 9113 6.1)
            n = len(body)
            if n == 0 or body[0] >= n:
                raise DecodeError(f"DATA on stream {sid}: padding longer than the frame")
            body = body[1:n - body[0]]
        key = (d.side, sid)
        m = self._msgs.get(key)
        if m is None:
            if key in self._closed:     # in flight when the stream ended or was reset
                return
            m = self._open(d.side, sid, fts, ev)
        n = len(body)
        if n:
            m.body_len += n
            if self.max_body is None:
                m.chunks.append(bytes(body))
            elif m.kept < self.max_body:
                piece = bytes(body[:self.max_body - m.kept])
                m.chunks.append(piece)
                m.kept += len(piece)
        m.ts_end = ts
        if flags & 0x01:            # END_STREAM
            self._finish(m, True, ev)

    def _headers(self, d: _Dir, typ: int, flags: int, sid: int, body: memoryview, fts: int,
                 ts: int, ev: list[Event]) -> None:
        f = _parse(typ, flags, sid, body)
        promised = f.promised_stream_id if typ == _PUSH else 0
        end_stream = typ == _HEADERS and bool(flags & 0x01)
        if len(f.data) > MAX_HEADER_BLOCK:
            raise DecodeError(f"header block on stream {sid} over {MAX_HEADER_BLOCK} bytes")
        if flags & 0x04:            # END_HEADERS
            self._block_done(d, typ, sid, end_stream, promised, f.data, fts, ts, ev)
        else:
            d.block = _Block(typ, sid, end_stream, promised, f.data, fts)

    def _continuation(self, d: _Dir, typ: int, flags: int, sid: int, body: memoryview,
                      ts: int, ev: list[Event]) -> None:
        blk = d.block
        assert blk is not None
        if typ != _CONT or sid != blk.sid:
            raise DecodeError(f"{_type_name(typ)} on stream {sid} inside the header block of "
                              f"stream {blk.sid} (RFC 9113 6.10)")
        blk.frames += 1
        blk.size += len(body)
        if blk.frames > CONTINUATION_BACKLOG + 1:
            raise DecodeError(f"header block on stream {sid}: more than "
                              f"{CONTINUATION_BACKLOG} CONTINUATION frames")
        if blk.size > MAX_HEADER_BLOCK:
            raise DecodeError(f"header block on stream {sid} over {MAX_HEADER_BLOCK} bytes")
        blk.parts.append(bytes(body))
        if flags & 0x04:
            d.block = None
            self._block_done(d, blk.typ, sid, blk.end_stream, blk.promised,
                             b"".join(blk.parts), blk.ts, ts, ev)

    def _block_done(self, d: _Dir, typ: int, sid: int, end_stream: bool, promised: int,
                    block: bytes, fts: int, ts: int, ev: list[Event]) -> None:
        hdrs = self._decode_block(d, block, ts, ev)
        side = d.side
        if typ == _PUSH:
            info: tuple[tuple[str, str], ...] = (("promised_stream_id", str(promised)),)
            info += tuple(hdrs) if hdrs is not None else (("headers", "undecodable"),)
            self._emit(ev, Frame(side, "HTTP/2", "PUSH_PROMISE", sid, (), info, b"", fts))
            return
        key = (side, sid)
        m = self._msgs.get(key)
        if m is None:
            if key in self._closed:     # decoded above for the HPACK state; now dropped
                return
            pseudo, regular = _split(hdrs) if hdrs is not None else ({}, ())
            if side is Side.SERVER and not end_stream:
                status = _status(pseudo.get(":status"))
                if status is not None and 100 <= status < 200:
                    ev.append(Message(side, "HTTP/2", sid, regular, status=status,
                                      ts_start_ns=fts, ts_end_ns=ts))
                    return
            m = self._open(side, sid, fts, ev)
            m.started = True
            m.pseudo, m.headers = pseudo, regular
        else:                       # a second HEADERS: trailers (RFC 9113 8.1)
            m.trailers = tuple(hdrs) if hdrs is not None else ()
        m.ts_end = ts
        if end_stream:
            self._finish(m, True, ev)

    def _control(self, d: _Dir, typ: int, flags: int, sid: int, body: memoryview, fts: int,
                 ev: list[Event]) -> None:
        side = d.side
        name = _type_name(typ)
        fl: tuple[str, ...] = ()
        payload = b""
        if typ == _WINDOW:
            # Parsed here: hyperframe rejects increment 0, which RFC 9113 6.9 makes a
            # stream error, not a reason to stop decoding the connection.
            if len(body) != 4:
                raise DecodeError(f"WINDOW_UPDATE of {len(body)} bytes, not 4")
            info: tuple[tuple[str, str], ...] = (
                ("increment", str(_U32.unpack(body)[0] & 0x7FFFFFFF)),)
        elif typ == _SETTINGS:
            f = _parse(typ, flags, sid, body)
            if flags & 0x01:
                fl = ("ACK",)
            self._settings(d, f.settings)
            info = tuple((SETTINGS_NAMES.get(k) or f"0x{k:x}", str(v))
                         for k, v in f.settings.items())
        elif typ == _PING:
            f = _parse(typ, flags, sid, body)
            fl = ("ACK",) if flags & 0x01 else ()
            payload = f.opaque_data
            info = (("opaque_data", payload.hex()),)
        elif typ == _GOAWAY:
            f = _parse(typ, flags, sid, body)
            payload = f.additional_data
            info = (("last_stream_id", str(f.last_stream_id & 0x7FFFFFFF)),
                    ("error_code", _error_name(f.error_code)))
            if payload:
                info += (("debug_data", payload.decode("utf-8", "backslashreplace")),)
        elif typ == _RST:
            f = _parse(typ, flags, sid, body)
            info = (("error_code", _error_name(f.error_code)),)
            self._emit(ev, Frame(side, "HTTP/2", name, sid, fl, info, payload, fts))
            for s in Side:
                m = self._msgs.get((s, sid))
                if m is not None:
                    self._finish(m, False, ev)
                self._mark_closed((s, sid))
            return
        elif typ == _PRIORITY:
            f = _parse(typ, flags, sid, body)
            info = (("depends_on", str(f.depends_on)), ("weight", str(f.stream_weight + 1)),
                    ("exclusive", str(f.exclusive).lower()))
        elif typ == 0xA:            # ALTSVC (RFC 7838)
            f = _parse(typ, flags, sid, body)
            info = (("origin", f.origin.decode("latin-1")),
                    ("field", f.field.decode("latin-1")))
        else:                       # extension frames are ignored by endpoints (RFC 9113 5.5)
            payload = bytes(body)
            info = (("flags", f"0x{flags:02x}"),) if flags else ()
        self._emit(ev, Frame(side, "HTTP/2", name, sid, fl, info, payload, fts))

    def _settings(self, d: _Dir, settings: dict[int, int]) -> None:
        """Settings announced by d.side constrain the *other* direction (what d.side
        receives): its encoder's table size and its frame size (RFC 9113 6.5.2)."""
        other = self._dirs[_other(d.side)]
        for k, v in settings.items():
            if k == 0x1:
                allowed = max(other.hpack.max_allowed_table_size, min(v, MAX_TABLE_SIZE))
                other.hpack.max_allowed_table_size = allowed
            elif k == 0x5:
                if not DEFAULT_MAX_FRAME_SIZE <= v <= MAX_FRAME_SIZE_LIMIT:
                    raise DecodeError(f"SETTINGS_MAX_FRAME_SIZE {v} out of range "
                                      "(RFC 9113 6.5.2)")
                other.max_frame = max(other.max_frame, v)

    def _emit(self, ev: list[Event], fr: Frame) -> None:
        if fr.type not in self.skip_frames:
            ev.append(fr)

    # -- headers ----------------------------------------------------------------------

    def _decode_block(self, d: _Dir, block: bytes, ts: int,
                      ev: list[Event]) -> list[tuple[str, str]] | None:
        """Decode one whole header block; None when this direction's HPACK state is lost."""
        d.blocks += 1
        if not d.hpack_ok:
            return None
        try:
            raw = d.hpack.decode(block, raw=True)
        except Exception as e:      # hpack raises several types, some not its own
            if self._clean:
                raise DecodeError(f"{d.side.value} header block: HPACK: {e}") from None
            self._lose_hpack(d, ts, ev)
            return None
        return [(n.decode("latin-1"), v.decode("utf-8", "backslashreplace")) for n, v in raw]

    def _lose_hpack(self, d: _Dir, ts: int, ev: list[Event]) -> None:
        if d.hpack_ok:
            d.hpack_ok = False
            ev.append(Note(d.side, "headers undecodable: joined mid-stream", ts))

    # -- messages ---------------------------------------------------------------------

    def _open(self, side: Side, sid: int, ts: int, ev: list[Event]) -> _Msg:
        if len(self._msgs) >= MAX_OPEN_MESSAGES:
            old = next(iter(self._msgs.values()))
            ev.append(Note(old.side, f"stream {old.sid}: more than {MAX_OPEN_MESSAGES} "
                                     "messages in progress; emitted incomplete", ts))
            self._finish(old, False, ev)
        m = self._msgs[(side, sid)] = _Msg(side, sid, ts)
        return m

    def _mark_closed(self, key: tuple[Side, int]) -> None:
        self._closed[key] = None
        if len(self._closed) > MAX_CLOSED_REMEMBERED:
            del self._closed[next(iter(self._closed))]

    def _finish(self, m: _Msg, complete: bool, ev: list[Event]) -> None:
        key = (m.side, m.sid)
        del self._msgs[key]
        self._mark_closed(key)
        chunks = m.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        truncated = m.body_len > len(body)
        decoded = error = None
        grpc = ()
        ce = ct = None
        for k, v in m.headers:
            if k == "content-encoding":
                ce = v
            elif k == "content-type":
                ct = v
        if ce and body and _decode_content is not None:
            decoded, error = _decode_content(body, ce, DEFAULT_MAX_DECODED)
        if is_grpc(ct):
            grpc, problem = split_messages(body, truncated or not complete)
            if problem:
                ev.append(Note(m.side, f"stream {m.sid}: gRPC body: {problem}", m.ts_end))
        p = m.pseudo
        ev.append(Message(
            m.side, "HTTP/2", m.sid, m.headers,
            method=p.get(":method"), target=p.get(":path"), authority=p.get(":authority"),
            scheme=p.get(":scheme"), status=_status(p.get(":status")),
            body=body, body_len=m.body_len, body_truncated=truncated,
            decoded_body=decoded, decode_error=error, trailers=m.trailers,
            complete=complete and m.started, ts_start_ns=m.ts_start, ts_end_ns=m.ts_end,
            grpc=grpc))


def _parse(typ: int, flags: int, sid: int, body: memoryview):
    """Parse a frame body with hyperframe; its errors become DecodeError."""
    try:
        f = _hf.FRAMES[typ](sid)
        f.parse_flags(flags)
        f.parse_body(body)
    except (HyperframeError, struct.error, ValueError) as e:
        raise DecodeError(f"bad {_type_name(typ)} frame on stream {sid}: {e}") from None
    return f


def _split(hdrs: list[tuple[str, str]]) -> tuple[dict[str, str], tuple[tuple[str, str], ...]]:
    """Pseudo-headers we map to Message fields, and the rest in order (unknown
    pseudo-headers such as RFC 8441's :protocol stay with the rest)."""
    pseudo: dict[str, str] = {}
    regular = []
    for h in hdrs:
        if h[0] in _PSEUDO:
            pseudo[h[0]] = h[1]
        else:
            regular.append(h)
    return pseudo, tuple(regular)


def _status(v: str | None) -> int | None:
    if v is not None and len(v) == 3 and v.isascii() and v.isdigit():
        return int(v)
    return None


def _error_name(code: int) -> str:
    return ERROR_CODES.get(code) or f"0x{code:x}"
