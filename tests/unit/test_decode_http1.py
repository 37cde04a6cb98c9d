"""tlstap.decode.http1 (+ encoding, websocket): scripts of (side, bytes) in, events out.

Each case is fed whole, one byte at a time, and (small cases) split at every position,
and must decode the same way (h11's test_io approach, STYLE.md lesson 14)."""
from __future__ import annotations

import gzip
import importlib.util
import os
import struct
import time
import tracemalloc
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import need
from tlstap.decode.encoding import decode_content
from tlstap.decode.events import DecodeError, Frame, Message, Note, Raw, Side
from tlstap.decode.http1 import MAX_CHUNK_LINE, MAX_HEAD, MAX_HEADERS, Http1Decoder
from tlstap.decode.websocket import unmask

C, S = Side.CLIENT, Side.SERVER
EOF = b""


# -- helpers ------------------------------------------------------------------------------
def _merge_raw(events):
    """Raw chunking depends on how bytes arrived; join adjacent Raw of one side."""
    out = []
    for e in events:
        if isinstance(e, Raw) and out and isinstance(out[-1], Raw) and out[-1].side == e.side:
            out[-1] = Raw(e.side, out[-1].data + e.data, out[-1].ts_ns)
        else:
            out.append(e)
    return [Raw(e.side, e.data, 0) if isinstance(e, Raw) else e for e in out]


def run(script, *, split=None, close=True, **kw):
    """Feed script [(side, bytes), ...] (b"" = EOF); ts of step i is i+1. split(data) ->
    pieces. Returns the events, Raw merged."""
    dec = Http1Decoder(**kw)
    events = []
    for i, (side, data) in enumerate(script):
        pieces = [data] if not data or split is None else split(data)
        for p in pieces:
            events += dec.feed(side, p, i + 1)
    if close:
        events += dec.close()
    return _merge_raw(events)


def bytewise(data):
    return [data[i:i + 1] for i in range(len(data))]


def check_splits(script, every=True, **kw):
    """Same events whole, byte by byte, and (every=True) split in two at every position of
    every step. Returns the events."""
    whole = run(script, **kw)
    assert run(script, split=bytewise, **kw) == whole
    if every:
        for i, (side, data) in enumerate(script):
            for cut in range(1, len(data)):
                dec = Http1Decoder(**kw)
                events = []
                for j, (sd, d) in enumerate(script):
                    parts = [d[:cut], d[cut:]] if j == i and d else [d]
                    for p in parts:
                        events += dec.feed(sd, p, j + 1)
                events += dec.close()
                assert _merge_raw(events) == whole, (i, cut)
    return whole


def msgs(events):
    return [e for e in events if isinstance(e, Message)]


def req(method="GET", target="/", headers=(("Host", "example.com"),), body=b"", ver="1.1"):
    h = "".join(f"{k}: {v}\r\n" for k, v in headers)
    return f"{method} {target} HTTP/{ver}\r\n{h}\r\n".encode("latin-1") + body


def resp(status=200, reason="OK", headers=(), body=b"", ver="1.1", cl=True):
    hs = list(headers)
    if cl:
        hs.append(("Content-Length", str(len(body))))
    h = "".join(f"{k}: {v}\r\n" for k, v in hs)
    return f"HTTP/{ver} {status} {reason}\r\n{h}\r\n".encode("latin-1") + body


def chunked(body: bytes, sizes=(3, 1, 7), trailers=()) -> bytes:
    out, i, k = b"", 0, 0
    while i < len(body):
        n = sizes[k % len(sizes)]
        k += 1
        out += b"%x\r\n" % len(body[i:i + n]) + body[i:i + n] + b"\r\n"
        i += n
    out += b"0\r\n" + b"".join(f"{a}: {b}\r\n".encode() for a, b in trailers) + b"\r\n"
    return out


# -- basic messages ------------------------------------------------------------------------
def test_get_and_response_split_everywhere():
    ev = check_splits([(C, req(headers=(("Host", "a.example"), ("X-Mixed-Case", "v  v")))),
                       (S, resp(body=b"hello", headers=(("Server", "t"),)))])
    rq, rs = msgs(ev)
    assert (rq.method, rq.target, rq.proto, rq.authority, rq.stream_id) == \
        ("GET", "/", "HTTP/1.1", "a.example", 1)
    assert rq.headers == (("Host", "a.example"), ("X-Mixed-Case", "v  v"))
    assert (rs.status, rs.reason, rs.body, rs.body_len, rs.stream_id, rs.complete) == \
        (200, "OK", b"hello", 5, 1, True)
    assert rs.headers == (("Server", "t"), ("Content-Length", "5"))
    assert rs.ts_start_ns == 2 and rs.ts_end_ns == 2
    assert rs.side is S and rq.side is C


