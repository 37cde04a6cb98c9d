"""TrafficMetrics fed by the real HTTP view: HTTP/1.1 bytes as a captured server and client
read and wrote them -> HttpView -> exchanges -> histograms, counted per label set."""
from __future__ import annotations

import json
import socket

from prometheus_client.parser import text_string_to_metric_families

from tlstap.abi import Direction
from tlstap.events import BACKLOG_FULL, RING_FULL, Conn, Lost, TlsData
from tlstap.decode.httpview import HttpView
from tlstap.metrics import DECODER_FILE, TRAFFIC_FILE
from tlstap.metrics.route import RouteTemplater
from tlstap.metrics.traffic import TrafficMetrics
from tlstap.wire.decoder import AUTH_WHY, GAP_WHY

R, W = Direction.READ, Direction.WRITE
MS = 1_000_000


def conn(remote: str = "10.0.0.7", rport: int = 5555):
    return Conn.from_raw(socket.AF_INET, 443, rport, socket.inet_aton("127.0.0.1"), socket.inet_aton(remote))


class Feed:
    """A captured process's calls on one connection, at times we choose (ns)."""

    def __init__(self, view: HttpView, comm: str = "srv", ssl: int = 1, remote: str = "10.0.0.7"):
        self.view, self.comm, self.ssl, self.conn = view, comm, ssl, conn(remote, 5000 + ssl)

    def call(self, ts: int, direction: Direction, data: bytes) -> None:
        self.view.on_data(TlsData(ts, 10, 10, 0, self.comm, 3, direction, self.conn, self.ssl, data, len(data),
                                  conn_id=1))

    def server_exchange(self, t0: int, method: str, target: str, status: int, req_body: bytes = b"",
                        resp_body: bytes = b"", dur: int = MS) -> None:
        """The server reads a request at t0 and writes its response ending at t0 + dur."""
        self.call(t0, R, f"{method} {target} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer s3cret\r\n"
                         f"Content-Length: {len(req_body)}\r\n\r\n".encode() + req_body)
        self.call(t0 + dur, W, f"HTTP/1.1 {status} X\r\nContent-Length: {len(resp_body)}\r\n\r\n".encode() + resp_body)


def setup(**kw):
    tm = TrafficMetrics(RouteTemplater(kw.pop("patterns", ())), **kw)
    return tm, HttpView(tm, lag_ns=0)


def value(tm, name, **labels):
    return tm.registry.get_sample_value(name, labels) or 0


def series(tm, family):
    return [s for m in tm.registry.collect() if m.name == family for s in m.samples if s.name.endswith("_count")]


def lbl(method="GET", status="200", route="/", comm="srv", **extra):
    return {"http_request_method": method, "http_response_status_code": status, "http_route": route,
            "process_executable_name": comm, **extra}


def test_exchanges_are_counted_per_method_status_and_route_with_body_sizes():
    tm, v = setup()
    f = Feed(v)
    t = 10**18
    for i in range(3):
        f.server_exchange(t + i * 100 * MS, "GET", f"/users/{i + 1}?token=abc", 200, resp_body=b"x" * 100)
    f.server_exchange(t + 500 * MS, "POST", "/users", 201, req_body=b"y" * 1000, resp_body=b"ok")
    f.server_exchange(t + 600 * MS, "GET", "/missing", 404)
    d = "http_server_request_duration_seconds"
    assert value(tm, f"{d}_count", **lbl(route="/users/{id}")) == 3
    assert value(tm, f"{d}_count", **lbl("POST", "201", "/users")) == 1
    assert value(tm, f"{d}_count", **lbl(status="404", route="/missing")) == 1
    assert value(tm, "http_server_response_body_size_bytes_sum", **lbl(route="/users/{id}")) == 300
    assert value(tm, "http_server_request_body_size_bytes_sum", **lbl("POST", "201", "/users")) == 1000
    assert value(tm, "http_server_response_body_size_bytes_sum", **lbl("POST", "201", "/users")) == 2
    assert len(series(tm, "http_server_request_duration_seconds")) == 3
    assert not series(tm, "http_client_request_duration_seconds")
    # neither the query nor a header value is in any label
    for m in tm.registry.collect():
        for s in m.samples:
            assert not any("token" in x or "s3cret" in x or "abc" in x for x in s.labels.values()), s


