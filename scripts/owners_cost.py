#!/usr/bin/env python3
"""What `-m pcapng`'s owner tracking costs other processes: ns per call of a tight loop.

unix: 1-byte send + recv on an AF_UNIX socketpair (sock_send_length/sock_recv_length fire,
the program stops at the family); tcp: the same on loopback TCP (the sk-storage lookup and
compare); close: open + close of /dev/null (sys_enter_close stops: no child);
close-parent: the same in a process with a child (the fd table is read).
Conditions, interleaved round by round: no capture; a capture (PacketCapture on lo, filter
"tcp port 9") with IO_TRACEPOINTS detached; the same with them attached. Thread CPU time,
best of 5 per run; min and median over rounds. Run as root with tlstap importable.

    python3 scripts/owners_cost.py [ROUNDS]
"""
import os
import statistics
import subprocess
import sys
import tempfile

LOOP_C = r"""
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
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

static void tcp_pair(int sv[2])
{
	int l = socket(AF_INET, SOCK_STREAM, 0), one = 1;
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t n = sizeof(a);
	if (bind(l, (void *)&a, sizeof(a)) || listen(l, 1) || getsockname(l, (void *)&a, &n)) exit(1);
	sv[0] = socket(AF_INET, SOCK_STREAM, 0);
	if (connect(sv[0], (void *)&a, sizeof(a))) exit(1);
	sv[1] = accept(l, NULL, NULL);
	setsockopt(sv[0], IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	close(l);
}

int main(int argc, char **argv)
{
	const char *mode = argv[1];
	long n = atol(argv[2]);
	int io = !strcmp(mode, "unix") || !strcmp(mode, "tcp");
	pid_t kid = !strcmp(mode, "close-parent") ? fork() : -1;
	if (kid == 0) { pause(); _exit(0); }
	char c = 'x';
	double best = 1e18;
	for (int rep = 0; rep < 5; rep++) {
		int sv[2];
		if (!strcmp(mode, "unix")) socketpair(AF_UNIX, SOCK_STREAM, 0, sv);
		else if (!strcmp(mode, "tcp")) tcp_pair(sv);
		double t0 = now();
		for (long i = 0; i < n; i++) {
			if (!io) { close(open("/dev/null", O_RDONLY)); continue; }
			if (send(sv[0], &c, 1, 0) != 1 || recv(sv[1], &c, 1, 0) != 1) { perror("io"); return 1; }
		}
		double per = (now() - t0) / n / (io ? 2 : 1);
		if (per < best) best = per;
		if (io) { close(sv[0]); close(sv[1]); }
	}
	if (kid > 0) kill(kid, SIGKILL);
	printf("%.1f\n", best);
	return 0;
}
"""

N = {"unix": 300000, "tcp": 100000, "close": 300000, "close-parent": 300000}


def main() -> None:
    import tlstap.sources.packets as P
    from tlstap.sources.base import CaptureConfig
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory(prefix="tlstap-owners-cost-") as d:
        exe = os.path.join(d, "loop")
        subprocess.run(["cc", "-O2", "-x", "c", "-", "-o", exe], input=LOOP_C, text=True, check=True)

        def run(mode: str) -> float:
            return float(subprocess.run([exe, mode, str(N[mode])], capture_output=True, text=True,
                                        check=True).stdout)

        conds = ("no capture", "capture, I/O tracepoints off", "capture, I/O tracepoints on")
        res = {c: {m: [] for m in N} for c in conds}
        for _ in range(rounds):
            for m in N:
                res[conds[0]][m].append(run(m))
            cap = P.PacketCapture(CaptureConfig(), "lo", "tcp port 9", lambda p: None)
            cap.start()
            try:
                for m in N:
                    res[conds[2]][m].append(run(m))
                for link in cap.links:
                    if link.desc in P.IO_TRACEPOINTS:
                        link.close()
                for m in N:
                    res[conds[1]][m].append(run(m))
            finally:
                cap.close()
    for c in conds:
        print(f"{c:30}", "  ".join(f"{m} {min(v):.0f}/{statistics.median(v):.0f}" for m, v in res[c].items()),
              "(ns per call, min/median)")


if __name__ == "__main__":
    main()
