"""tlstap gnutls against real GnuTLS peers (gnutls-cli / gnutls-serv, wget) on loopback."""
import base64
import os
import shutil
import subprocess

import pytest

from tests.peers import NginxServer
from tests.peers.gnutls import GnuTLSEchoServer, gnutls_echo

from .tap import Tap, assert_streams_match, payload

pytestmark = pytest.mark.skipif(not shutil.which("gnutls-serv") or not shutil.which("gnutls-cli"),
                                reason="gnutls-bin (gnutls-cli, gnutls-serv) is not installed")

class GnuTap(Tap):
    """`tlstap gnutls --format json -o FILE ...` in the background."""

    def __init__(self, tmp_path, *args, raw: bool = True):
        super().__init__(tmp_path, *args, command="gnutls", raw=raw)


@pytest.fixture
def echo_server(cert):
    with GnuTLSEchoServer(cert[0], cert[1]) as s:
        yield s


def _payload(n: int) -> bytes:
    # printable hex lines: gnutls-cli reads stdin with read() and sends what it got verbatim
    return (os.urandom(n // 2).hex() + "\n").encode()


def test_analyze_system_libgnutls():
    from tlstap.libs import gnutls
    t = gnutls.analyze(gnutls.system_libgnutls())
    assert t.version and t.version.startswith("GnuTLS 3.")
    roles = {s.symbol: s.role for s in t.sites}
    assert roles["gnutls_record_recv"] == "read" and roles["gnutls_record_send2"] == "write"
    assert roles["gnutls_deinit"] == "free"
    assert all(s.out_arg is None for s in t.sites)
    # send tail-jumps to send2 on 3.6.3+: probing both would be redundant
    assert "gnutls_record_send" not in roles


def test_gnutls_cli_serv_echo_byte_exact(tmp_path, echo_server):
    data = _payload(40_000)
    with GnuTap(tmp_path) as tap:
        c, s = gnutls_echo(echo_server, data)
    assert any("attached" in l and "GnuTLS 3." in l and "gnutls_record_send2" in l for l in tap.stderr_lines), \
        tap.stderr
    recs = tap.data()
    assert_streams_match([r for r in recs if r["pid"] == c.pid], [c])
    assert_streams_match([r for r in recs if r["pid"] == s.pid], [s])
    # one connection per process, every record attributed to it
    for t in (c, s):
        mine = [r for r in recs if r["pid"] == t.pid]
        assert {(r["local"]["ip"], r["local"]["port"]) for r in mine if r["local"]} == {t.local}
        assert all(r["local"] for r in mine), [(r["dir"], r["len"]) for r in mine if not r["local"]]
        assert all(r["fd"] >= 0 for r in mine)
    assert c.local == s.remote and c.remote == s.local
    summary = tap.summary()
    assert summary["lost_records"] == 0 and summary["truncated_calls"] == 0


def test_two_connections_not_mixed(tmp_path, echo_server):
    """gnutls_deinit drops the session's cached connection: a second session (often at the same
    address in gnutls-serv) is attributed to its own socket."""
    a, b = _payload(3000), _payload(5000)
    with GnuTap(tmp_path, "--pid", str(echo_server.pid)) as tap:
        _, s1 = gnutls_echo(echo_server, a)
        _, s2 = gnutls_echo(echo_server, b)
    recs = tap.data()
    assert {r["pid"] for r in recs} == {echo_server.pid}
    assert s1.remote != s2.remote
    assert_streams_match(recs, [s1, s2])


def test_pid_scope_client_only(tmp_path, echo_server):
    data = _payload(2000)
    from tlstap.libs.gnutls import system_libgnutls
    # gnutls-cli must exist before --pid: sh waits for a go line, then execs it (same pid); it
    # maps no libgnutls yet, so the library is named
    cmd = f"read x; exec gnutls-cli --insecure -p {echo_server.port} 127.0.0.1 --logfile=/dev/null"
    waiter = subprocess.Popen(["sh", "-c", cmd],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        with GnuTap(tmp_path, "--pid", str(waiter.pid), "--gnutls", system_libgnutls()) as tap:
            # `read x` consumes the first line only (sh reads stdin a byte at a time)
            out, _ = waiter.communicate(b"go\n" + data, timeout=30)
        assert out == data
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    recs = tap.data()
    assert recs and {r["pid"] for r in recs} == {waiter.pid}
    w = b"".join(payload(r) for r in recs if r["dir"] == "write")
    rd = b"".join(payload(r) for r in recs if r["dir"] == "read")
    assert w == data and rd == data


def _wget() -> str | None:
    w = shutil.which("wget")
    if not w:
        return None
    ldd = subprocess.run(["ldd", w], capture_output=True, text=True).stdout
    return w if "libgnutls" in ldd else None


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "http"])
def test_wget_against_nginx(tmp_path, cert, raw):
    wget = _wget()
    if wget is None:
        pytest.skip("no wget linked against GnuTLS")
    body = os.urandom(200_000)
    with NginxServer(cert[0], cert[1], {"blob": body}) as n:
        marker = "w" + os.urandom(6).hex()
        url = n.url("blob") + "?" + marker
        with GnuTap(tmp_path, raw=raw) as tap:
            p = subprocess.Popen([wget, "-q", "--no-check-certificate", "-O", str(tmp_path / "out"), url])
            p.wait(60)
        assert p.returncode == 0
        log = n.access_log()
    assert (tmp_path / "out").read_bytes() == body
    assert len(log) == 1
    recs = [r for r in tap.records() if r.get("pid") == p.pid]
    if raw:
        sent = b"".join(payload(r) for r in recs if r["type"] == "data" and r["dir"] == "write")
        got = b"".join(payload(r) for r in recs if r["type"] == "data" and r["dir"] == "read")
        assert sent.startswith(f"GET /blob?{marker} HTTP/1.1\r\n".encode()) and sent.endswith(b"\r\n\r\n")
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(body)
        assert len(got) == len(got.split(b"\r\n\r\n", 1)[0]) + 4 + len(body)   # exactly one response
        remote = {(r["remote"]["ip"], r["remote"]["port"]) for r in recs if r["type"] == "data"}
        assert remote == {(log[0]["server_addr"], n.port)}
        assert {r["local"]["port"] for r in recs if r["type"] == "data"} == {int(log[0]["remote_port"])}
    else:
        ex = [r for r in recs if r["type"] == "http"]
        assert len(ex) == 1, recs
        req, resp = ex[0]["request"], ex[0]["response"]
        assert req["method"] == "GET" and req["target"] == f"/blob?{marker}"
        assert resp["status"] == 200 and resp["complete"]
        b = resp["body"]
        got = base64.b64decode(b["data"]) if b["encoding"] == "base64" else b["data"].encode()
        assert resp["body_len"] == len(body) and got == body[:len(got)]   # kept up to --max-body
        assert len(got) == min(len(body), 64 << 10)
