"""tlstap.decode.http2: the passive HTTP/2 decoder.

Frames are built with hyperframe and one hpack.Encoder per direction (h2's FrameFactory
idea), or produced by the h2 library (a client and a server talking in memory), or by
grpcio over loopback. Every conversation is fed whole, one byte at a time and split at
random points, and must give the same events (STYLE.md lesson 14). Hypothesis checks that
any bytes raise only DecodeError (lesson 7).
"""
from __future__ import annotations

import gzip
import importlib.util
import random
import socket
import struct
import threading

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from hyperframe import frame as hf
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.conftest import need, need_tool
from tlstap.decode import http2
from tlstap.decode.events import DecodeError, Frame, GrpcMessage, Message, Note, Side
from tlstap.decode.grpc import is_grpc, split_messages
from tlstap.decode.http2 import PREFACE, Http2Decoder

C, S = Side.CLIENT, Side.SERVER


# -- building conversations ----------------------------------------------------------------

class FrameFactory:
    """Serialized frames; header blocks are encoded with one hpack.Encoder per side."""

    def __init__(self):
        self.enc = {C: hpack.Encoder(), S: hpack.Encoder()}

    def block(self, side, headers) -> bytes:
        return self.enc[side].encode(headers)

    def headers(self, side, sid, headers, end_stream=False, end_headers=True, pad=0,
                priority=False) -> bytes:
        f = hf.HeadersFrame(sid)
        f.data = self.block(side, headers)
        self._flags(f, end_stream=end_stream, end_headers=end_headers, pad=pad)
        if priority:
            f.flags.add("PRIORITY")
            f.depends_on, f.stream_weight = 0, 15
        return f.serialize()

    def data(self, sid, data, end_stream=False, pad=0) -> bytes:
        f = hf.DataFrame(sid, data)
        self._flags(f, end_stream=end_stream, pad=pad)
        return f.serialize()

    @staticmethod
    def _flags(f, end_stream=False, end_headers=False, pad=0):
        if end_stream:
            f.flags.add("END_STREAM")
        if end_headers:
            f.flags.add("END_HEADERS")
        if pad:
            f.flags.add("PADDED")
            f.pad_length = pad

    @staticmethod
    def settings(ack=False, **values) -> bytes:
        codes = {v: k for k, v in http2.SETTINGS_NAMES.items()}
        if ack:
            return hf.SettingsFrame(0, flags=["ACK"]).serialize()
        return hf.SettingsFrame(0, {codes[k.upper()]: v for k, v in values.items()}).serialize()

    @staticmethod
    def continuation(sid, fragment, end_headers=False) -> bytes:
        f = hf.ContinuationFrame(sid, fragment)
        if end_headers:
            f.flags.add("END_HEADERS")
        return f.serialize()

    def start(self):
        """Client preface + SETTINGS, server SETTINGS, both ACKs."""
        return [(C, PREFACE + self.settings()), (S, self.settings(max_concurrent_streams=100)),
                (C, self.settings(ack=True)), (S, self.settings(ack=True))]


def req(path="/", method="GET", authority="example.com", extra=()):
    return [(":method", method), (":path", path), (":authority", authority),
            (":scheme", "https"), *extra]


def feed_all(convo, mode="whole", seed=0, ts=0, **kw):
    """Feed [(side, bytes), ...] to a new decoder; return all events including close()."""
    dec = Http2Decoder(**kw)
    out = []
    rnd = random.Random(seed)
    for side, data in convo:
        if mode == "whole":
            pieces = [data]
        elif mode == "bytes":
            pieces = [data[i:i + 1] for i in range(len(data))]
        else:
            cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randint(0, 8)))) \
                if len(data) > 1 else []
            pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        for p in pieces:
            out += dec.feed(side, p, ts)
    return out + dec.close()


def feed_every_way(convo, **kw):
    """Whole, byte by byte, and 5 random splits must agree; return the events."""
    whole = feed_all(convo, "whole", **kw)
    assert feed_all(convo, "bytes", **kw) == whole
    for seed in range(5):
        assert feed_all(convo, "random", seed=seed, **kw) == whole
    return whole


def messages(events, side=None):
    return [e for e in events if isinstance(e, Message) and (side is None or e.side is side)]


def frames(events, type_=None):
    return [e for e in events if isinstance(e, Frame) and (type_ is None or e.type == type_)]


# -- basics ---------------------------------------------------------------------------------

