#!/usr/bin/env python3
"""What the wire source's packet hook costs: TC on lo against cgroup_skb, on a loopback ping-pong.

A client (the target: the capture's --pid) sends SIZE-byte requests over one loopback TCP
connection (TCP_NODELAY) and its peer (out of scope) echoes them. Meanwhile a second such
pair, neither of them in scope nor in the cgroup, stands for the host's other processes:
the two pairs take turns. Every capture runs bpf/packets.bpf.c's handle(), scoped to the
target's pid, its ring drained by a thread as tlstap would. Conditions, interleaved round
by round (each with fresh processes and connections):

  none          no capture;
  tc lo         PacketCapture on lo, filter "tcp" (-m pcapng's: egress only, as every loopback
                packet passes lo's egress once; pure ACKs are copied too);
  cg root       WireCapture at the cgroup v2 root: every socket of the host runs the programs;
  cg scoped     WireCapture on a cgroup made for the run (hookcost-PID) that holds only the
                target (the --cgroup case): no other socket runs a program.

Reported per round trip: each process's thread CPU time (min/median over rounds); records
captured and lost; from the kernel's BPF run-time statistics (BPF_ENABLE_STATS: on while the
script holds the descriptor, so nothing stays on if it dies), the packet programs' run time
and runs, and the owner-tracking tracepoints' (sock_send_length/sock_recv_length: the same
in every capture). On loopback a send runs the receive path too (the softirq follows it on
the sender's CPU), so a peer's CPU includes the ingress program run for the target's socket.
Run as root with tlstap importable:

    PYTHONPATH=src python3 scripts/hook_cost.py [ROUNDS]
"""
import contextlib
import ctypes
import errno
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

try:
    from tlstap.preflight import cgroup2_root
    from tlstap.sources.base import CaptureConfig
    from tlstap.sources.packets import CG_PROGRAMS, IO_TRACEPOINTS, TC_PROGRAMS, PacketCapture
    from tlstap.sources.wire import WireCapture
except ImportError as e:
    sys.exit(f"hook_cost: {e} (run with PYTHONPATH=src)")

LOOP_C = r"""
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

/* all n bytes, or exit */
static void full(int fd, char *buf, size_t n, int out)
{
	while (n) {
		ssize_t k = out ? send(fd, buf, n, 0) : recv(fd, buf, n, 0);
		if (k <= 0) { perror(out ? "send" : "recv"); exit(1); }
		buf += k;
		n -= k;
	}
}

static char buf[1 << 20];

int main(int argc, char **argv)
{
	int one = 1;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t alen = sizeof(a);
	/* a phase's header: a TLS-like opening (the wire source copies only connections whose
	 * first data it sees is a handshake record: 0x16 0x03), size, round trips */
	uint32_t hdr[3] = { 0x0316 };
	if (!strcmp(argv[1], "offsets")) {   /* of the kernel's statistics in struct bpf_prog_info */
		printf("%zu %zu %zu\n", offsetof(struct bpf_prog_info, run_time_ns),
		       offsetof(struct bpf_prog_info, run_cnt), sizeof(struct bpf_prog_info));
		return 0;
	}
	if (!strcmp(argv[1], "peer")) {      /* listen, print the port, echo phases until n = 0 */
		int l = socket(AF_INET, SOCK_STREAM, 0);
		if (bind(l, (void *)&a, sizeof(a)) || listen(l, 1) || getsockname(l, (void *)&a, &alen)) return 1;
		printf("%d\n", ntohs(a.sin_port));
		fflush(stdout);
		int s = accept(l, NULL, NULL);
		close(l);
		setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
		for (;;) {
			full(s, (char *)hdr, sizeof(hdr), 0);
			if (!hdr[2]) return 0;
			double t0 = now();
			for (uint32_t i = 0; i < hdr[2]; i++) {
				full(s, buf, hdr[1], 0);
				full(s, buf, hdr[1], 1);
			}
			printf("%.1f\n", (now() - t0) / hdr[2]);
			fflush(stdout);
		}
	}
	/* target CGROUP_PROCS|- PORT: join the cgroup before the socket exists (a socket keeps
	 * the cgroup it was made in), connect, then one phase per "SIZE N" line of stdin */
	if (strcmp(argv[2], "-")) {
		int f = open(argv[2], O_WRONLY);
		if (f < 0 || write(f, "0", 1) != 1) { perror(argv[2]); return 1; }
		close(f);
	}
	int s = socket(AF_INET, SOCK_STREAM, 0);
	a.sin_port = htons(atoi(argv[3]));
	if (connect(s, (void *)&a, sizeof(a))) { perror("connect"); return 1; }
	setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	printf("ready\n");
	fflush(stdout);
	unsigned size, n;
	while (scanf("%u %u", &size, &n) == 2 && size <= sizeof(buf)) {
		hdr[1] = size;
		hdr[2] = n;
		full(s, (char *)hdr, sizeof(hdr), 1);
		double t0 = now();
		for (unsigned i = 0; i < n; i++) {
			full(s, buf, size, 1);
			full(s, buf, size, 0);
		}
		printf("%.1f\n", (now() - t0) / n);
		fflush(stdout);
	}
	hdr[2] = 0;
	full(s, (char *)hdr, sizeof(hdr), 1);
	return 0;
}
"""

