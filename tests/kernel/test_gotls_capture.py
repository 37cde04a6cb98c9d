"""tlstap gotls against real Go crypto/tls peers (tests/peers/go/tlspeer.go) on loopback.

Every Go build of the session (each toolchain found x default/stripped/PIE) is both client and
server: what tlstap captured must equal, byte for byte and per 4-tuple, what each program
passed to (*tls.Conn).Write and got from Read. Keylog: tlstap's lines must equal the union of
the key log files Go itself wrote through tls.Config.KeyLogWriter.
"""
import os
import stat

import pytest

from tests.conftest import go_build, need_tool, needs
from tests.peers import have_tshark, read_keylog, tshark_tls_streams
from tests.peers._common import wait_tcp_closed
from tests.peers.gotls import GoClient, GoServer, run_go_client

from .tap import KeyTap, Tap, assert_streams_match, run_tlstap, tlstap_exe


class GoTap(Tap):
    """`tlstap gotls --format json -o FILE ...` in the background."""

    def __init__(self, tmp_path, *args, raw: bool = True, fmt: str = "json"):
        super().__init__(tmp_path, *args, command="gotls", raw=raw, fmt=fmt)


class GoKeyTap(KeyTap):
    """`tlstap gotls -m keylog -k FILE ...` in the background."""

    def __init__(self, tmp_path, *args):
        super().__init__(tmp_path, *args)
        self.argv = [self.argv[0], "gotls", "-m", "keylog", "-k", self.out, *args]


def _check_tuples(recs, transcripts):
    """Every record of the peer's pid is attributed, and to one of its real connections."""
    for pid in {t.pid for t in transcripts}:
        mine = [r for r in recs if r["pid"] == pid]
        assert mine, f"nothing captured for pid {pid}"
        assert all(r["local"] and r["fd"] >= 0 for r in mine), [(r["dir"], r["len"]) for r in mine if not r["local"]]
        got = {((r["local"]["ip"], r["local"]["port"]), (r["remote"]["ip"], r["remote"]["port"])) for r in mine}
        assert got == {(t.local, t.remote) for t in transcripts if t.pid == pid}


def test_echo_every_build_byte_exact(tmp_path, go_builds, cert):
    """4 concurrent connections per build, pieces of 7000 bytes: both ends, both directions,
    every record on the right 4-tuple. One capture for all builds (one --elfpath each)."""
    args = []
    for b in go_builds:
        args += ["--elfpath", b.path]
    results = []
    with GoTap(tmp_path, *args) as tap:
        for b in go_builds:
            with GoServer(b.path, *cert) as srv:
                ct = run_go_client(b.path, srv.port, conns=4, size=50_000, piece=7000)
                st = srv.transcripts(expect=4)
            results.append((b, ct, st))
    assert sum("attached" in l for l in tap.stderr_lines) == len(go_builds), tap.stderr
    recs = tap.data()
    for b, ct, st in results:
        assert len(ct) == 4 and len(st) == 4, b.id
        assert all(t.error is None for t in ct + st), b.id
        for t in ct:
            assert any(t.mirrors(s) for s in st), b.id
        assert_streams_match(recs, ct + st)
        _check_tuples(recs, ct + st)
    s = tap.summary()
    assert s["lost_records"] == 0 and s["truncated_calls"] == 0


def test_go_client_python_server(tmp_path, go_builds, pyserver):
    """Against another TLS stack: the Python ssl server's own transcript is the oracle too."""
    from .conftest import finish
    srv = pyserver()
    b = go_build(go_builds, None, "stripped")
    with GoTap(tmp_path, "--elfpath", b.path) as tap:
        ct = run_go_client(b.path, srv.port, conns=3, size=40_000, piece=5000, lenprefix=True)
    st = finish(srv)
    assert len(ct) == 3 and len(st) == 3
    for t in ct:
        assert any(t.mirrors(s) for s in st)
    recs = tap.data()
    assert_streams_match(recs, ct)
    _check_tuples(recs, ct)


