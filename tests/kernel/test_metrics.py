"""--metrics-addr end to end: tlstap captures a real TLS server (Python ssl, its own process)
and the real Prometheus (Debian's) scrapes tlstap's /metrics on loopback.

Oracles: what the client sent and received, and when (its own clock around each request), and
what the server was told to do (a route that sleeps a known time before it answers). After N
requests, K per route and status, PromQL gives N and K; the duration histogram's sums lie
between the server's sleep and the client's measured latency, and histogram_quantile within
the buckets of the client's fastest and slowest latency; body-size sums are the bytes sent;
the health metrics are there and agree (bytes captured >= body bytes, nothing lost). Also:
the query string is in no label, --metrics-peer, the series cap, the private metrics
directory (0700, removed at exit, a killed run's removed by the next), a busy port refused in
one line before any file is touched, bad addresses, and tlstap doctor's check of the port.
"""
from __future__ import annotations

import http.client
import os
import re
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import need
from tests.peers._common import free_port, stop_process, tail
from tests.peers.prometheus import Prometheus, have_prometheus

from .tap import READY_TIMEOUT, Tap, run_tlstap, tlstap_exe
from .test_cli_errors import assert_one_line_error

K = 5
SLOW_S = 0.06                  # the slow route's sleep, between reading a request and answering
UPLOAD = 500                   # bytes of each POST body
#: what a server's timestamps may exceed the client's interval by: the probe source stamps a write at
#: its return, after the kernel took the bytes and the client (another CPU) may have read them already
SLACK_S = 0.001
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

SERVER = r'''
import ssl, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"          # keep-alive: many requests per connection
    disable_nagle_algorithm = True         # headers and body are two writes: no delayed-ACK wait

    def do_GET(self):
        self.reply()

    def do_POST(self):
        self.reply()

    def reply(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = self.path.split("?")[0].split("/")
        if parts[1:3] == ["api", "fast"]:
            status, body = 200, b"f" * (100 + int(parts[3]))
        elif parts[1:3] == ["api", "slow"]:
            time.sleep(float(sys.argv[3]))
            status, body = 200, b"s" * (1000 + int(parts[3]))
        elif parts[1:3] == ["api", "upload"]:
            status, body = 201, b"ok"
        else:
            status, body = 404, b"not found\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
srv = ThreadingHTTPServer(("127.0.0.1", 0), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
'''


class SlowServer:
    """The HTTP/1.1 server above (Python ssl, the system libssl) in its own process."""

    def __init__(self, tmp_path, cert):
        self.tmp_path, self.cert = tmp_path, cert

    def __enter__(self):
        script = self.tmp_path / "server.py"
        script.write_text(SERVER)
        self._err = self.tmp_path / "server.stderr"
        with open(self._err, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(script), self.cert[0], self.cert[1], str(SLOW_S)],
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        line = self.proc.stdout.readline()       # the port, once it listens (it exits on failure: EOF)
        if not line.strip().isdigit():
            stop_process(self.proc)
            raise RuntimeError(f"the test server did not start: {line!r}\n{tail(self._err)}")
        self.port, self.pid = int(line), self.proc.pid
        return self

    def __exit__(self, *exc):
        stop_process(self.proc)
        self.proc.stdout.close()


CLIENT_IP = "127.0.0.2"        # not the server's address: the peer label must be the remote end


class Client:
    """Requests over one keep-alive TLS connection from CLIENT_IP, each timed by this process's clock."""

    def __init__(self, port: int):
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        self.conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30,
                                                source_address=(CLIENT_IP, 0))
        self.log: list[tuple[str, str, int, int, int, float]] = []   # method, path, status, sent, got, s

    def request(self, method: str, path: str, body: bytes = b"") -> None:
        t0 = time.monotonic()
        self.conn.request(method, path, body=body or None)
        r = self.conn.getresponse()
        got = r.read()
        self.log.append((method, path, r.status, len(body), len(got), time.monotonic() - t0))

    def close(self):
        self.conn.close()


class MetricsTap(Tap):
    """`tlstap tls --metrics-addr ADDR ARGS...` with no -o: its stdout is kept apart (no text
    may reach it) and its TMPDIR is a directory of the test's own."""

    def __init__(self, tmp_path, addr: str, *args: str):
        self.tmpdir = tmp_path / "tlstap-tmp"
        self.tmpdir.mkdir(exist_ok=True)
        self.stdout_path = tmp_path / "tlstap.stdout"
        self._setup("", [tlstap_exe(), "tls", "--metrics-addr", addr, *args])

    def __enter__(self):
        env = dict(os.environ, TMPDIR=str(self.tmpdir))
        with open(self.stdout_path, "wb") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.PIPE, text=True, env=env)
        self._pump = threading.Thread(target=self._read_stderr, daemon=True)
        self._pump.start()
        if not self.wait_line(r"ready in", READY_TIMEOUT) or self.proc.poll() is not None:
            self.stop() if self.proc.poll() is None else None
            raise AssertionError(f"tlstap did not become ready: {self.stderr}")
        return self

    def metrics_dirs(self) -> list:
        return [p for p in self.tmpdir.iterdir() if p.name.startswith("tlstap-metrics-")]


