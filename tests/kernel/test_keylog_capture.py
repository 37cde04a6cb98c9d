"""`tlstap tls -m keylog` against real TLS peers: the oracle is the library's own key log.

For the same connections, the set of lines tlstap writes must equal the set the library wrote
through its key log callback (SSLKEYLOGFILE, keylog_filename, -keylogfile, --tls-keylog),
with OpenSSL's literal *_TRAFFIC_SECRET_N lines numbered per connection and direction.
tlstap captures every process here, so its lines are compared for the client randoms of the
peers' connections; any other line it wrote for those connections is an error too.
"""
from __future__ import annotations

import os
import stat
import subprocess

import pytest

from tests.conftest import need, needs
from tests.peers import (CtypesSSLClient, NodeClient, OpenSSLServer, PacketCapture, PySSLServer,
                         client_randoms, derive_key_updates, find_psycopg2_libssl, have_tshark,
                         openssl_client, run_curl, tshark_http_uris, wait_for)

from .conftest import client, static_node
from .tap import KeyTap, assert_same_lines, run_tlstap

TLS12_CIPHERS = ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305"]
TLS13_SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]


def test_python_ssl_tls13_both_ends(tmp_path, cert):
    with KeyTap(tmp_path) as tap, PySSLServer(*cert, keylog=True) as srv:
        cl = client(srv, [b"ping" * 10], keylog=True)
        cl.wait()
        srv.stop()
        tap.stop()
    got = assert_same_lines(tap, cl.keylog(), srv.keylog())
    assert {ln.split()[0] for ln in got} == {"CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
                                             "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0", "EXPORTER_SECRET"}
    assert stat.S_IMODE(os.stat(tap.out).st_mode) == 0o600


@pytest.mark.parametrize("cipher", TLS12_CIPHERS)
def test_python_ssl_tls12(tmp_path, cert, cipher):
    with KeyTap(tmp_path) as tap, PySSLServer(*cert, keylog=True, tls_version="1.2", ciphers=cipher) as srv:
        cl = client(srv, [b"x" * 100], keylog=True, tls_version="1.2", ciphers=cipher)
        cl.wait()
        srv.stop()
        tap.stop()
    assert [i["cipher"] for i in cl.info()] == [cipher]
    got = assert_same_lines(tap, cl.keylog(), srv.keylog())
    assert [ln.split()[0] for ln in got] == ["CLIENT_RANDOM"]


def test_python_ssl_resumption_tls13(tmp_path, cert):
    with KeyTap(tmp_path) as tap, PySSLServer(*cert, keylog=True) as srv:
        cl = client(srv, [b"a"], conns=3, keylog=True, resume=True)
        cl.wait()
        srv.stop()
        tap.stop()
    assert [i["session_reused"] for i in cl.info()][1:] == [True, True]
    got = assert_same_lines(tap, cl.keylog(), srv.keylog())
    assert len(client_randoms(got)) == 3


def test_python_ssl_resumption_tls12(tmp_path, cert):
    with KeyTap(tmp_path) as tap, PySSLServer(*cert, keylog=True, tls_version="1.2") as srv:
        cl = client(srv, [b"a"], conns=2, keylog=True, resume=True, tls_version="1.2")
        cl.wait()
        srv.stop()
        tap.stop()
    assert [i["session_reused"] for i in cl.info()] == [False, True]
    assert_same_lines(tap, cl.keylog(), srv.keylog())


@pytest.mark.parametrize("suite", TLS13_SUITES)
def test_openssl_cli_tls13_suites(tmp_path, cert, suite):
    with KeyTap(tmp_path) as tap:
        with OpenSSLServer(*cert, keylog=True, ciphersuites=suite) as srv:
            run = openssl_client(srv, [(b"hello\n", b"world\n")], ciphersuites=suite)
        tap.stop()
    assert run.summary.get("Ciphersuite") == suite
    assert_same_lines(tap, run.keylog, srv.keylog())


