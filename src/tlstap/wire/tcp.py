"""TCP segments from captured IP packets, and the in-order byte stream of each direction.

Sans-IO and per packet: `parse_segment` turns the bytes from an IPv4 or IPv6 header on into a
`Segment`; a `TcpStream` per direction turns segments into stream bytes and `Gap`s where the capture
lost some. Written here because no well-kept Python library takes raw segments and reports what was
lost: dpkt parses but does not reassemble, scapy reassembles inside its sniff/pcap sessions and fills
holes with zeros (StringBuffer) without saying where.

Sequence numbers are 32-bit and wrap (RFC 9293 §3.4): a segment is placed by its signed distance
from the next sequence number wanted, and everything after that is a stream offset, a Python int
that does not wrap.
"""
from __future__ import annotations

import socket
import struct
from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import NamedTuple

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10

_MASK = 0xFFFFFFFF
_HALF = 1 << 31
#: a segment further ahead than this is not in any window (RFC 7323 §2.3 caps it at 2**30): ignored
_MAX_AHEAD = 1 << 30
_TCP_PROTO = 6
_NOT_PLAIN = FIN | SYN | RST               # flags the fast path leaves to TcpStream._add
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
#: IPv6 extension headers skipped to reach TCP: hop-by-hop, routing, destination options
_IPV6_SKIP = frozenset((0, 43, 60))

_V4 = struct.Struct("!BxHxxHxB2x4s4s")     # version/IHL, total length, flags/fragment, protocol, addrs
_V6 = struct.Struct("!4xHBx16s16s")        # payload length, next header, addrs
_TCP = struct.Struct("!HHIIBB")            # ports, seq, ack, data offset, flags
_V4_TCP = struct.Struct(_V4.format + _TCP.format[1:])
_V6_TCP = struct.Struct(_V6.format + _TCP.format[1:])
_new = tuple.__new__                       # a NamedTuple without its Python-level __new__: per packet


@dataclass(slots=True)
class Gap:
    """`nbytes` bytes of the stream that were never captured."""
    nbytes: int


class Segment(NamedTuple):
    """One TCP segment of a captured packet."""
    family: int                 #: socket.AF_INET or AF_INET6
    src: bytes                  #: 4 or 16 address bytes
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int                  #: FIN | SYN | RST | PSH | ACK | ...
    payload: memoryview         #: the captured TCP payload (a view of the packet passed in)
    missing: int                #: payload bytes the IP length promised but the capture does not hold


def parse_segment(ip: memoryview | bytes, wire_len: int | None = None) -> Segment | None:
    """The TCP segment in an IP packet (`ip` starts at the IP header), or None if it is not TCP, is
    an IP fragment or its headers are cut short.

    IPv4 options are skipped by IHL and IPv6 hop-by-hop, routing and destination-options headers
    are walked. The IP length bounds the payload, so trailing bytes (link padding) are not payload;
    if the capture holds less than it says, `missing` counts the rest. A GSO packet past 64 KiB (BIG
    TCP) has a length field of 0: its length is then `wire_len` (the packet's real length, when the
    caller knows it) or else what was captured. The payload is a view of `ip`: valid as long as
    `ip`'s buffer is.
    """
    mv = ip if type(ip) is memoryview else memoryview(ip)
    n = len(mv)
    if n < 40:
        return _parse(mv, n, wire_len)
    first = mv[0]
    # the usual packets (IPv4 without options, IPv6 without extension headers) in one unpack
    if first == 0x45:
        _, total, frag, proto, src, dst, sport, dport, seq, ack, off, flags = _V4_TCP.unpack_from(mv)
        if proto != _TCP_PROTO or frag & 0x3FFF:        # MF set or an offset: a fragment
            return None
        if not total:
            total = wire_len or n
        family, t = _AF_INET, 20
    elif first >> 4 == 6 and mv[6] == _TCP_PROTO and n >= 60:
        plen, _, src, dst, sport, dport, seq, ack, off, flags = _V6_TCP.unpack_from(mv)
        total = 40 + plen if plen else (wire_len or n)
        family, t = _AF_INET6, 40
    else:
        return _parse(mv, n, wire_len)
    data = t + ((off >> 4) << 2)
    if data < t + 20 or data > n or data > total:
        return None
    end = total if total < n else n
    return _new(Segment, (family, src, dst, sport, dport, seq, ack, flags, mv[data:end], total - end))


