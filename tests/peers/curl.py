"""curl (dynamically linked libcurl + libssl.so.3) as an HTTPS client.

keylog=True sets SSLKEYLOGFILE for the curl process: libcurl's OpenSSL backend then installs
SSL_CTX_set_keylog_callback and appends every line OpenSSL hands it; CurlResult.keylog has them.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ._common import Addr, ClientProcess, tail, wait_for
from .keylog import read_keylog

WRITE_OUT = "%{local_ip} %{local_port} %{remote_ip} %{remote_port} %{http_code} %{http_version}"


@dataclass
class CurlResult:
    pid: int
    body: bytes          # response body as curl wrote it (-o file)
    local: Addr          # curl's local_ip/local_port (IPv6 without brackets, e.g. '::1')
    remote: Addr
    status: int
    http_version: str    # '1.1', '2', ...
    returncode: int
    stderr: str
    keylog: list[str] = field(default_factory=list)   # SSLKEYLOGFILE lines (keylog=True)


class CurlClient(ClientProcess):
    """curl process started idle: it blocks reading an (empty) config from stdin (`-K -`)
    until go(). libssl is already mapped then (it is a DT_NEEDED library of libcurl), so a
    tracer can attach to .pid before any TLS happens."""

    def __init__(self, url: str, extra_args=(), timeout: float = 30, data: bytes | None = None,
                 http: str | None = "1.1", keylog: bool = False):
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="curl-")
        d = Path(self._tmp.name)
        self._body, self._err = d / "body", d / "stderr"
        self.keylog_path = d / "keylog.txt" if keylog else None
        # never inherit a key log file from the test environment
        env = {k: v for k, v in os.environ.items() if k != "SSLKEYLOGFILE"}
        if keylog:
            env["SSLKEYLOGFILE"] = str(self.keylog_path)
        argv = ["curl", "-K", "-", "-sS", "-k", "--max-time", str(timeout), "-o", str(self._body),
                "-w", WRITE_OUT]
        if http:
            argv.append({"1.1": "--http1.1", "2": "--http2", "1.0": "--http1.0"}[http])
        if data is not None:
            (d / "data").write_bytes(data)
            argv += ["--data-binary", f"@{d / 'data'}", "-H", "Content-Type: application/octet-stream"]
        argv += [*extra_args, url]
        with open(self._err, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         env=env)
        self.pid = self.proc.pid
        # "ready" = the dynamic loader has mapped libssl (curl then blocks reading stdin), so a
        # pid-filtered tracer started after __init__ sees the whole TLS session
        try:
            wait_for(lambda: self.proc.poll() is not None or _maps_libssl(self.pid), 10, "curl to load libssl")
        except TimeoutError:
            self.close()
            raise

    def go(self) -> "CurlClient":
        self.proc.stdin.close()  # EOF ends the config; curl proceeds with the request
        return self

    def wait(self) -> CurlResult:
        if not self.proc.stdin.closed:
            self.go()
        try:
            self.proc.wait(self.timeout + 10)  # -w output is tiny: it fits in the pipe
            out = self.proc.stdout.read()
        except subprocess.TimeoutExpired:
            self.close()
            raise TimeoutError(f"curl pid {self.pid} did not finish")
        try:
            f = out.decode().split()
            if self.proc.returncode != 0 or len(f) < 6:
                raise RuntimeError(f"curl rc={self.proc.returncode} out={out!r}\n{tail(self._err)}")
            return CurlResult(self.pid, self._body.read_bytes() if self._body.exists() else b"",
                              (f[0], int(f[1])), (f[2], int(f[3])), int(f[4]), f[5],
                              self.proc.returncode, tail(self._err),
                              read_keylog(self.keylog_path) if self.keylog_path else [])
        finally:
            self.close()



def run_curl(url: str, extra_args=(), timeout: float = 30, data: bytes | None = None,
             http: str | None = "1.1", keylog: bool = False) -> CurlResult:
    """GET url (or POST `data` via --data-binary @file). Always -k; --http1.1 unless http=None/'2'.
    TLS options go in extra_args (e.g. ["--tls-max", "1.2", "--ciphers", "ECDHE-RSA-AES128-GCM-SHA256"],
    ["--tls13-ciphers", "TLS_CHACHA20_POLY1305_SHA256"]); keylog=True fills CurlResult.keylog."""
    return CurlClient(url, extra_args, timeout, data, http, keylog).go().wait()


def run_curl_post(url: str, body: bytes, extra_args=(), timeout: float = 30,
                  http: str | None = "1.1", keylog: bool = False) -> CurlResult:
    return run_curl(url, extra_args, timeout, data=body, http=http, keylog=keylog)


def _maps_libssl(pid: int) -> bool:
    try:
        return "/libssl.so" in open(f"/proc/{pid}/maps").read()
    except OSError:
        return False
