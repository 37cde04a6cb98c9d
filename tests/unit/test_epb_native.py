"""native/epb.c against the Python encoder (PcapngWriter.put_epb) on ring pieces laid out as
the kernel lays them out (8-byte header, packet_event, packet, padding to 8), byte for byte;
tshark reads what it writes in the kernel tests (tests/kernel/test_pcapng_capture.py)."""
from __future__ import annotations

import ctypes
import os
import struct

import pytest

from tlstap import abi
from tlstap.libbpf.ringbuf import BUSY_BIT, DISCARD_BIT, HDR_SZ, records
from tlstap.sinks.epb_native import BAD, DONE, NEED_TRAILER, NO_HOLD, OUT_FULL, EpbEncoder, Pinned, Result
from tlstap.sinks.pcapng import DIR_INBOUND, DIR_OUTBOUND, LINKTYPE_ETHERNET, PcapngWriter

WALL = 1_700_000_000_000_000_000


def record(ts, data, *, sender=(0, 0, b""), receiver=(0, 0, b""), direction=abi.PktDir.EGRESS, flags=0,
           orig_len=None, discard=False, busy=False) -> bytes:
    ev = abi.PacketEvent(ts_ns=ts, ifindex=1, len=orig_len or len(data), caplen=len(data), dir=direction,
                         flags=flags)
    ev.sender = abi.SockOwner(*sender)
    ev.receiver = abi.SockOwner(*receiver)
    body = bytes(ev) + data
    hdr = len(body) | (DISCARD_BIT if discard else 0) | (BUSY_BIT if busy else 0)
    rec = struct.pack("<II", hdr, 0) + body
    return rec + bytes(-len(rec) % 8)


def trailer_for(w, rec: bytes) -> bytes:
    ev = abi.PacketEvent.from_buffer_copy(rec[HDR_SZ:HDR_SZ + ctypes.sizeof(abi.PacketEvent)])
    comment = f"pid={ev.sender.pid} -> pid={ev.receiver.pid}"
    return w.epb_trailer(ev.caplen, DIR_OUTBOUND if ev.dir == abi.PktDir.EGRESS else DIR_INBOUND, comment)


def python_epbs(w, recs: list[bytes], if_id: int) -> bytes:
    out = bytearray()
    for rec in recs:
        ev = abi.PacketEvent.from_buffer_copy(rec[HDR_SZ:HDR_SZ + ctypes.sizeof(abi.PacketEvent)])
        if (struct.unpack_from("<I", rec)[0] & DISCARD_BIT):
            continue
        data = rec[HDR_SZ + ctypes.sizeof(ev):HDR_SZ + ctypes.sizeof(ev) + ev.caplen]
        w.put_epb(out, if_id, ev.ts_ns + WALL, data, ev.len, trailer_for(w, rec))
    return bytes(out)


def native_epbs(enc, w, piece: bytes, if_id: int, room: int, key_pids=()) -> tuple[bytes, list[Result]]:
    """Encode all of piece with `room` bytes of output per call, as pcapng_mode does."""
    enc.set_key_pids(key_pids)
    out_all, results, pos = b"", [], 0
    while True:
        out = bytearray(room)
        res = Result()
        res.reset()
        res.pos = pos
        with Pinned(piece) as src, Pinned(out, writable=True) as dst:
            while True:
                enc.encode(src.addr, len(piece), dst.addr, len(out), if_id, WALL, res)
                if res.status != NEED_TRAILER:
                    break
                enc.add_trailer(enc.key_at(src.addr, len(piece), res.pos), trailer_for(w, piece[res.pos:]))
        assert res.status in (DONE, OUT_FULL)
        out_all += bytes(out[:res.out_len])
        results.append(res)
        if res.status == DONE:
            return out_all, results
        assert res.pos > pos or res.count == 0
        if res.count == 0:
            pytest.fail("no room for one packet")
        pos = res.pos


def test_result_struct_matches_c():
    from tlstap.sinks import epb_native
    lib = epb_native._load()
    got = (ctypes.c_uint64 * 10)()
    lib.epb_result_layout(got)
    assert list(got) == [getattr(Result, name).offset for name, _ in Result._fields_] + [ctypes.sizeof(Result)]


@pytest.fixture
def writer(tmp_path):
    w = PcapngWriter(str(tmp_path / "x.pcapng"))
    if_id = w.add_interface("lo", LINKTYPE_ETHERNET)
    yield w, if_id
    w.close()