@pytest.mark.parametrize("release", ["go1.19", None], ids=["debian", "newest"])
def test_tls12_byte_exact(tmp_path, go_builds, cert, release):
    b = go_build(go_builds, release) if release else go_build(sorted(go_builds, key=lambda x: x.version)[::-1])
    with GoServer(b.path, *cert) as srv:
        with GoTap(tmp_path, "--elfpath", b.path) as tap:
            ct = run_go_client(b.path, srv.port, conns=2, size=30_000, piece=1000, tls12=True)
            st = srv.transcripts(expect=2)
    recs = tap.data()
    assert_streams_match(recs, ct + st)
    _check_tuples(recs, ct + st)


@pytest.mark.parametrize("release", ["go1.19", None], ids=["debian", "newest"])
def test_large_payload_one_write(tmp_path, go_builds, cert, release, text_source):
    """1.5 MiB in one Write: one call, split into CHUNK_MAX records, reassembled exactly (the
    wire source: the same bytes, in TLS records)."""
    b = go_build(go_builds, release) if release else go_build(sorted(go_builds, key=lambda x: x.version)[::-1])
    with GoServer(b.path, *cert) as srv:
        with GoTap(tmp_path, "--elfpath", b.path, "--max-payload", "4M", "--mapsize", "64M") as tap:
            ct = run_go_client(b.path, srv.port, size=1_500_000)
            st = srv.transcripts(expect=1)
    recs = tap.data()
    assert_streams_match(recs, ct + st)
    writes = [r for r in recs if r["pid"] == ct[0].pid and r["dir"] == "write"]
    if text_source == "probe":
        assert len(writes) == 1 and writes[0]["total"] == 1_500_000
    assert tap.summary()["lost_records"] == 0


def test_pid_scope_uses_the_process_executable(tmp_path, go_builds, cert):
    """--pid alone: the probes go into /proc/PID/exe for that process only."""
    b = go_build(go_builds, None, "stripped")
    with GoServer(b.path, *cert) as srv:
        client = GoClient(b.path, srv.port, conns=2, size=20_000, wait=True)
        try:
            with GoTap(tmp_path, "--pid", str(client.pid)) as tap:
                client.go()
                ct = client.result()
        finally:
            if client.proc.poll() is None:
                client.proc.kill()
    recs = tap.data()
    assert recs and {r["pid"] for r in recs} == {client.pid}
    assert_streams_match(recs, ct)
    _check_tuples(recs, ct)
    assert "/proc/" in tap.stderr and b.version[2:] in tap.stderr


@pytest.mark.probe_only("the handshake was before the capture: the wire source has no keys for it")
@pytest.mark.parametrize("release", ["go1.19", None], ids=["debian", "newest"])
def test_read_blocked_before_the_capture(tmp_path, go_builds, cert, release):
    """Both ends sit in Read when tlstap starts: those Reads' entries are never seen, their RETs
    take c and b from the spill slots (COOKIE_GO_SPILLED). Nothing is lost."""
    b = go_build(go_builds, release) if release else go_build(sorted(go_builds, key=lambda x: x.version)[::-1])
    with GoServer(b.path, *cert) as srv:
        client = GoClient(b.path, srv.port, conns=3, size=20_000, pause=True)
        try:
            with GoTap(tmp_path, "--elfpath", b.path) as tap:
                client.go()
                ct = client.result()
                st = srv.transcripts(expect=3)
        finally:
            if client.proc.poll() is None:
                client.proc.kill()
    assert "arguments in spill slots" in tap.stderr
    recs = tap.data()
    assert_streams_match(recs, ct + st)
    _check_tuples(recs, ct + st)


def test_output_file_is_private(tmp_path, go_builds, cert):
    b = go_build(go_builds)
    with GoServer(b.path, *cert) as srv:
        with GoTap(tmp_path, "--elfpath", b.path, fmt="text") as tap:
            run_go_client(b.path, srv.port, size=100)
    assert stat.S_IMODE(os.stat(tap.out).st_mode) == 0o600


# ---- keylog ------------------------------------------------------------------------------

