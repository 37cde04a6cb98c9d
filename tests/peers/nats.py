"""Real nats-server processes with JetStream on loopback, for the exporter's tests.

NatsServer: one node (its own store dir; start, stop, restart on the same port and store).
NatsCluster: three nodes routed to each other (a JetStream cluster). Both are context managers
that stop every process they started. Readiness is the server's own "Server is ready" log line
(and, for a cluster, a JetStream meta leader: stream creation is retried until one answers).
The nats-py helpers run their own short asyncio loop: the tests call them from plain code.
"""
from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import subprocess
import time
from pathlib import Path

from ._common import free_port, stop_process, tail, wait_for

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
HOST = "127.0.0.1"


class NatsServer:
    def __init__(self, workdir: Path, name: str = "export-n1", port: int | None = None,
                 cluster_port: int | None = None, routes: tuple[int, ...] = (), cluster: str | None = None):
        self.dir = Path(workdir) / name
        self.store = self.dir / "store"
        self.log = self.dir / "log"
        self.name = name
        self.port = port or free_port()
        self.cluster_port = cluster_port
        self.routes = routes
        self.cluster = cluster
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def argv(self) -> list[str]:
        a = [NATS_SERVER, "-js", "-sd", str(self.store), "-a", HOST, "-p", str(self.port), "-n", self.name,
             "-l", str(self.log)]
        if self.cluster_port:
            a += ["--cluster_name", self.cluster, "--cluster", f"nats://{HOST}:{self.cluster_port}",
                  "--routes", ",".join(f"nats://{HOST}:{p}" for p in self.routes)]
        return a

    def start(self, timeout: float = 15) -> "NatsServer":
        self.dir.mkdir(parents=True, exist_ok=True)
        start = self.log.stat().st_size if self.log.exists() else 0
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited: {tail(self.log)}")
            return self.log.exists() and b"Server is ready" in self.log.read_bytes()[start:]
        wait_for(ready, timeout, f"nats-server {self.name} ready")
        return self

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None:
            stop_process(self.proc, sig)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class NatsCluster:
    """Three JetStream nodes on free loopback ports, routed to one another."""

    def __init__(self, workdir: Path, n: int = 3, name: str = "export-c"):
        cports = [free_port() for _ in range(n)]
        self.nodes = [NatsServer(workdir, f"{name}{i + 1}", cluster_port=cports[i],
                                 routes=tuple(p for j, p in enumerate(cports) if j != i), cluster=name)
                      for i in range(n)]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def __enter__(self):
        with contextlib.ExitStack() as stack:
            for n in self.nodes:
                stack.enter_context(n)
            stack.pop_all()
        return self

    def __exit__(self, *exc):
        for n in self.nodes:
            n.stop()


# ---- JetStream through nats-py ----------------------------------------------------------------

def _run(coro_fn, urls, timeout: float):
    async def main():
        import nats
        nc = await nats.connect(list(urls), connect_timeout=2, max_reconnect_attempts=3,
                                error_cb=_quiet)
        try:
            return await coro_fn(nc.jetstream(timeout=timeout))
        finally:
            await nc.close()
    return asyncio.run(main())


async def _quiet(_e):
    pass


async def _asked_until(deadline: float, ask, errors=Exception):
    """await ask() until it answers, again every 0.2 s on `errors` (a JetStream leader not
    elected yet, or changing) until the monotonic `deadline`, then its error."""
    while True:
        try:
            return await ask()
        except errors:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def add_stream(urls, name: str, subjects: list[str], replicas: int = 1, duplicate_window: float = 120,
               timeout: float = 30) -> None:
    """Create a file-backed stream, retried until the JetStream (meta) leader answers."""
    from nats.js.api import StreamConfig, StorageType

    async def go(js):
        cfg = StreamConfig(name=name, subjects=subjects, num_replicas=replicas,
                           duplicate_window=duplicate_window, storage=StorageType.FILE)
        return await _asked_until(time.monotonic() + timeout, lambda: js.add_stream(cfg))
    _run(go, urls, 5)


