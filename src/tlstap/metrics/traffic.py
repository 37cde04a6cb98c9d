"""HTTP traffic as Prometheus metrics: a decoder-side sink (decode/pipeline.py feeds it the
HTTP view's exchanges) counting into prometheus_client metrics of its own registry, rendered
now and then into a snapshot file that the capture process serves (server.py).

Why a snapshot and not prometheus_client's multiprocess files: merging those costs the serving
process about 1 ms of CPU per label set on every scrape (0.9 s at 1000 label sets, measured),
in the capture process, holding the GIL its capture loop needs. Rendering costs about half that,
but here, at idle priority, and at most once per RENDER_MIN_S, or per RENDER_SHARE of the
decoder's time at high cardinality; a scrape then costs the capture process a file read. The
price: what Prometheus sees is up to a render interval old (tlstap_metrics_snapshot_age_seconds
says how old), and later still while the decoder lags behind a busy host.

Names and labels follow OpenTelemetry's HTTP semantic conventions as they map to Prometheus
(the names Beyla exposes too): per side of the captured process (ConnMeta.side: a server's
exchanges are http_server_*, a client's http_client_*)
    http_{server,client}_request_duration_seconds     request's first byte -> response's last
    http_{server,client}_request_body_size_bytes      body bytes as sent (after chunked, before
    http_{server,client}_response_body_size_bytes     Content-Encoding is undone: as transferred)
labelled http_request_method (the standard methods, else "_OTHER"), http_response_status_code,
http_route (route.py), process_executable_name (the captured process's comm) and with peer=True
the remote address (client_address on server metrics, server_address on client metrics).

Only a request paired with its final response is measured. Interim responses (1xx but 101)
are not exchanges yet; a request never answered (by the end of the capture, or its connection
turned undecodable) and a response whose request was not seen (a capture that joined
mid-connection) are counted in tlstap_http_exchanges_incomplete_total{side, missing}.

Labels never carry header values, query strings or bodies: the route drops the query and
templates ids. A hard cap bounds the series: each side's families accept max_series label
sets; an exchange with a new label set beyond it is measured under the one overflow series
(every label "_overflow") and counted in tlstap_metrics_series_refused_total{side}.
"""
from __future__ import annotations

import json
import os
import time

from ..decode.events import Side
from ..events import BACKLOG_FULL, RING_FULL, RING_ROOM
from ..wire.decoder import AUTH_WHY, GAP_WHY
from . import DECODER_FILE, DIR_ENV, TRAFFIC_FILE
from .route import RouteTemplater

METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"))
OTHER_METHOD = "_OTHER"
OVERFLOW = "_overflow"
#: the conventions' explicit bucket boundaries for http.*.request.duration (seconds)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
#: body sizes: the conventions give none; powers of four from 64 bytes to 16 MiB, and 0 (no body)
SIZE_BUCKETS = (0, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
LABELS = ("http_request_method", "http_response_status_code", "http_route", "process_executable_name")
PEER_LABEL = {Side.SERVER: "client_address", Side.CLIENT: "server_address"}
RENDER_MIN_S = 1.0
RENDER_SHARE = 0.1                   # the most of the decoder's time rendering may take
#: Lost.why of losses the capture process counts itself (health.py); the decoder counts the rest
_CAPTURE_SIDE_LOSSES = (RING_FULL, RING_ROOM, BACKLOG_FULL)
#: the wire decoder's counters (WireDecoder.stats keys) -> counter name, help
DECODER_COUNTERS = {
    "connections": ("tlstap_wire_connections", "TCP connections the wire source saw"),
    "connections_decrypted": ("tlstap_wire_connections_decrypted", "connections with plaintext decrypted"),
    "not_tls": ("tlstap_wire_connections_not_tls", "connections that did not speak TLS"),
    "bytes_decrypted": ("tlstap_wire_decrypted_bytes", "plaintext bytes decrypted from the wire"),
    "not_attributed": ("tlstap_wire_connections_not_attributed",
                       "decrypted connections whose owning process was not known"),
}


def write_atomically(path: str, data: bytes) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class _SideFamilies:
    """One side's three histograms, and the label sets they took (their children, cached:
    labels() validates and hashes on each call, a dict lookup does not)."""

    def __init__(self, side: Side, peer: bool, registry):
        from prometheus_client import Histogram
        s = side.value
        names = LABELS + ((PEER_LABEL[side],) if peer else ())
        kw = dict(labelnames=names, registry=registry)
        self.duration = Histogram(f"http_{s}_request_duration", f"Duration of HTTP {s} requests (first "
                                  f"request byte to last response byte)", unit="seconds",
                                  buckets=DURATION_BUCKETS, **kw)
        self.req_size = Histogram(f"http_{s}_request_body_size", f"Size of HTTP {s} request bodies",
                                  unit="bytes", buckets=SIZE_BUCKETS, **kw)
        self.resp_size = Histogram(f"http_{s}_response_body_size", f"Size of HTTP {s} response bodies",
                                   unit="bytes", buckets=SIZE_BUCKETS, **kw)
        self.children: dict[tuple, tuple] = {}
        self.overflow = (OVERFLOW,) * len(names)

    def child(self, labels: tuple) -> tuple:
        return (self.duration.labels(*labels), self.req_size.labels(*labels), self.resp_size.labels(*labels))


class TrafficMetrics:
    """The decoder-side sink. on_exchange and on_lost count, flush() and close() write the
    snapshot (into snapshot_dir, by default $TLSTAP_METRICS_DIR), the other sink calls do
    nothing. registry: where the metrics are registered (its own by default)."""

    out = None        # the sink protocol's output file: none

    def __init__(self, routes: RouteTemplater, peer: bool = False, max_series: int = 1000, registry=None,
                 snapshot_dir: str | None = None):
        from prometheus_client import CollectorRegistry, Counter, disable_created_metrics
        disable_created_metrics()   # a _created sample per series would only add to every render
        self.routes = routes
        self.peer = peer
        self.max_series = max_series
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=False)
        reg = self.registry
        self.sides = {side: _SideFamilies(side, peer, reg) for side in (Side.SERVER, Side.CLIENT)}
        self.refused = Counter("tlstap_metrics_series_refused", "Exchanges measured under the overflow "
                               "series because their family had max_series label sets", ["side"], registry=reg)
        self.incomplete = Counter("tlstap_http_exchanges_incomplete", "HTTP exchanges not measured: a "
                                  "request without its response, or a response whose request was not seen",
                                  ["side", "missing"], registry=reg)
        #: losses only the decoder sees, by reason: the capture process merges them into its
        #: tlstap_lost_* families (DECODER_FILE), which must each be one family
        self.lost = {"records": {}, "bytes": {}}
        self._counters: dict[str, object] = {}        # the decoder's, made as they first come
        self._seen: dict[str, float] = {}
        self.dir = snapshot_dir if snapshot_dir is not None else os.environ.get(DIR_ENV)
        self._dirty = True
        self._next_render = 0.0

    # ---- the sink protocol -------------------------------------------------------------------

    def on_exchange(self, meta, ex) -> None:
        req, resp = ex.request, ex.response
        if resp is not None and resp.status is not None and 100 <= resp.status < 200 and resp.status != 101:
            return                          # interim: the final response comes with the request
        side = meta.side if meta is not None else None
        if side is None:
            return                          # (HttpView always knows it for an exchange)
        if req is None or resp is None:
            self.incomplete.labels(side.value, "request" if req is None else "response").inc()
            self._dirty = True
            return
        fam = self.sides[side]
        labels = (req.method if req.method in METHODS else OTHER_METHOD, str(resp.status),
                  self.routes.route(req.target), meta.comm)
        if self.peer:
            labels += (meta.conn.remote.ip if meta.conn is not None else "",)
        child = fam.children.get(labels)
        if child is None:
            if len(fam.children) >= self.max_series:
                self.refused.labels(side.value).inc()
                labels = fam.overflow
                child = fam.children.get(labels)
            if child is None:
                child = fam.children[labels] = fam.child(labels)
        self._dirty = True
        duration, req_size, resp_size = child
        if req.ts_start_ns and resp.ts_end_ns:
            duration.observe(max(0, resp.ts_end_ns - req.ts_start_ns) / 1e9)
        req_size.observe(req.body_len)
        resp_size.observe(resp.body_len)

    def on_lost(self, ev) -> None:
        why = ev.why
        if why in _CAPTURE_SIDE_LOSSES:
            return
        reason = ("stream_gap" if why.startswith(GAP_WHY) else
                  "authentication_failed" if why.startswith(AUTH_WHY) else "other")
        for kind, n in (("records", ev.records), ("bytes", ev.bytes)):
            if n:
                self.lost[kind][reason] = self.lost[kind].get(reason, 0) + n
                self._dirty = True

    def on_data(self, ev) -> None:
        pass

    def on_frame(self, meta, f) -> None:
        pass

    def on_note(self, meta, n) -> None:
        pass

    def on_summary(self, counters, line) -> None:
        pass

    def flush(self) -> None:
        """The pipeline's periodic call: a snapshot when something changed and it is time; when
        nothing did, the snapshot's mtime says it is still current (its age is a health metric:
        a decoder that lags behind leaves it growing)."""
        now = time.monotonic()
        if self.dir is None or now < self._next_render:
            return
        if self._dirty:
            self.write_snapshot()
            return
        self._next_render = now + RENDER_MIN_S
        try:
            os.utime(os.path.join(self.dir, TRAFFIC_FILE))
        except FileNotFoundError:
            self.dir = None

    def close(self) -> None:
        if self.dir is not None and self._dirty:
            self.write_snapshot()

    def write_snapshot(self) -> None:
        """Render the registry for the capture process; the next render waits RENDER_MIN_S, or
        longer when rendering is slow (many series), to keep within RENDER_SHARE of our time."""
        from prometheus_client import generate_latest
        t0 = time.monotonic()
        self._dirty = False
        try:
            write_atomically(os.path.join(self.dir, TRAFFIC_FILE), generate_latest(self.registry))
            write_atomically(os.path.join(self.dir, DECODER_FILE), json.dumps({"lost": self.lost}).encode())
        except FileNotFoundError:       # the capture process removed the directory: it is ending
            self.dir = None
        took = time.monotonic() - t0
        self._next_render = time.monotonic() + max(RENDER_MIN_S, took / RENDER_SHARE)

    # ---- the decoder's own counters ----------------------------------------------------------

    def observe_decoder(self, stats: dict) -> None:
        """The wire decoder's totals (WireDecoder.metric_stats(), or its stats: then without the
        reasons of connections not decrypted), as counters; the probe source's decoder has none."""
        for key in DECODER_COUNTERS:
            self._advance(key, stats.get(key))
        reasons = stats.get("not_decrypted")
        if reasons is None and "connections_not_decrypted" in stats:
            reasons = {"unknown": stats["connections_not_decrypted"]}
        for reason, n in (reasons or {}).items():
            self._advance(f"not_decrypted:{reason}", n)

    def _advance(self, key: str, total) -> None:
        if total is None:
            return
        c = self._counters.get(key)
        if c is None:
            from prometheus_client import Counter
            if key.startswith("not_decrypted:"):
                if "not_decrypted" not in self._counters:
                    self._counters["not_decrypted"] = Counter(
                        "tlstap_wire_connections_not_decrypted", "Connections the wire source could not "
                        "decrypt", ["reason"], registry=self.registry)
                c = self._counters["not_decrypted"].labels(key.partition(":")[2])
            else:
                c = Counter(*DECODER_COUNTERS[key], registry=self.registry)
            self._counters[key] = c
            self._dirty = True
        delta = total - self._seen.get(key, 0)
        if delta > 0:
            c.inc(delta)
            self._seen[key] = total
            self._dirty = True
