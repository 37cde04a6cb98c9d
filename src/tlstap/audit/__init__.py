"""The audit modules (eCapture's bash, zsh, mysqld, postgres): what is typed and queried on a
host, one event per command line or query. Each module is a source (its BPF object and probes)
whose records decode to AuditEvent; audit/output.py writes them as text or JSON lines."""
