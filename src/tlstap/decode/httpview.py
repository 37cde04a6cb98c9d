"""Captured SSL calls -> ordered per-connection byte streams -> HTTP exchanges for the outputs.

Order: records of different CPUs reach us interleaved, so calls wait in a heap for `lag_ns`
and leave in kernel-timestamp order; tick() releases them on a timer too (eCapture only
flushes when a newer event arrives, so the last exchange of a quiet connection hangs).

Decoding: one _Conn per connection, (pid, SSL*, generation): an SSL* freed and reused for
another connection comes with a new generation from the kernel (tlstap.h: conn_id), and the
old connection's decoder is finished then, so the new one starts clean. The first bytes say which side the captured process
is on and which protocol it speaks: the HTTP/2 client preface or a request line name the
client's direction, a status line the server's (then the capture joined mid-stream). Anything
else, a DecodeError, or a gap in the captured bytes (a call over --max-payload, a lost
record) turns the connection to raw: its calls go to the sink as they are, after a Note.
Messages are paired into Exchanges: per stream for HTTP/2, first-in first-out for HTTP/1.x
(pipelining keeps order; 1xx responses are interim and do not take the request).
"""
from __future__ import annotations

import heapq
import itertools
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

from ..abi import Direction
from .events import DecodeError, Exchange, Frame, Message, Note, Raw, Side
from .http1 import Http1Decoder
from .http2 import PREFACE as H2_PREFACE, Http2Decoder
from ..events import Conn, TlsData

_REQUEST_LINE = re.compile(rb"[A-Z][A-Z-]{1,19} \S+ HTTP/1\.[01]\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] \d{3}[ \r\n]")
#: bytes we wait for before deciding what a connection speaks (a request line longer than
#: this without its newline is not sniffed as HTTP)
SNIFF_MAX = 8192
#: connections whose decoder state we keep; the least recently used is closed beyond this
MAX_CONNS = 4096
DEFAULT_LAG_NS = 100_000_000


def _h2_settings(head: bytes) -> bool:
    """A SETTINGS frame header on stream 0: what an HTTP/2 server writes first."""
    return (len(head) >= 9 and head[3] == 4 and head[5:9] == b"\0\0\0\0"
            and int.from_bytes(head[:3], "big") % 6 == 0)


@dataclass(slots=True)
class ConnMeta:
    """Who and where, for an exchange or frame: the captured process's view."""
    pid: int
    tid: int
    uid: int
    comm: str
    fd: int
    conn: Conn | None
    ssl: int
    side: Side | None          # which end of the protocol the captured process is (its writes' side)
    conn_id: int = 0           # the connection's generation: with pid and ssl, one connection

    @classmethod
    def of(cls, d: TlsData, side: Side | None) -> "ConnMeta":
        return cls(d.pid, d.tid, d.uid, d.comm, d.fd, d.conn, d.ssl, side, d.conn_id)


class _Conn:
    __slots__ = ("decoder", "sides", "raw", "sniff", "last", "waiting")

    def __init__(self):
        self.decoder = None       # Http1Decoder | Http2Decoder
        self.sides: dict[Direction, Side] = {}
        self.raw = False          # not (or no longer) decodable: pass calls through
        self.sniff: list[TlsData] = []
        self.last: TlsData | None = None          # the latest call: who and where, for meta
        # request awaiting its response, by stream: the HTTP/2 stream id, or for HTTP/1 the
        # request's number, which the decoder also gives the response answering it
        self.waiting: dict[int, Message] = {}


def _meta(c: _Conn) -> ConnMeta | None:
    """Built only when something is emitted, not per call: most calls emit nothing."""
    return ConnMeta.of(c.last, c.sides.get(Direction.WRITE)) if c.last is not None else None


