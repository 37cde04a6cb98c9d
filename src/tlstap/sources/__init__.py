"""Sources: what the kernel side captures, as events (probes, keys, packets)."""