def test_same_bytes_as_python_whatever_the_sizes(writer):
    w, if_id = writer
    nginx, wrk = (10, 0, b"nginx"), (20, 0, b"wrk")
    recs = [record(1000 + i, os.urandom(n), sender=s, receiver=r)
            for i, (n, s, r) in enumerate([(66, wrk, nginx), (65483, nginx, wrk), (1, nginx, wrk),
                                           (2, wrk, nginx), (3, (0, 0, b""), wrk), (0, nginx, wrk),
                                           (1500, nginx, (0, 0, b""))])]
    recs.insert(3, record(1002, b"gone", discard=True))
    piece = b"".join(recs)
    got, results = native_epbs(EpbEncoder(), w, piece, if_id, room=1 << 20)
    assert got == python_epbs(w, recs, if_id)
    (res,) = results
    assert res.count == 7 and res.crossed == 0
    assert (res.first_ts, res.last_ts) == (1000 + WALL, 1006 + WALL)


def test_little_room_splits_between_packets(writer):
    w, if_id = writer
    recs = [record(i, os.urandom(5000 + i)) for i in range(20)]
    piece = b"".join(recs)
    got, results = native_epbs(EpbEncoder(), w, piece, if_id, room=12_000)
    assert got == python_epbs(w, recs, if_id)
    assert len(results) == 10 and all(r.count == 2 for r in results)


def test_hold_starts_at_the_first_packet_that_may_need_a_later_secret(writer):
    w, if_id = writer
    server, client = (10, 0, b"nginx"), (20, 0, b"curl")
    recs = [record(1, b"a" * 10, sender=client, flags=abi.PktFlag.TO_LISTENER),   # to the server
            record(2, b"b" * 10, sender=server),       # server has logged secrets: no wait
            record(3, b"c" * 10, sender=(30, 0, b"x")),   # sender logged none, not to a listener
            record(4, b"d" * 10, sender=server)]
    piece = b"".join(recs)
    _, (res,) = native_epbs(EpbEncoder(), w, piece, if_id, room=1 << 16, key_pids=[10])
    assert res.hold_idx == 2 and res.hold_off == len(python_epbs(w, recs[:2], if_id))
    _, (res,) = native_epbs(EpbEncoder(), w, piece, if_id, room=1 << 16, key_pids=[10, 30])
    assert res.hold_off == NO_HOLD


def test_crossed_timestamps_are_counted(writer):
    w, if_id = writer
    piece = b"".join(record(ts, b"x") for ts in (5, 7, 6, 8, 1))
    _, (res,) = native_epbs(EpbEncoder(), w, piece, if_id, room=1 << 16)
    assert res.crossed == 2


def test_a_record_shorter_than_its_caplen_is_refused(writer):
    w, if_id = writer
    rec = bytearray(record(1, b"abcd"))
    struct.pack_into("<I", rec, HDR_SZ + abi.PacketEvent.caplen.offset, 5000)
    rec = bytes(rec)
    enc, res, out = EpbEncoder(), Result(), bytearray(1 << 16)
    res.reset()
    with Pinned(rec) as src, Pinned(out, writable=True) as dst:
        enc.add_trailer(enc.key_at(src.addr, len(rec), 0), trailer_for(w, rec))
        enc.encode(src.addr, len(rec), dst.addr, len(out), if_id, WALL, res)
    assert res.status == BAD and res.count == 0


def test_a_record_still_being_written_ends_the_piece(writer):
    """RingBuffer.take(scan=False) hands out all that was published, which can end in a
    record whose producer has not committed it (BUSY) and in one cut short: the encoder
    stops at the first of them, and says where (the ring's consumer moves that far)."""
    w, if_id = writer
    done = [record(1, b"a" * 100), record(2, b"b" * 7)]
    busy = record(3, b"c" * 50, busy=True)
    piece = b"".join(done) + busy + record(4, b"d" * 9)
    got, (res,) = native_epbs(EpbEncoder(), w, piece, if_id, room=1 << 16)
    assert res.status == DONE and res.count == 2 and res.pos == len(b"".join(done))
    assert got == python_epbs(w, done, if_id)
    assert records(piece)[1] == res.pos              # the Python path stops there too
    cut = b"".join(done) + record(5, b"e" * 64)[:-16]
    _, (res,) = native_epbs(EpbEncoder(), w, cut, if_id, room=1 << 16)
    assert res.count == 2 and res.pos == len(b"".join(done))
