"""curl (dynamically linked libcurl + libssl.so.3) as an HTTPS client."""
from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ._common import Addr, ClientProcess, tail, wait_for

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


class CurlClient(ClientProcess):
    """curl process started idle: it blocks reading an (empty) config from stdin (`-K -`)
    until go(). libssl is already mapped then (it is a DT_NEEDED library of libcurl), so a
    tracer can attach to .pid before any TLS happens."""

    def __init__(self, url: str, extra_args=(), timeout: float = 30, data: bytes | None = None,
                 http: str | None = "1.1"):
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="curl-")
        d = Path(self._tmp.name)
        self._body, self._err = d / "body", d / "stderr"
        argv = ["curl", "-K", "-", "-sS", "-k", "--max-time", str(timeout), "-o", str(self._body),
                "-w", WRITE_OUT]
        if http:
            argv.append({"1.1": "--http1.1", "2": "--http2", "1.0": "--http1.0"}[http])
        if data is not None:
            (d / "data").write_bytes(data)
            argv += ["--data-binary", f"@{d / 'data'}", "-H", "Content-Type: application/octet-stream"]
        argv += [*extra_args, url]
        with open(self._err, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
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
                              self.proc.returncode, tail(self._err))
        finally:
            self.close()



def run_curl(url: str, extra_args=(), timeout: float = 30, data: bytes | None = None,
             http: str | None = "1.1") -> CurlResult:
    """GET url (or POST `data` via --data-binary @file). Always -k; --http1.1 unless http=None/'2'."""
    return CurlClient(url, extra_args, timeout, data, http).go().wait()


def run_curl_post(url: str, body: bytes, extra_args=(), timeout: float = 30,
                  http: str | None = "1.1") -> CurlResult:
    return run_curl(url, extra_args, timeout, data=body, http=http)


def _maps_libssl(pid: int) -> bool:
    try:
        return "/libssl.so" in open(f"/proc/{pid}/maps").read()
    except OSError:
        return False