def _parse(mv: memoryview, n: int, wire_len: int | None) -> Segment | None:
    """parse_segment for any packet: IPv4 options, IPv6 extension headers, short captures."""
    if n < 20:
        return None
    version = mv[0] >> 4
    if version == 4:
        vihl, total, frag, proto, src, dst = _V4.unpack_from(mv)
        t = (vihl & 15) << 2
        if proto != _TCP_PROTO or frag & 0x3FFF or t < 20:
            return None
        if not total:
            total = wire_len or n
        family = _AF_INET
    elif version == 6:
        if n < 40:
            return None
        plen, nh, src, dst = _V6.unpack_from(mv)
        t = 40
        while nh != _TCP_PROTO:
            if nh not in _IPV6_SKIP or n < t + 8:              # fragment, ESP, no next header, ...
                return None
            nh, t = mv[t], t + ((mv[t + 1] + 1) << 3)
        total = 40 + plen if plen else (wire_len or n)
        family = _AF_INET6
    else:
        return None
    if n < t + 20:
        return None
    sport, dport, seq, ack, off, flags = _TCP.unpack_from(mv, t)
    data = t + ((off >> 4) << 2)
    if data < t + 20 or data > n or data > total:
        return None
    end = total if total < n else n
    return _new(Segment, (family, src, dst, sport, dport, seq, ack, flags, mv[data:end], total - end))


