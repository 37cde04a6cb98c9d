"""spool.py: the capture -> spool file -> decoder process hand-over (user space only: the
pieces are framed exactly as RingBuffer.take hands out the kernel's ring; the kernel path
is covered by every text-mode test in tests/kernel, which run through it)."""
import json
import os
import struct

from tlstap.libbpf.ringbuf import DISCARD_BIT, records
from tlstap.spool import SpoolPipeline


def framed(*bodies: bytes, discard: int | None = None) -> bytes:
    out = b""
    for i, b in enumerate(bodies):
        hdr = len(b) | (DISCARD_BIT if i == discard else 0)
        rec = struct.pack("<II", hdr, 0) + b
        out += rec + b"\0" * (-len(rec) % 8)
    return out


def test_records_splits_frames_skips_discarded_and_keeps_a_cut_tail():
    buf = framed(b"a", b"bcdefghij", b"x" * 20, discard=1)
    recs, used = records(memoryview(buf))
    assert [bytes(r) for r in recs] == [b"a", b"x" * 20] and used == len(buf)
    recs, used = records(memoryview(buf[:-3]))          # the last record is cut
    assert [bytes(r) for r in recs] == [b"a"] and used == len(framed(b"a", b"bcdefghij"))


class Recorder:
    """A decoder that writes what it was handed, one JSON line per call."""

    def __init__(self, path):
        self.f = open(path, "w")

    def _w(self, *what):
        self.f.write(json.dumps(what) + "\n")

    def feed(self, rec):
        self._w("rec", bytes(rec).decode())

    def tick(self, now_ns):
        pass

    def periodic(self):
        pass

    def on_lost(self, records, nbytes, why):
        self._w("lost", records, nbytes, why)

    def finish(self, counters, line):
        self._w("end", counters, line)
        self.f.close()

    def hurry(self):
        self._w("hurry")


def lines(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


def test_everything_spooled_reaches_the_decoder_in_order_with_losses_and_summary(tmp_path):
    out = tmp_path / "out"
    sp = SpoolPipeline(lambda: Recorder(out), max_backlog=1 << 20, spool_dir=str(tmp_path))
    want = []
    for i in range(500):
        bodies = [f"r{i}.{j}".encode() * (1 + j) for j in range(3)]
        sp.put(memoryview(framed(*bodies)))
        want += [b.decode() for b in bodies]
        sp.notify()
        if i == 250:
            sp.report_lost(7, 700)
    assert sp.end({"calls": 1}, "summary line", []) == 0
    got = lines(out)
    assert [x[1] for x in got if x[0] == "rec"] == want
    assert ["lost", 7, 700, "ring buffer full"] in got
    assert got[-1] == ["end", {"calls": 1}, "summary line"]
    assert not os.listdir(tmp_path / ".") or set(os.listdir(tmp_path)) == {"out"}   # the spool is unlinked


class Gated(Recorder):
    """A decoder whose first feed() blocks until the test opens the gate (a pipe inherited
    across the fork): until then it consumes nothing, whatever the scheduling."""

    def __init__(self, path, gate: int):
        super().__init__(path)
        self.gate = gate

    def feed(self, rec):
        if self.gate is not None:
            os.read(self.gate, 1)
            self.gate = None
        super().feed(rec)


def gate():
    """(read end for Gated, open(): lets it go)."""
    r, w = os.pipe()

    def open_():
        os.write(w, b"g")
        os.close(w)
    return r, open_


def test_a_piece_past_the_backlog_bound_is_dropped_and_counted(tmp_path):
    out = tmp_path / "out"
    r, open_gate = gate()        # the decoder cannot start until the capture ends: the backlog only grows
    sp = SpoolPipeline(lambda: Gated(out, r), max_backlog=4096, spool_dir=str(tmp_path))
    os.close(r)
    piece = framed(b"y" * 1000)                              # 1008 bytes: 4 fit in 4096
    for _ in range(6):
        sp.put(memoryview(piece))
        sp.notify()
    assert sp.dropped == [2, 2 * len(piece)]
    open_gate()
    assert sp.end({}, "done", []) == 0
    assert len([x for x in lines(out) if x[0] == "rec"]) == 4


def test_a_decoder_that_fails_gives_a_status_not_a_hang(tmp_path):
    class Broken(Recorder):
        def feed(self, rec):
            raise ValueError("boom")

    sp = SpoolPipeline(lambda: Broken(tmp_path / "out"), max_backlog=1 << 20, spool_dir=str(tmp_path))
    sp.put(memoryview(framed(b"z")))
    sp.notify()
    assert sp.end({}, "x", []) == 1


def test_a_second_signal_makes_the_decoder_hurry(tmp_path):
    """The second signal comes while the decoder is held at its first record (so it surely
    has a backlog then): it hurries from there on, and still writes every record."""
    out = tmp_path / "out"
    r, open_gate = gate()
    sp = SpoolPipeline(lambda: Gated(out, r), max_backlog=64 << 20, spool_dir=str(tmp_path))
    os.close(r)
    for i in range(5000):
        sp.put(memoryview(framed(f"{i}".encode() * 50)))
    stop = ["SIGINT"]
    waits = []

    def on_wait(seconds, backlog):
        # end() calls this once per turn, after it has signalled the decoder for what stop
        # held at the turn's start: turn 1 adds the second signal, turn 2 sees it sent
        waits.append(backlog)
        if len(waits) == 1:
            stop.append("SIGINT again")
        elif len(waits) == 2:
            open_gate()

    assert sp.end({}, "x", stop, on_wait) == 0
    got = lines(out)
    assert ["hurry"] in got[:2], got[:3]           # before the rest: next to the held record
    assert len([x for x in got if x[0] == "rec"]) == 5000     # hurrying still writes everything
