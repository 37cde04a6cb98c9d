"""One JSON object per line; the schema is documented in the README ("JSON output")."""
from __future__ import annotations

import base64
import json

from ..events import Lost, TlsData
from . import direct
from .base import Sink

#: one record as JSON text (the exporter sends the same text)
dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _endpoint(e):
    return {"ip": e.ip, "port": e.port}


def data_record(ev: TlsData, limit: int | None = None) -> dict:
    """limit (the exporter's): the first `limit` bytes in `data` (0: no encoding and data)."""
    c = ev.conn
    rec = {
        "type": "data",
        "ts_ns": ev.ts_ns,
        "pid": ev.pid, "tid": ev.tid, "uid": ev.uid, "comm": ev.comm, "fd": ev.fd,
        "dir": ev.direction.name.lower(),
        "family": {2: "ipv4", 10: "ipv6"}.get(c.family) if c else None,
        "local": _endpoint(c.local) if c else None,
        "remote": _endpoint(c.remote) if c else None,
        "ssl": f"{ev.ssl:#x}", "conn": ev.conn_id,
        "len": len(ev.data), "total": ev.total, "truncated": ev.truncated, "lost": ev.lost,
    }
    if limit != 0:
        b = ev.data if limit is None else ev.data[:limit]
        try:
            rec["encoding"], rec["data"] = "utf-8", b.decode("utf-8")
        except UnicodeDecodeError:
            rec["encoding"], rec["data"] = "base64", base64.b64encode(b).decode()
    return rec


# ---- decoded HTTP records -------------------------------------------------------------

def _bytes(b: bytes) -> dict:
    try:
        return {"encoding": "utf-8", "data": b.decode("utf-8")}
    except UnicodeDecodeError:
        return {"encoding": "base64", "data": base64.b64encode(b).decode()}


def message_record(m, headers_only: bool = False, limit: int | None = None) -> dict | None:
    """limit (the exporter's): bodies cut to their first `limit` bytes (body_truncated says so)."""
    if m is None:
        return None
    cut = limit is not None and not headers_only and len(m.body) > limit
    r = {"method": m.method, "target": m.target, "authority": m.authority, "scheme": m.scheme,
         "status": m.status, "reason": m.reason, "headers": [list(h) for h in m.headers],
         "trailers": [list(h) for h in m.trailers], "body_len": m.body_len,
         "body_truncated": m.body_truncated or cut, "complete": m.complete,
         "ts_start_ns": m.ts_start_ns, "ts_end_ns": m.ts_end_ns}
    if not headers_only:
        r["body"] = _bytes(m.body[:limit])        # as on the wire (transfer coding removed)
        if m.decoded_body is not None:
            r["decoded_body"] = _bytes(m.decoded_body[:limit])
    if m.decode_error:
        r["decode_error"] = m.decode_error
    if m.grpc:
        r["grpc"] = [{"compressed": g.compressed, "len": len(g.data)} for g in m.grpc]
    return r


def exchange_record(meta, ex, headers_only: bool = False, limit: int | None = None) -> dict:
    m = ex.request or ex.response
    return {"type": "http", "ts_ns": m.ts_start_ns, **_meta(meta), "proto": m.proto, "stream": m.stream_id,
            "latency_ns": ex.latency_ns,
            "request": message_record(ex.request, headers_only, limit),
            "response": message_record(ex.response, headers_only, limit)}


def lost_record(ev: Lost) -> dict:
    return {"type": "lost", "records": ev.records, "bytes": ev.bytes, "why": ev.why}


def _meta(meta) -> dict:
    c = meta.conn
    return {"pid": meta.pid, "tid": meta.tid, "uid": meta.uid, "comm": meta.comm, "fd": meta.fd,
            "local": _endpoint(c.local) if c else None, "remote": _endpoint(c.remote) if c else None,
            "ssl": f"{meta.ssl:#x}", "conn": meta.conn_id, "role": meta.side.value if meta.side else None}




class JsonSink(Sink):
    headers_only = False   # --headers-only: HTTP messages without bodies

    def __init__(self, out):
        super().__init__(direct.wrap(out))

    def on_data(self, ev: TlsData) -> None:
        self.out.write(dumps(data_record(ev)).encode() + b"\n")

    def on_lost(self, ev: Lost) -> None:
        self.out.write(dumps(lost_record(ev)).encode() + b"\n")

    def on_summary(self, counters: dict[str, int], line: str) -> None:
        c = counters
        self.out.write(dumps({
            "type": "summary", "calls": c["calls"], "records": c["records"], "bytes": c["bytes"],
            "truncated_calls": c["trunc_calls"], "truncated_bytes": c["trunc_bytes"],
            "lost_records": c["lost_records"], "lost_bytes": c["lost_bytes"],
            "backlog_dropped_records": c.get("backlog_dropped_records", 0),
            **({"wire": c["wire"]} if "wire" in c else {})}).encode() + b"\n")

    # ---- decoded HTTP (httpview.HttpView calls these) --------------------------------------

    def on_exchange(self, meta, ex) -> None:
        self.out.write(dumps(exchange_record(meta, ex, self.headers_only)).encode() + b"\n")


    def on_frame(self, meta, f) -> None:
        rec = {"type": "frame", "ts_ns": f.ts_ns, **_meta(meta), "proto": f.proto, "side": f.side.value,
               "frame": f.type, "stream": f.stream_id, "flags": list(f.flags), "info": dict(f.info)}
        if f.payload and not self.headers_only:
            rec["payload"] = _bytes(f.payload)
        self.out.write(dumps(rec).encode() + b"\n")


    def on_note(self, meta, n) -> None:
        rec = {"type": "note", "ts_ns": n.ts_ns, **(_meta(meta) if meta else {}), "text": n.text}
        self.out.write(dumps(rec).encode() + b"\n")
