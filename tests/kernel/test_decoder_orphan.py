"""Text mode's decoder process ends with tlstap, also when tlstap is SIGKILLed.

The decoder (spool.py) is a forked child working through a backlog at idle priority. Killed,
tlstap cannot tell it anything: it used to go on decoding the whole backlog on its own
(parent 1, a CPU's worth, for minutes). A burst from a real s_client to s_server builds a
backlog; tlstap is SIGKILLed at once; its decoder must be gone within a few seconds without
working through that backlog, and the output must be a clean prefix: every line a JSON
record, the captured bytes a prefix of those sent.
"""
from __future__ import annotations

import json
import re
import os
import select

from tests.peers.openssl_cli import OpenSSLServer, openssl_exchange

from .tap import Tap, payload

BURST = 384 << 20
GONE_WITHIN_S = 5


def _children(pid: int) -> list[int]:
    kids = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


def _alive(pid: int) -> bool:
    """Running and not a zombie (a reaped-later zombie has ended all the same)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_decoder_ends_when_tlstap_is_killed(tmp_path, cert):
    with OpenSSLServer(*cert) as srv:
        tap = Tap(tmp_path, "--pid", str(srv.pid))
        with tap:
            decoders = _children(tap.proc.pid)
            assert len(decoders) == 1, decoders
            decoder = decoders[0]
            exited = os.pidfd_open(decoder)        # readable once it has exited (zombie or not)
            try:
                openssl_exchange(srv, bytes(range(256)) * (BURST // 256), b"x", timeout=60)
                tap.kill()
                select.select([exited], [], [], GONE_WITHIN_S)
                assert not _alive(decoder), f"the decoder outlived tlstap by over {GONE_WITHIN_S}s"
            finally:
                if _alive(decoder):
                    os.kill(decoder, 9)
                os.close(exited)
    with open(tap.out, "rb") as f:
        text = f.read()
    lines = text.split(b"\n")[:-1]          # a last line without its newline may be cut short
    records = [json.loads(line) for line in lines]
    # what s_server read, in order: a prefix of what s_client sent
    got = b"".join(payload(r) for r in records
                   if r["type"] == "data" and r["pid"] == srv.pid and r["dir"] == "read")
    sent = bytes(range(256)) * (BURST // 256)
    assert got == sent[:len(got)]
    # The decoder says what it left (before the fix it said nothing and went on through the
    # backlog alone: all 384 MiB, in 0.7-1 s, in its undecoded "hurry" form). How far behind
    # it was depends on the machine (at idle priority beside the two peers, measured: nothing
    # decoded by then; with 48 MiB it keeps up), so the amount is checked for consistency only.
    tap.wait_stderr()            # the decoder, gone, held the last of it
    said = [m for line in tap.stderr_lines
            if (m := re.search(r"decoder: the capture process died; about (\d+) bytes", line))]
    assert len(said) == 1, tap.stderr
    if int(said[0].group(1)):
        assert len(got) < len(sent), "the decoder left backlog undecoded, yet the output holds it all"
