"""Capture files written with O_DIRECT: the payload bypasses the page cache.

A capture can write hundreds of MB/s. Through the page cache every byte is
copied into a freshly allocated page cache page (on a VM whose free memory
goes back to the host that copy is ~0.4 GB/s and was most of the consumer's
CPU), fills the server's page cache with plaintext nobody rereads, and is
written back by kworkers on the traced machine's CPUs anyway. Direct I/O
hands our own, reused, buffer to the block device instead.

wrap(out) returns a buffered file object with the same write/flush/close
behaviour as `out`, or `out` itself when direct I/O does not apply (not a
regular file, O_APPEND, stdin/out/err, a file system without O_DIRECT, or
TLSTAP_DIRECT_IO=0). A writer thread does the (blocking) direct writes.
flush() queues everything written so far, the unaligned tail through the
page cache (written again, with what follows it, by the next direct write),
at most every TAIL_SYNC_S; it is in the file once the thread gets to it, at
the latest on close().

A signal's exception (KeyboardInterrupt) can surface between any two bytecodes of the
main thread. Every step here records what it did in one store that is followed by nothing
that can raise before the caller learns of it (write()), or hands its work on only after
its own state moved on (_submit()): an exception anywhere leaves no byte to be written twice.
"""
from __future__ import annotations

import atexit
import errno
import io
import mmap
import os
import queue
import stat
import threading
import time
import weakref

ALIGN = 4096              # file offset, length and memory alignment of every direct write
CHUNK = 4 << 20           # direct writes of about this size
NBUF = 4                  # buffers of CHUNK: how far the writer thread may lag
TAIL_SYNC_S = 0.1         # flush() brings the file up to date at most this often


def buffers(n: int, size: int) -> tuple[mmap.mmap, list[memoryview]]:
    """n page-aligned buffers of `size` bytes in one private mapping, on transparent huge
    pages where the kernel gives them (THP "madvise" is the common default): every direct
    write pins its buffer's pages, 512 page-table entries per 2 MiB on small pages, and that
    walk was a tenth of the writer's CPU at 1 GB/s. (A shared anonymous mapping, mmap's
    default, is shmem and gets no huge pages in that mode.)"""
    m = mmap.mmap(-1, n * size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):   # no THP in this kernel: small pages work as well
        pass
    view = memoryview(m)
    return m, [view[i * size:(i + 1) * size] for i in range(n)]