def stream_messages(urls, name: str, timeout: float = 30) -> list[tuple[str | None, bytes]]:
    """Every message of the stream, in order: (its Nats-Msg-Id header, its data)."""
    from nats.js.errors import ServiceUnavailableError

    async def go(js):
        deadline = time.monotonic() + timeout
        info = await _asked_until(deadline, lambda: js.stream_info(name))    # no leader yet after a restart
        out = []
        if not info.state.messages:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            # a leader change under way answers 503: asked again
            m = await _asked_until(deadline, lambda: js.get_msg(name, seq), ServiceUnavailableError)
            out.append(((m.headers or {}).get("Nats-Msg-Id"), m.data))
        return out
    return _run(go, urls, 5)


# ---- the exporter's throughput (not a test: `python -m tests.peers.nats N [BODIES]`) -----------

def bench_export(n: int, bodies: int = 0) -> None:
    """n HTTP/1.1 exchanges (about 1 KB of JSON each) decoded by HttpView, then: (1) the
    publisher alone, draining a queue holding all of them; (2) ExportSink fed as fast as this
    thread can (serialize + queue in the caller, the publisher in its thread, as in the decoder
    process). Prints events/s and CPU per 1000 events; nats-server runs on this host too."""
    import socket
    import tempfile

    from tlstap.abi import Direction
    from tlstap.decode.httpview import HttpView
    from tlstap.events import Conn, TlsData
    from tlstap.export.nats import Publisher, parse_url
    from tlstap.export.queue import ExportQueue
    from tlstap.sinks.export import ExportSink

    conn = Conn.from_raw(socket.AF_INET, 443, 5555, socket.inet_aton(HOST), socket.inet_aton(HOST))

    class Collect:
        out = None

        def __init__(self):
            self.exchanges = []

        def on_exchange(self, meta, ex):
            self.exchanges.append((meta, ex))

        def on_data(self, d):
            pass

        def on_note(self, meta, n):
            pass

        def close(self):
            pass

    col = Collect()
    view = HttpView(col, lag_ns=0)
    for i in range(n):
        ssl = 0x100 + i % 16
        view.on_data(TlsData(2 * i, 10, 10, 0, "srv", 3, Direction.READ, conn, ssl,
                             b"GET /api/v1/items/%d HTTP/1.1\r\nHost: api.test\r\nUser-Agent: bench\r\n"
                             b"Accept: */*\r\n\r\n" % i, 0, conn_id=1))
        body = b'{"id": %d, "name": "item"}' % i + b" " * 200
        view.on_data(TlsData(2 * i + 1, 10, 10, 0, "srv", 3, Direction.WRITE, conn, ssl,
                             b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body), 0, conn_id=1))
    view.close()
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="export-bench-") as d, NatsServer(Path(d), name="export-bench") as s:
        add_stream([s.url], "BENCH", ["bench.>"])
        target = parse_url(f"{s.url}/bench.http")
        # (1) the publisher alone
        sink = ExportSink(target, bodies, 1 << 30, 0, None, lines.append, "bench-1")
        q = ExportQueue(1 << 30, 0)
        for meta, ex in col.exchanges:
            q.put(*sink.exchange_message(meta, ex))
        sink.close()                      # only its serialization was borrowed
        pub = Publisher(target, q, lines.append)
        t0 = time.monotonic()
        pub.start()
        wait_for(lambda: pub.acked >= n, 300, "every ack")
        wall, cpu = time.monotonic() - t0, pub.cpu_s()
        pub.stop(5)
        print(f"publisher alone: {n} events in {wall:.2f}s = {n / wall:,.0f} events/s; "
              f"its thread's CPU {cpu:.2f}s = {cpu * 1e6 / n:.1f} ms per 1000 events")
        # (2) the sink, fed from this thread
        sink = ExportSink(target, bodies, 1 << 30, 0, None, lines.append, "bench-2")
        t0, c0 = time.monotonic(), time.thread_time()
        for meta, ex in col.exchanges:
            sink.on_exchange(meta, ex)
        c1 = time.thread_time()
        wait_for(lambda: sink.stats()["acked"] >= n, 300, "every ack")
        wall = time.monotonic() - t0
        sink.close()
        print(f"sink: serialize + queue {(c1 - c0) * 1e6 / n:.1f} us per event in the caller; all {n} acknowledged "
              f"after {wall:.2f}s = {n / wall:,.0f} events/s")
        print(lines[-1])


if __name__ == "__main__":
    import sys
    bench_export(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000, int(sys.argv[2]) if len(sys.argv) > 2 else 0)
