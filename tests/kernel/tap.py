"""Run the real `tlstap` command as a subprocess and read what it captured."""
from __future__ import annotations

import base64
import json
import os
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
    """`tlstap tls --format json -o FILE ...` running in the background."""

    def __init__(self, tmp_path, *args: str, fmt: str = "json", command: str = "tls", raw: bool = True):
        self.out = str(tmp_path / f"capture-{time.monotonic_ns()}.{'jsonl' if fmt == 'json' else 'txt'}")
        self.argv = [tlstap_exe(), command, "--format", fmt, "-o", self.out, *(["--raw"] if raw else []), *args]
        self.proc: subprocess.Popen | None = None
        self.stderr_lines: list[str] = []

    def __enter__(self) -> "Tap":
        self.proc = subprocess.Popen(self.argv, stderr=subprocess.PIPE, text=True)
        ready = threading.Event()

        def pump():
            for line in self.proc.stderr:
                self.stderr_lines.append(line)
                if "ready in" in line:
                    ready.set()
            ready.set()
        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(READY_TIMEOUT) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError(f"tlstap did not become ready: {self.stderr}")
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> int:
        if self.proc and self.proc.poll() is None:
            time.sleep(0.3)  # let the last events reach the ring buffer
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"tlstap did not stop on signal {sig}")
        time.sleep(0.05)
        return self.proc.returncode

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
        self.out = str(tmp_path / f"keys-{time.monotonic_ns()}.log")
        self.argv = [tlstap_exe(), command, "-m", "keylog", "-k", self.out, *args]
        self.proc = None
        self.stderr_lines = []

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