def test_openssl_cli_hello_retry_request(tmp_path, cert):
    with KeyTap(tmp_path) as tap:
        with OpenSSLServer(*cert, keylog=True, groups="P-256") as srv:
            run = openssl_client(srv, [(b"q1\n", b"r1\n")], groups="X25519:P-256")
        tap.stop()
    assert run.hello_retry
    assert_same_lines(tap, run.keylog, srv.keylog())


def test_openssl_cli_key_updates_are_numbered(tmp_path, cert):
    """K: the client updates and asks the server to (both directions move); k: client only."""
    steps = [(b"before\n", b"one\n"), "K", (b"middle\n", b"two\n"), "k", (b"after\n", b"three\n")]
    with KeyTap(tmp_path) as tap:
        with OpenSSLServer(*cert, keylog=True, ciphersuites="TLS_AES_256_GCM_SHA384") as srv:
            run = openssl_client(srv, steps, ciphersuites="TLS_AES_256_GCM_SHA384")
        tap.stop()
    assert (run.key_updates_sent, run.key_updates_received) == (2, 1)
    got = assert_same_lines(tap, run.keylog, srv.keylog())
    labels = sorted(ln.split()[0] for ln in got)
    assert {"CLIENT_TRAFFIC_SECRET_1", "CLIENT_TRAFFIC_SECRET_2", "SERVER_TRAFFIC_SECRET_1"} <= set(labels)
    # independent of any library: RFC 8446 7.2 from the library's own _0 lines
    assert set(derive_key_updates(run.keylog, {"CLIENT": 2, "SERVER": 1})) <= got


def test_curl_against_nginx(tmp_path, cert, nginx):
    srv = nginx({"index.html": b"<p>hello</p>\n"})
    with KeyTap(tmp_path) as tap:
        res = [run_curl(f"https://127.0.0.1:{srv.port}/index.html", keylog=True, extra_args=args)
               for args in ([], ["--tls-max", "1.2"])]
        tap.stop()
    assert all(r.status == 200 for r in res)
    assert_same_lines(tap, *(r.keylog for r in res))


def test_node_static_openssl_pid_scoped(tmp_path, nginx):
    node = need(static_node(), "no node binary with statically linked OpenSSL (set TLSTAP_TEST_NODE; quickstart.sh test does)")
    srv = nginx({"n": b"ok\n"})
    nc = NodeClient(srv.url("n"), keylog=True)
    with nc, KeyTap(tmp_path, "--pid", str(nc.pid), "--libssl", node) as tap:
        res = nc.go().wait()
        tap.stop()
    assert "ssl_log_secret(push)" in tap.stderr
    assert_same_lines(tap, res.keylog)
    assert set(client_randoms(tap.lines())) == set(client_randoms(res.keylog))   # nothing of the server


def test_wheel_openssl35_with_key_update(tmp_path, cert):
    libssl = need(find_psycopg2_libssl(), "psycopg2-binary (bundled OpenSSL 3.5) is not installed (pip install .[test])")
    with PySSLServer(*cert) as srv:
        cl = CtypesSSLClient(libssl, srv.port, [b"one", b"two", b"three"], key_updates=[1])
        with cl, KeyTap(tmp_path, "--pid", str(cl.pid), "--libssl", str(libssl)) as tap:
            res = cl.go().wait()
            tap.stop()
    assert res.openssl_version.startswith("OpenSSL 3.5") and "(OpenSSL 3.5" in tap.stderr
    assert res.key_updates_sent == 1
    got = assert_same_lines(tap, res.keylog)
    assert any(ln.startswith("CLIENT_TRAFFIC_SECRET_1 ") for ln in got)


def test_pid_scope_leaves_other_processes_out(tmp_path, cert):
    with PySSLServer(*cert, keylog=True) as srv:
        a = client(srv, [b"a"], keylog=True)
        b = client(srv, [b"b"], keylog=True)
        with a, b, KeyTap(tmp_path, "--pid", str(a.pid)) as tap:
            a.go(), b.go()
            a.wait(), b.wait()
            tap.stop()
    assert set(client_randoms(tap.lines())) == set(client_randoms(a.keylog()))
    assert not set(client_randoms(b.keylog())) & set(client_randoms(tap.lines()))