def test_keylog_equals_go_keylogwriter(tmp_path, go_builds, cert):
    """TLS 1.3 and 1.2, every build: tlstap's lines == the union of what the Go client and server
    wrote through KeyLogWriter (set equality and no extra or duplicate line)."""
    oracle_files = []
    args = []
    for b in go_builds:
        args += ["--elfpath", b.path]
    with GoKeyTap(tmp_path, *args) as tap:
        for b in go_builds:
            skl, ckl = str(tmp_path / f"{b.id}-server.keys"), str(tmp_path / f"{b.id}-client.keys")
            oracle_files += [skl, ckl]
            with GoServer(b.path, *cert, keylog=skl) as srv:
                run_go_client(b.path, srv.port, conns=2, keylog=ckl)
                run_go_client(b.path, srv.port, keylog=ckl, tls12=True)
                srv.transcripts(expect=3)
    oracle = set()
    for f in oracle_files:
        oracle |= set(read_keylog(f))
    got = tap.lines()
    assert len(got) == len(set(got))
    assert set(got) == oracle
    labels = {l.split()[0] for l in got}
    assert labels == {"CLIENT_RANDOM", "CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
                      "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"}
    assert len(got) == len(go_builds) * (2 * 4 + 1)
    assert stat.S_IMODE(os.stat(tap.out).st_mode) == 0o600


def test_keylog_pid_scope(tmp_path, go_builds, cert):
    """--pid of the server only (its executable from /proc): exactly the server's own key log,
    and the client's probe hits (same secrets, other process) are not reported."""
    b = go_build(go_builds, None, "pie")
    skl = str(tmp_path / "server.keys")
    with GoServer(b.path, *cert, keylog=skl) as srv:
        with GoKeyTap(tmp_path, "--pid", str(srv.pid)) as tap:
            run_go_client(b.path, srv.port, conns=2)
            run_go_client(b.path, srv.port, tls12=True)
            srv.transcripts(expect=3)
    got = tap.lines()
    assert got and sorted(got) == sorted(set(read_keylog(skl)))
    assert f"/proc/{srv.pid}/exe" in tap.stderr


def test_keylog_without_keylogwriter(tmp_path, go_builds, cert):
    """The app sets no KeyLogWriter: the secrets are still seen (writeKeyLog is always called).
    No oracle file exists then, so: one client random per connection, each with the four
    TLS 1.3 labels, and nothing else."""
    b = go_build(go_builds)
    with GoKeyTap(tmp_path, "--elfpath", b.path) as tap:
        with GoServer(b.path, *cert) as srv:
            run_go_client(b.path, srv.port, conns=3)
            srv.transcripts(expect=3)
    got = tap.lines()
    by_cr = {}
    for l in got:
        label, cr, secret = l.split()
        by_cr.setdefault(cr, set()).add(label)
        assert len(cr) == 64 and len(secret) in (64, 96)
    assert len(by_cr) == 3 and all(len(v) == 4 for v in by_cr.values())


# ---- refusals ----------------------------------------------------------------------------

def _one_clean_line(r):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_refuses_non_go_binary(tmp_path):
    r = run_tlstap("gotls", "--elfpath", "/bin/ls")
    assert "not a Go binary" in _one_clean_line(r)


def test_refuses_missing_file_and_no_target(tmp_path):
    assert "no such file" in _one_clean_line(run_tlstap("gotls", "--elfpath", str(tmp_path / "nope")))
    assert "--elfpath" in _one_clean_line(run_tlstap("gotls"))


def test_refuses_old_go(tmp_path, go_builds):
    b = go_build(go_builds)
    data = open(b.path, "rb").read()
    old = b.version.encode()
    at = data.index(old, data.index(b"\xff Go buildinf:"))
    fake = tmp_path / "old-go"
    fake.write_bytes(data[:at] + b"go1.16" + old[6:] + data[at + len(old):])
    line = _one_clean_line(run_tlstap("gotls", "--elfpath", str(fake)))
    assert "go1.16" in line and "1.17" in line


