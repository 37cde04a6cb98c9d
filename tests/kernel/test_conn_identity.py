"""A connection's identity: a freed SSL* whose memory serves the next connection is a new
connection (nginx reuses the address for every sequential connection), and a process that
serves many connections on one thread over memory BIOs (asyncio) never gets another
connection's 4-tuple.

Oracles: the files nginx served and curl's own output; the client sockets' getsockname() and
the bytes each asyncio client sent and received.
"""
from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
from collections import defaultdict

import pytest

from tests.conftest import need_tool
from tests.peers import NginxServer

from .tap import Tap, payload


def body_of(m: dict) -> bytes:
    b = m["body"]
    return base64.b64decode(b["data"]) if b["encoding"] == "base64" else b["data"].encode()


def _sequential_curls(srv: NginxServer, files: dict[str, bytes], protos: list[str], tmp_path) -> list[int]:
    """One curl process (one connection) per request; returns each client's local port."""
    ports = []
    for i, proto in enumerate(protos):
        name = f"f{i}"
        r = subprocess.run(["curl", "-sSk", proto, "-w", "%{local_port} %{http_version}", "-o",
                            str(tmp_path / f"{name}.out"), srv.url(name)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        port, version = r.stdout.split()
        assert version == ("2" if proto == "--http2" else "1.1")
        assert (tmp_path / f"{name}.out").read_bytes() == files[name]
        ports.append(int(port))
    return ports


def _check_each_exchange_on_its_own_connection(tap: Tap, files, protos, ports):
    recs = tap.records()
    notes = [r["text"] for r in recs if r["type"] == "note"]
    assert not [r for r in recs if r["type"] == "data"], f"undecoded calls; notes: {notes}"
    ex = tap.http()
    assert len(ex) == len(protos), f"{len(ex)} of {len(protos)} exchanges decoded; notes: {notes}"
    for i, (e, proto, port) in enumerate(zip(ex, protos, ports)):
        assert e["request"]["target"] == f"/f{i}"
        assert e["proto"] == ("HTTP/2" if proto == "--http2" else "HTTP/1.1")
        assert e["response"]["status"] == 200 and body_of(e["response"]) == files[f"f{i}"]
        assert e["remote"]["port"] == port            # the 4-tuple of that very connection
    assert len({e["conn"] for e in ex}) == len(ex)    # and a distinct connection id each
    assert len({e["ssl"] for e in ex}) < len(ex), "nginx did not reuse an SSL* (the case under test)"


@pytest.mark.parametrize("files, protos", [
    ({f"f{i}": os.urandom(3000 + 101 * i) for i in range(10)}, ["--http2"] * 10),
    ({f"f{i}": os.urandom(2000 + 997 * i) for i in range(20)}, ["--http2", "--http1.1"] * 10),
], ids=["sequential-http2", "alternating-http2-http1"])
def test_sequential_connections_on_a_reused_ssl(tmp_path, cert, files, protos):
    """10 sequential HTTP/2 connections, and 20 alternating HTTP/2 and HTTP/1.1 ones."""
    with NginxServer(*cert, files, http2=True) as srv:
        w = srv.worker_pids()[0]
        with Tap(tmp_path, "--pid", str(w), raw=False) as tap:
            ports = _sequential_curls(srv, files, protos, tmp_path)
            srv.wait_logged(len(protos))
            tap.stop()
    _check_each_exchange_on_its_own_connection(tap, files, protos, ports)


# An asyncio TLS server: Python's ssl over memory BIOs (SSLObject + MemoryBIO), every
# connection on one thread. It logs, per client port, the bytes it received and sent.
ASYNCIO_SERVER = textwrap.dedent(r"""
    import asyncio, json, ssl, sys

    async def main(cert, key, n):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        log, done = {}, asyncio.Event()

        async def handle(r, w):
            port = w.get_extra_info("peername")[1]
            got, sent = bytearray(), bytearray()
            while data := await r.read(65536):
                got += data
                reply = b"echo " + data[::-1]
                w.write(reply)
                sent += reply
                await w.drain()
            log[port] = {"got": got.hex(), "sent": sent.hex()}
            w.close()
            if len(log) == n:
                done.set()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        print(srv.sockets[0].getsockname()[1], flush=True)
        await asyncio.wait_for(done.wait(), 120)
        print(json.dumps(log), flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
""")


def _client(port: int, i: int, rounds: int, start, out: dict) -> None:
    import socket
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=60) as raw:
        start.wait(60)              # all connections open before anyone talks: they interleave
        with ctx.wrap_socket(raw) as s:
            sent = bytearray()
            for k in range(rounds):
                msg = f"client {i} round {k} ".encode() + os.urandom(40 + 13 * i).hex().encode()
                s.sendall(msg)
                sent += msg
                want = len(b"echo ") + len(msg)
                got = b""
                while len(got) < want:    # the server's replies may be split or joined
                    chunk = s.recv(65536)
                    assert chunk
                    got += chunk
            out[i] = (s.getsockname()[1], bytes(sent))


def test_asyncio_memory_bio_server_never_gets_another_connections_tuple(tmp_path, cert):
    import threading
    n, rounds = 8, 6
    srv = subprocess.Popen([sys.executable, "-c", ASYNCIO_SERVER, cert[0], cert[1], str(n)],
                           stdout=subprocess.PIPE, text=True)
    try:
        port = int(srv.stdout.readline())
        with Tap(tmp_path, "--pid", str(srv.pid)) as tap:
            out: dict = {}
            start = threading.Barrier(n)
            threads = [threading.Thread(target=_client, args=(port, i, rounds, start, out)) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert len(out) == n
            log = {int(p): (bytes.fromhex(v["got"]), bytes.fromhex(v["sent"]))
                   for p, v in __import__("json").loads(srv.stdout.readline()).items()}
            tap.stop()
    finally:
        srv.kill()
        srv.wait()
    client_port = {i: p for i, (p, _) in out.items()}
    assert set(log) == set(client_port.values())           # the server saw the clients' ports
    for i, (p, sent) in out.items():
        assert log[p][0] == sent

    # per connection as tlstap tells them apart: exactly one client's bytes, both directions
    by_conn = defaultdict(lambda: {"read": [], "write": [], "ports": set()})
    for r in tap.data():
        c = by_conn[(r["ssl"], r["conn"])]
        c[r["dir"]].append(payload(r))
        c["ports"].add(r["remote"]["port"] if r["remote"] else None)
    assert len(by_conn) == n
    attributed = 0
    for c in by_conn.values():
        got, sent = b"".join(c["read"]), b"".join(c["write"])
        (p,) = [p for p, (g, s) in log.items() if g == got]
        assert log[p][1] == sent
        # the 4-tuple, when given, is that client's: never another connection's
        assert c["ports"] <= {p, None}, (p, c["ports"])
        attributed += p in c["ports"]
        for r in tap.data():
            if r["remote"] and r["remote"]["port"] == p:
                assert r["local"]["port"] == port and (r["ssl"], r["conn"]) in by_conn
    assert attributed == n, "every connection proven by its ServerHello"


def test_gnutls_sessions_at_one_address_are_two_connections(tmp_path, cert):
    """gnutls-serv deinits a session and often gets its address back for the next: the
    gnutls_deinit probe ends the generation, so each session's calls carry their own id."""
    from tests.peers.gnutls import GnuTLSEchoServer, gnutls_echo
    need_tool("gnutls-serv")
    data = [(os.urandom(1500 + 500 * i).hex() + "\n").encode() for i in range(4)]
    with GnuTLSEchoServer(*cert) as srv:
        with Tap(tmp_path, "--pid", str(srv.pid), command="gnutls") as tap:
            served = [gnutls_echo(srv, d)[1] for d in data]
    recs = tap.data()
    conns = defaultdict(set)
    for r in recs:
        conns[(r["remote"]["port"])].add((r["ssl"], r["conn"]))
    assert sorted(conns) == sorted(t.remote[1] for t in served)
    assert all(len(v) == 1 for v in conns.values())           # one identity per connection
    assert len({v for s in conns.values() for v in s}) == len(served)   # and each its own
    assert len({r["ssl"] for r in recs}) < len(served), "no session address reused (the case under test)"
    for t in served:
        (ident,) = conns[t.remote[1]]
        mine = [r for r in recs if (r["ssl"], r["conn"]) == ident]
        assert b"".join(payload(r) for r in mine if r["dir"] == "read") == t.received


# One SSL object, reused with SSL_clear for several connections, over memory BIOs: what the
# decoder and the 4-tuple must not carry from one connection into the next. Drives the system
# libssl through ctypes (Python's ssl module cannot clear an SSL).
CLEARED_SSL_CLIENT = textwrap.dedent(r"""
    import ctypes, json, socket, sys
    P, I = ctypes.c_void_p, ctypes.c_int
    lib = ctypes.CDLL(sys.argv[1])          # dlsym on it also finds its libcrypto's BIO_*
    for name, args, res in [("TLS_client_method", [], P), ("SSL_CTX_new", [P], P), ("SSL_new", [P], P),
                            ("BIO_s_mem", [], P), ("BIO_new", [P], P), ("SSL_set_bio", [P, P, P], None),
                            ("SSL_set_connect_state", [P], None), ("SSL_do_handshake", [P], I),
                            ("SSL_get_error", [P, I], I), ("SSL_write", [P, ctypes.c_char_p, I], I),
                            ("SSL_read", [P, ctypes.c_char_p, I], I), ("BIO_read", [P, ctypes.c_char_p, I], I),
                            ("BIO_write", [P, ctypes.c_char_p, I], I), ("SSL_clear", [P], I)]:
        f = getattr(lib, name)
        f.argtypes, f.restype = args, res
    WANT_READ, ZERO_RETURN = 2, 6
    ssl = lib.SSL_new(lib.SSL_CTX_new(lib.TLS_client_method()))
    buf = ctypes.create_string_buffer(1 << 16)
    print("READY", flush=True)
    port, paths = int(sys.argv[2]), sys.argv[3:]
    sys.stdin.readline()
    out = []
    for path in paths:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        rbio, wbio = lib.BIO_new(lib.BIO_s_mem()), lib.BIO_new(lib.BIO_s_mem())
        lib.SSL_set_bio(ssl, rbio, wbio)
        lib.SSL_set_connect_state(ssl)

        def flush():
            while (n := lib.BIO_read(wbio, buf, len(buf))) > 0:
                sock.sendall(buf.raw[:n])

        def feed():
            data = sock.recv(1 << 16)
            lib.BIO_write(rbio, data, len(data))
            return bool(data)

        while (r := lib.SSL_do_handshake(ssl)) != 1:
            flush()
            assert lib.SSL_get_error(ssl, r) == WANT_READ and feed(), "handshake failed"
        flush()
        req = f"GET /{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        assert lib.SSL_write(ssl, req, len(req)) == len(req)
        flush()
        resp = b""
        while True:
            n = lib.SSL_read(ssl, buf, len(buf))
            if n > 0:
                resp += buf.raw[:n]
                continue
            err = lib.SSL_get_error(ssl, n)
            if err == ZERO_RETURN or (err == WANT_READ and not feed()):
                break
            assert err == WANT_READ, err
        out.append({"port": sock.getsockname()[1], "sent": req.hex(), "got": resp.hex(), "ssl": ssl})
        sock.close()
        assert lib.SSL_clear(ssl) == 1       # the same SSL* for the next connection
    print(json.dumps(out), flush=True)
""")


def test_ssl_cleared_for_a_new_connection_over_memory_bios(tmp_path, cert):
    import json
    from tests.peers import system_libssl
    libssl = system_libssl()
    files = {f"c{i}": os.urandom(1000 + 500 * i) for i in range(3)}
    with NginxServer(*cert, files) as srv:
        cl = subprocess.Popen([sys.executable, "-c", CLEARED_SSL_CLIENT, str(libssl), str(srv.port), *files],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert cl.stdout.readline().strip() == "READY"
            with Tap(tmp_path, "--pid", str(cl.pid)) as tap:
                cl.stdin.write("go\n")
                cl.stdin.flush()
                conns = json.loads(cl.stdout.readline())
                tap.stop()
        finally:
            cl.kill()
            cl.wait()
    assert len({c["ssl"] for c in conns}) == 1 and len(conns) == len(files)
    recs = tap.data()
    by_conn = defaultdict(list)
    for r in recs:
        by_conn[(r["ssl"], r["conn"])].append(r)
    assert len(by_conn) == len(conns), "one identity per connection"
    for c, mine in zip(conns, sorted(by_conn.values(), key=lambda rs: rs[0]["ts_ns"])):
        assert b"".join(payload(r) for r in mine if r["dir"] == "write") == bytes.fromhex(c["sent"])
        assert b"".join(payload(r) for r in mine if r["dir"] == "read") == bytes.fromhex(c["got"])
        # proven by this connection's ClientHello, never the previous connection's socket
        assert {r["local"]["port"] if r["local"] else None for r in mine} == {c["port"]}
