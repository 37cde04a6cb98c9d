"""pcapng packet owners when another process takes a connection over (issue 15).

The owner of a connection is the process that does its I/O. A forking server accepts in
one process and serves in another; a dispatcher passes the socket to a worker with
SCM_RIGHTS. The oracles are the pids the peers report (the child, the worker) and
PostgreSQL's own pg_backend_pid().
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import missing
from tests.peers import wait_for

from .test_packets import Collector, tcp_fields

PAYLOAD = os.urandom(20_000)


def served_side(col: Collector, port: int, cport: int):
    """(packet, fields, owner of the server's socket) of one connection, in capture order."""
    out = []
    for p, f in col.tcp(port):
        if f[1] == port and f[3] == cport:
            out.append((p, f, p.sender))
        elif f[3] == port and f[1] == cport:
            out.append((p, f, p.receiver))
    return out


def free_port() -> int:
    """A loopback TCP port free a moment ago, for a server that must bind it later."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_echo(port: int, cl_sock: socket.socket) -> bytes:
    """TLS over an already connected socket: send PAYLOAD, read it back, close."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with ctx.wrap_socket(cl_sock, server_hostname="localhost") as t:
        t.sendall(PAYLOAD)
        got = b""
        while len(got) < len(PAYLOAD):
            b = t.recv(65536)
            if not b:
                break
            got += b
        return got


# ---------------------------------------------------------------- fork + close

FORKING = r"""
import os, socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(sys.argv[1], sys.argv[2])
ls = socket.socket(socket.AF_INET6 if ":" in sys.argv[3] else socket.AF_INET)
ls.bind((sys.argv[3], 0))
ls.listen(8)
print(ls.getsockname()[1], flush=True)
c, _ = ls.accept()
pid = os.fork()
if pid == 0:
    ls.close()
    with ctx.wrap_socket(c, server_side=True) as t:
        while (b := t.recv(65536)):
            t.sendall(b)
    os._exit(0)
c.close()
print(pid, flush=True)       # the parent holds the connection no more
os.waitpid(pid, 0)
"""


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_forking_server_packets_name_the_child(cert, host):
    """Parent accepts, forks, closes its copy; the child does the TLS. Every packet after
    that names the child as the server's owner, the parent none."""
    srv = subprocess.Popen([sys.executable, "-c", FORKING, *cert, host], stdout=subprocess.PIPE, text=True)
    try:
        port = int(srv.stdout.readline())
        with Collector("lo", f"tcp port {port}") as col:
            cl = socket.create_connection((host, port))
            cport = cl.getsockname()[1]
            child = int(srv.stdout.readline())      # forked and closed in the parent
            assert tls_echo(port, cl) == PAYLOAD
            assert srv.wait(30) == 0
            col.stop()
    finally:
        srv.kill()
        srv.wait()
    side = served_side(col, port, cport)
    first = next(i for i, (_, f, _) in enumerate(side) if f[5])     # the ClientHello
    after = side[first:]
    assert len(after) > 5 and any(f[1] == port and f[5] for _, f, _ in after)
    wrong = [(p, o) for p, _, o in after if not o or o.pid != child]
    assert not wrong, f"child {child}, parent {srv.pid}: {wrong[:3]}"
    # the client end stays ours
    assert all(p.sender.pid == os.getpid() for p, f, _ in side if f[1] == cport)


# ---------------------------------------------------------------- pre-forked workers

PREFORK = r"""
import os, socket, sys
ls = socket.socket()
ls.bind(("127.0.0.1", int(sys.argv[1])))
ls.listen(8)
pid = os.fork()
if pid == 0:                 # the worker: accepts and serves, the master never does
    while True:
        c, _ = ls.accept()
        while (b := c.recv(65536)):
            c.sendall(b)
        c.close()
print(pid, flush=True)
sys.stdin.read()
os.kill(pid, 9)
"""


def test_prefork_worker_owns_the_handshake_of_the_next_connection():
    """A master listens, its worker accepts: once the worker has accepted, the packets of a
    connection not yet accepted name it, not the master that called listen() (which the
    capture sees: the server starts after it)."""
    port = free_port()
    with Collector("lo", f"tcp port {port}") as col:
        srv = subprocess.Popen([sys.executable, "-c", PREFORK, str(port)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
        try:
            worker = int(srv.stdout.readline())
            cports = []
            for _ in range(2):
                with socket.create_connection(("127.0.0.1", port)) as cl:
                    cports.append(cl.getsockname()[1])
                    cl.sendall(b"x" * 1000)
                    got = b""
                    while len(got) < 1000:
                        got += cl.recv(65536)
            col.stop()
        finally:
            srv.kill()
            srv.wait()
    side = served_side(col, port, cports[1])
    assert any(f[4] & 0x12 == 0x02 for _, f, _ in side)                 # from the SYN on
    wrong = [(p, o) for p, _, o in side if not o or o.pid != worker]
    assert not wrong, f"worker {worker}, master {srv.pid}: {wrong[:3]}"


# ---------------------------------------------------------------- SCM_RIGHTS to a worker

DISPATCH = r"""
import array, os, socket, ssl, sys
role, path = sys.argv[1], sys.argv[2]
if role == "worker":
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[3], sys.argv[4])
    u = socket.socket(socket.AF_UNIX)
    u.bind(path)
    u.listen(1)
    print("ready", flush=True)
    d, _ = u.accept()
    _, fds, _, _ = socket.recv_fds(d, 1, 1)
    c = socket.socket(fileno=fds[0])
    with ctx.wrap_socket(c, server_side=True) as t:
        while (b := t.recv(65536)):
            t.sendall(b)
else:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    print(ls.getsockname()[1], flush=True)
    c, _ = ls.accept()
    u = socket.socket(socket.AF_UNIX)
    u.connect(path)
    socket.send_fds(u, [b"c"], [c.fileno()])
    c.close()
    print("passed", flush=True)
    sys.stdin.read()
"""


def test_socket_passed_with_scm_rights_names_the_worker(cert, tmp_path):
    """A dispatcher accepts and passes the socket to an unrelated worker: once the worker
    has read from it, the packets name the worker (the server's first reply and after)."""
    path = str(tmp_path / "owners.sock")
    with contextlib.ExitStack() as stack:
        worker = subprocess.Popen([sys.executable, "-c", DISPATCH, "worker", path, *cert],
                                  stdout=subprocess.PIPE, text=True)
        stack.callback(lambda: (worker.kill(), worker.wait()))
        assert worker.stdout.readline().strip() == "ready"
        disp = subprocess.Popen([sys.executable, "-c", DISPATCH, "dispatcher", path], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        stack.callback(lambda: (disp.kill(), disp.wait()))
        port = int(disp.stdout.readline())
        with Collector("lo", f"tcp port {port}") as col:
            cl = socket.create_connection(("127.0.0.1", port))
            cport = cl.getsockname()[1]
            assert disp.stdout.readline().strip() == "passed"
            assert tls_echo(port, cl) == PAYLOAD
            assert worker.wait(30) == 0
            col.stop()
    side = served_side(col, port, cport)
    first = next(i for i, (_, f, _) in enumerate(side) if f[1] == port and f[5])   # ServerHello
    wrong = [(p, o) for p, _, o in side[first:] if not o or o.pid != worker.pid]
    assert len(side) - first > 5 and not wrong, f"worker {worker.pid}, dispatcher {disp.pid}: {wrong[:3]}"


# ---------------------------------------------------------------- PostgreSQL

PG_BIN = "/usr/lib/postgresql/15/bin"


@pytest.fixture
def postgres(cert):
    """A private PostgreSQL cluster (ssl=on) on a loopback port: yields (port, postmaster pid)."""
    if not os.path.exists(f"{PG_BIN}/initdb"):
        missing(f"PostgreSQL 15 is not installed ({PG_BIN}/initdb; apt-get install postgresql)")
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        missing("no postgres user (apt-get install postgresql)")
    top = tempfile.mkdtemp(prefix="tlstap-owners-pg-")
    data = os.path.join(top, "data")
    as_pg = dict(user=pw.pw_uid, group=pw.pw_gid, capture_output=True, text=True, timeout=120)
    try:
        os.chown(top, pw.pw_uid, pw.pw_gid)
        r = subprocess.run([f"{PG_BIN}/initdb", "-D", data, "-A", "trust", "-U", "postgres"], **as_pg)
        if r.returncode:
            missing(f"initdb failed: {r.stderr.strip()[-300:]}")
        for src, name in zip(cert, ("server.crt", "server.key")):
            shutil.copy(src, os.path.join(data, name))
            os.chown(os.path.join(data, name), pw.pw_uid, pw.pw_gid)
            os.chmod(os.path.join(data, name), 0o600)
        port = free_port()
        opts = (f"-p {port} -k {top} -c listen_addresses=127.0.0.1 -c ssl=on "
                f"-c ssl_cert_file=server.crt -c ssl_key_file=server.key")
        r = subprocess.run([f"{PG_BIN}/pg_ctl", "-D", data, "-l", os.path.join(top, "log"), "-o", opts,
                            "-w", "-t", "60", "start"], **as_pg)
        if r.returncode:
            log = open(os.path.join(top, "log")).read() if os.path.exists(os.path.join(top, "log")) else ""
            missing(f"postgres did not start: {(r.stderr + log).strip()[-300:]}")
        try:
            with open(os.path.join(data, "postmaster.pid")) as f:
                yield port, int(f.readline())
        finally:
            subprocess.run([f"{PG_BIN}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], **as_pg)
    finally:
        shutil.rmtree(top, ignore_errors=True)


PG_CLIENT = r"""
import os, socket, sys
import psycopg2
conn = psycopg2.connect(host="127.0.0.1", port=int(sys.argv[1]), user="postgres", dbname="postgres",
                        sslmode="require", connect_timeout=30)
with socket.socket(fileno=os.dup(conn.fileno())) as s:
    cport = s.getsockname()[1]
with conn.cursor() as cur:
    cur.execute("SELECT pg_backend_pid(), ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    backend, used_ssl = cur.fetchone()
    cur.execute("SELECT repeat('x', 100000)")
    assert len(cur.fetchone()[0]) == 100000
conn.close()
print(cport, backend, int(used_ssl))
"""


def test_postgresql_packets_name_the_backend(postgres):
    """psycopg2 (libpq, sslmode=require) to a real postmaster: from the server's answer to
    the SSLRequest on, every packet names the backend that serves the session. The client
    runs in a process of its own: psycopg2's wheel brings its own libssl, which must never
    be mapped into the test process (tests/peers_smoke checks that)."""
    port, postmaster = postgres
    if importlib.util.find_spec("psycopg2") is None:
        missing("psycopg2 is not installed (pip install psycopg2-binary)")
    with Collector("lo", f"tcp port {port}") as col:
        r = subprocess.run([sys.executable, "-c", PG_CLIENT, str(port)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        cport, backend, used_ssl = map(int, r.stdout.split())
        # the backend's exit: its FIN, and the client's last ACK
        wait_for(lambda: not os.path.exists(f"/proc/{backend}"), 10, "backend exit")
        col.stop()
    assert used_ssl and backend != postmaster
    side = served_side(col, port, cport)
    first = next(i for i, (_, f, _) in enumerate(side) if f[1] == port and f[5])   # 'S'
    after = side[first:]
    assert len(after) > 10
    wrong = [(p, o) for p, _, o in after if not o or o.pid != backend]
    assert not wrong, f"backend {backend}, postmaster {postmaster}: {wrong[:3]}"


# ---------------------------------------------------------------- older than the capture

CHAIN = r"""
import os, socket, sys
ls = socket.socket()
ls.bind(("127.0.0.1", 0))
ls.listen(1)
print(ls.getsockname()[1], flush=True)
c, _ = ls.accept()
for _ in range(int(sys.argv[1])):
    pid = os.fork()
    if pid:                  # keeps its copy open until the child is done
        os.waitpid(pid, 0)
        os._exit(0)
print(os.getpid(), flush=True)
while (b := c.recv(65536)):
    c.sendall(b)
"""


@pytest.mark.parametrize("generations", [1, 2])
def test_seeded_connection_held_by_parent_and_descendants_names_the_server(generations):
    """A connection older than the capture, open in a server, its child (and grandchild):
    /proc names them all, the seeding names the youngest, which serves it."""
    srv = subprocess.Popen([sys.executable, "-c", CHAIN, str(generations)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(srv.stdout.readline())
        with socket.create_connection(("127.0.0.1", port)) as cl:
            cport = cl.getsockname()[1]
            server = int(srv.stdout.readline())
            with Collector("lo", f"tcp port {port}") as col:
                cl.sendall(PAYLOAD)
                got = b""
                while len(got) < len(PAYLOAD):
                    got += cl.recv(65536)
                col.stop()
        assert srv.wait(30) == 0
    finally:
        srv.kill()
        srv.wait()
    assert got == PAYLOAD and col.cap.seeded >= 2
    side = served_side(col, port, cport)
    wrong = [(p, o) for p, _, o in side if not o or o.pid != server]
    assert side and not wrong, f"server {server}, first holder {srv.pid}: {wrong[:3]}"