#: (message size, round trips per phase): about half a second each, idle
PHASES = ((1024, 20000), (65536, 4000))
CONDS = ("none", "tc lo", "cg root", "cg scoped")
#: a ring no phase fills (64 KiB messages come at ~1 GB/s): lost records would skip their copy
MAPSIZE = 64 << 20
BPF_STATS_RUN_TIME = 0

_libbpf = ctypes.CDLL("libbpf.so.1", use_errno=True)
_libbpf.bpf_enable_stats.argtypes = [ctypes.c_int]
_libbpf.bpf_obj_get_info_by_fd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)]


def cgroup2_mount() -> str:
    """Where cgroup v2 is mounted: /sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host."""
    return cgroup2_root() or sys.exit("hook_cost: no cgroup v2 mount")


def remove_cgroup(path: str) -> None:
    """rmdir, retried for up to 2 s: a reaped task may leave its cgroup a moment later."""
    deadline = time.monotonic() + 2
    while True:
        try:
            os.rmdir(path)
            return
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class ProgStats:
    """run_time_ns and run_cnt of a loaded program, from BPF_OBJ_GET_INFO_BY_FD."""

    def __init__(self, exe: str):
        self.time_off, self.cnt_off, self.size = map(int, subprocess.run(
            [exe, "offsets"], capture_output=True, text=True, check=True).stdout.split())

    def __call__(self, fd: int) -> tuple[int, int]:
        buf = ctypes.create_string_buffer(self.size)
        n = ctypes.c_uint32(self.size)
        if _libbpf.bpf_obj_get_info_by_fd(fd, buf, ctypes.byref(n)):
            raise OSError(ctypes.get_errno(), "BPF_OBJ_GET_INFO_BY_FD")
        u64 = lambda off: int.from_bytes(buf.raw[off:off + 8], "little")
        return u64(self.cnt_off), u64(self.time_off)


class _Keys:
    """What WireCapture needs of a KeyLogCapture: no keys are measured here."""

    def __init__(self):
        self.subscribers = []

    def deliver(self) -> int:
        return 0

    def drain(self) -> None:
        pass


@contextlib.contextmanager
def capture(cond: str, pid: int, cg_root: str, cg_dir: str):
    """The condition's capture, started and drained by a thread; None for no capture."""
    if cond == "none":
        yield None
        return
    cfg = CaptureConfig(pid=pid, mapsize=MAPSIZE)
    if cond.startswith("tc lo"):
        cap = PacketCapture(cfg, "lo", "tcp", lambda p: None)
    else:
        cap = WireCapture(cfg, _Keys(), cg_root if cond == "cg root" else cg_dir)
    stop = threading.Event()

    def drain():
        while not stop.is_set():
            cap.spool(lambda piece: None, 0.05)

    with cap:
        cap.start()
        t = threading.Thread(target=drain)
        t.start()
        try:
            yield cap
        finally:
            stop.set()
            t.join()


def snapshot(cap, prog_stats) -> dict[str, int]:
    """Kernel counters of a capture: packets, lost, and each program's runs and ns."""
    if cap is None:
        return {}
    c = cap.counters()
    out = {"packets": c["packets"], "lost": c["lost"]}
    for prog in cap._obj.programs():
        if prog.fd >= 0:     # loaded (autoload)
            out[prog.name + ".cnt"], out[prog.name + ".ns"] = prog_stats(prog.fd)
    return out


