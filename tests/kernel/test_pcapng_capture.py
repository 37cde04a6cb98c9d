"""`tlstap tls -m pcapng -i lo -w FILE [FILTER]` end to end: tshark reads ONLY the file.

The oracle for decrypted bytes is what the peers themselves sent and received (their
transcripts); for HTTP, the URIs curl asked for and the bodies nginx served.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import time

import pytest

from tests.conftest import needs
from tests.peers import (CurlClient, PySSLServer, have_tshark, run_curl, tshark_fields, tshark_http_uris,
                         tshark_tls_streams)

from .conftest import client
from .tap import Tap, run_tlstap, tlstap_exe

pytestmark = needs(have_tshark(), "tshark is not installed")


class PcapTap(Tap):
    """`tlstap tls -m pcapng -i lo -w FILE ARGS...` in the background."""

    def __init__(self, tmp_path, *args: str):
        out = str(tmp_path / f"cap-{time.monotonic_ns()}.pcapng")
        self._setup(out, [tlstap_exe(), "tls", "-m", "pcapng", "-i", "lo", "-w", out, *args])


def tshark_ok(path: str) -> None:
    r = subprocess.run(["tshark", "-r", path, "-c", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("tls", ["1.3", "1.2"])
@pytest.mark.parametrize("encoder", ["native", "python"])
def test_python_ssl_bytes_decrypted_from_the_file_alone(tmp_path, cert, host, tls, encoder, monkeypatch):
    # python: the encoder pcapng_mode falls back on (crossed timestamps, after a loss)
    monkeypatch.setenv("TLSTAP_NATIVE_EPB", "1" if encoder == "native" else "0")
    payloads = [os.urandom(3000), b"second request " * 50]
    with PySSLServer(*cert, host=host, tls_version=tls) as srv:
        with PcapTap(tmp_path, "tcp", "port", str(srv.port)) as tap:
            cl = client(srv, payloads, tls_version=tls)
            (t,) = cl.wait()
            srv.stop()
            tap.stop()
    streams = tshark_tls_streams(tap.out, tls_ports=[srv.port])
    assert len(streams) == 1, tap.stderr
    s = streams[0]
    assert s.sent_by(t.local) == t.sent and s.received_by(t.local) == t.received
    assert len(t.sent) >= 3000 and t.received
    assert stat.S_IMODE(os.stat(tap.out).st_mode) == 0o600


def test_curl_nginx_http1_tls13_and_tls12(tmp_path, cert, nginx):
    bodies = {"a.html": b"<p>alpha</p>\n" * 100, "b.bin": os.urandom(200_000)}
    srv = nginx(bodies)
    with PcapTap(tmp_path, "tcp", "port", str(srv.port)) as tap:
        res = [run_curl(srv.url(name), extra_args=args)
               for name, args in zip(bodies, ([], ["--tls-max", "1.2"]))]
        tap.stop()
    assert [r.body for r in res] == list(bodies.values())
    assert tshark_http_uris(tap.out) == [f"/{n}" for n in bodies]
    streams = tshark_tls_streams(tap.out)
    for r, body in zip(res, bodies.values()):
        (s,) = [s for s in streams if s.client == r.local]
        assert s.client_data.startswith(f"GET {r.body and '/'}".encode())
        assert s.server_data.endswith(body)          # the whole response, decrypted
    comments = {c for (c,) in tshark_fields(tap.out, ["frame.comment"]) if c}
    assert any(f"pid={r.pid} comm=curl" in c for c in comments for r in res), comments


def test_curl_nginx_http2(tmp_path, cert):
    from tests.peers import NginxServer
    with NginxServer(cert[0], cert[1], {"h2.txt": b"over h2\n"}, http2=True) as srv:
        with PcapTap(tmp_path, "tcp", "port", str(srv.port)) as tap:
            r = run_curl(srv.url("h2.txt"), http="2")
            tap.stop()
    assert r.http_version == "2" and r.body == b"over h2\n"
    rows = tshark_fields(tap.out, ["http2.headers.path"], "http2.headers.path")
    assert [row[0] for row in rows] == ["/h2.txt"]


def test_pid_scope_leaves_other_processes_out(tmp_path, cert, nginx):
    srv = nginx({"x": b"x" * 1000})
    a, b = CurlClient(srv.url("x")), CurlClient(srv.url("x"))
    with a, b, PcapTap(tmp_path, "--pid", str(a.pid)) as tap:
        ra, rb = a.go().wait(), b.go().wait()
        tap.stop()
    ports = {int(p) for row in tshark_fields(tap.out, ["tcp.srcport", "tcp.dstport"], "tcp") for p in row}
    assert ra.local[1] in ports and rb.local[1] not in ports
    assert tshark_http_uris(tap.out) == ["/x"]


def test_client_side_capture_decrypts_the_servers_flight(tmp_path, cert, nginx):
    # --pid of a TLS 1.3 client only: it logs the handshake secrets after the server's
    # encrypted flight has arrived, so those packets must wait for them in tlstap (the hold
    # rule in pcapng_mode.py); the server is out of scope and logs nothing
    body = os.urandom(50_000)
    srv = nginx({"c": body})
    a = CurlClient(srv.url("c"), extra_args=["--tlsv1.3"])
    with a, PcapTap(tmp_path, "--pid", str(a.pid)) as tap:
        r = a.go().wait()
        tap.stop()
    assert r.body == body
    (s,) = [s for s in tshark_tls_streams(tap.out) if s.client == r.local]
    assert s.server_data.endswith(body)
    types = {t for (row,) in tshark_fields(tap.out, ["tls.handshake.type"], "tls.handshake") for t in row.split(",")}
    assert {"8", "11", "20"} <= types      # EncryptedExtensions, Certificate, Finished: decrypted


def test_sigterm_leaves_a_complete_file(tmp_path, cert, nginx):
    srv = nginx({"t": b"t" * 5000})
    with PcapTap(tmp_path, "tcp", "port", str(srv.port)) as tap:
        run_curl(srv.url("t"))
        rc = tap.stop(signal.SIGTERM)
    assert rc == 0
    tshark_ok(tap.out)
    assert tshark_http_uris(tap.out) == ["/t"]
    assert "lost 0 packets" in tap.stderr


def test_the_capture_yields_to_the_workload(tmp_path):
    """Every thread of a running capture (the reader, the direct-I/O writer) is SCHED_BATCH:
    its wakeups do not preempt the traced server (runner.yield_to_the_workload)."""
    with PcapTap(tmp_path, "tcp", "port", "9") as tap:
        tasks = os.listdir(f"/proc/{tap.proc.pid}/task")
        policies = {os.sched_getscheduler(int(t)) for t in tasks}
    assert len(tasks) >= 2 and policies == {os.SCHED_BATCH}, (tasks, policies)


# ---- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("args,expect", [
    (["-m", "pcapng", "-w", "{tmp}/x.pcapng"], "-i IFACE"),
    (["-m", "pcapng", "-i", "nosuchif0", "-w", "{tmp}/x.pcapng"], "nosuchif0"),
    (["-m", "pcapng", "-i", "lo", "-w", "{tmp}/x.pcapng", "tcp", "port", "http2x"], "http2x"),
    (["-m", "pcapng", "-i", "lo", "-w", "/nonexistent/dir/x.pcapng"], "/nonexistent/dir/x.pcapng"),
    (["tcp", "port", "443"], "only applies to -m pcapng"),
])
def test_bad_input_is_one_line(tmp_path, args, expect):
    r = run_tlstap("tls", *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert expect in r.stderr