def test_duration_is_first_request_byte_to_last_response_byte_in_the_conventions_buckets():
    tm, v = setup()
    f = Feed(v)
    t = 10**18
    # request headers at t, its body 5 ms later; response headers at t + 20 ms, its body at t + 30 ms
    f.call(t, R, b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n")
    f.call(t + 5 * MS, R, b"abc")
    f.call(t + 20 * MS, W, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    f.call(t + 30 * MS, W, b"ok")
    d = "http_server_request_duration_seconds"
    a = lbl("POST", route="/a")
    les = [s.labels["le"] for m in tm.registry.collect() if m.name == d for s in m.samples
           if s.name == f"{d}_bucket"]
    assert les == ["0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1.0", "2.5",
                   "5.0", "7.5", "10.0", "+Inf"]
    assert abs(value(tm, f"{d}_sum", **a) - 0.030) < 1e-6          # 30 ms, not 15 (last to first)
    assert value(tm, f"{d}_bucket", **a, le="0.025") == 0
    assert value(tm, f"{d}_bucket", **a, le="0.05") == 1
    assert value(tm, f"{d}_bucket", **a, le="+Inf") == 1
    # sizes: 0 is a bucket of its own (no body)
    f.server_exchange(t + 100 * MS, "GET", "/a", 200)
    assert value(tm, "http_server_request_body_size_bytes_bucket", **lbl(route="/a", le="0.0")) == 1
    assert value(tm, "http_server_request_body_size_bytes_bucket", **a, le="0.0") == 0
    assert value(tm, "http_server_request_body_size_bytes_bucket", **a, le="64.0") == 1


def test_a_method_outside_the_standard_ones_is_other():
    tm, v = setup()
    f = Feed(v)
    f.server_exchange(10**18, "PROPFIND", "/dav", 207)
    f.server_exchange(10**18 + 10 * MS, "PATCH", "/dav", 200)
    d = "http_server_request_duration_seconds_count"
    assert value(tm, d, **lbl("_OTHER", "207", "/dav")) == 1
    assert value(tm, d, **lbl("PATCH", "200", "/dav")) == 1


def test_series_beyond_the_cap_go_to_the_overflow_series_and_are_counted():
    tm, v = setup(max_series=2)
    f = Feed(v)
    for i, route in enumerate(["/a", "/b", "/c", "/d", "/a"]):
        f.server_exchange(10**18 + i * 10 * MS, "GET", route, 200)
    d = "http_server_request_duration_seconds_count"
    assert value(tm, d, **lbl(route="/a")) == 2          # known label sets keep being counted
    assert value(tm, d, **lbl(route="/b")) == 1
    assert value(tm, d, **lbl(route="/c")) == value(tm, d, **lbl(route="/d")) == 0
    over = dict.fromkeys(lbl(), "_overflow")
    assert value(tm, d, **over) == 2
    assert value(tm, "tlstap_metrics_series_refused_total", side="server") == 2
    assert len(series(tm, "http_server_request_duration_seconds")) == 3     # max_series + the overflow one


def test_client_side_peer_label_and_interim_and_incomplete_exchanges():
    tm, v = setup(peer=True)
    f = Feed(v, comm="curl", remote="192.0.2.9")
    t = 10**18
    # a client writes its request and reads 100 Continue, then the final response
    f.call(t, W, b"PUT /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    f.call(t + MS, R, b"HTTP/1.1 100 Continue\r\n\r\n")
    f.call(t + 2 * MS, W, b"hello")
    f.call(t + 3 * MS, R, b"HTTP/1.1 204 No Content\r\n\r\n")
    f.call(t + 4 * MS, W, b"GET /never-answered HTTP/1.1\r\nHost: a\r\n\r\n")
    v.finish()
    d = "http_client_request_duration_seconds_count"
    labels = lbl("PUT", "204", "/up", "curl", server_address="192.0.2.9")
    assert value(tm, d, **labels) == 1                       # the 100 is not an exchange of its own
    assert value(tm, "http_client_request_body_size_bytes_sum", **labels) == 5
    assert len(series(tm, "http_client_request_duration_seconds")) == 1
    assert value(tm, "tlstap_http_exchanges_incomplete_total", side="client", missing="response") == 1
    # a server that joined mid-connection: a response without its request
    g = Feed(v, ssl=2)
    g.call(t + 10 * MS, W, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    v.finish()
    assert value(tm, "tlstap_http_exchanges_incomplete_total", side="server", missing="request") == 1


def test_decoder_counters_and_losses_only_the_decoder_sees():
    tm, _ = setup()
    stats = {"connections": 5, "connections_decrypted": 3, "not_tls": 1, "bytes_decrypted": 1000,
             "not_attributed": 1, "not_decrypted": {"midstream": 1}}
    tm.observe_decoder(stats)
    tm.observe_decoder(dict(stats, connections=7, not_decrypted={"midstream": 1, "nokeys": 2}))
    assert value(tm, "tlstap_wire_connections_total") == 7
    assert value(tm, "tlstap_wire_connections_decrypted_total") == 3
    assert value(tm, "tlstap_wire_decrypted_bytes_total") == 1000
    assert value(tm, "tlstap_wire_connections_not_attributed_total") == 1
    assert value(tm, "tlstap_wire_connections_not_decrypted_total", reason="midstream") == 1
    assert value(tm, "tlstap_wire_connections_not_decrypted_total", reason="nokeys") == 2
    tm.on_lost(Lost(0, 1234, f"{GAP_WHY}: 1234 bytes before seq 5"))
    tm.on_lost(Lost(1, 0, f"{AUTH_WHY}: bad tag"))
    tm.on_lost(Lost(9, 900, RING_FULL))                   # the capture process counts these
    tm.on_lost(Lost(9, 900, BACKLOG_FULL))
    assert tm.lost == {"records": {"authentication_failed": 1}, "bytes": {"stream_gap": 1234}}


def test_the_probe_source_has_no_wire_counters():
    tm, _ = setup()
    tm.observe_decoder({})
    assert not [m for m in tm.registry.collect() if m.name.startswith("tlstap_wire")]


def test_the_snapshot_is_valid_exposition_text_written_at_most_once_a_second(tmp_path):
    tm, v = setup(snapshot_dir=str(tmp_path))
    f = Feed(v)
    f.server_exchange(10**18, "GET", "/a", 200, resp_body=b"x" * 7)
    tm.on_lost(Lost(0, 5, f"{GAP_WHY}: 5 bytes"))
    tm.flush()
    text = (tmp_path / TRAFFIC_FILE).read_text()
    fams = {m.name: m for m in text_string_to_metric_families(text)}
    count = [s for s in fams["http_server_request_duration_seconds"].samples if s.name.endswith("_count")]
    assert [(s.labels, s.value) for s in count] == [(lbl(route="/a"), 1)]
    assert json.loads((tmp_path / DECODER_FILE).read_text()) == {"lost": {"records": {}, "bytes": {"stream_gap": 5}}}
    f.server_exchange(10**18 + MS, "GET", "/a", 200)
    tm.flush()                                            # within a second of the last: not yet
    assert text == (tmp_path / TRAFFIC_FILE).read_text()
    tm.close()                                            # the end: whatever changed goes out
    assert "http_server_request_duration_seconds_count" in (tmp_path / TRAFFIC_FILE).read_text()
    fams = {m.name: m for m in text_string_to_metric_families((tmp_path / TRAFFIC_FILE).read_text())}
    assert [s.value for s in fams["http_server_request_duration_seconds"].samples if s.name.endswith("_count")] == [2]
