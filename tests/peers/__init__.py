"""Real TLS peers on loopback whose transcripts tlstap's tests compare against captures.

Every peer runs as its own process (so captures can be filtered by pid), every wait is bounded,
and every context manager stops what it started. See the individual modules for details and
limitations (notably openssl_cli for s_client/s_server).
"""
from ._common import Transcript, child_pids, make_cert, tcp_sockets, wait_for
from .curl import CurlClient, CurlResult, run_curl, run_curl_post
from .nginx import NginxServer
from .node import NodeClient, NodeResult, run_node_https
from .openssl_cli import OpenSSLServer, openssl_exchange
from .pyssl import PySSLClient, PySSLServer, run_pyssl_client

__all__ = [
    "Transcript", "make_cert", "tcp_sockets", "child_pids", "wait_for",
    "PySSLServer", "PySSLClient", "run_pyssl_client",
    "OpenSSLServer", "openssl_exchange",
    "NginxServer",
    "CurlClient", "CurlResult", "run_curl", "run_curl_post",
    "NodeClient", "NodeResult", "run_node_https",
]