def test_go_https_server_http_view(tmp_path, go_builds, cert):
    """tlspeer https (net/http over crypto/tls) with curl: the HTTP view decodes Go's side."""
    import subprocess
    need_tool("curl")
    b = go_build(go_builds, None, "pie")
    srv = subprocess.Popen([b.path, "https", "-cert", cert[0], "-key", cert[1], "-size", "70000"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(srv.stdout.readline().split()[1])
        with GoTap(tmp_path, "--pid", str(srv.pid), raw=False) as tap:
            r = subprocess.run(["curl", "-sk", "--http1.1", "-o", str(tmp_path / "body"), "-w", "%{local_port}",
                                f"https://127.0.0.1:{port}/hello?x=1"], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0
            # the server closes its end after reading curl's close, so after its writes returned
            # (curl having the response does not say as much)
            wait_tcp_closed(int(r.stdout), port)
    finally:
        srv.kill()
        srv.wait()
    body = bytes(ord("a") + i % 26 for i in range(70000))      # what tlspeer https serves
    assert (tmp_path / "body").read_bytes() == body
    ex = [r for r in tap.records() if r["type"] == "http"]
    assert len(ex) == 1, tap.records()
    req, resp = ex[0]["request"], ex[0]["response"]
    assert req["method"] == "GET" and req["target"] == "/hello?x=1"
    assert resp["status"] == 200 and resp["complete"] and resp["body_len"] == 70000
    assert resp["body"]["data"].encode() == body[:64 << 10]       # --max-body's default
    assert ex[0]["pid"] == srv.pid


@pytest.mark.parametrize("release", ["go1.19", None], ids=["debian", "newest"])
def test_many_goroutines_across_threads(tmp_path, go_builds, cert, release, text_source):
    """32 concurrent connections, 4 KiB writes: goroutines park in Read and resume on other
    threads; the state keyed by goroutine still pairs each return with its call."""
    b = go_build(go_builds, release) if release else go_build(sorted(go_builds, key=lambda x: x.version)[::-1])
    with GoServer(b.path, *cert) as srv:
        with GoTap(tmp_path, "--elfpath", b.path, "--mapsize", "64M") as tap:
            ct = run_go_client(b.path, srv.port, conns=32, size=200_000, piece=4096)
            st = srv.transcripts(expect=32)
    recs = tap.data()
    assert_streams_match(recs, ct + st)
    _check_tuples(recs, ct + st)
    # the same connection's calls ran on several threads: what thread keying would get wrong
    # (the probe source's; packets come from no thread)
    tids = {}
    for r in recs:
        tids.setdefault((r["pid"], r["ssl"]), set()).add(r["tid"])
    assert any(len(v) > 1 for v in tids.values()) == (text_source == "probe")
    assert tap.summary()["lost_records"] == 0


def test_refuses_pid_whose_executable_is_not_go():
    import subprocess
    p = subprocess.Popen(["sleep", "30"])
    try:
        line = _one_clean_line(run_tlstap("gotls", "--pid", str(p.pid)))
        assert f"/proc/{p.pid}/exe is not a Go binary" in line
    finally:
        p.kill()
        p.wait()


@needs(have_tshark(), "tshark is not installed")
def test_pcapng_decrypted_by_tshark(tmp_path, go_builds, cert):
    """-m pcapng scoped to the Go server: packets from TC and the secrets writeKeyLog saw, in one
    file that tshark decrypts alone; both directions equal what the client sent and received."""
    b = go_build(go_builds, None, "stripped")
    out = str(tmp_path / "go.pcapng")
    with GoServer(b.path, *cert) as srv:
        tap = Tap(tmp_path)
        tap.argv = [tlstap_exe(), "gotls", "--pid", str(srv.pid), "-m", "pcapng", "-i", "lo", "-w", out,
                    "tcp", "port", str(srv.port)]
        with tap:
            ct = run_go_client(b.path, srv.port, conns=2, size=5000)
            srv.transcripts(expect=2)
            tap.stop()
    assert "writeKeyLog" in tap.stderr
    streams = tshark_tls_streams(out, tls_ports=[srv.port])
    assert len(streams) == 2, tap.stderr
    for t in ct:
        (s,) = [s for s in streams if t.local in (s.client, s.server)]
        assert s.sent_by(t.local) == t.sent and s.received_by(t.local) == t.received and len(t.sent) >= 5000
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600