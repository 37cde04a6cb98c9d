"""tlstap tls against real TLS peers on loopback through real BPF programs.

Every expectation comes from the peers' own transcripts (what they really
sent and received, and their getsockname/getpeername), never from constants.
"""
import os
import re
import signal
import stat
import subprocess
import time

import pytest

from tests.conftest import need
from tests.peers import NginxServer
from tests.peers._common import TCP_LISTEN, free_port, tcp_sockets, wait_for

from .conftest import client, finish, static_node
from .tap import Tap, assert_streams_match, payload, tlstap_exe


def test_python_ssl_both_ends_byte_exact(tmp_path, pyserver, text_source):
    srv = pyserver()
    payloads = [os.urandom(3000), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", bytes(range(256)) * 40]
    with Tap(tmp_path) as tap:
        cli = client(srv, payloads, conns=3)
        ct = cli.go().wait()
        st = finish(srv)
    recs = tap.data()
    assert_streams_match([r for r in recs if r["pid"] == cli.pid], ct)
    assert_streams_match([r for r in recs if r["pid"] == srv.pid], st)
    # fd is the real socket and uid is ours (a packet comes from no thread's call: tid 0 on the wire)
    for r in recs:
        if r["pid"] in (cli.pid, srv.pid):
            assert r["fd"] >= 3 and r["uid"] == os.getuid() and r["comm"].startswith("python")
            assert (r["tid"] > 0) == (text_source == "probe")
    summary = tap.summary()
    assert summary["lost_records"] == 0 and summary["truncated_calls"] == 0


def test_pid_filter_excludes_other_processes(tmp_path, pyserver):
    srv = pyserver()
    with Tap(tmp_path, "--pid", str(srv.pid)) as tap:
        cli = client(srv, [b"only the server side please" * 10], conns=2)
        ct = cli.go().wait()
        st = finish(srv)
    recs = tap.data()
    assert recs and {r["pid"] for r in recs} == {srv.pid}
    assert_streams_match(recs, st)
    assert sum(len(t.sent) for t in ct) > 0  # the client did talk; it was filtered out


def test_uid_filter(tmp_path, cert):
    port = free_port()
    srv = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", cert[0],
                            "-key", cert[1], "-www", "-quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        with Tap(tmp_path, "--uid", "65534") as tap:
            for who in (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"], []):
                subprocess.run([*who, "curl", "-sk", "--http1.1", f"https://127.0.0.1:{port}/uid-{len(who)}"],
                               capture_output=True, timeout=30)
        recs = tap.data()
    finally:
        srv.kill()
        srv.wait()
    assert recs and all(r["uid"] == 65534 for r in recs)
    writes = b"".join(payload(r) for r in recs if r["dir"] == "write")
    assert b"GET /uid-4 " in writes and b"/uid-0" not in writes


def test_large_single_write_8mib_byte_exact(tmp_path, pyserver, text_source):
    size = 8 << 20
    srv = pyserver(response=os.urandom(size))   # one sendall -> one SSL_write_ex of 8 MiB
    with Tap(tmp_path, "--max-payload", "16M", "--mapsize", "64M") as tap:
        cli = client(srv, [os.urandom(64)], expect_response_len=size)
        ct = cli.go().wait()
        st = finish(srv)
    recs = tap.data()
    assert_streams_match([r for r in recs if r["pid"] == srv.pid], st)
    assert_streams_match([r for r in recs if r["pid"] == cli.pid], ct)
    big = [r for r in recs if r["pid"] == srv.pid and r["dir"] == "write"]
    if text_source == "probe":      # one call, reassembled from chunks (the wire has TLS records)
        assert len(big) == 1 and big[0]["total"] == size
    assert tap.summary()["lost_records"] == 0


def test_truncation_is_explicit(tmp_path, pyserver):
    srv = pyserver(response=os.urandom(5000))
    with Tap(tmp_path, "--max-payload", "1000", "--pid", str(srv.pid)) as tap:
        cli = client(srv, [b"x" * 10], expect_response_len=5000)
        ct = cli.go().wait()
        finish(srv)
    w = [r for r in tap.data() if r["dir"] == "write"]
    assert len(w) == 1
    assert w[0]["total"] == 5000 and w[0]["len"] == 1000 and w[0]["truncated"] == 4000
    assert payload(w[0]) == ct[0].received[:1000]
    assert tap.summary()["truncated_calls"] == 1


def test_32_connections_8_threads_no_misattribution(tmp_path, pyserver):
    srv = pyserver()
    payloads = [bytes([i]) * 100 + os.urandom(2000 + i * 37) for i in range(32)]
    with Tap(tmp_path) as tap:
        cli = client(srv, payloads, conns=32, threads=8, requests=3)
        ct = cli.go().wait()
        st = finish(srv)
    recs = tap.data()
    assert len(ct) == 32 and len(st) == 32
    assert_streams_match([r for r in recs if r["pid"] == cli.pid], ct)
    assert_streams_match([r for r in recs if r["pid"] == srv.pid], st)


def test_ipv6(tmp_path, pyserver):
    srv = pyserver(host="::1")
    with Tap(tmp_path) as tap:
        cli = client(srv, [b"over ipv6 " * 30])
        ct = cli.go().wait()
        st = finish(srv)
    recs = tap.data()
    assert_streams_match([r for r in recs if r["pid"] == cli.pid], ct)
    assert_streams_match([r for r in recs if r["pid"] == srv.pid], st)
    assert {r["family"] for r in recs if r["pid"] in (cli.pid, srv.pid)} == {"ipv6"}


def test_openssl_s_client_s_server(tmp_path, cert):
    port = free_port()
    from_client, from_server = os.urandom(700).hex().encode() + b"\n", b"server says hi\n" * 20
    with Tap(tmp_path) as tap:
        srv = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", cert[0],
                                "-key", cert[1], "-quiet", "-naccept", "1"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        # listening, seen from /proc: a test connection would be its one accept
        wait_for(lambda: tcp_sockets(srv.pid, TCP_LISTEN), 10, "s_server to listen")
        cli = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        cli.stdin.write(from_client)
        cli.stdin.flush()
        got_srv = _read_exact(srv.stdout, len(from_client))
        srv.stdin.write(from_server)
        srv.stdin.flush()
        got_cli = _read_exact(cli.stdout, len(from_server))
        # s_client printed what it read: its calls have returned. s_server's SSL_write may not
        # have (its bytes reach the client first): it exits by itself once the client is gone.
        cli.kill(), cli.wait()
        try:
            srv.wait(10)
        finally:
            srv.kill(), srv.wait()
    assert got_srv == from_client and got_cli == from_server
    recs = tap.data()
    def joined(pid, d):
        return b"".join(payload(r) for r in recs if r["pid"] == pid and r["dir"] == d)
    assert joined(cli.pid, "write") == from_client and joined(srv.pid, "read") == from_client
    assert joined(srv.pid, "write") == from_server and joined(cli.pid, "read") == from_server
    # both ends agree on the connection: one's local is the other's remote
    c = next(r for r in recs if r["pid"] == cli.pid)
    s = next(r for r in recs if r["pid"] == srv.pid)
    assert c["local"] == s["remote"] and c["remote"] == s["local"] and s["local"]["port"] == port


def test_curl_against_nginx(tmp_path, nginx):
    body = os.urandom(300_000)
    n = nginx({"blob": body})
    worker = n.worker_pids()[0]
    with Tap(tmp_path, "--pid", str(worker)) as tap:
        r = subprocess.run(["curl", "-sk", "--http1.1", n.url("blob"),
                            "-w", "%{local_ip} %{local_port}", "-o", str(tmp_path / "out")],
                           capture_output=True, text=True, timeout=30)
        n.wait_logged(1)       # the worker's last SSL_write has returned, not only reached curl
    assert (tmp_path / "out").read_bytes() == body
    lip, lport = r.stdout.split()
    recs = tap.data()
    assert {x["pid"] for x in recs} == {worker}
    sent = b"".join(payload(x) for x in recs if x["dir"] == "write")
    assert sent.endswith(body) and sent.startswith(b"HTTP/1.1 200 OK")
    got = b"".join(payload(x) for x in recs if x["dir"] == "read")
    assert got.startswith(b"GET /blob HTTP/1.1")
    assert {(x["remote"]["ip"], x["remote"]["port"]) for x in recs} == {(lip, int(lport))}
    assert {x["local"]["port"] for x in recs} == {n.port}


NODE_CLIENT = r"""
const https = require('https');
const req = https.request(process.argv[2] + '?' + process.argv[3], {method: 'GET', rejectUnauthorized: false,
  agent: new https.Agent({keepAlive: false})}, (res) => {
  const chunks = [];
  res.on('data', (c) => chunks.push(c));
  res.on('end', () => { process.stdout.write(JSON.stringify({local: res.socket.localPort,
    len: Buffer.concat(chunks).length})); });
});
req.end();
"""


def test_node_static_openssl(tmp_path, nginx):
    node = need(static_node(), "no node binary with statically linked OpenSSL (set TLSTAP_TEST_NODE; quickstart.sh test does)")
    body = os.urandom(50_000)
    n = nginx({"n": body})
    script = tmp_path / "client.js"
    script.write_text(NODE_CLIENT)
    marker = "node-post-" + os.urandom(8).hex()
    with Tap(tmp_path, "--libssl", node) as tap:
        assert any(node in l and "attached" in l for l in tap.stderr_lines)
        p = subprocess.run([node, str(script), n.url("n"), marker], capture_output=True, text=True, timeout=60)
    recs = [r for r in tap.data() if r["comm"].startswith("node")]
    assert recs, tap.stderr
    sent = b"".join(payload(r) for r in recs if r["dir"] == "write")
    got = b"".join(payload(r) for r in recs if r["dir"] == "read")
    assert sent.startswith(f"GET /n?{marker} HTTP/1.1".encode())
    assert got.endswith(body)
    import json
    # node runs OpenSSL over memory BIOs: no socket syscall inside SSL calls. The
    # connection is proven by the ClientHello node wrote to its socket, whose random
    # the SSL object holds, before the first write: every call is attributed, rightly.
    port = json.loads(p.stdout)["local"]
    assert [r for r in recs if r["local"] is None] == []
    assert {r["local"]["port"] for r in recs} == {port}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_json_complete_after_signal_and_private(tmp_path, pyserver, sig):
    srv = pyserver()
    # scoped to the server: "lost 0" is about this traffic, not about every TLS process of a
    # shared machine (unscoped, 25 MB of others' traffic once overflowed the ring here)
    tap = Tap(tmp_path, "--pid", str(srv.pid)).__enter__()
    cli = client(srv, [os.urandom(5000)], conns=4, requests=5)
    cli.go().wait()
    finish(srv)
    assert tap.stop(sig) == 0
    assert stat.S_IMODE(os.stat(tap.out).st_mode) == 0o600
    recs = tap.records()        # every line parses
    assert recs[-1]["type"] == "summary" and tap.data()
    assert re.search(r"lost 0 (records|packets)", tap.stderr)


def test_text_format(tmp_path, pyserver):
    srv = pyserver()
    with Tap(tmp_path, "--pid", str(srv.pid), fmt="text") as tap:
        client(srv, [b"hello text mode\n"]).go().wait()
        st = finish(srv)
    text = open(tap.out, "rb").read()
    t = st[0]
    assert f"pid={srv.pid}".encode() in text
    assert f"READ {t.local[0]}:{t.local[1]} <- {t.remote[0]}:{t.remote[1]}".encode() in text
    assert b"hello text mode" in text
    assert b"\n00000000  " in text   # the 8-byte binary length header is hexdumped


def _wait_port(port, timeout=10):
    import socket
    import time
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def _read_exact(f, n):
    buf = b""
    while len(buf) < n:
        chunk = f.read1(n - len(buf)) if hasattr(f, "read1") else f.read(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _decoder_pid(tap: Tap) -> int:
    with open(f"/proc/{tap.proc.pid}/task/{tap.proc.pid}/children") as f:
        kids = [int(x) for x in f.read().split()]
    assert len(kids) == 1, f"one decoder process, not {kids}"
    return kids[0]


def test_a_stalled_decoder_loses_nothing_within_the_backlog_and_counts_what_it_drops(tmp_path, pyserver):
    """The decoder process (spool.py) stopped outright: the capture goes on spooling; calls
    that fit in --spool-max all come out, in order, once it runs again; the rest are dropped,
    counted in the summary and announced by `lost` records ("decoder backlog full")."""
    srv = pyserver()
    with Tap(tmp_path, "--pid", str(srv.pid), "--mapsize", "1M", "--max-payload", "64K",
             "--spool-max", "4M") as tap:
        dec = _decoder_pid(tap)
        os.kill(dec, signal.SIGSTOP)
        try:
            # ~0.8 MB both ways: fits. The capture hands the spool pieces of at most the ring
            # (1M), so a piece holding any of these records ends below 2 MB and is never dropped:
            # the next client can start at once.
            small = client(srv, [os.urandom(1000)], conns=2, requests=200)
            small_ends = {t.local for t in small.go().wait()}
            big = client(srv, [os.urandom(60000)], requests=150)              # 18 MB: cannot
            big.go().wait()
            # the decoder runs again only once the capture has dropped and said so (its status
            # line, at most a second after the drop)
            assert tap.wait_line(r"^tlstap: dropped \d+ records .*decoder backlog full", 30), tap.stderr
        finally:
            os.kill(dec, signal.SIGCONT)
        st = finish(srv)
    summary = tap.summary()
    assert summary["backlog_dropped_records"] > 0
    assert summary["lost_records"] >= summary["backlog_dropped_records"]
    lost = [r for r in tap.records() if r["type"] == "lost" and r["why"] == "decoder backlog full"]
    assert sum(r["records"] for r in lost) == summary["backlog_dropped_records"]
    # the first client's connections, spooled before the backlog filled, are all there, byte-exact
    first = [t for t in st if t.remote in small_ends]
    assert len(first) == 2
    assert_streams_match([r for r in tap.data() if r["remote"] and
                          (r["remote"]["ip"], r["remote"]["port"]) in small_ends], first)
    assert "decoder backlog full" in tap.stderr


def test_decoded_output_is_live_while_traffic_is_quiet(tmp_path, cert):
    """One exchange, then silence: its decoded record is in the file within seconds, while
    tlstap still runs (the capture's heartbeat lets the decoder release the reordering window
    and flush; nothing waits for more traffic or for Ctrl-C)."""
    with NginxServer(*cert, {"live-now": b"hello, live\n"}) as srv:
        with Tap(tmp_path, "--pid", str(srv.worker_pids()[0]), raw=False) as tap:
            subprocess.run(["curl", "-sk", "--http1.1", srv.url("live-now")], capture_output=True, timeout=30)
            def written():
                with open(tap.out) as f:
                    return any('"/live-now"' in line for line in f)
            try:
                wait_for(written, 5, "the exchange in the output")
            except TimeoutError:
                raise AssertionError("the exchange was not written while tlstap ran") from None
            assert tap.proc.poll() is None
        assert [r["request"]["target"] for r in tap.http()] == ["/live-now"]


def test_closed_output_pipe_ends_the_capture_cleanly(cert):
    """`tlstap tls | head -c 200`: the decoder process meets a closed pipe; the capture notices
    within a second and ends with its summary, no traceback."""
    port = free_port()
    srv = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", cert[0],
                            "-key", cert[1], "-www", "-quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        tap = subprocess.Popen(f"{tlstap_exe()} tls --raw --pid {srv.pid} | head -c 200 > /dev/null",
                               shell=True, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 20
        while tap.poll() is None and time.monotonic() < deadline:
            subprocess.run(["curl", "-sk", f"https://127.0.0.1:{port}/x"], capture_output=True, timeout=30)
        assert tap.wait(10) == 0
        err = tap.stderr.read()
        assert "Traceback" not in err and "output closed:" in err, err
    finally:
        srv.kill()
        srv.wait()
