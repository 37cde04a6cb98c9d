"""Outputs combine: `tlstap tls -o out.jsonl -k keys.log -i lo -w cap.pcapng` writes the
plaintext, the key log and the decryptable pcapng of the same traffic in one capture, from one
set of probes; and every flag either takes effect or is refused.

Oracles: the peers' own transcripts (bytes sent and received) and their own key logs
(Python's ssl keylog_filename); tshark reads only the pcapng file.
"""
from __future__ import annotations

import os
import re
import stat

import pytest

from tests.peers import PySSLServer, have_tshark, tshark_tls_streams

from .conftest import client
from .tap import Tap, assert_same_lines, assert_streams_match, run_tlstap, tlstap_exe


class AllTap(Tap):
    """text (JSON lines), key log and pcapng at once."""

    def __init__(self, tmp_path, *args: str):
        out = str(tmp_path / "out.jsonl")
        self.keys = str(tmp_path / "keys.log")
        self.pcap = str(tmp_path / "cap.pcapng")
        self._setup(out, [tlstap_exe(), "tls", "--format", "json", "--raw", "-o", out, "-k", self.keys,
                          "-i", "lo", "-w", self.pcap, *args])

    def lines(self) -> list[str]:          # for assert_same_lines
        from tests.peers import read_keylog
        return read_keylog(self.keys)


@pytest.mark.skipif(not have_tshark(), reason="tshark is not installed")
@pytest.mark.parametrize("tls", ["1.3", "1.2"])
def test_text_keylog_and_pcapng_from_one_capture(tmp_path, cert, tls):
    payloads = [os.urandom(3000), b"second request " * 50]
    with PySSLServer(*cert, keylog=True, tls_version=tls) as srv:
        with AllTap(tmp_path, "tcp", "port", str(srv.port)) as tap:
            cl = client(srv, payloads, keylog=True, tls_version=tls)
            (t,) = cl.wait()
            srv.stop()
            assert tap.stop() == 0, tap.stderr
    # text: what the client really sent and received, byte for byte
    assert_streams_match([r for r in tap.data() if r["pid"] == t.pid], [t])
    # key log: the libraries' own lines, both ends
    assert_same_lines(tap, cl.keylog(), srv.keylog())
    # pcapng: tshark decrypts the same bytes from the file alone
    (s,) = tshark_tls_streams(tap.pcap, tls_ports=[srv.port])
    assert s.sent_by(t.local) == t.sent and s.received_by(t.local) == t.received
    for path in (tap.out, tap.keys, tap.pcap):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # one ready line, one summary per output, each ending as the capture did
    err = tap.stderr
    assert len(re.findall(r"^tlstap: ready in ", err, re.M)) == 1, err
    for what in ("bytes captured", "key log lines written", "TLS secrets written"):
        assert len(re.findall(rf"^tlstap: interrupted: .*{what}", err, re.M)) == 1, err


def test_the_key_probes_are_shared(tmp_path):
    """-k with -w: one key source feeds both files: the probe count is the key capture's once
    plus the packet programs, as with -w alone (twice the key probes otherwise)."""
    keys_only = run_ready(tmp_path / "a", ["-k", str(tmp_path / "a.log")])
    both = run_ready(tmp_path / "b", ["-k", str(tmp_path / "b.log"), "-i", "lo", "-w", str(tmp_path / "b.pcapng")])
    pcap_only = run_ready(tmp_path / "c", ["-i", "lo", "-w", str(tmp_path / "c.pcapng")])
    assert both == pcap_only > keys_only


def run_ready(tmp_path, args: list[str]) -> int:
    """Start `tlstap tls ARGS`, read its probe count from the ready line, stop it."""
    os.makedirs(tmp_path, exist_ok=True)
    tap = Tap(tmp_path)
    tap._setup(tap.out, [tlstap_exe(), "tls", *args])
    with tap:
        m = re.search(r"ready in [\d.]+s: (\d+) probes", tap.stderr)
        assert m, tap.stderr
    return int(m.group(1))


@pytest.mark.parametrize("args,expect", [
    (["-m", "keylog", "--hex"], "--hex"),
    (["-k", "{tmp}/k.log", "--format", "json"], "--format"),
    (["-k", "{tmp}/k.log", "--raw"], "--raw"),
    (["-i", "lo", "--max-body", "1K"], "--max-body"),
    (["-w", "{tmp}/c.pcapng"], "-i IFACE"),
    (["-o", "-", "-k", "-"], "two outputs"),
    (["-o", "{tmp}/same", "-w", "{tmp}/same", "-i", "lo"], "two outputs"),
    (["-o", "{tmp}/o.txt", "tcp", "port", "443"], "-m pcapng"),
])
def test_every_flag_takes_effect_or_is_refused(tmp_path, args, expect):
    before = set(os.listdir(tmp_path))
    r = run_tlstap("tls", *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and expect in r.stderr, r.stderr
    assert set(os.listdir(tmp_path)) == before      # refused: no file created