def test_get_and_response_with_body():
    ff = FrameFactory()
    convo = ff.start() + [
        (C, ff.headers(C, 1, req("/index.html", extra=[("user-agent", "t/1"), ("accept", "*/*")]),
                       end_stream=True)),
        (S, ff.headers(S, 1, [(":status", "200"), ("content-type", "text/html"),
                              ("content-length", "11")])
         + ff.data(1, b"hello ") + ff.data(1, b"world", end_stream=True)),
    ]
    ev = feed_every_way(convo)
    rq, rs = messages(ev)
    assert (rq.side, rq.proto, rq.stream_id, rq.method, rq.target, rq.authority, rq.scheme) == \
        (C, "HTTP/2", 1, "GET", "/index.html", "example.com", "https")
    assert rq.headers == (("user-agent", "t/1"), ("accept", "*/*"))
    assert rq.body == b"" and rq.complete and rq.status is None
    assert rs.status == 200 and rs.body == b"hello world" and rs.body_len == 11
    assert rs.headers == (("content-type", "text/html"), ("content-length", "11"))
    assert rs.complete and not rs.body_truncated and rs.decoded_body is None
    assert [f.type for f in frames(ev)] == ["SETTINGS"] * 4
    assert frames(ev)[1].info == (("MAX_CONCURRENT_STREAMS", "100"),)
    assert frames(ev)[2].flags == ("ACK",)
    assert not [e for e in ev if isinstance(e, Note)]


def test_timestamps_first_and_last_byte():
    ff = FrameFactory()
    dec = Http2Decoder()
    for side, data in ff.start():
        dec.feed(side, data, 1)
    hdr = ff.headers(C, 1, req(method="POST"))
    assert dec.feed(C, hdr[:5], 10) == []          # the HEADERS frame starts at t=10
    assert dec.feed(C, hdr[5:], 11) == []
    (m,) = dec.feed(C, ff.data(1, b"x", end_stream=True), 20)
    assert (m.ts_start_ns, m.ts_end_ns, m.body) == (10, 20, b"x")
    dec.feed(S, ff.headers(S, 1, [(":status", "200")]), 30)
    (f,) = dec.feed(S, hf.PingFrame(0, b"12345678").serialize()[:3], 40) + \
        dec.feed(S, hf.PingFrame(0, b"12345678").serialize()[3:], 41)
    assert f.type == "PING" and f.ts_ns == 40
    (m,) = dec.close()
    assert (m.status, m.complete, m.ts_start_ns, m.ts_end_ns) == (200, False, 30, 30)


def test_padding_priority_and_continuation():
    ff = FrameFactory()
    block = ff.block(C, req("/big", extra=[("x-long", "v" * 3000), ("x-other", "o")]))
    h = hf.HeadersFrame(3, block[:100])
    h.flags.add("PADDED")
    h.flags.add("PRIORITY")
    h.pad_length, h.depends_on, h.stream_weight = 7, 1, 200
    convo = ff.start() + [
        (C, h.serialize() + ff.continuation(3, block[100:1000])
         + ff.continuation(3, block[1000:], end_headers=True)
         + ff.data(3, b"payload", pad=20) + ff.data(3, b"", end_stream=True, pad=3)),
        (S, ff.headers(S, 3, [(":status", "204")], end_stream=True, pad=5)),
    ]
    ev = feed_every_way(convo)
    rq, rs = messages(ev)
    assert rq.target == "/big" and rq.method == "GET"
    assert rq.headers == (("x-long", "v" * 3000), ("x-other", "o"))
    assert rq.body == b"payload" and rq.body_len == 7
    assert rs.status == 204 and rs.body == b""


def test_trailers_and_informational_responses():
    ff = FrameFactory()
    convo = ff.start() + [
        (C, ff.headers(C, 1, req("/up", "POST", extra=[("expect", "100-continue"), ("te", "trailers")]))),
        (S, ff.headers(S, 1, [(":status", "100")])),
        (C, ff.data(1, b"abc") + ff.headers(C, 1, [("x-checksum", "123")], end_stream=True)),
        (S, ff.headers(S, 1, [(":status", "103"), ("link", "</a.css>; rel=preload")])
         + ff.headers(S, 1, [(":status", "200")]) + ff.data(1, b"ok")
         + ff.headers(S, 1, [("x-trailer", "yes"), ("server-timing", "a;dur=1")], end_stream=True)),
    ]
    ev = feed_every_way(convo)
    ms = messages(ev)
    assert [(m.side, m.status) for m in ms] == [(S, 100), (C, None), (S, 103), (S, 200)]
    assert ms[1].body == b"abc" and ms[1].trailers == (("x-checksum", "123"),)
    assert ms[2].headers == (("link", "</a.css>; rel=preload"),) and ms[2].complete
    assert ms[3].body == b"ok" and ms[3].trailers == (("x-trailer", "yes"), ("server-timing", "a;dur=1"))


def test_max_body_caps_and_counts():
    ff = FrameFactory()
    convo = ff.start() + [
        (C, ff.headers(C, 1, req(), end_stream=True)),
        (S, ff.headers(S, 1, [(":status", "200")]) + ff.data(1, b"a" * 10000)
         + ff.data(1, b"b" * 10000) + ff.data(1, b"c" * 5, end_stream=True)),
    ]
    (rs,) = messages(feed_every_way(convo, max_body=15000), S)
    assert rs.body == b"a" * 10000 + b"b" * 5000
    assert rs.body_len == 20005 and rs.body_truncated
    (rs,) = messages(feed_all(convo, max_body=0), S)
    assert rs.body == b"" and rs.body_len == 20005 and rs.body_truncated


