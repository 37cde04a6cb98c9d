"""`openssl s_server` / `s_client` peers (the OpenSSL CLI, linked to the system libssl.so.3).

How exact bytes are achieved: both run with -quiet, so stdin is forwarded verbatim through
SSL_write and whatever SSL_read returns is written raw to stdout (no banners, no command
letters, no CRLF translation). We feed server_data / client_data through stdin pipes and read
stdout until the expected byte counts arrived.

Addresses: neither tool reports its socket addresses in -quiet mode, so while the connection is
up we read them from /proc/PID/fd + /proc/PID/net/tcp{,6} (real kernel values, both ends).

Limitations:
  * one connection per OpenSSLServer (-naccept 1); s_server/s_client are single-threaded, so
    tid == pid.
  * The connection is ended by closing s_server's stdin: in -quiet mode s_server then calls
    SSL_write(buf, 0) (a zero-length write a tracer may see), fails it, and sends close_notify;
    s_client exits on that close_notify. Its own stdin is kept open until then so it never does
    a zero-length write itself.
  * How the bytes are split into SSL_write calls depends on pipe reads (<=16 KiB per call);
    only the concatenation is meaningful.
"""
from __future__ import annotations

import os
import select
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ._common import TCP_ESTABLISHED, TCP_LISTEN, Transcript, stop_process, tail, tcp_sockets, wait_for

TLS_FLAG = {"1.3": "-tls1_3", "1.2": "-tls1_2"}


class OpenSSLServer:
    """`openssl s_server -naccept 1 -quiet` on an ephemeral port of host (127.0.0.1 or ::1)."""

    def __init__(self, cert, key, tls: str = "1.3", host: str = "127.0.0.1", start_timeout: float = 10):
        self.cert, self.key, self.tls, self.host = cert, key, tls, host
        self.start_timeout = start_timeout
        self.proc = self.port = self.pid = None

    @property
    def hostport(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __enter__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="s_server-")
        self._err = Path(self._tmp.name) / "stderr"
        acc = f"[{self.host}]:0" if ":" in self.host else f"{self.host}:0"
        with open(self._err, "wb") as err:
            # port 0: the kernel picks a free port, no race; we read it back from /proc below
            self.proc = subprocess.Popen(
                ["openssl", "s_server", "-accept", acc, "-naccept", "1", "-quiet",
                 "-cert", str(self.cert), "-key", str(self.key), TLS_FLAG[self.tls]],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self.pid = self.proc.pid
        try:
            def listening():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"s_server exited rc={self.proc.returncode}")
                # "accepting" == a LISTEN socket exists; probing with a connect would use up -naccept
                return tcp_sockets(self.pid, TCP_LISTEN)
            listen = wait_for(listening, self.start_timeout, "s_server to listen")
            self.port = listen[0][0][1]
        except Exception as e:
            stop_process(self.proc, timeout=5)
            msg = tail(self._err)
            self.__exit__(None, None, None)
            raise RuntimeError(f"s_server did not start: {e}\n{msg}") from e
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            stop_process(self.proc, timeout=5)
        self._tmp.cleanup()

    def stderr(self) -> str:
        return tail(self._err, 10000)


def _feed(f, data: bytes, close: bool):
    try:
        f.write(data)
        f.flush()
        if close:
            f.close()
    except (BrokenPipeError, ValueError, OSError):
        pass  # peer died; the byte-count wait reports it


def openssl_exchange(server: OpenSSLServer, client_data: bytes, server_data: bytes,
                     timeout: float = 20) -> tuple[Transcript, Transcript]:
    """Connect s_client to `server`, send client_data one way and server_data the other way.

    Returns (client_transcript, server_transcript) with real addresses from /proc."""
    deadline = time.monotonic() + timeout
    srv = server.proc
    err_path = Path(server._tmp.name) / "client.stderr"
    with open(err_path, "wb") as err:
        cli = subprocess.Popen(["openssl", "s_client", "-connect", server.hostport, "-quiet",
                                "-servername", "localhost"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    sfd, cfd = srv.stdout.fileno(), cli.stdout.fileno()
    try:
        # writers in threads: pipes block when full and s_server reads stdin only after accept
        for f, data in ((srv.stdin, server_data), (cli.stdin, client_data)):
            threading.Thread(target=_feed, args=(f, data, False), daemon=True).start()

        got = {sfd: bytearray(), cfd: bytearray()}
        want = {sfd: len(client_data), cfd: len(server_data)}
        open_fds = set(got)

        def pump(until_eof: bool):
            while open_fds:
                pending = [fd for fd in open_fds if until_eof or len(got[fd]) < want[fd]]
                if not pending:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"openssl exchange: got {[len(b) for b in got.values()]} "
                                       f"of {list(want.values())} bytes\n{tail(err_path)}\n{server.stderr()}")
                for fd in select.select(pending, [], [], left)[0]:
                    chunk = os.read(fd, 1 << 16)
                    if chunk:
                        got[fd] += chunk
                    else:
                        open_fds.discard(fd)
                if not until_eof and any(fd not in open_fds and len(got[fd]) < want[fd] for fd in got):
                    raise RuntimeError(f"openssl peer closed early\n{tail(err_path)}\n{server.stderr()}")

        pump(until_eof=False)
        # both ends hold the connection open now: read the real addresses
        s_sock = wait_for(lambda: tcp_sockets(srv.pid, TCP_ESTABLISHED), 5, "s_server socket")[0]
        c_sock = wait_for(lambda: tcp_sockets(cli.pid, TCP_ESTABLISHED), 5, "s_client socket")[0]
        srv.stdin.close()            # -> s_server sends close_notify, s_client exits on it
        pump(until_eof=True)         # anything extra would still belong in the transcripts
        left = max(1.0, deadline - time.monotonic())
        cli.wait(left)
        srv.wait(left)
    finally:
        stop_process(cli, timeout=5)
        for f in (cli.stdin, cli.stdout):
            try:
                f.close()
            except OSError:
                pass
    c = Transcript(cli.pid, cli.pid, c_sock[0], c_sock[1], client_data, bytes(got[cfd]))
    s = Transcript(srv.pid, srv.pid, s_sock[0], s_sock[1], server_data, bytes(got[sfd]))
    return c, s
