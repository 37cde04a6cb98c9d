"""`tlstap bench`: what capturing costs an HTTPS server, measured the shared kit's way.

    tlstap bench [--configs base,text,keylog,pcapng] [--sizes 1k,64k] [--rounds 3] [--duration 10]
                 [--compare 'bpftrace -p {pid} ...'] [--json F] [--markdown F] [--plot F.png]
    tlstap bench --url https://127.0.0.1:8443/64k --pid WORKER [...]

The method is `../shared/bench/bench.sh` (see `../shared/research/perf-baselines.md`), as a
command:

- A private nginx (one worker, the kit's configuration: keep-alive, no access log,
  sendfile off, TLS 1.2/1.3) on a free loopback port, with a self-signed RSA-2048
  certificate and base64 files of each size, in a temporary directory. Or the user's
  `--url` (loopback only) served by `--pid`, and then nothing is started but the load.
- `wrk -t1 -c16 -dN --latency` per run, with a Lua `done()` that prints p50/p90/p99/p99.9.
  wrk loads its own copy of libssl/libcrypto (LD_LIBRARY_PATH to copies: another inode),
  so uprobes on the system libssl never fire in the load generator, even for tracers that
  attach system-wide. With >= 2 CPUs the target is pinned to the first CPU and wrk to the
  second (the tool is not pinned); a --pid target's affinity is restored at the end.
- Configurations run interleaved: for each round, for each size, every configuration, after
  one warm-up run. A tool is started before wrk and wrk only starts once the tool says
  `ready in` on stderr (for --compare commands: once `bpftool perf list` shows a probe of
  theirs), plus a settling second. Ratios compare with the baseline of the same round.
- CPU of the target, the tool and wrk come from /proc/PID/stat deltas over the load window
  (0.5 s after wrk starts, for duration-1 s, like the kit's pidstat; the tool's CPU includes
  the processes it forks, which pidstat -p leaves out); the tool's peak RSS
  from VmHWM / wait4's ru_maxrss; its CPU per captured event from its CPU from ready to exit
  over the events its summary line at exit counts.

Rules:

1. Every wait is bounded (wrk by -d plus a margin, readiness by READY_TIMEOUT_S, each stop
   step by its own limit), and only loopback is loaded.
2. Everything started is stopped, also on Ctrl-C, SIGTERM or an error: each child runs in its
   own process group and the whole group is signalled (INT, then TERM, then KILL), then
   any descendant that left the group is killed; the work directory is removed.
3. Bad input (no wrk, no nginx, a bad --url or --pid, an unwritable report path) is one line
   and a non-zero exit before any load. A tool that fails in the first round stops the bench
   with its own error line; later failures are recorded in the run and the bench goes on.
4. Processes sit where the kit's do, for the scheduler: the tool and wrk in this command's
   session, as the kit's script starts them (background jobs), nginx in a session of its own
   (the kit's nginx is a daemon). With autogroups (/proc/sys/kernel/sched_autogroup_enabled)
   the scheduler shares a CPU between sessions first and only then between their tasks: a
   tool in a session of its own was weighed like nginx whatever its decoder's SCHED_IDLE
   said, and text mode measured 0.30x / 0.38x against the kit's 0.45x / 0.55x (issue 15).
5. The configurations that export (text-export) publish to a private `nats-server -js` on a
   free loopback port, its store in the work directory, started once and stopped with the
   rest. On a real deployment NATS runs on another host; here it shares the machine with
   nginx, so it runs where it takes the least from it (SCHED_IDLE, nice 19, in a session of
   its own whose autogroup is at nice 19) and its CPU is reported apart (nats_cpu_pct), not
   in the tool's column: what the export costs the traced server is the exporter's own work.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field

from .. import __version__
from ..errors import EnvironmentProblem, UsageError
from ..sizes import parse_size
from . import nginx

BUILTIN_CONFIGS = ("base", "text", "text-probe", "text-wire", "text-export", "text-metrics", "raw", "keylog",
                   "pcapng", "probes")
DEFAULT_CONFIGS = "base,text,keylog,pcapng"
DEFAULT_SIZES = "1k,64k"

WARMUP_S = 3            #: the kit's warm-up run (not recorded)
SETTLE_S = 1.0          #: after a tool says it is ready, before wrk starts
COMPARE_SETTLE_S = 2.0  #: the kit's "sleep 2" after a tracer's first probe shows up
COMPARE_BLIND_WAIT_S = 5.0  #: --compare readiness when bpftool cannot tell
READY_TIMEOUT_S = 60    #: a tool that is not ready by then failed
GAP_S = 2.0             #: pause between runs (the kit's)
WRK_MARGIN_S = 20       #: wrk is killed this long after -d has passed
STOP_STEPS = ((signal.SIGINT, 15.0), (signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0))
#: text configurations decode after the load what their decoder (at idle priority) could not
#: during it; the output must then hold every request (issue 17): their Ctrl-C gets this long
DECODE_WAIT_S = 240.0
TEXT_CONFIGS = ("text", "text-probe", "text-wire", "text-export", "text-metrics")
#: text-export's JetStream stream: file storage in the work directory, bounded (the oldest
#: messages go first), duplicates of a retried publish detected for a short window
NATS_STREAM, NATS_SUBJECT = "TLSTAP_BENCH", "tlstap.bench"
NATS_MAX_BYTES = 512 << 20
NATS_DUP_WINDOW_S = 30.0
NATS_READY_TIMEOUT_S = 15.0
#: a request line of the text output's HTTP exchanges (sinks/text.py: "> GET /1k HTTP/1.1")
_REQUEST_LINE = re.compile(rb"^> GET ", re.M)
MAX_SIZE = 1 << 30

CLK_TCK = os.sysconf("SC_CLK_TCK")

#: wrk's done() hook: the percentiles --latency does not print (99.9) and the raw counts.
#: Only done() is defined, so wrk keeps its static request path (no Lua per request).
WRK_LUA = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "TLSTAP_BENCH requests=%d duration_us=%d bytes=%d errors=%d status_errors=%d " ..
    "p50=%.1f p90=%.1f p99=%.1f p999=%.1f max=%.1f\\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect + e.read + e.write + e.status + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
"""

class Interrupted(Exception):
    """SIGTERM or SIGHUP while benchmarking (Ctrl-C is KeyboardInterrupt)."""


# ---- /proc ----------------------------------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 = state, field 3)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return None


def _ticks(pid: int) -> int | None:
    """utime + stime of the whole process (all threads), in clock ticks."""
    s = _stat(pid)
    return int(s[11]) + int(s[12]) if s else None


def _alive(pid: int) -> bool:
    s = _stat(pid)
    return bool(s) and s[0] not in ("Z", "X")


def _all_stats() -> dict[int, list[str]]:
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            s = _stat(int(d))
            if s:
                out[int(d)] = s
    return out


def _family(pid: int) -> dict[int, list[str]]:
    """/proc stat fields of process group `pid` and of every descendant of `pid`: a tool and
    whatever it forked, also a child that left the group (a session of its own is how a
    process gets an autogroup of its own)."""
    stats = _all_stats()
    out = {p: s for p, s in stats.items() if int(s[2]) == pid}
    kids: dict[int, list[int]] = {}
    for p, s in stats.items():
        kids.setdefault(int(s[1]), []).append(p)
    todo, seen = list(out) + [pid], set(out) | {pid}
    while todo:
        p = todo.pop()
        if p in stats:
            out[p] = stats[p]
        new = [k for k in kids.get(p, ()) if k not in seen]
        seen.update(new)
        todo += new
    return out


