"""Fixtures: a certificate, Python ssl peers, nginx. All traffic on loopback."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest

from tests.peers import NginxServer, PySSLClient, PySSLServer, Transcript, make_cert


@pytest.fixture(scope="session")
def cert(tmp_path_factory):
    c, k = make_cert(tmp_path_factory.mktemp("cert"))
    return str(c), str(k)


def finish(srv: PySSLServer) -> list[Transcript]:
    """Stop a server and return its transcripts (server view)."""
    srv.stop()
    return srv.transcripts()


def client(srv: PySSLServer, payloads: list[bytes], **kw) -> PySSLClient:
    """A client of srv, started but idle until go(): a capture can be scoped to its pid first."""
    return PySSLClient(srv.port, payloads, host=srv.host, timeout=120, **kw)


@pytest.fixture
def pyserver(cert):
    """start(host=..., response=...) -> a running PySSLServer, stopped at teardown."""
    with contextlib.ExitStack() as stack:
        yield lambda **kw: stack.enter_context(PySSLServer(cert[0], cert[1], **kw))


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
