"""GnuTLS peers: `gnutls-serv --echo` and `gnutls-cli` (Debian gnutls-bin), both on libgnutls.so.30."""
from __future__ import annotations

import os
import select
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from ._common import (TCP_ESTABLISHED, TCP_LISTEN, Transcript, free_port, stop_process, tail,
                      tcp_sockets, wait_for)


class GnuTLSEchoServer:
    """`gnutls-serv --echo`: every byte a client sends comes back on the same connection.
    `with GnuTLSEchoServer(cert, key) as s: gnutls_echo(s, data)`."""

    def __init__(self, cert, key, priority: str | None = None, start_timeout: float = 15,
                 keylog: str | None = None):
        """keylog: GnuTLS's own key log (SSLKEYLOGFILE) goes to this file."""
        self.cert, self.key, self.priority = str(cert), str(key), priority
        self.env = _keylog_env(keylog)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="gnutls-serv-")
        self._err = Path(self._tmp.name) / "serv.stderr"
        for _ in range(5):                      # free_port is racy: retry on a lost race
            self.port = free_port()
            argv = ["gnutls-serv", "--echo", "-q", "-a", "-p", str(self.port),
                    "--x509certfile", self.cert, "--x509keyfile", self.key]
            if self.priority:
                argv.append(f"--priority={self.priority}")
            with open(self._err, "wb") as err:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                             env=self.env)
            try:
                wait_for(lambda: self.proc.poll() is not None or any(
                    s[0][1] == self.port for s in tcp_sockets(self.proc.pid, TCP_LISTEN)),
                    self.start_timeout, "gnutls-serv to listen")
            except TimeoutError:
                stop_process(self.proc, timeout=5)
                raise
            if self.proc.poll() is None:
                return self
        self._tmp.cleanup()
        raise RuntimeError(f"gnutls-serv did not start: {tail(self._err)}")

    def stderr(self) -> str:
        return tail(self._err)

    def __exit__(self, *exc):
        if self.proc is not None:
            stop_process(self.proc, timeout=5)
        self._tmp.cleanup()


def _keylog_env(path) -> dict | None:
    return None if path is None else {**os.environ, "SSLKEYLOGFILE": str(path)}


def _feed(f, data: bytes):
    try:
        f.write(data)
        f.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass


def gnutls_echo(server: GnuTLSEchoServer, data: bytes, host: str = "127.0.0.1",
                timeout: float = 20, priority: str | None = None, keylog: str | None = None,
                rekey: bool = False) -> tuple[Transcript, Transcript]:
    """One `gnutls-cli --insecure` connection to `server` sending `data` (stdin) and reading its
    echo (stdout). Returns (client, server) transcripts with the addresses from /proc; both
    ends sent and received `data` (checked). keylog: the client's SSLKEYLOGFILE. rekey: send
    `data` (one line or more), a TLS 1.3 KeyUpdate asking the server to update too (the
    inline command ^rekey^), then `data` again: the transcripts then hold it twice."""
    deadline = time.monotonic() + timeout
    tmp = tempfile.TemporaryDirectory(prefix="gnutls-cli-")
    log, err_path = Path(tmp.name) / "cli.log", Path(tmp.name) / "cli.stderr"
    # --logfile keeps the informational lines off stdout: stdout is the received plaintext only
    argv = ["gnutls-cli", "--insecure", "-p", str(server.port), host, f"--logfile={log}"]
    if priority:
        argv.append(f"--priority={priority}")
    stdin = data
    if rekey:
        argv.append("--inline-commands")
        stdin, data = data + b"^rekey^\n" + data, data + data
    with open(err_path, "wb") as err:
        cli = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                               env=_keylog_env(keylog))
    got = bytearray()
    fd = cli.stdout.fileno()
    try:
        threading.Thread(target=_feed, args=(cli.stdin, stdin), daemon=True).start()
        while len(got) < len(data):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"gnutls-cli: echoed {len(got)} of {len(data)} bytes\n{tail(err_path)}"
                                   f"\n{tail(log)}\n{server.stderr()}")
            if select.select([fd], [], [], min(left, 0.1))[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"gnutls-cli closed after {len(got)} of {len(data)} bytes\n"
                                       f"{tail(err_path)}\n{tail(log)}")
                got += chunk
        # the connection is still open on both ends: the real addresses
        c_sock = wait_for(lambda: tcp_sockets(cli.pid, TCP_ESTABLISHED), 5, "gnutls-cli socket")[0]
        s_sock = wait_for(lambda: [s for s in tcp_sockets(server.pid, TCP_ESTABLISHED)
                                   if s[1][1] == c_sock[0][1]], 5, "gnutls-serv socket")[0]
        cli.stdin.close()            # EOF -> gnutls-cli sends close_notify and exits
        while select.select([fd], [], [], max(0.1, deadline - time.monotonic()))[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            got += chunk
        cli.wait(max(1.0, deadline - time.monotonic()))
        # the server is done once its socket for this connection is gone
        wait_for(lambda: not any(s[1][1] == c_sock[0][1] for s in tcp_sockets(server.pid, TCP_ESTABLISHED)),
                 max(1.0, deadline - time.monotonic()), "gnutls-serv to close the connection")
    finally:
        stop_process(cli, timeout=5)
        for f in (cli.stdin, cli.stdout):
            try:
                f.close()
            except OSError:
                pass
        tmp.cleanup()
    if bytes(got) != data:
        raise RuntimeError(f"gnutls-serv echoed {len(got)} bytes that differ from the {len(data)} sent")
    c = Transcript(cli.pid, cli.pid, c_sock[0], c_sock[1], data, bytes(got))
    s = Transcript(server.pid, server.pid, s_sock[0], s_sock[1], data, data)
    return c, s
