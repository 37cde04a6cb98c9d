"""Prometheus metrics (--metrics-addr): HTTP traffic and tlstap's own health on /metrics.

Two processes share the work. The decoder process, the only one that sees HTTP exchanges,
counts them (traffic.py: TrafficMetrics, a decoder-side sink) and now and then writes a
snapshot into a private directory; the capture process serves /metrics (server.py:
MetricsOutput): its health numbers, read at scrape time (health.py), then the snapshot. Why not
serve from the decoder: it runs at SCHED_IDLE, and a server thread there would wait for the GIL
behind a main thread the busy host starves, so scrapes would time out exactly when they matter.
traffic.py says why a snapshot rather than prometheus_client's multiprocess files.
"""

#: the snapshot directory, for the decoder process (server.prepare_multiprocess sets it before
#: the decoder is forked); unset, TrafficMetrics writes nothing (unit tests read its registry)
DIR_ENV = "TLSTAP_METRICS_DIR"
TRAFFIC_FILE = "traffic.prom"        # exposition text of the traffic metrics
DECODER_FILE = "decoder.json"        # the decoder's losses, merged into health's tlstap_lost_*
