"""tlstap gotls: the captures for Go crypto/tls (bpf/gotls.bpf.c, go_keylog_enter in keylog.bpf.c).

Text mode shares OpenSSLCapture's records, decoder, counters and teardown; only the object and
the probes differ: an entry uprobe on (*tls.Conn).Read/Write and a plain uprobe on each of their
RET instructions (probes/gotls.py finds them). No syscall tracepoints: the connection comes from
the tls.Conn itself. Keylog mode is KeyLogCapture with one probe on writeKeyLog.
"""
from __future__ import annotations

import contextlib

from .. import abi
from ..abi import Direction
from .base import CaptureConfig
from .probe import OpenSSLCapture
from .keys import KeyLogCapture
from ..libbpf import BpfObject
from ..probes import gotls

#: the RET probe: [True] reads the user buffer straight into the ring buffer (Linux 6.16+)
RET_PROGRAMS = {False: "go_rw_ret_copy", True: "go_rw_ret"}
_DIRECTION = {"read": Direction.READ, "write": Direction.WRITE}


class GoTlsCapture(OpenSSLCapture):
    """Use as a context manager; start() analyses --elfpath/--pid and attaches."""

    def __init__(self, cfg: CaptureConfig, sink):
        super().__init__(cfg, sink, find=gotls.find_targets, hint="--elfpath PATH")

    OBJECT = "gotls.bpf.o"
    EXIT_PROGRAMS = RET_PROGRAMS

    def _choose_syscall_programs(self, obj: BpfObject, raw_syscalls: bool) -> None:
        """None: the fd comes from the tls.Conn (bpf/gotls.bpf.c says why)."""

    def _attach(self, obj: BpfObject, stack: contextlib.ExitStack) -> None:
        enter, ret = obj.program("go_rw_enter"), obj.program(self.plan.exit_program)
        pid = self.cfg.pid or -1
        for t in self.targets:
            # returns first: an entry seen before its RET probes exist would stay in the map
            for prog, sites in ((ret, t.rets), (enter, t.sites)):
                for s in sites:
                    cookie = int(_DIRECTION[s.role])
                    if prog is ret and s.role == "read" and t.read_spilled:
                        cookie |= abi.COOKIE_GO_SPILLED
                    self.attach_uprobe(stack, prog, t.path, s.offset, s.symbol, pid=pid, cookie=cookie)


class GoKeyLogCapture(KeyLogCapture):
    """-m keylog for Go: key_events from (*tls.Config).writeKeyLog."""

    PROGRAMS = ("go_keylog_enter",)

    def __init__(self, cfg: CaptureConfig, on_line=None):
        super().__init__(cfg, on_line, find=lambda c: gotls.find_targets(c, keylog=True),
                         describe=lambda t: f"attached {t.describe()}")

    def attach_points(self, t) -> list[tuple[str, int, str, int]]:
        return [("go_keylog_enter", t.keylog.offset, t.keylog.symbol, 0)]
