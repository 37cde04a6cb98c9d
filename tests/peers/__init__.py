"""Real TLS peers on loopback whose transcripts tlstap's tests compare against captures.

Every peer runs as its own process (so captures can be filtered by pid), every wait is bounded,
and every context manager stops what it started. See the individual modules for details and
limitations (notably openssl_cli for s_client/s_server).

Key log oracles (what the TLS library itself logged for the same connections): PySSLServer /
PySSLClient(keylog=True), OpenSSLServer(keylog=True) + openssl_client, curl/node (keylog=True),
CtypesSSLClient (any libssl by path, e.g. find_psycopg2_libssl()). keylog.py parses the lines
and implements the TLS 1.3 key update derivation; capture.py records loopback traffic with
tshark and decrypts it with a key log file.
"""
from ._common import Transcript, child_pids, make_cert, tcp_sockets, wait_for
from .capture import (PacketCapture, TLSStream, have_tshark, tshark_fields, tshark_http_uris,
                      tshark_tls_streams, write_keylog)
from .ctypes_ssl import (CtypesSSLClient, CtypesSSLResult, find_psycopg2_libssl, run_ctypes_client,
                         system_libssl)
from .curl import CurlClient, CurlResult, run_curl, run_curl_post
from .keylog import (KeyLogLine, by_client_random, client_randoms, derive_key_updates, derive_secret,
                     for_connection, hash_for_secret, hkdf_expand, hkdf_expand_label, hkdf_extract,
                     normalize_keylog_line, number_key_updates, parse_keylog, read_keylog,
                     tls13_next_secret, traffic_key_iv)
from .nginx import NginxServer
from .node import NodeClient, NodeResult, run_node_https
from .openssl_cli import (OpenSSLClientRun, OpenSSLServer, TLSMessage, openssl_client, openssl_exchange,
                          parse_msg_output)
from .pyssl import PySSLClient, PySSLServer, run_pyssl_client

__all__ = [
    "Transcript", "make_cert", "tcp_sockets", "child_pids", "wait_for",
    "PySSLServer", "PySSLClient", "run_pyssl_client",
    "OpenSSLServer", "openssl_exchange", "openssl_client", "OpenSSLClientRun", "TLSMessage",
    "parse_msg_output",
    "NginxServer",
    "CurlClient", "CurlResult", "run_curl", "run_curl_post",
    "NodeClient", "NodeResult", "run_node_https",
    "CtypesSSLClient", "CtypesSSLResult", "run_ctypes_client", "find_psycopg2_libssl", "system_libssl",
    "KeyLogLine", "parse_keylog", "read_keylog", "normalize_keylog_line", "client_randoms",
    "for_connection", "by_client_random", "number_key_updates", "derive_key_updates",
    "hash_for_secret", "hkdf_extract", "hkdf_expand", "hkdf_expand_label", "derive_secret",
    "tls13_next_secret", "traffic_key_iv",
    "PacketCapture", "TLSStream", "have_tshark", "tshark_fields", "tshark_http_uris",
    "tshark_tls_streams", "write_keylog",
]
