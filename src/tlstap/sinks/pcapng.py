"""The pcapng file of -m pcapng: packets plus the TLS secrets that decrypt them, in one file.

Wireshark and tshark open the file already decrypted: every NSS key log line we learn goes
into a Decryption Secrets Block (DSB, secrets type "TLSK") *before* the packets that need it.
Readers take DSBs in file order: tshark reads the file in one pass and a TLS session whose
keys were not known when its handshake was dissected stays encrypted, even if the DSB comes
later. Keys and packets reach us through two ring buffers, so a key can arrive a little after
the first encrypted packet of its connection; PcapngSink holds such packets back for `lag_ns`
(default 0.3 s) in timestamp order, and a DSB written meanwhile lands before them. Packets
that cannot need a later key (pcapng_mode decides) are queued without the wait, behind any
that wait.

Block layout: draft-ietf-opsawg-pcapng (little-endian section; options are code:u16 len:u16
value padded to 32 bits, ended by opt_endofopt). Blocks written here:

    SHB  shb_hardware, shb_os, shb_userappl "tlstap <version>"
    IDB  one per add_interface(): link type, snaplen, if_name, if_description, if_tsresol=9 (ns)
    DSB  one per add_secrets() call with new lines: "TLSK", NSS key log lines, '\\n'-terminated
    EPB  one per packet: ns timestamp, captured/original length, epb_flags (direction),
         opt_comment (e.g. "pid=1234 comm=curl -> pid=567 comm=nginx"), epb_dropcount
         (packets lost just before this one: tshark 4.0 shows it, it shows no ISB counters)
    ISB  one per interface at close(): isb_starttime/endtime, isb_ifrecv, isb_ifdrop

Durability: the file is an O_WRONLY descriptor (no Python buffer). Blocks are queued whole in
a list and go out with os.writev() when BATCH_BYTES or BATCH_BLOCKS is reached, or at
flush()/close(): every write ends on a block boundary. Linux completes a regular-file write
whatever non-fatal signal arrives, so Ctrl-C (KeyboardInterrupt, or the CLI's flag-setting
handlers) leaves whole blocks only, and close() then adds the rest and the ISBs. Nothing is
written twice, whenever an exception (KeyboardInterrupt) surfaces: the queue never says what
was written, the writer's position does (the file offset, or the direct-I/O writer's tell(),
each moved by the write itself); the queue records only where its first block starts, and
is emptied in one store. (A pipe has no position: there a KeyboardInterrupt right after a
writev() returned can still repeat those blocks.) A fatal signal (SIGKILL, or SIGTERM with no
handler) can stop a write at a page boundary: every block before that write is intact, tshark
shows all their packets and then warns that the file was "cut short".

Why no library (checked in the wheels): python-pcapng 2.1.1 knows SHB, IDB, EPB, SPB, PB,
NRB and ISB but not the Decryption Secrets Block, and encodes blocks field by field through
objects; dpkt 1.9.8 writes SHB, IDB and EPB only (no DSB, no ISB) and takes timestamps as
float seconds, which loses the nanoseconds; scapy is a large dependency whose PcapNgWriter
builds a packet object per packet. The encoder here is ~100 lines of struct.pack, one
struct.pack and four bytearray appends per packet (put_epb); tshark and capinfos check it in
tests/unit/test_pcapng_writer.py (1-5 GB/s of 64 KiB packets into the page cache).
"""
from __future__ import annotations

import heapq
import os
import platform
import struct
import time
from collections.abc import Iterable

from .. import __version__
from . import direct
from .files import OutputFile

LINKTYPE_ETHERNET = 1      # Ethernet, and Linux loopback (which carries a zeroed Ethernet header)
LINKTYPE_RAW = 101         # no link header: the packet starts with the IPv4/IPv6 header

#: epb_flags bits 0-1 (pcapng draft, "Enhanced Packet Block Flags Word")
DIR_UNKNOWN, DIR_INBOUND, DIR_OUTBOUND = 0, 1, 2

