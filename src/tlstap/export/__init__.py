"""Export of captured events to systems beyond this host: the NATS JetStream target and
publisher (nats.py) and the retry queue they share with the sink (queue.py; the sink itself
is sinks/export.py)."""
