"""NSS peers whose other end writes a key log (the oracle for `tlstap nss -m keylog`: Debian's
NSS is built without SSLKEYLOGFILE, so the lines come from the peer of the same connection).

- tstclnt_handshake: tstclnt (NSS client) against OpenSSLServer(keylog=True): s_server's
  -keylogfile lines are the secrets of both ends.
- pyssl_to_selfserv: Python's ssl (OpenSSL, keylog_filename) against selfserv (NSS server);
  TicketSelfServ for resumption.

Mozilla's own NSS builds honour SSLKEYLOGFILE: moz_nss_dir() finds one (Firefox ESR bundles
NSS in its directory; TLSTAP_TEST_NSS_DIR names any other), and tstclnt_handshake(lib_dir=,
keylog=) runs Debian's tstclnt on it, so NSS itself writes the oracle.
"""
from __future__ import annotations

import os
import socket
import ssl
import subprocess

from ._common import stop_and_close, tls_read_to_eof, wait_for
from .keylog import read_keylog
from .nss import SelfServ

#: the lines OpenSSL writes per connection: TLS 1.3 (handshake and traffic secrets of both
#: directions, exporter) and TLS 1.2 (CLIENT_RANDOM)
LINES_PER_CONN = {"tls1.3": 5, "tls1.2": 1}


#: where Firefox ESR keeps its NSS (Debian's firefox-esr 140+ bundles NSS 3.11x there)
_MOZ_DIRS = ("/usr/lib/firefox-esr", "/usr/lib/firefox", "/opt/firefox")


def moz_nss_dir() -> str | None:
    """A directory holding an NSS build with its own libssl3/libnss3/libsoftokn3/libfreeblpriv3
    whose libssl3 honours SSLKEYLOGFILE (Mozilla builds it with NSS_ALLOW_SSLKEYLOGFILE)."""
    for d in filter(None, (os.environ.get("TLSTAP_TEST_NSS_DIR"), *_MOZ_DIRS)):
        libs = [os.path.join(d, f"lib{n}.so") for n in ("ssl3", "nss3", "softokn3", "freeblpriv3")]
        if all(map(os.path.exists, libs)):
            with open(libs[0], "rb") as f:
                if b"SSLKEYLOGFILE" in f.read():
                    return d
    return None


def tstclnt_handshake(server, version: str, data: bytes = b"ping\n", timeout: float = 20,
                      lib_dir: str | None = None, keylog=None) -> int:
    """One tstclnt connection (-V version:version, server cert not checked) to an
    OpenSSLServer started with keylog=True, sending `data`; returns once s_server has logged the
    connection's secrets (the client derived them before its Finished), then stops tstclnt.
    lib_dir: the NSS build to run it on (LD_LIBRARY_PATH); keylog: its SSLKEYLOGFILE.
    Returns tstclnt's pid."""
    before = len(server.keylog())
    env = dict(os.environ)
    if lib_dir:
        env["LD_LIBRARY_PATH"] = lib_dir
    if keylog:
        env["SSLKEYLOGFILE"] = str(keylog)
    cli = subprocess.Popen(["tstclnt", "-D", "-o", "-h", "127.0.0.1", "-p", str(server.port),
                            "-V", f"{version}:{version}"], env=env,
                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        cli.stdin.write(data)
        cli.stdin.flush()

        def logged():
            if cli.poll() is not None:
                raise RuntimeError(f"tstclnt exited rc={cli.returncode}: {cli.stderr.read()[-2000:]!r}\n"
                                   f"{server.stderr()}")
            return len(server.keylog()) >= before + LINES_PER_CONN[version]
        wait_for(logged, timeout, "s_server to log the connection's secrets")
    finally:
        stop_and_close(cli)
        cli.stderr.close()
    return cli.pid


class TicketSelfServ(SelfServ):
    """selfserv issuing TLS 1.3 session tickets (-u), so TLS 1.3 clients can resume."""

    def argv(self, port, tmp) -> list[str]:
        return [*super().argv(port, tmp), "-u"]


def pyssl_to_selfserv(port: int, version: str, keylog_path, request: bytes = b"GET / HTTP/1.0\r\n\r\n",
                      timeout: float = 20, session=None, ctx=None):
    """One Python ssl connection to selfserv on `port` with TLS `version` ("tls1.2", "tls1.3"),
    its secrets appended to keylog_path. Returns (that file's lines so far, selfserv's answer
    read to EOF: selfserv closes after answering, the connection's SSLSession, whether it
    resumed `session`). Resuming needs the first connection's `ctx` (the 5th value of the
    first call's result)."""
    if ctx is not None:
        return _pyssl_exchange(ctx, port, request, timeout, session, keylog_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    v = {"tls1.2": ssl.TLSVersion.TLSv1_2, "tls1.3": ssl.TLSVersion.TLSv1_3}[version]
    ctx.minimum_version = ctx.maximum_version = v
    ctx.keylog_filename = str(keylog_path)
    return _pyssl_exchange(ctx, port, request, timeout, session, keylog_path)


def _pyssl_exchange(ctx, port, request, timeout, session, keylog_path):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw, \
            ctx.wrap_socket(raw, session=session) as t:
        t.sendall(request)
        got = tls_read_to_eof(t, timeout)
        return read_keylog(keylog_path), got, t.session, t.session_reused, ctx
