"""The /metrics endpoint (--metrics-addr HOST:PORT), served by the capture process.

MetricsOutput is a runner.Output: prepare() binds the port, so a busy or foreign address
refuses the command before any output file is touched; commit() starts serving in a daemon
thread; finish() stops it and removes the snapshot directory. A scrape is the health numbers
read then (health.py) followed by the decoder's latest traffic snapshot (traffic.py), in the
text exposition format (0.0.4).

prepare_multiprocess() makes that directory, and must run before the decoder is forked (the
decoder finds it in its environment): the capture command calls it first.
"""
from __future__ import annotations

import atexit
import errno
import ipaddress
import os
import shutil
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ..errors import EnvironmentProblem, TlstapError, UsageError
from . import DIR_ENV, TRAFFIC_FILE

DIR_PREFIX = "tlstap-metrics-"
FLAG = "--metrics-addr"
EXAMPLES = "e.g. 127.0.0.1:9464, [::1]:9464, or :9464 for every address"


def parse_addr(addr: str) -> tuple[str, int]:
    """"HOST:PORT", "[IPv6]:PORT" or ":PORT" (every address: host "") -> (host, port)."""
    host, sep, port = addr.rpartition(":")
    if not sep:
        raise UsageError(f"{FLAG} {addr}: not HOST:PORT ({EXAMPLES})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise UsageError(f"{FLAG} {addr}: {host!r} in brackets is not an IPv6 address") from None
    elif ":" in host or "[" in host or "]" in host:
        raise UsageError(f"{FLAG} {addr}: an IPv6 address goes in brackets ({EXAMPLES})")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"{FLAG} {addr}: the port must be a number from 1 to 65535")
    return host, int(port)


