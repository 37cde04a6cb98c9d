"""The pcapng output (-w, -m pcapng): packets from TC and TLS secrets from the key probes, in
one pcapng file.

Two sources feed it: the key source (sources/keys.py, uprobes on ssl_log_secret and the like)
and the packet source (sources/packets.py, TC programs on the interface), through two ring
buffers. Each piece taken from the packet ring is encoded to EPBs straight away, after
the key ring is drained; PcapngSink holds back the packets that may need a secret not logged
yet (see _take) for a short lag, so that secret still lands in a Decryption Secrets Block
before them.
"""
from __future__ import annotations

import os
import time

from ..events import KeyLine, ring_why
from ..errors import TlstapError
from ..libbpf.ringbuf import HDR_SZ, records
from .epb_native import BAD, DONE, NEED_TRAILER, NO_HOLD, EpbEncoder, Pinned, Result
from .pcapng import DEFAULT_LAG_NS, DIR_INBOUND, DIR_OUTBOUND, Gate, PcapngSink, PcapngWriter, process_comment
from ..abi import PktDir, PktFlag
from ..sources.packets import EVENT_HEAD, EVENT_OWNERS, EVENT_SIZE

#: Most bytes taken from the ring at once: the space is the producers' again only after
#: the piece is encoded, so a whole 64 MiB ring at once would leave them little.
PIECE_MAX = 4 << 20
TO_LISTENER = PktFlag.TO_LISTENER.value
#: room asked for per native call: more than the largest EPB (a 256 KiB packet and options)
ROOM_MIN = 300 << 10
#: A TLS 1.3 handshake is open from its CLIENT_HANDSHAKE_TRAFFIC_SECRET to its
#: CLIENT_TRAFFIC_SECRET_0; one never finished stops counting after this long.
HANDSHAKE_OPEN_S = 2.0


