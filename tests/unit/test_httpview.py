"""HttpView: ordering by kernel time within the lag, protocol/side sniffing, pairing, raw fallback.
Fed TlsData as the capture produces them (the decoders have their own tests)."""
from __future__ import annotations

import socket

from hpack import Encoder
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame

from tlstap.abi import Direction
from tlstap.events import Conn, TlsData
from tlstap.decode.httpview import H2_PREFACE, HttpView

CONN = Conn.from_raw(socket.AF_INET, 443, 5555, socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1"))


class Recorder:
    out = None

    def __init__(self):
        self.items = []

    def on_data(self, d):
        self.items.append(("data", d))

    def on_exchange(self, meta, ex):
        self.items.append(("exchange", ex, meta))

    def on_frame(self, meta, f):
        self.items.append(("frame", f))

    def on_note(self, meta, n):
        self.items.append(("note", n))

    def close(self):
        pass

    def kinds(self, k):
        return [i[1] for i in self.items if i[0] == k]


def call(ts, direction, data, ssl=1, truncated=0, gen=1):
    return TlsData(ts, 10, 10, 0, "srv", 3, direction, CONN, ssl, data, len(data) + truncated, truncated,
                   conn_id=gen)


R, W = Direction.READ, Direction.WRITE


def test_calls_are_ordered_by_kernel_time_within_the_lag():
    rec = Recorder()
    v = HttpView(rec, lag_ns=1000)
    # the response's record (CPU 1) reaches us before the request's (CPU 0)
    v.on_data(call(200, W, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    v.on_data(call(100, R, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"))
    v.tick(now_ns=150 + 1000)            # only the request is old enough
    assert rec.kinds("exchange") == []
    v.tick(now_ns=200 + 1000)
    (ex,) = rec.kinds("exchange")
    assert ex.request.target == "/x" and ex.response.body == b"ok" and ex.latency_ns == 100
    meta = rec.items[-1][2]
    assert meta.side.value == "server"    # nginx-like: it reads requests, writes responses


def test_an_http2_server_writing_settings_first_is_recognised():
    rec = Recorder()
    v = HttpView(rec, lag_ns=0)
    enc_c, enc_s = Encoder(), Encoder()
    v.on_data(call(1, W, SettingsFrame(0).serialize()))                      # server SETTINGS first
    req = HeadersFrame(1, enc_c.encode([(":method", "GET"), (":path", "/h2"), (":scheme", "https"),
                                        (":authority", "a")]), flags=["END_STREAM", "END_HEADERS"])
    v.on_data(call(2, R, H2_PREFACE + SettingsFrame(0).serialize() + req.serialize()))
    resp = HeadersFrame(1, enc_s.encode([(":status", "200")]), flags=["END_HEADERS"]).serialize()
    v.on_data(call(3, W, resp + DataFrame(1, b"hi", flags=["END_STREAM"]).serialize()))
    (ex,) = rec.kinds("exchange")
    assert (ex.request.target, ex.response.status, ex.response.body) == ("/h2", 200, b"hi")
    assert not rec.kinds("data")


def test_not_http_passes_through_unchanged():
    rec = Recorder()
    v = HttpView(rec, lag_ns=0)
    d = call(1, W, b"\x00\x01binary protocol")
    v.on_data(d)
    assert rec.kinds("data") == [d] and not rec.kinds("note")


def test_a_gap_turns_the_connection_raw_with_a_note():
    rec = Recorder()
    v = HttpView(rec, lag_ns=0)
    v.on_data(call(1, R, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"))
    cut = call(2, W, b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 10, truncated=99990)
    v.on_data(cut)
    v.on_data(after := call(3, W, b"more"))
    (note,) = rec.kinds("note")
    assert "not captured" in note.text
    assert rec.kinds("data") == [cut, after]
    v.close()
    (ex,) = rec.kinds("exchange")            # the request is still reported, unanswered
    assert ex.request.target == "/" and ex.response is None


def test_connections_are_kept_apart_by_ssl():
    rec = Recorder()
    v = HttpView(rec, lag_ns=0)
    v.on_data(call(1, R, b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n", ssl=1))
    v.on_data(call(2, R, b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n", ssl=2))
    v.on_data(call(3, W, b"HTTP/1.1 204 No Content\r\n\r\n", ssl=2))
    v.on_data(call(4, W, b"HTTP/1.1 204 No Content\r\n\r\n", ssl=1))
    assert [ex.request.target for ex in rec.kinds("exchange")] == ["/b", "/a"]


def _h2_request(stream, path):
    enc = Encoder()
    return HeadersFrame(stream, enc.encode([(":method", "GET"), (":path", path), (":scheme", "https"),
                                            (":authority", "a")]), flags=["END_STREAM", "END_HEADERS"]).serialize()


def test_a_new_generation_of_an_ssl_is_a_new_connection():
    """nginx frees an SSL* and gets the same address for its next connection: the kernel's
    generation tells them apart, so the second HTTP/2 preface starts a new decoder, and the
    first connection's unfinished exchange comes out when the second begins."""
    rec = Recorder()
    v = HttpView(rec, lag_ns=0)
    settings = SettingsFrame(0).serialize()
    v.on_data(call(100, R, H2_PREFACE + settings + _h2_request(1, "/first"), gen=7))
    v.on_data(call(110, W, settings, gen=7))
    # the request is still waiting for its response when the address serves a new connection
    v.on_data(call(200, R, H2_PREFACE + settings + _h2_request(1, "/second"), gen=9))
    (first,) = rec.kinds("exchange")
    assert first.request.target == "/first" and first.response is None
    assert [i[2].conn_id for i in rec.items if i[0] == "exchange"] == [7]
    v.on_data(call(210, W, settings, gen=9))
    enc = Encoder()
    v.on_data(call(220, W, HeadersFrame(1, enc.encode([(":status", "200")]),
                                        flags=["END_HEADERS"]).serialize()
                   + DataFrame(1, b"two", flags=["END_STREAM"]).serialize(), gen=9))
    second = rec.kinds("exchange")[1]
    assert second.request.target == "/second" and second.response.body == b"two"
    assert [i[2].conn_id for i in rec.items if i[0] == "exchange"] == [7, 9]
    # a straggler of the finished generation is passed through, not fed to the new decoder
    v.on_data(call(230, W, b"late bytes", gen=7))
    assert rec.kinds("data")[-1].data == b"late bytes"
    assert not rec.kinds("note")
