"""The probe source: plaintext from uprobes on a library's read/write calls (OpenSSL's, and
those of libraries whose calls fit the same probes: GnuTLS, NSPR). Discover libraries, open
-> configure -> load -> attach, read.

Everything attached is owned by one ExitStack: a failure half-way (say the
SSL_write probe) closes what was already attached, so no stray probe remains.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from .. import abi
from ..abi import Counter, Direction
from ..errors import AttachError, LoadError, UsageError
from ..libbpf import BpfObject
from ..libbpf.object import kernel_has_func
from ..decode.records import RecordDecoder
from .base import Capture, CaptureConfig, bpf_object_path, set_scope

SYSCALL_PROGRAMS = ("sys_enter_read", "sys_enter_write", "sys_enter_readv", "sys_enter_writev",
                    "sys_enter_recvfrom", "sys_enter_sendto", "sys_enter_recvmsg", "sys_enter_sendmsg")
#: one program on the raw sys_enter tracepoint standing for SYSCALL_PROGRAMS
#: (far cheaper for every other process's read/write); not built for every arch
RAW_SYSCALL_PROGRAM = "sys_enter_io"
#: the return probe: [False] copies through a per-CPU buffer, [True] reads the
#: user buffer straight into the ring buffer with this kfunc (Linux 6.16+)
EXIT_PROGRAMS = {False: "ssl_rw_exit_copy", True: "ssl_rw_exit"}
DIRECT_READ_KFUNC = "bpf_probe_read_user_dynptr"
#: development switch: "1" takes the fallback path of start() as if the preferred programs had
#: been refused (tests run it; a user could too, to rule them out)
FORCE_CONSERVATIVE_ENV = "TLSTAP_FORCE_COPY"


def find_targets(cfg: CaptureConfig) -> list["OpenSSLTarget"]:
    """The OpenSSL builds to probe, each file once (by device and inode)."""
    from ..probes import discover, openssl
    return [openssl.analyze(p) for p in discover.target_paths(cfg.libssl, cfg.pid)]


@dataclass(frozen=True)
class LoadPlan:
    """Which of the object's alternative programs a capture loaded."""
    exit_program: str     # EXIT_PROGRAMS[True] reads straight into the ring, [False] copies
    raw_syscalls: bool    # RAW_SYSCALL_PROGRAM on tp_btf/sys_enter, else the SYSCALL_PROGRAMS


def _has_program(obj: BpfObject, name: str) -> bool:
    return any(p.name == name for p in obj.programs())


