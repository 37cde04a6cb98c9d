"""A TLS client on ANY libssl .so (by path), driven through ctypes in its own process.

Used with OpenSSL builds other than the system one, e.g. the OpenSSL 3.5 libssl bundled in the
psycopg2-binary wheel (find_psycopg2_libssl()). The child (ctypes_ssl_peer.py) loads only that
library, so it can be pid-scoped and a foreign libssl never enters the test process; it calls
TLS_client_method, SSL_CTX_set_keylog_callback (the key log oracle), optional min/max version,
ciphersuites, cipher list and groups, SSL_set_fd on a connected socket, SSL_connect,
SSL_write_ex / SSL_read_ex per request (optionally SSL_key_update before given requests) and
SSL_shutdown. Talks the pyssl_peer framing, so PySSLServer is its peer:

    with PySSLServer(cert, key, keylog=True) as srv:
        c = CtypesSSLClient(find_psycopg2_libssl(), srv.port, [b"a", b"b"], key_updates=[1])
        start_capture(c.pid)          # idle until go(): libssl is mapped, nothing connected yet
        r = c.go().wait()             # CtypesSSLResult
"""
from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ._common import HERE, ClientProcess, Transcript, stop_process, tail
from .keylog import normalize_keylog_line

SCRIPT = HERE / "ctypes_ssl_peer.py"
PYTHON = sys.executable


