"""The NATS JetStream export against real nats-server processes (tests/peers/nats.py).

Component level: HTTP/1.1 and HTTP/2 bytes go through the real HttpView into an ExportSink and,
the same calls, into a JsonSink; the stream must hold one message per exchange (and per raw
record, per gap), each the JSON output's object after the body policy, plus its msg_id (also
its Nats-Msg-Id). A server stopped mid-run (one node, started again; or the leader of a
3-node cluster's replicated stream, killed) must end with every message exactly once. Overflow with
the server down is dropped and counted, never silently.

End to end (the CLI): `tlstap tls --pid P --export nats://...` on nginx serving curl, alone and
beside `-o FILE --format json`; a target without a stream refused before capture; `tlstap doctor
--export URL`.
"""
from __future__ import annotations

import base64
import bisect
import json
import os
import re
import signal
import socket
import sys
import threading
import time

import pytest
from hpack import Encoder
from hyperframe.frame import DataFrame, HeadersFrame, SettingsFrame

from tests.peers import NginxServer, wait_for
from tests.peers.nats import NatsCluster, NatsServer, add_stream, stream_messages
from tlstap.abi import Direction
from tlstap.decode.httpview import H2_PREFACE, HttpView
from tlstap.events import Conn, Lost, TlsData
from tlstap.export.nats import WINDOW, ExportTargetError, check_target, parse_url
from tlstap.sinks import export as export_sink
from tlstap.sinks.export import ExportSink
from tlstap.sinks.jsonl import JsonSink

from .tap import Tap, run_tlstap, tlstap_exe
from .test_http_capture import body_of, curl, curl_request_headers

