"""When the preferred BPF programs do not load, tlstap says so, once, and captures with the
conservative ones.

The kernel here takes the preferred programs, so the refusal is forced with the development
switch TLSTAP_FORCE_COPY=1, which takes start()'s real fallback path: the conservative
programs are loaded and attached for real, and what they capture must be what the peers sent.
"""
from __future__ import annotations

from tests.peers.openssl_cli import OpenSSLServer, openssl_exchange

from .tap import Tap, assert_streams_match

NOTE = "did not load"


def _exchange(tmp_path, cert) -> Tap:
    with OpenSSLServer(*cert) as srv:
        with Tap(tmp_path, "--pid", str(srv.pid)) as tap:
            transcripts = openssl_exchange(srv, b"c" * 100_000, b"s" * 50_000)
        assert tap.proc.returncode == 0, tap.stderr
    assert_streams_match(tap.data(), [transcripts[1]])
    return tap


def test_forced_fallback_is_told_once_and_captures(tmp_path, cert, monkeypatch):
    monkeypatch.setenv("TLSTAP_FORCE_COPY", "1")
    tap = _exchange(tmp_path, cert)
    notes = [line for line in tap.stderr_lines if NOTE in line]
    assert len(notes) == 1, tap.stderr
    assert notes[0].startswith("tlstap: the preferred programs (ssl_rw_exit"), notes[0]
    assert "(TLSTAP_FORCE_COPY=1): using the conservative ones (ssl_rw_exit_copy" in notes[0], notes[0]


def test_preferred_programs_load_without_a_note(tmp_path, cert, monkeypatch):
    monkeypatch.delenv("TLSTAP_FORCE_COPY", raising=False)
    tap = _exchange(tmp_path, cert)
    assert NOTE not in tap.stderr, tap.stderr
