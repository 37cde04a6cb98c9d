"""Redaction (decode/redact.py) on messages the real HttpView decoded from real HTTP bytes:
credential header values and query parameters become REDACTED, and nothing else changes."""
from __future__ import annotations

import json
import socket

from tlstap.abi import Direction
from tlstap.decode.httpview import HttpView
from tlstap.decode.redact import REDACTED, RedactingSink, Redactor
from tlstap.events import Conn, TlsData
from tlstap.sinks.jsonl import JsonSink
from tlstap.sinks.tee import Tee

CONN = Conn.from_raw(socket.AF_INET, 443, 5555, socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1"))
R, W = Direction.READ, Direction.WRITE

REQUEST = (b"GET /api/v1/items?id=7&access_token=s3cr3t&Sig=abc%2F&q=x%20y#frag HTTP/1.1\r\n"
           b"Host: example.test\r\nAuthorization: Bearer eyJhbGciOi.secret\r\n"
           b"Cookie: session=abcdef; theme=dark\r\nX-Api-Key: k-123\r\nX-Custom-Token: t-9\r\n"
           b"Referer: https://example.test/login?code=oauth-code&next=/\r\nAccept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 302 Found\r\nSet-Cookie: session=newvalue; HttpOnly\r\n"
            b"Location: /cb?token=tok-1&state=ok\r\nContent-Length: 5\r\n\r\nhello")


class Buf:
    """A binary file JsonSink can write to, kept in memory."""
    def __init__(self):
        self.chunks = []

    def write(self, b):
        self.chunks.append(bytes(b))
        return len(b)

    def flush(self):
        pass

    def fileno(self):
        return 99

    def close(self):
        pass

    def records(self):
        return [json.loads(x) for x in b"".join(self.chunks).splitlines()]


def run_view(sink, *calls):
    v = HttpView(sink, lag_ns=0)
    for i, (d, data) in enumerate(calls):
        v.on_data(TlsData(100 + i, 10, 10, 0, "srv", 3, d, CONN, 1, data, len(data), conn_id=1))
    v.tick(all_=True)
    v.close()


def exchanges(redactor=None, extra=()):
    plain, red = Buf(), Buf()
    sinks = [JsonSink(plain), RedactingSink(JsonSink(red), redactor or Redactor(*extra))]
    run_view(Tee(sinks), (R, REQUEST), (W, RESPONSE))
    (p,), (r,) = ([x for x in b.records() if x["type"] == "http"] for b in (plain, red))
    return p, r


def test_credential_headers_and_query_values_are_redacted_and_nothing_else():
    p, r = exchanges()
    req, rreq = p["request"], r["request"]
    assert rreq["target"] == "/api/v1/items?id=7&access_token=REDACTED&Sig=REDACTED&q=x%20y#frag"
    want = []
    for k, v in req["headers"]:
        if k.lower() in ("authorization", "cookie", "x-api-key"):
            v = REDACTED
        elif k == "Referer":
            v = "https://example.test/login?code=REDACTED&next=/"
        want.append([k, v])
    assert rreq["headers"] == want
    assert ["X-Custom-Token", "t-9"] in rreq["headers"]          # not a default name
    resp = r["response"]
    assert dict(resp["headers"])["Set-Cookie"] == REDACTED
    assert dict(resp["headers"])["Location"] == "/cb?token=REDACTED&state=ok"
    # what redaction does not touch is as the unredacted sink wrote it
    for k in ("status", "body", "body_len", "complete"):
        assert resp[k] == p["response"][k]
    assert {k: v for k, v in r.items() if k not in ("request", "response")} == \
           {k: v for k, v in p.items() if k not in ("request", "response")}


def test_configured_names_are_redacted_too():
    _, r = exchanges(extra=(["X-Custom-Token"], ["q"]))
    assert dict(r["request"]["headers"])["X-Custom-Token"] == REDACTED
    assert r["request"]["target"].endswith("&q=REDACTED#frag")


def test_a_message_without_credentials_is_passed_on_unchanged():
    red = Redactor()
    plain = Buf()
    got = []

    class Keep:
        out = None

        def on_exchange(self, meta, ex):
            got.append(ex)

        def close(self):
            pass

    run_view(Tee([JsonSink(plain), Keep()]), (R, b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n"),
             (W, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    (ex,) = got
    assert red.exchange(ex) is ex          # no copy when there is nothing to hide


def test_raw_records_get_the_header_rule_line_by_line():
    red = Redactor()
    data = (b"POST /x HTTP/1.1\r\nauthorization:Basic dXNlcjpwYXNz\r\nX-API-KEY : zz\r\n"
            b"Content-Type: text/plain\r\nMy-Authorization: keep\r\n\r\nAuthorization: in a body line")
    out = red.raw(data)
    assert out == (b"POST /x HTTP/1.1\r\nauthorization: REDACTED\r\nX-API-KEY : REDACTED\r\n"
                   b"Content-Type: text/plain\r\nMy-Authorization: keep\r\n\r\nAuthorization: REDACTED")
    assert red.raw(b"\x16\x03\x01binary") == b"\x16\x03\x01binary"
