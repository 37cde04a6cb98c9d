"""`tlstap nss -m keylog|pcapng` against real NSS peers (tstclnt, selfserv from libnss3-tools).

Debian's NSS is built without NSS_ALLOW_SSLKEYLOGFILE, so on it NSS cannot be its own oracle:
the other end of the same connection is (OpenSSL's s_server -keylogfile, Python ssl's
keylog_filename), whose lines name the same secrets under the same client random, in the
format NSS writes. Mozilla's NSS (Firefox ESR's bundled copy) does honour SSLKEYLOGFILE: on it
NSS's own lines are the oracle. tlstap's lines for those connections must equal them, no more,
no fewer. For pcapng, tshark decrypts the file alone and the plaintext must be what the peers
sent.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import threading
import time

import pytest

from tests.conftest import needs
from tests.peers import OpenSSLServer, have_tshark, tshark_tls_streams
from tests.peers.nss import SelfServ, tstclnt_request
from tests.peers.keylog import read_keylog
from tests.peers.nss_tools import TicketSelfServ, moz_nss_dir, pyssl_to_selfserv, tstclnt_handshake

from .tap import KeyTap, Tap, assert_same_lines, run_tlstap, tlstap_exe
from .test_cli_errors import assert_one_line_error

pytestmark = needs(shutil.which("tstclnt") and shutil.which("selfserv"),
                   "libnss3-tools (tstclnt, selfserv) is not installed")

TLS13_LABELS = {"CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET", "CLIENT_TRAFFIC_SECRET_0",
                "SERVER_TRAFFIC_SECRET_0", "EXPORTER_SECRET"}


@pytest.fixture
def selfserv(cert):
    with SelfServ(cert[0], cert[1]) as s:
        yield s


@pytest.mark.parametrize("version,tls,suite", [
    ("tls1.3", "1.3", {"ciphersuites": "TLS_AES_128_GCM_SHA256"}),
    ("tls1.3", "1.3", {"ciphersuites": "TLS_AES_256_GCM_SHA384"}),    # 48-byte secrets
    ("tls1.2", "1.2", {"cipher": "ECDHE-RSA-AES128-GCM-SHA256"}),
    ("tls1.2", "1.2", {"cipher": "AES256-SHA"}),                      # RSA key exchange, CBC
], ids=["tls13-sha256", "tls13-sha384", "tls12-ecdhe-gcm", "tls12-rsa-cbc"])
def test_tstclnt_client_lines_equal_the_servers(tmp_path, cert, version, tls, suite):
    with KeyTap(tmp_path, command="nss") as tap:
        with OpenSSLServer(*cert, tls=tls, keylog=True, **suite) as srv:
            pid = tstclnt_handshake(srv, version)
        tap.stop()
    got = assert_same_lines(tap, srv.keylog())
    want_labels = TLS13_LABELS if version == "tls1.3" else {"CLIENT_RANDOM"}
    assert {ln.split()[0] for ln in got} == want_labels
    assert pid > 0 and stat.S_IMODE(os.stat(tap.out).st_mode) == 0o600


def test_hello_retry_request(tmp_path, cert):
    """A server that wants P-256 makes tstclnt (which offers an X25519 share) retry: the
    transcript then restarts with a message_hash and the second ClientHello."""
    with KeyTap(tmp_path, command="nss") as tap:
        with OpenSSLServer(*cert, keylog=True, msg=True, groups="P-256") as srv:
            tstclnt_handshake(srv, "tls1.3")
        tap.stop()
    assert any(m.is_hello_retry_request for m in srv.messages()), "no HelloRetryRequest: the test proves nothing"
    assert_same_lines(tap, srv.keylog())


MOZ_NSS = moz_nss_dir()


@needs(MOZ_NSS, "no NSS build that honours SSLKEYLOGFILE (install firefox-esr, or set TLSTAP_TEST_NSS_DIR)")
@pytest.mark.parametrize("version,groups", [("tls1.3", None), ("tls1.3", "P-256"), ("tls1.2", None)],
                         ids=["tls13", "tls13-hrr", "tls12"])
def test_lines_equal_nss_own_sslkeylogfile(tmp_path, cert, version, groups):
    """Mozilla's NSS (another version, built by another toolchain: RELR relocations) writes its
    own key log; tlstap, told its directory with --nspr, must write the same lines."""
    own = tmp_path / "nss-own.keys"
    with KeyTap(tmp_path, "--nspr", f"{MOZ_NSS}/libnss3.so", command="nss") as tap:
        with OpenSSLServer(*cert, tls=version[3:], keylog=True, groups=groups) as srv:
            tstclnt_handshake(srv, version, lib_dir=MOZ_NSS, keylog=own)
        tap.stop()
    assert any("NSS 3." in ln and MOZ_NSS in ln for ln in tap.stderr_lines), tap.stderr
    got = assert_same_lines(tap, read_keylog(own))
    assert got == set(srv.keylog())


@pytest.mark.parametrize("version", ["tls1.3", "tls1.2"])
def test_selfserv_server_lines_equal_the_clients(tmp_path, selfserv, version):
    """The NSS server end, scoped with --pid: two connections, each its own client random."""
    with KeyTap(tmp_path, "--pid", str(selfserv.pid), command="nss") as tap:
        pyssl_to_selfserv(selfserv.port, version, tmp_path / "client.keys")
        lines, answer, *_ = pyssl_to_selfserv(selfserv.port, version, tmp_path / "client.keys")
        tap.stop()
    assert answer.startswith(b"HTTP/1.0 200 OK")
    got = assert_same_lines(tap, lines)
    assert len({ln.split()[1] for ln in got}) == 2
    assert len(got) == 2 * (5 if version == "tls1.3" else 1)


@pytest.mark.parametrize("version", ["tls1.3", "tls1.2"])
def test_selfserv_resumed_sessions(tmp_path, cert, version):
    """Resumption (TLS 1.3: a PSK whose binder hashes a truncated ClientHello first; TLS 1.2:
    the cached master secret): each connection's lines, under its own client random."""
    keys = tmp_path / "client.keys"
    with TicketSelfServ(*cert) as selfserv, KeyTap(tmp_path, "--pid", str(selfserv.pid), command="nss") as tap:
        _l, _a, session, _r, ctx = pyssl_to_selfserv(selfserv.port, version, keys)
        reused = [pyssl_to_selfserv(selfserv.port, version, keys, session=session, ctx=ctx)[3] for _ in range(2)]
        tap.stop()
    assert reused == [True, True], "selfserv did not resume: the test proves nothing"
    got = assert_same_lines(tap, read_keylog(keys))
    assert len({ln.split()[1] for ln in got}) == 3


