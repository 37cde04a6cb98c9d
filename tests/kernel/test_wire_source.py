"""`--source wire` (issue 17): the plaintext tlstap decrypts from the connection's own packets,
with the secrets its key probes log, equals what each real peer sent and received, byte for byte.

Oracles: the peers' transcripts (what `openssl s_client`/`s_server` were fed on stdin and wrote to
stdout; what the Python ssl peers passed to SSL_write and got from SSL_read) and, for the last
case, tshark decrypting the same packets with the same keys. Every capture here is unscoped (the
cgroup v2 root) and its records are picked by the peers' pids: both ends of each connection are
decrypted, each from its own socket's packets.
"""
from __future__ import annotations

import os
import re

import pytest

from tests.peers import OpenSSLServer, openssl_client, openssl_exchange

from .tap import Tap, assert_streams_match

TLS13_SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
# (cipher, encrypt-then-mac): ETM (RFC 7366, OpenSSL's default) changes the record layout of CBC
# suites only; -no_etm gives the older MAC-then-encrypt
TLS12_CASES = [("ECDHE-RSA-AES128-GCM-SHA256", None), ("ECDHE-RSA-AES256-GCM-SHA384", None),
               ("ECDHE-RSA-CHACHA20-POLY1305", None), ("ECDHE-RSA-AES128-SHA", True),
               ("ECDHE-RSA-AES128-SHA", False), ("ECDHE-RSA-AES128-SHA256", True),
               ("ECDHE-RSA-AES128-SHA256", False)]
ETM_EXT = bytes.fromhex("00160000")     # encrypt_then_mac, empty, in the ServerHello's extensions


def wire_tap(tmp_path, *args: str) -> Tap:
    return Tap(tmp_path, "--source", "wire", *args)


def exchange(n: int) -> tuple[bytes, bytes]:
    """A client and a server message of about n bytes each, random, none starting with an
    s_client command letter (openssl_client refuses those when key updates are steps)."""
    return b"c" + os.urandom(n).hex().encode()[: n - 1], b"s" + os.urandom(n).hex().encode()[: n - 1]


def check(tap: Tap, transcripts) -> None:
    """Each transcript (a connection's end): the wire source's bytes are the peer's, and the
    decoder named none of their connections as not decrypted."""
    pids = {t.pid for t in transcripts}
    assert_streams_match([r for r in tap.data() if r["pid"] in pids], transcripts)
    err = tap.stderr
    for pid in pids:
        assert not re.search(rf"\({pid}\) not decrypted", err), err
    assert re.search(r"^tlstap: wire: decrypted \d+ of \d+ connections", err, re.M), err


# ---------------------------------------------------------------- suites and versions

@pytest.mark.parametrize("suite", TLS13_SUITES)
def test_tls13_suite(tmp_path, cert, suite):
    steps = [exchange(300), exchange(20_000)]
    with OpenSSLServer(*cert, ciphersuites=suite) as srv, wire_tap(tmp_path) as tap:
        run = openssl_client(srv, steps, ciphersuites=suite)
    assert run.summary.get("Ciphersuite") == suite, run.summary
    check(tap, [run.client, run.server])


@pytest.mark.parametrize("cipher,etm", TLS12_CASES,
                         ids=[c + {None: "", True: "-etm", False: "-no_etm"}[e] for c, e in TLS12_CASES])
def test_tls12_cipher(tmp_path, cert, cipher, etm):
    steps = [exchange(300), exchange(20_000)]
    with OpenSSLServer(*cert, tls="1.2", cipher=cipher) as srv, wire_tap(tmp_path) as tap:
        run = openssl_client(srv, steps, tls="1.2", cipher=cipher, extra_args=[] if etm is not False else ["-no_etm"])
    assert run.summary.get("Protocol version") == "TLSv1.2" and run.summary.get("Ciphersuite") == cipher, run.summary
    if etm is not None:
        (hello,) = [m for m in run.messages if m.direction == "received" and m.name == "ServerHello"]
        assert (ETM_EXT in hello.body) == etm
    check(tap, [run.client, run.server])


def test_tls12_rsa_key_exchange(tmp_path, cert):
    """AES128-SHA256: RSA key transport, CBC with HMAC-SHA256 (openssl_client cannot run it: its
    key log oracle does not parse s_client's "RSA" lines, so the -quiet exchange runs it)."""
    c_data, s_data = exchange(30_000)
    with OpenSSLServer(*cert, tls="1.2", cipher="AES128-SHA256") as srv, wire_tap(tmp_path) as tap:
        c, s = openssl_exchange(srv, c_data, s_data)
    check(tap, [c, s])