#: Blocks written together: big enough that a 64 KiB packet stream costs one writev() per
#: ~16 packets, small enough that a SIGKILL loses little. IOV_MAX on Linux is 1024 iovecs,
#: a packet block takes 3.
BATCH_BYTES = 1 << 20
BATCH_BLOCKS = 256

#: PcapngSink holds packets this long (timestamp vs now) so late keys still precede them. A
#: client logs its handshake secrets right after the ServerHello arrives, so the server's
#: encrypted flight that came with it needs the wait; 0.3 s covers a loaded 2-core machine.
DEFAULT_LAG_NS = 300_000_000
#: ... but never more than this many packet bytes: past it the oldest packets go out at once
#: (counted in PcapngSink.forced), a stalled key ring must not grow our memory without bound.
MAX_QUEUED_BYTES = 64 << 20

_SHB, _IDB, _ISB, _EPB, _DSB = 0x0A0D0D0A, 1, 5, 6, 0x0A
_TLS_KEY_LOG = 0x544C534B   # "TLSK": DSB secrets type for NSS key log lines
_OPT_END = b"\0\0\0\0"
_ZEROS = bytes(4)

_EPB_HEAD = struct.Struct("<IIIIIII")     # type, total length, if id, ts high, ts low, caplen, len
_FLAGS_OPT = struct.Struct("<HHI")        # epb_flags option
_DROPS_OPT = struct.Struct("<HHQ")       # epb_dropcount option
_U32 = struct.Struct("<I")


def _pad(n: int) -> int:
    return -n & 3


