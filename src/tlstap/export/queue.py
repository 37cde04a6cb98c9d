"""The exporter's retry queue: messages waiting to be acknowledged, first in first out,
in memory up to a byte bound, then in a spool file on disk up to another, then dropped and
counted by reason (never silently).

Order: the memory part always holds the oldest messages. Once something is on disk, new
messages go to disk too, until the disk part is drained; messages taken for sending and
given back (no ack) return to the head, before everything else.

The spool file is created without a name (O_TMPFILE; else created 0600 and unlinked at
once): nothing of it outlives the process, nobody else can open it.

Thread safety: one lock; put() is called by the decoder's thread, the rest by the
publisher's. A put() that spills writes to the page cache (a pwrite), it never waits for
the network.
"""
from __future__ import annotations

import collections
import os
import struct
import tempfile
import threading

#: why a message was dropped (the `dropped` counters, the status line)
QUEUE_FULL = "queue full"
SHUTDOWN = "shutdown"

_HEAD = struct.Struct("<HI")     # a spooled message: id length, payload length, id, payload


def _spool_file(spool_dir: str | None) -> int:
    d = spool_dir or tempfile.gettempdir()
    try:
        return os.open(d, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:          # a file system without O_TMPFILE
        fd, path = tempfile.mkstemp(prefix="tlstap-export-", dir=d)   # 0600
        os.unlink(path)
        return fd


class ExportQueue:
    """Items are (msg_id: bytes, payload: bytes); an item's size is len(msg_id) + len(payload).

    take() hands the oldest items out (they are "in flight", still counted in memory: the
    bound may be passed by what one take() reads from disk); the caller ends each with
    done() (acknowledged) or give_back() (to be sent again, at the head)."""

    def __init__(self, mem_max: int, disk_max: int, spool_dir: str | None = None):
        self.mem_max = mem_max
        self.disk_max = disk_max
        self.spool_dir = spool_dir
        self.lock = threading.Lock()
        self._mem: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self.mem_bytes = 0           # queued in memory plus in flight
        self.inflight = 0            # items taken and not yet done or given back
        self._fd: int | None = None
        self._rd = self._wr = 0      # spool file offsets: unread data is [_rd, _wr)
        self.disk_items = 0
        self.dropped: dict[str, int] = {}
        self.spool_error: str | None = None

    @property
    def disk_bytes(self) -> int:
        return self._wr - self._rd

    def __len__(self) -> int:
        """Items queued (memory and disk), not counting those in flight."""
        return len(self._mem) + self.disk_items

    def put(self, msg_id: bytes, payload: bytes) -> bool:
        """Queue an item; False: dropped (counted as QUEUE_FULL)."""
        size = len(msg_id) + len(payload)
        with self.lock:
            if not self.disk_items and self.mem_bytes + size <= self.mem_max:
                self._mem.append((msg_id, payload))
                self.mem_bytes += size
                return True
            if self._wr - self._rd + _HEAD.size + size <= self.disk_max and self._spill(msg_id, payload):
                return True
            self.dropped[QUEUE_FULL] = self.dropped.get(QUEUE_FULL, 0) + 1
            return False

    def _spill(self, msg_id: bytes, payload: bytes) -> bool:
        try:
            if self._fd is None:
                self._fd = _spool_file(self.spool_dir)
            rec = _HEAD.pack(len(msg_id), len(payload)) + msg_id + payload
            os.pwrite(self._fd, rec, self._wr)
        except OSError as e:         # a full or read-only disk: the spool is as good as full
            self.spool_error = self.spool_error or f"export spool: {e.strerror}"
            return False
        self._wr += len(rec)
        self.disk_items += 1
        return True

    def take(self, n: int) -> list[tuple[bytes, bytes]]:
        """Up to n of the oldest items, now in flight."""
        out = []
        with self.lock:
            mem = self._mem
            while mem and len(out) < n:
                out.append(mem.popleft())
            while self.disk_items and len(out) < n:
                item = self._unspill()
                self.mem_bytes += len(item[0]) + len(item[1])
                out.append(item)
            self.inflight += len(out)
        return out

    def _unspill(self) -> tuple[bytes, bytes]:
        fd = self._fd
        ilen, plen = _HEAD.unpack(os.pread(fd, _HEAD.size, self._rd))
        body = os.pread(fd, ilen + plen, self._rd + _HEAD.size)
        self._rd += _HEAD.size + ilen + plen
        self.disk_items -= 1
        if not self.disk_items:                      # drained: start the file over
            self._rd = self._wr = 0
            os.ftruncate(fd, 0)
        elif self._rd >= max(self.disk_max, 1 << 20):
            # the consumed head is as big as the spool may be: move the rest to the start, so
            # the file stays under twice the bound (each byte is moved at most once per spool)
            rest = os.pread(fd, self._wr - self._rd, self._rd)
            os.pwrite(fd, rest, 0)
            os.ftruncate(fd, len(rest))
            self._rd, self._wr = 0, len(rest)
        return body[:ilen], body[ilen:]

    def done(self, items) -> None:
        """Items acknowledged (or given up on): their memory is free."""
        with self.lock:
            self.mem_bytes -= sum(len(i) + len(p) for i, p in items)
            self.inflight -= len(items)

    def give_back(self, items) -> None:
        """Items not acknowledged, oldest first: they go back to the head, to be taken again."""
        with self.lock:
            self._mem.extendleft(reversed(items))
            self.inflight -= len(items)

    def drop_all(self, reason: str) -> int:
        """Drop everything queued and in flight, counted under `reason`; how many."""
        with self.lock:
            n = len(self._mem) + self.disk_items + self.inflight
            self._mem.clear()
            self.mem_bytes = self.inflight = self.disk_items = 0
            self._rd = self._wr = 0
            if self._fd is not None:
                os.ftruncate(self._fd, 0)
            if n:
                self.dropped[reason] = self.dropped.get(reason, 0) + n
            return n

    def close(self) -> None:
        with self.lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
