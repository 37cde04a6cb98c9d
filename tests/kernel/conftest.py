"""Fixtures: a certificate, Python ssl peers, nginx. All traffic on loopback."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest

from tests.kernel.tap import Tap
from tests.peers import NginxServer, PySSLClient, PySSLServer, Transcript, make_cert

#: modules whose text-mode tests run once per source of plaintext (issue 17: both must give the
#: same payloads), except those marked probe_only
BOTH_SOURCES = {"test_openssl_capture", "test_gnutls_capture", "test_gotls_capture", "test_http_capture",
                "test_combined_outputs"}


def pytest_generate_tests(metafunc):
    if (metafunc.module.__name__.rpartition(".")[2] in BOTH_SOURCES
            and not metafunc.definition.get_closest_marker("probe_only")):
        metafunc.parametrize("text_source", ["probe", "wire"], indirect=True)


@pytest.fixture(autouse=True)
def text_source(request):
    """The --source every Tap in the test passes: the parameter, else probe (the other modules test
    the probe source's own machinery: its ring, its attribution, its load fallbacks)."""
    Tap.default_source = getattr(request, "param", "probe")
    yield Tap.default_source
    Tap.default_source = None


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