def test_content_encoding_gzip():
    ff = FrameFactory()
    page = b"<html>" + b"x" * 5000 + b"</html>"
    convo = ff.start() + [
        (C, ff.headers(C, 1, req(extra=[("accept-encoding", "gzip")]), end_stream=True)),
        (S, ff.headers(S, 1, [(":status", "200"), ("content-encoding", "gzip")])
         + ff.data(1, gzip.compress(page), end_stream=True)),
    ]
    (rs,) = messages(feed_every_way(convo), S)
    assert rs.body == gzip.compress(page) and rs.decoded_body == page and rs.decode_error is None
    convo += [(C, ff.headers(C, 3, req(), end_stream=True)),
              (S, ff.headers(S, 3, [(":status", "200"), ("content-encoding", "gzip")])
               + ff.data(3, b"not gzip", end_stream=True))]
    rs = messages(feed_all(convo), S)[1]
    assert rs.body == b"not gzip" and rs.decoded_body is None and rs.decode_error


def test_control_frames():
    ff = FrameFactory()
    pp = hf.PushPromiseFrame(1, promised_stream_id=2, flags=["END_HEADERS"])
    pp.data = ff.block(S, req("/style.css"))
    ga = hf.GoAwayFrame(0, last_stream_id=5, error_code=11, additional_data=b"calm down")
    convo = ff.start() + [
        (C, ff.headers(C, 1, req(), end_stream=True)),
        (S, pp.serialize() + ff.headers(S, 1, [(":status", "200")], end_stream=True)
         + ff.headers(S, 2, [(":status", "200"), ("content-type", "text/css")])
         + ff.data(2, b"a{}", end_stream=True)),
        (C, hf.PingFrame(0, b"12345678").serialize()
         + hf.WindowUpdateFrame(0, 65535).serialize()
         + hf.WindowUpdateFrame(1, 10).serialize()
         + hf.PriorityFrame(7, depends_on=1, stream_weight=255, exclusive=True).serialize()
         + hf.RstStreamFrame(9, error_code=8).serialize()
         + hf.AltSvcFrame(0, b"example.com", b'h3=":443"').serialize()
         + b"\x00\x00\x07\x10\x00\x00\x00\x00\x00" + b"\x00\x00\x00\x01u=0"),  # RFC 9218
        (S, hf.PingFrame(0, b"12345678", flags=["ACK"]).serialize() + ga.serialize()),
    ]
    ev = feed_every_way(convo)
    by = {f.type: f for f in frames(ev)}
    assert by["PUSH_PROMISE"].stream_id == 1
    assert by["PUSH_PROMISE"].info == (("promised_stream_id", "2"), (":method", "GET"),
                                       (":path", "/style.css"), (":authority", "example.com"),
                                       (":scheme", "https"))
    pushed = [m for m in messages(ev) if m.stream_id == 2]
    assert pushed[0].side is S and pushed[0].body == b"a{}"
    pings = frames(ev, "PING")
    assert pings[0].info == (("opaque_data", b"12345678".hex()),) and pings[0].flags == ()
    assert pings[1].flags == ("ACK",) and pings[1].payload == b"12345678"
    assert [f.info for f in frames(ev, "WINDOW_UPDATE")] == [(("increment", "65535"),),
                                                            (("increment", "10"),)]
    assert by["PRIORITY"].info == (("depends_on", "1"), ("weight", "256"), ("exclusive", "true"))
    assert by["RST_STREAM"].stream_id == 9 and by["RST_STREAM"].info == (("error_code", "CANCEL"),)
    assert by["ALTSVC"].info == (("origin", "example.com"), ("field", 'h3=":443"'))
    assert by["PRIORITY_UPDATE"].payload == b"\x00\x00\x00\x01u=0"
    assert by["GOAWAY"].info == (("last_stream_id", "5"), ("error_code", "ENHANCE_YOUR_CALM"),
                                 ("debug_data", "calm down"))
    assert by["GOAWAY"].payload == b"calm down"
    quiet = feed_all(convo, skip_frames={"WINDOW_UPDATE", "PING", "SETTINGS"})
    assert {f.type for f in frames(quiet)} == {"PUSH_PROMISE", "PRIORITY", "RST_STREAM",
                                                "ALTSVC", "PRIORITY_UPDATE", "GOAWAY"}
    with pytest.raises(ValueError):
        Http2Decoder(skip_frames={"WINDOWUPDATE"})


