"""tlstap: capture TLS plaintext and keys from running processes with eBPF."""

__version__ = "0.1.0"
