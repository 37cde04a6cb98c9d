"""decode/records.py: ring records (built with abi.DataEvent, the mirror of bpf/tlstap.h, not with
the decoder's own struct format) -> TlsData, with chunked calls reassembled, truncation and losses
counted, and partial calls flushed."""
from __future__ import annotations

import ctypes
import ipaddress
import socket
import time

from tlstap import abi
from tlstap.abi import Direction
from tlstap.decode import records
from tlstap.decode.records import RecordDecoder

FIRST, LAST = abi.DF_FIRST, abi.DF_LAST


def record(payload: bytes, *, flags=FIRST | LAST, total=None, offset=0, call_id=1, direction=Direction.WRITE,
           kind=abi.REC_DATA, ts=1_000, ssl=0x5555_0000, conn_id=7, pid=42, tid=43, uid=1000, fd=5,
           comm=b"curl", family=socket.AF_INET, local=("127.0.0.1", 40000), remote=("127.0.0.2", 443)) -> memoryview:
    ev = abi.DataEvent(kind=kind, dir=direction, flags=flags, len=len(payload), ts_ns=ts, ssl=ssl,
                       call_id=call_id, total=len(payload) if total is None else total, offset=offset,
                       conn_id=conn_id, pid=pid, tid=tid, uid=uid, fd=fd, comm=comm)
    ev.tuple.family, ev.tuple.lport, ev.tuple.rport = family, local[1], remote[1]
    for field, ip in (("laddr", local[0]), ("raddr", remote[0])):
        packed = ipaddress.ip_address(ip).packed
        ctypes.memmove(ctypes.addressof(ev.tuple) + getattr(abi.ConnTuple, field).offset, packed, len(packed))
    return memoryview(bytes(ev) + payload)


def decoder(max_payload: int = 1 << 20):
    got = []
    return RecordDecoder(got.append, max_payload), got


def test_one_call_in_one_record_becomes_one_event_with_every_field():
    dec, got = decoder()
    before = time.time_ns() - time.monotonic_ns()
    dec.feed(record(b"GET / HTTP/1.1\r\n", ts=123_456_789, comm=b"curl\0junk", flags=FIRST | LAST | abi.DF_FD_CACHED))
    after = time.time_ns() - time.monotonic_ns()
    (ev,) = got
    assert (ev.pid, ev.tid, ev.uid, ev.fd, ev.comm, ev.direction, ev.ssl, ev.conn_id) == \
        (42, 43, 1000, 5, "curl", Direction.WRITE, 0x5555_0000, 7)
    assert (ev.data, ev.total, ev.truncated, ev.lost, ev.fd_cached) == (b"GET / HTTP/1.1\r\n", 16, 0, 0, True)
    # kernel time (monotonic) + the wall clock's offset, as measured around the decoder's creation
    assert before - 5_000_000 <= ev.ts_ns - 123_456_789 <= after + 5_000_000
    c = ev.conn
    assert (c.family, c.local.ip, c.local.port, c.remote.ip, c.remote.port) == \
        (socket.AF_INET, "127.0.0.1", 40000, "127.0.0.2", 443)


def test_ipv6_and_unknown_connections():
    dec, got = decoder()
    dec.feed(record(b"a", family=socket.AF_INET6, local=("::1", 1), remote=("2001:db8::5", 2)))
    dec.feed(record(b"b", family=0, direction=Direction.READ))
    six, unknown = got
    assert (six.conn.local.ip, six.conn.remote.ip) == ("::1", "2001:db8::5")
    assert unknown.conn is None and unknown.direction is Direction.READ


def test_other_record_kinds_are_ignored():
    dec, got = decoder()
    dec.feed(record(b"x", kind=abi.REC_DATA + 1))
    assert got == []


def test_a_call_cut_by_max_payload_counts_the_rest_as_truncated():
    dec, got = decoder(max_payload=4)
    dec.feed(record(b"abcd", total=10))
    (ev,) = got
    assert (ev.data, ev.total, ev.truncated, ev.lost) == (b"abcd", 10, 6, 0)


def test_chunks_of_a_call_are_joined_between_other_calls_records():
    dec, got = decoder()
    body = bytes(range(256)) * 3
    a, b, c = body[:300], body[300:600], body[600:]
    dec.feed(record(a, flags=FIRST, total=len(body), call_id=9))
    dec.feed(record(b"other cpu", call_id=10, pid=7))          # another call, whole, in between
    dec.feed(record(b, flags=0, total=len(body), offset=300, call_id=9))
    dec.feed(record(c, flags=LAST, total=len(body), offset=600, call_id=9))
    assert [(e.pid, e.data) for e in got] == [(7, b"other cpu"), (42, body)]
    assert (got[1].total, got[1].truncated, got[1].lost) == (len(body), 0, 0)


def test_a_lost_middle_chunk_is_counted_as_lost_not_truncated():
    dec, got = decoder()
    dec.feed(record(b"x" * 100, flags=FIRST, total=400, call_id=3))
    dec.feed(record(b"z" * 100, flags=LAST, total=400, offset=300, call_id=3))   # 100..300 never came
    (ev,) = got
    assert (ev.data, ev.total, ev.lost, ev.truncated) == (b"x" * 100 + b"z" * 100, 400, 200, 0)


def test_flush_stale_emits_a_partial_call_once_it_is_old_or_at_the_end(monkeypatch):
    dec, got = decoder(max_payload=1000)
    dec.feed(record(b"p" * 100, flags=FIRST, total=5000, call_id=1))   # 1000 captured at most
    dec.flush_stale()
    assert got == []                                 # young: its last chunk may still come
    monkeypatch.setattr(records, "STALE_PARTIAL_S", 0.0)
    time.sleep(0.001)                                # (age, not synchronisation)
    dec.flush_stale()
    (ev,) = got
    # of the 1000 bytes the kernel meant to send, 900 never came; the 4000 beyond were cut
    assert (ev.data, ev.total, ev.lost, ev.truncated) == (b"p" * 100, 5000, 900, 4000)
    dec.feed(record(b"q" * 10, flags=FIRST, total=20, call_id=2))
    monkeypatch.setattr(records, "STALE_PARTIAL_S", 3600.0)
    dec.flush_stale(all_=True)                       # the end of the capture: everything goes
    assert (got[1].data, got[1].lost, got[1].truncated) == (b"q" * 10, 10, 0)
    dec.flush_stale(all_=True)
    assert len(got) == 2


class FastSink:
    """A sink offering the fast path (raw_data_handler), recording which path each call took."""

    def __init__(self):
        self.slow, self.fast = [], []

    def on_data(self, ev):
        self.slow.append(ev.data)

    def raw_data_handler(self, dec):
        def handler(rec, direction, ts, total, payload):
            self.fast.append((bytes(rec[records.IDENT_OFF:records.IDENT_OFF + 4]), direction, ts, total,
                              bytes(payload)))
        return handler


def test_the_fast_path_gets_whole_single_chunk_calls_only():
    s = FastSink()
    dec = RecordDecoder(s.on_data, 1 << 20, fast=s.raw_data_handler)
    dec.feed(record(b"whole", ts=77, pid=0x01020304))
    dec.feed(record(b"cut", total=9))                                      # truncated: slow path
    dec.feed(record(b"ch", flags=FIRST, total=4, call_id=5))
    dec.feed(record(b"un", flags=LAST, total=4, offset=2, call_id=5))      # chunked: slow path
    assert s.fast == [((0x01020304).to_bytes(4, "little"), Direction.WRITE, 77, 5, b"whole")]
    assert s.slow == [b"cut", b"chun"]
