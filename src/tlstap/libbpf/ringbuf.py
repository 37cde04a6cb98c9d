"""A BPF ring buffer consumer over mmap, with no per-record C callback.

libbpf 1.1's ring_buffer__poll calls back into Python through ctypes for each
record (a few microseconds each); reading the shared pages directly costs a
struct unpack and a slice. The layout is the kernel's (kernel/bpf/ringbuf.c):
page 0 holds consumer_pos (ours to write), page 1 producer_pos, then the data
pages mapped twice in a row so a record never wraps. Each record starts with
an 8-byte header {u32 len | BUSY<<31 | DISCARD<<30, u32 pg_off}, rounded up
to 8 bytes.

The protocol needs a load-acquire of producer_pos and of each record's header
(the record's bytes are read only after its BUSY bit is seen clear) and a
store-release of consumer_pos (the space goes back only after our reads of it).
x86-64 is TSO: an aligned load there is already an acquire and a store a
release, and each memoryview access below is a separate C call the compiler
cannot reorder across, so plain accesses are the fast path there. Elsewhere
(arm64, which bpf/Makefile builds for) they go through native/ring.c's
__atomic acquire/release functions (`ordered`).

"One aligned 8-byte access" is why the positions go through memoryview.cast("Q")
(a native load or store of the whole word) and never through struct: pack_into
zeroes its destination before it writes the bytes one by one, and a producer
that read consumer_pos in between saw it near 0, the ring "full", and dropped
the record (a few per run, more at 64 KiB); unpack_from reads bytes one by
one, and a producer_pos read as it changes can come out too large.
"""
from __future__ import annotations

import mmap
import platform
import select
import struct
import time
from typing import Callable

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SZ = 8
_U32 = struct.Struct("<I")
ORDERED = platform.machine() != "x86_64"    # see the module docstring

Handler = Callable[[memoryview], None]