class _DirectRaw(io.RawIOBase):
    """Fills page-aligned buffers; a writer thread pwrite()s each full one
    (the GIL is free meanwhile), so a slow device does not stall the caller
    until NBUF buffers are waiting."""

    def __init__(self, out, dfd: int, start: int):
        self._out, self._fd, self._dfd = out, out.fileno(), dfd
        self._map, bufs = buffers(NBUF, CHUNK + ALIGN)
        # SimpleQueue: put() and get() are single C calls, so an exception raised by a
        # signal cannot leave an item half handed over (queue.Queue runs Python code)
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for b in bufs[1:]:
            self._free.put(b)
        self._cur = bufs[0]
        self._base = start     # file offset of _cur[0]; a multiple of ALIGN
        self._n = 0            # bytes held in _cur
        self._direct = True
        self._tail_synced = True
        self._error: BaseException | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._writer, name="tlstap-direct-io", daemon=True)
        self._thread.start()
        _open.add(self)

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        """End of what was written (the BufferedWriter's tell() adds what it holds)."""
        return self._base + self._n

    def write(self, b) -> int:
        """What fits in the current buffer; the BufferedWriter comes back for the rest.
        Storing _n is the commit and the last step: an exception after it, before the
        caller got the count, would make the BufferedWriter write those bytes again."""
        if self._error is not None:
            raise self._error
        if self._n >= CHUNK:
            self._submit()
        b = memoryview(b).cast("B")
        k = min(len(b), CHUNK + ALIGN - self._n)
        self._cur[self._n:self._n + k] = b[:k]
        self._tail_synced = False
        self._n += k
        return k

    def reserve(self, min_len: int) -> memoryview | None:
        """The free room of the current buffer, at least min_len bytes (a fresh buffer if
        need be), for the caller to fill in place and commit(); None if min_len is more
        than a buffer holds. Filling it is the one copy of the data on its way to disk."""
        if self._error is not None:
            raise self._error
        room = CHUNK + ALIGN - self._n
        if room < min_len and self._n >= ALIGN:
            self._submit()
            room = CHUNK + ALIGN - self._n
        if room < min_len:
            return None
        return self._cur[self._n:]

    def commit(self, n: int) -> None:
        """n bytes of the last reserve() hold data now."""
        if n:
            self._tail_synced = False
            self._n += n
            if self._n >= CHUNK:
                self._submit()

    def _submit(self) -> None:
        """Hand the whole blocks of _cur to the writer; the partial one moves to a fresh buffer."""
        whole = self._n & ~(ALIGN - 1)
        nxt = self._free.get()
        rest = self._n - whole
        nxt[:rest] = self._cur[whole:self._n]
        job = (self._cur, whole, self._base, True)
        # state first (these stores run with no check for signals between them), then the
        # job: an exception between the two loses nothing that is not queued yet, and an
        # exception after put() cannot make the same buffer go out, and be recycled, twice
        self._cur, self._base, self._n = nxt, self._base + whole, rest
        self._jobs.put(job)

    def _writer(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if isinstance(job, threading.Event):     # wait(): all jobs before it are done
                job.set()
                continue
            buf, length, off, recycle = job
            if self._error is None:
                try:
                    self._pwrite(buf[:length], off, recycle)
                except BaseException as e:   # reported by the next write/flush/close
                    self._error = e
            if recycle:
                self._free.put(buf)

    def _pwrite(self, view, off: int, direct: bool) -> None:
        if direct and self._direct:
            try:
                self._pwrite_all(self._dfd, view, off)
                return
            except OSError as e:
                if e.errno != errno.EINVAL:   # an alignment this device does not take: go buffered
                    raise
                self._direct = False
        self._pwrite_all(self._fd, view, off)

    @staticmethod
    def _pwrite_all(fd: int, view, off: int) -> None:
        while len(view):
            w = os.pwrite(fd, view, off)
            view, off = view[w:], off + w

    def sync_tail(self) -> None:
        """Queue what is held, the partial block through the page cache (the next
        direct write covers it again): once the writer has run, all is in the file."""
        if self._error is not None:
            raise self._error
        if self._tail_synced:
            return
        if self._n >= ALIGN:
            self._submit()
        if self._n:
            self._jobs.put((memoryview(self._cur[:self._n].tobytes()), self._n, self._base, False))
        self._tail_synced = True

    def wait(self) -> None:
        """Until everything queued is in the file."""
        done = threading.Event()
        self._jobs.put(done)
        done.wait()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.sync_tail()
        finally:
            self._jobs.put(None)
            self._thread.join()
            os.close(self._dfd)
            self._cur.release()
            while not self._free.empty():
                self._free.get_nowait().release()
            try:
                self._map.close()
            except BufferError:      # a caller still holds a reserve() view: the mapping
                pass                 # goes with the last view
            super().close()
            self._out.close()
        if self._error is not None:
            raise self._error


_open: "weakref.WeakSet[_DirectRaw]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Never leave data in the buffers of a writer nobody closed (the writer
    thread is a daemon: it must finish before interpreter shutdown stops it)."""
    for raw in list(_open):
        try:
            raw.close()
        except Exception:
            pass


class _DirectBuffered(io.BufferedWriter):
    _next_sync = 0.0

    def flush(self) -> None:
        """Everything written is in the file within TAIL_SYNC_S (close() leaves nothing out).
        Captures flush after every read of their ring, hundreds of times a second; syncing
        the tail each time cost a page-cache write, and then a writeback and a wait, when
        the next direct write covered that page (a third of the writer's I/O at 1 GB/s)."""
        super().flush()
        now = time.monotonic()
        if not self.raw.closed and now >= self._next_sync:
            self.raw.sync_tail()
            self._next_sync = now + TAIL_SYNC_S

    def reserve(self, min_len: int) -> memoryview | None:
        """_DirectRaw.reserve, after what this buffer holds."""
        super().flush()
        return self.raw.reserve(min_len)

    def commit(self, n: int) -> None:
        self.raw.commit(n)


def wrap(out):
    """`out` or a direct-I/O writer on the same file (see the module docstring)."""
    if os.environ.get("TLSTAP_DIRECT_IO", "1") == "0":
        return out
    try:
        fd = out.fileno()
        if fd <= 2 or out.tell() % ALIGN or os.lseek(fd, 0, os.SEEK_CUR) != out.tell():
            return out
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return out
        import fcntl
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
            return out
        dfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return out
    dst = os.fstat(dfd)
    if (dst.st_dev, dst.st_ino) != (st.st_dev, st.st_ino):
        os.close(dfd)
        return out
    return _DirectBuffered(_DirectRaw(out, dfd, out.tell()), buffer_size=CHUNK)