def _family_ticks(pid: int) -> int:
    """CPU ticks of a tool and everything it forked (see _family)."""
    return sum(int(s[11]) + int(s[12]) for s in _family(pid).values())


def _family_pids(pid: int) -> list[int]:
    return [p for p, s in _family(pid).items() if s[0] not in ("Z", "X")]


def _children(ppid: int) -> list[int]:
    return sorted(p for p, s in _all_stats().items() if int(s[1]) == ppid and s[0] not in ("Z", "X"))


def _cpu_times() -> tuple[int, int, int]:
    """(busy, steal, total) ticks of all CPUs from /proc/stat, counted as the kit does."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return user + nice + system + irq + softirq, steal, sum(v)


def _vmhwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


# ---- processes ------------------------------------------------------------------------------

@dataclass
class Child:
    """A process this bench started, leading its own process group (pgid = pid)."""
    name: str
    proc: subprocess.Popen
    first_signal: int = signal.SIGINT
    rusage: object = None       #: from wait4, once reaped
    stopped_by: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid


class Children:
    """Registry of started processes; stop_all() leaves none behind (rule 2)."""

    def __init__(self):
        self.items: list[Child] = []
        self.started_pids: list[int] = []

    def spawn(self, name: str, argv: list[str], stdout, stderr, env=None, first_signal=signal.SIGINT,
              own_session: bool = False, idle: bool = False) -> Child:
        """own_session: a session (so an autogroup) of its own, as a daemon has; otherwise this
        command's session, as a shell's background job has (rule 4). idle: SCHED_IDLE and nice
        19 from before its exec, so that every thread it starts inherits them (rule 5)."""
        where = {"start_new_session": True} if own_session else {"process_group": 0}
        if idle:
            where["preexec_fn"] = _idle_priority
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env, **where)
        c = Child(name, p, first_signal)
        self.items.append(c)
        self.started_pids.append(p.pid)
        return c

    @staticmethod
    def reap(c: Child, timeout: float) -> bool:
        """Wait (bounded) for c to exit; keeps its rusage. True when reaped."""
        if c.proc.returncode is not None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status, ru = os.wait4(c.pid, os.WNOHANG)
            except ChildProcessError:
                c.proc.returncode = c.proc.returncode if c.proc.returncode is not None else -1
                return True
            if pid:
                c.proc.returncode = os.waitstatus_to_exitcode(status)
                c.rusage = ru
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    def stop(self, c: Child, steps=None) -> str:
        """Signal c's process group, escalating; returns the signal that ended it."""
        steps = steps or ((c.first_signal, STOP_STEPS[0][1]),) + STOP_STEPS[1:]
        how = "exited"
        family = {p: s[19] for p, s in _family(c.pid).items() if p != c.pid}   # pid: start time
        if c.proc.returncode is None:
            for sig, limit in steps:
                try:
                    os.killpg(c.pid, sig)
                except ProcessLookupError:
                    pass
                how = signal.Signals(sig).name.removeprefix("SIG")
                if self.reap(c, limit):
                    break
        try:  # stragglers of the group (a shell's children), never left behind
            os.killpg(c.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for p, started in family.items():   # nor those that left it (the same process: same start time)
            s = _stat(p)
            if s and s[19] == started and s[0] not in ("Z", "X"):
                try:
                    os.kill(p, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        c.stopped_by = c.stopped_by or how
        if c in self.items:
            self.items.remove(c)
        return how

    def stop_all(self) -> None:
        for c in list(reversed(self.items)):
            self.stop(c, ((c.first_signal, 5.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)))


_POLICIES = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")
             if hasattr(os, n)}


def _placement(pid: int) -> dict | None:
    """Where the scheduler puts pid (what the method rests on: rule 4): its name, session,
    autogroup, class, nice and CPUs, read from /proc and the scheduler calls while the load
    runs; None once it is gone, a field None when it could not be read. Recorded per run, so a
    reader can check the method."""
    s = _stat(pid)
    if not s:
        return None

    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:      # autogroup: no CONFIG_SCHED_AUTOGROUP (sessions are all there is)
            return None

    def call(fn):
        try:
            return fn(pid)
        except OSError:
            return None

    group, policy, cpus = read(f"/proc/{pid}/autogroup"), call(os.sched_getscheduler), call(os.sched_getaffinity)
    if policy is not None:
        policy &= ~0x40000000      # without SCHED_RESET_ON_FORK
    return {"pid": pid, "comm": read(f"/proc/{pid}/comm"), "ppid": int(s[1]), "sid": int(s[3]),
            "autogroup": group.split()[0] if group else None,    # empty: the root autogroup
            "policy": None if policy is None else _POLICIES.get(policy, str(policy)), "nice": int(s[16]),
            "cpus": None if cpus is None else sorted(cpus)}


def _idle_priority() -> None:
    """In a child between fork and exec: the lowest CPU priority there is."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    os.setpriority(os.PRIO_PROCESS, 0, 19)


def _autogroup_nice(pid: int, nice: int) -> None:
    """The nice value of pid's autogroup (its session's share of a CPU against other sessions);
    best effort: no autogroups, no change."""
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass


# ---- the server -----------------------------------------------------------------------------

def parse_sizes(text: str) -> list[tuple[str, int]]:
    """'1k,64k,1m' -> [('1k', 1024), ('64k', 65536), ('1m', 1048576)]."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        n = parse_size(item, "--sizes")
        if not 0 < n <= MAX_SIZE:
            raise UsageError(f"--sizes: {item!r} must be between 1 byte and 1G")
        label = item.lower()
        if not re.fullmatch(r"[0-9a-z]+", label):
            raise UsageError(f"--sizes: {item!r} is not a size (examples: 1k, 64k, 1m)")
        if label not in (l for l, _ in out):
            out.append((label, n))
    if not out:
        raise UsageError("--sizes: give at least one size, e.g. 1k,64k")
    return out


def _make_cert(d: str) -> None:
    """Self-signed RSA-2048 for CN=127.0.0.1, as the kit's setup.sh makes it."""
    try:
        nginx.make_cert(os.path.join(d, "cert.pem"), os.path.join(d, "key.pem"))
    except EnvironmentProblem as e:
        raise EnvironmentProblem(f"bench: {e}") from None


def _https_get(url: str, timeout: float = 5) -> tuple[int, int]:
    """(status, body length) of one GET without certificate checks; raises OSError."""
    import http.client
    u = urllib.parse.urlsplit(url)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(u.hostname, u.port or 443, context=ctx, timeout=timeout)
    try:
        conn.request("GET", (u.path or "/") + (f"?{u.query}" if u.query else ""))
        r = conn.getresponse()
        return r.status, len(r.read())
    except (http.client.HTTPException, ssl.SSLError) as e:
        raise OSError(f"{type(e).__name__}: {e}") from None
    finally:
        conn.close()


