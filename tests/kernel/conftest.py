"""Fixtures: a certificate, Python ssl peers, nginx. All traffic on loopback."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


NGINX_CONF = """user root;  # the docroot is in pytest's private tmp dir
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {d}/www;
    }}
}}
"""


class Nginx:
    def __init__(self, d: Path, cert, files: dict[str, bytes]):
        (d / "www").mkdir()
        for name, body in files.items():
            (d / "www" / name).write_bytes(body)
        self.port = free_port()
        (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=self.port, cert=cert[0], key=cert[1]))
        self.proc = subprocess.Popen(["nginx", "-c", str(d / "nginx.conf")])
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        kids = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
        self.worker = int(kids[0])

    def url(self, path):
        return f"https://127.0.0.1:{self.port}/{path}"

    def close(self):
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def nginx(tmp_path, cert):
    started = []

    def start(files):
        d = tmp_path / f"nginx{len(started)}"
        d.mkdir()
        n = Nginx(d, cert, files)
        started.append(n)
        return n
    yield start
    for n in started:
        n.close()


def static_node() -> str | None:
    """A node binary with OpenSSL linked in (not libssl.so)."""
    for cand in (os.environ.get("TLSTAP_TEST_NODE"), shutil.which("node")):
        if cand and os.path.exists(cand):
            ldd = subprocess.run(["ldd", cand], capture_output=True, text=True).stdout
            if "libssl" not in ldd:
                return cand
    return None