def test_post_with_body_and_lenient_syntax():
    raw = (b"\r\nPOST  /up?q=1  HTTP/1.0\nHost: h\nContent-Type : text/plain\n"
           b"X-Fold: a\n  b\nContent-Length: 4, 4\n\nbody")
    ev = check_splits([(C, raw), (S, b"HTTP/1.0 201\r\nContent-Length: 0\r\n\r\n")])
    rq, rs = msgs(ev)
    assert rq.method == "POST" and rq.target == "/up?q=1" and rq.proto == "HTTP/1.0"
    assert rq.header("content-type") == "text/plain"
    assert rq.header("x-fold") == "a b"
    assert rq.body == b"body"
    assert rs.status == 201 and rs.reason == ""


def test_latin1_header_values_roundtrip():
    ev = run([(C, b"GET /\xe4 HTTP/1.1\r\nX: caf\xe9\r\n\r\n")])
    (m,) = msgs(ev)
    assert m.target == "/\xe4" and m.header("x") == "caf\xe9"
    assert m.header("x").encode("latin-1") == b"caf\xe9"


def test_pipelining_with_head_and_methods_fifo():
    script = [(C, req("GET", "/a") + req("HEAD", "/b") + req("GET", "/c")),
              (S, resp(body=b"AAA")
               + b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"   # HEAD: no body
               + resp(body=b"CC"))]
    ev = check_splits(script)
    r = msgs(ev)
    assert [m.method for m in r[:3]] == ["GET", "HEAD", "GET"]
    assert [(m.stream_id, m.body) for m in r[3:]] == [(1, b"AAA"), (2, b""), (3, b"CC")]
    assert r[4].header("content-length") == "1000" and r[4].body_len == 0


def test_interleaved_request_response():
    script = []
    for i in range(5):
        script += [(C, req(target=f"/{i}")), (S, resp(body=b"x" * i))]
    r = msgs(check_splits(script, every=False))
    assert [m.stream_id for m in r] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_thousand_keepalive_no_growth():
    dec = Http1Decoder()
    one_req = req(target="/k", headers=(("Host", "h"), ("Connection", "keep-alive")))
    one_resp = resp(body=b"ok" * 50)
    n = 0

    def round_(k):
        nonlocal n
        for _ in range(k):
            n += len(msgs(dec.feed(C, one_req, 1))) + len(msgs(dec.feed(S, one_resp, 2)))

    round_(100)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    round_(1000)
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert n == 2200
    assert grown < 20_000, grown
    assert not dec._pending and not dec._halves[C].buf and not dec._halves[S].buf


def test_chunked_with_extensions_and_trailers():
    body = b"The quick brown fox jumps over the lazy dog"
    wire = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            .replace(b"gzip, ", b""))
    wire += b"5;ext=1;q=\"x\"\r\n" + body[:5] + b"\r\n" + chunked(body[5:], trailers=(
        ("X-Checksum", "abc"), ("X-Other", "d")))
    ev = check_splits([(C, req()), (S, wire)])
    rs = msgs(ev)[1]
    assert rs.body == body and rs.body_len == len(body)
    assert rs.trailers == (("X-Checksum", "abc"), ("X-Other", "d"))
    assert rs.complete


def test_chunked_bare_lf_and_upper_hex():
    wire = b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n\nA\n0123456789\n0\n\n"
    rs = msgs(check_splits([(C, req()), (S, wire)]))[1]
    assert rs.body == b"0123456789"


def test_chunked_request():
    wire = b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(b"abcdefghij")
    rq = msgs(check_splits([(C, wire)]))[0]
    assert rq.body == b"abcdefghij" and rq.complete


def test_transfer_encoding_wins_over_content_length():
    wire = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked(b"hello"))
    assert msgs(run([(C, req()), (S, wire)]))[1].body == b"hello"