class RingBuffer:
    """Reads records from a BPF_MAP_TYPE_RINGBUF map fd.

    The memoryview passed to the handler is valid only during the call: the
    kernel may reuse that space once we advance consumer_pos after the batch.
    """

    def __init__(self, map_fd: int, size: int, ordered: bool = ORDERED):
        if size & (size - 1):
            raise ValueError("ring buffer size must be a power of two")
        self.size, self.mask = size, size - 1
        self.release = max(4096, size // 32)   # see consume()
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._view = memoryview(self._prod)
        self._cons_pos = memoryview(self._cons)[:8].cast("Q")    # see the module docstring
        self._prod_pos = self._view[:8].cast("Q")
        self._data_off = page
        self._acq = self._pins = None
        if ordered:        # addresses for native/ring.c; released in close()
            from ..sinks.epb_native import Pinned, ring_atomics
            self._acq = ring_atomics()
            self._pins = (Pinned(self._cons, writable=True), Pinned(self._prod))
            self._cons_addr, self._prod_addr = self._pins[0].addr, self._pins[1].addr
        self.fd = map_fd       #: to wait on several rings at once (epoll: readable when records wait)
        self._ep = select.epoll()
        self._ep.register(map_fd, select.EPOLLIN)

    def consume(self, handler: Handler) -> int:
        """Hand every committed record to handler; return how many.

        consumer_pos moves on every `release` bytes, not only after the batch:
        a batch can be most of the ring, and the space it holds is what the
        producers need while a slow handler (file writes) works through it."""
        cons_pos, prod_pos = self._cons_pos, self._prod_pos
        cons = first = cons_pos[0]        # ours alone to write: no ordering needed
        view, base, mask, n = self._view, self._data_off, self.mask, 0
        release, acq = self.release, self._acq
        # at most one ring's worth per call: under sustained load the producers refill it as
        # fast as we read, and the caller's timers (loss reports, flushes) must still run
        while cons - first < self.size:
            prod = acq.ring_load_acquire64(self._prod_addr) if acq else prod_pos[0]
            if cons >= prod:
                break
            start = published = cons
            while cons < prod:
                off = base + (cons & mask)
                hdr = acq.ring_load_acquire32(self._prod_addr + off) if acq else _U32.unpack_from(view, off)[0]
                if hdr & BUSY_BIT:
                    break
                ln = hdr & ~(BUSY_BIT | DISCARD_BIT)
                if not hdr & DISCARD_BIT:
                    handler(view[off + HDR_SZ: off + HDR_SZ + ln])
                    n += 1
                cons += (ln + HDR_SZ + 7) & ~7
                if cons - published >= release:
                    self._publish(cons)
                    published = cons
            if cons == start:
                break  # the next record is still being written
            self._publish(cons)
        return n

    def _publish(self, cons: int) -> None:
        """consumer_pos = cons: with a store-release off x86-64 (see the module docstring)."""
        if self._acq:
            self._acq.ring_store_release64(self._cons_addr, cons)
        else:
            self._cons_pos[0] = cons

    def take(self, write: Callable[[memoryview], object], max_bytes: int | None = None,
             scan: bool = True) -> int:
        """Hand the committed records, framing and all, to write() in one contiguous piece
        (the data pages are mapped twice, so a piece of up to a ring's size never wraps) of
        at most max_bytes (but one record); return its size in bytes. The space is the
        producers' again once write() returns. What spool.py stores: records() splits it.

        scan=False leaves the walk over the records' headers to write(), which does it
        anyway (native/epb.c, at ~100k packets a second): the piece is then everything
        published, up to max_bytes (and the first record whole), and may end in a record
        that is cut or still being written (BUSY); write() returns how many bytes of whole
        committed records at its start it used."""
        acq = self._acq
        cons = self._cons_pos[0]
        prod = acq.ring_load_acquire64(self._prod_addr) if acq else self._prod_pos[0]
        view, base, mask = self._view, self._data_off, self.mask
        end, limit = cons, min(prod, cons + min(self.size, max_bytes or self.size))
        while end < limit:
            off = base + (end & mask)
            hdr = acq.ring_load_acquire32(self._prod_addr + off) if acq else _U32.unpack_from(view, off)[0]
            if hdr & BUSY_BIT:
                break
            nxt = end + (((hdr & ~(BUSY_BIT | DISCARD_BIT)) + HDR_SZ + 7) & ~7)
            if nxt > limit and (end > cons or nxt > prod):   # the first record goes whole
                break
            end = nxt
            if not scan:          # the first record whole; write() walks the rest
                end = max(end, limit)
        if end == cons:
            return 0
        start = base + (cons & mask)
        used = write(view[start:start + (end - cons)])
        if not scan:
            if not isinstance(used, int) or not 0 <= used <= end - cons:
                raise ValueError(f"take(scan=False): write() returned {used!r} of {end - cons} bytes")
            end = cons + used
        self._publish(end)
        return end - cons

    def poll(self, handler: Handler, timeout: float, busy_interval: float = 0.002, whole: bool = False,
             max_bytes: int | None = None, scan: bool = True) -> int:
        """Consume (with whole=True: take(handler, max_bytes) until the ring is empty, at most
        one ring's worth); when nothing was there wait up to `timeout` for a wakeup.

        Producers that wake us only when the ring fills up (BPF_RB_NO_WAKEUP)
        are met by sleeping `busy_interval` after a productive pass: data is
        then read on our own timer, from whatever CPU we run on."""
        n = self._pass(handler, whole, max_bytes, scan)
        if n:
            time.sleep(busy_interval)
            return n
        self._ep.poll(timeout)
        return self._pass(handler, whole, max_bytes, scan)

    def read(self, handler: Handler, whole: bool = False, max_bytes: int | None = None,
             scan: bool = True) -> int:
        """One pass of poll() without the wait: consume (or, whole, take) what is committed."""
        return self._pass(handler, whole, max_bytes, scan)

    def _pass(self, handler: Handler, whole: bool, max_bytes: int | None, scan: bool) -> int:
        if not whole:
            return self.consume(handler)
        # pieces of max_bytes back to back while the ring holds that much: a sleep after
        # each would cap the rate at max_bytes per busy_interval (4 MiB per 2 ms lost packets
        # at 64 KiB in -m pcapng). Once a piece comes out under half of it, the sleep is the
        # cheaper way to wait: taking what trickles in meanwhile, a few packets at a time,
        # cost each piece's fixed work 20 times per pass at 1 GB/s.
        n = k = self.take(handler, max_bytes, scan)
        while max_bytes and k >= max_bytes // 2 and n < self.size:
            k = self.take(handler, max_bytes, scan)
            n += k
        return n

    def pending_bytes(self) -> int:
        return self._prod_pos[0] - self._cons_pos[0]

    def close(self) -> None:
        if self._ep is not None:
            self._ep.close()
            self._ep = None
            for pin in self._pins or ():
                pin.close()
            try:
                self._cons_pos.release()
                self._prod_pos.release()
                self._view.release()
                self._prod.close()
                self._cons.close()
            except BufferError:
                # a record view outlived its handler (an exception's traceback holds it):
                # the mappings go when the last view does; never a second error at exit
                pass


def records(buf: memoryview, ordered: bool = ORDERED) -> tuple[list[memoryview], int]:
    """Split ring-framed bytes (what take() hands out) into record bodies, skipping
    discarded ones; also return how many bytes that used (a record cut at the end of
    buf, or still being written, waits for the rest). A piece of take(scan=False) is
    the live ring, its headers not yet read with acquire: `ordered` does that."""
    if ordered and len(buf):
        from ..sinks.epb_native import Pinned, ring_atomics
        with Pinned(buf) as pin:
            return _records(buf, ring_atomics().ring_load_acquire32, pin.addr)
    return _records(buf, None, 0)


def _records(buf: memoryview, acquire, addr: int) -> tuple[list[memoryview], int]:
    out, pos, n = [], 0, len(buf)
    while pos + HDR_SZ <= n:
        hdr = acquire(addr + pos) if acquire else _U32.unpack_from(buf, pos)[0]
        if hdr & BUSY_BIT:          # still being written (a piece of take(scan=False))
            break
        ln = hdr & ~(BUSY_BIT | DISCARD_BIT)
        nxt = pos + ((ln + HDR_SZ + 7) & ~7)
        if nxt > n:
            break
        if not hdr & DISCARD_BIT:
            out.append(buf[pos + HDR_SZ: pos + HDR_SZ + ln])
        pos = nxt
    return out, pos

