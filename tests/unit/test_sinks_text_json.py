"""sinks/text.py and sinks/jsonl.py: what they write for data, losses and the summary, for text,
binary, non-UTF-8 and terminal-control payloads. Written to real files (the direct-I/O path where
the file system has it) and checked against expectations built another way: JSON parsed back,
timestamps formatted with datetime, hexdumps parsed back into bytes."""
from __future__ import annotations

import base64
import datetime
import json
import re
import socket

import pytest

from tlstap.abi import Direction
from tlstap.decode.records import RecordDecoder
from tlstap.events import Conn, Endpoint, Lost, TlsData
from tlstap.sinks.jsonl import JsonSink
from tlstap.sinks.text import TextSink

from .test_records import record

TS = 1_700_000_123_456_789_012          # ns since the epoch
V4 = Conn(socket.AF_INET, Endpoint("127.0.0.1", 40000), Endpoint("10.1.2.3", 443))
V6 = Conn(socket.AF_INET6, Endpoint("::1", 5000), Endpoint("2001:db8::1", 8443))
COUNTERS = {"calls": 5, "records": 6, "bytes": 700, "trunc_calls": 1, "trunc_bytes": 20,
            "lost_records": 2, "lost_bytes": 30}


def data(payload: bytes, direction=Direction.WRITE, conn=V4, total=None, truncated=0, lost=0) -> TlsData:
    return TlsData(TS, 42, 43, 1000, "curl", 5, direction, conn, 0xABC0, payload,
                   len(payload) + truncated + lost if total is None else total, truncated, lost, False, 3)


def written(tmp_path, make, *calls) -> bytes:
    path = tmp_path / "out"
    sink = make(open(path, "wb"))
    for call in calls:
        call(sink)
    sink.close()
    return path.read_bytes()