def test_selfserv_concurrent_handshakes(tmp_path, selfserv):
    """Eight handshakes at once on selfserv's worker threads: each secret is joined to its
    own connection's client random, never a neighbour's."""
    results, errors = [], []

    def one(i):
        try:
            results.append(pyssl_to_selfserv(selfserv.port, ("tls1.3", "tls1.2")[i % 2], tmp_path / f"c{i}.keys")[0])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    with KeyTap(tmp_path, "--pid", str(selfserv.pid), command="nss") as tap:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        tap.stop()
    assert not errors, errors
    got = assert_same_lines(tap, *results)
    assert len({ln.split()[1] for ln in got}) == 8


class PcapTap(Tap):
    """`tlstap nss -m pcapng -i lo -w FILE ARGS...` in the background."""

    def __init__(self, tmp_path, *args: str):
        out = str(tmp_path / f"cap-{time.monotonic_ns()}.pcapng")
        self._setup(out, [tlstap_exe(), "nss", "-m", "pcapng", "-i", "lo", "-w", out, *args])


@needs(have_tshark(), "tshark is not installed")
def test_pcapng_tstclnt_selfserv_decrypted_by_tshark(tmp_path, selfserv):
    """NSS at both ends, scoped to selfserv (packets to and from it, its secrets); tshark reads
    only the file (its Decryption Secrets Block)."""
    request = b"GET /pcapng-nss HTTP/1.0\r\nX-Pad: " + os.urandom(600).hex().encode() + b"\r\n\r\n"
    with PcapTap(tmp_path, "--pid", str(selfserv.pid)) as tap:
        c, _s = tstclnt_request(selfserv, request)
        tap.stop()
    streams = tshark_tls_streams(tap.out, tls_ports=[selfserv.port])
    assert len(streams) == 1, tap.stderr
    st = streams[0]
    assert st.sent_by(c.local) == c.sent == request
    assert st.received_by(c.local) == c.received and c.received.startswith(b"HTTP/1.0 200 OK")
    assert stat.S_IMODE(os.stat(tap.out).st_mode) == 0o600


def test_bad_input_is_one_line():
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert_one_line_error(run_tlstap("nss", "-m", "keylog", "--pid", str(p.pid)), str(p.pid), "libnss3")
    finally:
        p.kill()
        p.wait()
    assert_one_line_error(run_tlstap("nss", "-m", "keylog", "--nspr", "/bin/ls"), "/bin/ls", "not NSPR")
