"""GnuTLS peers: `gnutls-serv --echo` and `gnutls-cli` (Debian gnutls-bin), both on libgnutls.so.30."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ._common import ListeningServer, Transcript, stdin_echo_client


class GnuTLSEchoServer(ListeningServer):
    """`gnutls-serv --echo`: every byte a client sends comes back on the same connection.
    `with GnuTLSEchoServer(cert, key) as s: gnutls_echo(s, data)`."""

    name = "gnutls-serv"

    def __init__(self, cert, key, priority: str | None = None, start_timeout: float = 15,
                 keylog: str | None = None):
        """keylog: GnuTLS's own key log (SSLKEYLOGFILE) goes to this file."""
        super().__init__(start_timeout)
        self.cert, self.key, self.priority = str(cert), str(key), priority
        self.env = _keylog_env(keylog)

    def argv(self, port: int, tmp: Path) -> list[str]:
        argv = ["gnutls-serv", "--echo", "-q", "-a", "-p", str(port),
                "--x509certfile", self.cert, "--x509keyfile", self.key]
        if self.priority:
            argv.append(f"--priority={self.priority}")
        return argv


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
