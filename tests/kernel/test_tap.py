"""The Tap helper itself (tap.py), on a stand-in for tlstap that behaves as told: a capture that
fails at shutdown fails the test; a failure inside the `with` is not hidden by that check; the
stopping signal is sent once."""
from __future__ import annotations

import signal
import sys

import pytest

from .tap import Tap

#: says "ready in" like tlstap, waits for SIGINT, then "shuts down" for half a second (as tlstap
#: drains and decodes) and exits with the given status plus the SIGINTs received meanwhile
STAND_IN = r"""
import signal, sys, time
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
print("tlstap: ready in 0.00s: stand-in", file=sys.stderr, flush=True)
signal.sigwait({signal.SIGINT})
extra, end = 0, time.monotonic() + 0.5
while (left := end - time.monotonic()) > 0:
    extra += signal.sigtimedwait({signal.SIGINT}, left) is not None
print("tlstap: interrupted: summary", file=sys.stderr, flush=True)
sys.exit(int(sys.argv[1]) + extra)
"""


class StandIn(Tap):
    def __init__(self, tmp_path, status: int):
        self._setup(str(tmp_path / "unused"), [sys.executable, "-c", STAND_IN, str(status)])


def test_a_capture_failing_at_shutdown_fails_the_test(tmp_path):
    with pytest.raises(AssertionError, match="exited with status 3"):
        with StandIn(tmp_path, 3):
            pass


def test_a_failure_inside_the_block_is_the_one_reported(tmp_path):
    with pytest.raises(ZeroDivisionError):
        with StandIn(tmp_path, 3):
            1 / 0


def test_one_stopping_signal_and_the_whole_stderr(tmp_path):
    with StandIn(tmp_path, 0) as tap:
        tap.interrupt()
        assert tap.stop() == 0                  # no second SIGINT (it would be counted)
    assert tap.stderr_lines[-1] == "tlstap: interrupted: summary\n"
    with pytest.raises(AssertionError, match="already sent"):
        tap.interrupt(signal.SIGTERM)
