"""The ring reader (libbpf/ringbuf.py) on a real BPF ring buffer, filled by a real BPF program
(ring_fill.bpf.c, one record per BPF_PROG_TEST_RUN, or a discarded one): every committed record
comes out, in order, discarded ones do not, and consumer_pos (read through a mapping of our own)
ends where the kernel's producer_pos is. Both paths run here: the x86-64 one (plain loads and
stores) and the one other CPUs take (native/ring.c's acquire loads and release store), forced
with ordered=True. Only x86-64 is at hand: what acquire/release prevents on arm64 is not shown.
"""
from __future__ import annotations

import mmap
import os
import random
import subprocess

import pytest

from tlstap.libbpf import BpfObject, RingBuffer
from tlstap.libbpf.ringbuf import HDR_SZ, records
from tlstap.sinks.epb_native import ring_atomics

HERE = os.path.dirname(os.path.abspath(__file__))
RING_SIZE = 16384          # ring_fill.bpf.c


@pytest.fixture(scope="module")
def fill_obj(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ordering") / "ring_fill.bpf.o")
    subprocess.run(["clang", "-O2", "-g", "-Wall", "-Werror", "-target", "bpf",
                    f"-I/usr/include/{os.uname().machine}-linux-gnu",
                    "-c", os.path.join(HERE, "ring_fill.bpf.c"), "-o", path], check=True)
    return path


class Counting:
    """native/ring.c's functions, called for real, counted: shows the ordered path uses them."""

    def __init__(self):
        self._lib, self.calls = ring_atomics(), {}

    def __getattr__(self, name):
        fn = getattr(self._lib, name)

        def call(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args)
        return call


def positions(fd: int) -> tuple[int, int]:
    """(consumer_pos, producer_pos), read through mappings of our own."""
    page = mmap.PAGESIZE
    with mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=0) as c, \
            mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ, offset=page) as p:
        return int.from_bytes(c[:8], "little"), int.from_bytes(p[:8], "little")


def frames(rng: random.Random, total: int) -> list[bytes]:
    """Frames of odd and even sizes (padding), about a quarter discarded ('D'), `total` bytes."""
    out, n = [], 0
    while n < total:
        f = bytes([ord("D") if rng.random() < 0.25 else ord("k")]) + rng.randbytes(rng.randint(13, 700))
        out.append(f)
        n += (len(f) + HDR_SZ + 7) & ~7
    return out


@pytest.mark.parametrize("ordered", [False, True], ids=["x86-plain", "acquire-release"])
@pytest.mark.parametrize("how", ["consume", "take"])
def test_reader_returns_every_record_in_order_and_moves_the_consumer(fill_obj, ordered, how):
    rng = random.Random(16)
    with BpfObject.open(fill_obj) as obj:
        obj.load()
        prog, fd = obj.program("fill"), obj.map("ring").fd
        ring = RingBuffer(fd, RING_SIZE, ordered=ordered)
        counting, sent, pieces = None, 0, 0
        if ordered:
            ring._acq = counting = Counting()
        try:
            # rounds of ~3/4 of the ring: records cross its end (the data pages mapped twice)
            for _ in range(6):
                batch = frames(rng, RING_SIZE * 3 // 4)
                sent += len(batch)
                for f in batch:
                    assert prog.test_run(f)[0] == 0     # TC_ACT_OK: in the ring
                got: list[bytes] = []
                if how == "consume":
                    assert ring.consume(lambda v: got.append(bytes(v))) == len(got)
                else:
                    def write(piece):
                        recs, used = records(piece, ordered)
                        got.extend(bytes(r) for r in recs)
                        return used
                    while ring.take(write, 4096, scan=False):
                        pieces += 1
                assert got == [f for f in batch if f[0] != ord("D")]
                cons, prod = positions(fd)
                assert cons == prod and ring.pending_bytes() == 0
        finally:
            ring.close()
    if ordered:
        calls = counting.calls
        assert calls.get("ring_load_acquire64", 0) >= 6 and calls.get("ring_store_release64", 0) >= 6, calls
        # consume: every header, discarded ones too; take(scan=False): the first of each piece
        # (records(piece, ordered=True) loads the rest, through ring_atomics() itself)
        assert calls.get("ring_load_acquire32", 0) >= (sent if how == "consume" else pieces), calls