def test_many_short_connections(tmp_path, cert):
    """1000 handshakes: every line written, none twice, nothing lost."""
    with KeyTap(tmp_path) as tap, PySSLServer(*cert, keylog=True) as srv:
        cl = client(srv, [b"z"], conns=1000, threads=4, keylog=True)
        cl.wait()
        srv.stop()
        tap.stop()
    got = assert_same_lines(tap, cl.keylog())
    assert len(got) == 5000
    lines = tap.lines()
    assert len(lines) == len(set(lines))
    assert "lost 0 events" in tap.stderr


def test_lines_are_in_the_file_before_exit(tmp_path, cert):
    """Flushed as written: a reader tailing the file sees a handshake's lines while tlstap runs."""
    with KeyTap(tmp_path) as tap, PySSLServer(*cert, keylog=True) as srv:
        cl = client(srv, [b"live"], keylog=True)
        cl.wait()
        crs = set(client_randoms(cl.keylog()))
        assert wait_for(lambda: crs <= set(client_randoms(tap.lines())) and len(tap.lines()) >= 5, 10,
                        "the handshake's lines in the key log file")
        assert tap.proc.poll() is None


@needs(have_tshark(), "tshark is not installed")
def test_tshark_decrypts_with_tlstap_keys_only(tmp_path, cert, nginx):
    srv = nginx({"a.html": b"A\n", "b.html": b"B\n"})
    uris = ["/a.html", "/b.html"]
    with KeyTap(tmp_path) as tap, PacketCapture(tmp_path / "lo.pcapng", [srv.port]) as cap:
        for u, args in zip(uris, ([], ["--tls-max", "1.2"])):
            assert run_curl(f"https://127.0.0.1:{srv.port}{u}", extra_args=args).status == 200
        tap.stop()
    assert tshark_http_uris(cap.path, tls_ports=[srv.port]) == []      # no keys: nothing readable
    assert sorted(tshark_http_uris(cap.path, keylog=tap.out, tls_ports=[srv.port])) == uris


# ---- bad input ---------------------------------------------------------------------------

def test_not_openssl_is_one_line(tmp_path):
    r = run_tlstap("tls", "-m", "keylog", "-k", str(tmp_path / "k"), "--libssl", "/bin/ls")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "not OpenSSL" in r.stderr


def test_unknown_layout_names_the_library(tmp_path):
    """SSL_write without the functions keylog needs: refused in one line, nothing attached."""
    src = tmp_path / "fake.c"
    src.write_text("int SSL_write(void *s, const void *b, int n) { return n; }\n"
                   "int SSL_read(void *s, void *b, int n) { return 0; }\n")
    lib = tmp_path / "libssl.so.3"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)], check=True)
    r = run_tlstap("tls", "-m", "keylog", "-k", str(tmp_path / "k"), "--libssl", str(lib))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert str(lib) in r.stderr and "cannot establish" in r.stderr
    assert not os.path.exists(tmp_path / "k") or os.path.getsize(tmp_path / "k") == 0


def test_unwritable_key_file(tmp_path):
    r = run_tlstap("tls", "-m", "keylog", "-k", "/nonexistent/dir/keys.log")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "/nonexistent/dir/keys.log" in r.stderr


def test_client_killed_mid_handshake(tmp_path, cert):
    """A client killed while waiting for the ServerHello: no line, no crash; later handshakes
    are still logged."""
    import socket
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(1)
    with KeyTap(tmp_path) as tap:
        p = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{lsn.getsockname()[1]}"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        conn, _ = lsn.accept()
        conn.settimeout(10)
        assert conn.recv(5)[:1] == b"\x16"          # its ClientHello arrived
        p.kill()
        p.wait()
        conn.close()
        lsn.close()
        with PySSLServer(*cert, keylog=True) as srv:
            cl = client(srv, [b"after"], keylog=True)
            cl.wait()
            srv.stop()
    # no crash: leaving the `with` checked tlstap's exit status
    assert_same_lines(tap, cl.keylog(), srv.keylog())