class TcpStream:
    """One direction of one TCP connection: segments in, in-order bytes out.

    `add` returns the stream's next pieces: `bytes` (new bytes only, copied, so the caller may
    reuse the packet's buffer) and `Gap(n)` for bytes the capture lost. Segments after a hole are
    held until it fills; past `max_hold` held bytes or `max_ooo_segments` held segments the hole is
    declared lost. Retransmitted and overlapping bytes come out once.
    """

    __slots__ = ("delivered", "_next", "_plain", "_base", "_off", "_end", "_held", "_starts",
                 "_held_bytes", "_synced", "_finished", "_max_hold", "_max_ooo")

    def __init__(self, max_hold: int = 4 << 20, max_ooo_segments: int = 1024):
        #: stream bytes delivered so far (gaps not counted)
        self.delivered = 0
        self._next = -1              # seq of the next byte wanted; -1 (never a seq) until the start is known
        self._plain = False          # in order so far: nothing held, no end known; the fast path's test
        self._base = None            # seq of stream offset 0
        self._off = 0                # stream offset of the next byte wanted: bytes and gaps delivered
        self._end: int | None = None  # stream offset of the FIN
        self._held: dict[int, tuple[int, bytes]] = {}   # start offset -> (end offset, captured bytes)
        self._starts: list[int] = []  # the keys of _held, sorted: holes fill and drain from the front
        self._held_bytes = 0
        self._synced = False
        self._finished = False
        self._max_hold = max_hold
        self._max_ooo = max_ooo_segments

    @property
    def synced(self) -> bool:
        """The stream's start is known from a SYN (else it starts at the first segment seen)."""
        return self._synced

    @property
    def held(self) -> int:
        """Captured bytes held out of order, waiting for a hole before them to fill."""
        return self._held_bytes

    @property
    def finished(self) -> bool:
        """Every byte up to the FIN has come out (as bytes or gaps), or an RST ended the stream."""
        return self._finished

    def add(self, seq: int, flags: int, payload, missing: int = 0) -> list:
        """The stream's next pieces after segment `seq` with `payload` (bytes or memoryview), of which
        the capture lost the last `missing` bytes: a list of `bytes` and `Gap`, often empty.

        The first segment places the stream: its data starts after a SYN, else at the first
        segment's seq (`synced` says which; bytes before it are not reported). A FIN ends the
        stream at its place, once the bytes before it are out; an RST ends it at once, after the
        held bytes (and Gaps for the holes before them). Then nothing more comes out. A segment
        more than 2**30 ahead of the next byte is ignored."""
        if seq == self._next and self._plain and not flags & _NOT_PLAIN and not missing:
            n = len(payload)
            if not n:
                return []
            self._next = (seq + n) & _MASK
            self._off += n
            self.delivered += n
            return [bytes(payload)]
        return self._add(seq, flags, payload, missing)

    def flush(self) -> list:
        """Declare every hole lost: the pieces held after them, with a Gap for each hole (and one up
        to the FIN, if its place is known). Later segments continue after them."""
        out: list = []
        while self._held:
            self._skip_hole(out)
        if self._end is not None and self._off < self._end:
            self._skip_to(out, self._end)
        self._settle()
        return out

    def _add(self, seq: int, flags: int, payload, missing: int) -> list:
        if self._finished:
            return []
        if flags & SYN:
            seq = (seq + 1) & _MASK          # the SYN takes a sequence number; data follows it
            if self._base is None:
                self._start(seq, synced=True)
        elif self._base is None:
            if flags & RST:
                self._finished = True
                return []
            self._start(seq, synced=False)
        d = (seq - self._next) & _MASK
        if d >= _HALF:
            d -= 1 << 32
        if d > _MAX_AHEAD:
            return []
        start = self._off + d
        end = start + len(payload) + missing
        if flags & FIN and self._end is None:
            self._end = max(end, self._off)
            self._drop_past_end()
        out: list = []
        if end > start and end > self._off and (self._end is None or start < self._end):
            if start <= self._off and not self._held:
                self._emit(out, start, end, payload)
            else:
                self._hold(start, end, bytes(payload))
                if start <= self._off:
                    self._drain(out)
                self._bound(out)
        if flags & RST:
            out += self.flush()
            self._finished = True
        self._settle()
        return out

    def _start(self, seq: int, synced: bool) -> None:
        self._base = self._next = seq
        self._synced = synced

    def _emit(self, out: list, start: int, end: int, data) -> None:
        """Append what of [start, end) is new and before the FIN; the captured part is `data`."""
        cur = self._off
        if self._end is not None and end > self._end:
            end = self._end
        if end <= cur:
            return
        cap = start + len(data)
        if cap > cur:
            upto = cap if cap < end else end
            whole = cur == start and upto == cap and type(data) is bytes
            out.append(data if whole else bytes(data[cur - start:upto - start]))
            self.delivered += upto - cur
            cur = upto
        if end > cur:
            _gap(out, end - cur)
        self._off = end
        self._next = (self._base + end) & _MASK

    def _hold(self, start: int, end: int, data: bytes) -> None:
        old = self._held.get(start)
        if old is not None:                  # same start: keep the longer copy
            if old[0] > end or (old[0] == end and len(old[1]) >= len(data)):
                return
            self._held_bytes -= len(old[1])
        else:
            insort(self._starts, start)
        self._held[start] = (end, data)
        self._held_bytes += len(data)

    def _drain(self, out: list) -> None:
        """Emit the held segments that now touch the stream's next byte, in order."""
        held, starts = self._held, self._starts
        while starts and starts[0] <= self._off:
            start = starts.pop(0)
            end, data = held.pop(start)
            self._held_bytes -= len(data)
            self._emit(out, start, end, data)

    def _bound(self, out: list) -> None:
        """Past the hold limits, the first hole will not fill: skip it."""
        while self._held and (self._held_bytes > self._max_hold or len(self._held) > self._max_ooo):
            self._skip_hole(out)

    def _skip_hole(self, out: list) -> None:
        """A Gap for the hole before the first held segment, then that segment and the held ones
        contiguous with it (the first is taken out whatever happens: each call makes progress)."""
        start = self._starts.pop(0)
        end, data = self._held.pop(start)
        self._held_bytes -= len(data)
        self._skip_to(out, start)
        if start <= self._off:
            self._emit(out, start, end, data)
        self._drain(out)

    def _skip_to(self, out: list, offset: int) -> None:
        if self._end is not None and offset > self._end:
            offset = self._end
        if offset > self._off:
            _gap(out, offset - self._off)
            self._off = offset
            self._next = (self._base + offset) & _MASK

    def _drop_past_end(self) -> None:
        """Held segments that start at or past the FIN are not stream bytes (so every hole skipped
        later ends at a held segment, which then drains)."""
        i = bisect_left(self._starts, self._end)
        for start in self._starts[i:]:
            self._held_bytes -= len(self._held.pop(start)[1])
        del self._starts[i:]

    def _settle(self) -> None:
        if self._end is not None and self._off >= self._end:
            self._finished = True
        if self._finished:
            self._held.clear()
            self._starts.clear()
            self._held_bytes = 0
        self._plain = not self._held and self._end is None and not self._finished


def _gap(out: list, n: int) -> None:
    """Append Gap(n), merged into a Gap just before it."""
    if out and type(out[-1]) is Gap:
        out[-1].nbytes += n
    else:
        out.append(Gap(n))
