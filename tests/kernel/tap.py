"""Run the real `tlstap` command as a subprocess and read what it captured."""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

READY_TIMEOUT = 30


def tlstap_exe() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "tlstap")
    return exe if os.path.exists(exe) else shutil.which("tlstap")


def run_tlstap(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([tlstap_exe(), *args], capture_output=True, text=True, timeout=timeout)


class Tap:
    """`tlstap tls --format json -o FILE ...` running in the background.

    Leaving the `with` block stops it (stop()) and, unless the block raised, requires its exit
    status to be `expect_exit` (0: a capture that failed or crashed at shutdown fails the test)."""

    expect_exit = 0
    #: --source of every text-mode Tap, set per test by tests/kernel/conftest.py (None: tlstap's default)
    default_source: str | None = None

    def __init__(self, tmp_path, *args: str, fmt: str = "json", command: str = "tls", raw: bool = True):
        out = str(tmp_path / f"capture-{time.monotonic_ns()}.{'jsonl' if fmt == 'json' else 'txt'}")
        source = ["--source", self.default_source] if self.default_source and "--source" not in args else []
        self._setup(out, [tlstap_exe(), command, "--format", fmt, "-o", out, *(["--raw"] if raw else []),
                          *source, *args])

    def _setup(self, out: str, argv: list[str]) -> None:
        self.out, self.argv = out, argv
        self.proc: subprocess.Popen | None = None
        self.stderr_lines: list[str] = []
        self._pump: threading.Thread | None = None
        self._new_line = threading.Condition()
        self._stderr_ended = False
        self._signalled: int | None = None

    def __enter__(self) -> "Tap":
        self.proc = subprocess.Popen(self.argv, stderr=subprocess.PIPE, text=True)
        self._pump = threading.Thread(target=self._read_stderr, daemon=True)
        self._pump.start()
        if not self.wait_line(r"ready in", READY_TIMEOUT) or self.proc.poll() is not None:
            if self.proc.poll() is None:
                self.kill()
            self._pump.join(5)
            raise AssertionError(f"tlstap did not become ready: {self.stderr}")
        return self

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            with self._new_line:
                self.stderr_lines.append(line)
                self._new_line.notify_all()
        with self._new_line:
            self._stderr_ended = True
            self._new_line.notify_all()

    def wait_line(self, pattern: str, timeout: float) -> str | None:
        """The first stderr line matching the regex `pattern`, waiting for it up to `timeout` s
        (None: not written, or stderr ended without it). tlstap's status lines are its sync points."""
        rx = re.compile(pattern)
        with self._new_line:
            self._new_line.wait_for(lambda: self._stderr_ended or any(rx.search(ln) for ln in self.stderr_lines),
                                    timeout)
            return next((ln for ln in self.stderr_lines if rx.search(ln)), None)

    def __exit__(self, exc_type, *exc) -> None:
        code = self.stop()
        if exc_type is None:
            assert code == self.expect_exit, f"tlstap exited with status {code}, not {self.expect_exit}:\n{self.stderr}"

    def interrupt(self, sig: int = signal.SIGINT) -> None:
        """Send the one stopping signal (Ctrl-C by default) without waiting; stop() then only
        waits. One, because a second SIGINT is not a repeat: in text mode it makes the decoder
        write what is left undecoded, and once the interpreter shuts down (its handlers back to
        the default) it kills tlstap (exit status -2)."""
        assert self._signalled is None, f"tlstap was already sent signal {self._signalled}"
        self._signalled = sig
        self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        """Stop tlstap (interrupt(sig), unless it was signalled or has exited) and wait for its
        exit and for the end of its stderr; its exit status. A probe writes its event into the
        ring buffer before the traced call returns, and tlstap drains the ring after the signal:
        every call the traced processes have returned from is in the output. Not always one
        whose bytes the other end already has (a server's SSL_write sends before it returns):
        wait for the traced process itself first (its exit, its own log, its socket closing)."""
        if self.proc.poll() is None and self._signalled is None:
            self.interrupt(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"tlstap did not stop within {timeout}s of signal {self._signalled}:\n"
                                 f"{self.stderr}") from None
        self.wait_stderr(timeout)
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL, for tests of what a killed tlstap leaves: that exit status is then the expected one."""
        self._signalled = self.expect_exit = -signal.SIGKILL
        self.proc.kill()
        return self.proc.wait(10)

    def wait_stderr(self, timeout: float = 10) -> None:
        """Until tlstap's stderr ends: every process of it has exited (text mode's decoder holds
        it too), and every line it wrote is in stderr_lines."""
        self._pump.join(timeout)
        assert not self._pump.is_alive(), f"tlstap's stderr still open {timeout}s after it exited:\n{self.stderr}"

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def records(self) -> list[dict]:
        with open(self.out) as f:
            return [json.loads(line) for line in f]

    def data(self) -> list[dict]:
        return [r for r in self.records() if r["type"] == "data"]

    def http(self) -> list[dict]:
        return [r for r in self.records() if r["type"] == "http"]

    def summary(self) -> dict:
        s = [r for r in self.records() if r["type"] == "summary"]
        assert len(s) == 1, "exactly one summary record at the end"
        return s[0]


def payload(rec: dict) -> bytes:
    return base64.b64decode(rec["data"]) if rec["encoding"] == "base64" else rec["data"].encode()


@dataclass
class Stream:
    sent: bytes
    received: bytes


def streams(records: list[dict]) -> dict[tuple, Stream]:
    """Captured bytes per (pid, local, remote), in call order."""
    parts: dict[tuple, dict[str, list]] = defaultdict(lambda: {"read": [], "write": []})
    for r in sorted(records, key=lambda r: r["ts_ns"]):
        if r["local"] is None:
            key = (r["pid"], None, None)
        else:
            key = (r["pid"], (r["local"]["ip"], r["local"]["port"]), (r["remote"]["ip"], r["remote"]["port"]))
        parts[key][r["dir"]].append(payload(r))
    return {k: Stream(b"".join(v["write"]), b"".join(v["read"])) for k, v in parts.items()}


def key(t) -> tuple:
    """A peer Transcript's connection, as streams() keys it."""
    return (t.pid, t.local, t.remote)


