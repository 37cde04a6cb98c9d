"""Fixtures: a certificate, Python ssl peers, nginx. All traffic on loopback."""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.peers import NginxServer

PEER = str(Path(__file__).with_name("pypeer.py"))


@pytest.fixture(scope="session")
def cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("cert")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost",
                    "-keyout", d / "key.pem", "-out", d / "cert.pem"], check=True, capture_output=True)
    return str(d / "cert.pem"), str(d / "key.pem")


def load_transcripts(path):
    with open(path) as f:
        out = json.load(f)
    for t in out:
        t["sent"], t["received"] = base64.b64decode(t["sent"]), base64.b64decode(t["received"])
        t["local"], t["remote"] = tuple(t["local"]), tuple(t["remote"])
    return out


class PyServer:
    def __init__(self, tmp_path, cert, host="127.0.0.1", respond_bytes=None):
        self.tmp, self.stop_file, self.out = tmp_path, tmp_path / "srv.stop", tmp_path / "srv.json"
        args = [sys.executable, PEER, "server", "--host", host, "--cert", cert[0], "--key", cert[1],
                "--out", str(self.out), "--stop-file", str(self.stop_file)]
        if respond_bytes is not None:
            args += ["--respond-bytes", str(respond_bytes)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())
        self.pid, self.host = self.proc.pid, host

    def close(self):
        self.stop_file.touch()
        self.proc.wait(30)
        return load_transcripts(self.out)


class PyClient:
    """Started, connected to nothing until go(): a capture can be scoped to its pid first."""

    def __init__(self, tmp_path, server, payloads, conns=1, threads=1, requests=1, respond_bytes=None):
        self.out = tmp_path / f"cli-{time.monotonic_ns()}.json"
        pfile = tmp_path / f"payloads-{time.monotonic_ns()}.json"
        pfile.write_text(json.dumps([base64.b64encode(p).decode() for p in payloads]))
        args = [sys.executable, PEER, "client", "--host", server.host, "--port", str(server.port),
                "--out", str(self.out), "--payloads", str(pfile), "--conns", str(conns),
                "--threads", str(threads), "--requests", str(requests)]
        if respond_bytes is not None:
            args += ["--respond-bytes", str(respond_bytes)]
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"
        self.pid = self.proc.pid

    def run(self, timeout=120):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert self.proc.wait(timeout) == 0
        return load_transcripts(self.out)


@pytest.fixture
def pyserver(tmp_path, cert):
    servers = []

    def start(**kw):
        s = PyServer(tmp_path, cert, **kw)
        servers.append(s)
        return s
    yield start
    for s in servers:
        if s.proc.poll() is None:
            s.stop_file.touch()
            try:
                s.proc.wait(10)
            except subprocess.TimeoutExpired:
                s.proc.kill()


def free_port(host="127.0.0.1"):
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@pytest.fixture
def nginx(cert):
    """start(files) -> a running NginxServer (tests/peers/nginx.py), stopped at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda files: stack.enter_context(NginxServer(cert[0], cert[1], files))


def static_node() -> str | None:
    """A node binary with OpenSSL linked in (not libssl.so)."""
    for cand in (os.environ.get("TLSTAP_TEST_NODE"), shutil.which("node")):
        if cand and os.path.exists(cand):
            ldd = subprocess.run(["ldd", cand], capture_output=True, text=True).stdout
            if "libssl" not in ldd:
                return cand
    return None