SUBJECT = "tlstap.export.http"
STREAM = "EXPORT_TEST"
R, W = Direction.READ, Direction.WRITE
CONN = Conn.from_raw(socket.AF_INET, 8443, 40000, socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1"))
STATUS_LINE = re.compile(r"export: (\d+) events to (\S+): (\d+) acknowledged \((\d+) duplicates ignored\); "
                         r"(\d+) dropped \((.*)\); exporter CPU (\d+\.\d\d)s \((\d+\.\d\d) ms per 1000 events\)")


# ---- traffic: what the peers "sent", as the capture would hand it over ------------------------

class Traffic:
    """N HTTP/1.1 exchanges spread over a few connections (text and binary bodies, some long),
    one HTTP/2 connection, one connection that is not HTTP, one gap. `calls` are the TlsData in
    kernel-time order; `bodies` what each exchange's peers sent, by (target)."""

    def __init__(self, n: int, conns: int = 4):
        self.calls: list[TlsData] = []
        self.sent: dict[str, tuple[bytes, bytes]] = {}   # target -> (request body, response body)
        self._ts = 1_000_000
        for i in range(n):
            c = i % conns
            target = f"/items/{i}?c={c}"
            req_body = b"name=item-%d&" % i + b"a" * (i % 50)
            resp_body = (bytes(range(256)) * 3)[: 40 + i % 700] if i % 3 == 0 else b"ok " * (i % 90 + 1)
            self.sent[target] = (req_body, resp_body)
            self._call(c, R, b"POST %s HTTP/1.1\r\nHost: api.test\r\nAuthorization: Bearer t%d\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (target.encode(), i, len(req_body), req_body))
            self._call(c, W, b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(resp_body), resp_body))
        self._h2(conns)
        self.raw = self._call(conns + 1, W, b"\x00\x01\x02 not http at all \xff")

    def _call(self, c: int, d: Direction, data: bytes) -> TlsData:
        self._ts += 1000
        ev = TlsData(self._ts, 4242, 4242, 0, "api", 5 + c, d, CONN, 0x7f0000 + c, data, len(data), 0,
                     conn_id=100 + c)
        self.calls.append(ev)
        return ev

    def _h2(self, c: int) -> None:
        enc_c, enc_s = Encoder(), Encoder()
        body = b'{"h2": true}'
        self.sent["/h2/one"] = (b"", body)
        req = HeadersFrame(1, enc_c.encode([(":method", "GET"), (":path", "/h2/one"), (":scheme", "https"),
                                            (":authority", "api.test"), ("cookie", "s=1")]),
                           flags=["END_STREAM", "END_HEADERS"])
        self._call(c, R, H2_PREFACE + SettingsFrame(0).serialize() + req.serialize())
        resp = HeadersFrame(1, enc_s.encode([(":status", "200")]), flags=["END_HEADERS"]).serialize()
        self._call(c, W, SettingsFrame(0).serialize() + resp + DataFrame(1, body, flags=["END_STREAM"]).serialize())

    @property
    def exchanges(self) -> int:
        return len(self.sent)


def json_output(traffic: Traffic, tmp_path, lost: Lost | None = None, headers_only=False) -> list[dict]:
    """What `--format json` writes for the same calls (JsonSink behind the same HttpView)."""
    path = tmp_path / ("out-h.jsonl" if headers_only else "out.jsonl")
    sink = JsonSink(open(path, "wb"))
    sink.headers_only = headers_only
    view = HttpView(sink, lag_ns=0)
    feed(view, traffic.calls, lost)
    view.close()
    return [json.loads(line) for line in path.read_text().splitlines()]


def feed(view, calls, lost: Lost | None = None) -> None:
    for i, ev in enumerate(calls):
        view.on_data(ev)
        if lost is not None and i == len(calls) // 2:
            view.on_lost(lost)


class Status(list):
    """The sink's status callback: the lines it tells (tlstap prints them on stderr)."""
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            self.append(line)
        print(f"tlstap: {line}", file=sys.stderr)


def make_sink(url: str, status: Status, bodies: int = 0, queue_max: int = 64 << 20, spool_max: int = 0,
              spool_dir=None) -> ExportSink:
    return ExportSink(parse_url(url), bodies, queue_max, spool_max, spool_dir, status, "4321-1765000000")


def final_line(status: Status) -> re.Match:
    (m,) = [m for m in map(STATUS_LINE.fullmatch, status) if m]
    return m


def messages(urls) -> list[dict]:
    out = []
    for msg_id, data in stream_messages(urls, STREAM):
        obj = json.loads(data)
        assert obj["msg_id"] == msg_id          # the id in the object is the one JetStream dedups on
        out.append(obj)
    return out


def assert_exactly_once(objs: list[dict], traffic: Traffic) -> None:
    ids = [o["msg_id"] for o in objs]
    assert len(ids) == len(set(ids)), "a message is in the stream twice"
    targets = sorted(o["request"]["target"] for o in objs if o["type"] == "http")
    assert targets == sorted(traffic.sent), "exchanges missing from the stream"


def _order(objs: list[dict]) -> list:
    """What was exported, in order (the JSON output's order is the capture's)."""
    return [o["request"]["target"] if o["type"] == "http" else o["type"] for o in objs
            if o["type"] in ("http", "data", "lost")]


def assert_capture_order(got: list[dict], want: list[dict]) -> None:
    """The stream holds the capture's order, up to a few messages in flight when the connection
    broke (those nats-py had not yet written out are sent when it reconnects, before the retries
    this publisher puts back at the head; the CI saw 15 of them). Retries sent to the tail of
    the queue instead would put a whole window of messages behind everything queued meanwhile."""
    g, w = _order(got), _order(want)
    assert sorted(g) == sorted(w)
    place = {k: i for i, k in enumerate(w)}
    seq = [place[k] for k in g if w.count(k) == 1]
    # messages out of place = all but the longest increasing run of capture positions
    tails: list[int] = []
    for x in seq:
        i = bisect.bisect_left(tails, x)
        tails[i:i + 1] = [x]
    out_of_place = len(seq) - len(tails)
    assert out_of_place <= WINDOW // 8, f"{out_of_place} messages out of the capture's order"


def _cut_body(b: dict | None, n: int) -> dict | None:
    """The body policy, applied to a JSON output body: its first n bytes."""
    if b is None:
        return None
    raw = base64.b64decode(b["data"]) if b["encoding"] == "base64" else b["data"].encode()
    raw = raw[:n]
    try:
        return {"encoding": "utf-8", "data": raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {"encoding": "base64", "data": base64.b64encode(raw).decode()}


def with_policy(obj: dict, bodies: int) -> dict:
    """A JSON output object as the exporter should send it: no frames/notes/summary; bodies and
    raw data absent (bodies=0) or cut to `bodies` bytes, body_truncated saying so."""
    obj = json.loads(json.dumps(obj))
    if obj["type"] == "http":
        for side in ("request", "response"):
            m = obj[side]
            if m is None:
                continue
            if not bodies:
                m.pop("body", None)
                m.pop("decoded_body", None)
                continue
            full = m["body"]
            m["body"] = _cut_body(full, bodies)
            m["body_truncated"] = m["body_truncated"] or m["body"] != full
    elif obj["type"] == "data":
        if not bodies:
            del obj["encoding"], obj["data"]
        else:
            cut = _cut_body({"encoding": obj["encoding"], "data": obj["data"]}, bodies)
            obj["encoding"], obj["data"] = cut["encoding"], cut["data"]
    return obj


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
def nats_server(tmp_path):
    with NatsServer(tmp_path / "nats", name="export-n1") as s:
        add_stream([s.url], STREAM, ["tlstap.export.>"], replicas=1)
        yield s


# ---- the component: sink, queue, publisher -----------------------------------------------------

@pytest.mark.parametrize("bodies", [0, 100])
def test_each_exchange_raw_record_and_gap_is_one_message_as_the_json_output_has_it(nats_server, tmp_path, bodies):
    traffic = Traffic(300)
    lost = Lost(3, 4096, "ring buffer full")
    status = Status()
    sink = make_sink(f"{nats_server.url}/{SUBJECT}", status, bodies=bodies)
    view = HttpView(sink, lag_ns=0)
    feed(view, traffic.calls, lost)
    view.close()

    got = messages([nats_server.url])
    want = [o for o in json_output(traffic, tmp_path, lost) if o["type"] in ("http", "data", "lost")]
    assert [{k: v for k, v in o.items() if k != "msg_id"} for o in got] == [with_policy(o, bodies) for o in want]
    assert_exactly_once(got, traffic)
    # against what the peers sent, not only against the JSON output
    for o in got:
        if o["type"] != "http":
            continue
        req_body, resp_body = traffic.sent[o["request"]["target"]]
        for m, sent in ((o["request"], req_body), (o["response"], resp_body)):
            assert m["body_len"] == len(sent)
            if bodies:
                data = m["body"]
                raw = base64.b64decode(data["data"]) if data["encoding"] == "base64" else data["data"].encode()
                assert raw == sent[:bodies] and m["body_truncated"] == (len(sent) > bodies)
            else:
                assert "body" not in m and "decoded_body" not in m
    (raw,) = [o for o in got if o["type"] == "data"]
    assert raw["len"] == len(traffic.raw.data) and ("data" in raw) == bool(bodies)

    # ids: host, boot id, the traced pid, the capture, the connection, a per-connection sequence
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    first = [o for o in got if o["type"] == "http"][0]
    assert first["msg_id"] == f"{socket.gethostname()}:{boot}:4242:4321-1765000000:{0x7f0000:x}:100:0"
    m = final_line(status)
    assert m.group(1) == m.group(3) == str(len(got)) and m.group(5) == "0" and m.group(6) == "none"
    assert sink.stats()["acked"] == len(got) and sink.stats()["dropped"] == {}


def test_a_server_stopped_mid_run_gets_everything_once_after_its_restart(nats_server, tmp_path):
    """Killed while messages are in flight; what was queued meanwhile (in memory, then in the
    disk spool) goes out after the restart; retries of messages it had stored are deduplicated."""
    traffic = Traffic(1500)
    third = len(traffic.calls) // 3
    status = Status()
    sink = make_sink(f"{nats_server.url}/{SUBJECT}", status, queue_max=20_000, spool_max=16 << 20,
                     spool_dir=str(tmp_path))
    view = HttpView(sink, lag_ns=0)
    feed(view, traffic.calls[:third])
    wait_for(lambda: sink.stats()["acked"] > 50, 10, "the first acks")
    nats_server.stop(signal.SIGKILL)
    feed(view, traffic.calls[third:2 * third])
    view.flush()
    wait_for(lambda: any("lost the connection" in s for s in status), 10, "the exporter to tell the loss")
    assert sink.stats()["queued_bytes_disk"] > 0          # memory full: the spool holds the rest
    nats_server.start()
    feed(view, traffic.calls[2 * third:])
    view.close()

    got = messages([nats_server.url])
    assert_exactly_once(got, traffic)
    assert len(got) == traffic.exchanges + 1
    # retried messages went back to the head of the queue: the stream has the capture's order
    assert_capture_order(got, json_output(traffic, tmp_path))
    m = final_line(status)
    assert m.group(3) == str(len(got)) and m.group(5) == "0"
    assert sum("lost the connection" in s for s in status) == 1      # told once, not per event


def test_retries_of_messages_a_stalled_server_stored_are_deduplicated(nats_server):
    """The server freezes (SIGSTOP) with publishes in flight, longer than the ack timeout: the
    exporter sends them again, and on SIGCONT the server reads both copies. Nats-Msg-Id makes
    the second copies duplicates: acknowledged, not stored."""
    traffic = Traffic(400)
    status = Status()
    sink = make_sink(f"{nats_server.url}/{SUBJECT}", status)
    view = HttpView(sink, lag_ns=0)
    feed(view, traffic.calls[:10])
    wait_for(lambda: sink.stats()["acked"] >= 5, 10, "the first acks")
    nats_server.proc.send_signal(signal.SIGSTOP)
    try:
        feed(view, traffic.calls[10:])
        view.flush()
        wait_for(lambda: any("no acknowledgement" in s for s in status), 10, "an ack timeout")
        # the window sent, then sent again
        wait_for(lambda: sink.stats()["published"] >= 5 + 2 * WINDOW, 10, "the retries")
    finally:
        nats_server.proc.send_signal(signal.SIGCONT)
    view.close()
    got = messages([nats_server.url])
    assert_exactly_once(got, traffic)
    s = sink.stats()
    assert s["duplicates"] > 0 and s["acked"] == len(got) == traffic.exchanges + 1


def test_a_replicated_stream_survives_its_leader_stopping_mid_run(tmp_path):
    with NatsCluster(tmp_path / "cluster", name="export-c") as cluster:
        add_stream(cluster.urls, STREAM, ["tlstap.export.>"], replicas=3)
        hosts = ",".join(u.removeprefix("nats://") for u in cluster.urls)
        traffic = Traffic(900)
        half = len(traffic.calls) // 2
        status = Status()
        sink = make_sink(f"nats://{hosts}/{SUBJECT}", status)
        view = HttpView(sink, lag_ns=0)
        feed(view, traffic.calls[:half])
        wait_for(lambda: sink.stats()["acked"] > 50, 15, "the first acks")
        leader = _stream_leader(cluster.urls)
        node = next(n for n in cluster.nodes if n.name == leader)
        node.stop(signal.SIGKILL)
        feed(view, traffic.calls[half:])
        view.flush()
        # every event acknowledged by the two that are left (a new leader is elected within
        # seconds; a slow disk makes it longer): close() then has nothing to give up
        wait_for(lambda: sink.stats()["acked"] == sink.stats()["events"], 60, "acks from the new leader")
        view.close()
        # read from the two that are left: a restarted node catching up makes the stream answer
        # 503 for a while (CI once), which says nothing of what the exporter did
        got = messages([u for n, u in zip(cluster.nodes, cluster.urls) if n is not node])
        assert_exactly_once(got, traffic)
        assert len(got) == traffic.exchanges + 1
        assert_capture_order(got, json_output(traffic, tmp_path))
        assert final_line(status).group(5) == "0"


def _stream_leader(urls) -> str:
    import asyncio

    import nats

    async def go():
        nc = await nats.connect(list(urls))
        try:
            return (await nc.jetstream().stream_info(STREAM)).cluster.leader
        finally:
            await nc.close()
    return asyncio.run(go())


def test_overflow_while_the_server_is_down_is_dropped_and_counted(nats_server, tmp_path):
    """The first messages fit (memory, then spool) and arrive after the restart; the others are
    dropped as "queue full", counted, and told once."""
    nats_server.stop()
    traffic = Traffic(200, conns=1)
    status = Status()
    sink = make_sink(f"{nats_server.url}/{SUBJECT}", status, queue_max=8_000, spool_max=8_000,
                     spool_dir=str(tmp_path))
    view = HttpView(sink, lag_ns=0)
    feed(view, traffic.calls)
    view.finish()
    s = sink.stats()
    dropped = s["dropped"].get("queue full", 0)
    assert 0 < dropped < s["events"]
    assert sum("dropping events" in line for line in status) == 1
    nats_server.start()
    view.close()
    got = messages([nats_server.url])
    kept = s["events"] - dropped
    assert len(got) == kept
    # first in, first kept: the stream holds the oldest exchanges, in order
    order = [f"/items/{i}?c=0" for i in range(kept)]
    assert [o["request"]["target"] for o in got if o["type"] == "http"] == order[:len(got)]
    m = final_line(status)
    assert m.group(5) == str(dropped) and m.group(6) == f"queue full {dropped}"


def test_what_cannot_be_sent_by_the_end_is_reported_as_dropped_at_shutdown(nats_server, monkeypatch):
    monkeypatch.setattr(export_sink, "CLOSE_TIMEOUT_S", 0.5)
    nats_server.stop()
    traffic = Traffic(20, conns=1)
    status = Status()
    sink = make_sink(f"{nats_server.url}/{SUBJECT}", status)
    view = HttpView(sink, lag_ns=0)
    feed(view, traffic.calls)
    view.close()
    n = str(traffic.exchanges + 1)
    m = final_line(status)
    assert m.group(1) == n and m.group(3) == "0" and m.group(5) == n and m.group(6) == f"shutdown {n}"
    assert any("cannot reach" in s for s in status)


def test_a_message_over_the_servers_max_payload_is_dropped_and_counted(nats_server):
    """nats-server's max_payload is 1 MiB: a bigger message would make it close the connection
    (again at every retry); it is dropped and counted instead, and the others go through."""
    status = Status()
    sink = make_sink(f"{nats_server.url}/{SUBJECT}", status, bodies=4 << 20)
    view = HttpView(sink, lag_ns=0)
    view.on_data(TlsData(1, 1, 1, 0, "api", 5, R, CONN, 9, b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n", 33))
    view.on_data(TlsData(2, 1, 1, 0, "api", 5, W, CONN, 9, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 40))
    big = b"b" * (1 << 20)
    req = b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(big) + big
    view.on_data(TlsData(3, 1, 1, 0, "api", 5, R, CONN, 9, req, len(req)))
    view.on_data(TlsData(4, 1, 1, 0, "api", 5, W, CONN, 9, b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n", 44))
    view.close()
    assert [o["request"]["target"] for o in messages([nats_server.url])] == ["/small"]
    assert final_line(status).group(6) == "larger than the server's max_payload 1"
    assert not any("lost the connection" in s for s in status)


# ---- the target: check_target, parse_url ---------------------------------------------------------

def test_check_target_describes_the_stream(nats_server):
    desc = check_target(parse_url(f"{nats_server.url}/{SUBJECT}"))
    assert desc == f"stream {STREAM} (file, 1 replica, duplicate window 2m0s)"


def test_check_target_errors_are_one_line_with_the_remedy(tmp_path):
    from tests.peers._common import free_port
    nothing = f"nats://127.0.0.1:{free_port()}/{SUBJECT}"
    with pytest.raises(ExportTargetError) as e:
        check_target(parse_url(nothing), timeout=2)
    assert str(e.value).startswith(f"export target {nothing}: cannot connect") and "\n" not in str(e.value)
    assert "Connection refused" in str(e.value)

    plain = NatsServer(tmp_path / "plain", name="export-nojs")
    plain.argv = lambda a=plain.argv: [x for x in a() if x != "-js"]
    with plain:
        with pytest.raises(ExportTargetError) as e:
            check_target(parse_url(f"{plain.url}/{SUBJECT}"), timeout=2)
    assert "JetStream does not answer" in str(e.value) and "-js" in str(e.value) and "\n" not in str(e.value)

    with NatsServer(tmp_path / "js", name="export-nostream") as s:
        with pytest.raises(ExportTargetError) as e:
            check_target(parse_url(f"{s.url}/{SUBJECT}"), timeout=2)
    msg = str(e.value)
    assert f"no JetStream stream holds subject '{SUBJECT}'" in msg and "nats stream add" in msg
    assert "\n" not in msg and s.url in msg


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:4222/x", "expected nats://"),
    ("nats://127.0.0.1:4222", "no subject"),
    ("nats://127.0.0.1:4222/", "no subject"),
    ("nats://127.0.0.1:99999/x", "bad port '99999'"),
    ("nats://127.0.0.1:abc/x", "bad port 'abc'"),
    ("nats://127.0.0.1:4222/tlstap.*", "no wildcards"),
    ("nats://127.0.0.1:4222/tlstap.>", "no wildcards"),
    ("nats://127.0.0.1:4222/a..b", "not a subject"),
    ("nats://:4222/x", "bad host"),
])
def test_parse_url_refuses_bad_targets(url, why):
    with pytest.raises(ExportTargetError) as e:
        parse_url(url)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_parse_url_takes_several_servers_and_hides_credentials():
    t = parse_url("nats://u:secret@10.0.0.1:4223,10.0.0.2/ev.http")
    assert t.servers == ("nats://u:secret@10.0.0.1:4223", "nats://u:secret@10.0.0.2:4222")
    assert t.subject == "ev.http" and t.url == "nats://10.0.0.1:4223,10.0.0.2/ev.http"
    assert "secret" not in t.url


# ---- end to end: tlstap tls --export ----------------------------------------------------------------

SECRET_HEADERS = ["Authorization: Bearer tok-export-1", "Cookie: sid=s-export; theme=dark", "X-Trace: keep-me"]
REDACTED_NAMES = {"authorization", "cookie", "x-api-key", "proxy-authorization", "set-cookie"}


class ExportTap(Tap):
    """`tlstap tls --export URL ...`, its stdout in a file (with --export alone it writes nothing)."""

    def __init__(self, tmp_path, *args: str):
        self.stdout_path = tmp_path / f"stdout-{time.monotonic_ns()}"
        source = ["--source", self.default_source] if self.default_source else []
        self._setup(None, ["sh", "-c", 'exec "$@" > "$0"', str(self.stdout_path), tlstap_exe(), "tls",
                           *source, *args])


def _curl_pages(srv, tmp_path, pages: list[str]):
    """One curl, one connection, a request per page with the secret headers: what it sent."""
    args = ["--http1.1"]
    for h in SECRET_HEADERS:
        args += ["-H", h]
    for p in pages:
        args += [srv.url(p) + "?access_token=at-1&n=2", "-o", f"{p}.out"]
    r = curl(args, tmp_path)
    assert r.returncode == 0, r.stderr
    return curl_request_headers(r.stderr)


def _export_capture(tmp_path, cert, url: str, *flags: str):
    pages = {f"p{i}.html": (b"page %d: " % i) + b"x" * (300 + 50 * i) for i in range(3)}
    with NginxServer(*cert, pages) as srv:
        with ExportTap(tmp_path, "--pid", str(srv.worker_pids()[0]), "--export", url, *flags) as tap:
            sent = _curl_pages(srv, tmp_path, list(pages))
            srv.wait_logged(len(pages))
            tap.stop()
    return tap, pages, sent


def _by_target(objs: list[dict]) -> dict[str, dict]:
    return {o["request"]["target"].partition("?")[0].lstrip("/"): o for o in objs if o["type"] == "http"}


def test_cli_export_alone_redacts_and_leaves_bodies_out(nats_server, tmp_path, cert):
    tap, pages, sent = _export_capture(tmp_path, cert, f"{nats_server.url}/{SUBJECT}")
    assert tap.stdout_path.read_bytes() == b""           # no local text unless -o asks
    got = messages([nats_server.url])
    http = _by_target(got)
    assert sorted(http) == sorted(pages) and len([o for o in got if o["type"] == "http"]) == len(pages)
    for page, body in pages.items():
        req, resp = http[page]["request"], http[page]["response"]
        names = [k for k, _ in sent]
        assert [k for k, _ in req["headers"]] == names[:len(req["headers"])]
        for k, v in req["headers"]:
            assert v == ("REDACTED" if k.lower() in REDACTED_NAMES else dict(sent)[k])
        assert req["target"] == f"/{page}?access_token=REDACTED&n=2"
        assert "body" not in resp and resp["body_len"] == len(body)
    assert "tok-export-1" not in json.dumps(got) and "s-export" not in json.dumps(got)
    line = tap.wait_line(r"export: \d+ events", 1)
    m = STATUS_LINE.search(line)
    assert m and m.group(1) == m.group(3) == str(len(got)) and m.group(5) == "0", tap.stderr


def test_cli_export_bodies_and_a_local_json_file_agree(nats_server, tmp_path, cert):
    out = tmp_path / "out.jsonl"
    tap, pages, sent = _export_capture(tmp_path, cert, f"{nats_server.url}/{SUBJECT}", "--export-bodies", "320",
                                       "-o", str(out), "--format", "json")
    got = _by_target(messages([nats_server.url]))
    local = _by_target([json.loads(ln) for ln in out.read_text().splitlines()])
    assert sorted(got) == sorted(local) == sorted(pages)
    for page, body in pages.items():
        resp = got[page]["response"]
        assert body_of(resp) == body[:320] and resp["body_truncated"] == (len(body) > 320)
        # the local object (complete: no --redact), with the export's redaction and body policy
        want = with_policy(local[page], 320)
        want["request"]["headers"] = [[k, "REDACTED" if k.lower() in REDACTED_NAMES else v]
                                      for k, v in want["request"]["headers"]]
        want["request"]["target"] = want["request"]["target"].replace("access_token=at-1", "access_token=REDACTED")
        assert {k: v for k, v in got[page].items() if k != "msg_id"} == want


def test_cli_refuses_a_target_without_a_stream_before_capturing(tmp_path):
    with NatsServer(tmp_path / "js", name="export-cli-nostream") as s:
        out = tmp_path / "never.jsonl"
        r = run_tlstap("tls", "--pid", str(os.getpid()), "--export", f"{s.url}/{SUBJECT}", "-o", str(out))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if "no JetStream stream holds" in ln]
    assert s.url in line and not out.exists()


def test_doctor_checks_the_export_target(nats_server, tmp_path):
    url = f"{nats_server.url}/{SUBJECT}"
    r = run_tlstap("doctor", "--export", url)
    (line,) = [ln for ln in r.stdout.splitlines() if " export " in f" {ln} "]
    assert line.split()[0] == "OK" and f"stream {STREAM} (file, 1 replica, duplicate window 2m0s)" in line
    with NatsServer(tmp_path / "js", name="export-doc-nostream") as s:
        r = run_tlstap("doctor", "--export", f"{s.url}/{SUBJECT}")
    (line,) = [ln for ln in r.stdout.splitlines() if " export " in f" {ln} "]
    assert r.returncode != 0 and line.split()[0] == "FAIL" and "nats stream add" in line