def test_rst_stream_flushes_incomplete_and_drops_late_data():
    ff = FrameFactory()
    convo = ff.start() + [
        (C, ff.headers(C, 1, req("/upload", "PUT")) + ff.data(1, b"part")),
        (S, hf.RstStreamFrame(1, error_code=7).serialize()),
        (C, ff.data(1, b"in flight", end_stream=True)),
    ]
    ev = feed_every_way(convo)
    rst = frames(ev, "RST_STREAM")[0]
    (m,) = messages(ev)
    assert ev.index(rst) < ev.index(m)
    assert m.target == "/upload" and m.body == b"part" and not m.complete
    assert rst.info == (("error_code", "REFUSED_STREAM"),)


def test_close_emits_incomplete_messages_and_notes():
    ff = FrameFactory()
    convo = ff.start() + [
        (C, ff.headers(C, 1, req(), end_stream=True)),
        (S, ff.headers(S, 1, [(":status", "200")]) + ff.data(1, b"partial")
         + ff.data(1, b"xyz")[:5]),
    ]
    ev = feed_every_way(convo)
    rs = messages(ev, S)[0]
    assert rs.status == 200 and rs.body == b"partial" and not rs.complete
    assert any(isinstance(e, Note) and "inside a frame: 5 bytes" in e.text for e in ev)
    dec = Http2Decoder()
    dec.close()
    with pytest.raises(DecodeError):
        dec.feed(C, PREFACE, 0)


# -- many streams, long connections ---------------------------------------------------------

def test_100_concurrent_streams_interleaved():
    ff = FrameFactory()
    rnd = random.Random(7)
    convo = ff.start()
    sids = list(range(1, 201, 2))
    bodies = {sid: bytes([sid % 256]) * rnd.randint(0, 40000) for sid in sids}
    for sid in sids:
        convo.append((C, ff.headers(C, sid, req(f"/item/{sid}", "POST",
                                                extra=[("x-n", str(sid))]))))
    # request bodies: DATA frames of all streams interleaved, in random order
    pending = {sid: [bodies[sid][i:i + 16384] for i in range(0, len(bodies[sid]), 16384)] or [b""]
               for sid in sids}
    while pending:
        sid = rnd.choice(sorted(pending))
        chunk = pending[sid].pop(0)
        last = not pending[sid]
        convo.append((C, ff.data(sid, chunk, end_stream=last)))
        if last:
            del pending[sid]
            # the server answers as soon as a request is complete, interleaving with others
            rev = bodies[sid][::-1]
            convo.append((S, ff.headers(S, sid, [(":status", "200"), ("x-for", str(sid))])
                          + b"".join(ff.data(sid, rev[i:i + 16384]) for i in range(0, len(rev), 16384))
                          + ff.data(sid, b"", end_stream=True)))
    ev = feed_all(convo)
    assert feed_all(convo, "random", seed=1) == ev
    rqs, rss = messages(ev, C), messages(ev, S)
    assert len(rqs) == len(rss) == 100
    assert {m.stream_id: m.body for m in rqs} == bodies
    assert {m.stream_id: m.body for m in rss} == {sid: b[::-1] for sid, b in bodies.items()}
    assert all(m.target == f"/item/{m.stream_id}" for m in rqs)
    assert all(m.header("x-for") == str(m.stream_id) for m in rss)


def h2_pair(server_settings=None):
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection()
    s.initiate_connection()
    if server_settings:
        s.update_settings(server_settings)
    return c, s


def pump(c, s, convo, respond):
    """Move bytes between the h2 client and server until both are quiet, recording them."""
    while True:
        a, b = c.data_to_send(), s.data_to_send()
        if not a and not b:
            return
        if a:
            convo.append((C, a))
            for e in s.receive_data(a):
                respond(s, e)
        if b:
            convo.append((S, b))
            for e in c.receive_data(b):
                if isinstance(e, h2.events.DataReceived):
                    c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)


def echo_server(s, e):
    if isinstance(e, h2.events.RequestReceived):
        path = dict(e.headers)[b":path"]
        s.send_headers(e.stream_id, [(":status", "200"), ("x-path", path.decode()),
                                     ("set-cookie", f"id={e.stream_id}; Path=/")])
        s.send_data(e.stream_id, b"body of " + path, end_stream=True)


