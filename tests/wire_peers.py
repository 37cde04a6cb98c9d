"""Real TLS peers for the wire decryptor's tests: openssl s_client and s_server talking through a
loopback relay that records the bytes each direction carried, in order, with the client's key log.

A script drives the peers: ("c", data) writes data to s_client's stdin and waits until s_server
printed it; ("s", data) the other way; ("c" or "s", "K\\n") is the KeyUpdate command (both ends
update), after which we wait until the relay carried that end's KeyUpdate record; ("c", "R\\n")
renegotiates (TLS 1.2).
"""
from __future__ import annotations

import os
import select
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

from tlstap.wire.tls import IN, OUT

TIMEOUT = 10.0


def make_certs(d: str) -> dict[str, str]:
    """An EC and an RSA self-signed certificate (the RSA one for the DHE-RSA and RSA suites)."""
    out = {}
    for kind, opt in (("ec", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
                      ("rsa", ["-newkey", "rsa:2048"])):
        key, cert = os.path.join(d, f"{kind}.key"), os.path.join(d, f"{kind}.pem")
        subprocess.run(["openssl", "req", "-x509", *opt, "-nodes", "-keyout", key, "-out", cert,
                        "-subj", "/CN=localhost", "-days", "1"], check=True, capture_output=True)
        out[kind] = (cert, key)
    return out


def parse_keylog(path: str) -> dict[bytes, dict[str, bytes]]:
    keys: dict[bytes, dict[str, bytes]] = {}
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and not line.startswith("#"):
                keys.setdefault(bytes.fromhex(parts[1]), {})[parts[0]] = bytes.fromhex(parts[2])
    return keys


@dataclass
class Conn:
    events: list = field(default_factory=list)     # (OUT or IN, bytes) in capture order; OUT: client's
    done: threading.Event = field(default_factory=threading.Event)

    def stream(self, direction: int) -> bytes:
        return b"".join(b for d, b in self.events if d == direction)


class _Reader(threading.Thread):
    """Collects a process's stdout so a test can wait for text to show up in it."""

    def __init__(self, f):
        super().__init__(daemon=True)
        self.fd, self.data, self.cond = f.fileno(), bytearray(), threading.Condition()
        self.pos = 0        # where the last text waited for ended: the next is after it
        self.start()

    def run(self):
        while chunk := os.read(self.fd, 65536):
            with self.cond:
                self.data += chunk
                self.cond.notify_all()

    def wait_for(self, text: bytes) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.data.find(text, self.pos) >= 0, TIMEOUT):
                raise AssertionError(f"peer never printed {text[:40]!r}; "
                                     f"got {bytes(self.data[-300:])!r}")
            self.pos = self.data.find(text, self.pos) + len(text)


class Relay(threading.Thread):
    """Accepts clients on loopback, connects each to the server, forwards and records."""

    def __init__(self, server_port: int, nconns: int):
        super().__init__(daemon=True)
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.port = self.lsock.getsockname()[1]
        self.server_port, self.nconns = server_port, nconns
        self.conns: list[Conn] = []
        self.cond = threading.Condition()
        self.start()

    def run(self):
        with self.lsock:
            for _ in range(self.nconns):
                c, _addr = self.lsock.accept()
                s = socket.create_connection(("127.0.0.1", self.server_port))
                conn = Conn()
                with self.cond:
                    self.conns.append(conn)
                self._forward(c, s, conn)

    def _forward(self, c, s, conn):
        ends = {c: (s, OUT), s: (c, IN)}
        open_ = {c, s}
        deadline = time.monotonic() + 4 * TIMEOUT
        with c, s:
            while open_ and time.monotonic() < deadline:
                r, _, _ = select.select(list(open_), [], [], 1.0)
                for sock in r:
                    other, direction = ends[sock]
                    data = sock.recv(65536)
                    if not data:
                        open_.discard(sock)
                        try:
                            other.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        continue
                    with self.cond:
                        conn.events.append((direction, data))
                        self.cond.notify_all()
                    other.sendall(data)
        conn.done.set()

    def nbytes(self, idx: int, direction: int) -> int:
        with self.cond:
            return len(self.conns[idx].stream(direction)) if idx < len(self.conns) else 0

    def wait_bytes(self, idx: int, direction: int, more_than: int) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.nbytes(idx, direction) > more_than, TIMEOUT):
                raise AssertionError("the peer sent nothing after its command")


class Server:
    """openssl s_server with the given options, for nconns connections through a Relay."""

    def __init__(self, certs, args=(), nconns=1):
        (cert, key), (rcert, rkey) = certs["rsa"], certs["ec"]
        self.p = subprocess.Popen(["openssl", "s_server", "-accept", "127.0.0.1:0", "-cert", cert,
                                   "-key", key, "-dcert", rcert, "-dkey", rkey, "-naccept", str(nconns),
                                   *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL)
        self.out = _Reader(self.p.stdout)
        with self.out.cond:
            ok = self.out.cond.wait_for(lambda: b"ACCEPT" in self.out.data and
                                        self.out.data.split(b"ACCEPT", 1)[1].count(b"\n"), TIMEOUT)
        if not ok:
            self.close()
            raise AssertionError("s_server did not start")
        line = self.out.data.split(b"ACCEPT", 1)[1].split(b"\n", 1)[0]
        self.relay = Relay(int(line.rsplit(b":", 1)[1]), nconns)

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()
        self.out.join(TIMEOUT)
        self.p.stdin.close()
        self.p.stdout.close()


def run_client(server: Server, idx: int, keylog: str, script, args=()) -> tuple[Conn, dict]:
    """One s_client connection (the idx-th through the relay) driven by script; returns the
    recorded connection and what each end sent {OUT: client's bytes, IN: server's bytes}."""
    p = subprocess.Popen(["openssl", "s_client", "-connect", f"127.0.0.1:{server.relay.port}",
                          "-keylogfile", keylog, "-quiet", "-no_ign_eof", *args],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = _Reader(p.stdout)
    sent = {OUT: b"", IN: b""}
    try:
        for who, data in script:
            if data in (b"K\n", b"k\n", b"R\n"):
                # KeyUpdate: wait for its record; renegotiation: for the ClientHello, then the
                # client's second flight (a round trip later)
                direction, stdin = (OUT, p.stdin) if who == "c" else (IN, server.p.stdin)
                before = server.relay.nbytes(idx, direction)
                stdin.write(data)
                stdin.flush()
                for _ in range(2 if data == b"R\n" else 1):
                    server.relay.wait_bytes(idx, direction, before)
                    before = server.relay.nbytes(idx, direction)
            elif who == "c":
                p.stdin.write(data)
                p.stdin.flush()
                sent[OUT] += data
                server.out.wait_for(data)
            else:
                server.p.stdin.write(data)
                server.p.stdin.flush()
                sent[IN] += data
                out.wait_for(data)
        p.stdin.close()
        p.wait(TIMEOUT)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        out.join(TIMEOUT)      # EOF once the process is gone: then its pipe may close
        p.stdout.close()
    # the relay's record of this connection is complete once both ends closed
    with server.relay.cond:
        server.relay.cond.wait_for(lambda: len(server.relay.conns) > idx, TIMEOUT)
    conn = server.relay.conns[idx]
    if not conn.done.wait(TIMEOUT):
        raise AssertionError("the connection did not close")
    return conn, sent