def _opt(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + _ZEROS[:_pad(len(value))]


def _str_opt(code: int, value: str | None) -> bytes:
    return _opt(code, value.encode("utf-8", "replace")) if value else b""


def _u64_ts(ns: int) -> bytes:
    """A timestamp option value: high then low 32 bits, as in the EPB."""
    return struct.pack("<II", (ns >> 32) & 0xFFFFFFFF, ns & 0xFFFFFFFF)


def _block(btype: int, body: bytes) -> bytes:
    n = 12 + len(body)
    return struct.pack("<II", btype, n) + body + _U32.pack(n)


def process_comment(src_pid: int | None, src_comm: str | None, dst_pid: int | None,
                    dst_comm: str | None) -> str:
    """The EPB comment naming sender and receiver: "pid=1234 comm=curl -> pid=567 comm=nginx";
    an unknown end is "?"."""
    def end(pid, comm):
        if pid is None and not comm:
            return "?"
        return f"pid={'?' if pid is None else pid} comm={comm or '?'}"
    return f"{end(src_pid, src_comm)} -> {end(dst_pid, dst_comm)}"


def _consume(parts: list[bytes], n: int) -> None:
    """Drop the first n bytes of parts (what writev() wrote)."""
    i = 0
    while i < len(parts) and n >= len(parts[i]):
        n -= len(parts[i])
        i += 1
    del parts[:i]
    if n:
        parts[0] = parts[0][n:]


def _after(parts: list, n: int) -> list:
    """parts without their first n bytes (a new list: parts stay as they are)."""
    i = 0
    while i < len(parts) and n >= len(parts[i]):
        n -= len(parts[i])
        i += 1
    rest = parts[i:]
    if n:
        rest[0] = memoryview(rest[0])[n:]
    return rest


class PcapngWriter:
    """Writes one pcapng section to `path` (created 0600; "-" is stdout, not closed).

    add_interface() first, then add_secrets()/add_packet() in file order, close() last (it
    writes the interface statistics). Nothing is on disk before flush(), close() or a full
    batch. OSError from the file propagates: a failed capture write is fatal."""

    def __init__(self, path: str, *, comment: str | None = None, pending: bool = False):
        """pending: the file is opened but left as it was until commit() (the capture
        started) or discard() (it did not: sinks/files.py, OutputFile)."""
        self.path = path
        self._file = OutputFile(path)
        if not pending:
            self._file.commit()
        self._fd = self._file.fd
        self._owned = path != "-"
        # A regular file is written with O_DIRECT (sinks/direct.py): at 64 KiB packets the
        # file grows by hundreds of MB/s, and this VM sustains ~0.4 GB/s into the page cache
        # against ~2.6 GB/s direct. Pipes and stdout keep writev().
        self._direct = None
        if self._owned:
            f = os.fdopen(self._fd, "wb", buffering=0, closefd=False)
            d = direct.wrap(f)
            self._direct = d if d is not f else None
        # (position of the first queued byte, or None until a flush looks; the queued blocks)
        self._q: tuple[int | None, list] = (None, [])
        self._queued = 0
        self._blocks = 0
        self._ifaces: list[dict] = []
        self._seen: set[str] = set()
        self._trailers: dict[tuple, bytes] = {}    # epb_trailer() cache
        self.packets = 0
        self.secrets_written = 0
        self.secrets_duplicate = 0
        u = platform.uname()
        body = (struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)
                + _str_opt(1, comment)
                + _str_opt(2, u.machine)
                + _str_opt(3, f"{u.system} {u.release}")
                + _str_opt(4, f"tlstap {__version__}")
                + _OPT_END)
        self._queue(_block(_SHB, body))

    def add_interface(self, name: str, linktype: int, snaplen: int = 262144,
                      description: str | None = None, start_ns: int | None = None) -> int:
        """Write an IDB; returns the interface id for add_packet(). snaplen 0 = no limit.
        start_ns (epoch ns, default now) becomes isb_starttime."""
        body = (struct.pack("<HHI", linktype, 0, snaplen)
                + _str_opt(2, name) + _str_opt(3, description)
                + _opt(9, b"\x09")                 # if_tsresol: 10^-9 s
                + _OPT_END)
        self._queue(_block(_IDB, body))
        self._ifaces.append({"snaplen": snaplen, "start": time.time_ns() if start_ns is None else start_ns,
                             "end": 0, "packets": 0, "recv": None, "drop": None})
        return len(self._ifaces) - 1

    def add_secrets(self, lines: Iterable[str]) -> int:
        """Write one DSB with those of `lines` (NSS key log lines, no newline) not written
        before; returns how many were new (0: no block written)."""
        new = []
        for ln in lines:
            ln = ln.rstrip("\r\n")
            if not ln:
                continue
            if ln in self._seen:
                self.secrets_duplicate += 1
                continue
            self._seen.add(ln)
            new.append(ln)
        if not new:
            return 0
        data = "".join(ln + "\n" for ln in new).encode("ascii")
        body = struct.pack("<II", _TLS_KEY_LOG, len(data)) + data + _ZEROS[:_pad(len(data))]
        self._queue(_block(_DSB, body))
        self.secrets_written += len(new)
        return len(new)

    def epb_trailer(self, caplen: int, direction: int = DIR_UNKNOWN, comment: str | None = None,
                    drops: int = 0) -> bytes:
        """What follows a packet's data in its EPB, but the closing total length: padding,
        options (comment, epb_flags, epb_dropcount), opt_endofopt. Cached when drops is 0:
        connections reuse a few (pad, direction, comment) triples."""
        key = (caplen & 3, direction, comment)
        if not drops:
            t = self._trailers.get(key)
            if t is not None:
                return t
        opts = _str_opt(1, comment) if comment else b""
        if direction:
            opts += _FLAGS_OPT.pack(2, 4, direction)
        if drops:
            opts += _DROPS_OPT.pack(4, 8, drops)
            return _ZEROS[:_pad(caplen)] + opts + _OPT_END
        if len(self._trailers) > 4096:
            self._trailers.clear()
        t = self._trailers[key] = _ZEROS[:_pad(caplen)] + opts + _OPT_END
        return t

    @staticmethod
    def put_epb(out: bytearray, if_id: int, ts_ns: int, data, orig_len: int, trailer: bytes) -> None:
        """Append one EPB to `out` (trailer from epb_trailer(len(data), ...)); the one place
        its layout is spelt, for add_packet() and for batches (add_encoded())."""
        n = len(data)
        total = _EPB_HEAD.size + n + len(trailer) + 4
        out += _EPB_HEAD.pack(_EPB, total, if_id, (ts_ns >> 32) & 0xFFFFFFFF, ts_ns & 0xFFFFFFFF, n, orig_len)
        out += data
        out += trailer
        out += _U32.pack(total)

    def add_packet(self, if_id: int, ts_ns: int, data: bytes, orig_len: int | None = None,
                   direction: int = DIR_UNKNOWN, comment: str | None = None, drops: int = 0) -> None:
        """Write an EPB. ts_ns: epoch nanoseconds; orig_len: length on the wire if `data` is
        truncated; direction: DIR_INBOUND/DIR_OUTBOUND; comment: see process_comment();
        drops: packets lost since the previous packet (epb_dropcount; tshark: frame.drop_count)."""
        self.add_encoded(if_id, self.encode_packet(if_id, ts_ns, data, orig_len, direction, comment, drops),
                         1, ts_ns)

    def encode_packet(self, if_id: int, ts_ns: int, data, orig_len: int | None = None,
                      direction: int = DIR_UNKNOWN, comment: str | None = None, drops: int = 0) -> bytearray:
        """One EPB (arguments as add_packet), cut at the interface's snaplen; a view is copied."""
        if orig_len is None:
            orig_len = len(data)
        snap = self._ifaces[if_id]["snaplen"]
        if snap and len(data) > snap:
            data = data[:snap]
        block = bytearray()
        self.put_epb(block, if_id, ts_ns, data, orig_len, self.epb_trailer(len(data), direction, comment, drops))
        return block

    def add_encoded(self, if_id: int, blocks, count: int, last_ts_ns: int) -> None:
        """Write `count` EPBs of interface if_id already encoded (put_epb) in `blocks`,
        the latest of them stamped last_ts_ns. The writer keeps `blocks`: no more changes."""
        self._q[1].append(blocks)
        self._queued += len(blocks)
        self._blocks += count
        self._count(if_id, count, last_ts_ns)
        if self._queued >= BATCH_BYTES or self._blocks >= BATCH_BLOCKS:
            self.flush()

    def _count(self, if_id: int, count: int, last_ts_ns: int) -> None:
        """`count` more packets of interface if_id, the latest stamped last_ts_ns (for the ISB)."""
        iface = self._ifaces[if_id]
        self.packets += count
        iface["packets"] += count
        if last_ts_ns > iface["end"]:
            iface["end"] = last_ts_ns

    def set_stats(self, if_id: int, received: int | None = None, dropped: int | None = None) -> None:
        """Counters for the ISB close() writes: packets the capture saw on the interface
        (default: packets written) and packets lost before us (e.g. ring buffer drops)."""
        iface = self._ifaces[if_id]
        iface["recv"], iface["drop"] = received, dropped

    def direct_room(self, min_len: int) -> memoryview | None:
        """Writable room of at least min_len bytes at the end of the file, straight in the
        direct-I/O writer's buffer, for EPBs encoded in place (pcapng_mode with native/epb.c);
        commit_direct() then says what was used. None when the file is not written directly."""
        if self._direct is None:
            return None
        if not self._file.committed:
            self.commit()
        self._drain_parts()
        return self._direct.reserve(min_len)

    def commit_direct(self, if_id: int, used: int, count: int, last_ts_ns: int) -> None:
        """`count` EPBs of interface if_id, `used` bytes, are in the last direct_room()."""
        self._direct.commit(used)
        self._count(if_id, count, last_ts_ns)

    def _drain_parts(self) -> None:
        """The queued blocks out: into the direct-I/O writer (not yet to disk), or with
        writev(). What is written is read from the writer's position, never counted from
        return values: an exception right after a write leaves nothing to write again."""
        base, parts = self._q
        if parts:
            if base is None:
                base = self._tell()
                if base is None:
                    self._write_pipe(parts)
                    return
                self._q = (base, parts)
            while rest := _after(parts, self._tell() - base):
                if self._direct is not None:
                    for p in rest:       # a buffered write takes all of p or raises before it
                        self._direct.write(p)
                else:
                    os.writev(self._fd, rest)
            self._q = (None, [])         # one store: a new queue, its position unknown
        self._queued = self._blocks = 0

    def flush(self) -> None:
        """Write the queued blocks, ending on a block boundary: into the direct-I/O writer,
        or with one writev() (regular files without O_DIRECT, pipes, stdout)."""
        if not self._file.committed:
            self.commit()
        self._drain_parts()
        if self._direct is not None:
            self._direct.flush()

    def _write_pipe(self, parts: list) -> None:
        """writev() until a pipe took everything (it may take part of a block)."""
        while parts:
            _consume(parts, os.writev(self._fd, parts))
        self._queued = self._blocks = 0

    def _tell(self) -> int | None:
        """Where the next write lands; None for a pipe."""
        if self._direct is not None:
            return self._direct.tell()
        try:
            return os.lseek(self._fd, 0, os.SEEK_CUR)
        except OSError:           # a pipe
            return None

    def commit(self) -> None:
        """A pending file (see __init__) becomes ours: emptied, 0600; blocks may go out."""
        self._file.commit()

    def discard(self) -> None:
        """Close a pending file without writing a byte: it stays as it was, or goes if this
        writer created it."""
        if self._fd is None:
            return
        self._q = (None, [])
        try:
            if self._direct is not None:
                self._direct.close()      # nothing was handed to it: it writes nothing
                self._direct = None
        finally:
            self._file.discard()
            self._fd = None

    def close(self, end_ns: int | None = None) -> None:
        """Write an ISB per interface (isb_endtime = end_ns, default now), flush, close."""
        if self._fd is None:
            return
        end = time.time_ns() if end_ns is None else end_ns
        for i, iface in enumerate(self._ifaces):
            recv = iface["packets"] if iface["recv"] is None else iface["recv"]
            opts = (_opt(2, _u64_ts(iface["start"])) + _opt(3, _u64_ts(max(end, iface["end"])))
                    + _opt(4, struct.pack("<Q", recv)))
            if iface["drop"] is not None:
                opts += _opt(5, struct.pack("<Q", iface["drop"]))
            body = struct.pack("<I", i) + _u64_ts(end) + opts + _OPT_END
            self._queue(_block(_ISB, body))
        try:
            self.flush()
        finally:
            if self._direct is not None:
                self._direct.close()      # waits for the writer thread, then closes its descriptor
                self._direct = None
            self._file.close()
            self._fd = None

    def _queue(self, block: bytes) -> None:
        self._q[1].append(block)
        self._queued += len(block)
        self._blocks += 1

    def __enter__(self) -> "PcapngWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Gate:
    """A hold that ends early: the packets queued with it wait until open() (the secret they
    wait for is written) or their lag is up, whichever comes first."""
    __slots__ = ("is_open",)

    def __init__(self):
        self.is_open = False

    def open(self) -> None:
        self.is_open = True