class PcapngOutput:
    """runner.Output for -w / -m pcapng: the packet source's packets and the key source's
    secrets in one file. It owns the encoder (native/epb.c, or Python), the hold rule (which
    packets wait for late secrets, _take_py) and the direct-I/O buffer it encodes into."""

    poll_s = 0.2

    def __init__(self, packets, keys, path: str, status, lag_ns: int = DEFAULT_LAG_NS,
                 native: bool = True):
        """packets: a PacketCapture; keys: the key source (KeyLogCapture), shared with a key log
        output if there is one; native: encode with native/epb.c (False: in Python only, for
        tests that compare the two). The file is opened pending: commit() takes it."""
        self.packets = packets
        self.keys = keys
        self.path = path
        self._status = status
        keys.subscribers.append(self._on_key)
        self.writer = PcapngWriter(path, pending=True)
        self.sink = PcapngSink(self.writer, lag_ns=lag_ns)
        self.secrets_written = 0
        self.packets_written = 0
        self._if_id = None
        self._drops_pending = 0
        self._lost_seen = (0, 0)
        self._closed = False
        self._trailers: dict[tuple, bytes] = {}   # (owners' bytes, dir, pad) -> EPB trailer
        self._key_pids: set[int] = set()           # processes that have logged secrets
        self._open_handshakes: dict[bytes, float] = {}   # client_random -> when it opened
        self._gate: Gate | None = None     # what packets held for open handshakes wait on
        self._native = EpbEncoder() if native else None
        self._res = Result()

    def prepare(self) -> None:
        pass

    def commit(self) -> None:
        """The sources started: the interface is known, the file becomes the capture's."""
        iface = self.packets.interface
        self._if_id = self.writer.add_interface(iface.name, iface.linktype, self.packets.snaplen,
                                                description=f"ifindex {iface.ifindex}, mtu {iface.mtu}")
        self.writer.commit()

    def discard(self) -> None:
        """Before commit: the file stays as it was. After (an error mid-capture): what was
        captured is written and the file closed valid."""
        self._close()

    def attached(self) -> list[str]:
        return self.keys.attached()

    def describe(self) -> str:
        filt = self.packets.filter_expr or "no filter"
        return (f"; packets of {self.packets.interface.name} ({filt}) and secrets go to "
                f"{os.path.abspath(self.path)}")

    def _on_key(self, line: KeyLine) -> None:
        if line.label == "CLIENT_HANDSHAKE_TRAFFIC_SECRET":
            self._open_handshakes[line.client_random] = time.monotonic()
        elif line.label == "CLIENT_TRAFFIC_SECRET_0":
            self._open_handshakes.pop(line.client_random, None)
        if line.pid not in self._key_pids:
            self._key_pids.add(line.pid)
            if self._native is not None:
                self._native.set_key_pids(self._key_pids)
        self.secrets_written += self.sink.secrets([line.text()])
        if self._gate is not None and not self._open_handshakes:
            self._gate.open()       # their secrets are written: they need not wait the lag
            self._gate = None

    def _take(self, piece: memoryview) -> int:
        """Encode a piece of the packet ring into EPBs; return the bytes used: the piece is
        all the ring published (RingBuffer.take with scan=False) and may end in a record
        still being written. At 64 KiB packets on lo the ring brings ~1 GB/s: native/epb.c
        encodes them, straight into the direct-I/O buffer of the file when nothing is held
        back (one copy on the way to disk). _take_py does it in Python where that leaves off."""
        self.keys.deliver()    # secrets logged before these packets were sent: written first
        gate = self._handshaking()
        if self._native is None or self._drops_pending:
            return self._take_py(piece, gate)
        enc, res, w, sink = self._native, self._res, self.writer, self.sink
        if_id, wall = self._if_id, self.packets.wall_offset
        with Pinned(piece) as src:
            pos = 0
            while pos < len(piece):
                held = sink.release() > 0 or gate is not None   # behind held packets: queue, do not write
                room = None if held else w.direct_room(ROOM_MIN)
                out = room if room is not None else bytearray(max(ROOM_MIN, 2 * (len(piece) - pos)))
                res.reset()
                res.pos = pos
                with Pinned(out, writable=True) as dst:
                    while True:
                        enc.encode(src.addr, len(piece), dst.addr, len(out), if_id, wall, res)
                        if res.status != NEED_TRAILER:
                            break
                        enc.add_trailer(enc.key_at(src.addr, len(piece), res.pos),
                                        self._trailer(piece[res.pos + HDR_SZ:]))
                if res.status == BAD or (res.pos == pos and res.status != DONE):   # room takes one
                    raise TlstapError(f"malformed packet record at offset {res.pos} of a ring piece")
                if res.crossed:                 # rare: sort them in Python
                    self._take_py(piece[pos:res.pos], gate)
                elif res.count:
                    self._place(out, room is not None, gate)
                self.packets_written += 0 if res.crossed else res.count
                pos = res.pos
                if res.status == DONE:
                    break
        return pos

    def _handshaking(self) -> Gate | None:
        """While a TLS 1.3 handshake is open, the Gate every packet waits on, also those the rule
        of _take_py lets through; None otherwise. The client sends its Finished to the listener
        before anyone logs CLIENT_TRAFFIC_SECRET_0 (the client right after, the server once it
        reads it), and Wireshark needs that secret when it meets the Finished, not only at the
        data after it. The gate opens once no handshake is open (_on_key): on loopback a
        fraction of a millisecond, not the lag (a server closing keep-alive connections, like
        nginx every 1000 requests, has one open most of the time)."""
        hs = self._open_handshakes
        if hs:
            old = time.monotonic() - HANDSHAKE_OPEN_S
            for cr in [cr for cr, t in hs.items() if t < old]:
                del hs[cr]
        if not hs:
            if self._gate is not None:
                self._gate.open()
                self._gate = None
            return None
        if self._gate is None:
            self._gate = Gate()
        return self._gate

    def _place(self, out, in_file: bool, gate: Gate | None = None) -> None:
        """The EPBs native/epb.c put in `out` (self._res says which): those from the first
        that may need a later secret go to the sink to wait, the rest to the file."""
        res, w, sink, if_id = self._res, self.writer, self.sink, self._if_id
        cut = res.out_len if res.hold_off == NO_HOLD else res.hold_off
        n_now = res.count if res.hold_off == NO_HOLD else res.hold_idx
        if in_file:
            w.commit_direct(if_id, cut, n_now, res.last_ts)   # last_ts: a bound is enough here
            if cut < res.out_len:
                sink.encoded(if_id, bytes(out[cut:res.out_len]), res.count - n_now, res.first_ts, res.last_ts)
            return
        if cut:
            sink.encoded(if_id, memoryview(out)[:cut], n_now, res.first_ts, res.last_ts, hold=gate or False)
        if cut < res.out_len:
            sink.encoded(if_id, memoryview(out)[cut:res.out_len], res.count - n_now, res.first_ts, res.last_ts)

    def _trailer(self, rec, drops: int = 0) -> bytes:
        """The EPB trailer (outputs/pcapng.py spells it) of a packet_event record."""
        _ts, _ifindex, _length, caplen, d, _flags, _spid = EVENT_HEAD.unpack_from(rec)
        s, rcv = self.packets.owner(rec)
        comment = process_comment(s and s.pid, s and s.comm, rcv and rcv.pid, rcv and rcv.comm) \
            if s or rcv else None
        return self.writer.epb_trailer(caplen, DIR_OUTBOUND if d == PktDir.EGRESS else DIR_INBOUND, comment,
                                       drops)

    def _take_py(self, piece: memoryview, gate: Gate | None = None) -> int:
        """_take in Python: for a piece whose packets crossed in time (two CPUs between
        timestamp and reservation), the first packet after a loss (its drop count), and
        with native=False.

        Which packets wait for late secrets: a TLS 1.3 client logs its secrets only once the
        server's encrypted flight has arrived, so a packet may need a secret logged after it.
        Not when it goes to a listening port (the server logged the secrets before its peer
        could use them), nor when its sender has logged secrets (logged before it sends).
        Holding the rest only keeps a nginx at 64 KiB from piling up ~0.3 s of traffic (a few
        hundred MB) in our memory. A packet that needs no wait still waits behind one that
        does (PcapngSink): the file stays in timestamp order."""
        recs, used = records(piece)
        if not recs:
            return used
        w, if_id, wall = self.writer, self._if_id, self.packets.wall_offset
        trailers, key_pids = self._trailers, self._key_pids
        head, o0, o1, dsz = EVENT_HEAD.unpack_from, EVENT_OWNERS.start, EVENT_OWNERS.stop, EVENT_SIZE
        put = w.put_epb
        out = bytearray()
        marks = []             # (ts, start of its EPB in out), for the rare CPU interleaving
        last = crossed = 0
        hold_from = None       # index of the first packet that needs the lag
        drops, self._drops_pending = self._drops_pending, 0
        for r in recs:
            ts, _ifindex, length, caplen, d, flags, spid = head(r)
            ts += wall
            if hold_from is None and not flags & TO_LISTENER and spid not in key_pids:
                hold_from = len(marks)
            key = (r[o0:o1].tobytes(), d, caplen & 3)
            t = trailers.get(key)
            if t is None or drops:
                t = self._trailer(r, drops)
                if not drops:
                    if len(trailers) > 4096:
                        trailers.clear()
                    trailers[key] = t
                drops = 0
            if ts < last:
                crossed += 1
            last = ts
            marks.append((ts, len(out)))
            put(out, if_id, ts, r[dsz:dsz + caplen], length, t)
        if crossed:            # two CPUs' packets crossed between timestamp and reservation
            ends = [m[1] for m in marks[1:]] + [len(out)]
            view = memoryview(out)
            spans = sorted((ts, start, end) for (ts, start), end in zip(marks, ends))
            out = bytearray().join(view[a:b] for _, a, b in spans)
            view.release()
            marks = [(ts, 0) for ts, _, _ in spans]
            if hold_from is not None:
                hold_from = 0
        n = len(marks)
        self.packets_written += n
        if not hold_from:      # None: nothing waits (but for the gate); 0: all of it
            self.sink.encoded(if_id, out, n, marks[0][0], marks[-1][0], hold=hold_from == 0 or gate or False)
            return used
        cut = marks[hold_from][1]
        view = memoryview(out)
        self.sink.encoded(if_id, view[:cut], hold_from, marks[0][0], marks[hold_from - 1][0], hold=gate or False)
        self.sink.encoded(if_id, view[cut:], n - hold_from, marks[hold_from][0], marks[-1][0])
        return used

    def pump(self) -> int:
        self.keys.deliver()
        return self.packets.take(self._take, PIECE_MAX, scan=False)   # _take delivers keys first

    def tick(self) -> None:
        self.sink.flush(time.time_ns())

    def report(self) -> None:
        """New losses onto stderr; the file counts them in the next packet's EPB
        (epb_dropcount) and in the statistics block at close (isb_ifdrop)."""
        c = self.packets.counters()
        lost, room = c["lost"] - self._lost_seen[0], c["lost_room"] - self._lost_seen[1]
        self._lost_seen = (c["lost"], c["lost_room"])
        self._drops_pending += lost
        if lost:
            self._status(f"lost {lost} packets: {ring_why(lost, room)[1]}")
        if lost := self.keys.new_lost():
            self._status(f"lost {lost} key events: ring buffer full")

    def drain(self) -> None:
        self.keys.drain()
        self.packets.drain_to(self._take, PIECE_MAX, scan=False)
        self.keys.drain()

    def finish(self, why: str, stop: list) -> str:
        p, k = self.packets.counters(), self.keys.counters()
        self._close(stats=(p["packets"] + p["lost"], p["lost"]))
        return (f"{why}: {self.packets_written} packets ({p['bytes']} bytes) and "
                f"{self.secrets_written} TLS secrets written; {p['filtered']} packets left out by the "
                f"filter or scope, {p['truncated']} cut at the snap length; lost {p['lost']} "
                f"packets, {k['lost']} key events")

    def _close(self, stats: tuple[int, int] | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        if self._if_id is None:
            self.writer.discard()      # never committed: the file stays as it was
        elif stats is not None:
            self.sink.close(stats={self._if_id: stats})   # (received, dropped) for the ISB
        else:
            self.sink.close()
