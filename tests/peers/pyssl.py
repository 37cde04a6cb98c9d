"""Wrappers that run pyssl_peer.py as separate processes (own pid) and load their transcripts."""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ._common import HERE, ClientProcess, Transcript, read_line, stop_process, tail
from .keylog import read_keylog

SCRIPT = HERE / "pyssl_peer.py"
# The venv interpreter running the tests: its _ssl links the system libssl.so.3.
PYTHON = sys.executable


def _load(path: Path) -> list[Transcript]:
    return [Transcript.from_json(d) for d in json.loads(path.read_text())]


def _load_info(path: Path) -> list[dict]:
    """Per connection (same order as _load): version, cipher, session_reused, messages
    ([direction, handshake type] pairs, recorded only with messages=True)."""
    return [d.get("info") or {} for d in json.loads(path.read_text())]


def _tls_args(keylog_path, ciphers, messages) -> list[str]:
    argv = []
    if keylog_path:
        argv += ["--keylog", str(keylog_path)]
    if ciphers:
        argv += ["--ciphers", ciphers]
    if messages:
        argv.append("--messages")
    return argv


class PySSLServer:
    """Threaded Python-ssl server process; transcripts() (server view) is available after exit.

    Key log options: keylog=True makes the server's SSLContext write an NSS key log
    (keylog(): its lines, normalized, in file order; readable while running and after stop).
    ciphers: TLS <= 1.2 cipher list (set_ciphers); ecdh_curve: the one group the server accepts
    (e.g. "prime256v1": a client whose first key share is X25519 then gets a HelloRetryRequest);
    messages=True records each connection's handshake messages (info())."""

    def __init__(self, cert, key, host: str = "127.0.0.1", response: bytes | None = None,
                 tls_version: str | None = None, conn_timeout: float = 60, start_timeout: float = 15,
                 grace: float = 5, keylog: bool = False, ciphers: str | None = None,
                 ecdh_curve: str | None = None, messages: bool = False):
        self.cert, self.key, self.host, self.response = cert, key, host, response
        self.tls_version, self.conn_timeout, self.start_timeout = tls_version, conn_timeout, start_timeout
        self.grace = grace  # at stop: how long open connections may take to finish
        self.keylog_enabled, self.ciphers, self.ecdh_curve, self.messages = keylog, ciphers, ecdh_curve, messages
        self.port = self.pid = None
        self.proc = None
        self.keylog_path = None
        self._transcripts = None
        self._info = None
        self._keylog = None

    def __enter__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="pyssl-srv-")
        d = Path(self._tmp.name)
        self._out, self._err = d / "server.json", d / "stderr"
        argv = [PYTHON, str(SCRIPT), "server", "--host", self.host, "--cert", str(self.cert),
                "--key", str(self.key), "--out", str(self._out), "--timeout", str(self.conn_timeout),
                "--grace", str(self.grace)]
        if self.response is not None:
            (d / "response.bin").write_bytes(self.response)
            argv += ["--response", str(d / "response.bin")]
        if self.tls_version:
            argv += ["--tls-version", self.tls_version]
        if self.keylog_enabled:
            self.keylog_path = d / "keylog.txt"
        argv += _tls_args(self.keylog_path, self.ciphers, self.messages)
        if self.ecdh_curve:
            argv += ["--ecdh-curve", self.ecdh_curve]
        with open(self._err, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self.pid = self.proc.pid
        try:
            line = read_line(self.proc, self.start_timeout, bytearray())
            if not line.startswith("PORT "):
                raise RuntimeError(f"unexpected server output {line!r}")
            self.port = int(line.split()[1])
        except Exception as e:
            self.stop()
            msg = tail(self._err)
            self._tmp.cleanup()
            raise RuntimeError(f"PySSLServer failed to start: {e}\n{msg}") from e
        return self

    def stop(self):
        """Close stdin (the server's stop signal), wait for it to write transcripts, reap it."""
        if self.proc is None:
            return
        try:
            self.proc.stdin.close()
            self.proc.wait(self.grace + 10)
        except subprocess.TimeoutExpired:
            pass
        finally:
            rc = stop_process(self.proc, timeout=5)
            self.proc.stdout.close()
        if self.keylog_path is not None:
            self._keylog = read_keylog(self.keylog_path)
        if self._out.exists():
            self._transcripts = _load(self._out)
            self._info = _load_info(self._out)
        elif self.port is not None:
            raise RuntimeError(f"PySSLServer (rc={rc}) wrote no transcripts\n{tail(self._err)}")
        self.proc = None

    def __exit__(self, *exc):
        try:
            self.stop()
        finally:
            self._tmp.cleanup()

    def transcripts(self) -> list[Transcript]:
        if self._transcripts is None:
            raise RuntimeError("transcripts are available after the server has stopped")
        return self._transcripts

    def info(self) -> list[dict]:
        """Per transcript: version, cipher, session_reused, messages (after stop)."""
        if self._info is None:
            raise RuntimeError("connection info is available after the server has stopped")
        return self._info

    def keylog(self) -> list[str]:
        """The key log lines the server's libssl produced (all connections, file order)."""
        if self.keylog_path is None:
            raise RuntimeError("PySSLServer was started without keylog=True")
        if self._keylog is not None:
            return self._keylog
        return read_keylog(self.keylog_path)


class PySSLClient(ClientProcess):
    """Python-ssl client process that is started but idle until go().

    Use it to learn the pid (and let a tracer attach) before any TLS happens:
        c = PySSLClient(port, [b"x"]); start_capture(c.pid); c.go(); ts = c.wait()
    The process has libssl loaded and payloads read before it reports ready.

    Key log options: keylog=True -> keylog() gives the lines the client's libssl produced
    (normalized, file order; live while running, kept after wait()); ciphers: TLS <= 1.2 cipher
    list; resume=True: every connection after the first reuses the previous one's session (run
    sequentially; check info()[i]["session_reused"]); messages=True records handshake messages.
    After wait(), info()[i] = {version, cipher, session_reused, messages} per connection.
    """

    def __init__(self, port: int, payloads: list[bytes], host: str = "127.0.0.1", conns: int = 1,
                 threads: int = 1, expect_response_len: int | None = None, timeout: float = 30,
                 tls_version: str | None = None, requests: int = 1, keylog: bool = False,
                 ciphers: str | None = None, resume: bool = False, messages: bool = False):
        if not payloads:
            raise ValueError("need at least one payload")
        self.timeout = timeout
        self._keylog: list[str] | None = None
        self._info: list[dict] | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="pyssl-cli-")
        d = Path(self._tmp.name)
        (d / "p").mkdir()
        for i, p in enumerate(payloads):
            (d / "p" / f"{i}.bin").write_bytes(p)
        self._out, self._err = d / "client.json", d / "stderr"
        argv = [PYTHON, str(SCRIPT), "client", "--host", host, "--port", str(port),
                "--payload-dir", str(d / "p"), "--npayloads", str(len(payloads)),
                "--conns", str(conns), "--threads", str(threads), "--timeout", str(timeout),
                "--requests", str(requests), "--out", str(self._out)]
        if expect_response_len is not None:
            argv += ["--expect-len", str(expect_response_len)]
        if tls_version:
            argv += ["--tls-version", tls_version]
        self._keylog_path = d / "keylog.txt" if keylog else None
        argv += _tls_args(self._keylog_path, ciphers, messages)
        if resume:
            argv.append("--resume")
        self._spawn(argv, "PySSLClient")
        self._started = None

    def go(self) -> "PySSLClient":
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()
        self._started = time.monotonic()
        return self

    def wait(self) -> list[Transcript]:
        """Wait (bounded by timeout + margin) for the client; raise if any connection failed."""
        if self._started is None:
            self.go()
        try:
            rc = self.proc.wait(self.timeout + 10)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, timeout=5)
            msg = tail(self._err)
            self.close()
            raise TimeoutError(f"PySSL client pid {self.pid} did not finish\n{msg}")
        try:
            if self._keylog_path is not None:
                self._keylog = read_keylog(self._keylog_path)
            if not self._out.exists():
                raise RuntimeError(f"PySSL client rc={rc}, no transcripts\n{tail(self._err)}")
            ts = _load(self._out)
            self._info = _load_info(self._out)
            if rc != 0:
                errs = [t.error for t in ts if t.error]
                raise RuntimeError(f"PySSL client rc={rc}: {errs[:5]}\n{tail(self._err)}")
            return ts
        finally:
            self.close()

    def keylog(self) -> list[str]:
        if self._keylog_path is None:
            raise RuntimeError("PySSLClient was started without keylog=True")
        return self._keylog if self._keylog is not None else read_keylog(self._keylog_path)

    def info(self) -> list[dict]:
        if self._info is None:
            raise RuntimeError("connection info is available after wait()")
        return self._info


def run_pyssl_client(port: int, payloads: list[bytes], host: str = "127.0.0.1", conns: int = 1,
                     threads: int = 1, expect_response_len: int | None = None, timeout: float = 30,
                     tls_version: str | None = None) -> list[Transcript]:
    """Run the client to completion; client-side transcripts in connection order."""
    return PySSLClient(port, payloads, host, conns, threads, expect_response_len, timeout,
                       tls_version).go().wait()
