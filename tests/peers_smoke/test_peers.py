"""Smoke test of the TLS peer harness (tests/peers): every peer completes a real exchange on
loopback and the two ends' transcripts agree (client sent == server received, byte-exact;
local/remote mirrored). No tlstap involvement."""
import os
import subprocess
from pathlib import Path

import pytest


from tests.peers import (CurlClient, NginxServer, OpenSSLServer, PySSLClient, PySSLServer,
                         Transcript, make_cert, tcp_sockets, openssl_exchange, run_curl, run_curl_post,
                         run_node_https, run_pyssl_client)
from tests.peers.pyssl_peer import HDR


@pytest.fixture(scope="session")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("certs"))


def frame(p: bytes) -> bytes:
    return HDR.pack(len(p)) + p


def by_client_port(server_ts):
    return {t.remote[1]: t for t in server_ts}


def assert_pairs(client_ts, server_ts):
    """Each client transcript has exactly one mirrored server transcript."""
    assert len(client_ts) == len(server_ts)
    srv = by_client_port(server_ts)
    for c in client_ts:
        s = srv[c.local[1]]
        assert c.error is None and s.error is None, (c.error, s.error)
        assert c.local == s.remote and c.remote == s.local
        assert c.sent == s.received and c.received == s.sent
        assert c.mirrors(s)


def libssl_mapped(pid):
    return "libssl.so" in Path(f"/proc/{pid}/maps").read_text()


def test_make_cert_cached(cert, tmp_path):
    c, k = cert
    assert make_cert(c.parent) == (c, k)
    text = subprocess.run(["openssl", "x509", "-in", str(c), "-noout", "-text"], capture_output=True,
                          text=True, check=True, timeout=10).stdout
    assert "CN = localhost" in text and "IP Address:127.0.0.1" in text and "DNS:localhost" in text
    assert "IP Address:0:0:0:0:0:0:0:1" in text


def test_pyssl_echo_8mib(cert):
    payload = os.urandom(8 << 20)
    with PySSLServer(*cert) as srv:
        assert srv.pid != os.getpid()
        cts = run_pyssl_client(srv.port, [payload])
    sts = srv.transcripts()
    assert_pairs(cts, sts)
    (c,) = cts
    assert c.sent == frame(payload) and c.received == payload
    assert c.pid != srv.pid and sts[0].pid == srv.pid and sts[0].tid not in (None, srv.pid)
    assert c.remote == ("127.0.0.1", srv.port)


def test_pyssl_fixed_response_multi_request_tls12(cert):
    # several framed requests on one connection, fixed response, TLS 1.2
    with PySSLServer(*cert, response=b"R" * 1000, tls_version="1.2") as srv:
        cts = run_pyssl_client(srv.port, [b"q" * 10], expect_response_len=1000)
    assert_pairs(cts, srv.transcripts())
    assert cts[0].received == b"R" * 1000


def test_pyssl_32_conns_8_threads(cert):
    payloads = [f"conn-{i:02d}-".encode() + os.urandom(1000 + 37 * i) for i in range(32)]
    with PySSLServer(*cert) as srv:
        cts = run_pyssl_client(srv.port, payloads, conns=32, threads=8)
    sts = srv.transcripts()
    assert_pairs(cts, sts)
    assert [c.sent for c in cts] == [frame(p) for p in payloads]          # distinct, in order
    assert len({c.tid for c in cts}) == 8 and {c.pid for c in cts} == {cts[0].pid}
    assert len({s.tid for s in sts}) == 32                                 # thread per connection


def test_pyssl_ipv6(cert):
    with PySSLServer(*cert, host="::1") as srv:
        cts = run_pyssl_client(srv.port, [b"over v6"], host="::1")
    assert_pairs(cts, srv.transcripts())
    assert cts[0].remote == ("::1", srv.port) and cts[0].local[0] == "::1"


def test_pyssl_client_waits_for_go(cert):
    with PySSLServer(*cert) as srv:
        cli = PySSLClient(srv.port, [b"a", b"bb"], conns=2)
        try:
            assert libssl_mapped(cli.pid)          # a tracer can attach now ...
            assert tcp_sockets(cli.pid) == []      # ... and nothing has connected yet
        finally:
            cts = cli.go().wait()
    assert_pairs(cts, srv.transcripts())
    assert all(c.pid == cli.pid for c in cts)


@pytest.mark.parametrize("tls", ["1.3", "1.2"])
def test_openssl_s_client_s_server(cert, tls):
    cdata, sdata = os.urandom(100_000), os.urandom(70_000)
    with OpenSSLServer(*cert, tls=tls) as srv:
        c, s = openssl_exchange(srv, cdata, sdata)
    assert c.sent == s.received == cdata
    assert s.sent == c.received == sdata
    assert c.local == s.remote and c.remote == s.local == ("127.0.0.1", srv.port)
    assert c.pid != s.pid and s.pid == srv.pid


def test_nginx_curl(cert):
    files = {"a.bin": os.urandom(300_000), "dir/b.txt": b"hello\n" * 100}
    with NginxServer(*cert, files) as n:
        assert n.worker_pids() and n.master_pid not in n.worker_pids()
        r1 = run_curl(n.url("a.bin"))
        r2 = run_curl(n.url("/dir/b.txt"))
        rp = run_curl_post(n.url("a.bin"), b"posted body")
        log = {e["remote_port"]: e for e in n.access_log()}
        workers = n.worker_pids()
    assert r1.body == files["a.bin"] and r2.body == files["dir/b.txt"]
    assert rp.status == 405                        # static location: body is read and discarded
    for r in (r1, r2, rp):
        e = log[r.local[1]]
        assert r.remote == ("127.0.0.1", n.port) == (e["server_addr"], e["server_port"])
        assert r.local == (e["remote_addr"], e["remote_port"]) and r.http_version == "1.1"
    assert not any(Path(f"/proc/{w}").exists() for w in workers)  # stopped at exit


def test_nginx_http2_ipv6_curl_idle_start(cert):
    with NginxServer(*cert, {"x": b"X" * 5000}, http2=True, ipv6=True) as n:
        cli = CurlClient(n.url("x", ipv6=True), http="2")
        assert libssl_mapped(cli.pid)
        r = cli.go().wait()
        (e,) = n.access_log()
    assert r.body == b"X" * 5000 and r.http_version == "2"
    assert r.remote == ("::1", n.port) and r.local == (e["remote_addr"], e["remote_port"])


def test_nginx_node(cert):
    out = subprocess.run(["ldd", "/usr/bin/node"], capture_output=True, text=True, timeout=10).stdout
    assert "libssl" not in out                     # static OpenSSL: the point of this peer
    with NginxServer(*cert, {"n.json": b'{"k": 1}\n' * 1000}) as n:
        r = run_node_https(n.url("n.json"))
        rp = run_node_https(n.url("n.json"), method="POST", body=b"node body")
        log = {e["remote_port"]: e for e in n.access_log()}
    assert r.status == 200 and r.body == b'{"k": 1}\n' * 1000 and rp.status == 405
    for x in (r, rp):
        e = log[x.local[1]]
        assert x.remote == ("127.0.0.1", n.port) and x.local == (e["remote_addr"], e["remote_port"])


def test_transcript_json_roundtrip():
    t = Transcript(1, 2, ("::1", 3), ("::1", 4), b"\x00s", b"r\xff")
    assert Transcript.from_json(t.to_json()) == t
