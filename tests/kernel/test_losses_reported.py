"""Every loss reaches the output, also those of the last second before Ctrl-C.

The capture checks its loss counters once a second; losses after the last check used to show
only in the summary. A tiny ring buffer and a burst of large writes from a real TLS peer force
ring-buffer losses; SIGINT comes at once after the burst. The `lost` records in the output
and the `lost`/`dropped` status lines on stderr must each add up to the summary's count.
"""
from __future__ import annotations

import re
import signal

from tests.peers.openssl_cli import OpenSSLServer, openssl_exchange

from .conftest import client, finish
from .tap import KeyTap, Tap


def _status_losses(stderr: str) -> int:
    """Records the status lines said were lost (ring) or dropped (decoder backlog)."""
    return sum(int(m.group(1)) for m in re.finditer(r"^tlstap: (?:lost|dropped) (\d+) records", stderr, re.M))



def test_losses_of_the_last_second_are_in_the_output(tmp_path, cert):
    """32 MiB from s_client to s_server in 16 KiB SSL_writes (~0.3 s): the server's SSL_reads
    overflow a 16 KiB ring at once; Ctrl-C right after."""
    with OpenSSLServer(*cert) as srv:
        with Tap(tmp_path, "--pid", str(srv.pid), "--mapsize", "16K", "--max-payload", "4K") as tap:
            openssl_exchange(srv, b"a" * (32 << 20), b"x")
            tap.interrupt()                          # no once-a-second check since the burst
            assert tap.stop(timeout=60) == 0, tap.stderr
    summary = tap.summary()
    assert summary["lost_records"] > 0, "the burst lost nothing: the test proves nothing"
    lost = [r for r in tap.records() if r["type"] == "lost"]
    assert sum(r["records"] for r in lost) == summary["lost_records"], (lost, summary)
    assert sum(r["bytes"] for r in lost) == summary["lost_bytes"], (lost, summary)
    assert _status_losses(tap.stderr) == summary["lost_records"], tap.stderr


def test_pcapng_losses_of_the_last_second_are_told(tmp_path, cert):
    """-m pcapng: the same burst through lo into a 1 MiB packet ring while the capture is
    stopped (SIGSTOP), then SIGINT and SIGCONT at once. The status lines add up to the
    summary's lost packets, and so does the file's statistics block (isb_ifdrop)."""
    from tests.unit.test_pcapng_writer import blocks, options
    from .test_pcapng_capture import PcapTap
    with OpenSSLServer(*cert) as srv:
        with PcapTap(tmp_path, "--mapsize", "1M", "tcp", "port", str(srv.port)) as tap:
            tap.proc.send_signal(signal.SIGSTOP)     # the ring fills: losses for sure
            try:
                openssl_exchange(srv, b"a" * (32 << 20), b"x")
            finally:
                tap.interrupt()
                tap.proc.send_signal(signal.SIGCONT)
            assert tap.stop(timeout=60) == 0, tap.stderr
    summary = re.search(r"^tlstap: interrupted: .* lost (\d+) packets", tap.stderr, re.M)
    assert summary, tap.stderr
    lost = int(summary.group(1))
    assert lost > 0, f"the burst lost nothing: the test proves nothing\n{tap.stderr}"
    told = sum(int(m.group(1)) for m in re.finditer(r"^tlstap: lost (\d+) packets", tap.stderr, re.M))
    assert told == lost, tap.stderr
    isb = [dict(options(body[12:])) for _, btype, body in blocks(tap.out) if btype == 5]
    assert len(isb) == 1 and int.from_bytes(isb[0][5], "little") == lost


def test_keylog_losses_of_the_last_second_are_told(tmp_path, pyserver):
    """-m keylog with a 4 KiB key ring (about a dozen key events): the capture is stopped
    (SIGSTOP) while 60 handshakes log their secrets, so the ring fills and events are lost;
    then SIGINT and SIGCONT at once. The status lines add up to the summary's lost events."""
    srv = pyserver()
    c = client(srv, [b"x"], conns=60, threads=4)
    with KeyTap(tmp_path, "--pid", str(c.pid), "--mapsize", "4K") as tap:
        tap.proc.send_signal(signal.SIGSTOP)
        try:
            c.go().wait()
        finally:
            tap.interrupt()
            tap.proc.send_signal(signal.SIGCONT)
        assert tap.stop(timeout=60) == 0, tap.stderr
    finish(srv)
    summary = re.search(r"^tlstap: interrupted: .* lost (\d+) events", tap.stderr, re.M)
    assert summary, tap.stderr
    lost = int(summary.group(1))
    assert lost > 0, "no key event lost: the test proves nothing"
    told = sum(int(m.group(1)) for m in re.finditer(r"^tlstap: lost (\d+) key events", tap.stderr, re.M))
    assert told == lost, tap.stderr
