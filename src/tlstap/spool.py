"""Capture at full speed, decode at low priority: text mode split over two processes.

Why: decoding HTTP and formatting text costs 2-20 us per call in Python. Done inline,
on a host whose cores the traced service keeps busy, that CPU comes out of the service
(nginx kept 0.22x of its request rate in text mode, 0.49x with --raw). So the capturing
process only moves the ring buffer's committed bytes, framing and all, into an unlinked
spool file (one write per poll), and a forked decoder process at idle priority
(SCHED_IDLE) reads the spool and does the rest. With spare CPU it keeps up and output is
live; without, the decoder falls behind instead of the service. The backlog is bounded (--spool-max): past half of
it the decoder returns to normal priority, and a piece that would not fit is dropped and
counted ("decoder backlog full"), like ring buffer losses. At exit the decoder finishes
the spool before tlstap returns; a second Ctrl-C makes it write the rest undecoded, one
record per call, which is quicker. Should the capturing process die (SIGKILL), the decoder
writes out what it holds and exits at once: see _Orphaned.

Control messages go over a pipe, 32 bytes each (atomic): the capturing side never blocks
on them. DATA says how far the spool is complete and the wall clock when it was, which
the decoder uses as "now" for its reordering window (its own clock would release every
held call at once while it lags behind).
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import signal
import struct
import sys
import tempfile
import time

from .events import BACKLOG_FULL, RING_FULL, RING_ROOM
from .libbpf.ringbuf import records

_MSG = struct.Struct("<B7xQQQ")
DATA, LOST, END = 1, 2, 3
_WHY = (RING_FULL, BACKLOG_FULL, RING_ROOM)     # LOST's third field
_CONSUMED = struct.Struct("<Q")
_READ_CHUNK = 4 << 20             # > the largest record (a 32 KiB chunk and its header)
_PUNCH_EVERY = 8 << 20            # give consumed spool space back this often (soon: the pages are reused hot)
NICE_LAGGING, NICE_NORMAL = 19, 0
HEARTBEAT_S = 0.1


_libc = ctypes.CDLL(None, use_errno=True)   # fallocate and prctl: no os.* wrapper for these uses
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_PR_SET_PDEATHSIG = 1


def _punch(fd: int, upto: int) -> None:
    """Free the spool's consumed head; the file size and later offsets stay, the disk or
    tmpfs pages go. Best effort."""
    _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, upto & ~0xFFF)


def _set_nice(value: int) -> None:
    """Lagging: SCHED_IDLE (any runnable task preempts it at once; a nice-19 task still takes
    its slice of a busy CPU: 0.33x against 0.38x of nginx's rate in `tlstap bench`), and nice
    19 as well, which is what remains should the policy be refused. Normal: SCHED_OTHER,
    nice 0 (lowering niceness needs CAP_SYS_NICE; without it we stay where we are)."""
    policy = os.SCHED_IDLE if value == NICE_LAGGING else os.SCHED_OTHER
    for set_one in (lambda: os.sched_setscheduler(0, policy, os.sched_param(0)),
                    lambda: os.setpriority(os.PRIO_PROCESS, 0, value)):
        try:
            set_one()
        except OSError:
            pass


def _read_exact(fd: int, n: int) -> bytes:
    """n bytes from the pipe, or b"" at its end (EINTR is retried by Python itself)."""
    buf = b""
    while len(buf) < n:
        part = os.read(fd, n - len(buf))
        if not part:
            return b""
        buf += part
    return buf


def _count(piece: memoryview) -> int:
    return len(records(piece)[0])


class Decoder:
    """What runs in the decoder process, built there by the factory given to SpoolPipeline:
    feed(record) per ring record; tick(now_ns) releases reordered calls older than the lag;
    periodic() once a second; on_lost(records, bytes, why); finish(counters, line) at the
    end; hurry() switches to the cheapest output for what is left."""

    def feed(self, rec: memoryview) -> None: ...
    def tick(self, now_ns: int) -> None: ...
    def periodic(self) -> None: ...
    def on_lost(self, records: int, nbytes: int, why: str) -> None: ...
    def finish(self, counters: dict | None, line: str | None) -> None: ...
    def hurry(self) -> None: ...


class SpoolPipeline:
    """The capturing side. Creating it forks the decoder (do it before any BPF object exists,
    so the decoder holds no probe alive); put() spools ring bytes; new_drops() tells what did
    not fit; end() hands over the summary and waits."""

    def __init__(self, make_decoder, max_backlog: int, spool_dir: str | None = None):
        self.max_backlog = max_backlog
        self.file = tempfile.TemporaryFile(dir=spool_dir)      # unlinked, 0600
        self.fd = self.file.fileno()
        self._shared = mmap.mmap(-1, mmap.PAGESIZE)           # decoder's consumed offset
        self.end_off = 0
        self._sent_off = 0
        self._sent_at = 0.0
        self.dropped = [0, 0]                                 # records, bytes: backlog full
        self._dropped_told = (0, 0)
        self.exit_code = 0
        self._unsent_lost: list[tuple[int, int, int]] = []   # LOST messages the full pipe refused
        r, w = os.pipe()
        parent = os.getpid()
        self.pid = os.fork()
        if self.pid == 0:                                     # the decoder process
            os.close(w)
            code = 1
            try:
                code = _decoder_main(make_decoder, self.fd, r, self._shared, max_backlog, parent)
            except BrokenPipeError:
                code = 0
            except BaseException as e:   # noqa: BLE001 - one line, never a traceback
                sys.stderr.write(f"tlstap: decoder: {type(e).__name__}: {e}\n")
            finally:
                try:
                    sys.stdout.flush()
                except BaseException:    # noqa: BLE001
                    pass
                os._exit(code)
        os.close(r)
        self._ctl = w
        os.set_blocking(w, False)

    # ---- capturing side ---------------------------------------------------------------------

    def consumed(self) -> int:
        return _CONSUMED.unpack_from(self._shared, 0)[0]

    def backlog(self) -> int:
        return self.end_off - self.consumed()

    def put(self, piece: memoryview) -> None:
        """RingBuffer.take's writer: spool the piece, or drop and count it when the backlog
        would pass --spool-max."""
        n = len(piece)
        if self.pid is None:           # the decoder is gone (its output was closed)
            return
        if self.end_off + n - self.consumed() > self.max_backlog:
            self.dropped[0] += _count(piece)
            self.dropped[1] += n
            return
        off = 0
        while off < n:
            off += os.pwrite(self.fd, piece[off:], self.end_off + off)
        self.end_off += n

    def notify(self) -> None:
        """Tell the decoder how far the spool is complete: when it has caught up with what it
        was told, or every 50 ms, so the pipe stays nearly empty; with nothing new, every
        0.1 s all the same, so that it releases held calls and flushes while traffic is quiet."""
        now = time.monotonic()
        if self.end_off == self._sent_off:
            if now - self._sent_at < HEARTBEAT_S:
                return
        elif self.consumed() < self._sent_off and now - self._sent_at < 0.05:
            return
        if self._send(DATA, self.end_off, time.time_ns(), 0):
            self._sent_off, self._sent_at = self.end_off, now

    def new_drops(self) -> tuple[int, int]:
        """(records, bytes) dropped for want of backlog room since the last call; the decoder
        is told too, so the output says where."""
        new = self.dropped[0] - self._dropped_told[0], self.dropped[1] - self._dropped_told[1]
        if new[0]:
            self._dropped_told = tuple(self.dropped)
            self.report_lost(*new, why=BACKLOG_FULL)
        return new

    def report_lost(self, recs: int, nbytes: int, why: str = RING_FULL) -> None:
        """Losses, for the output: a line where the stream lost them."""
        self._unsent_lost.append((recs, nbytes, _WHY.index(why)))
        while self._unsent_lost and self._send(LOST, *self._unsent_lost[0]):
            self._unsent_lost.pop(0)

    def _send(self, kind: int, a: int, b: int, c: int) -> bool:
        try:
            os.write(self._ctl, _MSG.pack(kind, a, b, c))
            return True
        except (BlockingIOError, BrokenPipeError):   # full (it will be resent) / decoder gone
            return False

    def alive(self) -> bool:
        """False once the decoder has exited (reaped here; end() then reports its status)."""
        if self.pid is None:
            return False
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if not pid:
            return True
        self._reaped(status)
        return False

    def _reaped(self, status: int) -> None:
        self.pid = None
        self.exit_code = os.waitstatus_to_exitcode(status)

    def end(self, counters: dict, line: str, stop: list, on_wait=None) -> int:
        """Hand over the summary, wait for the decoder to finish; its exit status.
        A new entry in `stop` (another signal) while waiting makes it hurry."""
        if self.pid is None:
            os.close(self._ctl)
            self.file.close()
            return self.exit_code
        os.set_blocking(self._ctl, True)
        payload = json.dumps({"counters": counters, "line": line}).encode()
        try:
            for lost in self._unsent_lost:
                os.write(self._ctl, _MSG.pack(LOST, *lost))
            os.write(self._ctl, _MSG.pack(DATA, self.end_off, time.time_ns(), 0))
            os.write(self._ctl, _MSG.pack(END, len(payload), 0, 0) + payload)
        except BrokenPipeError:
            pass
        os.close(self._ctl)
        seen, told, t0 = len(stop), False, time.monotonic()
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self._reaped(status)
                self.file.close()
                return self.exit_code
            if len(stop) > seen and not told:
                os.kill(self.pid, signal.SIGUSR1)
                told = True
            if on_wait is not None:
                on_wait(time.monotonic() - t0, self.backlog())
            time.sleep(0.05)

    def abort(self) -> None:
        """An error before the capture ran: stop the decoder with nothing to say."""
        os.close(self._ctl)
        if self.pid is not None:
            self._reaped(os.waitpid(self.pid, 0)[1])
        self.file.close()


class _Orphaned(Exception):
    """The capturing process is gone (killed: it would otherwise have sent END). What is
    already decoded and buffered goes out; the rest of the backlog does not get decoded: it
    can be up to --spool-max (minutes of work), and nothing of tlstap may outlive its process."""


def _decoder_main(make_decoder, fd: int, ctl: int, shared: mmap.mmap, max_backlog: int,
                  parent: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the terminal's Ctrl-C is for the capture
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    hurry = []                # signals received: SIGUSR1 = a second Ctrl-C, SIGUSR2 = orphaned
    signal.signal(signal.SIGUSR1, lambda signum, _: hurry.append(signum))
    signal.signal(signal.SIGUSR2, lambda signum, _: hurry.append(signum))
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGUSR2, 0, 0, 0)
    if os.getppid() != parent:                        # it died before prctl took effect
        hurry.append(signal.SIGUSR2)
    _set_nice(NICE_LAGGING)
    dec = make_decoder()
    try:
        return _decode(dec, fd, ctl, shared, max_backlog, parent, hurry)
    except _Orphaned:
        left = os.fstat(fd).st_size - _CONSUMED.unpack_from(shared, 0)[0]
        dec.finish(None, None)
        sys.stderr.write(f"tlstap: decoder: the capture process died; about {left} bytes of its "
                         f"backlog were not decoded\n")
        return 1


def _decode(dec, fd: int, ctl: int, shared: mmap.mmap, max_backlog: int, parent: int,
            hurry: list) -> int:
    pos = punched = 0
    nice = NICE_LAGGING            # as _decoder_main set it
    hurried = False
    last_periodic = time.monotonic()
    while True:
        msg = _read_exact(ctl, _MSG.size)
        if signal.SIGUSR2 in hurry or (not msg and os.getppid() != parent):
            raise _Orphaned
        summary = now_ns = None
        kind, a, b, c = _MSG.unpack(msg) if msg else (END, 0, 0, 0)   # no msg: the capture went away
        if kind == LOST:
            dec.on_lost(a, b, _WHY[c])
            continue
        if kind == END:
            body = _read_exact(ctl, a)
            summary = json.loads(body) if body else None
            end = os.fstat(fd).st_size      # the capture wrote its last piece before END
        else:
            end, now_ns = a, b
        backlog = end - pos
        if kind == END or backlog > max_backlog // 2:
            want = NICE_NORMAL
        elif backlog < max_backlog // 8:
            want = NICE_LAGGING
        else:
            want = nice
        if want != nice:
            nice = want
            _set_nice(nice)
        while pos < end:
            data = os.pread(fd, min(end - pos, _READ_CHUNK), pos)
            if not data:
                break
            recs, used = records(memoryview(data))
            if not used:
                raise RuntimeError(f"spool record at {pos} longer than {_READ_CHUNK} bytes")
            feed = dec.feed
            for rec in recs:
                if hurry:
                    if signal.SIGUSR2 in hurry:
                        raise _Orphaned
                    hurry.clear()
                    if not hurried:
                        hurried = True
                        dec.hurry()
                        feed = dec.feed
                feed(rec)
            pos += used
            _CONSUMED.pack_into(shared, 0, pos)
            if pos - punched >= _PUNCH_EVERY:
                _punch(fd, pos)
                punched = pos
        if now_ns is not None:
            dec.tick(now_ns)
        t = time.monotonic()
        if t - last_periodic >= 1.0:
            last_periodic = t
            dec.periodic()
        if kind == END:
            dec.finish(summary["counters"] if summary else None, summary["line"] if summary else None)
            return 0
