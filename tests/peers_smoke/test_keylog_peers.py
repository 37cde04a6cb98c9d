"""Smoke tests of the key log oracle peers (tests/peers): each TLS library writes its own NSS key
log for real loopback connections, and the handshake variants (cipher suites, HelloRetryRequest,
resumption, KeyUpdate) are shown to really happen. Plus the key schedule helpers against
RFC 8448 and against OpenSSL's own key update logging, and the tshark capture helper.
No tlstap involvement."""
import hashlib
import os
from pathlib import Path

import pytest

from tests.conftest import need, needs
from tests.peers import (CtypesSSLClient, NginxServer, OpenSSLServer, PacketCapture, PySSLClient,
                         PySSLServer, by_client_random, client_randoms, derive_key_updates, derive_secret,
                         find_psycopg2_libssl, for_connection, hash_for_secret, have_tshark, hkdf_expand_label,
                         hkdf_extract, make_cert, normalize_keylog_line, number_key_updates, openssl_client,
                         parse_keylog, run_curl, run_node_https, system_libssl, tcp_sockets,
                         tls13_next_secret, traffic_key_iv, tshark_http_uris, tshark_tls_streams,
                         write_keylog)
from tests.peers.openssl_cli import _split_chunks
from tests.peers.pyssl_peer import HDR

TLS13_SET = {"CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
             "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0", "EXPORTER_SECRET"}
SUITE_HASH = {"TLS_AES_128_GCM_SHA256": "sha256", "TLS_AES_256_GCM_SHA384": "sha384",
              "TLS_CHACHA20_POLY1305_SHA256": "sha256"}
H = bytes.fromhex


@pytest.fixture(scope="session")
def cert(tmp_path_factory):
    return make_cert(tmp_path_factory.mktemp("certs"))


def labels(lines):
    return [ln.split()[0] for ln in lines]


def assert_tls13_connection(lines, hash_name=None):
    """One connection's lines: exactly the five TLS 1.3 labels, secrets of the suite's hash length."""
    assert sorted(labels(lines)) == sorted(TLS13_SET), lines
    assert len(client_randoms(lines)) == 1
    for ln in lines:
        secret = H(ln.split()[2])
        if hash_name:
            assert hash_for_secret(secret) == hash_name


def updates_oracle_matches_derivation(lines) -> int:
    """The library's own literal _N lines (numbered) == our derivation from the _0 lines."""
    numbered = [ln for ln in number_key_updates(lines) if ln.split()[0][-1] in "123456789"]
    per_dir = {d: sum(1 for ln in numbered if ln.startswith(d)) for d in ("CLIENT", "SERVER")}
    assert sorted(numbered) == sorted(derive_key_updates(lines, per_dir))
    return len(numbered)


# ---------------------------------------------------------------- key schedule / key log parsing