class Pair:
    """A client (the C loop's target mode) and the peer echoing it, on one loopback connection,
    both pinned to one CPU: a ping-pong across CPUs measures wakeups and migrations more than
    the hook (twice the spread, tried on 2 cores)."""

    def __init__(self, exe: str, cgroup_procs: str, cpu: int):
        self.peer = subprocess.Popen([exe, "peer"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        self.client = None
        try:
            os.sched_setaffinity(self.peer.pid, {cpu})
            port = self.peer.stdout.readline().strip()
            self.client = subprocess.Popen([exe, "target", cgroup_procs, port], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, text=True)
            os.sched_setaffinity(self.client.pid, {cpu})
            if self.client.stdout.readline().strip() != "ready":
                raise RuntimeError("hook_cost: the client did not connect")
        except BaseException:
            self.close()
            raise

    def run(self, size: int, n: int) -> tuple[float, float]:
        """n round trips of size bytes: (client's, peer's) CPU ns per round trip."""
        self.client.stdin.write(f"{size} {n}\n")
        self.client.stdin.flush()
        return float(self.client.stdout.readline()), float(self.peer.stdout.readline())

    def close(self) -> None:
        for p in (self.client, self.peer):
            if p is None:
                continue
            if p.stdin:
                p.stdin.close()    # the client's EOF ends both
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            p.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_condition(exe: str, cond: str, cg_root: str, cg_dir: str, prog_stats, cpu: int) -> list[dict]:
    """Under `cond`, a fresh target pair and a pair of other processes (out of scope, outside
    the cgroup) take turns: per phase and pair, per-round-trip figures."""
    rows = []
    with contextlib.ExitStack() as stack:
        procs = os.path.join(cg_dir, "cgroup.procs") if cond == "cg scoped" else "-"
        pairs = {"target": stack.enter_context(Pair(exe, procs, cpu)), "other": stack.enter_context(Pair(exe, "-", cpu))}
        cap = stack.enter_context(capture(cond, pairs["target"].client.pid, cg_root, cg_dir))
        for size, n in PHASES:
            for who, pair in pairs.items():
                before = snapshot(cap, prog_stats)
                client, peer = pair.run(size, n)
                after = snapshot(cap, prog_stats)
                row = {"size": size, "pair": who, "client": client, "peer": peer}
                row.update({k: (after[k] - before[k]) / n for k in after})
                rows.append(row)
    return rows


def fmt(vals: list[float]) -> str:
    return f"{min(vals):.0f}/{statistics.median(vals):.0f}"


def bpf(rows: list[dict], names: tuple[str, ...]) -> str:
    """Mean runs and ns per round trip of the named programs, "ns (runs)"."""
    runs = sum(statistics.fmean(r.get(p + ".cnt", 0) for r in rows) for p in names)
    ns = sum(statistics.fmean(r.get(p + ".ns", 0) for r in rows) for p in names)
    return f"{ns:.0f} ({runs:.1f})" if runs >= 0.05 else "0"


def report(res: dict) -> None:
    egress = tuple(v[1] for v in (*TC_PROGRAMS.values(), *CG_PROGRAMS.values()))
    ingress = tuple(v[0] for v in (*TC_PROGRAMS.values(), *CG_PROGRAMS.values()))
    print("ns per round trip: CPU time as min/median over rounds; BPF run time as mean (runs)")
    print(f"{'size':>4} {'condition':10} | {'target':>11} {'its peer':>11} {'records':>7} {'lost':>4} "
          f"{'egress BPF':>11} {'ingress BPF':>11} {'tracepts':>8} | {'other pair':>11} {'egress BPF':>11} "
          f"{'ingress BPF':>11} {'tracepts':>8}")
    for size, _ in PHASES:
        for cond in CONDS:
            t = [r for r in res[(cond, size)] if r["pair"] == "target"]
            o = [r for r in res[(cond, size)] if r["pair"] == "other"]
            mean = lambda k, rows=t: statistics.fmean(r.get(k, 0) for r in rows)
            tp, tpo = (sum(mean(p + ".ns", rows) for p in IO_TRACEPOINTS) for rows in (t, o))
            print(f"{size >> 10:>3}K {cond:10} | {fmt([r['client'] for r in t]):>11} {fmt([r['peer'] for r in t]):>11} "
                  f"{mean('packets'):7.2f} {mean('lost'):4.1f} {bpf(t, egress):>11} {bpf(t, ingress):>11} {tp:8.0f} | "
                  f"{fmt([r['client'] for r in o]):>11} {bpf(o, egress):>11} {bpf(o, ingress):>11} {tpo:8.0f}")


class Bench(contextlib.ExitStack):
    """What a run needs and undoes on exit: the loop compiled, the kernel's BPF run-time
    statistics on, the scratch cgroup made (and removed), a CPU for the pairs."""

    def __enter__(self) -> "Bench":
        super().__enter__()
        try:
            d = self.enter_context(tempfile.TemporaryDirectory(prefix="tlstap-hook-cost-"))
            self.exe = os.path.join(d, "loop")
            subprocess.run(["cc", "-O2", "-x", "c", "-", "-o", self.exe], input=LOOP_C, text=True, check=True)
            self.prog_stats = ProgStats(self.exe)
            fd = _libbpf.bpf_enable_stats(BPF_STATS_RUN_TIME)
            if fd < 0:
                raise OSError(-fd, f"BPF_ENABLE_STATS: {os.strerror(-fd)}")
            self.callback(os.close, fd)
            self.cg_root = cgroup2_mount()
            self.cg_dir = os.path.join(self.cg_root, f"hookcost-{os.getpid()}")
            os.mkdir(self.cg_dir)
            self.callback(remove_cgroup, self.cg_dir)
            self.cpu = max(os.sched_getaffinity(0))
        except BaseException:
            self.close()
            raise
        return self

    def run(self, cond: str) -> list[dict]:
        return run_condition(self.exe, cond, self.cg_root, self.cg_dir, self.prog_stats, self.cpu)


def main() -> None:
    if len(sys.argv) > 2 or not (sys.argv[1:] or ["1"])[0].isdigit():
        sys.exit("usage: hook_cost.py [ROUNDS]")
    if os.geteuid():
        sys.exit("hook_cost: run as root (BPF programs, a cgroup)")
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    res = {(c, s): [] for c in CONDS for s, _ in PHASES}
    with Bench() as bench:
        for r in range(rounds):
            for cond in CONDS[r % len(CONDS):] + CONDS[:r % len(CONDS)]:   # no condition always first
                for row in bench.run(cond):
                    res[(cond, row["size"])].append(row)
    report(res)


if __name__ == "__main__":
    main()
