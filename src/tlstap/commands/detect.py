"""`tlstap detect [--json]`: list what captures TLS on this host (for defenders).

Exit status 0 when it looked (whatever it found), 1 when it could not: it needs
CAP_SYS_ADMIN to open BPF objects by id and to query other processes' perf event fds, and
CAP_SYS_PTRACE to read other processes' fds and environments.
"""
from __future__ import annotations

import argparse
import sys

from ..preflight import CAP_SYS_ADMIN, CAP_SYS_PTRACE, effective_caps


def add_parsers(sub) -> None:
    p = sub.add_parser("detect", help="list what is capturing TLS on this host now (uprobes on TLS libraries, "
                                      "TC/XDP/cgroup skb programs, packet sockets, SSLKEYLOGFILE, LD_PRELOAD)",
                       description="List BPF uprobes on TLS libraries (which library, function, process), TC, "
                                   "XDP and cgroup skb programs, packet sockets, SSLKEYLOGFILE and LD_PRELOAD "
                                   "in process environments: each with its owner and since when.")
    p.add_argument("--json", action="store_true", help="a JSON list of findings instead of text")
    p.set_defaults(func=run)


def _missing_caps() -> str | None:
    caps = effective_caps()
    missing = [n for c, n in ((CAP_SYS_ADMIN, "CAP_SYS_ADMIN (to open BPF programs and links by id)"),
                              (CAP_SYS_PTRACE, "CAP_SYS_PTRACE (to read other processes' fds and environments)"))
               if not caps >> c & 1]
    return f"detect cannot look: it needs {' and '.join(missing)}; run it as root" if missing else None


def run(args: argparse.Namespace) -> int:
    missing = _missing_caps()
    if missing:
        print(f"tlstap: {missing}", file=sys.stderr)
        return 1
    from .. import detect
    from ..detect import report
    findings, notes = detect.scan()
    if args.json:
        sys.stdout.write(report.as_json(findings))
        for n in notes:
            print(f"tlstap: {n}", file=sys.stderr)
    else:
        sys.stdout.write(report.text(findings, notes))
    return 0
