"""The decoder process's half of the wire source: spool records -> TlsData, as the probe
source's records would give.

Records are packet_events (bpf/packets.bpf.c, cgroup programs: the IP packet of a local
socket, its direction, the socket's owner) and key lines (keyrecord.py). Each TCP connection,
as one local socket sees it, is two TcpStreams (tcp.py) feeding one TlsConnection (tls.py);
what it decrypts goes on as TlsData, one per captured segment's worth of records, to the same
HTTP view and sinks as the probe source's calls.

What the wire source fills of a TlsData: ts (the packet's), pid/uid/comm/fd (the socket's
owner by the kernel's attribution; fd -1 where a connection changed hands), direction, the
4-tuple, conn_id (the connection's first packet); tid 0 (a packet is sent by the kernel, not
by a thread's call); ssl the connection's number in this capture (1, 2, ...): the HTTP view
keeps a connection's state by (pid, ssl, conn_id), as for the probe source's SSL*.

Keys that come later than the records needing them (a TLS 1.3 client decrypting the server's
first flight logs its secrets after the packet has passed) are waited for up to KEY_WAIT_NS of
capture time, then the connection is reported as not decrypted.
"""
from __future__ import annotations

import struct
import sys
from collections import OrderedDict

from .. import abi
from ..abi import Direction, PktDir
from ..events import Conn, Lost, TlsData, wall_clock_offset_ns
from . import keyrecord
from .tcp import SYN, TcpStream, parse_segment
from .tls import IN, OUT, Plain, Problem, TlsConnection

_EVENT = struct.Struct(abi.PACKET_EVENT_FORMAT)
EVENT_SIZE = _EVENT.size
#: how long, in capture time, held records wait for their keys
KEY_WAIT_NS = 3_000_000_000
#: a connection with no packet for this long is forgotten (its state freed)
IDLE_NS = 120_000_000_000
MAX_CONNS = 65536
#: problems that end decryption of a connection: told once per process and reason, then counted
_FATAL = {"nokeys": "no keys (the library logged no secrets for it: is it the library this command "
                    "probes?)",
          "midstream": "its handshake was before the capture",
          "unsupported": "not supported",
          "notls": "not TLS"}
REMEDY = "--source probe shows it"
GAP_WHY = "bytes missing from the captured stream"
AUTH_WHY = "record failed authentication, not shown"


class _Conn:
    __slots__ = ("key", "number", "streams", "tls", "conn", "conn_id", "last_ns", "dir_ns", "wait_since", "owner",
                 "done", "decrypted")

    def __init__(self, key, number, tls, conn, conn_id, now):
        self.key = key
        self.number = number        # stands for the SSL* the probe source names a connection by
        self.streams = (TcpStream(), TcpStream())      # indexed by OUT, IN
        self.tls = tls
        self.conn = conn
        self.conn_id = conn_id
        self.last_ns = now
        #: per direction, the time of its newest packet: the time of what it completes, also when
        #: that comes out later (held for keys, or for the other direction's handshake)
        self.dir_ns = [now, now]
        self.wait_since = None
        self.owner = None
        self.done = False           # decryption ended (a fatal problem): bytes are ignored
        self.decrypted = 0