def find_psycopg2_libssl() -> Path | None:
    """The libssl bundled in the installed psycopg2-binary wheel
    (site-packages/psycopg2_binary.libs/libssl-<hash>.so.3, libcrypto beside it), or None.
    Does not import psycopg2 (that would load its libssl into this process)."""
    dirs = []
    try:
        spec = importlib.util.find_spec("psycopg2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        dirs.append(Path(spec.origin).resolve().parent.parent)
    for key in ("platlib", "purelib"):
        dirs.append(Path(sysconfig.get_paths()[key]))
    for d in dirs:
        hits = sorted((d / "psycopg2_binary.libs").glob("libssl-*.so*"))
        if hits:
            return hits[0]
    return None


def system_libssl() -> Path | None:
    """The x86-64 libssl.so.3 the dynamic linker would load (ldconfig cache), or None."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        name, _, rest = line.strip().partition(" ")
        if name == "libssl.so.3" and "x86-64" in rest:
            return Path(rest.rpartition("=> ")[2])
    return None


@dataclass
class CtypesSSLResult:
    pid: int
    transcript: Transcript
    keylog: list[str]                  # lines from SSL_CTX_set_keylog_callback, normalized, in order
    messages: list[tuple[str, str]]    # (sent|received, handshake type; HelloRetryRequest by its random)
    version: str | None                # SSL_get_version
    cipher: str | None                 # SSL_CIPHER_get_name
    openssl_version: str               # OpenSSL_version(OPENSSL_VERSION) of the loaded library
    libssl: str
    mapped: list[str] = field(default_factory=list)   # every libssl*/libcrypto* file the child mapped
    key_updates_called: int = 0        # SSL_key_update calls that returned 1
    error: str | None = None

    def _count(self, direction: str, name: str) -> int:
        return sum(1 for d, n in self.messages if d == direction and n == name)

    @property
    def key_updates_sent(self) -> int:
        return self._count("sent", "KeyUpdate")

    @property
    def key_updates_received(self) -> int:
        return self._count("received", "KeyUpdate")

    @property
    def hello_retry(self) -> bool:
        return self._count("received", "HelloRetryRequest") == 1 and self._count("sent", "ClientHello") == 2


class CtypesSSLClient(ClientProcess):
    """ctypes TLS client process, idle (libssl loaded, SSL_CTX configured) until go().

    payloads: one request each on a single connection, in order; the response is expected to
    be len(payload) bytes (PySSLServer echo) or expect_response_len. tls_version sets min and
    max ("1.2"/"1.3"); min_version / max_version separately. ciphersuites: TLS 1.3 suites
    (SSL_CTX_set_ciphersuites); ciphers: TLS <= 1.2 list (SSL_CTX_set_cipher_list); groups:
    SSL_CTX_set1_groups_list. key_updates: indices of the requests before which
    SSL_key_update(ssl, key_update_type) is called ("requested" = SSL_KEY_UPDATE_REQUESTED: the
    server then updates its sending key too); the KeyUpdate goes out with that request's write.
    """

    def __init__(self, libssl, port: int, payloads: list[bytes], host: str = "127.0.0.1",
                 expect_response_len: int | None = None, timeout: float = 30, tls_version: str | None = None,
                 min_version: str | None = None, max_version: str | None = None,
                 ciphersuites: str | None = None, ciphers: str | None = None, groups: str | None = None,
                 key_updates=(), key_update_type: str = "requested", sni: str | None = "localhost"):
        if not payloads:
            raise ValueError("need at least one payload")
        if key_update_type not in ("requested", "not_requested"):
            raise ValueError(f"key_update_type {key_update_type!r}")
        self.libssl = str(libssl)
        if not Path(self.libssl).is_file():
            raise FileNotFoundError(self.libssl)
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="ctypes-ssl-")
        d = Path(self._tmp.name)
        (d / "p").mkdir()
        for i, p in enumerate(payloads):
            (d / "p" / f"{i}.bin").write_bytes(p)
        self._out, self._err, self.keylog_path = d / "out.json", d / "stderr", d / "keylog.txt"
        cfg = {"libssl": self.libssl, "host": host, "port": port, "payload_dir": str(d / "p"),
               "npayloads": len(payloads), "expect_len": expect_response_len, "timeout": timeout,
               "out": str(self._out), "keylog": str(self.keylog_path),
               "min_version": min_version or tls_version, "max_version": max_version or tls_version,
               "ciphersuites": ciphersuites, "cipher_list": ciphers, "groups": groups,
               "key_updates": sorted(set(key_updates)), "key_update_type": key_update_type, "sni": sni}
        self.proc = None
        self._spawn([PYTHON, str(SCRIPT), json.dumps(cfg)], "ctypes TLS client")
        self._started = False

    def go(self) -> "CtypesSSLClient":
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()
        self._started = True
        return self

    def wait(self, check: bool = True) -> CtypesSSLResult:
        """Wait (bounded) for the client; raise if the exchange failed (unless check=False)."""
        if not self._started:
            self.go()
        try:
            rc = self.proc.wait(self.timeout + 10)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, timeout=5)
            msg = tail(self._err)
            self.close()
            raise TimeoutError(f"ctypes TLS client pid {self.pid} did not finish\n{msg}")
        try:
            if not self._out.exists():
                raise RuntimeError(f"ctypes TLS client rc={rc}, no result\n{tail(self._err)}")
            r = json.loads(self._out.read_text())
            res = CtypesSSLResult(
                pid=self.pid,
                transcript=Transcript(r["pid"], r["tid"], tuple(r["local"]) if r["local"] else None,
                                      tuple(r["remote"]) if r["remote"] else None,
                                      base64.b64decode(r["sent"]), base64.b64decode(r["received"]),
                                      r["error"]),
                keylog=[normalize_keylog_line(ln) for ln in r["keylog"]],
                messages=[tuple(m) for m in r["messages"]], version=r["version"], cipher=r["cipher"],
                openssl_version=r["openssl_version"], libssl=r["libssl"], mapped=r["mapped"],
                key_updates_called=r["key_updates_called"], error=r["error"])
            if check and (rc != 0 or res.error):
                raise RuntimeError(f"ctypes TLS client rc={rc}: {res.error}\n{tail(self._err)}")
            return res
        finally:
            self.close()


def run_ctypes_client(libssl, port: int, payloads: list[bytes], **kw) -> CtypesSSLResult:
    """CtypesSSLClient(...).go().wait() in one call."""
    return CtypesSSLClient(libssl, port, payloads, **kw).go().wait()


__all__ = ["CtypesSSLClient", "CtypesSSLResult", "run_ctypes_client", "find_psycopg2_libssl",
           "system_libssl"]