def _holder(port: int) -> str:
    """' (by NAME, pid N)' for the process listening on TCP `port`, when /proc tells; else ''."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    p = line.split()
                    if p[3] == "0A" and int(p[1].rpartition(":")[2], 16) == port:     # LISTEN
                        inodes.add(f"socket:[{p[9]}]")
        except (OSError, IndexError, ValueError):
            continue
    if not inodes:
        return ""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            for fd in fds:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    with open(f"/proc/{pid}/comm") as f:
                        return f" (by {f.read().strip()}, pid {pid})"
        except OSError:
            continue
    return ""


def _bind(addr: str) -> socket.socket:
    """A listening socket on addr, or the one-line reason why not."""
    host, port = parse_addr(addr)
    if host:
        try:
            family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
        except socket.gaierror as e:
            raise UsageError(f"{FLAG} {addr}: cannot resolve {host}: {e.strerror}") from None
        candidates = [(family, sockaddr)]
    else:          # every address: IPv6 and IPv4 on one socket, or IPv4 alone without IPv6
        candidates = [(socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))]
    for i, (family, sockaddr) in enumerate(candidates):
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # a restart within TIME_WAIT
            if family == socket.AF_INET6 and not host:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.set_inheritable(False)
            s.bind(sockaddr)
            s.listen(16)
            return s
        except OSError as e:
            s.close()
            if i + 1 < len(candidates) and e.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                continue
            raise _bind_error(addr, port, e) from None
    raise AssertionError("unreachable")


def _bind_error(addr: str, port: int, e: OSError) -> TlstapError:
    if e.errno == errno.EADDRINUSE:
        return EnvironmentProblem(f"{FLAG} {addr}: the port is in use{_holder(port)}")
    if e.errno == errno.EADDRNOTAVAIL:
        return UsageError(f"{FLAG} {addr}: not an address of this host")
    if e.errno == errno.EACCES:
        return EnvironmentProblem(f"{FLAG} {addr}: binding port {port} is not permitted "
                                  f"(ports below 1024 need CAP_NET_BIND_SERVICE)")
    return EnvironmentProblem(f"{FLAG} {addr}: cannot listen: {e.strerror}")


def check_addr(addr: str) -> str:
    """Can the metrics port be bound? A one-line description, or the error (tlstap doctor)."""
    s = _bind(addr)
    try:
        return f"{_url(s)} can be served (the address is free)"
    finally:
        s.close()


def _url(s: socket.socket) -> str:
    host, port = s.getsockname()[:2]
    return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"


# ---- the snapshot directory ---------------------------------------------------------------------

def prepare_multiprocess() -> str:
    """A private (0700) directory for the decoder's snapshots, named in $TLSTAP_METRICS_DIR for
    the decoder this process forks, removed at exit (finish() removes it sooner). Those a killed
    tlstap left behind are removed here. (The name is of the first design: prometheus_client's
    multiprocess mode, traffic.py says why not.)"""
    _remove_stale()
    d = tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-")
    os.environ[DIR_ENV] = d
    atexit.register(remove_snapshot_dir, d, os.getpid())
    return d


def remove_snapshot_dir(d: str, owner: int | None = None) -> None:
    """Remove the directory (only in the process that made it: never from a forked child)."""
    if owner is None or owner == os.getpid():
        shutil.rmtree(d, ignore_errors=True)


def _remove_stale() -> None:
    tmp = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(tmp) if n.startswith(DIR_PREFIX)]
    except OSError:
        return
    for n in names:
        pid = n[len(DIR_PREFIX):].partition("-")[0]
        path = os.path.join(tmp, n)
        try:
            mine = os.lstat(path).st_uid == os.geteuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(path, ignore_errors=True)


# ---- serving ------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    scrape = None             # set per server (MetricsOutput): () -> the exposition
    timeout = 10              # a client that stalls does not hold its thread for ever

    def do_GET(self) -> None:
        from prometheus_client.exposition import CONTENT_TYPE_LATEST
        path = self.path.split("?", 1)[0]
        if path != "/metrics":
            body, status, ctype = b"tlstap: metrics are at /metrics\n", 404 if path != "/" else 200, "text/plain"
        else:
            try:
                body, status, ctype = self.scrape(), 200, CONTENT_TYPE_LATEST
            except Exception as e:          # noqa: BLE001 - the scraper gets the reason, tlstap goes on
                body, status, ctype = f"tlstap: collecting failed: {e}\n".encode(), 500, "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass                  # no line per scrape on tlstap's stderr


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class MetricsOutput:
    """runner.Output serving /metrics from the capture process."""

    poll_s = 1.0              # nothing to pump: it never needs the loop sooner

    def __init__(self, addr: str, sources: list, text_output, status):
        parse_addr(addr)
        self.addr = addr
        self.sources = sources
        self.text_output = text_output
        self._status = status
        self.dir = os.environ.get(DIR_ENV)
        if not self.dir:
            raise RuntimeError("MetricsOutput needs prepare_multiprocess() first")
        self._sock: socket.socket | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._last_sample = 0.0
        self.health = None
        self.url = ""
        self.scrapes = 0
        self.scrape_cpu_s = 0.0         # this process's CPU spent answering them

    def prepare(self) -> None:
        from prometheus_client import CollectorRegistry
        from .health import HealthCollector
        self._sock = _bind(self.addr)
        self.url = _url(self._sock)
        self.health = HealthCollector(self.sources, self.text_output, self.dir)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.health)
        handler = type("Handler", (_Handler,), {"scrape": staticmethod(lambda: self._scrape(registry))})
        server = _Server(self._sock.getsockname()[:2], handler, bind_and_activate=False)
        server.socket.close()
        server.socket = self._sock        # ours, bound and listening already
        self._server = server

    def _scrape(self, registry) -> bytes:
        """Health, then the traffic snapshot (none until the decoder has written one)."""
        from prometheus_client import generate_latest
        t0 = time.thread_time()
        try:
            with open(os.path.join(self.dir, TRAFFIC_FILE), "rb") as f:
                traffic = f.read()
        except FileNotFoundError:
            traffic = b""
        body = generate_latest(registry) + traffic
        self.scrapes += 1
        self.scrape_cpu_s += time.thread_time() - t0
        return body

    def commit(self) -> None:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="tlstap-metrics", daemon=True)
        self._thread.start()

    def discard(self) -> None:
        self._stop()
        self._remove_dir()

    def attached(self) -> list[str]:
        return [f"metrics on {self.url}"]

    def describe(self) -> str:
        return f"; metrics on {self.url}"

    def pump(self) -> int:
        return 0

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last_sample >= 1.0:
            self._last_sample = now
            self.health.sample()

    def report(self) -> None:
        pass

    def drain(self) -> None:
        pass

    def finish(self, why: str, stop: list) -> str:
        self._stop()
        self._remove_dir()
        cost = f" ({self.scrape_cpu_s / self.scrapes * 1000:.1f} ms of CPU each)" if self.scrapes else ""
        return f"metrics: served {self.scrapes} scrapes on {self.url}{cost}"

    def _remove_dir(self) -> None:
        """The decoder writes into the directory until it exits (TextOutput.finish waits for that,
        and sets its spool to None); if it still runs, the directory goes at this process's exit
        (prepare_multiprocess registered that), and the decoder stops writing once it is gone."""
        if getattr(self.text_output, "spool", None) is None:
            remove_snapshot_dir(self.dir)

    def _stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        if self._server is not None:
            self._server.server_close()
            self._server = None
        elif self._sock is not None:
            self._sock.close()
        self._sock = None