def test_1000_sequential_requests_small_dynamic_table():
    """A 256-byte table (announced by the server for the client's encoder, and set by the
    client for the server's) evicts on nearly every request; all 1000 must decode right."""
    from h2.settings import SettingCodes
    c, s = h2_pair({SettingCodes.HEADER_TABLE_SIZE: 256})
    c.update_settings({SettingCodes.HEADER_TABLE_SIZE: 200})
    convo = []
    pump(c, s, convo, echo_server)
    for i in range(1000):
        sid = c.get_next_available_stream_id()
        c.send_headers(sid, req(f"/r/{i}", extra=[("x-req", f"{i:05d}"), ("cookie", f"c={i % 7}")]),
                       end_stream=True)
        pump(c, s, convo, echo_server)
    assert c.encoder.header_table_size == 256 and s.encoder.header_table_size == 200
    ev = feed_all(convo)
    rqs, rss = messages(ev, C), messages(ev, S)
    assert [m.target for m in rqs] == [f"/r/{i}" for i in range(1000)]
    assert [m.header("x-req") for m in rqs] == [f"{i:05d}" for i in range(1000)]
    assert [m.header("cookie") for m in rqs] == [f"c={i % 7}" for i in range(1000)]
    assert [m.body for m in rss] == [f"body of /r/{i}".encode() for i in range(1000)]
    assert [m.header("set-cookie") for m in rss] == [f"id={m.stream_id}; Path=/" for m in rss]
    settings_info = [f.info for f in frames(ev, "SETTINGS") if f.info]
    assert (("HEADER_TABLE_SIZE", "256"),) in settings_info
    assert feed_all(convo[:200], "bytes") == feed_all(convo[:200])


def test_open_message_limit(monkeypatch):
    monkeypatch.setattr(http2, "MAX_OPEN_MESSAGES", 4)
    ff = FrameFactory()
    convo = ff.start() + [(C, ff.headers(C, sid, req(f"/{sid}"))) for sid in (1, 3, 5, 7, 9)]
    convo += [(C, ff.data(1, b"late", end_stream=True)), (C, ff.data(9, b"x", end_stream=True))]
    ev = feed_all(convo)
    notes = [e for e in ev if isinstance(e, Note)]
    assert notes and "stream 1: more than 4 messages" in notes[0].text
    ms = messages(ev)
    assert ms[0].stream_id == 1 and not ms[0].complete
    assert [(m.stream_id, m.complete) for m in ms[1:]] == [(9, True), (3, False), (5, False), (7, False)]


# -- gRPC -----------------------------------------------------------------------------------

def grpc_frame(data, compressed=False):
    return struct.pack(">BL", int(compressed), len(data)) + data


def test_grpc_by_hand():
    ff = FrameFactory()
    body = grpc_frame(b"\x0a\x03abc") + grpc_frame(b"", False) + grpc_frame(b"zz", True)
    convo = ff.start() + [
        (C, ff.headers(C, 1, req("/pkg.Svc/Call", "POST", extra=[
            ("content-type", "application/grpc+proto"), ("te", "trailers")]))
         + ff.data(1, body[:7]) + ff.data(1, body[7:], end_stream=True)),
        (S, ff.headers(S, 1, [(":status", "200"), ("content-type", "application/grpc")])
         + ff.data(1, grpc_frame(b"\x08\x01"))
         + ff.headers(S, 1, [("grpc-status", "0"), ("grpc-message", "")], end_stream=True)),
    ]
    ev = feed_every_way(convo)
    rq, rs = messages(ev)
    assert rq.grpc == (GrpcMessage(False, b"\x0a\x03abc"), GrpcMessage(False, b""),
                       GrpcMessage(True, b"zz"))
    assert rs.grpc == (GrpcMessage(False, b"\x08\x01"),)
    assert rs.trailers == (("grpc-status", "0"), ("grpc-message", ""))


def test_grpc_split_edge_cases():
    assert is_grpc("application/grpc") and is_grpc("application/grpc+json; charset=x")
    assert not is_grpc("application/grpc-web") and not is_grpc(None) and not is_grpc("text/html")
    msgs, problem = split_messages(grpc_frame(b"abc") + b"\x00\x00\x00")
    assert msgs == (GrpcMessage(False, b"abc"),) and "3 trailing bytes" in problem
    msgs, problem = split_messages(grpc_frame(b"abcdef")[:8], truncated=True)
    assert msgs == () and problem is None
    msgs, problem = split_messages(b"\x07\x00\x00\x00\x00")
    assert msgs == () and "flag" in problem


def test_grpcio_real_bytes():
    need(importlib.util.find_spec("grpc"), "grpcio is not installed (pip install .[test])")
    import grpc
    from concurrent import futures

    def handler(request, context):
        context.set_trailing_metadata((("x-done", "1"),))
        return request[::-1] * 3

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Echo", {"Rev": grpc.unary_unary_rpc_method_handler(handler)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    relay = Relay(port)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{relay.port}",
                                   options=[("grpc.enable_retries", 0)]) as ch:
            call = ch.unary_unary("/test.Echo/Rev")
            replies = [call(f"hello {i}".encode() * 50, timeout=10) for i in range(20)]
    finally:
        server.stop(0)
        relay.close()
    assert replies[3] == (b"hello 3" * 50)[::-1] * 3
    ev = feed_all(relay.convo)
    rqs, rss = messages(ev, C), messages(ev, S)
    assert [m.target for m in rqs] == ["/test.Echo/Rev"] * 20
    assert [m.grpc[0].data for m in rqs] == [f"hello {i}".encode() * 50 for i in range(20)]
    assert [m.grpc[0].data for m in rss] == replies
    assert all(m.status == 200 and dict(m.trailers)["grpc-status"] == "0" for m in rss)
    assert all(dict(m.trailers)["x-done"] == "1" for m in rss)
    assert feed_all(relay.convo, "random", seed=3) == ev


