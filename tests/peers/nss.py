"""NSS peers (Debian libnss3-tools): `tstclnt` (client: sends stdin, prints what it receives)
and `selfserv` (server: answers one request per connection with a fixed HTTP header followed
by the request it read), both on libssl3.so / libnspr4.so; and nss_ctypes_peer.py, an NSS
client through ctypes for the NSPR calls those two do not make."""
from __future__ import annotations

import base64
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from ._common import (TCP_ESTABLISHED, ListeningServer, Transcript, stdin_echo_client, stop_and_close,
                      tcp_sockets, tls_read_to_eof, wait_for)

NICK = "tlstap-test"


def make_nss_db(directory, cert, key) -> str:
    """An NSS database (sql: format, empty password) in `directory` holding cert+key under
    NICK; returns the "sql:DIR" spelling the tools take."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    db = f"sql:{d}"
    p12 = d / "server.p12"
    run = lambda *argv: subprocess.run(argv, check=True, capture_output=True, timeout=60)  # noqa: E731
    run("certutil", "-N", "-d", db, "--empty-password")
    run("openssl", "pkcs12", "-export", "-in", str(cert), "-inkey", str(key), "-name", NICK,
        "-passout", "pass:", "-out", str(p12))
    run("pk12util", "-i", str(p12), "-d", db, "-W", "")
    return db


class SelfServ(ListeningServer):
    """`selfserv` on 127.0.0.1 with a fresh NSS database; `with SelfServ(cert, key) as s:`."""

    name = "selfserv"

    def __init__(self, cert, key, start_timeout: float = 15):
        super().__init__(start_timeout)
        self.cert, self.key = cert, key
        self._db = None

    def argv(self, port: int, tmp: Path) -> list[str]:
        if self._db is None:
            self._db = make_nss_db(tmp / "db", self.cert, self.key)
        return ["selfserv", "-d", self._db, "-n", NICK, "-p", str(port)]


# selfserv reads a request into a 10 KiB buffer; more is answered "incomplete" and not all read
SELFSERV_MAX_REQUEST = 10_000
#: the last line of selfserv's answer (selfserv.c's EOFmsg, after the echoed request)
SELFSERV_EOF = b"EOF\r\n\r\n\r\n"


def selfserv_request(server: SelfServ, request: bytes, timeout: float = 20) -> Transcript:
    """Send `request` (a complete HTTP/1.0 request, < SELFSERV_MAX_REQUEST bytes) to selfserv
    from Python's ssl (OpenSSL: not probed by `tlstap nss`) and read the answer to EOF.
    Returns the server's transcript: it received exactly `request` and sent exactly what this
    client read (selfserv closes the connection after answering)."""
    assert len(request) < SELFSERV_MAX_REQUEST and request.endswith(b"\r\n\r\n")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as raw:
        port = raw.getsockname()[1]
        with ctx.wrap_socket(raw) as t:
            # selfserv waits for the request: its end of the connection, as it sees it (a
            # dual-stack listener: ::ffff:127.0.0.1)
            s_sock = wait_for(lambda: [s for s in tcp_sockets(server.pid, TCP_ESTABLISHED) if s[1][1] == port],
                              5, "selfserv socket")[0]
            t.sendall(request)
            got = tls_read_to_eof(t, timeout)
    if request not in got:
        raise RuntimeError(f"selfserv did not echo the request: {got[:300]!r}\n{server.stderr()}")
    # the server is done once its socket for this connection is gone
    wait_for(lambda: not any(s[1][1] == port for s in tcp_sockets(server.pid, TCP_ESTABLISHED)),
             5, "selfserv to close the connection")
    return Transcript(server.pid, None, s_sock[0], s_sock[1], got, request)


def tstclnt_echo(server, data: bytes, host: str = "127.0.0.1", version: str | None = None,
                 timeout: float = 20) -> tuple[Transcript, Transcript]:
    """One `tstclnt -D -o` connection (no cert database, server cert accepted) to an echo
    `server` (GnuTLSEchoServer) sending `data` and reading its echo: (client, server).
    version: "tls1.2", "tls1.3" (tstclnt -V min:max), None: NSS's default range."""
    argv = ["tstclnt", "-D", "-o", "-h", host, "-p", str(server.port)]
    if version:
        argv += ["-V", f"{version}:{version}"]
    return stdin_echo_client(argv, server, data, timeout, exits_on_eof=False)


def tstclnt_request(server: SelfServ, request: bytes, timeout: float = 20) -> tuple[Transcript, Transcript]:
    """tstclnt against selfserv, NSS at both ends: `request` goes in on tstclnt's stdin once
    the connection is up (both ends' addresses read from /proc first: selfserv closes after
    answering), the answer comes out on its stdout. tstclnt does not exit when the server
    closes, so it is stopped once selfserv has closed and the answer's last line is out.
    Returns (client, server) transcripts; the server's mirror the client's."""
    assert len(request) < SELFSERV_MAX_REQUEST and request.endswith(b"\r\n\r\n")
    cli = subprocess.Popen(["tstclnt", "-D", "-o", "-h", "127.0.0.1", "-p", str(server.port)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    got = bytearray()
    fd = cli.stdout.fileno()
    try:
        c_sock = wait_for(lambda: tcp_sockets(cli.pid, TCP_ESTABLISHED), timeout, "tstclnt to connect")[0]
        s_sock = wait_for(lambda: [s for s in tcp_sockets(server.pid, TCP_ESTABLISHED) if s[1][1] == c_sock[0][1]],
                          5, "selfserv socket")[0]
        cli.stdin.write(request)
        cli.stdin.flush()
        wait_for(lambda: not any(s[1][1] == c_sock[0][1] for s in tcp_sockets(server.pid, TCP_ESTABLISHED)),
                 timeout, "selfserv to answer and close")
        deadline = time.monotonic() + timeout
        while not got.endswith(SELFSERV_EOF):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"tstclnt printed no end of selfserv's answer: {bytes(got[-300:])!r}")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            got += chunk
    finally:
        stop_and_close(cli)
    if request not in got:
        raise RuntimeError(f"selfserv did not echo the request: {bytes(got[:300])!r}\n{server.stderr()}")
    c = Transcript(cli.pid, cli.pid, c_sock[0], c_sock[1], request, bytes(got))
    s = Transcript(server.pid, None, s_sock[0], s_sock[1], bytes(got), request)
    return c, s


def run_nss_ctypes_client(port: int, layer: bool = False, plain_port: int | None = None,
                          file: str | None = None, timeout: float = 30) -> tuple[Transcript, bytes]:
    """nss_ctypes_peer.py against an echo server on `port` (see its docstring): its transcript
    and the bytes it wrote to the plain socket / file (which are not TLS)."""
    argv = [sys.executable, str(Path(__file__).with_name("nss_ctypes_peer.py")), str(port)]
    if layer:
        argv.append("--layer")
    if plain_port:
        argv += ["--plain-port", str(plain_port)]
    if file:
        argv += ["--file", file]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"nss_ctypes_peer failed ({r.returncode}): {r.stderr[-2000:]}")
    d = json.loads(r.stdout)
    t = Transcript(d["pid"], None, tuple(d["local"]), tuple(d["remote"]),
                   base64.b64decode(d["sent"]), base64.b64decode(d["received"]))
    if t.sent != t.received:
        raise RuntimeError("the echo server did not echo every byte")
    return t, base64.b64decode(d["plain"])
