"""The ring reader (libbpf/ringbuf.py) on a real BPF ring buffer, filled by a real BPF program
(ring_fill.bpf.c, one record per BPF_PROG_TEST_RUN, or a discarded one): every committed record
comes out, in order, discarded ones do not, and consumer_pos (read through a mapping of our own)
ends where the kernel's producer_pos is. Both paths run here: the x86-64 one (plain loads and
stores) and the one other CPUs take (native/ring.c's acquire loads and release store), forced
with ordered=True. Only x86-64 is at hand: what acquire/release prevents on arm64 is not shown.
Also: take(max_bytes) cuts pieces at record boundaries and hands a larger first record whole;
consume() gives space back during a long batch; and a record reserved but not yet committed (a
sleepable uprobe whose copy waits on a userfaultfd page: its header really is BUSY) stops every
reader until it is committed, so that the record committed behind it never comes out first.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import mmap
import os
import random
import select
import struct
import subprocess
import threading

import pytest

from tlstap.libbpf import BpfObject, RingBuffer
from tlstap.libbpf.ringbuf import BUSY_BIT, HDR_SZ, records
from tlstap.sinks.epb_native import ring_atomics

HERE = os.path.dirname(os.path.abspath(__file__))
RING_SIZE = 16384          # ring_fill.bpf.c


@pytest.fixture(scope="module")
def fill_obj(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ordering") / "ring_fill.bpf.o")
    arch = {"x86_64": "x86", "aarch64": "arm64"}[os.uname().machine]    # bpf_tracing.h's PT_REGS
    subprocess.run(["clang", "-O2", "-g", "-Wall", "-Werror", "-target", "bpf", f"-D__TARGET_ARCH_{arch}",
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


def framed_count(piece) -> int:
    """Records in a piece, discarded ones too (each header's length, rounded up to 8)."""
    n = pos = 0
    while pos < len(piece):
        pos += ((int.from_bytes(piece[pos:pos + 4], "little") & 0x3FFFFFFF) + HDR_SZ + 7) // 8 * 8
        n += 1
    assert pos == len(piece)
    return n


@pytest.mark.parametrize("ordered", [False, True], ids=["x86-plain", "acquire-release"])
def test_take_max_bytes_cuts_at_record_boundaries_and_gives_a_large_first_record_whole(fill_obj, ordered):
    rng = random.Random(7)
    limit = 300                     # frames are 14..701 bytes: some alone pass it
    with BpfObject.open(fill_obj) as obj:
        obj.load()
        prog, fd = obj.program("fill"), obj.map("ring").fd
        ring = RingBuffer(fd, RING_SIZE, ordered=ordered)
        try:
            for _ in range(3):
                batch = frames(rng, RING_SIZE * 3 // 4)
                for f in batch:
                    assert prog.test_run(f)[0] == 0
                got, sizes = [], []

                def write(piece):
                    recs, used = records(piece, ordered)
                    assert used == len(piece)          # whole records only (scan=True)
                    sizes.append((len(piece), framed_count(piece)))
                    got.extend(bytes(r) for r in recs)
                while ring.take(write, limit):
                    pass
                assert got == [f for f in batch if f[0] != ord("D")]
                over = [n for size, n in sizes if size > limit]
                assert over and all(n == 1 for n in over), sizes   # past the limit: one record alone
                assert positions(fd)[0] == positions(fd)[1]
        finally:
            ring.close()


def test_consume_gives_space_back_during_a_long_batch(fill_obj):
    """consumer_pos moves every `release` bytes inside one consume(), not only at its end: the
    kernel's copy of it (read through our own mapping) has moved before the last record."""
    rng = random.Random(3)
    with BpfObject.open(fill_obj) as obj:
        obj.load()
        prog, fd = obj.program("fill"), obj.map("ring").fd
        ring = RingBuffer(fd, RING_SIZE)
        try:
            batch = [f for f in frames(rng, RING_SIZE * 7 // 8) if f[0] != ord("D")]
            for f in batch:
                assert prog.test_run(f)[0] == 0
            start = positions(fd)[0]
            seen = []
            assert ring.consume(lambda v: seen.append(positions(fd)[0])) == len(batch)
            assert seen[0] == start and seen[-1] >= start + ring.release
        finally:
            ring.close()


# ---------------------------------------------------------------- a record still being written

PAGE = mmap.PAGESIZE
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
_UFFD_API, _UFFDIO_API, _UFFDIO_REGISTER, _UFFDIO_COPY = 0xAA, 0xC018AA3F, 0xC020AA00, 0xC028AA03
_UFFD_EVENT_PAGEFAULT = 0x12


class FaultPage:
    """An anonymous page whose first touch waits, in the kernel, until supply() gives its bytes:
    a userfaultfd (as root it also holds the kernel's own copy_from_user). Closing the
    userfaultfd lets any waiter go on (the page then reads as zeros)."""

    def __init__(self):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
        self._libc = libc
        self.fd = libc.syscall(_SYS_USERFAULTFD[os.uname().machine], os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "userfaultfd")
        fcntl.ioctl(self.fd, _UFFDIO_API, (ctypes.c_uint64 * 3)(_UFFD_API, 0, 0))
        self.addr = libc.mmap(None, PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        fcntl.ioctl(self.fd, _UFFDIO_REGISTER, (ctypes.c_uint64 * 4)(self.addr, PAGE, 1, 0))   # MODE_MISSING

    def wait_fault(self, timeout: float) -> None:
        """Until someone waits on the page (the userfaultfd's pagefault message)."""
        assert select.select([self.fd], [], [], timeout)[0], f"nothing touched the page within {timeout}s"
        event, addr = struct.unpack_from("<B15xQ", os.read(self.fd, 32))   # uffd_msg: event, pagefault.address
        assert event == _UFFD_EVENT_PAGEFAULT and addr & ~(PAGE - 1) == self.addr, (event, addr)

    def supply(self, data: bytes) -> None:
        src = ctypes.create_string_buffer(data.ljust(PAGE, b"\0"), PAGE)
        fcntl.ioctl(self.fd, _UFFDIO_COPY, (ctypes.c_uint64 * 5)(self.addr, ctypes.addressof(src), PAGE, 0, 0))

    def close(self) -> None:
        os.close(self.fd)
        self._libc.munmap(ctypes.c_void_p(self.addr), ctypes.c_size_t(PAGE))


@pytest.fixture(scope="module")
def hold_lib(tmp_path_factory):
    """A library with hold(src), where ring_fill.bpf.c's sleepable uprobe goes."""
    d = tmp_path_factory.mktemp("hold")
    (d / "hold.c").write_text('void hold(const void *src) { __asm__ volatile("" : : "r"(src) : "memory"); }\n')
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(d / "libhold.so"), str(d / "hold.c")], check=True)
    return str(d / "libhold.so")


@pytest.mark.parametrize("ordered", [False, True], ids=["x86-plain", "acquire-release"])
def test_a_record_still_being_written_stops_the_reader_until_it_is_committed(fill_obj, hold_lib, ordered):
    """A producer reserved a record and is still filling it (its header BUSY) while a later
    record is committed behind it: consume() and take() hand out nothing, not the later one
    first; once the first is submitted, both come out in order."""
    from tlstap.probes.elf import ElfImage
    lib = ctypes.CDLL(hold_lib)
    lib.hold.argtypes = (ctypes.c_void_p,)
    with ElfImage.open(hold_lib) as img:
        offset = img.vaddr_to_offset(img.function("hold").vaddr)
    first, second = os.urandom(64), os.urandom(64)
    later = ctypes.create_string_buffer(second, 64)
    with BpfObject.open(fill_obj) as obj, contextlib.ExitStack() as stack:
        obj.load()
        fd = obj.map("ring").fd
        ring = RingBuffer(fd, RING_SIZE, ordered=ordered)
        stack.callback(ring.close)
        stack.enter_context(obj.program("hold").attach_uprobe(hold_lib, offset, pid=os.getpid()))
        page = FaultPage()
        writer = threading.Thread(target=lib.hold, args=(page.addr,))
        # unwound in reverse: the page goes before the uprobe, so that a writer still waiting
        # (the test failed) goes on before the detach, which waits for it
        stack.callback(lambda: writer.ident and writer.join(10))
        stack.callback(page.close)
        writer.start()
        page.wait_fault(10)                  # its record is reserved; the copy into it waits
        lib.hold(ctypes.addressof(later))    # the next record, committed at once
        cons, prod = positions(fd)
        assert prod - cons == 2 * (64 + HDR_SZ)
        with mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ, offset=2 * PAGE) as data:
            assert int.from_bytes(data[cons % RING_SIZE:][:4], "little") & BUSY_BIT
        got = []
        assert ring.consume(lambda v: got.append(bytes(v))) == 0
        assert ring.take(lambda p: got.append(bytes(p))) == 0
        assert ring.take(lambda p: got.append(bytes(p)) or 0, scan=False) == 0
        assert got == [] and positions(fd) == (cons, prod)
        page.supply(first)
        writer.join(10)
        assert not writer.is_alive()
        assert ring.consume(lambda v: got.append(bytes(v))) == 2
        assert got == [first, second]
        assert positions(fd)[0] == positions(fd)[1] == prod