def assert_streams_match(records: list[dict], transcripts) -> None:
    """Every peer connection's bytes, both directions, equal what tlstap captured for it."""
    got = streams(records)
    for t in transcripts:
        s = got.get(key(t))
        assert s is not None, f"nothing captured for {key(t)}; captured keys: {list(got)[:10]}"
        assert s.sent == t.sent, f"write bytes differ for {key(t)} ({len(s.sent)} vs {len(t.sent)})"
        assert s.received == t.received, f"read bytes differ for {key(t)} ({len(s.received)} vs {len(t.received)})"


class KeyTap(Tap):
    """`tlstap tls -m keylog -k FILE ...` running in the background; lines() reads FILE."""

    def __init__(self, tmp_path, *args: str, command: str = "tls"):
        out = str(tmp_path / f"keys-{time.monotonic_ns()}.log")
        self._setup(out, [tlstap_exe(), command, "-m", "keylog", "-k", out, *args])

    def lines(self) -> list[str]:
        from tests.peers import read_keylog
        return read_keylog(self.out) if os.path.exists(self.out) else []


def assert_same_lines(tap: KeyTap, *oracles: list[str]) -> set[str]:
    """tlstap's lines for the oracle's connections == the oracle's lines (numbered)."""
    from tests.peers import client_randoms, number_key_updates
    want = set()
    for o in oracles:
        want |= set(number_key_updates(o))
    assert want, "the library logged nothing: the peer did not run"
    crs = set(client_randoms(want))
    got = {ln for ln in tap.lines() if ln.split()[1] in crs}
    assert got == want, (f"missing: {sorted(want - got)}\nextra: {sorted(got - want)}\n{tap.stderr}")
    return got