def stamp(ts_ns: int) -> str:
    t = datetime.datetime.fromtimestamp(ts_ns // 1000 / 1e6, datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def unhexdump(text: bytes) -> bytes:
    """The bytes a hexdump shows, checking its layout: offsets in steps of 16, the ASCII column
    (printable as is, the rest '.') at a fixed place."""
    out = b""
    for i, line in enumerate(text.decode().splitlines()):
        m = re.fullmatch(r"([0-9a-f]{8})  ((?:[0-9a-f]{2} ){0,15}[0-9a-f]{2}) *  \|(.*)\|", line)
        assert m, line
        assert int(m[1], 16) == i * 16 and line.index("|") == 8 + 2 + 16 * 3 - 1 + 2, line
        chunk = bytes.fromhex(m[2])
        assert m[3] == "".join(chr(b) if 32 <= b < 127 else "." for b in chunk), line
        out += chunk
    return out


# ---------------------------------------------------------------- text

def test_text_header_and_printable_payload(tmp_path):
    out = written(tmp_path, TextSink, lambda s: s.on_data(data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")),
                  lambda s: s.on_data(data(b"no newline", direction=Direction.READ, conn=V6)))
    want = (f"{stamp(TS)} curl pid=42 tid=43 uid=1000 fd=5 WRITE 127.0.0.1:40000 -> 10.1.2.3:443 27 bytes\n"
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            f"{stamp(TS)} curl pid=42 tid=43 uid=1000 fd=5 READ [::1]:5000 <- [2001:db8::1]:8443 10 bytes\n"
            "no newline\n").encode()
    assert out == want


@pytest.mark.parametrize("payload", [bytes(range(256)), "héllo wörld".encode(), b"\x1b[2J\x1b]0;owned\x07",
                                     b"\xff\xfe not utf-8", b"x"])
def test_text_shows_anything_not_plain_ascii_as_a_hexdump(tmp_path, payload):
    """Binary, non-ASCII UTF-8 and terminal escapes must not reach the reader's terminal as they are."""
    out = written(tmp_path, TextSink, lambda s: s.on_data(data(payload)))
    head, body = out.split(b"\n", 1)
    assert head.endswith(f" {len(payload)} bytes".encode())
    if payload == b"x":
        assert body == b"x\n"
    else:
        assert b"\x1b" not in body and unhexdump(body) == payload


def test_text_hex_flag_dumps_text_too(tmp_path):
    out = written(tmp_path, lambda f: TextSink(f, hex_=True), lambda s: s.on_data(data(b"plain text")))
    assert unhexdump(out.split(b"\n", 1)[1]) == b"plain text"
    assert out.endswith(b"00000000  70 6c 61 69 6e 20 74 65 78 74" + b" " * 18 + b"  |plain text|\n")   # 47 - 29 columns


def test_text_truncation_loss_unknown_connection_lost_records_and_summary(tmp_path):
    out = written(tmp_path, TextSink,
                  lambda s: s.on_data(data(b"abc", conn=None, truncated=7, lost=2)),
                  lambda s: s.on_lost(Lost(3, 300, "decoder backlog full")),
                  lambda s: s.on_summary(COUNTERS, "interrupted: 5 calls"))
    assert out.decode().splitlines() == [
        f"{stamp(TS)} curl pid=42 tid=43 uid=1000 fd=5 WRITE conn ? 12 bytes "
        "[truncated 7 bytes over --max-payload] [lost 2 bytes: ring buffer full]",
        "abc",
        "[lost 3 records, 300 bytes: decoder backlog full]",
        "-- tlstap interrupted: 5 calls"]


@pytest.mark.parametrize("hex_", [False, True])
def test_text_fast_path_writes_what_on_data_writes(tmp_path, hex_):
    """RecordDecoder hands single-chunk calls to the sink's raw_data_handler when given it
    (fast=); the output must not depend on the path."""
    recs = [record(b"hello\n", ts=5_000_000_000), record(b"\x00\x01binary", direction=Direction.READ, ts=5_000_000_001),
            record(b"v6", family=socket.AF_INET6, local=("::1", 1), remote=("::2", 2), ts=7_000_000_000),
            record(b"nolf", family=0, ts=7_000_000_002)]
    outs = []
    for fast in (True, False):
        path = tmp_path / f"out-{fast}"
        sink = TextSink(open(path, "wb"), hex_=hex_)
        took = []

        def counted(dec, sink=sink, took=took):        # the fast path really is the one taken
            handler = sink.raw_data_handler(dec)
            return lambda *a: (took.append(1), handler(*a))
        dec = RecordDecoder(sink.on_data, 1 << 20, fast=counted if fast else None)
        for r in recs:
            dec.feed(r)
        sink.close()
        assert len(took) == (len(recs) if fast else 0)
        outs.append(path.read_bytes())
    assert outs[0] == outs[1] and outs[0].count(b" bytes\n") == 4


# ---------------------------------------------------------------- JSON

def lines(out: bytes) -> list[dict]:
    assert out.endswith(b"\n")
    return [json.loads(line) for line in out.split(b"\n")[:-1]]


@pytest.mark.parametrize("payload", [b"GET / HTTP/1.1\r\n\r\n", "héllo \u2028 wörld\n\x00".encode(),
                                     b"\xff\xfe\x00 not utf-8", bytes(range(256)), b""])
def test_json_data_record_round_trips_the_payload(tmp_path, payload):
    (rec,) = lines(written(tmp_path, JsonSink, lambda s: s.on_data(data(payload, truncated=4, lost=1))))
    try:
        text, enc = payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, enc = None, "base64"
    assert rec["encoding"] == enc
    if text is None:
        assert base64.b64decode(rec["data"], validate=True) == payload
    else:
        assert rec["data"] == text
    assert rec == {"type": "data", "ts_ns": TS, "pid": 42, "tid": 43, "uid": 1000, "comm": "curl", "fd": 5,
                   "dir": "write", "family": "ipv4", "local": {"ip": "127.0.0.1", "port": 40000},
                   "remote": {"ip": "10.1.2.3", "port": 443}, "ssl": "0xabc0", "conn": 3,
                   "len": len(payload), "total": len(payload) + 5, "truncated": 4, "lost": 1,
                   "encoding": enc, "data": rec["data"]}


def test_json_directions_families_lost_and_summary(tmp_path):
    out = written(tmp_path, JsonSink,
                  lambda s: s.on_data(data(b"r", direction=Direction.READ, conn=V6)),
                  lambda s: s.on_data(data(b"u", conn=None)),
                  lambda s: s.on_lost(Lost(3, 300, "ring buffer full")),
                  lambda s: s.on_summary(COUNTERS, "ignored in JSON"),
                  lambda s: s.on_summary({**COUNTERS, "backlog_dropped_records": 9}, ""))
    six, unknown, lost, summary, summary2 = lines(out)
    assert (six["dir"], six["family"], six["local"], six["remote"]) == \
        ("read", "ipv6", {"ip": "::1", "port": 5000}, {"ip": "2001:db8::1", "port": 8443})
    assert (unknown["family"], unknown["local"], unknown["remote"]) == (None, None, None)
    assert lost == {"type": "lost", "records": 3, "bytes": 300, "why": "ring buffer full"}
    assert summary == {"type": "summary", "calls": 5, "records": 6, "bytes": 700, "truncated_calls": 1,
                       "truncated_bytes": 20, "lost_records": 2, "lost_bytes": 30, "backlog_dropped_records": 0}
    assert summary2["backlog_dropped_records"] == 9
