"""The wire source's TLS decryptor against real openssl s_client / s_server connections.

Each test records the bytes both directions carried through a loopback relay plus the client's key
log, feeds them (in several chunkings) to TlsConnection and compares the plaintext with what each
peer was given to send.
"""
from __future__ import annotations

import os
import random
import shutil

import pytest

from tests.wire_peers import Server, make_certs, parse_keylog, run_client
from tlstap.wire.tls import IN, OUT, Gap, Plain, Problem, TlsConnection

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(str(tmp_path_factory.mktemp("certs")))


def line(tag: str, n: int, rng=random.Random(17)) -> bytes:
    """A unique line of n bytes; starts with '=' so no s_client/s_server command letter."""
    body = "".join(rng.choice("abcdefghij0123456789") for _ in range(n - len(tag) - 2))
    return f"={tag}{body}\n".encode()


def chat(n: int = 3) -> list:
    script = []
    for i in range(n):
        script += [("c", line(f"c{i}", 40 + 7 * i)), ("s", line(f"s{i}", 300 + 11 * i))]
    return script


def session(certs, tmp_path, script, cargs=(), sargs=()):
    """One connection; returns (recorded Conn, {OUT: client's bytes, IN: server's}, keys callable)."""
    keylog = str(tmp_path / "keylog")
    srv = Server(certs, sargs)
    try:
        conn, sent = run_client(srv, 0, keylog, script, cargs)
    finally:
        srv.close()
    keys = parse_keylog(keylog)
    return conn, sent, lambda cr: keys.get(cr, {})


def pieces(events, how: str):
    """The recorded events re-cut: as captured, in 1-byte pieces, or in random-sized pieces."""
    if how == "as-captured":
        return [(d, [b]) for d, b in events]
    if how == "bytes":
        return [(d, [b[i:i + 1] for i in range(len(b))]) for d, b in events]
    rng = random.Random(5)
    out = []
    for d, b in events:
        i = 0
        while i < len(b):
            n = rng.randint(1, 700)
            out.append((d, [b[i:i + n]]))
            i += n
    return out


def decrypt(events, keys, how="as-captured", swap=False):
    """Feed the connection; swap: the local end is the server (its OUT is what the server sent)."""
    t = TlsConnection(keys)
    out = []
    for d, ps in pieces(events, how):
        out += t.feed(1 - d if swap else d, ps)
    return t, out


def plaintext(results, direction, early=False) -> bytes:
    return b"".join(r.data for r in results
                    if isinstance(r, Plain) and r.direction == direction and r.early == early)


def problems(results):
    return [r for r in results if isinstance(r, Problem)]


def assert_decrypts(conn, sent, keys, hows=("as-captured", "bytes", "random")):
    for how in hows:
        for swap in (False, True):
            t, res = decrypt(conn.events, keys, how, swap)
            assert problems(res) == [], (how, swap)
            c, s = (IN, OUT) if swap else (OUT, IN)
            assert plaintext(res, c) == sent[OUT], (how, swap)
            assert plaintext(res, s) == sent[IN], (how, swap)
            assert not t.waiting
    return t


TLS13 = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]


@pytest.mark.parametrize("suite", TLS13)
def test_tls13_suites(certs, tmp_path, suite):
    conn, sent, keys = session(certs, tmp_path, chat(), ["-ciphersuites", suite])
    t = assert_decrypts(conn, sent, keys)
    assert (t.version, t.suite) == ("TLS 1.3", suite)


TLS12 = ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384", "DHE-RSA-AES128-GCM-SHA256",
         "AES256-GCM-SHA384", "ECDHE-RSA-CHACHA20-POLY1305", "ECDHE-ECDSA-CHACHA20-POLY1305",
         "ECDHE-RSA-AES128-SHA", "ECDHE-ECDSA-AES256-SHA", "ECDHE-RSA-AES128-SHA256",
         "ECDHE-ECDSA-AES256-SHA384", "DHE-RSA-AES256-SHA256", "AES128-SHA"]


CASES12 = [(s, True) for s in TLS12] + [(s, False) for s in TLS12 if "GCM" not in s and "CHACHA" not in s]


@pytest.mark.parametrize("suite,etm", CASES12, ids=[f"{s}-{'etm' if e else 'no_etm'}" for s, e in CASES12])
def test_tls12_suites(certs, tmp_path, suite, etm):
    """Every TLS 1.2 suite shape; CBC suites with encrypt-then-MAC (OpenSSL's default) and without."""
    cargs = ["-tls1_2", "-cipher", suite] + ([] if etm else ["-no_etm"])
    conn, sent, keys = session(certs, tmp_path, chat(), cargs)
    t = assert_decrypts(conn, sent, keys, ("as-captured", "random"))
    assert (t.version, t.suite) == ("TLS 1.2", suite)
    assert t._etm == (etm and "GCM" not in suite and "CHACHA" not in suite)
