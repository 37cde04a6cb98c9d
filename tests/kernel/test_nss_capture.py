"""tlstap nss against real NSS peers (tstclnt, selfserv from libnss3-tools) on loopback."""
import dataclasses
import os
import shutil
import socket
import subprocess
import threading

import pytest

from tests.conftest import need_tool, needs
from tests.peers.gnutls import GnuTLSEchoServer
from tests.peers.nss import (SelfServ, run_nss_ctypes_client, selfserv_request, tstclnt_echo,
                             tstclnt_request)

from .tap import Tap, assert_streams_match, payload, run_tlstap
from .test_cli_errors import assert_one_line_error

pytestmark = needs(shutil.which("tstclnt") and shutil.which("selfserv"),
                   "libnss3-tools (tstclnt, selfserv) is not installed")


def pytest_generate_tests(metafunc):
    """Both plaintext sources, as for conftest.py's BOTH_SOURCES modules: the wire source covers
    NSS since `tlstap nss` has keys (and is its default)."""
    if "text_source" in metafunc.fixturenames and not metafunc.definition.get_closest_marker("probe_only"):
        metafunc.parametrize("text_source", ["probe", "wire"], indirect=True)


class NSSTap(Tap):
    """`tlstap nss --format json -o FILE ...` in the background."""

    def __init__(self, tmp_path, *args, raw: bool = True):
        super().__init__(tmp_path, *args, command="nss", raw=raw)


@pytest.fixture
def echo_server(cert):
    need_tool("gnutls-serv")       # the echo peer for tstclnt
    with GnuTLSEchoServer(cert[0], cert[1]) as s:
        yield s


@pytest.fixture
def selfserv(cert):
    with SelfServ(cert[0], cert[1]) as s:
        yield s


def _unmapped(t):
    """`t` with v4-mapped addresses (::ffff:127.0.0.1, how selfserv's dual-stack socket names an
    IPv4 peer) as the IPv4 packets on the wire carry them, which the wire source reports."""
    v4 = lambda a: (a[0].removeprefix("::ffff:"), a[1])  # noqa: E731
    return dataclasses.replace(t, local=v4(t.local), remote=v4(t.remote))


def as_reported(transcripts, text_source):
    return [_unmapped(t) for t in transcripts] if text_source == "wire" else list(transcripts)


