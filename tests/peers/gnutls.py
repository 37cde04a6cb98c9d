"""GnuTLS peers: `gnutls-serv --echo` and `gnutls-cli` (Debian gnutls-bin), both on libgnutls.so.30."""
from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from ._common import (TCP_LISTEN, Transcript, free_port, stdin_echo_client, stop_process, tail,
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


def gnutls_echo(server: GnuTLSEchoServer, data: bytes, host: str = "127.0.0.1",
                timeout: float = 20, priority: str | None = None, keylog: str | None = None,
                rekey: bool = False) -> tuple[Transcript, Transcript]:
    """One `gnutls-cli --insecure` connection to `server` sending `data` (stdin) and reading its
    echo (stdout). Returns (client, server) transcripts with the addresses from /proc; both
    ends sent and received `data` (checked). keylog: the client's SSLKEYLOGFILE. rekey: send
    `data` (one line or more), a TLS 1.3 KeyUpdate asking the server to update too (the
    inline command ^rekey^), then `data` again: the transcripts then hold it twice."""
    argv = ["gnutls-cli", "--insecure", "-p", str(server.port), host]
    if priority:
        argv.append(f"--priority={priority}")
    send = data
    if rekey:
        argv.append("--inline-commands")
        send, data = data + b"^rekey^\n" + data, data + data
    with tempfile.TemporaryDirectory(prefix="gnutls-cli-") as tmp:
        log = Path(tmp) / "cli.log"
        # --logfile keeps the informational lines off stdout: stdout is the received plaintext only
        return stdin_echo_client(argv + [f"--logfile={log}"], server, data, timeout, logs=(log,),
                                 env=_keylog_env(keylog), send=send)
