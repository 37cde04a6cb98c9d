"""A signal's exception (KeyboardInterrupt) right after a real write, at each write in turn:
close() still leaves every block once. The interruption is injected deterministically by
wrapping the real write (os.writev, the direct-I/O writer's write, its _submit) on a real file,
where a signal handler's exception can surface: after the call, before its caller moved on."""
from __future__ import annotations

import os
import struct

import pytest

from tests.peers import have_tshark
from tests.unit.test_pcapng_writer import tshark_run, whole_blocks
from tlstap.sinks import direct
from tlstap.sinks.pcapng import LINKTYPE_RAW, PcapngWriter

N = 120            # packets
MAX_K = 12         # interrupt the 1st .. MAX_K-th write


class Interrupt:
    """Calls `real`; the k-th call raises KeyboardInterrupt after the real call returned."""

    def __init__(self, real, k: int):
        self.real, self.k, self.calls, self.fired = real, k, 0, False

    def __call__(self, *a, **kw):
        r = self.real(*a, **kw)
        self.calls += 1
        if self.calls == self.k:
            self.fired = True
            raise KeyboardInterrupt
        return r


def small_chunks(monkeypatch):
    """Direct-I/O buffers of 16 KiB, so that a few packets fill one (submit often)."""
    monkeypatch.setattr(direct, "CHUNK", 4 * direct.ALIGN)


def hook_writev(monkeypatch, w, k):
    """os.writev: the file written without O_DIRECT."""
    hook = Interrupt(os.writev, k)
    monkeypatch.setattr(os, "writev", hook)
    return hook


def hook_direct_write(monkeypatch, w, k):
    hook = Interrupt(w._direct.write, k)
    w._direct.write = hook
    return hook


def hook_submit(monkeypatch, w, k):
    hook = Interrupt(w._direct.raw._submit, k)
    w._direct.raw._submit = hook
    return hook


@pytest.mark.parametrize("hook,direct_io", [(hook_writev, "0"), (hook_direct_write, "1"),
                                            (hook_submit, "1")])
def test_pcapng_block_interrupted_after_its_write_is_in_the_file_once(hook, direct_io, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("TLSTAP_DIRECT_IO", direct_io)
    small_chunks(monkeypatch)
    for k in range(1, MAX_K + 1):
        path = tmp_path / f"k{k}.pcapng"
        w = PcapngWriter(str(path))
        if (w._direct is not None) != (direct_io == "1"):
            pytest.skip("no O_DIRECT on this file system")
        lo = w.add_interface("lo", LINKTYPE_RAW)
        h = hook(monkeypatch, w, k)
        tried = 0
        try:
            for i in range(N):
                tried = i + 1
                w.add_packet(lo, 1_000_000_000 + i, struct.pack("<I", i) + bytes(3000), comment=str(i))
                if i % 3 == 2:
                    w.flush()
        except KeyboardInterrupt:
            pass
        assert h.fired
        h.k = 0                    # close() is not interrupted
        w.close()
        bl, tail = whole_blocks(path)
        assert tail == 0
        got = [struct.unpack_from("<I", b, 20)[0] for _, t, b in bl if t == 6]
        assert got == list(range(tried)), f"interrupted after write {k}"   # each once, in order
        assert bl[-1][1] == 5                                            # close() wrote the ISB
        if have_tshark():
            r = tshark_run(path, "-T", "fields", "-e", "frame.comment")
            assert r.returncode == 0, r.stderr
            assert r.stdout.split() == [str(i) for i in range(tried)]


def test_direct_writer_interrupted_after_a_submit_writes_nothing_twice(tmp_path, monkeypatch):
    """The text/JSON path: records through the direct-I/O writer. Every record whose write
    returned is in the file once; the one interrupted is there once or not at all."""
    small_chunks(monkeypatch)
    rec = [b"record %05d " % i + b"x" * 1000 + b"\n" for i in range(200)]
    for k in range(1, MAX_K + 1):
        path = tmp_path / f"k{k}.txt"
        f = open(path, "wb")
        d = direct.wrap(f)
        if d is f:
            f.close()
            pytest.skip("no O_DIRECT on this file system")
        h = Interrupt(d.raw._submit, k)
        d.raw._submit = h
        done = 0
        try:
            for r in rec:
                d.write(r)
                done += 1
        except KeyboardInterrupt:
            pass
        fired, h.k = h.fired, 0
        d.close()
        if not fired:
            assert k > 2
            break
        lines = path.read_bytes().splitlines(keepends=True)
        assert lines in (rec[:done], rec[:done + 1]), f"interrupted after submit {k}"
    else:
        pytest.fail(f"more than {MAX_K} submits: raise MAX_K")