def bucket_above(x: float) -> float:
    return next((b for b in BUCKETS if b >= x), float("inf"))


def bucket_below(x: float) -> float:
    return max((b for b in (0.0, *BUCKETS) if b < x), default=0.0)


#: (source, --metrics-peer, --metrics-max-series): the cap of 3 label sets leaves the 4th route
#: (the uploads) to the overflow series
RUNS = [("wire", False, 3), ("probe", True, None)]


@pytest.mark.parametrize("source,peer,cap", RUNS)
def test_prometheus_scrapes_the_counts_durations_and_sizes_of_real_requests(tmp_path, cert, source, peer, cap):
    need(have_prometheus(), "prometheus is not installed (apt-get install prometheus)")
    port = free_port()
    addr = f"127.0.0.1:{port}"
    with Prometheus([addr], tmp_path) as prom, SlowServer(tmp_path, cert) as srv:
        tap = MetricsTap(tmp_path, addr, "--source", source, "--pid", str(srv.pid),
                         "--metrics-route", "/api/upload/{n}", *(["--metrics-peer"] if peer else []),
                         *(["--metrics-max-series", str(cap)] if cap else []))
        dead = subprocess.Popen(["true"])
        dead.wait()
        stale = tap.tmpdir / f"tlstap-metrics-{dead.pid}-left"       # as a killed tlstap leaves it
        stale.mkdir()
        with tap:
            d = tap.metrics_dirs()
            assert len(d) == 1 and d[0] != stale and stat.S_IMODE(d[0].stat().st_mode) == 0o700, d
            c = Client(srv.port)
            for i in range(K):
                c.request("GET", f"/api/fast/{i}?token=SECRET{i}")
                c.request("GET", f"/api/slow/{i}")
                c.request("GET", f"/nothing/{i}")
                c.request("POST", f"/api/upload/{i}", b"u" * UPLOAD)
            c.close()
            n = len(c.log)

            def total():
                return prom.value("sum(http_server_request_duration_seconds_count)")
            deadline = time.monotonic() + 30
            while total() != n and time.monotonic() < deadline:
                prom.wait_scrapes(1)
            assert total() == n, f"{total()} of {n} requests counted\n{tap.stderr}"
            prom.wait_scrapes(2)          # and no more are counted later: each exchange once
            assert total() == n
            check_traffic(prom, c.log, srv.pid, peer, cap)
            check_health(prom, c.log, source)
        assert tap.metrics_dirs() == []          # removed at exit
    assert tap.proc.returncode == 0
    assert os.path.getsize(tap.stdout_path) == 0, "with --metrics-addr alone, no text is written"
    served = tap.wait_line(r"metrics: served \d+ scrapes", 0)
    assert served and int(re.search(r"served (\d+)", served)[1]) >= 3, tap.stderr


def by(prom: Prometheus, promql: str, *labels: str) -> dict[tuple, float]:
    return {tuple(r["metric"].get(k) for k in labels): float(r["value"][1]) for r in prom.query(promql)}


def check_traffic(prom: Prometheus, log, server_pid: int, peer: bool, cap: int | None) -> None:
    routes = {"fast": ("GET", "200", "/api/fast/{id}"), "slow": ("GET", "200", "/api/slow/{id}"),
              "nothing": ("GET", "404", "/nothing/{id}"), "upload": ("POST", "201", "/api/upload/{n}")}
    if cap:                           # the uploads' label set came 4th: every label is the overflow value
        routes["upload"] = ("_overflow",) * 3
    refused = prom.value("sum(tlstap_metrics_series_refused_total)")
    assert (refused or 0) == (K if cap else 0)

    def kind(path):
        return path.split("/")[2] if path.startswith("/api/") else "nothing"
    keys = ("http_request_method", "http_response_status_code", "http_route")
    counts = by(prom, f"sum by ({','.join(keys)}) (http_server_request_duration_seconds_count)", *keys)
    assert counts == {r: K for r in routes.values()}
    with open(f"/proc/{server_pid}/comm") as f:
        comm = f.read().strip()
    assert set(by(prom, "sum by (process_executable_name) (http_server_request_duration_seconds_count)",
                  "process_executable_name")) == {(comm,)} | ({("_overflow",)} if cap else set())
    # no label carries the query string (nor anything of the request but method, status, route)
    series = prom.series('{__name__=~"http_.*"}')
    assert series and not [s for s in series if "SECRET" in str(s) or "token" in str(s)]
    # the peer: the client's address with --metrics-peer, else no such label
    assert {s.get("client_address") for s in series} - {"_overflow"} == ({CLIENT_IP} if peer else {None})
    # body sizes: the bytes each side really sent
    for fam, i in (("request", 3), ("response", 4)):
        got = by(prom, f"sum by (http_route) (http_server_{fam}_body_size_bytes_sum)", "http_route")
        want = {}
        for m, path, status, *_ in log:
            route = routes[kind(path)][2]
            want[(route,)] = want.get((route,), 0) + [e for e in log if e[1] == path][0][i]
        assert got == want, fam
    # durations: each slow request is >= the server's sleep and <= what the client measured
    lat = {k: [e[5] + SLACK_S for e in log if kind(e[1]) == k] for k in routes}
    sums = by(prom, "sum by (http_route) (http_server_request_duration_seconds_sum)", "http_route")
    for k, (_, _, route) in routes.items():
        assert 0 < sums[(route,)] <= sum(lat[k]), (k, sums[(route,)], lat[k])
    assert sums[("/api/slow/{id}",)] >= K * SLOW_S
    for k, (_, _, route) in routes.items():
        for q in (0.5, 0.99):
            v = prom.value(f'histogram_quantile({q}, sum by (le) '
                           f'(http_server_request_duration_seconds_bucket{{http_route="{route}"}}))')
            lo = bucket_below(SLOW_S) if k == "slow" else 0.0
            assert lo <= v <= bucket_above(max(lat[k])), (k, q, v, lat[k])