def test_read_until_close_eof_and_close():
    script = [(C, req()), (S, b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nall the"), (S, b" rest"),
              (S, EOF)]
    rs = msgs(check_splits(script))[1]
    assert rs.body == b"all the rest" and rs.complete and rs.ts_end_ns == 3
    # end of capture without EOF: we cannot know it was whole
    rs = msgs(run(script[:-1]))[1]
    assert rs.body == b"all the rest" and not rs.complete


def test_response_te_not_chunked_reads_until_close():
    rs = msgs(run([(C, req()), (S, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz"),
                   (S, EOF)]))[1]
    assert rs.body == b"zz" and rs.complete


def test_incomplete_at_close():
    ev = run([(C, req("POST", headers=(("Content-Length", "10"),), body=b"abc"))])
    (m,) = msgs(ev)
    assert not m.complete and m.body == b"abc" and m.body_len == 3


def test_partial_head_at_close_is_raw():
    ev = run([(C, b"GET / HTTP/1.1\r\nHost: a")])
    assert ev == [Raw(C, b"GET / HTTP/1.1\r\nHost: a", 0)]


def test_eof_mid_message_and_data_after_eof():
    dec = Http1Decoder()
    dec.feed(C, req("POST", headers=(("Content-Length", "5"),), body=b"ab"), 1)
    (m,) = dec.feed(C, EOF, 2)
    assert not m.complete and m.body == b"ab"
    assert dec.feed(C, EOF, 3) == []
    with pytest.raises(DecodeError, match="after EOF"):
        dec.feed(C, b"x", 4)


def test_closed_decoder_refuses():
    dec = Http1Decoder()
    dec.close()
    assert dec.close() == []
    with pytest.raises(DecodeError):
        dec.feed(C, b"GET", 1)


# -- bodiless responses --------------------------------------------------------------------
@pytest.mark.parametrize("status", [204, 304])
def test_204_304_have_no_body(status):
    script = [(C, req() + req(target="/2")),
              (S, b"HTTP/1.1 %d X\r\nContent-Length: 12\r\n\r\n" % status + resp(body=b"2"))]
    r = msgs(check_splits(script))
    assert r[2].status == status and r[2].body_len == 0 and r[2].stream_id == 1
    assert r[3].body == b"2" and r[3].stream_id == 2


def test_expect_100_continue():
    script = [(C, req("POST", headers=(("Content-Length", "4"), ("Expect", "100-continue")))),
              (S, b"HTTP/1.1 100 Continue\r\n\r\n"),
              (C, b"data"),
              (S, b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n" + resp(body=b"done"))]
    r = msgs(check_splits(script))
    # order: request head completes only with its body, the 100 comes first
    assert [(m.side, m.status, m.stream_id) for m in r] == \
        [(S, 100, 1), (C, None, 1), (S, 103, 1), (S, 200, 1)]
    assert r[1].body == b"data" and r[3].body == b"done"


def test_early_final_response_before_request_body():
    # server answers 413 while the client is still sending; the request's method is known
    script = [(C, req("POST", headers=(("Content-Length", "6"),), body=b"abc")),
              (S, resp(413, "Too Large", body=b"no")),
              (C, b"def")]
    r = msgs(run(script))
    assert [(m.status, m.stream_id) for m in r] == [(413, 1), (None, 1)]


def test_response_without_request_seen():
    r = msgs(run([(S, resp(body=b"x"))]))
    assert r[0].stream_id == 0


# -- CONNECT and upgrades ------------------------------------------------------------------
def test_connect_tunnel():
    script = [(C, b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n\x16\x03\x01hello"),
              (S, b"HTTP/1.1 200 Connection established\r\n\r\n\x16\x03\x03srv"),
              (C, b"more")]
    ev = check_splits(script)
    assert [type(e).__name__ for e in ev] == ["Message", "Message", "Note", "Raw", "Raw", "Raw"]
    # the client's held bytes come out when the 200 releases them, before the server's
    assert ev[2] == Note(None, "CONNECT tunnel; the rest is not decoded", 2)
    assert ev[3:] == [Raw(C, b"\x16\x03\x01hello", 0), Raw(S, b"\x16\x03\x03srv", 0),
                      Raw(C, b"more", 0)]


def test_connect_refused_resumes_http():
    script = [(C, b"CONNECT x:1 HTTP/1.1\r\n\r\n" + req(target="/after")),
              (S, resp(407, "Proxy Auth", body=b"no") + resp(body=b"ok"))]
    r = msgs(check_splits(script))
    assert [(m.method, m.status, m.stream_id) for m in r] == [
        ("CONNECT", None, 1), (None, 407, 1), ("GET", None, 2), (None, 200, 2)]


def test_h2c_upgrade_becomes_raw():
    script = [(C, req(headers=(("Host", "h"), ("Connection", "Upgrade, HTTP2-Settings"),
                               ("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAAP__")))),
              (S, b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                  b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"),
              (C, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")]
    ev = check_splits(script)
    notes = [e for e in ev if isinstance(e, Note)]
    assert notes[0].text == "upgraded to h2c; the rest is not decoded"
    assert ev[-2:] == [Raw(S, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", 0),
                       Raw(C, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 0)]


def test_upgrade_declined_resumes_http():
    script = [(C, req(headers=(("Connection", "upgrade"), ("Upgrade", "websocket")))
               + req(target="/next")),
              (S, resp(400, "Bad", body=b"") + resp(body=b"n"))]
    r = msgs(check_splits(script))
    assert [(m.side, m.stream_id) for m in r] == [(C, 1), (S, 1), (C, 2), (S, 2)]


# -- WebSocket -----------------------------------------------------------------------------
def ws_frame(opcode, payload, fin=True, mask=None, rsv1=False):
    b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, m | n)
    elif n < 65536:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if mask:
        xored = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return head + mask + xored
    return head + payload


WS_REQ = req("GET", "/chat", headers=(("Host", "h"), ("Upgrade", "websocket"),
                                      ("Connection", "Upgrade"),
                                      ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                      ("Sec-WebSocket-Version", "13")))
WS_101 = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


def frames(events):
    return [e for e in events if isinstance(e, Frame)]


def test_websocket_rfc6455_examples():
    # RFC 6455 §5.7 examples, verbatim
    script = [(C, WS_REQ),
              (S, WS_101 + b"\x81\x05\x48\x65\x6c\x6c\x6f"),                # unmasked "Hello"
              (C, b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"),          # masked "Hello"
              (S, b"\x01\x03\x48\x65\x6c" + b"\x80\x02\x6c\x6f"),           # fragmented
              (C, b"\x89\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"),          # masked ping
              (S, b"\x8a\x05\x48\x65\x6c\x6c\x6f")]                         # pong
    ev = check_splits(script)
    assert Note(None, "upgraded to websocket", 2) in ev
    f = frames(ev)
    assert [(x.side, x.type, x.payload) for x in f] == [
        (S, "text", b"Hello"), (C, "text", b"Hello"), (S, "text", b"Hello"),
        (C, "ping", b"Hello"), (S, "pong", b"Hello")]
    assert f[1].flags == ("FIN", "MASKED")
    assert ("fragments", "2") in f[2].info
    assert all(x.proto == "WebSocket" for x in f)


def test_websocket_lengths_fragments_control_interleaved_close():
    mask = b"\x01\x02\x03\x04"
    big = os.urandom(70_000)
    mid = bytes(range(256)) * 2
    client = (ws_frame(2, big, mask=mask)
              + ws_frame(1, b"frag1-", fin=False, mask=mask)
              + ws_frame(9, b"p", mask=mask)                     # ping between fragments
              + ws_frame(0, b"frag2-", fin=False, mask=mask)
              + ws_frame(0, b"end", mask=mask)
              + ws_frame(8, struct.pack("!H", 1000) + b"bye", mask=mask))
    server = ws_frame(2, mid) + ws_frame(8, struct.pack("!H", 1001))
    script = [(C, WS_REQ), (S, WS_101), (C, client), (S, server)]
    for ev in (run(script), run(script, split=lambda d: [d[i:i + 999] for i in
                                                            range(0, len(d), 999)])):
        f = frames(ev)
        assert [(x.side, x.type) for x in f] == [
            (C, "binary"), (C, "ping"), (C, "text"), (C, "close"), (S, "binary"), (S, "close")]
        assert f[0].payload == big and ("length", "70000") in f[0].info
        assert f[2].payload == b"frag1-frag2-end" and ("fragments", "3") in f[2].info
        assert dict(f[3].info) == {"code": "1000", "reason": "bye"}
        assert f[4].payload == mid
        assert dict(f[5].info) == {"code": "1001", "reason": ""}


def test_websocket_truncated_by_max_body_and_incomplete_at_close():
    payload = b"z" * 1000
    script = [(C, WS_REQ), (S, WS_101 + ws_frame(2, payload) + ws_frame(1, b"abc")[:-1])]
    f = frames(run(script, max_body=10))
    assert f[0].payload == b"z" * 10 and ("truncated", "true") in f[0].info
    assert ("length", "1000") in f[0].info
    assert f[1].type == "text" and f[1].payload == b"ab" and ("complete", "false") in f[1].info


def test_websocket_pipelined_client_bytes_wait_for_101():
    # client frames captured before the 101 was seen are held, then parsed as frames
    mask = b"abcd"
    script = [(C, WS_REQ + ws_frame(1, b"early", mask=mask)), (S, WS_101)]
    f = frames(check_splits(script))
    assert [(x.side, x.payload) for x in f] == [(C, b"early")]


def test_websocket_errors():
    for bad in (b"\x83\x00",                     # reserved opcode
                b"\x09\x00",                     # fragmented ping
                b"\x89\x7e\x00\x7e" + b"x" * 126,  # control frame > 125
                b"\x80\x00",                     # continuation with no message
                b"\x01\x01a\x01\x01b",           # new message inside a fragmented one
                b"\x82\x7f\x80" + b"\x00" * 7):  # 64-bit length with the top bit
        dec = Http1Decoder()
        dec.feed(C, WS_REQ, 1)
        with pytest.raises(DecodeError, match="websocket"):
            dec.feed(S, WS_101 + bad, 2)


def test_websocket_unmask_offsets():
    data, mask = os.urandom(1001), os.urandom(4)
    whole = unmask(data, mask)
    assert whole == bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert unmask(data[:3], mask) + unmask(data[3:], mask, 3) == whole


def test_websocket_real_frames_from_websockets_package():
    need(importlib.util.find_spec("websockets"), "websockets is not installed (pip install .[test])")
    import websockets.extensions.permessage_deflate as pmd
    import websockets.frames as frames_mod
    Fr, Op = frames_mod.Frame, frames_mod.Opcode
    text = ("héllo wörld " * 300).encode()
    client = b"".join(f.serialize(mask=True) for f in (
        Fr(Op.TEXT, text), Fr(Op.BINARY, b"\x00" * 200, fin=False), Fr(Op.CONT, b"\x01"),
        Fr(Op.PING, b"p"), Fr(Op.CLOSE, frames_mod.Close(1000, "done").serialize())))
    server = Fr(Op.BINARY, bytes(70000)).serialize(mask=False)
    f = frames(run([(C, WS_REQ), (S, WS_101 + server), (C, client)]))
    assert [(x.side, x.type) for x in f] == [(S, "binary"), (C, "text"), (C, "binary"),
                                             (C, "ping"), (C, "close")]
    assert f[0].payload == bytes(70000) and f[1].payload == text
    assert f[2].payload == b"\x00" * 200 + b"\x01"
    assert dict(f[4].info)["reason"] == "done"

    # permessage-deflate (RFC 7692) with context takeover, as websockets sends it
    c_ext = pmd.PerMessageDeflate(False, False, 15, 15)
    s_ext = pmd.PerMessageDeflate(False, False, 15, 15)
    msgs_c = [b"compress me " * 100, b"compress me " * 100 + b"again"]
    client = b"".join(Fr(Op.TEXT, m).serialize(mask=True, extensions=[c_ext]) for m in msgs_c)
    server = b"".join(Fr(Op.BINARY, m).serialize(mask=False, extensions=[s_ext])
                      for m in (b"s" * 5000, b"s" * 5000))
    wire101 = WS_101.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate"
                                         b"\r\n\r\n")
    ev = run([(C, WS_REQ), (S, wire101 + server), (C, client)])
    assert Note(None, "upgraded to websocket (permessage-deflate)", 2) in ev
    f = frames(ev)
    assert [x.payload for x in f] == [b"s" * 5000, b"s" * 5000] + msgs_c
    assert all(dict(x.info)["permessage-deflate"] == "inflated" for x in f)
    assert int(dict(f[3].info)["length"]) < len(msgs_c[1]) // 5   # the second reused context
    assert "RSV1" in f[0].flags


# -- content encodings ---------------------------------------------------------------------
TEXT = b"<html>" + b"tlstap decodes HTTP bodies. " * 200 + b"</html>"


def _enc(name, data=TEXT):
    if name == "gzip":
        return gzip.compress(data)
    if name == "deflate":
        return zlib.compress(data)
    if name == "deflate-raw":
        c = zlib.compressobj(wbits=-15)
        return c.compress(data) + c.flush()
    if name == "br":
        import brotli
        return brotli.compress(data)
    if name == "zstd":
        import zstandard
        return zstandard.ZstdCompressor().compress(data)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["gzip", "deflate", "deflate-raw", "br", "zstd"])
def test_content_encoding(name):
    coded = _enc(name)
    header = name.split("-")[0]
    script = [(C, req()), (S, resp(headers=(("Content-Encoding", header),), body=coded))]
    rs = msgs(check_splits(script, every=False))[1]
    assert rs.body == coded and rs.decoded_body == TEXT and rs.decode_error is None


def test_content_encoding_chunked_stacked_and_multimember():
    coded = _enc("br", _enc("gzip"))                 # gzip applied first, then br
    wire = (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Encoding: br\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + chunked(coded, sizes=(100, 7)))
    rs = msgs(run([(C, req()), (S, wire)]))[1]
    assert rs.decoded_body == TEXT
    assert decode_content(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip") == (b"abcd", None)
    assert decode_content(b"x", "identity") == (None, None)
    import zstandard
    z = zstandard.ZstdCompressor()
    assert decode_content(z.compress(b"ab") + z.compress(b"cd"), "zstd") == (b"abcd", None)


def test_content_encoding_failures_never_raise():
    assert decode_content(b"nope", "gzip")[1].startswith("gzip:")
    assert decode_content(gzip.compress(TEXT)[:-10], "gzip") == (None, "gzip: data truncated")
    assert decode_content(b"nope", "br")[1].startswith("br:")
    assert decode_content(_enc("br")[:-3], "br")[0] is None
    assert decode_content(b"nope", "zstd")[1].startswith("zstd:")
    assert decode_content(_enc("zstd")[:-3], "zstd") == (None, "zstd: data truncated")
    assert decode_content(b"nope", "deflate")[1].startswith("deflate:")
    assert decode_content(b"x", "compress") == (None, "unsupported content-encoding 'compress'")
    rs = msgs(run([(C, req()), (S, resp(headers=(("Content-Encoding", "gzip"),),
                                        body=b"not gzip"))]))[1]
    assert rs.decoded_body is None and rs.decode_error.startswith("gzip:")
    assert rs.body == b"not gzip"


@pytest.mark.parametrize("name", ["gzip", "deflate", "br", "zstd"])
def test_decompression_bomb_is_bounded(name):
    zeros = bytes(64 << 20)                          # 64 MiB of zeros
    coded = _enc(name, zeros)
    assert len(coded) < 1 << 20
    tracemalloc.start()
    out, err = decode_content(coded, name, limit=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out == bytes(1 << 20) and "truncated" in err
    assert peak < 8 << 20, peak


def test_max_body_truncates_and_skips_decoding():
    coded = gzip.compress(TEXT)
    script = [(C, req("POST", headers=(("Content-Length", "100"),), body=b"q" * 100)),
              (S, resp(headers=(("Content-Encoding", "gzip"),), body=coded))]
    rq, rs = msgs(run(script, max_body=10))
    assert rq.body == b"q" * 10 and rq.body_len == 100 and rq.body_truncated
    assert rs.body == coded[:10] and rs.body_len == len(coded) and rs.body_truncated
    assert rs.decoded_body is None and "max_body" in rs.decode_error
    rq, rs = msgs(run(script, max_body=0))
    assert rq.body == b"" and rq.body_len == 100
    rs = msgs(run(script[:1] + [(S, resp(headers=(("Content-Encoding", "gzip"),),
                                         body=coded)[:-5])]))[1]
    assert not rs.complete and rs.decoded_body is None and "incomplete" in rs.decode_error


# -- joining mid-stream --------------------------------------------------------------------
def test_joined_mid_stream_resyncs():
    script = [(S, b"ody of an earlier response}" + resp(body=b"r2")),
              (C, b"ms=1 HTTP/1.1\r\nHost: x\r\n\r\n" + req(target="/3")),
              (S, resp(body=b"r3"))]
    ev = check_splits(script, joined_mid_stream=True)
    assert ev[0] == Note(S, "joined mid-stream", 1)
    assert ev[1] == Raw(S, b"ody of an earlier response}", 0)
    r = msgs(ev)
    # r2 began before any request we saw: its request was not seen
    assert [(m.side, m.status, m.target, m.stream_id) for m in r] == [
        (S, 200, None, 0), (C, None, "/3", 1), (S, 200, None, 1)]
    assert Raw(C, b"ms=1 HTTP/1.1\r\nHost: x\r\n\r\n", 0) in ev


def test_not_a_start_line_first_resyncs_without_flag():
    ev = run([(C, b"\x00\x01binary stuff\n" + req(target="/x"))])
    assert ev[0] == Note(C, "joined mid-stream", 1)
    assert ev[1] == Raw(C, b"\x00\x01binary stuff\n", 0)
    assert msgs(ev)[0].target == "/x"


def test_resync_never_guesses():
    # "GET" inside text without a full request line is not a start
    ev = run([(C, b"xx GET the thing HTTP/1.1 yy\r\n")], joined_mid_stream=True)
    assert not msgs(ev)
    assert ev == [Note(C, "joined mid-stream", 1), Raw(C, b"xx GET the thing HTTP/1.1 yy\r\n", 0)]


def test_resync_bounded_memory_on_long_garbage():
    dec = Http1Decoder(joined_mid_stream=True)
    total = 0
    for _ in range(100):
        total += sum(len(e.data) for e in dec.feed(C, b"a" * 100_000, 1) if isinstance(e, Raw))
    assert len(dec._halves[C].buf) <= 16 << 10
    total += sum(len(e.data) for e in dec.close() if isinstance(e, Raw))
    assert total == 10_000_000


def test_false_start_inside_body_goes_back_to_skipping():
    ev = run([(C, b"junk GET / HTTP/1.1\r\nnot a header\r\n\r\n" + req(target="/ok"))],
             joined_mid_stream=True)
    assert [m.target for m in msgs(ev)] == ["/ok"]


# -- garbage and limits --------------------------------------------------------------------
@pytest.mark.parametrize("wire,why", [
    (b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    (b"Transfer-Encoding: chunked\r\n\r\n1\r\nab", "no CRLF after chunk"),
    (b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * (MAX_CHUNK_LINE + 10), "chunk-size line"),
    (b"Transfer-Encoding: chunked\r\n\r\n11111111111111111\r\n", "bad chunk size"),
    (b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n", "conflicting Content-Length"),
    (b"Content-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"Content-Length: \xb2\r\n\r\n", "bad Content-Length"),
    (b"X: " + b"a" * MAX_HEAD + b"\r\n\r\n", "head over"),
    (b"".join(b"X: y\r\n" for _ in range(MAX_HEADERS + 1)) + b"\r\n", "over 2000 header"),
    (b"no colon here\r\n\r\n", "without a colon"),
])
def test_garbage_after_first_message_raises_decode_error(wire, why):
    for split in (None, bytewise) if len(wire) < 5000 else (None,):
        dec = Http1Decoder()
        dec.feed(C, req(), 1)
        dec.feed(S, resp(), 2)
        dec.feed(C, req(), 3)
        with pytest.raises(DecodeError, match=why):
            for p in ([b"HTTP/1.1 200 OK\r\n" + wire] if split is None
                      else bytewise(b"HTTP/1.1 200 OK\r\n" + wire)):
                dec.feed(S, p, 4)


def test_request_te_without_chunked_and_bad_start_after_message():
    dec = Http1Decoder()
    dec.feed(C, req(), 1)
    with pytest.raises(DecodeError, match="does not end in chunked"):
        dec.feed(C, b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 2)
    dec = Http1Decoder()
    dec.feed(C, req(), 1)
    with pytest.raises(DecodeError, match="not a start line"):
        dec.feed(C, b"\x16\x03\x01\x00", 2)
    dec = Http1Decoder()
    dec.feed(C, req(), 1)
    with pytest.raises(DecodeError, match="bad request line 'PRI"):
        dec.feed(C, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 2)


def test_pipeline_depth_bounded():
    dec = Http1Decoder()
    ev = []
    for _ in range(1100):
        ev += dec.feed(C, req(), 1)
    assert len(dec._pending) == 1024
    assert sum(isinstance(e, Note) for e in ev) == 1


# -- Hypothesis ----------------------------------------------------------------------------
_cuts = st.lists(st.integers(min_value=1, max_value=64), max_size=50)


def _split_by(data, cuts):
    out, i = [], 0
    for c in cuts:
        if i >= len(data):
            break
        out.append(data[i:i + c])
        i += c
    if i < len(data):
        out.append(data[i:])
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from([C, S]),
                          st.one_of(st.binary(max_size=200),
                                    st.sampled_from([req(), resp(body=b"x"), WS_REQ, WS_101,
                                                     b"\r\n", b"0\r\n\r\n", b"HTTP/1.1 ",
                                                     b"Transfer-Encoding: chunked\r\n",
                                                     b"\x81\x05Hello"]))),
                max_size=12),
       st.booleans(), st.booleans())
def test_fuzz_arbitrary_bytes_only_decode_error(steps, joined, eof):
    dec = Http1Decoder(max_body=64, joined_mid_stream=joined)
    try:
        for side, data in steps:
            if data or eof:
                dec.feed(side, data, 1)
        dec.close()
    except DecodeError:
        pass


_token = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1,
                 max_size=12)
_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                               blacklist_characters="\x7f"), max_size=30).map(
    lambda s: s.strip(" \t"))


@st.composite
def _exchange(draw):
    method = draw(st.sampled_from(["GET", "POST", "PUT", "HEAD", "DELETE", "OPTIONS"]))
    target = "/" + draw(_token)
    hdrs = draw(st.lists(st.tuples(_token.filter(lambda t: t.lower() not in (
        "content-length", "transfer-encoding", "connection", "upgrade", "content-encoding")),
        _value), max_size=5))
    qbody = draw(st.binary(max_size=300)) if method in ("POST", "PUT") else b""
    qchunk = draw(st.booleans())
    q = f"{method} {target} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs)
    if qchunk and qbody:
        sizes = draw(st.lists(st.integers(1, 50), min_size=1, max_size=5))
        q = q.encode("latin-1") + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(qbody, sizes)
    else:
        q = q.encode("latin-1") + b"Content-Length: %d\r\n\r\n" % len(qbody) + qbody
    status = draw(st.sampled_from([200, 201, 204, 304, 404, 500]))
    rbody = draw(st.binary(max_size=300))
    interim = draw(st.booleans())
    r = b"HTTP/1.1 100 Continue\r\n\r\n" if interim else b""
    coding = draw(st.sampled_from([None, "gzip", "br"]))
    if coding == "gzip":
        rbody = gzip.compress(rbody)
    elif coding == "br":
        import brotli
        rbody = brotli.compress(rbody)
    ce = f"Content-Encoding: {coding}\r\n".encode() if coding else b""
    if draw(st.booleans()):
        sizes = draw(st.lists(st.integers(1, 80), min_size=1, max_size=5))
        tr = draw(st.lists(st.tuples(_token, _value), max_size=2))
        r += (b"HTTP/1.1 %d X\r\n" % status + ce + b"Transfer-Encoding: chunked\r\n\r\n"
              + (chunked(rbody, sizes, tr) if status not in (204, 304) and method != "HEAD"
                 else b""))
    else:
        r += b"HTTP/1.1 %d X\r\n" % status + ce + b"Content-Length: %d\r\n\r\n" % len(rbody)
        if status not in (204, 304) and method != "HEAD":
            r += rbody
    return q, r


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_exchange(), min_size=1, max_size=4), st.booleans(), _cuts, _cuts,
       st.sampled_from([None, 0, 7, 1000]))
def test_fuzz_valid_messages_split_anywhere_decode_like_whole(exchanges, pipelined, cuts_c,
                                                              cuts_s, max_body):
    if pipelined:
        script = [(C, b"".join(q for q, _ in exchanges)), (S, b"".join(r for _, r in exchanges))]
    else:
        script = [x for q, r in exchanges for x in ((C, q), (S, r))]
    whole = run(script, max_body=max_body)
    dec = Http1Decoder(max_body=max_body)
    events = []
    for i, (side, data) in enumerate(script):
        for p in _split_by(data, cuts_c if side is C else cuts_s):
            events += dec.feed(side, p, i + 1)
    events += dec.close()
    assert _merge_raw(events) == whole
    ms = msgs(whole)
    assert len([m for m in ms if m.side is C]) == len(exchanges)
    assert all(m.complete for m in ms)
    assert not [e for e in whole if not isinstance(e, Message)]
    finals = [m for m in ms if m.side is S and m.status >= 200]
    assert [m.stream_id for m in finals] == list(range(1, len(exchanges) + 1))
    assert all(m.decode_error is None for m in ms if not m.body_truncated)


# -- benchmark (opt-in) --------------------------------------------------------------------
@pytest.mark.skipif(not os.environ.get("TLSTAP_BENCH"), reason="set TLSTAP_BENCH=1 to run")
def test_bench(capsys):
    results = {}
    # large body in 64 KiB feeds
    body_total = 256 << 20
    dec = Http1Decoder(max_body=1 << 20)
    dec.feed(C, req(), 1)
    dec.feed(S, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % body_total, 2)
    chunk = os.urandom(64 << 10)
    t = time.perf_counter()
    for _ in range(body_total // len(chunk)):
        dec.feed(S, chunk, 3)
    results["body MB/s (64 KiB feeds, max_body 1 MiB)"] = body_total / (time.perf_counter() - t) / 1e6
    dec = Http1Decoder()
    dec.feed(C, req(), 1)
    dec.feed(S, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 2)
    cchunk = b"10000\r\n" + chunk + b"\r\n"
    t = time.perf_counter()
    for _ in range(64 << 20 >> 16):
        dec.feed(S, cchunk, 3)
    results["chunked MB/s (unbounded body)"] = (64 << 20) / (time.perf_counter() - t) / 1e6
    # small keep-alive pairs
    q = req(target="/api/v1/items?id=42", headers=(
        ("Host", "api.example.com"), ("User-Agent", "bench/1.0"), ("Accept", "*/*"),
        ("Connection", "keep-alive")))
    r = resp(headers=(("Content-Type", "application/json"), ("Server", "nginx"),
                      ("Date", "Mon, 01 Jan 2024 00:00:00 GMT")), body=b'{"ok":true}')
    n = 20000
    dec = Http1Decoder()
    t = time.perf_counter()
    for _ in range(n):
        dec.feed(C, q, 1)
        dec.feed(S, r, 2)
    results["keep-alive pairs/s"] = n / (time.perf_counter() - t)
    try:
        import h11
        t = time.perf_counter()
        srv, cli = h11.Connection(h11.SERVER), h11.Connection(h11.CLIENT)
        for _ in range(n // 4):
            srv.receive_data(q)
            while srv.next_event() not in (h11.NEED_DATA, h11.PAUSED):
                pass
            cli.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
            cli.send(h11.EndOfMessage())
            cli.receive_data(r)
            while cli.next_event() not in (h11.NEED_DATA, h11.PAUSED):
                pass
            srv.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            srv.send(h11.EndOfMessage())
            srv.start_next_cycle()
            cli.start_next_cycle()
        results["h11 pairs/s (server+client roles)"] = (n // 4) / (time.perf_counter() - t)
    except ImportError:
        pass
    try:
        import httptools

        class P:
            def on_header(self, name, value):
                pass

            def on_body(self, b):
                pass

            def on_message_complete(self):
                pass

        p = P()
        rp, sp = httptools.HttpRequestParser(p), httptools.HttpResponseParser(p)
        t = time.perf_counter()
        for _ in range(n):
            rp.feed_data(q)
            sp.feed_data(r)
        results["httptools pairs/s (callbacks only)"] = n / (time.perf_counter() - t)
        sp = httptools.HttpResponseParser(p)
        sp.feed_data(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % body_total)
        t = time.perf_counter()
        for _ in range(body_total // len(chunk)):
            sp.feed_data(chunk)
        results["httptools body MB/s (on_body no-op)"] = body_total / (time.perf_counter() - t) / 1e6
    except ImportError:
        pass
    with capsys.disabled():
        for k, v in results.items():
            print(f"BENCH {k}: {v:,.0f}")
