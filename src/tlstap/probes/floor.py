"""`python -m tlstap.probes.floor --pid PID [--module tls|gnutls|nss]`: tlstap's read/write probe
sites with empty BPF programs, entry and return, until SIGINT/SIGTERM.

What the probes alone cost the server, before tlstap does any work in them: the floor under
text mode's cost on this kernel and CPU (a single-stepped instruction, a uretprobe's trampoline).
`tlstap bench --configs base,probes,raw` runs it as the `probes` configuration, so a report
separates the probes' price from tlstap's own.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading

from ..sources.base import CaptureConfig, bpf_object_path
from ..sources.probe import find_targets
from ..errors import TlstapError
from ..libbpf import BpfObject

MODULES = ("tls", "gnutls", "nss")     # Go's sites are not entry/return pairs


def _finder(module: str):
    if module == "tls":
        return find_targets
    return importlib.import_module(f"tlstap.probes.{module}").find_targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tlstap.probes.floor", description=__doc__.split("\n\n")[0])
    ap.add_argument("-p", "--pid", type=int, required=True)
    ap.add_argument("--module", choices=MODULES, default="tls")
    ap.add_argument("--libssl", action="append", default=[], metavar="PATH")
    args = ap.parse_args(argv)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        targets = _finder(args.module)(CaptureConfig(pid=args.pid, libssl=args.libssl))
        with contextlib.ExitStack() as stack:
            obj = stack.enter_context(BpfObject.open(bpf_object_path("noop.bpf.o")))
            obj.load()
            prog, n = obj.program("noop"), 0
            for t in targets:
                for s in t.sites:
                    if s.role in ("read", "write"):
                        for ret in (False, True):
                            stack.enter_context(prog.attach_uprobe(t.path, s.offset, pid=args.pid, retprobe=ret))
                            n += 1
            sites = ", ".join(f"{s.symbol}({s.first_insn})" for t in targets for s in t.sites
                              if s.role in ("read", "write"))
            print(f"probe_floor: ready in 0s: {n} empty probes on {sites}", file=sys.stderr, flush=True)
            done.wait()
    except TlstapError as e:
        print(f"probe_floor: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