def check_health(prom: Prometheus, log, source: str) -> None:
    body_bytes = sum(e[3] + e[4] for e in log)
    captured = by(prom, "tlstap_captured_bytes_total", "source")
    main = "wire" if source == "wire" else "probe"
    assert captured[(main,)] >= body_bytes, captured
    assert by(prom, "tlstap_captured_records_total", "source")[(main,)] > 0
    assert prom.value("sum(tlstap_lost_records_total)") == 0
    assert prom.value(f'tlstap_lost_records_total{{source="{main}",reason="decoder_backlog_full"}}') == 0
    fill = by(prom, "tlstap_ring_fill_ratio", "source")
    assert (main,) in fill and all(0 <= v <= 1 for v in fill.values()), fill
    assert prom.value("tlstap_decoder_backlog_bytes") >= 0
    assert prom.value("tlstap_decoder_backlog_limit_bytes") > 0
    cpu = by(prom, "tlstap_cpu_seconds_total", "process")
    rss = by(prom, "tlstap_resident_memory_bytes", "process")
    assert cpu[("capture",)] > 0 and cpu[("decoder",)] > 0, cpu
    assert rss[("capture",)] > 10 << 20 and rss[("decoder",)] > 10 << 20, rss
    assert 0 <= prom.value("tlstap_metrics_snapshot_age_seconds") < 5
    if source == "wire":
        assert prom.value("tlstap_wire_connections_decrypted_total") >= 1


def test_a_busy_metrics_port_refuses_the_command_before_any_file_is_touched(tmp_path):
    out = tmp_path / "out.txt"
    out.write_bytes(b"left as it was\n")
    os.utime(out, (1_000_000_000, 1_000_000_000))
    before = out.stat()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = dict(os.environ, TMPDIR=str(tmp_path))
        r = subprocess.run([tlstap_exe(), "tls", "--metrics-addr", f"127.0.0.1:{port}", "-o", str(out)],
                           capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0] and f"pid {os.getpid()}" in lines[0]
    after = out.stat()
    assert out.read_bytes() == b"left as it was\n"
    assert (after.st_mtime_ns, after.st_mode) == (before.st_mtime_ns, before.st_mode)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tlstap-metrics-")]


@pytest.mark.parametrize("addr,code,needle", [
    ("9464", 2, "not HOST:PORT"), ("127.0.0.1:0", 2, "from 1 to 65535"), ("127.0.0.1:http", 2, "from 1 to 65535"),
    ("::1:9464", 2, "in brackets"), ("[nope]:9464", 2, "not an IPv6 address"),
    ("192.0.2.1:9464", 2, "not an address of this host"), ("no-such-host.invalid:9464", 2, "cannot resolve"),
])
def test_a_bad_metrics_address_is_one_line(addr, code, needle):
    r = run_tlstap("tls", "--metrics-addr", addr, timeout=60)
    assert_one_line_error(r, "--metrics-addr", addr, needle)
    assert r.returncode == code


def test_every_address_and_ipv6_loopback_can_be_served():
    """':PORT' binds every address ('::', which takes IPv4 too); [::1]:PORT the IPv6 loopback."""
    from tlstap.metrics.server import check_addr
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 on this host")
    assert check_addr(f":{free_port()}").startswith("http://[::]:")
    assert check_addr(f"[::1]:{free_port()}").startswith("http://[::1]:")


def test_doctor_checks_the_metrics_port():
    """A free port is OK; a busy one FAILs, naming the process that holds it."""
    free = f"127.0.0.1:{free_port()}"
    r = run_tlstap("doctor", "--metrics-addr", free, timeout=120)
    assert re.search(rf"^OK +metrics +http://{re.escape(free)}/metrics can be served", r.stdout + r.stderr, re.M), r
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        addr = "127.0.0.1:%d" % busy.getsockname()[1]
        r = run_tlstap("doctor", "--metrics-addr", addr, timeout=120)
    line = next((ln for ln in (r.stdout + r.stderr).splitlines() if re.match(r"FAIL +metrics", ln)), None)
    assert line and addr in line and "in use" in line and f"pid {os.getpid()}" in line, r.stdout + r.stderr
    assert r.returncode != 0