def test_hkdf_rfc8448_simple_1rtt():
    """RFC 8448 section 3 (TLS_AES_128_GCM_SHA256): every HKDF-Expand-Label step of the schedule."""
    early = hkdf_extract(b"", bytes(32))
    assert early == H("33ad0a1c607ec03b09e6cd9893680ce210adf300aa1f2660e1b22e10f170f92a")
    empty_hash = hashlib.sha256(b"").digest()
    derived = derive_secret(early, "derived", empty_hash)
    assert derived == H("6f2615a108c702c5678f54fc9dbab69716c076189c48250cebeac3576c3611ba")
    dhe = H("8bd4054fb55b9d63fdfbacf9f04b9f0d35e6d63f537563efd46272900f89492d")
    hs = hkdf_extract(derived, dhe)
    assert hs == H("1dc826e93606aa6fdc0aadc12f741b01046aa6b99f691ed221a9f0ca043fbeac")
    th_sh = H("860c06edc07858ee8e78f0e7428c58edd6b43f2ca3e6e95f02ed063cf0e1cad8")   # CH..SH
    c_hs = derive_secret(hs, "c hs traffic", th_sh)
    s_hs = derive_secret(hs, "s hs traffic", th_sh)
    assert c_hs == H("b3eddb126e067f35a780b3abf45e2d8f3b1a950738f52e9600746a0e27a55a21")
    assert s_hs == H("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
    assert traffic_key_iv(s_hs, 16) == (H("3fce516009c21727d0f2e4e86ee403bc"), H("5d313eb2671276ee13000b30"))
    assert traffic_key_iv(c_hs, 16) == (H("dbfaa693d1762c5b666af5d950258d01"), H("5bd3c71b836e0b76bb73265f"))
    master = hkdf_extract(derive_secret(hs, "derived", empty_hash), bytes(32))
    assert master == H("18df06843d13a08bf2a449844c5f8a478001bc4d4c627984d5a41da8d0402919")
    th_sf = H("9608102a0f1ccc6db6250b7b7e417b1a000eaada3daae4777a7686c9ff83df13")   # CH..server Finished
    c_ap = derive_secret(master, "c ap traffic", th_sf)
    s_ap = derive_secret(master, "s ap traffic", th_sf)
    assert c_ap == H("9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5")
    assert s_ap == H("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
    assert derive_secret(master, "exp master", th_sf) == H(
        "fe22f881176eda18eb8f44529e6792c50c9a3f89452f68d8ae311b4309d3cf50")
    assert traffic_key_iv(s_ap, 16) == (H("9f02283b6c9c07efc26bb9f2ac92e356"), H("cf782b88dd83549aadf1e984"))


def test_tls13_next_secret_is_expand_label_traffic_upd():
    s = os.urandom(48)
    assert tls13_next_secret(s) == hkdf_expand_label(s, "traffic upd", b"", 48, "sha384")
    assert tls13_next_secret(s[:32]) == tls13_next_secret(s[:32], "sha256") != tls13_next_secret(s[:32], "sha384")
    with pytest.raises(ValueError):
        tls13_next_secret(s[:20])


def test_keylog_parse_and_number():
    cr = "AB" * 32
    text = (f"# comment\n\nCLIENT_TRAFFIC_SECRET_0 {cr} {'11' * 32}\n"
            f"client_traffic_secret_n {cr} {'22' * 32}\nCLIENT_TRAFFIC_SECRET_N  {cr}  {'33' * 32}\n"
            f"SERVER_TRAFFIC_SECRET_N {cr} {'44' * 32}\n")
    lines = parse_keylog(text)
    assert lines[0] == f"CLIENT_TRAFFIC_SECRET_0 {cr.lower()} {'11' * 32}"
    assert labels(number_key_updates(lines)) == ["CLIENT_TRAFFIC_SECRET_0", "CLIENT_TRAFFIC_SECRET_1",
                                                 "CLIENT_TRAFFIC_SECRET_2", "SERVER_TRAFFIC_SECRET_1"]
    assert by_client_random(lines)[cr.lower()]["CLIENT_TRAFFIC_SECRET_N"] == ["22" * 32, "33" * 32]
    with pytest.raises(ValueError):
        normalize_keylog_line("CLIENT_RANDOM abcd 00")


# ---------------------------------------------------------------- Python ssl

@pytest.mark.parametrize("tls,ciphers", [("1.3", None), ("1.2", "ECDHE-RSA-AES128-GCM-SHA256"),
                                         ("1.2", "ECDHE-RSA-CHACHA20-POLY1305")])
def test_pyssl_keylog(cert, tls, ciphers):
    with PySSLServer(*cert, keylog=True, tls_version=tls) as srv:
        c = PySSLClient(srv.port, [b"ping"], keylog=True, tls_version=tls, ciphers=ciphers)
        cts = c.go().wait()
    assert cts[0].received == b"ping" and cts[0].mirrors(srv.transcripts()[0])
    (info,) = c.info()
    assert info["version"] == f"TLSv{tls}" and (ciphers is None or info["cipher"] == ciphers)
    assert sorted(c.keylog()) == sorted(srv.keylog())     # both ends logged the same secrets
    if tls == "1.3":
        assert_tls13_connection(c.keylog(), "sha384")     # Python's default suite: AES_256_GCM_SHA384
    else:
        (line,) = c.keylog()
        assert line.startswith("CLIENT_RANDOM ") and len(line.split()[2]) == 96


@pytest.mark.parametrize("tls", ["1.3", "1.2"])
def test_pyssl_resumption(cert, tls):
    with PySSLServer(*cert, keylog=True, tls_version=tls, messages=True) as srv:
        c = PySSLClient(srv.port, [b"a", b"b"], conns=2, resume=True, keylog=True, messages=True)
        c.go().wait()
    first, second = c.info()
    assert not first["session_reused"] and second["session_reused"]
    hs = lambda i: [m[1] for m in i["messages"]]                         # noqa: E731
    assert "CERTIFICATE" in hs(first) and "CERTIFICATE" not in hs(second)   # abbreviated handshake
    kl = c.keylog()
    assert sorted(kl) == sorted(srv.keylog()) and len(client_randoms(kl)) == 2
    if tls == "1.2":   # resumption reuses the master secret under a new client random
        a, b = kl
        assert a.split()[2] == b.split()[2] and a.split()[1] != b.split()[1]
    else:
        for cr in client_randoms(kl):
            assert_tls13_connection(for_connection(kl, cr))


def test_pyssl_hello_retry_request(cert):
    # the server accepts only P-256; Python's client sends an X25519 key share first
    with PySSLServer(*cert, keylog=True, ecdh_curve="prime256v1", messages=True) as srv:
        c = PySSLClient(srv.port, [b"x"], keylog=True, messages=True)
        c.go().wait()
    msgs = [m[1] for m in c.info()[0]["messages"]]
    assert msgs[:4] == ["CLIENT_HELLO", "SERVER_HELLO", "CLIENT_HELLO", "SERVER_HELLO"]
    assert sorted(c.keylog()) == sorted(srv.keylog())
    assert_tls13_connection(c.keylog())


# ---------------------------------------------------------------- openssl s_client / s_server

@pytest.mark.parametrize("suite", sorted(SUITE_HASH))
def test_openssl_ciphersuites(cert, suite):
    with OpenSSLServer(*cert, keylog=True, ciphersuites=suite) as srv:
        r = openssl_client(srv, [(b"c" * 5000, b"s" * 7000)], ciphersuites=suite)
    assert r.returncode == 0 and r.client.mirrors(r.server) and r.client.received == b"s" * 7000
    assert r.summary["Ciphersuite"] == suite and r.summary["Protocol version"] == "TLSv1.3"
    assert_tls13_connection(r.keylog, SUITE_HASH[suite])
    assert r.keylog[0].split()[1] == r.client_random
    assert sorted(srv.keylog()) == sorted(r.keylog)


@pytest.mark.parametrize("cipher", ["ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305"])
def test_openssl_tls12_cipher(cert, cipher):
    with OpenSSLServer(*cert, tls="1.2", keylog=True) as srv:
        r = openssl_client(srv, [(b"Quit is data here", b"R too")], cipher=cipher)  # -nocommands
    assert r.client.mirrors(r.server) and r.server.received == b"Quit is data here"
    assert r.summary["Ciphersuite"] == cipher and r.summary["Protocol version"] == "TLSv1.2"
    (line,) = r.keylog
    assert line.split()[:2] == ["CLIENT_RANDOM", r.client_random] and srv.keylog() == r.keylog


def test_openssl_hello_retry_request(cert):
    with OpenSSLServer(*cert, keylog=True, msg=True, groups="P-256", naccept=2) as srv:
        hrr = openssl_client(srv, [(b"a", b"b")], groups="X25519:P-256")
        plain = openssl_client(srv, [(b"a", b"b")], groups="P-256")
    assert hrr.hello_retry and not plain.hello_retry
    assert [m.name for m in hrr.messages if m.record == "Handshake"][:4] == \
        ["ClientHello", "ServerHello", "ClientHello", "ServerHello"]
    assert "prime256v1" in hrr.summary["Server Temp Key"]
    # the server's own -msg output shows it sent the HelloRetryRequest (once, for one connection)
    assert sum(m.is_hello_retry_request and m.direction == "sent" for m in srv.messages()) == 1
    assert_tls13_connection(hrr.keylog)
    assert set(hrr.keylog) | set(plain.keylog) == set(srv.keylog())


@pytest.mark.parametrize("tls", ["1.3", "1.2"])
def test_openssl_resumption(cert, tls, tmp_path):
    sess = tmp_path / "sess.pem"
    with OpenSSLServer(*cert, tls=tls, keylog=True, naccept=2) as srv:
        full = openssl_client(srv, [(b"first", b"one")], sess_out=sess)
        assert sess.exists()
        resumed = openssl_client(srv, [(b"second", b"two")], sess_in=sess)
    assert not full.resumed and resumed.resumed
    assert resumed.client.mirrors(resumed.server) and resumed.client.received == b"two"
    assert set(full.keylog) | set(resumed.keylog) == set(srv.keylog())
    if tls == "1.2":
        (a,), (b,) = full.keylog, resumed.keylog
        assert a.split()[2] == b.split()[2] and a.split()[1] != b.split()[1]
    else:
        assert_tls13_connection(resumed.keylog)


@pytest.mark.parametrize("suite", ["TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"])
def test_openssl_key_update(cert, suite):
    steps = [(b"before " * 100, b"server before"), "K", (b"after K " + os.urandom(9000), b"server after K"),
             "k", (b"after k", b"server after k")]
    with OpenSSLServer(*cert, keylog=True, msg=True, ciphersuites=suite) as srv:
        r = openssl_client(srv, steps)
    # K: both sides update; k: only the client. -msg shows the KeyUpdate messages on the wire
    assert (r.key_updates_sent, r.key_updates_received) == (2, 1)
    assert r.stderr.count("KEYUPDATE") == 2
    srv_msgs = [m.name for m in srv.messages() if m.record == "Handshake"]
    assert srv_msgs.count("KeyUpdate") == 3
    # data kept flowing in both directions after each update, byte-exact
    assert r.client.mirrors(r.server)
    assert r.client.sent == b"".join(s[0] for s in steps if isinstance(s, tuple))
    assert r.client.received == b"server beforeserver after Kserver after k"
    # OpenSSL logs the updated secrets itself, with the literal label ..._N: the oracle for
    # the independent derivation from the _0 secrets (both ends' logs)
    assert labels(r.keylog).count("CLIENT_TRAFFIC_SECRET_N") == 2
    assert labels(r.keylog).count("SERVER_TRAFFIC_SECRET_N") == 1
    assert updates_oracle_matches_derivation(r.keylog) == 3
    assert updates_oracle_matches_derivation(srv.keylog()) == 3
    assert sorted(number_key_updates(srv.keylog())) == sorted(number_key_updates(r.keylog))
    assert all(hash_for_secret(H(ln.split()[2])) == SUITE_HASH[suite] for ln in r.keylog)


def test_openssl_client_command_letters():
    data = b"x" + b"K" * 3000 + b"y" * 3000 + b"Q" * 4000 + b"z"
    assert b"".join(_split_chunks(data)) == data
    assert all(p[0] not in b"QRkK" for p in _split_chunks(data))
    for piece in _split_chunks(os.urandom(50000).replace(b"\x00", b"y")):
        assert piece[0] not in b"QRkK" and len(piece) <= 4096 or pytest.fail(repr(piece[:1]))
    for bad in (b"Kdata", b"x" + b"k" * 5000):
        with pytest.raises(ValueError):
            _split_chunks(bad)


# ---------------------------------------------------------------- curl / node (against nginx)

def test_curl_keylog(cert):
    with NginxServer(*cert, {"k.txt": b"K" * 3000}) as n:
        r13 = run_curl(n.url("k.txt"), keylog=True)
        r12 = run_curl(n.url("k.txt"), ["--tls-max", "1.2", "--ciphers", "ECDHE-RSA-AES128-GCM-SHA256"],
                       keylog=True)
        plain = run_curl(n.url("k.txt"))
    assert r13.body == r12.body == b"K" * 3000 and plain.keylog == []
    assert_tls13_connection(r13.keylog)
    (line,) = r12.keylog
    assert line.startswith("CLIENT_RANDOM ")


def test_node_keylog(cert):
    with NginxServer(*cert, {"n.txt": b"N" * 2000}) as n:
        r13 = run_node_https(n.url("n.txt"), keylog=True, tls_version="1.3", ciphers="TLS_AES_128_GCM_SHA256")
        r12 = run_node_https(n.url("n.txt"), keylog=True, tls_version="1.2",
                             ciphers="ECDHE-RSA-CHACHA20-POLY1305")
    assert r13.body == r12.body == b"N" * 2000
    assert (r13.protocol, r13.cipher) == ("TLSv1.3", "TLS_AES_128_GCM_SHA256")
    assert (r12.protocol, r12.cipher) == ("TLSv1.2", "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256")
    assert_tls13_connection(r13.keylog, "sha256")
    (line,) = r12.keylog
    assert line.startswith("CLIENT_RANDOM ")


# ---------------------------------------------------------------- ctypes client on a foreign libssl

PSYCOPG2_LIBSSL = find_psycopg2_libssl()
needs_wheel_libssl = needs(PSYCOPG2_LIBSSL, "psycopg2-binary is not installed (pip install .[test])")


def frame(p: bytes) -> bytes:
    return HDR.pack(len(p)) + p


@needs_wheel_libssl
def test_ctypes_client_openssl35_key_update_hrr(cert):
    payloads = [b"first", os.urandom(70000), b"third", b"fourth"]
    with PySSLServer(*cert, keylog=True, ecdh_curve="prime256v1") as srv:
        c = CtypesSSLClient(PSYCOPG2_LIBSSL, srv.port, payloads, key_updates=[1, 3])
        try:   # idle start: the wheel's libssl is mapped, nothing connected yet
            maps = Path(f"/proc/{c.pid}/maps").read_text()
            assert str(PSYCOPG2_LIBSSL) in maps and "/libssl.so.3" not in maps
            assert tcp_sockets(c.pid) == []
        finally:
            r = c.go().wait()
    assert r.openssl_version.startswith("OpenSSL 3.5") and r.version == "TLSv1.3"
    assert all("psycopg2_binary.libs" in m for m in r.mapped)      # no system libssl/libcrypto
    assert r.hello_retry
    assert r.key_updates_called == 2 and (r.key_updates_sent, r.key_updates_received) == (2, 2)
    assert r.transcript.sent == b"".join(frame(p) for p in payloads)
    assert r.transcript.received == b"".join(payloads)
    (st,) = srv.transcripts()
    assert st.mirrors(r.transcript) and st.pid == srv.pid and r.transcript.pid == c.pid
    assert updates_oracle_matches_derivation(r.keylog) == 4
    assert sorted(number_key_updates(srv.keylog())) == sorted(number_key_updates(r.keylog))
    assert "psycopg2" not in Path("/proc/self/maps").read_text()    # never loaded in the test process


@pytest.mark.parametrize("libssl", ["wheel", "system"])
def test_ctypes_client_versions_and_suites(cert, libssl):
    path = PSYCOPG2_LIBSSL if libssl == "wheel" else system_libssl()
    need(path, f"no {libssl} libssl" + (" (pip install .[test]: psycopg2-binary)" if libssl == "wheel" else ""))
    with PySSLServer(*cert, keylog=True, response=b"R" * 100) as srv:
        r12 = CtypesSSLClient(path, srv.port, [b"q"], tls_version="1.2", expect_response_len=100,
                              ciphers="ECDHE-RSA-CHACHA20-POLY1305").go().wait()
        r13 = CtypesSSLClient(path, srv.port, [b"q"], tls_version="1.3", expect_response_len=100,
                              ciphersuites="TLS_CHACHA20_POLY1305_SHA256", groups="P-256").go().wait()
    assert (r12.version, r12.cipher) == ("TLSv1.2", "ECDHE-RSA-CHACHA20-POLY1305")
    assert (r13.version, r13.cipher) == ("TLSv1.3", "TLS_CHACHA20_POLY1305_SHA256")
    assert not r13.hello_retry and r13.transcript.received == b"R" * 100
    assert labels(r12.keylog) == ["CLIENT_RANDOM"]
    assert_tls13_connection(r13.keylog, "sha256")
    assert sorted(srv.keylog()) == sorted(r12.keylog + r13.keylog)


# ---------------------------------------------------------------- packet capture + tshark

needs_tshark = needs(have_tshark(), "tshark is not installed")


@needs_tshark
def test_capture_decrypts_with_curl_keylog(cert, tmp_path):
    with NginxServer(*cert, {"secret-page.txt": b"top secret\n", "other.txt": b"x"}) as n:
        with PacketCapture(tmp_path / "c.pcapng", n.port) as cap:
            r1 = run_curl(n.url("secret-page.txt"), keylog=True)
            r2 = run_curl(n.url("other.txt?q=1"), ["--tls-max", "1.2"], keylog=True)
    assert cap.packets > 10
    keys = write_keylog(tmp_path / "keys.txt", r1.keylog + r2.keylog)
    assert tshark_http_uris(cap.path, keys) == ["/secret-page.txt", "/other.txt?q=1"]
    assert tshark_http_uris(cap.path) == []                                   # no key file: opaque
    assert tshark_http_uris(cap.path, write_keylog(tmp_path / "k1.txt", r1.keylog)) == ["/secret-page.txt"]
    s1, s2 = tshark_tls_streams(cap.path, keys)
    assert s1.client == r1.local and s1.server == r1.remote
    assert s1.client_data.startswith(b"GET /secret-page.txt HTTP/1.1\r\n")
    assert s1.server_data.endswith(b"\r\n\r\ntop secret\n") and s2.sent_by(r2.remote).endswith(b"\r\n\r\nx")
    assert [(s.client_data, s.server_data) for s in tshark_tls_streams(cap.path)] == [(b"", b"")] * 2


@needs_tshark
def test_capture_decrypts_across_key_update(cert, tmp_path):
    # tshark follows a TLS 1.3 KeyUpdate from the _0 secrets alone
    with OpenSSLServer(*cert, keylog=True) as srv:
        with PacketCapture(tmp_path / "o.pcapng", srv.port) as cap:
            r = openssl_client(srv, [(b"c1", b"s1"), "K", (b"c2", b"s2")])
    base = [ln for ln in r.keylog if not ln.split()[0].endswith("_N")]
    (s,) = tshark_tls_streams(cap.path, write_keylog(tmp_path / "k.txt", base))
    assert s.sent_by(r.client.local) == r.client.sent == b"c1c2"
    assert s.sent_by(r.server.local) == r.server.sent == b"s1s2"