class HttpView:
    """A Sink-shaped front (on_data, on_lost, on_summary, flush, close) over `sink`, which
    must have on_data (raw calls), on_exchange, on_frame and on_note."""

    def __init__(self, sink, lag_ns: int = DEFAULT_LAG_NS, max_body: int | None = None,
                 skip_frames=("WINDOW_UPDATE", "PING", "PRIORITY")):
        self.sink = sink
        self.lag_ns = lag_ns
        self.max_body = max_body
        self.skip_frames = frozenset(skip_frames)
        self._heap: list = []
        self._seq = itertools.count()
        self._conns: OrderedDict[tuple[int, int, int], _Conn] = OrderedDict()
        #: (pid, SSL*) -> the newest generation seen on it; older ones are finished
        self._gen: dict[tuple[int, int], int] = {}
        self.out = sink.out

    # ---- ordering ----------------------------------------------------------------------

    def on_data(self, d: TlsData) -> None:
        heapq.heappush(self._heap, (d.ts_ns, next(self._seq), d))
        if self.lag_ns <= 0:
            self.tick(all_=True)

    def tick(self, now_ns: int | None = None, all_: bool = False) -> None:
        """Release calls older than the lag (all of them with all_)."""
        limit = None if all_ else (now_ns if now_ns is not None else time.time_ns()) - self.lag_ns
        heap = self._heap
        while heap and (limit is None or heap[0][0] <= limit):
            self._decode(heapq.heappop(heap)[2])

    # ---- decoding ----------------------------------------------------------------------

    def _conn(self, d: TlsData) -> _Conn | None:
        """d's connection state; None for a call of a connection already finished (a straggler
        that reached us after the lag, behind a call of the SSL*'s next connection)."""
        key = (d.pid, d.ssl, d.conn_id)
        c = self._conns.get(key)
        if c is not None:
            self._conns.move_to_end(key)
            return c
        ssl = key[:2]
        newest = self._gen.get(ssl)
        if newest is not None and newest != d.conn_id:
            if d.conn_id < newest:      # generations are kernel times: this one is older
                return None
            old = self._conns.pop((*ssl, newest), None)   # the SSL* serves another connection now
            if old is not None:
                self._finish(old)
        self._gen[ssl] = d.conn_id
        c = self._conns[key] = _Conn()
        if len(self._conns) > MAX_CONNS:
            (pid, addr, gen), old = self._conns.popitem(last=False)
            if self._gen.get((pid, addr)) == gen:
                del self._gen[(pid, addr)]
            self._finish(old)
        return c

    def _decode(self, d: TlsData) -> None:
        c = self._conn(d)
        if c is None or c.raw:
            self.sink.on_data(d)
            return
        if c.decoder is None:
            c.sniff.append(d)
            if not self._start(c):
                return
            calls, c.sniff = c.sniff, []
        else:
            calls = [d]
        for call in calls:
            c.last = call
            if c.raw:
                self.sink.on_data(call)
                continue
            if call.truncated or call.lost:
                self._to_raw(c, call, f"undecodable from here: {call.truncated + call.lost} bytes of this "
                                      f"call were not captured")
                continue
            try:
                events = c.decoder.feed(c.sides[call.direction], call.data, call.ts_ns)
            except DecodeError as e:
                self._to_raw(c, call, f"undecodable: {e}")
                continue
            self._emit(c, events)

    def _start(self, c: _Conn) -> bool:
        """Pick the protocol and sides from the first bytes of either direction (an HTTP/2
        server may write its SETTINGS before it reads the client's preface); False: wait."""
        heads = {d: b"".join(x.data for x in c.sniff if x.direction == d)[:SNIFF_MAX]
                 for d in (Direction.READ, Direction.WRITE)}
        client = server = decoder = None
        maybe = False
        for d, head in heads.items():
            if head.startswith(H2_PREFACE):
                client, decoder = d, Http2Decoder(max_body=self.max_body, skip_frames=self.skip_frames)
            elif _REQUEST_LINE.match(head):
                client, decoder = d, Http1Decoder(max_body=self.max_body)
            elif _STATUS_LINE.match(head):
                server, decoder = d, Http1Decoder(max_body=self.max_body, joined_mid_stream=True)
            elif head and (H2_PREFACE.startswith(head) or _h2_settings(head) or
                           (b"\n" not in head and re.match(rb"[A-Z][A-Z-]{0,19}( |$)|HTTP(/|$)", head))):
                maybe = True
            if decoder is not None:
                break
        if decoder is None:
            if maybe and sum(len(h) for h in heads.values()) < SNIFF_MAX and len(c.sniff) < 16:
                return False
            for call in c.sniff:
                c.last = call
                self._to_raw(c, call, None)
            c.sniff = []
            return False
        c.decoder = decoder
        other = {Direction.READ: Direction.WRITE, Direction.WRITE: Direction.READ}
        if client is not None:
            c.sides = {client: Side.CLIENT, other[client]: Side.SERVER}
        else:
            c.sides = {server: Side.SERVER, other[server]: Side.CLIENT}
        return True

    def _to_raw(self, c: _Conn, call: TlsData, why: str | None) -> None:
        if not c.raw and why:
            if c.decoder is not None:
                try:
                    self._emit(c, c.decoder.close())
                except DecodeError:
                    pass
            meta = _meta(c)
            self.sink.on_note(meta, Note(meta.side if meta else None, why, call.ts_ns))
        c.raw = True
        self.sink.on_data(call)

    def _emit(self, c: _Conn, events) -> None:
        sink = self.sink
        for ev in events:
            if type(ev) is Message:                  # most events: the meta is built on output
                self._pair(c, ev)
            elif isinstance(ev, Frame):
                sink.on_frame(_meta(c), ev)
            elif isinstance(ev, Note):
                sink.on_note(_meta(c), ev)
            elif isinstance(ev, Raw):
                sink.on_note(_meta(c), Note(ev.side, f"{len(ev.data)} bytes not decoded", ev.ts_ns))

    def _pair(self, c: _Conn, m: Message) -> None:
        if m.side is Side.CLIENT:
            c.waiting[m.stream_id] = m
            if len(c.waiting) > 4096:            # the decoders bound this too; belt and braces
                self.sink.on_exchange(_meta(c), Exchange(c.waiting.pop(next(iter(c.waiting))), None, None))
            return
        if m.status is not None and 100 <= m.status < 200 and m.status != 101:
            # interim (100 Continue, 103): shown with its request, which stays open
            self.sink.on_exchange(_meta(c), Exchange(c.waiting.get(m.stream_id), m, None))
            return
        req = c.waiting.pop(m.stream_id, None)
        latency = m.ts_start_ns - req.ts_end_ns if req is not None and m.ts_start_ns else None
        self.sink.on_exchange(_meta(c), Exchange(req, m, latency))

    def _finish(self, c: _Conn) -> None:
        if c.decoder is not None and not c.raw:
            try:
                self._emit(c, c.decoder.close())
            except DecodeError:
                pass
        for req in c.waiting.values():
            self.sink.on_exchange(_meta(c), Exchange(req, None, None))
        c.waiting.clear()
        for call in c.sniff:
            self.sink.on_data(call)
        c.sniff = []

    # ---- the Sink interface ------------------------------------------------------------

    def on_lost(self, ev) -> None:
        self.sink.on_lost(ev)

    def on_summary(self, counters, line) -> None:
        self.finish()
        self.sink.on_summary(counters, line)

    def flush(self) -> None:
        self.tick()
        self.sink.flush()

    def finish(self) -> None:
        """End of capture: everything still held is decoded; unanswered requests come out."""
        self.tick(all_=True)
        for c in self._conns.values():
            self._finish(c)
        self._conns.clear()
        self._gen.clear()

    def close(self) -> None:
        self.finish()
        self.sink.close()