class Relay:
    """A TCP relay on 127.0.0.1 that records what each side sends, before forwarding it."""

    def __init__(self, target_port):
        self.convo = []
        self._lock = threading.Lock()
        self._ls = socket.create_server(("127.0.0.1", 0))
        self.port = self._ls.getsockname()[1]
        self._target = target_port
        self._socks = []
        self._pipes = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        try:
            a, _ = self._ls.accept()
        except OSError:
            return
        b = socket.create_connection(("127.0.0.1", self._target))
        self._socks += [a, b]
        for args in ((a, b, C), (b, a, S)):
            t = threading.Thread(target=self._pipe, args=args, daemon=True)
            self._pipes.append(t)
            t.start()

    def _pipe(self, src, dst, side):
        try:
            while data := src.recv(65536):
                with self._lock:
                    self.convo.append((side, data))
                dst.sendall(data)
        except OSError:
            pass

    def close(self):
        """Stop relaying; when it returns, convo holds everything relayed and no longer grows
        (a pipe thread may have read a last frame, e.g. a GOAWAY, just before the shutdown)."""
        self._ls.close()
        for s in self._socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._pipes:
            t.join(5)
        for s in self._socks:
            s.close()


# -- joined mid-stream ----------------------------------------------------------------------

def test_joined_mid_stream_headers_undecodable_but_data_flows():
    c, s = h2_pair()
    convo = []
    pump(c, s, convo, echo_server)
    for i in range(5):       # fills both dynamic tables
        c.send_headers(c.get_next_available_stream_id(), req(f"/a/{i}", extra=[("x-tok", "secret")]),
                       end_stream=True)
        pump(c, s, convo, echo_server)
    start = len(convo)
    for i in range(3):
        c.send_headers(c.get_next_available_stream_id(), req(f"/b/{i}", extra=[("x-tok", "secret")]),
                       end_stream=True)
        pump(c, s, convo, echo_server)
    late = convo[start:]
    # joined mid-stream, feed() boundaries are where we look for frame boundaries (rule 4),
    # so only whole feeds here
    ev = feed_all(late, joined_mid_stream=True)
    notes = [e for e in ev if isinstance(e, Note)]
    assert {n.side for n in notes if n.text == "headers undecodable: joined mid-stream"} == {C, S}
    rss = messages(ev, S)
    assert [m.body for m in rss] == [f"body of /b/{i}".encode() for i in range(3)]
    assert all(m.headers == () and m.status is None and m.complete for m in rss)
    # the same bytes without joined_mid_stream are garbage (no preface)
    with pytest.raises(DecodeError):
        feed_all(late)


def test_joined_mid_stream_decodes_blocks_that_need_no_old_state():
    ff = FrameFactory()
    ff.start()   # (not fed: we join after it)
    convo = [(C, ff.headers(C, 1, req("/x", extra=[("x-a", "1")]), end_stream=True)),
             (S, ff.headers(S, 1, [(":status", "200")]) + ff.data(1, b"ok", end_stream=True)),
             (C, ff.headers(C, 3, req("/x", extra=[("x-a", "1")]), end_stream=True)),
             (S, ff.data(7, b"tail of an older stream", end_stream=True))]
    ev = feed_all(convo, joined_mid_stream=True)
    ms = messages(ev)
    assert [(m.side, m.stream_id, m.target or m.status) for m in ms[:3]] == \
        [(C, 1, "/x"), (S, 1, 200), (C, 3, "/x")]
    assert ms[2].header("x-a") == "1"      # this one used the dynamic table we built
    assert ms[3].stream_id == 7 and ms[3].body == b"tail of an older stream"
    assert not ms[3].complete and ms[3].headers == ()
    assert not [e for e in ev if isinstance(e, Note)]


def test_joined_mid_stream_skips_feeds_not_at_a_frame_boundary():
    ff = FrameFactory()
    big = ff.data(1, bytes(range(256)) * 60, end_stream=True)
    dec = Http2Decoder(joined_mid_stream=True)
    assert dec.feed(S, big[4000:9000], 0) == []          # middle of a DATA frame
    assert dec.feed(S, big[9000:], 0) == []
    ev = dec.feed(S, ff.data(3, b"hello", end_stream=True), 0)
    assert isinstance(ev[0], Note) and "skipped 11369 bytes" in ev[0].text
    assert ev[1].body == b"hello" and ev[1].stream_id == 3


