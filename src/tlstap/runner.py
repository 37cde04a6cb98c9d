"""The lifecycle of every capture, once: sources (what the kernel side captures) feed outputs
(what the user asked for), and this module runs them.

    sources                    events                 outputs (sinks)
    probe  (read/write uprobes) -- ring records -----> text / JSON lines (decoder process)
    keys   (secret uprobes)     -- KeyLine ----------> key log file, pcapng (DSBs)
    packets (TC programs)       -- ring pieces ------> pcapng (EPBs)

Order, the same for any mix of outputs: every flag and library was checked before this module
is reached (commands/capture.py); the outputs are opened but left as they were; the sources
start all or nothing; only then do the outputs take their files (commit). Then the loop: each
step every output pumps what its sources have ready, one wait on all the ring buffers when
nothing was there, a loss report every second. At the end: probes detached, rings drained,
losses of the last second reported, then each output closes and says its summary.
"""
from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from typing import Protocol

#: after a productive pass: read again on our own timer (producers may not wake us, see
#: RingBuffer.poll), but let the rings fill a little so that each pass moves a batch
BUSY_INTERVAL_S = 0.002


def status(msg: str) -> None:
    """A status line on stderr (tests and `tlstap bench` sync on "ready in")."""
    print(f"tlstap: {msg}", file=sys.stderr, flush=True)


class Source(Protocol):
    """A capture of the kernel side (sources/): start() loads and attaches all or nothing."""
    links: list
    targets: list

    def start(self) -> None: ...
    def ring_fds(self) -> list[int]: ...
    def detach_probes(self) -> None: ...
    def close(self) -> None: ...


class Output(Protocol):
    """An output (sinks/). Opened pending when built; the runner then calls, in order:
    prepare() before any BPF object exists; commit() once every source started (discard()
    instead if one did not); pump() each step (how much it moved); tick() after each step;
    report() each second (new losses, on stderr and into the file); drain() after the probes
    are detached; finish(why, stop) -> its summary line. `poll_s`: its longest wait. An output may have
    alive(): once False (its reader went away) the capture ends."""
    poll_s: float

    def prepare(self) -> None: ...
    def commit(self) -> None: ...
    def discard(self) -> None: ...
    def attached(self) -> list[str]: ...
    def describe(self) -> str: ...
    def pump(self) -> int: ...
    def tick(self) -> None: ...
    def report(self) -> None: ...
    def drain(self) -> None: ...
    def finish(self, why: str, stop: list) -> str: ...


def yield_to_the_workload() -> None:
    """SCHED_BATCH for this thread and the threads and processes it starts from here on:
    the same CPU share as before, but its wakeups (a ring buffer read every few ms) no longer
    preempt the traced server mid-slice. In the shared kit's 64 KiB pcapng runs (10 rounds
    interleaved) nginx kept ~3% more requests/s."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):     # not Linux, or a seccomp profile that forbids it
        pass


def stop_flag() -> list:
    """SIGINT and SIGTERM end the capture loop cleanly (the list fills with the signals)."""
    stop = []

    def on_signal(signum, _frame):
        stop.append(signum)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    return stop


def run(sources: list, open_outputs: list, pid: int | None, scope: str) -> int:
    """Run a capture whose sources are built (libraries resolved); open_outputs: a callable per
    output that opens it pending (its file left as it was). The exit code. Any error before the
    sources all started leaves every output file as it was."""
    t0 = time.monotonic()
    yield_to_the_workload()      # first: threads and processes started from here inherit it
    stop = stop_flag()
    sys.stdout.flush()
    outputs: list = []
    try:
        for open_output in open_outputs:
            outputs.append(open_output())
        for o in outputs:
            o.prepare()
        with contextlib.ExitStack() as stack:
            for s in sources:
                stack.enter_context(contextlib.closing(s))
                s.start()
                if note := getattr(s, "load_note", None):
                    status(note)
                if note := getattr(s, "fallback_note", lambda: None)():
                    status(note)
            for o in outputs:
                o.commit()
            told = set()           # outputs sharing a source (-k and -w) describe it alike
            for o in outputs:
                lines = o.attached()
                if tuple(lines) not in told:
                    told.add(tuple(lines))
                    for line in lines:
                        status(line)
            links = sum(len(s.links) for s in sources)
            status(f"ready in {time.monotonic() - t0:.2f}s: {links} probes, {scope}"
                   f"{''.join(o.describe() for o in outputs)}; Ctrl-C to stop")
            why = _loop(sources, outputs, pid, stop)
            for s in sources:
                s.detach_probes()
            for o in outputs:
                o.drain()
            for o in outputs:
                o.report()          # those of the last second too: every loss is told
            summaries = [o.finish(why, stop) for o in outputs]
    except BaseException:
        for o in outputs:
            o.discard()
        raise
    # the capture is over and its files are complete: a late Ctrl-C must not turn that into a
    # death by signal (at exit the interpreter puts back the default handlers, not SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for line in summaries:
        status(line)
    return 0


def _loop(sources: list, outputs: list, pid: int | None, stop: list) -> str:
    """Pump until a signal, the --pid process exits or an output closes; why it ended."""
    ep = select.epoll()
    for s in sources:
        for fd in s.ring_fds():
            ep.register(fd, select.EPOLLIN)
    timeout = min(o.poll_s for o in outputs)
    last_tick = time.monotonic()
    try:
        while not stop:
            if sum(o.pump() for o in outputs):
                time.sleep(BUSY_INTERVAL_S)
            else:
                ep.poll(timeout)
                for o in outputs:
                    o.pump()
            for o in outputs:
                o.tick()
            now = time.monotonic()
            if now - last_tick >= 1.0:
                last_tick = now
                for o in outputs:
                    o.report()
                if not all(getattr(o, "alive", lambda: True)() for o in outputs):
                    return "output closed"
                if pid and not os.path.exists(f"/proc/{pid}"):
                    return f"process {pid} exited"
    except BrokenPipeError:
        return "output closed"
    finally:
        ep.close()
    return "interrupted"
