"""One JSON object per line; the schema is documented in the README ("JSON output")."""
from __future__ import annotations

import base64
import json

from ..events import Lost, TlsData
from . import direct
from .base import Sink

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _endpoint(e):
    return {"ip": e.ip, "port": e.port}


def data_record(ev: TlsData) -> dict:
    c = ev.conn
    try:
        data, enc = ev.data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        data, enc = base64.b64encode(ev.data).decode(), "base64"
    return {
        "type": "data",
        "ts_ns": ev.ts_ns,
        "pid": ev.pid, "tid": ev.tid, "uid": ev.uid, "comm": ev.comm, "fd": ev.fd,
        "dir": ev.direction.name.lower(),
        "family": {2: "ipv4", 10: "ipv6"}.get(c.family) if c else None,
        "local": _endpoint(c.local) if c else None,
        "remote": _endpoint(c.remote) if c else None,
        "ssl": f"{ev.ssl:#x}",
        "len": len(ev.data), "total": ev.total, "truncated": ev.truncated, "lost": ev.lost,
        "encoding": enc, "data": data,
    }


class JsonSink(Sink):
    def __init__(self, out):
        super().__init__(direct.wrap(out))

    def on_data(self, ev: TlsData) -> None:
        self.out.write(_dumps(data_record(ev)).encode() + b"\n")

    def on_lost(self, ev: Lost) -> None:
        self.out.write(_dumps({"type": "lost", "records": ev.records, "bytes": ev.bytes}).encode() + b"\n")

    def on_summary(self, counters: dict[str, int], line: str) -> None:
        c = counters
        self.out.write(_dumps({
            "type": "summary", "calls": c["calls"], "records": c["records"], "bytes": c["bytes"],
            "truncated_calls": c["trunc_calls"], "truncated_bytes": c["trunc_bytes"],
            "lost_records": c["lost_records"], "lost_bytes": c["lost_bytes"]}).encode() + b"\n")