def test_joined_mid_stream_but_preface_seen():
    ff = FrameFactory()
    convo = ff.start() + [(C, ff.headers(C, 1, req(), end_stream=True))]
    ev = feed_every_way(convo, joined_mid_stream=True)   # the server had sent nothing yet
    assert messages(ev)[0].target == "/"
    assert ev == feed_all(convo)
    with pytest.raises(DecodeError):    # clean again: HPACK errors are errors
        feed_all(ff.start() + [(C, ff.headers(C, 1, req())[:9] + b"\xbf\xff\xff\xff\x0f")],
                 joined_mid_stream=True)


# -- garbage --------------------------------------------------------------------------------

def bad(convo, match, **kw):
    for mode in ("whole", "bytes"):
        with pytest.raises(DecodeError, match=match):
            feed_all(convo, mode, **kw)


def test_garbage_raises_decode_error():
    ff = FrameFactory()
    bad([(C, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")], "preface")
    bad([(S, ff.data(1, b"x"))], "not SETTINGS")
    bad([(C, PREFACE + hf.PingFrame(0, b"12345678").serialize())], "not SETTINGS")
    st_ = ff.start()
    bad(st_ + [(C, ff.data(1, b"x" * 16385))], "exceeds SETTINGS_MAX_FRAME_SIZE 16384")
    bad(st_ + [(C, b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")], "stream 0")
    bad(st_ + [(C, b"\x00\x00\x03\x00\x08\x00\x00\x00\x01\x05ab")], "padding")
    bad(st_ + [(C, b"\x00\x00\x03\x06\x00\x00\x00\x00\x00abc")], "PING")
    bad(st_ + [(C, ff.headers(C, 1, req(), end_headers=False) + ff.data(1, b"x"))], "6.10")
    bad(st_ + [(C, ff.continuation(1, b"", end_headers=True))], "CONTINUATION")
    bad(st_ + [(C, ff.headers(C, 1, [], end_headers=False)
                + ff.continuation(1, b"") * (http2.CONTINUATION_BACKLOG + 1))], "CONTINUATION frames")
    bad(st_ + [(C, hf.HeadersFrame(1, b"\xff\xff\xff\xff\x0f", flags=["END_HEADERS"]).serialize())],
        "HPACK")
    bad(st_ + [(S, ff.settings(max_frame_size=100))], "MAX_FRAME_SIZE")


def test_max_frame_size_follows_the_receivers_settings():
    ff = FrameFactory()
    convo = [(C, PREFACE + ff.settings()), (S, ff.settings(max_frame_size=1 << 20)),
             (C, ff.headers(C, 1, req("/big", "POST")) + ff.data(1, b"z" * 100000, end_stream=True))]
    (m,) = messages(feed_all(convo))
    assert m.body == b"z" * 100000
    # the server announced it, so only the client may send big frames
    convo.append((S, ff.headers(S, 1, [(":status", "200")]) + ff.data(1, b"z" * 20000)))
    with pytest.raises(DecodeError, match="server frame of 20000 bytes"):
        feed_all(convo)


def test_header_table_size_follows_the_receivers_settings():
    ff = FrameFactory()
    ff.enc[C].header_table_size = 8192        # the client's encoder grows its table
    blk = ff.block(C, req(extra=[("x", "y")]))
    hdrs = hf.HeadersFrame(1, blk, flags=["END_HEADERS", "END_STREAM"]).serialize()
    ok = [(C, PREFACE + ff.settings()), (S, ff.settings(header_table_size=8192)), (C, hdrs)]
    assert messages(feed_all(ok))[0].header("x") == "y"
    # without the server's permission the size update is an HPACK error
    with pytest.raises(DecodeError, match="HPACK"):
        feed_all([(C, PREFACE + ff.settings()), (S, ff.settings()), (C, hdrs)])
    # the client announcing the size is no permission for the client's own encoder
    with pytest.raises(DecodeError, match="HPACK"):
        feed_all([(C, PREFACE + ff.settings(header_table_size=8192)), (S, ff.settings()), (C, hdrs)])


def test_after_an_error_every_feed_raises():
    dec = Http2Decoder()
    with pytest.raises(DecodeError):
        dec.feed(C, b"garbage that is not a preface", 0)
    with pytest.raises(DecodeError, match="stopped earlier"):
        dec.feed(S, FrameFactory.settings(), 0)
    assert dec.close() == []


def test_non_utf8_header_values_do_not_raise():
    ff = FrameFactory()
    convo = ff.start() + [(C, ff.headers(C, 1, req(extra=[(b"x-bin", b"\xff\xfeok")]), end_stream=True))]
    (m,) = messages(feed_all(convo))
    assert m.header("x-bin") == "\\xff\\xfeok"


# -- fuzz -----------------------------------------------------------------------------------

def _only_decode_error(convo, **kw):
    dec = Http2Decoder(**kw)
    try:
        for side, data in convo:
            dec.feed(side, data, 0)
        dec.close()
    except DecodeError as e:
        assert "internal error" not in str(e), e


sides = st.sampled_from([C, S])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(sides, st.binary(max_size=200)), max_size=12), st.booleans())
def test_fuzz_arbitrary_bytes(convo, joined):
    _only_decode_error(convo, joined_mid_stream=joined)


def _valid_convo():
    ff = FrameFactory()
    convo = ff.start() + [
        (C, ff.headers(C, 1, req("/p", "POST", extra=[("content-type", "application/grpc")]))
         + ff.data(1, grpc_frame(b"abc"), pad=3) + ff.headers(C, 1, [("t", "1")], end_stream=True)),
        (S, ff.headers(S, 1, [(":status", "100")]) + ff.headers(S, 1, [(":status", "200")])
         + ff.data(1, b"resp", end_stream=True)),
        (C, hf.PingFrame(0, b"abcdefgh").serialize() + hf.WindowUpdateFrame(0, 5).serialize()),
    ]
    return b"".join(d for s, d in convo if s is C), b"".join(d for s, d in convo if s is S)


_VALID_C, _VALID_S = _valid_convo()


@settings(max_examples=400, deadline=None)
@given(st.data(), st.booleans())
def test_fuzz_mutated_valid_stream(data, joined):
    streams = {C: bytearray(_VALID_C), S: bytearray(_VALID_S)}
    for _ in range(data.draw(st.integers(0, 4))):
        side = data.draw(sides)
        buf = streams[side]
        i = data.draw(st.integers(0, len(buf) - 1))
        op = data.draw(st.sampled_from(["flip", "delete", "insert"]))
        if op == "flip":
            buf[i] ^= data.draw(st.integers(1, 255))
        elif op == "delete":
            del buf[i:i + data.draw(st.integers(1, 20))]
        else:
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=20))
    convo = []
    for side in (C, S):
        buf = bytes(streams[side])
        cuts = sorted(set(data.draw(st.lists(st.integers(0, len(buf)), max_size=6))))
        convo += [(side, buf[a:b]) for a, b in zip([0, *cuts], [*cuts, len(buf)])]
    _only_decode_error(convo, joined_mid_stream=joined, max_body=data.draw(st.sampled_from([None, 0, 2])))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, len(_VALID_C) - 1), max_size=10),
       st.lists(st.integers(1, len(_VALID_S) - 1), max_size=10))
