"""tlstap gnutls against real GnuTLS peers (gnutls-cli / gnutls-serv, wget) on loopback."""
import base64
import os
import shutil
import subprocess

import pytest

from tests.conftest import need, needs
from tests.peers import NginxServer, client_randoms, have_tshark, read_keylog, tshark_tls_streams
from tests.peers.gnutls import GnuTLSEchoServer, gnutls_echo

from .tap import KeyTap, Tap, assert_same_lines, assert_streams_match, payload, tlstap_exe

pytestmark = needs(shutil.which("gnutls-serv") and shutil.which("gnutls-cli"),
                   "gnutls-bin (gnutls-cli, gnutls-serv) is not installed")

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


def _raw_lines(path) -> set[str]:
    with open(path) as f:
        return set(f.read().splitlines())


def test_analyze_system_libgnutls():
    from tlstap.probes import gnutls
    t = gnutls.analyze(gnutls.system_libgnutls())
    assert t.version and t.version.startswith("GnuTLS 3.")
    roles = {s.symbol: s.role for s in t.sites}
    assert roles["gnutls_record_recv"] == "read" and roles["gnutls_record_send2"] == "write"
    assert roles["gnutls_deinit"] == "free"
    assert all(s.out_arg is None for s in t.sites)
    # send tail-jumps to send2 on 3.6.3+: probing both would be redundant
    assert "gnutls_record_send" not in roles


def test_gnutls_cli_serv_echo_byte_exact(tmp_path, echo_server, text_source):
    data = _payload(40_000)
    with GnuTap(tmp_path) as tap:
        c, s = gnutls_echo(echo_server, data)
    # the probe source's probes on the record calls, the wire source's on the key log function
    site = "gnutls_record_send2" if text_source == "probe" else "_gnutls_call_keylog_func"
    assert any("attached" in l and "GnuTLS 3." in l and site in l for l in tap.stderr_lines), tap.stderr
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
    from tlstap.probes.gnutls import system_libgnutls
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
    wget = need(_wget(), "no wget linked against GnuTLS (apt-get install wget)")
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


# ---- -m keylog: the oracle is GnuTLS's own SSLKEYLOGFILE, written by the same processes ----

def test_analyze_keys_system_libgnutls():
    from tlstap.probes import gnutls, gnutls_keys
    k = gnutls_keys.analyze_keys(gnutls.system_libgnutls())
    assert k.log_secret_name == "_gnutls_call_keylog_func" and k.update_key is None and k.server_off is None
    assert len(k.evidence) == 4, k.evidence       # the call-site vote and three client_random witnesses


@pytest.mark.parametrize("tls", ["1.3", "1.2"])
def test_gnutls_keylog_equals_sslkeylogfile(tmp_path, cert, tls):
    """Both ends log through libgnutls; tlstap's lines for their connections are the library's,
    byte for byte. TLS 1.3 includes a KeyUpdate each way (^rekey^): GnuTLS logs nothing for it,
    and tlstap adds nothing."""
    prio = None if tls == "1.3" else "NORMAL:-VERS-TLS1.3"
    slog, clog = tmp_path / "serv.keys", tmp_path / "cli.keys"
    with KeyTap(tmp_path, command="gnutls") as tap, GnuTLSEchoServer(*cert, keylog=slog) as srv:
        gnutls_echo(srv, _payload(2000), keylog=clog, priority=prio, rekey=tls == "1.3")
        gnutls_echo(srv, _payload(500), keylog=clog, priority=prio)
        tap.stop()
    assert "_gnutls_call_keylog_func" in tap.stderr and "GnuTLS 3." in tap.stderr
    got = assert_same_lines(tap, read_keylog(clog), read_keylog(slog))
    assert len(client_randoms(got)) == 2
    labels = {ln.split()[0] for ln in got}
    assert labels == ({"CLIENT_RANDOM"} if tls == "1.2" else
                      {"CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
                       "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0", "EXPORTER_SECRET"})
    # byte-identical text, not only equal after normalising
    mine = {ln for ln in _raw_lines(tap.out) if ln.split()[1] in client_randoms(got)}
    assert mine == _raw_lines(clog) == _raw_lines(slog)
    assert os.stat(tap.out).st_mode & 0o777 == 0o600


def test_wget_keylog_scoped_to_pid(tmp_path, cert):
    wget = need(_wget(), "no wget linked against GnuTLS (apt-get install wget)")
    from tlstap.probes.gnutls import system_libgnutls
    wlog = tmp_path / "wget.keys"
    with NginxServer(cert[0], cert[1], {"x": b"x" * 100}) as n:
        # wget waits for a go line (sh execs it with the same pid), so the capture can be scoped first
        waiter = subprocess.Popen(["sh", "-c", f"read x; exec {wget} -q --no-check-certificate -O /dev/null "
                                               f"{n.url('x')}"], stdin=subprocess.PIPE,
                                  env={**os.environ, "SSLKEYLOGFILE": str(wlog)})
        with KeyTap(tmp_path, "--pid", str(waiter.pid), "--gnutls", system_libgnutls(), command="gnutls") as tap:
            # another GnuTLS client at the same time, out of scope
            other = subprocess.run([wget, "-q", "--no-check-certificate", "-O", "/dev/null", n.url("x")],
                                   timeout=30, env={**os.environ, "SSLKEYLOGFILE": str(tmp_path / "other.keys")})
            waiter.communicate(b"go\n", timeout=30)
            tap.stop()
    assert other.returncode == 0 and waiter.returncode == 0
    assert assert_same_lines(tap, read_keylog(wlog))
    assert set(tap.lines()) == set(read_keylog(wlog))     # nothing of the other wget


@needs(have_tshark(), "tshark is not installed")
def test_gnutls_pcapng_decrypted_by_tshark(tmp_path, cert, echo_server):
    """-m pcapng with GnuTLS's secrets: tshark reads only the file and sees both directions."""
    out = str(tmp_path / "g.pcapng")
    data = _payload(3000)
    tap = Tap(tmp_path)
    tap.argv = [tlstap_exe(), "gnutls", "-m", "pcapng", "-i", "lo", "-w", out, "tcp", "port", str(echo_server.port)]
    with tap:
        c, _ = gnutls_echo(echo_server, data)
        tap.stop()
    streams = tshark_tls_streams(out, tls_ports=[echo_server.port])
    assert len(streams) == 1, tap.stderr
    assert streams[0].sent_by(c.local) == data and streams[0].received_by(c.local) == data