class OpenSSLCapture(Capture):
    """Use as a context manager; start() attaches, poll() delivers TlsData to `sink`."""

    def __init__(self, cfg: CaptureConfig, sink, find=None, hint: str = "--libssl PATH"):
        """find(cfg) -> targets (default find_targets: OpenSSL); another library whose read/write
        functions fit the same probes (GnuTLS: libs.gnutls.find_targets) brings its own.
        hint: the flag named when attaching fails."""
        if cfg.mapsize < 4096 or cfg.mapsize & (cfg.mapsize - 1):
            raise UsageError(f"--mapsize must be a power of two >= 4096 bytes, not {cfg.mapsize}")
        if cfg.max_payload >= cfg.mapsize:
            raise UsageError("--max-payload must be smaller than --mapsize (one call must fit in the ring buffer)")
        super().__init__(cfg)
        self.decoder = RecordDecoder(sink, cfg.max_payload)
        self._on_record = self.decoder.feed
        self._last_lost = (0, 0, 0)
        self._exit_prog = EXIT_PROGRAMS[False]
        self._raw_syscalls = False
        self._find = find or find_targets
        self._hint = hint

    #: the object and its two return programs ([False] copies, [True] reads straight into the ring)
    OBJECT = "openssl.bpf.o"
    EXIT_PROGRAMS = EXIT_PROGRAMS

    def start(self) -> None:
        """Loads the preferred programs, else the conservative ones; load_note then says why
        (the CLI prints it: a library module does not write to stderr)."""
        self.resolve()
        direct = kernel_has_func(DIRECT_READ_KFUNC)
        with contextlib.ExitStack() as stack:
            try:
                if os.environ.get(FORCE_CONSERVATIVE_ENV) == "1":
                    raise LoadError(f"{FORCE_CONSERVATIVE_ENV}=1")
                obj = self._load(stack, direct)
            except LoadError as e:
                # the kfunc exists but this kernel refuses it here, or no tp_btf:
                # the conservative programs then
                obj = self._load(stack, False, raw_syscalls=False)
                preferred = [self.EXIT_PROGRAMS[direct]] + [RAW_SYSCALL_PROGRAM] * _has_program(obj, RAW_SYSCALL_PROGRAM)
                used = [self._exit_prog] + ["syscall tracepoints"] * _has_program(obj, SYSCALL_PROGRAMS[0])
                why = (str(e).splitlines() or [type(e).__name__])[0]
                self.load_note = (f"the preferred programs ({', '.join(preferred)}) did not load ({why}): "
                                  f"using the conservative ones ({', '.join(used)})")
            self._attach(obj, stack)
            self.open_events(stack, obj, "events")
            self._stack = stack.pop_all()

    def load(self, stack: contextlib.ExitStack, preferred: bool = True) -> BpfObject:
        """Open, configure and load the object as start() does, attaching nothing (tlstap doctor
        verifies it so): the preferred programs, or the conservative ones start() falls back
        to. The object belongs to `stack`; `plan` then says which programs it holds."""
        return self._load(stack, preferred and kernel_has_func(DIRECT_READ_KFUNC), raw_syscalls=preferred)

    @property
    def plan(self) -> LoadPlan:
        """The programs of the last load (or start)."""
        return LoadPlan(self._exit_prog, self._raw_syscalls)

    def _load(self, stack: contextlib.ExitStack, direct: bool, raw_syscalls: bool = True) -> BpfObject:
        with contextlib.ExitStack() as attempt:
            obj = attempt.enter_context(BpfObject.open(bpf_object_path(self.OBJECT)))
            set_scope(obj, self.cfg)
            obj.map("events").max_entries = self.cfg.mapsize
            obj.map("scratch_buf").max_entries = self.ncpus
            self._exit_prog = self.EXIT_PROGRAMS[direct]
            obj.program(self.EXIT_PROGRAMS[not direct]).autoload = False
            self._choose_syscall_programs(obj, raw_syscalls)
            obj.load()
            attempt.pop_all()
        return stack.enter_context(obj)

    def _choose_syscall_programs(self, obj: BpfObject, raw_syscalls: bool) -> None:
        """One tp_btf/sys_enter program, or the classic syscall tracepoints where it is not built
        (or was refused): the other set is not loaded."""
        self._raw_syscalls = raw_syscalls and _has_program(obj, RAW_SYSCALL_PROGRAM)
        if self._raw_syscalls:
            for name in SYSCALL_PROGRAMS:
                obj.program(name).autoload = False
        elif _has_program(obj, RAW_SYSCALL_PROGRAM):
            obj.program(RAW_SYSCALL_PROGRAM).autoload = False

    def _attach(self, obj: BpfObject, stack: contextlib.ExitStack) -> None:
        exit_, free = obj.program(self._exit_prog), obj.program("ssl_free_enter")
        pid = self.cfg.pid or -1
        for t in self.targets:
            for s in t.sites:
                try:
                    if s.role == "free":
                        self.links.append(stack.enter_context(free.attach_uprobe(t.path, s.offset, pid=pid)))
                        continue
                    direction = {"read": Direction.READ, "write": Direction.WRITE,
                                 "handshake": Direction.HANDSHAKE}[s.role]
                    cookie = abi.site_cookie(direction, s.out_arg, getattr(t, "hello", None))
                    for prog, ret in ((obj.program(s.entry), False), (exit_, True)):
                        self.links.append(stack.enter_context(
                            prog.attach_uprobe(t.path, s.offset, pid=pid, retprobe=ret, cookie=cookie)))
                except AttachError as e:
                    raise AttachError(f"{e} ({s.symbol} in {t.path}; try {self._hint})") from None
        for name in (RAW_SYSCALL_PROGRAM,) if self._raw_syscalls else SYSCALL_PROGRAMS:
            self.links.append(stack.enter_context(obj.program(name).attach()))

    def drain(self) -> None:
        """Take everything still in the ring buffer and flush partial calls."""
        super().drain()
        self.decoder.flush_stale(all_=True)

    def counters(self) -> dict[str, int]:
        return self.counter_sums("counters", Counter)

    def attached(self) -> list[str]:
        """A status line per target: where the probes sit."""
        lines = []
        for t in self.targets:
            sites = ", ".join(f"{s.symbol}({s.first_insn})" for s in t.sites if s.role in ("read", "write"))
            lines.append(f"attached {t.path} ({t.version or 'version unknown'}): {t.placement} probes on {sites}")
            if t.placement != "internal":
                lines.append(f"  note: {t.reason}")
        return lines

    def describe(self) -> str:
        return (f", ring buffer {self.cfg.mapsize >> 10} KiB, max payload {self.cfg.max_payload} bytes "
                f"per call")

    def summary(self, why: str, c: dict) -> str:
        return (f"{why}: {c['calls']} calls, {c['records']} records, {c['bytes']} bytes captured; "
                f"truncated {c['trunc_calls']} calls ({c['trunc_bytes']} bytes over --max-payload); "
                f"lost {c['lost_records']} records ({c['lost_bytes']} bytes)")

    def new_losses(self) -> tuple[int, int, int]:
        """(records, bytes, records lost while the ring had room) since the
        previous call."""
        c = self.counters()
        now = (c["lost_records"], c["lost_bytes"], c["lost_room"])
        delta = tuple(n - was for n, was in zip(now, self._last_lost))
        self._last_lost = now
        return delta