class NginxServer:
    """The kit's nginx on a free loopback port, in directory d, run by `children`."""

    def __init__(self, d: str, sizes: list[tuple[str, int]], children: Children):
        self.d, self.sizes, self.children = d, sizes, children
        self.port = None
        self.child: Child | None = None
        self.worker = None

    def start(self) -> None:
        d = self.d
        # nginx workers started by root drop to an unprivileged user (nobody), as in the kit:
        # they must be able to reach www/
        os.chmod(d, 0o755)
        if os.geteuid() == 0:
            up = os.path.dirname(d)
            while True:
                if not os.stat(up).st_mode & 0o001:
                    raise UsageError(f"--workdir: nginx's worker runs as nobody and cannot enter {up} (mode "
                                     f"{os.stat(up).st_mode & 0o777:o}); choose a directory others can traverse")
                if up == os.path.dirname(up):
                    break
                up = os.path.dirname(up)
        for sub in ("www", "tmp"):
            os.makedirs(os.path.join(d, sub), mode=0o755, exist_ok=True)
        _make_cert(d)
        for label, n in self.sizes:
            data = base64.encodebytes(os.urandom(n))[:n]   # the kit's `base64 -w 76 | head -c N`
            path = os.path.join(d, "www", label)
            with open(path, "wb") as f:
                f.write(data)
            os.chmod(path, 0o644)
        err = os.path.join(d, "error.log")
        for _attempt in range(5):   # a free port is free only until someone takes it
            self.port = nginx.free_port()
            conf = os.path.join(d, "nginx.conf")
            with open(conf, "w") as f:
                f.write(nginx.conf(d, f"listen 127.0.0.1:{self.port} ssl;", f"{d}/cert.pem", f"{d}/key.pem",
                                   by="tlstap bench: the shared kit's nginx.conf.in on a private port and directory",
                                   keepalive_requests=10000000,  # no periodic re-handshakes (1.22's default: 1000)
                                   http="    access_log off;\n", server="        ssl_session_cache shared:SSL:1m;\n"))
            with open(os.path.join(d, "nginx.out"), "ab") as out:
                self.child = self.children.spawn("nginx", ["nginx", "-p", d + "/", "-c", conf, "-e", err],
                                                 out, subprocess.STDOUT, first_signal=signal.SIGTERM,
                                                 own_session=True)   # the kit's nginx daemonizes
            state = self._wait_up(15)
            if state == "up":
                break
            self.children.stop(self.child)
            log = nginx.tail(err) + nginx.tail(os.path.join(d, "nginx.out"))
            if "Address already in use" not in log:
                last = (log.strip().splitlines() or ["no error log"])[-1]
                raise EnvironmentProblem(f"bench: nginx did not start ({state}): {last}")
        else:
            raise EnvironmentProblem("bench: nginx did not start: no free port after 5 attempts")
        workers = _children(self.child.pid)
        if len(workers) != 1:
            raise EnvironmentProblem(f"bench: nginx has {len(workers)} worker processes, expected 1")
        self.worker = workers[0]
        for label, n in self.sizes:
            try:
                status, got = _https_get(self.url(label))
            except OSError as e:
                raise EnvironmentProblem(f"bench: nginx on {self.url(label)}: {e}") from None
            if status != 200 or got != n:
                raise EnvironmentProblem(f"bench: nginx answered {self.url(label)} with {status}, {got} bytes "
                                         f"(expected 200, {n}): {nginx.tail(err).strip()[-200:]}")

    def _wait_up(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.child.proc.poll() is not None:
                return "exited"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                if _children(self.child.pid):
                    return "up"
            except OSError:
                pass
            time.sleep(0.05)
        return "timeout"

    def url(self, label: str) -> str:
        return f"https://127.0.0.1:{self.port}/{label}"

    def version(self) -> str:
        r = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10)
        return (r.stderr or r.stdout).strip().removeprefix("nginx version: ")


class NatsServer:
    """The JetStream server of the configurations that export (rule 5), in directory d."""

    def __init__(self, d: str, children: Children):
        self.d, self.children = d, children
        self.port: int | None = None
        self.child: Child | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("nats-server")
        if not exe:
            raise EnvironmentProblem("bench: nats-server not found (apt-get install nats-server): "
                                     "text-export publishes to a private JetStream server")
        log = os.path.join(self.d, "nats.log")
        for _attempt in range(5):   # a free port is free only until someone takes it
            self.port = nginx.free_port()
            start = _size(log)    # this attempt's lines only
            argv = [exe, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", os.path.join(self.d, "nats"),
                    "-n", "tlstap-bench", "-l", log]
            self.child = self.children.spawn("nats-server", argv, subprocess.DEVNULL, subprocess.DEVNULL,
                                             first_signal=signal.SIGTERM, own_session=True, idle=True)
            _autogroup_nice(self.child.pid, 19)
            state = self._wait_ready(log, start)
            if state == "up":
                break
            self.children.stop(self.child)
            if "address already in use" not in nginx.tail(log).lower():
                raise EnvironmentProblem(f"bench: nats-server did not start ({state}): {_last_line(nginx.tail(log))}")
        else:
            raise EnvironmentProblem("bench: nats-server did not start: no free port after 5 attempts")
        self._jetstream(self._add_stream)

    def _wait_ready(self, log: str, start: int) -> str:
        """The server's own "Server is ready" line, bounded by NATS_READY_TIMEOUT_S."""
        deadline = time.monotonic() + NATS_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.child.proc.poll() is not None:
                return "exited"
            if b"Server is ready" in _read_from(log, start):
                return "up"
            time.sleep(0.05)
        return "timeout"

    def _jetstream(self, fn):
        """Run `await fn(jetstream)` on a short-lived nats-py connection; errors in one line."""
        async def main():
            import nats
            nc = await nats.connect(self.url, connect_timeout=5, allow_reconnect=False)
            try:
                return await fn(nc.jetstream(timeout=10))
            finally:
                await nc.close()
        try:
            return asyncio.run(main())
        except (KeyboardInterrupt, Interrupted):
            raise
        except Exception as e:     # nats-py's errors have no common base worth naming here
            raise EnvironmentProblem(f"bench: JetStream on {self.url}: {type(e).__name__}: {e}") from None

    @staticmethod
    async def _add_stream(js):
        from nats.js.api import DiscardPolicy, StorageType, StreamConfig
        await js.add_stream(StreamConfig(name=NATS_STREAM, subjects=[NATS_SUBJECT], storage=StorageType.FILE,
                                         max_bytes=NATS_MAX_BYTES, discard=DiscardPolicy.OLD,
                                         duplicate_window=NATS_DUP_WINDOW_S))

    def purge(self) -> None:
        """Empty the stream: each run starts from the same server state."""
        async def go(js):
            await js.purge_stream(NATS_STREAM)
        self._jetstream(go)

    def messages(self) -> int:
        async def go(js):
            return (await js.stream_info(NATS_STREAM)).state.messages
        return self._jetstream(go)

    def version(self) -> str:
        try:
            r = subprocess.run([self.child.proc.args[0], "--version"], capture_output=True, text=True, timeout=10)
            return (r.stdout or r.stderr).strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"


# ---- wrk --------------------------------------------------------------------------------------