def test_fuzz_splits_do_not_change_events(cuts_c, cuts_s):
    def pieces(side, buf, cuts):
        cuts = sorted(set(cuts))
        return [(side, buf[a:b]) for a, b in zip([0, *cuts], [*cuts, len(buf)])]
    whole = feed_all([(C, _VALID_C), (S, _VALID_S)])
    assert len(messages(whole)) == 3
    assert feed_all(pieces(C, _VALID_C, cuts_c) + pieces(S, _VALID_S, cuts_s)) == whole


# -- real traffic: nginx (http2) and curl, decrypted by tshark -------------------------------

def test_nginx_curl_real_traffic(tmp_path):
    import os
    need_tool("nginx", "curl", "tshark")
    if os.geteuid() != 0:
        pytest.skip("tshark capture on lo needs root")
    from tests.peers import NginxServer, PacketCapture, make_cert, run_curl, tshark_tls_streams
    from tests.peers.capture import write_keylog
    cert, key = make_cert(tmp_path)
    files = {"page.html": b"<p>" + b"hello http2 " * 2000 + b"</p>",
             "big.bin": random.Random(1).randbytes(200_000)}
    with NginxServer(cert, key, files, http2=True, gzip=True) as srv, \
            PacketCapture(tmp_path / "cap.pcapng", [srv.port]) as cap:
        page = run_curl(srv.url("page.html"), ["--compressed"], http="2", keylog=True)
        big = run_curl(srv.url("big.bin"), http="2", keylog=True)
        cap.stop()
    assert page.http_version == "2" and page.body == files["page.html"]
    assert big.body == files["big.bin"]
    keylog = write_keylog(tmp_path / "keys.txt", page.keylog + big.keylog)
    streams = [s for s in tshark_tls_streams(cap.path, keylog, [srv.port]) if s.client_data]
    assert len(streams) == 2
    got = {}
    for s in streams:
        ev = feed_all([(C, s.client_data), (S, s.server_data)])
        rq, rs = messages(ev, C), messages(ev, S)
        assert len(rq) == len(rs) == 1 and rs[0].complete
        assert rq[0].method == "GET" and rq[0].header("user-agent").startswith("curl/")
        got[rq[0].target] = rs[0]
        assert feed_all([(C, s.client_data), (S, s.server_data)], "random", seed=2) == ev
    assert got["/page.html"].header("content-encoding") == "gzip"
    assert got["/page.html"].decoded_body == files["page.html"]
    assert got["/big.bin"].body == files["big.bin"] and got["/big.bin"].status == 200
