"""The export sink: HTTP exchanges, raw records and gaps as `--format json` objects (built by
jsonl.py's functions, plus "msg_id") on a NATS JetStream subject.

It runs in the decoder process. Its on_* methods only serialize and queue (export/queue.py);
a publisher thread (export/nats.py) sends. Frames, notes and the summary are not exported;
key log lines and pcapng never reach this sink. The events come here already redacted
(headers, query: decode/redact.py); the body policy is this sink's: `bodies` bytes of each
body and raw record (0: none, body_len and len stay).

The message id, sent as Nats-Msg-Id (JetStream drops a retry it already holds), is
host:boot_id:pid:capture_id:ssl:conn:seq, seq counting the connection's exported objects:
unique across hosts, reboots, captures and connections, and the same for every retry.
"""
from __future__ import annotations

import collections
import socket
from typing import Callable

from ..events import Lost, TlsData
from ..export.nats import Publisher, Target
from ..export.queue import SHUTDOWN, ExportQueue
from .jsonl import data_record, dumps, exchange_record, lost_record

#: how long close() keeps sending what is queued
CLOSE_TIMEOUT_S = 10.0
#: connections whose sequence counters are kept; a connection seen again after being pushed
#: out starts at the number of objects exported so far, above any id already used
MAX_SEQ_CONNS = 65536


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "noboot"


class ExportSink:
    out = None      # no local file (HttpView and the tee look for it)

    def __init__(self, target: Target, bodies: int, queue_max: int, spool_max: int,
                 spool_dir: str | None, status: Callable[[str], None], capture_id: str):
        self.target = target
        self.bodies = bodies
        self.status = status
        self.events = 0
        self._prefix = f"{socket.gethostname()}:{_boot_id()}:"
        self._capture = capture_id
        self._seq: collections.OrderedDict[tuple, int] = collections.OrderedDict()
        self._evicted = False
        self._told_drop = False
        self.queue = ExportQueue(queue_max, spool_max, spool_dir)
        self.publisher = Publisher(target, self.queue, status)
        self.publisher.start()

    def _id(self, pid: int, ssl: int, conn_id: int) -> bytes:
        key = (pid, ssl, conn_id)
        seq = self._seq.get(key)
        if seq is None:
            seq = self.events if self._evicted else 0
            if len(self._seq) >= MAX_SEQ_CONNS:
                self._seq.popitem(last=False)
                self._evicted = True
        else:
            self._seq.move_to_end(key)
        self._seq[key] = seq + 1
        return f"{self._prefix}{pid}:{self._capture}:{ssl:x}:{conn_id}:{seq}".encode()

    def _message(self, msg_id: bytes, rec: dict) -> tuple[bytes, bytes]:
        rec["msg_id"] = msg_id.decode()
        return msg_id, dumps(rec).encode()

    def exchange_message(self, meta, ex) -> tuple[bytes, bytes]:
        """(msg_id, JSON) for an exchange, as it is queued (the bench borrows it)."""
        rec = exchange_record(meta, ex, headers_only=not self.bodies, limit=self.bodies)
        return self._message(self._id(meta.pid, meta.ssl, meta.conn_id), rec)

    def _send(self, msg: tuple[bytes, bytes]) -> None:
        self.events += 1
        if not self.queue.put(*msg):
            if not self._told_drop:
                self._told_drop = True
                full = self.queue.spool_error or "memory and spool full"
                self.status(f"export: cannot queue more ({full}): dropping events for {self.target.url}, "
                            f"counted; raise --export-queue or --export-spool")
            return
        self.publisher.wake()

    # ---- the sink protocol ---------------------------------------------------------------

    def on_data(self, ev: TlsData) -> None:
        self._send(self._message(self._id(ev.pid, ev.ssl, ev.conn_id), data_record(ev, self.bodies)))

    def on_lost(self, ev: Lost) -> None:
        self._send(self._message(self._id(0, 0, 0), lost_record(ev)))

    def on_exchange(self, meta, ex) -> None:
        self._send(self.exchange_message(meta, ex))

    def on_frame(self, meta, f) -> None:
        pass

    def on_note(self, meta, n) -> None:
        pass

    def on_summary(self, counters: dict, line: str) -> None:
        pass

    def flush(self) -> None:
        self.publisher.wake()

    def stats(self) -> dict:
        q, p = self.queue, self.publisher
        dropped = dict(q.dropped)
        for k, v in p.dropped.items():
            dropped[k] = dropped.get(k, 0) + v
        return {"published": p.published, "acked": p.acked, "duplicates": p.duplicates,
                "queued_bytes_memory": q.mem_bytes, "queued_bytes_disk": q.disk_bytes,
                "dropped": dropped, "cpu_s": p.cpu_s(), "events": self.events}

    def close(self) -> None:
        self.publisher.stop(CLOSE_TIMEOUT_S)
        self.queue.drop_all(SHUTDOWN)
        self.queue.close()
        s = self.stats()
        n, cpu = s["events"], s["cpu_s"]
        dropped = s["dropped"]
        reasons = ", ".join(f"{k} {v}" for k, v in dropped.items() if v)
        per1000 = cpu * 1e6 / n if n else 0.0
        self.status(f"export: {n} events to {self.target.url}: {s['acked']} acknowledged "
                    f"({s['duplicates']} duplicates ignored); {sum(dropped.values())} dropped "
                    f"({reasons or 'none'}); exporter CPU {cpu:.2f}s ({per1000:.2f} ms per 1000 events)")