def wrk_private_ssl(wrk: str, d: str) -> tuple[dict | None, str]:
    """(environment for wrk, note): copies of the libssl/libcrypto wrk links, found first
    through LD_LIBRARY_PATH. None when that cannot be arranged (the note says why)."""
    try:
        r = subprocess.run(["ldd", wrk], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"ldd failed: {e}"
    libs = re.findall(r"^\s*((?:libssl|libcrypto)\S*)\s+=>\s+(\S+)", r.stdout, re.M)
    if not libs:
        return None, "wrk links no shared libssl/libcrypto"
    lib_dir = os.path.join(d, "wrklib")
    os.makedirs(lib_dir, exist_ok=True)
    for soname, path in libs:
        shutil.copyfile(path, os.path.join(lib_dir, soname))
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = lib_dir + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    r = subprocess.run(["ldd", wrk], capture_output=True, text=True, timeout=10, env=env)
    now = re.findall(r"^\s*((?:libssl|libcrypto)\S*)\s+=>\s+(\S+)", r.stdout, re.M)
    if not now or any(not p.startswith(lib_dir + "/") for _, p in now):
        return None, f"the copies are not loaded: {now}"
    return env, ", ".join(f"{s} (copy of {p})" for s, p in libs)


_KV = re.compile(r"(\w+)=([-\d.]+)")


def parse_wrk(text: str) -> dict:
    """wrk's output (with WRK_LUA) -> rps, requests, errors, p50_us ... p999_us; error if none."""
    out: dict = {}
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if m:
        out["rps"] = float(m[1])
    for line in text.splitlines():
        if line.startswith("TLSTAP_BENCH "):
            kv = {k: float(v) for k, v in _KV.findall(line)}
            out.update(requests=int(kv.get("requests", 0)), errors=int(kv.get("errors", 0)),
                       status_errors=int(kv.get("status_errors", 0)),
                       p50_us=kv.get("p50"), p90_us=kv.get("p90"), p99_us=kv.get("p99"), p999_us=kv.get("p999"),
                       max_us=kv.get("max"))
            if "rps" not in out and kv.get("duration_us"):
                out["rps"] = kv["requests"] / (kv["duration_us"] / 1e6)
    return out


# ---- the tools' summary lines ----------------------------------------------------------------

_SUMMARY = {
    "text": re.compile(r"(\d+) calls, (\d+) records, (\d+) bytes captured; truncated (\d+) calls \((\d+) bytes "
                       r"over --max-payload\); lost (\d+) records \((\d+) bytes\)"),
    "wire": re.compile(r"(\d+) packets, (\d+) bytes captured from the wire; lost (\d+) packets"),
    "keylog": re.compile(r"(\d+) key log lines written \((\d+) duplicates skipped\), (\d+) key updates .*; "
                         r"lost (\d+) events, (\d+) unreadable"),
    "pcapng": re.compile(r"(\d+) packets \((\d+) bytes\) and (\d+) TLS secrets written; (\d+) packets left out "
                         r"by the filter or scope, (\d+) cut at the snap length; lost (\d+) packets, (\d+) key events"),
}
_GENERIC_LOST = re.compile(r"\blost (\d+)(?: events| records| samples)?", re.I)


def parse_summary(config: str, stderr: str) -> dict:
    """events/event_bytes/lost/truncated/summary_line from a tool's stderr (None = unknown)."""
    out = {"events": None, "event_bytes": None, "lost": None, "truncated": None, "summary_line": None}
    kind = "text" if config in TEXT_CONFIGS + ("raw",) else config
    rx = _SUMMARY.get(kind)
    if rx is None:   # a --compare command: only losses, when it reports them (bpftrace, sslsniff)
        found = [int(m[1]) for m in _GENERIC_LOST.finditer(stderr)]
        out["lost"] = sum(found) if found else None
        return out
    for line in reversed(stderr.splitlines()):
        m = rx.search(line)
        if not m and kind == "text" and (m := _SUMMARY["wire"].search(line)):
            g = [int(x) for x in m.groups()]       # the wire source: packets are its events
            out.update(summary_line=line.strip(), events=g[0], event_bytes=g[1], truncated=0, lost=g[2])
            break
        if not m:
            continue
        g = [int(x) for x in m.groups()]
        out["summary_line"] = line.strip()
        if kind == "text":
            out.update(events=g[1], event_bytes=g[2], truncated=g[3], lost=g[5])   # records delivered
        elif kind == "keylog":
            out.update(events=g[0], event_bytes=None, truncated=0, lost=g[3] + g[4])
        else:
            out.update(events=g[0], event_bytes=g[1], truncated=g[4], lost=g[5] + g[6])
        break
    return out


#: the exporter's line at exit (sinks/export.py): what it sent, what the server acknowledged,
#: what it dropped and its own CPU
_EXPORT = re.compile(r"export: (\d+) events to (.+?): (\d+) acknowledged \((\d+) duplicates ignored\); "
                     r"(\d+) dropped \((.*?)\); exporter CPU ([\d.]+)s \(([\d.]+) ms per 1000 events\)")
EXPORT_FIELDS = ("export_events", "export_acked", "export_dups", "export_dropped", "export_drop_reasons",
                 "export_cpu_s", "export_ms_per_1k")


def parse_export(stderr: str) -> dict:
    """The export's exit line -> EXPORT_FIELDS (all None when there is none: not known)."""
    out = dict.fromkeys(EXPORT_FIELDS)
    for line in reversed(stderr.splitlines()):
        m = _EXPORT.search(line)
        if m:
            ev, _url, acked, dups, dropped, reasons, cpu, per1k = m.groups()
            out.update(export_events=int(ev), export_acked=int(acked), export_dups=int(dups),
                       export_dropped=int(dropped), export_drop_reasons=reasons, export_cpu_s=float(cpu),
                       export_ms_per_1k=float(per1k))
            break
    return out


def count_samples(text: str) -> int:
    """Samples in a Prometheus text exposition (lines that are not comments)."""
    return sum(1 for line in text.splitlines() if line.strip() and not line.startswith("#"))


# ---- progress -----------------------------------------------------------------------------

class Progress:
    """A one-line bar on a terminal's stderr; one line per finished run otherwise."""

    def __init__(self, total: int, per_run_s: float, stream=sys.stderr):
        self.total, self.done, self.stream = total, 0, stream
        self.tty = stream.isatty()
        self.label = "warm-up"
        self.t0 = time.monotonic()
        self.per_run_s = per_run_s
        self.run_t0 = self.t0

    def start(self, label: str) -> None:
        self.label, self.run_t0 = label, time.monotonic()
        self.draw()

    def draw(self) -> None:
        if not self.tty:
            return
        elapsed = time.monotonic() - self.t0
        rate = (elapsed / self.done) if self.done else self.per_run_s
        frac = min(1.0, (self.done + min(0.99, (time.monotonic() - self.run_t0) / rate)) / max(1, self.total))
        left = max(0.0, rate * (self.total - self.done) - (time.monotonic() - self.run_t0))
        n = 24
        bar = "#" * int(frac * n) + "-" * (n - int(frac * n))
        self.stream.write(f"\r\x1b[2Kbench [{bar}] {self.done}/{self.total} {self.label}  "
                          f"~{int(left) // 60}m{int(left) % 60:02d}s left")
        self.stream.flush()

    def finish_run(self, line: str) -> None:
        self.done += 1
        if self.tty:
            self.stream.write("\r\x1b[2K")
        self.stream.write(f"tlstap: bench: {line}\n")
        self.stream.flush()
        self.draw()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()

    def sleep_until(self, t: float) -> None:
        while True:
            now = time.monotonic()
            if now >= t:
                return
            time.sleep(min(1.0, t - now))
            self.draw()


# ---- the runner ---------------------------------------------------------------------------

@dataclass
class Config:
    name: str
    kind: str                       #: base | tlstap | compare
    template: str = ""              #: the command as shown, with {pid}, {out} and ports

    @property
    def exports(self) -> bool:
        """Publishes to the bench's NATS server (rule 5)."""
        return "{nats_port}" in self.template

    @property
    def serves_metrics(self) -> bool:
        return "{metrics_port}" in self.template

    def argv(self, tlstap: list[str], pid: int, out: str, ports: dict[str, int] | None = None) -> list[str]:
        """ports: {"nats_port": N, "metrics_port": M}, for the templates that name them."""
        if self.kind == "compare":
            return ["/bin/sh", "-c", self.template.replace("{pid}", str(pid)).replace("{out}", shlex.quote(out))]
        subst = {"{pid}": str(pid), "{out}": out, **{f"{{{k}}}": str(v) for k, v in (ports or {}).items()}}
        return tlstap + [re.sub(r"\{\w+\}", lambda m: subst.get(m[0], m[0]), a) for a in shlex.split(self.template)]


TLSTAP_TEMPLATES = {
    "text": "tls --pid {pid} -o {out}",
    "text-probe": "tls --source probe --pid {pid} -o {out}",
    "text-wire": "tls --source wire --pid {pid} -o {out}",
    # the text configuration plus an output that leaves the host (issue 18's performance bar)
    "text-export": f"tls --pid {{pid}} -o {{out}} --export nats://127.0.0.1:{{nats_port}}/{NATS_SUBJECT}",
    "text-metrics": "tls --pid {pid} -o {out} --metrics-addr 127.0.0.1:{metrics_port}",
    "raw": "tls --pid {pid} --raw -o {out}",
    "keylog": "tls -m keylog --pid {pid} -k {out}",
    "pcapng": "tls -m pcapng --pid {pid} -i lo -w {out}",
}


#: --module: the tlstap subcommand the built-in configurations run (their templates say "tls")
MODULES = ("tls", "gnutls", "nss", "gotls")


def build_configs(configs: str, compare: list[str], module: str = "tls",
                  spool_max: str | None = None) -> list[Config]:
    out: list[Config] = []
    for name in (c.strip() for c in configs.split(",")):
        if not name or name in (c.name for c in out):
            continue
        if name not in BUILTIN_CONFIGS:
            raise UsageError(f"--configs: unknown configuration {name!r} (choose from {', '.join(BUILTIN_CONFIGS)}; "
                             f"other commands with --compare)")
        if name == "probes":       # empty programs on text mode's sites: the probes' own price
            if module == "gotls":
                raise UsageError("--configs probes: not with --module gotls (its sites are not entry/return pairs)")
            out.append(Config(name, "compare", f"{shlex.quote(sys.executable)} -m tlstap.probes.floor "
                                               f"--pid {{pid}} --module {module}"))
            continue
        out.append(Config(name, "base") if name == "base" else
                   Config(name, "tlstap", module + TLSTAP_TEMPLATES[name].removeprefix("tls")
                          + (f" --spool-max {spool_max}" if spool_max and name in TEXT_CONFIGS else "")))
    for cmd in compare:
        if not cmd.strip():
            raise UsageError("--compare: empty command")
        try:
            word = os.path.basename(shlex.split(cmd)[0])
        except (ValueError, IndexError):
            word = "compare"
        word = re.sub(r"[^0-9A-Za-z_-]", "", word) or "compare"
        name, i = word, 1
        while name in (c.name for c in out) or name in BUILTIN_CONFIGS:
            i += 1
            name = f"{word}{i}"
        out.append(Config(name, "compare", cmd))
    if not out:
        raise UsageError("--configs: nothing to run")
    return out


@dataclass
class Target:
    label: str
    url: str


@dataclass
class Bench:
    """Everything a run needs; built by run_bench after validation."""
    args: argparse.Namespace
    workdir: str
    children: Children
    configs: list[Config]
    targets: list[Target]
    pid: int                                  #: the process under test (nginx worker)
    wrk: str
    wrk_env: dict | None
    cpus: tuple[int, int] | None              #: (target CPU, wrk CPU) when pinning
    tlstap: list[str]
    tool_env: dict
    have_bpftool: bool
    nats: NatsServer | None = None            #: when a configuration exports (rule 5)
    runs: list[dict] = field(default_factory=list)

    def wrk_argv(self, url: str, duration: float, script: str) -> list[str]:
        a = self.args
        argv = [self.wrk, f"-t{a.threads}", f"-c{a.connections}", f"-d{int(duration)}s", "--latency", "-s", script, url]
        if self.cpus:
            taskset = shutil.which("taskset")
            if taskset:
                return [taskset, "-c", str(self.cpus[1])] + argv
        return argv

    def spawn_wrk(self, url: str, duration: float, out) -> Child:
        argv = self.wrk_argv(url, duration, os.path.join(self.workdir, "report.lua"))
        c = self.children.spawn("wrk", argv, out, subprocess.STDOUT, env=self.wrk_env, first_signal=signal.SIGTERM)
        if self.cpus and not argv[0].endswith("taskset"):
            _pin(c.pid, self.cpus[1])   # no taskset: pin right away (wrk's thread starts after its setup)
        return c

    def warmup(self, progress: Progress) -> None:
        d = min(self.args.warmup, self.args.duration)
        if d <= 0:
            return
        progress.start("warm-up")
        with open(os.path.join(self.workdir, "warmup.wrk"), "wb") as out:
            c = self.spawn_wrk(self.targets[0].url, d, out)
            progress.sleep_until(time.monotonic() + d)
            self.children.reap(c, WRK_MARGIN_S)
            self.children.stop(c)

    # -- one run --
    def run_one(self, rnd: int, target: Target, cfg: Config, progress: Progress) -> dict:
        a = self.args
        prefix = os.path.join(self.workdir, "runs", f"r{rnd}_{target.label}_{cfg.name}")
        out_file = prefix + {"keylog": ".keylog", "pcapng": ".pcapng"}.get(cfg.name, ".out")
        rec: dict = {"round": rnd, "size": target.label, "config": cfg.name, "url": target.url,
                     "rps": None, "requests": None, "errors": None, "p50_us": None, "p90_us": None, "p99_us": None,
                     "p999_us": None, "target_cpu_pct": None, "tool_cpu_pct": None, "wrk_cpu_pct": None,
                     "sys_busy_pct": None, "steal_pct": None, "tool_startup_s": None, "tool_ready_s": None,
                     "tool_rss_kib": None, "tool_cpu_s": None, "events": None, "event_bytes": None, "lost": None,
                     "truncated": None, "out_bytes": None, "output_requests": None, "summary_line": None,
                     **dict.fromkeys(EXPORT_FIELDS), "stream_msgs": None, "nats_cpu_pct": None,
                     "metrics_samples": None, "placement": None, "stop": None, "note": None, "error": None}
        progress.start(f"r{rnd} {target.label} {cfg.name}")
        tool = None
        ports = {}
        try:
            if cfg.exports:
                self.nats.purge()
                ports["nats_port"] = self.nats.port
            if cfg.serves_metrics:
                ports["metrics_port"] = nginx.free_port()
            if cfg.kind != "base":
                tool, ready_ticks = self._start_tool(cfg, prefix, out_file, rec, ports)
                if tool is None:
                    return rec
            with open(prefix + ".wrk", "wb") as wout:
                w = self.spawn_wrk(target.url, a.duration, wout)
                t0 = time.monotonic()
                window = a.duration - 1 if a.duration >= 2 else a.duration / 2
                progress.sleep_until(t0 + 0.5)
                rec["placement"] = self._run_placement(w.pid, tool)    # before the window: its /proc scan
                snap0 = self._snapshot(w.pid, tool)
                progress.sleep_until(t0 + 0.5 + window)
                snap1 = self._snapshot(w.pid, tool)
                progress.sleep_until(t0 + a.duration)
                if not self.children.reap(w, WRK_MARGIN_S):
                    rec["error"] = f"wrk did not finish within {a.duration + WRK_MARGIN_S:.0f}s"
                self.children.stop(w)
            self._window(rec, snap0, snap1)
            if not cfg.exports:
                rec["nats_cpu_pct"] = None
            if cfg.serves_metrics and tool is not None:   # what a scrape gets at the end of the load
                rec["metrics_samples"] = _scrape(ports["metrics_port"], rec)
            if tool is not None:
                rec["tool_rss_kib"] = _vmhwm_kib(tool.pid)
                decoding = ((signal.SIGINT, DECODE_WAIT_S),) + STOP_STEPS[1:] if cfg.name in TEXT_CONFIGS else None
                rec["stop"] = self.children.stop(tool, decoding)
                ru = tool.rusage
                if ru is not None:
                    rec["tool_rss_kib"] = max(rec["tool_rss_kib"] or 0, ru.ru_maxrss) or None
                    rec["tool_cpu_s"] = round(max(0.0, ru.ru_utime + ru.ru_stime - ready_ticks / CLK_TCK), 4)
                err = _read(prefix + ".err")
                rec.update(parse_summary(cfg.name, err + ("\n" + _read(prefix + ".stdout") if cfg.kind == "compare"
                                                          else "")))
                if cfg.exports:
                    rec.update(parse_export(err))
                    rec["stream_msgs"] = self.nats.messages()
                    if rec["export_events"] is None:
                        rec["note"] = f"no export line at exit (stopped by {rec['stop']}): {_last_line(err)}"
                rec["out_bytes"] = _size(out_file) if os.path.exists(out_file) else None
                if cfg.name in TEXT_CONFIGS and rec["out_bytes"] is not None:
                    rec["output_requests"] = _count_requests(out_file)
                if cfg.kind == "tlstap" and rec["summary_line"] is None:   # its losses are unknown
                    rec["note"] = f"no summary line at exit (stopped by {rec['stop']}): {_last_line(err)}"
            w_out = _read(prefix + ".wrk")
            parsed = parse_wrk(w_out)
            if parsed.get("rps") is None or not parsed.get("requests"):
                rec["error"] = rec["error"] or f"wrk: no result: {_last_line(w_out)}"
            else:
                rec.update({k: v for k, v in parsed.items() if k in rec})
                if parsed["errors"] > max(10, parsed["requests"] // 100):
                    rec["error"] = rec["error"] or (f"wrk: {parsed['errors']} errors "
                                                    f"({parsed['status_errors']} non-2xx) in {parsed['requests']} "
                                                    f"requests")
            return rec
        finally:
            if tool is not None and tool.proc.returncode is None:
                self.children.stop(tool)
            for suffix in (".out", ".keylog", ".pcapng", ".stdout"):   # captures are large; keep logs only
                try:
                    if suffix != ".stdout" or _size(prefix + suffix) > 1 << 20:
                        os.unlink(prefix + suffix)
                except OSError:
                    pass

    def _start_tool(self, cfg: Config, prefix: str, out_file: str, rec: dict, ports: dict | None = None):
        """Start cfg's tool and wait (bounded) until ready; (child, CPU ticks at ready) or (None, 0)."""
        argv = cfg.argv(self.tlstap, self.pid, out_file, ports)
        t_start = time.monotonic()
        with open(prefix + ".stdout", "wb") as so, open(prefix + ".err", "wb") as se:
            tool = self.children.spawn(cfg.name, argv, so, se, env=self.tool_env if cfg.kind == "tlstap" else None)
        deadline = t_start + READY_TIMEOUT_S
        ready_rx = re.compile(r"ready in ([\d.]+)s")
        blind_until = t_start + COMPARE_BLIND_WAIT_S
        while True:
            if cfg.kind == "tlstap":
                m = ready_rx.search(_read(prefix + ".err"))
                if m:
                    rec["tool_ready_s"] = float(m[1])
                    break
            elif self.have_bpftool:
                if _has_probes(tool.pid):
                    break
            elif time.monotonic() >= blind_until:
                break
            if tool.proc.poll() is not None:
                self.children.stop(tool)
                rec["error"] = f"{cfg.name} exited (rc {tool.proc.returncode}) before it was ready: " \
                               f"{_last_line(_read(prefix + '.err'))}"
                return None, 0
            if time.monotonic() >= deadline:
                self.children.stop(tool)
                rec["error"] = f"{cfg.name} not ready within {READY_TIMEOUT_S}s: {_last_line(_read(prefix + '.err'))}"
                return None, 0
            time.sleep(0.02)
        rec["tool_startup_s"] = round(time.monotonic() - t_start, 3)
        ready_ticks = _family_ticks(tool.pid)
        time.sleep(SETTLE_S if cfg.kind == "tlstap" else COMPARE_SETTLE_S)
        if tool.proc.poll() is not None:
            self.children.stop(tool)
            rec["error"] = f"{cfg.name} exited (rc {tool.proc.returncode}) after it was ready: " \
                           f"{_last_line(_read(prefix + '.err'))}"
            return None, 0
        return tool, ready_ticks

    def _snapshot(self, wrk_pid: int, tool: Child | None) -> dict:
        return {"t": time.monotonic(), "target": _ticks(self.pid), "wrk": _ticks(wrk_pid),
                "tool": _family_ticks(tool.pid) if tool else None, "cpu": _cpu_times(),
                "nats": _ticks(self.nats.child.pid) if self.nats else None}

    def _run_placement(self, wrk_pid: int, tool: Child | None) -> dict:
        """{role: _placement} of this bench, the server's worker, wrk, and the tool with what it
        forked (its decoder, ...) as "tool_family"."""
        out = {"bench": _placement(os.getpid()), "target": _placement(self.pid), "wrk": _placement(wrk_pid)}
        if tool is not None:
            out["tool"] = _placement(tool.pid)
            out["tool_family"] = [x for x in map(_placement, sorted(set(_family_pids(tool.pid)) - {tool.pid})) if x]
        return out

    @staticmethod
    def _window(rec: dict, s0: dict, s1: dict) -> None:
        wall = s1["t"] - s0["t"]
        if wall <= 0:
            return
        pct = lambda k: (round(100 * (s1[k] - s0[k]) / CLK_TCK / wall, 1)
                         if s0[k] is not None and s1[k] is not None else None)
        rec["target_cpu_pct"], rec["wrk_cpu_pct"], rec["tool_cpu_pct"] = pct("target"), pct("wrk"), pct("tool")
        rec["nats_cpu_pct"] = pct("nats")   # idle priority, another host's work (rule 5)
        (b0, st0, t0), (b1, st1, t1) = s0["cpu"], s1["cpu"]
        if t1 > t0:
            rec["sys_busy_pct"] = round(100 * (b1 - b0) / (t1 - t0), 1)
            rec["steal_pct"] = round(100 * (st1 - st0) / (t1 - t0), 1)


def _scrape(port: int, rec: dict) -> int | None:
    """Samples served on http://127.0.0.1:port/metrics (None, and a note, if it did not answer)."""
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return count_samples(r.read().decode(errors="replace"))
    except OSError as e:
        rec["note"] = f"/metrics on port {port} did not answer: {e}"
        return None


def _has_probes(pid: int) -> bool:
    """bpftool perf list shows a uprobe/kprobe/tracepoint of process `pid` or of its family."""
    try:
        r = subprocess.run(["bpftool", "-j", "perf", "list"], capture_output=True, text=True, timeout=10)
        pids = {e.get("pid") for e in json.loads(r.stdout or "[]")}
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return False
    return any(p in pids for p in _family_pids(pid))


def _pin(pid: int, cpu: int) -> dict[int, set[int]]:
    """Pin every thread of pid to cpu; returns the previous affinity per thread."""
    before = {}
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        try:
            before[tid] = os.sched_getaffinity(tid)
            os.sched_setaffinity(tid, {cpu})
        except OSError:
            pass
    return before


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(16 << 20).decode(errors="replace")
    except OSError:
        return ""


def _read_from(path: str, offset: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(1 << 20)
    except OSError:
        return b""


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _last_line(text: str) -> str:
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return lines[-1][:300] if lines else "(no output)"


# ---- validation -----------------------------------------------------------------------------

def check_url(url: str) -> Target:
    """A loopback https URL that answers 2xx, or UsageError in one line."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "https":
        raise UsageError(f"--url {url}: must be an https:// URL")
    if not u.hostname:
        raise UsageError(f"--url {url}: no host")
    try:
        port = u.port or 443
        infos = socket.getaddrinfo(u.hostname, port, type=socket.SOCK_STREAM)
    except (ValueError, OSError) as e:
        raise UsageError(f"--url {url}: {e}") from None
    addrs = {i[4][0] for i in infos}
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise UsageError(f"--url {url}: {u.hostname} is not a loopback address (tlstap bench only loads "
                         f"127.0.0.0/8 and ::1)")
    try:
        status, _n = _https_get(url)
    except OSError as e:
        raise UsageError(f"--url {url}: {e}") from None
    if not 200 <= status < 300:
        raise UsageError(f"--url {url}: answered HTTP {status}, not 2xx")
    label = re.sub(r"[^0-9A-Za-z._-]", "_", u.path.strip("/")) or "root"
    return Target(label, url)


def _check_writable(path: str | None, flag: str) -> None:
    if path is None:
        return
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d) or not os.access(d, os.W_OK):
        raise UsageError(f"{flag} {path}: directory {d} does not exist or is not writable")


def _validate(args) -> None:
    if args.duration < 2:
        raise UsageError("--duration must be at least 2 seconds")
    if args.rounds < 1:
        raise UsageError("--rounds must be at least 1")
    if args.connections < 1 or args.threads < 1 or args.threads > args.connections:
        raise UsageError("--threads and --connections must be >= 1, with threads <= connections")
    if args.warmup < 0:
        raise UsageError("--warmup must be >= 0")
    if (args.url is None) != (args.pid is None):
        raise UsageError("--url and --pid go together: the server's URL and the process serving it")
    if args.url is not None and args.sizes is not None:
        raise UsageError("--sizes applies to the built-in server; with --url the URL names the file")
    _check_writable(args.json, "--json")
    _check_writable(args.markdown, "--markdown")
    _check_writable(args.plot, "--plot")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib (pip install matplotlib)") from None


def _tlstap_command(args) -> tuple[list[str], dict]:
    env = dict(os.environ)
    if args.tlstap:
        return shlex.split(args.tlstap), env
    # this very package, also when run from a source tree with PYTHONPATH=src
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return [sys.executable, "-m", "tlstap.cli"], env


def _libssl_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and re.search(r"/libssl\.so[.\d]*$", parts[5].strip()):
                    return parts[5].strip()
    except OSError:
        pass
    return None


# ---- the command --------------------------------------------------------------------------

def _raise_interrupted(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def run_bench(args) -> int:
    """Validate, bring up (or check) the server, run every configuration, report. Exit code."""
    from . import bench_report

    _validate(args)
    wrk = shutil.which("wrk")
    if not wrk:
        raise EnvironmentProblem("bench: wrk not found (apt-get install wrk)")
    if args.spool_max is not None:
        parse_size(args.spool_max, "--spool-max")
    configs = build_configs(args.configs, args.compare, args.module, args.spool_max)
    sizes = parse_sizes(args.sizes or DEFAULT_SIZES) if args.url is None else None
    if args.url is None and not shutil.which("nginx"):
        raise EnvironmentProblem("bench: nginx not found (apt-get install nginx-light), or give --url and --pid")
    exporting = [c.name for c in configs if c.exports]
    if exporting and not shutil.which("nats-server"):
        raise EnvironmentProblem(f"bench: nats-server not found (apt-get install nats-server): {exporting[0]} "
                                 f"publishes to a private JetStream server")
    if exporting:
        try:
            import nats  # noqa: F401
        except ImportError:
            raise EnvironmentProblem(f"bench: {exporting[0]} needs nats-py (pip install nats-py)") from None
    targets = [check_url(args.url)] if args.url else None
    if args.pid is not None and not _alive(args.pid):
        raise UsageError(f"--pid {args.pid}: no such process")

    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGHUP)}
    children = Children()
    try:
        workdir = tempfile.mkdtemp(prefix="tlstap-bench-", dir=args.workdir)
    except OSError as e:
        raise UsageError(f"--workdir {args.workdir or tempfile.gettempdir()}: {e.strerror}") from None
    os.makedirs(os.path.join(workdir, "runs"))
    restore_affinity: dict[int, set[int]] = {}
    bench = None
    progress = None
    complete = False
    meta: dict = {}
    try:
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if args.url is None:
            server = NginxServer(workdir, sizes, children)
            server.start()
            pid = server.worker
            targets = [Target(label, server.url(label)) for label, _ in sizes]
            target_what = f"private nginx ({server.version()}, 1 worker) on 127.0.0.1:{server.port}, " \
                          f"files {', '.join(l for l, _ in sizes)}"
        else:
            pid = args.pid
            target_what = f"{args.url} served by pid {pid}"
        with open(os.path.join(workdir, "report.lua"), "w") as f:
            f.write(WRK_LUA)
        wrk_env, ssl_note = (None, "disabled (--no-private-ssl)") if args.no_private_ssl else \
            wrk_private_ssl(wrk, workdir)
        cpus = sorted(os.sched_getaffinity(0))
        pin = None
        if not args.no_pin and len(cpus) >= 2:
            pin = (cpus[0], cpus[1])
            restore_affinity = _pin(pid, pin[0])
        tlstap, tool_env = _tlstap_command(args)
        nats_server = None
        if exporting:
            nats_server = NatsServer(workdir, children)
            nats_server.start()
        bench = Bench(args, workdir, children, configs, targets, pid, wrk, wrk_env, pin, tlstap, tool_env,
                      have_bpftool=bool(shutil.which("bpftool")), nats=nats_server)
        meta = {
            "tool": "tlstap bench", "tlstap_version": __version__, "started": started, "complete": False,
            "args": {k: v for k, v in vars(args).items() if k != "func"},
            "host": {"kernel": os.uname().release, "cpus": os.cpu_count(), "machine": os.uname().machine},
            "target": {"what": target_what, "pid": pid, "libssl": _libssl_of(pid)},
            "wrk": wrk, "wrk_private_ssl": wrk_env is not None, "wrk_ssl_note": ssl_note,
            "pinned": f"target CPU {pin[0]}, wrk CPU {pin[1]}" if pin else False,
            "commands": {"wrk": " ".join(shlex.quote(x) for x in bench.wrk_argv("URL", args.duration, "report.lua"))},
        }
        if nats_server:
            meta["nats"] = {"version": nats_server.version(), "url": nats_server.url, "pid": nats_server.child.pid,
                            "stream": NATS_STREAM, "subjects": [NATS_SUBJECT], "storage": "file (work directory)",
                            "max_bytes": NATS_MAX_BYTES, "priority": "SCHED_IDLE, nice 19, own session at "
                                                                      "autogroup nice 19"}
        for c in configs:
            if c.kind == "tlstap":
                meta["commands"][c.name] = " ".join(tlstap + [c.template])
            elif c.kind == "compare":
                meta["commands"][c.name] = c.template
        if wrk_env is None and not args.no_private_ssl:
            print(f"tlstap: bench: warning: wrk shares the system libssl ({ssl_note}): probes on it may fire "
                  f"in the load generator too", file=sys.stderr)

        total = args.rounds * len(targets) * len(configs)
        progress = Progress(total, args.duration + GAP_S + 3)
        bench.warmup(progress)
        for rnd in range(1, args.rounds + 1):
            for target in targets:
                base_rps = None
                for cfg in configs:
                    rec = bench.run_one(rnd, target, cfg, progress)
                    bench.runs.append(rec)
                    if rec["error"] and rnd == 1:   # a set-up problem: stop before wasting an hour
                        raise EnvironmentProblem(f"bench: {target.label} {cfg.name}: {rec['error']}")
                    if cfg.name == "base":
                        base_rps = rec["rps"]
                    progress.finish_run(_run_line(rec, base_rps))
                    progress.sleep_until(time.monotonic() + GAP_S)
        complete = True
    except (KeyboardInterrupt, Interrupted) as e:
        if progress:
            progress.close()
        print(f"tlstap: bench: interrupted ({str(e) or 'SIGINT'}); stopped everything it started"
              + (f"; reporting the {len(bench.runs)} runs done" if bench and bench.runs else ""), file=sys.stderr)
    finally:
        if progress:
            progress.close()
        sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not cut cleanup
        children.stop_all()
        for tid, mask in restore_affinity.items():
            try:
                os.sched_setaffinity(tid, mask)
            except OSError:
                pass
        for s, h in old.items():
            signal.signal(s, h)
        signal.signal(signal.SIGINT, sigint)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"tlstap: bench: work directory kept: {workdir}", file=sys.stderr)

    runs = bench.runs if bench else []
    if not runs:
        return 130 if not complete else 1
    meta["complete"] = complete
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["started_pids"] = children.started_pids
    rows = bench_report.summarize(runs)
    bar_list = bench_report.bars(rows)
    sys.stdout.write(bench_report.render_text(rows, bar_list))
    sys.stdout.flush()
    if args.json:
        bench_report.write_json(args.json, meta, rows, bar_list, runs)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(bench_report.render_markdown(meta, rows, bar_list, runs))
    if args.plot:
        bench_report.write_plot(args.plot, rows)
    if not complete:
        return 130
    if all(r["error"] for r in runs):
        print("tlstap: bench: every run failed (see the error column)", file=sys.stderr)
        return 1
    if args.fail_on_bars and any(b.status != bench_report.MET for b in bar_list):
        return 1
    return 0


def _count_requests(path: str) -> int:
    """HTTP requests in a text output (read in pieces: it can be gigabytes)."""
    n, tail = 0, b""
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            buf = tail + chunk
            cut = buf.rfind(b"\n") + 1
            n += len(_REQUEST_LINE.findall(buf, 0, cut))
            tail = buf[cut:]
    return n


def _run_line(rec: dict, base_rps: float | None) -> str:
    head = f"r{rec['round']} {rec['size']} {rec['config']}"
    if rec["error"] or rec["rps"] is None:
        return f"{head}: FAILED: {rec['error']}"
    s = f"{head}: {rec['rps']:,.0f} req/s"
    if base_rps and rec["config"] != "base":
        s += f" ({rec['rps'] / base_rps:.2f}x base)"
    if rec["p99_us"] is not None:
        s += f", p99 {rec['p99_us'] / 1000:.2f} ms"
    if rec["config"] != "base":
        s += f", tool {rec['tool_cpu_pct'] if rec['tool_cpu_pct'] is not None else '?'}% CPU"
        s += f", lost {rec['lost'] if rec['lost'] is not None else '?'}"
    if rec.get("output_requests") is not None and rec["requests"]:
        s += f", {rec['output_requests']:,} of {rec['requests']:,} requests in the output"
    if rec["note"]:
        s += f" [{rec['note']}]"
    return s


EPILOG = """examples:
  tlstap bench                                       base,text,keylog,pcapng at 1k and 64k, 3 rounds of 10 s
  tlstap bench --configs base,keylog --sizes 1k --rounds 1 --duration 5
  tlstap bench --compare 'bpftrace -p {pid} -e "uprobe:/usr/lib/x86_64-linux-gnu/libssl.so.3:SSL_write { @=count(); }"'
  tlstap bench --url https://127.0.0.1:8443/64k --pid 1234 --configs base,text
  tlstap bench --json b.json --markdown b.md --plot b.png

bars: text (default source: wire) and text-wire >= 0.75 (1k) and >= 0.85 (64k) (issue 17), keylog >= 0.97,
pcapng >= 0.80 (64k), zero lost events (issue 6); text-export within 0.02 of text at each size and nothing
dropped by the exporter (issue 18), text-metrics within 0.02 of text (our own bar)
text-export starts a private nats-server -js (apt-get install nats-server) at idle priority
"""


def add_parsers(subparsers) -> argparse.ArgumentParser:
    """`tlstap bench`: adds the subcommand; args.func(args) runs it and returns the exit code."""
    p = subparsers.add_parser(
        "bench", help="measure what capturing costs an HTTPS server (nginx + wrk on loopback)",
        description="Load a private nginx (or --url/--pid) with wrk, with and without tlstap attached, "
                    "rounds interleaved; report throughput ratios, latency, CPU, memory and losses.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--configs", default=DEFAULT_CONFIGS, metavar="LIST",
                   help=f"comma-separated, from {', '.join(BUILTIN_CONFIGS)} (default {DEFAULT_CONFIGS})")
    g.add_argument("--compare", action="append", default=[], metavar="COMMAND",
                   help="also run this shell command during the load ({pid}: the target; {out}: a file in the "
                        "work directory); repeatable")
    g.add_argument("--sizes", default=None, metavar="LIST",
                   help=f"files served by the private nginx (default {DEFAULT_SIZES}; e.g. 1k,64k,1m)")
    g.add_argument("--url", help="load this loopback https URL instead of a private nginx (needs --pid)")
    g.add_argument("-p", "--pid", type=int, help="with --url: the process serving it (what the tools capture)")
    g.add_argument("--tlstap", metavar="CMD", help="the tlstap command to measure (default: this one)")
    g.add_argument("--module", choices=MODULES, default="tls",
                   help="the capture subcommand the configurations run (default tls; e.g. gnutls with "
                        "--url/--pid of a gnutls-serv --http)")
    g.add_argument("--spool-max", metavar="SIZE",
                   help="the text configurations' --spool-max: room for what their decoder has not decoded "
                        "(large enough, the output holds every request once the decoder caught up)")
    g = p.add_argument_group("load")
    g.add_argument("--duration", type=int, default=10, metavar="S", help="seconds per run (default 10)")
    g.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    g.add_argument("--connections", type=int, default=16, help="wrk -c (default 16)")
    g.add_argument("--threads", type=int, default=1, help="wrk -t (default 1)")
    g.add_argument("--warmup", type=int, default=WARMUP_S, metavar="S",
                   help=f"unrecorded wrk run first (default {WARMUP_S})")
    g.add_argument("--no-pin", action="store_true", help="do not pin the target and wrk to separate CPUs")
    g.add_argument("--no-private-ssl", action="store_true",
                   help="let wrk use the system libssl (probes on it then fire in wrk too)")
    g = p.add_argument_group("report")
    g.add_argument("--json", metavar="FILE", help="runs, medians, ratios and bars as JSON")
    g.add_argument("--markdown", metavar="FILE", help="the tables as Markdown")
    g.add_argument("--plot", metavar="FILE.png", help="throughput ratio and p99 latency per configuration and size")
    g.add_argument("--fail-on-bars", action="store_true", help="exit 1 unless every bar is MET")
    g.add_argument("--workdir", metavar="DIR", help="where the private directory goes (default $TMPDIR)")
    g.add_argument("--keep", action="store_true", help="keep the work directory (logs; captures are deleted)")
    p.set_defaults(func=run_bench)
    return p

