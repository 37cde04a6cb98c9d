"""nginx (system build, dynamically linked to libssl.so.3) serving static files over TLS."""
from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from pathlib import Path

from tlstap.commands import nginx

from ._common import TCP_LISTEN, child_pids, free_port, stop_process, tail, tcp_sockets, wait_for

# One line per request; remote/server port let tests tie a request to a client connection.
LOG_FIELDS = ("remote_addr", "remote_port", "server_addr", "server_port", "connection",
              "connection_requests", "status", "bytes_sent", "request_length", "request")
LOG_FORMAT = " ".join(f"${f}" for f in LOG_FIELDS[:-1]) + ' "$request"'

class NginxServer:
    """Private nginx instance: `with NginxServer(cert, key, {"a.txt": b"..."}) as n: n.url("a.txt")`."""

    def __init__(self, cert, key, files: dict[str, bytes], http2: bool = False, ipv6: bool = False,
                 gzip: bool = False, protocols: str = "TLSv1.2 TLSv1.3", start_timeout: float = 15):
        self.cert, self.key, self.files = Path(cert).resolve(), Path(key).resolve(), files
        self.http2, self.ipv6, self.gzip, self.protocols = http2, ipv6, gzip, protocols
        self.start_timeout = start_timeout
        self.proc = self.port = self.master_pid = None

    def _config(self, d: Path, port: int) -> str:
        opt = " http2" if self.http2 else ""  # nginx 1.22 syntax: http2 is a listen parameter
        listen = f"listen 127.0.0.1:{port} ssl{opt};"
        if self.ipv6:
            listen += f"\n        listen [::1]:{port} ssl{opt};"
        gzip = "gzip on; gzip_min_length 1; gzip_types *;" if self.gzip else "gzip off;"
        # as root, nginx would switch workers to 'nobody' (no such group on Debian) -> stay root
        user = "user root root;\n" if os.geteuid() == 0 else ""
        return nginx.conf(d, listen, self.cert, self.key, by="tests/peers/nginx.py", protocols=self.protocols,
                          error_level="info", worker_connections=256, head=user,
                          http=f"    log_format tap '{LOG_FORMAT}';\n    access_log {d}/access.log tap;\n    {gzip}\n",
                          server="        server_name localhost;\n")

    def __enter__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="nginx-")
        d = self.dir = Path(self._tmp.name)
        for sub in ("www", "tmp"):
            (d / sub).mkdir()
        for name, data in self.files.items():
            p = d / "www" / name.lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
        try:
            for attempt in range(5):  # free_port() is racy: retry on "Address already in use"
                port = free_port()
                if self.ipv6 and not _free_v6(port):
                    continue
                if self._start(d, port):
                    return self
            raise RuntimeError(f"nginx did not start\n{tail(d / 'error.log')}")
        except BaseException:
            self.__exit__(None, None, None)
            raise

    def _start(self, d: Path, port: int) -> bool:
        (d / "nginx.conf").write_text(self._config(d, port))
        with open(d / "stderr", "ab") as err:
            self.proc = subprocess.Popen(
                ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        self.master_pid = self.proc.pid
        want = 2 if self.ipv6 else 1

        def ready():
            if self.proc.poll() is not None:
                return "exited"
            # listening sockets (opened by the master) + a worker to serve them
            return len(tcp_sockets(self.master_pid, TCP_LISTEN)) >= want and self.worker_pids() and "up"

        state = wait_for(ready, self.start_timeout, "nginx to listen")
        if state == "up":
            self.port = port
            return True
        self.proc.wait(5)
        if "Address already in use" in tail(d / "error.log") + tail(d / "stderr"):
            return False
        raise RuntimeError(f"nginx exited rc={self.proc.returncode}\n{tail(d / 'stderr')}\n{tail(d / 'error.log')}")

    def worker_pids(self) -> list[int]:
        return child_pids(self.master_pid) if self.master_pid else []

    def url(self, path: str = "", ipv6: bool = False) -> str:
        host = "[::1]" if ipv6 else "127.0.0.1"
        return f"https://{host}:{self.port}/{path.lstrip('/')}"

    def access_log(self) -> list[dict]:
        """Parsed access log entries (LOG_FIELDS; ports/ints converted)."""
        out = []
        for line in (self.dir / "access.log").read_text().splitlines():
            head, _, req = line.partition(' "')
            e = dict(zip(LOG_FIELDS, head.split() + [req[:-1]]))
            for k in ("remote_port", "server_port", "connection", "connection_requests", "status",
                      "bytes_sent", "request_length"):
                e[k] = int(e[k])
            out.append(e)
        return out

    def wait_logged(self, count: int, timeout: float = 20) -> list[dict]:
        """The access log once it holds `count` requests. nginx logs a request after its response
        is sent, that is after the SSL_write calls of it have returned (so a probe on them has
        fired); a client having read the response does not say as much."""
        return wait_for(lambda: len(log := self.access_log()) >= count and log, timeout,
                        f"{count} requests in nginx's access log")

    def error_log(self) -> str:
        return tail(self.dir / "error.log", 100000)

    def __exit__(self, *exc):
        if self.proc is not None:
            workers = self.worker_pids()
            # SIGTERM = fast shutdown: does not wait for idle keep-alive connections
            stop_process(self.proc, signal.SIGTERM, timeout=10)
            for w in workers:  # normally already gone with the master; never leave one behind
                try:
                    wait_for(lambda: not _alive(w), 5, f"nginx worker {w} to exit")
                except TimeoutError:
                    try:
                        os.kill(w, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.proc = None
        self._tmp.cleanup()


def _free_v6(port: int) -> bool:
    import socket
    with socket.socket(socket.AF_INET6) as s:
        try:
            s.bind(("::1", port))
            return True
        except OSError:
            return False


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False