def _payload(n: int) -> bytes:
    return (os.urandom(n // 2).hex() + "\n").encode()


def _request(n: int) -> bytes:
    return b"GET /nss HTTP/1.0\r\nX-Pad: " + os.urandom(n // 2).hex().encode() + b"\r\n\r\n"


def test_analyze_system_libnspr():
    from tlstap.probes import nss
    t = nss.analyze(nss.system_libnspr())
    assert t.version and t.version.startswith("NSPR 4.") and "NSS 3." in t.version
    roles = {s.symbol: s.role for s in t.sites}
    assert roles == {"PR_Read": "read", "PR_Recv": "read", "PR_Write": "write", "PR_Send": "write",
                     "PR_Writev": "write", "PR_Close": "free"}
    assert all(s.out_arg is None for s in t.sites)
    assert {s.symbol: s.entry for s in t.sites if s.role != "free"} == {
        "PR_Read": "nspr_rw_enter", "PR_Recv": "nspr_rw_enter", "PR_Write": "nspr_rw_enter",
        "PR_Send": "nspr_rw_enter", "PR_Writev": "nspr_writev_enter"}


@pytest.mark.parametrize("version", ["tls1.2", "tls1.3"])
def test_tstclnt_echo_byte_exact(tmp_path, echo_server, version, text_source):
    """tstclnt copies stdin to the TLS socket (PR_Send / PR_Recv) and the socket to stdout
    (PR_Read / PR_Write on plain NSPR fds): only the SSL fd's calls may show up, attributed to
    the socket."""
    data = _payload(40_000)
    with NSSTap(tmp_path) as tap:
        c, _ = tstclnt_echo(echo_server, data, version=version)
    where = ("NSPR 4.", "PR_Write") if text_source == "probe" else ("NSS 3.", "PK11_DigestOp", "FREEBL_GetVector")
    assert any("attached" in l and all(w in l for w in where) for l in tap.stderr_lines), tap.stderr
    mine = [r for r in tap.data() if r["pid"] == c.pid]
    assert_streams_match(mine, [c])
    # nothing from the stdin pipe or stdout (the same bytes again, on plain NSPR fds)
    assert sum(r["len"] for r in mine if r["dir"] == "write") == len(data)
    assert sum(r["len"] for r in mine if r["dir"] == "read") == len(data)
    # the wire source knows the socket's owner, not its descriptor
    assert all(r["local"] and (r["fd"] >= 0 or text_source == "wire") for r in mine), \
        [(r["dir"], r["len"]) for r in mine if not r["local"]]
    summary = tap.summary()
    assert summary["lost_records"] == 0 and summary["truncated_calls"] == 0


def test_selfserv_two_connections_byte_exact(tmp_path, selfserv, text_source):
    """The server side (worker threads of selfserv, which answers with PR_Writev: header and
    request in separate vectors), scoped with --pid; PR_Close drops the
    fd's cached connection, so a second connection (often the same PRFileDesc address) is
    attributed to its own socket."""
    with NSSTap(tmp_path, "--pid", str(selfserv.pid)) as tap:
        s1 = selfserv_request(selfserv, _request(8000))
        s2 = selfserv_request(selfserv, _request(3000))
    recs = tap.data()
    assert {r["pid"] for r in recs} == {selfserv.pid}
    assert s1.remote != s2.remote
    assert_streams_match(recs, as_reported([s1, s2], text_source))
    assert all(r["local"] for r in recs)


def test_selfserv_concurrent_connections(tmp_path, selfserv, text_source):
    """Eight clients at once: selfserv's worker threads interleave, each connection's bytes
    stay with its own socket."""
    results, errors = [], []

    def one(i):
        try:
            results.append(selfserv_request(selfserv, _request(1000 + 700 * i)))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    with NSSTap(tmp_path, "--pid", str(selfserv.pid)) as tap:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors, errors
    assert len({t.remote for t in results}) == 8
    assert_streams_match(tap.data(), as_reported(results, text_source))


def test_selfserv_http_view(tmp_path, selfserv):
    """The default (HTTP) output on NSS traffic: selfserv's HTTP/1.0 exchange as one record
    whose request and response equal what went over the wire."""
    marker = os.urandom(4).hex()
    req = f"GET /nss?{marker} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode()
    with NSSTap(tmp_path, "--pid", str(selfserv.pid), raw=False) as tap:
        s = selfserv_request(selfserv, req)
    ex = tap.http()
    assert len(ex) == 1, ex
    rq, rs = ex[0]["request"], ex[0]["response"]
    assert (rq["method"], rq["target"], rq["headers"]) == ("GET", f"/nss?{marker}", [["Host", "localhost"]])
    head, body = s.sent.split(b"\r\n\r\n", 1)
    assert rs["status"] == 200 and head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert rs["body_len"] == len(body) and payload(rs["body"]) == body


def test_tstclnt_to_selfserv_both_ends(tmp_path, selfserv, text_source):
    """NSS at both ends of one connection, captured together: each end's bytes, both
    directions, under its own 4-tuple (the mirror of the other's)."""
    with NSSTap(tmp_path) as tap:
        c, s = tstclnt_request(selfserv, _request(6000))
    recs = tap.data()
    assert_streams_match([r for r in recs if r["pid"] == c.pid], [c])
    assert_streams_match([r for r in recs if r["pid"] == s.pid], as_reported([s], text_source))
    # selfserv's dual-stack socket sees the IPv4 client as ::ffff:127.0.0.1
    v4 = lambda a: (a[0].removeprefix("::ffff:"), a[1])  # noqa: E731
    assert v4(c.local) == v4(s.remote) and v4(c.remote) == v4(s.local)
    assert all(r["local"] for r in recs if r["pid"] in (c.pid, s.pid))


@pytest.mark.parametrize("layer", [False, True], ids=["ssl-on-top", "layer-above-ssl"])
def test_ctypes_client_writev_small_reads_plain_fds(tmp_path, echo_server, layer):
    """An NSS client through ctypes: PR_Write, PR_Send, PR_Writev (vectors of 1 B to 70 KB:
    more than one ring record each), the echo read back 997 bytes at a time with PR_Read /
    PR_Recv (mostly from NSS's buffer, no syscall), and PR_Write to a plain NSPR socket and
    a file in the same process, which must not show up. layer-above-ssl: the application
    holds a pass-through NSPR layer pushed above the SSL layer."""
    plain_srv = socket.create_server(("127.0.0.1", 0))
    plain_got = bytearray()

    def accept():
        c, _ = plain_srv.accept()
        with c:
            while chunk := c.recv(1 << 16):
                plain_got.extend(chunk)
    th = threading.Thread(target=accept, daemon=True)
    th.start()
    with NSSTap(tmp_path) as tap:
        c, plain = run_nss_ctypes_client(echo_server.port, layer=layer, plain_port=plain_srv.getsockname()[1],
                                         file=str(tmp_path / "nspr-file"))
    th.join(10)
    plain_srv.close()
    assert bytes(plain_got) in plain and (tmp_path / "nspr-file").read_bytes() in plain
    mine = [r for r in tap.data() if r["pid"] == c.pid]
    assert_streams_match(mine, [c])
    assert sum(r["len"] for r in mine) == len(c.sent) + len(c.received)   # nothing else
    assert all(r["local"] for r in mine)
    assert tap.summary()["lost_records"] == 0


def test_pid_scope_client_only(tmp_path, echo_server):
    """--pid on a tstclnt that has not loaded NSPR yet, with --nspr naming the library."""
    from tlstap.probes.nss import system_libnspr
    data = _payload(2000)
    # sh waits for a go line, then execs tstclnt (same pid); it is stopped once the echo is back
    cmd = f"read x; exec tstclnt -D -o -h 127.0.0.1 -p {echo_server.port}"
    waiter = subprocess.Popen(["sh", "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL)
    try:
        with NSSTap(tmp_path, "--pid", str(waiter.pid), "--nspr", system_libnspr()) as tap:
            waiter.stdin.write(b"go\n" + data)
            waiter.stdin.flush()
            got = b""
            while len(got) < len(data):
                chunk = os.read(waiter.stdout.fileno(), 1 << 16)
                if not chunk:
                    break
                got += chunk
            assert got == data
    finally:
        waiter.kill()
        waiter.wait()
        waiter.stdin.close()
        waiter.stdout.close()
    recs = tap.data()
    assert recs and {r["pid"] for r in recs} == {waiter.pid}
    assert b"".join(payload(r) for r in recs if r["dir"] == "write") == data
    assert b"".join(payload(r) for r in recs if r["dir"] == "read") == data


@pytest.mark.probe_only("runs tlstap itself, with each source")
def test_bad_input_is_one_line():
    assert_one_line_error(run_tlstap("nss", "--nspr", "/bin/ls"), "/bin/ls", "not NSPR")
    assert_one_line_error(run_tlstap("nss", "--nspr", "/nonexistent/libnspr4.so"), "/nonexistent/libnspr4.so")
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert_one_line_error(run_tlstap("nss", "--source", "probe", "--pid", str(p.pid)), str(p.pid),
                              "maps no NSPR")
        # the default source, wire, needs the keys: libnss3
        assert_one_line_error(run_tlstap("nss", "--pid", str(p.pid)), str(p.pid), "maps no libnss3")
    finally:
        p.kill()
        p.wait()
