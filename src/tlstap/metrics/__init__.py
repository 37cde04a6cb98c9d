"""Prometheus metrics (--metrics-addr): HTTP traffic and tlstap's own health on /metrics.

Two processes share the work. The decoder process, the only one that sees HTTP exchanges,
counts them (traffic.py: TrafficMetrics, a decoder-side sink) into prometheus_client's
multiprocess files; the capture process serves /metrics (server.py: MetricsOutput), merging
those files with the health numbers it reads at scrape time (health.py). Why not serve from
the decoder: it runs at SCHED_IDLE, and a server thread there would wait for the GIL behind a
main thread the busy host starves, so scrapes would time out exactly when they matter.

No module of this package imports prometheus_client at import time: its multiprocess mode is
chosen when the library is first imported (values.ValueClass), which must come after
server.prepare_multiprocess() has set PROMETHEUS_MULTIPROC_DIR.
"""
