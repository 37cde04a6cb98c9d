"""Node.js HTTPS client peer (node_client.js); node links OpenSSL statically.

keylog=True runs node with --tls-keylog=FILE (node appends what OpenSSL's keylog callback
produces); NodeResult.keylog has the lines. tls_version ("1.2"/"1.3": min = max) and ciphers
(node's `ciphers` option: OpenSSL cipher list, TLS 1.3 suite names allowed) pick the handshake.
"""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ._common import HERE, Addr, ClientProcess, tail
from .keylog import read_keylog

SCRIPT = HERE / "node_client.js"
NODE = shutil.which("node") or "/usr/bin/node"


@dataclass
class NodeResult:
    pid: int
    body: bytes
    local: Addr       # res.socket.localAddress/localPort
    remote: Addr
    status: int
    headers: dict
    protocol: str | None = None      # tlsSocket.getProtocol(), e.g. 'TLSv1.3'
    cipher: str | None = None        # getCipher().standardName, e.g. 'TLS_AES_128_GCM_SHA256'
    keylog: list[str] = field(default_factory=list)   # --tls-keylog lines (keylog=True)


class NodeClient(ClientProcess):
    """node process started idle (prints READY, waits for go()) so a tracer can attach first."""

    def __init__(self, url: str, method: str = "GET", body: bytes = b"", timeout: float = 30,
                 keylog: bool = False, tls_version: str | None = None, ciphers: str | None = None):
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="node-")
        d = Path(self._tmp.name)
        self._out, self._err = d / "out.json", d / "stderr"
        cfg = {"url": url, "method": method, "out": str(self._out), "timeoutMs": int(timeout * 1000),
               "bodyFile": None}
        if tls_version:
            cfg["minVersion"] = cfg["maxVersion"] = {"1.2": "TLSv1.2", "1.3": "TLSv1.3"}[tls_version]
        if ciphers:
            cfg["ciphers"] = ciphers
        if body:
            (d / "body").write_bytes(body)
            cfg["bodyFile"] = str(d / "body")
        self.keylog_path = d / "keylog.txt" if keylog else None
        opts = [f"--tls-keylog={self.keylog_path}"] if keylog else []
        self._spawn([NODE, *opts, str(SCRIPT), json.dumps(cfg)], "node client")

    def go(self) -> "NodeClient":
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.close()
        return self

    def wait(self) -> NodeResult:
        if not self.proc.stdin.closed:
            self.go()
        try:
            rc = self.proc.wait(self.timeout + 10)
        except subprocess.TimeoutExpired:
            self.close()
            raise TimeoutError(f"node pid {self.pid} did not finish")
        try:
            if not self._out.exists():
                raise RuntimeError(f"node rc={rc}, no result\n{tail(self._err)}")
            r = json.loads(self._out.read_text())
            if rc != 0 or r["error"]:
                raise RuntimeError(f"node rc={rc}: {r['error']}\n{tail(self._err)}")
            return NodeResult(self.pid, base64.b64decode(r["body"]), tuple(r["local"]), tuple(r["remote"]),
                              r["status"], r["headers"], r.get("protocol"), r.get("cipher"),
                              read_keylog(self.keylog_path) if self.keylog_path else [])
        finally:
            self.close()



def run_node_https(url: str, method: str = "GET", body: bytes = b"", timeout: float = 30,
                   keylog: bool = False, tls_version: str | None = None, ciphers: str | None = None) -> NodeResult:
    return NodeClient(url, method, body, timeout, keylog, tls_version, ciphers).go().wait()