def _released(hold) -> bool:
    """Whether a queued item's hold (False, True or a Gate) lets it go before its lag is up."""
    return hold is False or (hold is not True and hold.is_open)


class PcapngSink:
    """PcapngWriter plus a reordering queue: packets wait `lag_ns` (by their timestamp) and go
    out in timestamp order; secrets are written at once, so they precede every packet still
    waiting. Sans-IO in time: the caller passes `now_ns` (epoch ns, the clock of the packet
    timestamps), best the time at which it last drained the key ring completely.

        sink = PcapngSink(PcapngWriter(path))
        lo = sink.writer.add_interface("lo", LINKTYPE_ETHERNET)
        ... sink.secrets(lines); sink.packet(lo, ts, frame, ...); sink.flush(time.time_ns())
        sink.close(stats={lo: (received, dropped)})
    """

    def __init__(self, writer: PcapngWriter, lag_ns: int = DEFAULT_LAG_NS,
                 max_queued_bytes: int = MAX_QUEUED_BYTES):
        self.writer = writer
        self.lag_ns = lag_ns
        self.max_queued_bytes = max_queued_bytes
        self._heap: list[tuple] = []
        self._seq = 0
        self._bytes = 0
        self.forced = 0       # packets written before their lag was up (queue over its bound)

    def secrets(self, lines: Iterable[str]) -> int:
        return self.writer.add_secrets(lines)

    def packet(self, if_id: int, ts_ns: int, data: bytes, orig_len: int | None = None,
               direction: int = DIR_UNKNOWN, comment: str | None = None, drops: int = 0) -> None:
        """Queue a packet (arguments as PcapngWriter.add_packet; a view is copied)."""
        self.encoded(if_id, self.writer.encode_packet(if_id, ts_ns, data, orig_len, direction, comment, drops),
                     1, ts_ns, ts_ns)

    def encoded(self, if_id: int, blocks, count: int, first_ts_ns: int, last_ts_ns: int,
                hold: bool = True) -> None:
        """Queue `count` EPBs already encoded (PcapngWriter.put_epb) in timestamp order, first
        to last. hold: they wait until the last one's lag is up (see flush()); a Gate: until it
        opens, or the lag is up, whichever is first; False: they go out as soon as nothing
        queued before them is held."""
        self._seq += 1         # equal timestamps keep arrival order
        heapq.heappush(self._heap, (first_ts_ns, self._seq, last_ts_ns, hold, if_id, blocks, count))
        self._bytes += len(blocks)
        while self._bytes > self.max_queued_bytes:
            self.forced += self._emit(heapq.heappop(self._heap))

    def flush(self, now_ns: int | None = None, all_: bool = False) -> int:
        """Write the packets with ts_ns <= now_ns - lag_ns (all of them if all_) in timestamp
        order, then flush the file; returns the number of packets written. A packet queued
        after later ones were written still goes out, out of order (readers accept that)."""
        if not all_ and now_ns is None:
            raise ValueError("flush() needs now_ns unless all_=True")
        limit = None if all_ else now_ns - self.lag_ns
        n = 0
        heap = self._heap
        while heap and (limit is None or _released(heap[0][3]) or heap[0][2] <= limit):
            n += self._emit(heapq.heappop(heap))
        self.writer.flush()
        return n

    @property
    def pending(self) -> int:
        return len(self._heap)

    def release(self) -> int:
        """Write the queued blocks at the front that do not wait (see encoded()); returns how
        many items stay queued behind one that does."""
        heap = self._heap
        while heap and _released(heap[0][3]):
            self._emit(heapq.heappop(heap))
        return len(heap)

    def close(self, stats: dict[int, tuple[int | None, int | None]] | None = None,
              end_ns: int | None = None) -> None:
        """Write every held packet, the ISBs (stats: if_id -> (received, dropped)), close."""
        self.flush(all_=True)
        for if_id, (recv, drop) in (stats or {}).items():
            self.writer.set_stats(if_id, recv, drop)
        self.writer.close(end_ns)

    def _emit(self, item: tuple) -> int:
        _first, _seq, last, _hold, if_id, blocks, count = item
        self._bytes -= len(blocks)
        self.writer.add_encoded(if_id, blocks, count, last)
        return count

    def __enter__(self) -> "PcapngSink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
