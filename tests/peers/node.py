"""Node.js HTTPS client peer (node_client.js); node links OpenSSL statically."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ._common import HERE, Addr, ClientProcess, tail

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


class NodeClient(ClientProcess):
    """node process started idle (prints READY, waits for go()) so a tracer can attach first."""

    def __init__(self, url: str, method: str = "GET", body: bytes = b"", timeout: float = 30):
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="node-")
        d = Path(self._tmp.name)
        self._out, self._err = d / "out.json", d / "stderr"
        cfg = {"url": url, "method": method, "out": str(self._out), "timeoutMs": int(timeout * 1000),
               "bodyFile": None}
        if body:
            (d / "body").write_bytes(body)
            cfg["bodyFile"] = str(d / "body")
        self._spawn([NODE, str(SCRIPT), json.dumps(cfg)], "node client")

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
                              r["status"], r["headers"])
        finally:
            self.close()



def run_node_https(url: str, method: str = "GET", body: bytes = b"", timeout: float = 30) -> NodeResult:
    return NodeClient(url, method, body, timeout).go().wait()