class WireDecoder:
    """feed(record) per spool record; completed plaintext goes to sink(TlsData), losses and
    problems to on_lost(Lost) and the status stream."""

    def __init__(self, sink, on_lost, max_payload: int, status=None):
        self.sink = sink
        self.on_lost = on_lost
        self.max_payload = max_payload
        self.status = status or (lambda m: sys.stderr.write(f"tlstap: wire: {m}\n"))
        self.wall_offset = wall_clock_offset_ns()
        self.keys: OrderedDict[bytes, dict[str, bytes]] = OrderedDict()   # client_random -> label -> secret
        self._waiting: dict[tuple, _Conn] = {}   # connections holding records for want of keys
        self.conns: OrderedDict[tuple, _Conn] = OrderedDict()
        self.now = 0                          # capture time (wall ns) of the newest record seen
        self.stats = {"connections": 0, "connections_decrypted": 0, "connections_not_decrypted": 0,
                      "bytes_decrypted": 0, "records_decrypted": 0, "auth_failures": 0, "gap_bytes": 0,
                      "not_tls": 0, "truncated_pieces": 0, "truncated_bytes": 0}
        self.not_decrypted: dict[str, int] = {}
        self.not_attributed = 0               # decrypted connections with no known owner (metrics)
        self._told: set = set()
        self._owners: dict[bytes, str] = {}       # comm as the kernel wrote it -> its text
        self._keys_for = self.keys.get

    # ---- records -------------------------------------------------------------------------

    def feed(self, rec) -> None:
        if keyrecord.is_key(rec):
            self._key(rec)
            return
        (ts, _ifindex, length, caplen, d, _flags, spid, suid, scomm, sfd, rpid, ruid, rcomm, rfd) = _EVENT.unpack_from(rec)
        seg = parse_segment(rec[EVENT_SIZE:EVENT_SIZE + caplen], length)
        if seg is None:
            return
        wall = ts + self.wall_offset
        if wall > self.now:
            self.now = wall
        if d == PktDir.EGRESS:
            direction, pid, uid, comm, fd = OUT, spid, suid, scomm, sfd
            key = (seg.family, seg.src, seg.sport, seg.dst, seg.dport)
        else:
            direction, pid, uid, comm, fd = IN, rpid, ruid, rcomm, rfd
            key = (seg.family, seg.dst, seg.dport, seg.src, seg.sport)
        c = self.conns.get(key)
        if c is None or (seg.flags & SYN and (c.streams[direction].finished or c.streams[direction].delivered)):
            if c is not None:             # the tuple is reused by a new connection
                self._forget(c)
            c = self._new(key, ts, wall)
        else:
            self.conns.move_to_end(key)
        c.last_ns = c.dir_ns[direction] = wall
        if pid:
            c.owner = (pid, uid, comm, fd)
        if c.done:
            return
        pieces = c.streams[direction].add(seg.seq, seg.flags, seg.payload, seg.missing)
        if pieces:
            self._results(c, c.tls.feed(direction, pieces))
        if c.wait_since is None and c.tls.waiting:
            c.wait_since = wall
            self._waiting[key] = c

    def _new(self, key, ts, wall) -> _Conn:
        family, laddr, lport, raddr, rport = key
        self.stats["connections"] += 1
        c = _Conn(key, self.stats["connections"], TlsConnection(self._keys_for),
                  Conn.from_raw(family, lport, rport, laddr, raddr), ts, wall)
        self.conns[key] = c
        if len(self.conns) > MAX_CONNS:
            self._forget(self.conns.popitem(last=False)[1])
        return c

    def _forget(self, c: _Conn) -> None:
        self.conns.pop(c.key, None)
        self._waiting.pop(c.key, None)
        self._end(c)

    def _key(self, rec) -> None:
        wall, label, cr, secret = keyrecord.parse(rec)
        if wall > self.now:
            self.now = wall
        known = self.keys.get(cr)
        if known is None:
            known = self.keys[cr] = {}
            if len(self.keys) > MAX_CONNS:
                self.keys.popitem(last=False)
        known[label] = secret
        for c in list(self._waiting.values()):
            self._results(c, c.tls.retry())
            if c.done or not c.tls.waiting:
                c.wait_since = None
                self._waiting.pop(c.key, None)

    # ---- results -------------------------------------------------------------------------

    def _results(self, c: _Conn, outs) -> None:
        for o in outs:
            if type(o) is Plain:
                self._emit(c, o)
            else:
                self._problem(c, o)

    def _emit(self, c: _Conn, p: Plain) -> None:
        pid, uid, comm, fd = self._owner(c)
        data = p.data
        total = len(data)
        truncated = 0
        if total > self.max_payload:
            data, truncated = data[:self.max_payload], total - self.max_payload
            self.stats["truncated_pieces"] += 1
            self.stats["truncated_bytes"] += truncated
        if not c.decrypted:
            self.stats["connections_decrypted"] += 1
            if c.owner is None:
                self.not_attributed += 1
        c.decrypted += total
        self.stats["bytes_decrypted"] += total
        self.stats["records_decrypted"] += 1
        self.sink(TlsData(c.dir_ns[p.direction], pid, 0, uid, comm, fd, Direction.WRITE if p.direction == OUT else Direction.READ,
                          c.conn, c.number, bytes(data), total, truncated, 0, False, c.conn_id))

    def _owner(self, c: _Conn) -> tuple[int, int, str, int]:
        if c.owner is None:
            return 0, 0, "?", -1
        pid, uid, comm, fd = c.owner
        name = self._owners.get(comm)
        if name is None:
            name = self._owners[comm] = comm.split(b"\0", 1)[0].decode(errors="replace")
        return pid, uid, name, fd

    def _problem(self, c: _Conn, p: Problem) -> None:
        if p.kind == "gap":
            n = _bytes_in(p.detail)
            self.stats["gap_bytes"] += n
            self.on_lost(Lost(0, n, f"{GAP_WHY}: {p.detail}"))
        elif p.kind == "auth":
            self.stats["auth_failures"] += 1
            self.on_lost(Lost(1, 0, f"{AUTH_WHY}: {p.detail}"))
        elif p.kind in _FATAL:
            c.done = True
            c.wait_since = None
            self._waiting.pop(c.key, None)
            if p.kind == "notls":
                self.stats["not_tls"] += 1
                return
            self.stats["connections_not_decrypted"] += 1
            self.not_decrypted[p.kind] = self.not_decrypted.get(p.kind, 0) + 1
            pid, _uid, comm, _fd = self._owner(c)
            if (pid, p.kind) not in self._told:
                self._told.add((pid, p.kind))
                self.status(f"{c.conn.local} <-> {c.conn.remote} of {comm} ({pid}) not decrypted: "
                            f"{_FATAL[p.kind]}{': ' + p.detail if p.detail else ''}; {REMEDY} "
                            f"(told once per process and reason)")
        else:
            self.status(f"{c.conn.local} <-> {c.conn.remote}: {p.kind}: {p.detail}")

    def _end(self, c: _Conn) -> None:
        """The connection is over or forgotten: what is held comes out, gaps included."""
        if c.done:
            return
        for d in (OUT, IN):
            pieces = c.streams[d].flush()
            if pieces:
                self._results(c, c.tls.feed(d, pieces))
        if c.tls.waiting:
            self._results(c, c.tls.give_up("the connection ended before its keys came"))
        self._results(c, c.tls.close())

    # ---- time ------------------------------------------------------------------------------

    def tick(self, now_ns: int) -> None:
        """now_ns: the capture's wall clock when the spool was complete up to what was fed."""
        if now_ns > self.now:
            self.now = now_ns
        self._expire()

    def _expire(self) -> None:
        now = self.now
        for c in [c for c in self._waiting.values() if now - c.wait_since > KEY_WAIT_NS]:
            c.wait_since = None
            del self._waiting[c.key]
            self._results(c, c.tls.give_up(f"no keys within {KEY_WAIT_NS // 10**9} s"))
        while self.conns:
            c = next(iter(self.conns.values()))
            if not all(s.finished for s in c.streams) and now - c.last_ns < IDLE_NS:
                break
            self._forget(c)

    def flush_stale(self, all_: bool = False) -> None:
        self._expire()
        if all_:
            while self.conns:
                self._forget(next(iter(self.conns.values())))

    def metric_stats(self) -> dict:
        """stats with what the metrics break down (metrics/traffic.py): connections not
        decrypted by reason, and connections whose owner was not known. Reads only."""
        return {**self.stats, "not_decrypted": dict(self.not_decrypted), "not_attributed": self.not_attributed}

    def summary(self) -> str:
        s = self.stats
        nd = ", ".join(f"{n} {_FATAL[k].split(' (')[0]}" for k, n in sorted(self.not_decrypted.items()))
        return (f"decrypted {s['connections_decrypted']} of {s['connections']} connections "
                f"({s['bytes_decrypted']} bytes in {s['records_decrypted']} pieces); "
                f"not decrypted {s['connections_not_decrypted']}{' (' + nd + ')' if nd else ''}; "
                f"{s['not_tls']} not TLS; {s['auth_failures']} records failed authentication; "
                f"{s['gap_bytes']} bytes missing")


def _bytes_in(detail: str) -> int:
    """The byte count a gap's detail starts with ("1234 bytes ..."), 0 if none."""
    head = detail.split(" ", 1)[0]
    return int(head) if head.isdigit() else 0

