"""`tlstap doctor`: the production checklist, checked instead of read.

    tlstap doctor [--pid PID] [--json] [--libssl PATH]...

Each finding is one Check: a status, a short name, what was found and, for WARN and FAIL,
one line saying what to do. Statuses:

    OK    works (or is not needed, and the line says so)
    INFO  worth knowing, changes nothing (a fallback in use, a library tlstap cannot read)
    WARN  tlstap runs, but something is off (a slower probe placement, pcapng unavailable)
    FAIL  tlstap will not work as asked; the exit code is then 1

Rules:

1. Probe, do not infer. Kernel versions only say what *should* be there; where the question
   can be settled by trying, we try: the objects tlstap ships are loaded (the verifier checks
   them against this kernel), a uprobe and a uretprobe are attached to libc's getppid in this
   process alone and must fire, and the TC program is run with BPF_PROG_TEST_RUN.
2. Leave the host as found. Nothing is attached outside this process: no TC filter, no
   qdisc, no tracepoint; no mount. Every object and link is closed before returning, also on
   error (ExitStack).
3. Never crash. Every group of checks runs under a guard that turns an unexpected exception
   into a FAIL line naming it, so the report always completes.
4. Quick: ~0.3 s for the whole report; analysing a static node adds ~1 s.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import platform
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

from ..probes.tls_libraries import OTHER_TLS
from ..preflight import (CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SYS_PTRACE, SETCAP_HINT,
                         cgroup2_root, kernel_version, privilege_problem)

OK, INFO, WARN, FAIL = "OK", "INFO", "WARN", "FAIL"

#: Kernel features tlstap relies on, with the release that brought them (for the kernel line
#: only: each is also established by loading the objects, below).
KERNEL_FEATURES = (
    ((5, 5), "tp_btf"),
    ((5, 8), "ring buffer, CAP_BPF/CAP_PERFMON"),
    ((5, 11), "task storage, memcg accounting"),
    ((5, 15), "attach cookies"),
    ((5, 17), "bpf_loop"),
    ((6, 2), "bpf_rdonly_cast"),
    ((6, 16), "bpf_probe_read_user_dynptr"),
)
#: Below this, openssl.bpf.o and packets.bpf.o cannot load (bpf/conn.h reads the fd table
#: and the socket through bpf_rdonly_cast, the newest kfunc they need).
MIN_KERNEL = (6, 2)

_CAP_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_SYS_PTRACE: "CAP_SYS_PTRACE", CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
              CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}

BPF_MAP_TYPE_RINGBUF, BPF_MAP_TYPE_TASK_STORAGE = 27, 29
#: instructions the kernel emulates at a uprobe (cheap); others are single-stepped (~7x dearer)
_EMULATED = ("push", "call", "jmp", "ret")
_PROBE_RING = 1 << 16        # ring buffers of the test loads: small, they carry nothing

_GO_SECTIONS = (".go.buildinfo", ".gopclntab", ".note.go.buildid")


@dataclass(frozen=True)
class Check:
    """One line of the report."""
    check: str      #: short name, stable across runs (the JSON key `check`)
    status: str     #: OK | INFO | WARN | FAIL
    detail: str     #: what was found
    fix: str = ""   #: for WARN and FAIL: what to do, one line


# ---- helpers -----------------------------------------------------------------------------

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None




def _caps(pid: str = "self") -> int:
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def _has(caps: int, cap: int) -> bool:
    return bool(caps >> cap & 1)


def _can_load_bpf(caps: int) -> bool:
    return _has(caps, CAP_SYS_ADMIN) or (_has(caps, CAP_BPF) and _has(caps, CAP_PERFMON))


def _one_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _load_error(e: BaseException) -> str:
    """A LoadError's message plus the verifier's last words, on one line."""
    log = [l.strip() for l in (getattr(e, "log", "") or "").splitlines() if l.strip()]
    return _one_line(e) + (f" (libbpf: {log[-1][:200]})" if log else "")


def _guard(out: list[Check], name: str, fn: Callable[[], Iterable[Check]]) -> None:
    """Run one group of checks; an unexpected exception becomes one FAIL line."""
    try:
        out.extend(fn())
    except Exception as e:  # noqa: BLE001 - the report must complete
        out.append(Check(name, FAIL, f"check crashed: {type(e).__name__}: {_one_line(e)}",
                         "report this as a tlstap bug, with this line"))


# ---- environment -------------------------------------------------------------------------

def kernel_checks() -> list[Check]:
    release = os.uname().release
    v = kernel_version(release)
    have = [f"{what} {a}.{b}" for (a, b), what in KERNEL_FEATURES if v[:2] >= (a, b)]
    lack = [f"{what} {a}.{b}" for (a, b), what in KERNEL_FEATURES if v[:2] < (a, b)]
    detail = f"{release}: has {', '.join(have) or 'none'}"
    if v[:2] < MIN_KERNEL:
        return [Check("kernel", FAIL, f"{detail}; lacks {', '.join(lack)}",
                      f"tlstap needs Linux >= {MIN_KERNEL[0]}.{MIN_KERNEL[1]} (bpf_rdonly_cast); upgrade the kernel")]
    if lack:
        detail += f"; lacks {', '.join(lack)} (fallbacks below)"
    return [Check("kernel", OK, detail)]


def btf_check() -> list[Check]:
    from ..preflight import BTF_PATH
    try:
        size = os.path.getsize(BTF_PATH)
    except OSError:
        return [Check("btf", FAIL, f"no kernel BTF at {BTF_PATH}: tlstap's CO-RE programs cannot load",
                      "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (most distribution kernels >= 5.4)")]
    return [Check("btf", OK, f"{BTF_PATH} ({size / (1 << 20):.1f} MiB)")]


def capability_checks(caps: int) -> list[Check]:
    names = [n for c, n in sorted(_CAP_NAMES.items()) if _has(caps, c)]
    held = ", ".join(names) or "none of CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_SYS_PTRACE"
    who = f"uid {os.getuid()}" + (f" (euid {os.geteuid()})" if os.geteuid() != os.getuid() else "")
    out = []
    problem = privilege_problem(caps, kernel_version(os.uname().release))
    if problem is None:
        how = "CAP_SYS_ADMIN" if _has(caps, CAP_SYS_ADMIN) else "CAP_BPF + CAP_PERFMON"
        out.append(Check("capabilities", OK, f"{who}, effective {held}: {how} is enough to load BPF and attach "
                                             f"uprobes"))
    else:
        out.append(Check("capabilities", FAIL, f"{who}, effective {held}: {problem}", SETCAP_HINT))
    if _has(caps, CAP_NET_ADMIN) or _has(caps, CAP_SYS_ADMIN):
        out.append(Check("cap_net_admin", OK, "held: -m pcapng can load its TC programs and attach them to an "
                                              "interface (see tcx)"))
    else:
        out.append(Check("cap_net_admin", WARN, "missing: -m pcapng cannot attach TC programs (text and keylog "
                         "modes do not need it)", "add CAP_NET_ADMIN for -m pcapng"))
    if not (_has(caps, CAP_SYS_PTRACE) or os.geteuid() == 0):
        out.append(Check("cap_sys_ptrace", WARN, "missing: --pid cannot read /proc/PID/maps and /proc/PID/root of "
                         "other users' processes", "add CAP_SYS_PTRACE to scope by --pid"))
    return out


def _mounts() -> list[tuple[str, str]]:
    out = []
    for line in (_read("/proc/self/mounts") or "").splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append((parts[1].replace("\\040", " "), parts[2]))
    return out


def mount_checks(caps: int) -> list[Check]:
    from ..preflight import TRACEFS_DIRS, tracefs_dir
    mounts = _mounts()
    bpffs = [m for m, t in mounts if t == "bpf"]
    out = [Check("bpffs", OK, "not needed: tlstap pins nothing" +
                 (f" (mounted at {bpffs[0]})" if bpffs else " (not mounted)"))]
    # from the mount table: tracefs is usually mode 0700, a non-root user cannot even look
    mounted = [m for m, t in mounts if t == "tracefs"]
    d = tracefs_dir()
    if d:
        out.append(Check("tracefs", OK, f"mounted at {d} (the classic syscall tracepoints and -m pcapng's "
                                        f"connect/accept tracepoints are looked up there)"))
    elif mounted:
        out.append(Check("tracefs", WARN, f"mounted at {mounted[0]}, but this user cannot read it: tracepoints "
                                          f"(the syscall fallback, -m pcapng) cannot attach",
                         "run as root (CAP_BPF + CAP_PERFMON alone do not open tracefs: add CAP_DAC_READ_SEARCH)"))
    elif "tracefs" not in (_read("/proc/filesystems") or ""):
        out.append(Check("tracefs", FAIL, "not mounted, and this kernel has no tracefs: tracepoints cannot attach",
                         "use a kernel with CONFIG_TRACING (every distribution kernel has it)"))
    elif _has(caps, CAP_SYS_ADMIN):
        out.append(Check("tracefs", OK, f"not mounted; tlstap mounts it at {TRACEFS_DIRS[0]} when it starts "
                                        f"(kernel supports it, CAP_SYS_ADMIN held)"))
    else:
        out.append(Check("tracefs", WARN, "not mounted, and without CAP_SYS_ADMIN tlstap cannot mount it",
                         f"mount -t tracefs nodev {TRACEFS_DIRS[0]} (or give the container /sys/kernel/tracing)"))
    # the wire source (text mode's default) attaches its cgroup_skb programs to a cgroup v2 directory
    root = cgroup2_root()
    if root:
        out.append(Check("cgroup2", OK, f"mounted at {root}: the wire source attaches there (or to --cgroup)"))
    elif _has(caps, CAP_SYS_ADMIN):
        out.append(Check("cgroup2", OK, "not mounted; the wire source mounts it privately for the attach and "
                                        "unmounts it again (CAP_SYS_ADMIN held)"))
    else:
        out.append(Check("cgroup2", WARN, "not mounted, and without CAP_SYS_ADMIN tlstap cannot mount it: "
                                          "text mode's wire source cannot attach",
                         "mount -t cgroup2 none /sys/fs/cgroup/unified, or use --source probe"))
    return out


def spool_check() -> list[Check]:
    """Text and JSON modes spool captured bytes for their decoder process (spool.py) in
    $TMPDIR or /tmp, up to --spool-max."""
    import shutil
    import tempfile
    from ..sizes import DEFAULT_SPOOL_MAX, parse_size
    d = tempfile.gettempdir()
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        return [Check("spool", FAIL, f"{d}: cannot create the decoder's spool file: {e.strerror}",
                      "give text mode --spool-dir DIR (a writable directory) or set TMPDIR")]
    free = shutil.disk_usage(d).free
    detail = (f"{d}: writable, {free / (1 << 30):.1f} GiB free for the decoder's spool "
              f"(--spool-max, default {DEFAULT_SPOOL_MAX})")
    if free < parse_size(DEFAULT_SPOOL_MAX, "--spool-max"):
        return [Check("spool", WARN, detail, "a backlog past the free space fails: lower --spool-max or "
                                             "give --spool-dir on a larger file system")]
    return [Check("spool", OK, detail)]


def native_check() -> list[Check]:
    """-m pcapng encodes packets with native/epb.c, built at install time like the BPF objects;
    off x86-64 every ring reader needs its native/ring.c too (libbpf/ringbuf.py)."""
    from ..errors import TlstapError
    from ..libbpf.ringbuf import ORDERED
    from ..sinks.epb_native import EpbEncoder, library_path
    try:
        EpbEncoder()
    except TlstapError as e:
        return [Check("pcapng encoder", FAIL, str(e), "reinstall tlstap with clang present")]
    except OSError as e:
        return [Check("pcapng encoder", FAIL, f"{library_path()} does not load: {_one_line(e)}",
                      "reinstall tlstap (pip install . builds it with clang)")]
    ring = f"; the ring reader's acquire/release on {platform.machine()} too" if ORDERED else ""
    return [Check("pcapng encoder", OK, f"{library_path()} loads{ring}")]


THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_check() -> list[Check]:
    """The direct-I/O writer's buffers ask for transparent huge pages (sinks/direct.py):
    on 4 KiB pages each write pins 512 times as many pages, ~10% of the writer's CPU at the
    1 GB/s of -m pcapng on a busy loopback. Asking is not getting: allocate, touch, look."""
    from ..sinks import direct
    from ..sinks.epb_native import Pinned
    text = _read(THP_ENABLED)
    mode = text[text.find("[") + 1:text.find("]")] if text and "[" in text else None
    if mode is None:
        return [Check("huge pages", INFO, "no transparent huge pages in this kernel: the direct-I/O buffers use "
                                          "4 KiB pages (the writer spends ~10% more CPU pinning them)")]
    if mode == "never":
        return [Check("huge pages", WARN, "transparent huge pages are off (never): the direct-I/O buffers use 4 KiB "
                                          "pages, ~10% more CPU for the writer at 1 GB/s",
                      f"echo madvise > {THP_ENABLED}")]
    size = 4 << 20
    m, (buf,) = direct.buffers(1, size)
    try:
        for i in range(0, size, 4096):
            buf[i] = 1
        with Pinned(buf) as where:
            got = _anon_huge_kib(where.addr)
    finally:
        buf.release()
        m.close()
    if got:
        return [Check("huge pages", OK, f"transparent huge pages ({mode}): the direct-I/O buffers got "
                                        f"{got >> 10} MiB of huge pages in 4 MiB")]
    return [Check("huge pages", WARN, f"transparent huge pages ({mode}), but a 4 MiB buffer got none (memory "
                                      "fragmented, or a cgroup limit): the writer spends ~10% more CPU",
                  "echo 1 > /proc/sys/vm/compact_memory")]


def _anon_huge_kib(start: int) -> int:
    """AnonHugePages (kB) of this process's mapping that starts at `start`."""
    hit = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                hit = int(head.split("-")[0], 16) == start
            elif hit and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


def sysctl_checks(caps: int, kernel: tuple[int, int, int]) -> list[Check]:
    out = []
    ub = _read("/proc/sys/kernel/unprivileged_bpf_disabled")
    meaning = {"0": "allowed", "1": "disabled, until reboot", "2": "disabled, an admin may re-enable"}
    out.append(Check("unprivileged_bpf", OK,
                     f"kernel.unprivileged_bpf_disabled={ub if ub is not None else '?'}"
                     f"{' (unprivileged BPF ' + meaning[ub] + ')' if ub in meaning else ''}: "
                     f"irrelevant, tlstap loads with CAP_BPF/CAP_SYS_ADMIN"))

    lock = _read("/sys/kernel/security/lockdown")
    if lock is None:
        if os.path.exists("/sys/kernel/security/lsm"):
            out.append(Check("lockdown", OK, "no lockdown LSM in this kernel"))
        else:
            out.append(Check("lockdown", INFO, "cannot tell: securityfs is not mounted at /sys/kernel/security "
                                               "(the object loads below would fail under lockdown=confidentiality)"))
    else:
        mode = (re.search(r"\[(\w+)\]", lock) or [None, lock])[1]
        if mode == "confidentiality":
            out.append(Check("lockdown", FAIL,
                             "lockdown=confidentiality: the kernel denies bpf_probe_read_kernel, which tlstap's "
                             "programs use (CO-RE reads of struct sock for the 4-tuple, the task for scope): "
                             "they are rejected at load",
                             "boot with lockdown=integrity or none (Secure Boot distributions: "
                             "disable lockdown for this host, e.g. `mokutil --disable-validation`)"))
        elif mode == "integrity":
            out.append(Check("lockdown", OK, "lockdown=integrity: blocks bpf_probe_write_user only, which tlstap "
                                             "does not use"))
        else:
            out.append(Check("lockdown", OK, f"lockdown={mode}"))

    par = _read("/proc/sys/kernel/perf_event_paranoid")
    if _has(caps, CAP_PERFMON) or _has(caps, CAP_SYS_ADMIN):
        out.append(Check("perf_event_paranoid", OK, f"kernel.perf_event_paranoid={par}: irrelevant with "
                                                    f"{'CAP_PERFMON' if _has(caps, CAP_PERFMON) else 'CAP_SYS_ADMIN'}"))
    else:
        out.append(Check("perf_event_paranoid", WARN,
                         f"kernel.perf_event_paranoid={par}: without CAP_PERFMON uprobe perf events are refused",
                         "grant CAP_PERFMON (lowering the sysctl does not help: BPF attach needs the capability)"))

    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    lim = "unlimited" if soft == resource.RLIM_INFINITY else f"{soft >> 10} KiB"
    if kernel[:2] >= (5, 11):
        out.append(Check("memlock", OK, f"not needed: BPF memory is charged to the memory cgroup since 5.11 "
                                        f"(RLIMIT_MEMLOCK {lim})"))
    elif soft == resource.RLIM_INFINITY:
        out.append(Check("memlock", OK, "RLIMIT_MEMLOCK unlimited (kernel < 5.11 counts BPF memory against it)"))
    else:
        out.append(Check("memlock", WARN, f"RLIMIT_MEMLOCK {lim} on a kernel < 5.11, which charges BPF maps to it; "
                                          f"libbpf raises it if it can",
                         "ulimit -l unlimited (or LimitMEMLOCK=infinity in the systemd unit)"))
    return out


# ---- probes: load what tlstap ships, attach where it harms nobody ------------------------

def _libc_path() -> str | None:
    for line in (_read("/proc/self/maps") or "").splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and re.match(r"libc(\.so\.6|-[\d.]+\.so)$", os.path.basename(parts[5])):
            return parts[5]
    return None


def _counter_sum(m, n: int, ncpus: int) -> int:
    return sum(sum(m.lookup_percpu_u64(i, ncpus)) for i in range(n))


def _openssl_load(stack: contextlib.ExitStack, preferred: bool):
    """openssl.bpf.o loaded as OpenSSLCapture does (same code path); returns its LoadPlan."""
    from ..sources.base import CaptureConfig
    from ..sources.probe import OpenSSLCapture
    cap = OpenSSLCapture(CaptureConfig(mapsize=_PROBE_RING, max_payload=4096), None)
    cap.load(stack, preferred)
    return cap.plan


def probe_checks(caps: int) -> list[Check]:
    from ..sources.base import bpf_object_path
    from ..sources.probe import DIRECT_READ_KFUNC, EXIT_PROGRAMS, RAW_SYSCALL_PROGRAM
    from ..errors import TlstapError
    from ..libbpf.object import kernel_has_func, probe_map_type

    if not _can_load_bpf(caps):
        return [Check("bpf probes", WARN, "not probed (ring buffer, task storage, the three objects, uprobe, TC): "
                                          "loading BPF needs CAP_BPF + CAP_PERFMON (see capabilities)",
                      "run `tlstap doctor` as root to probe them")]
    out = []
    for name, t, ver in (("ringbuf", BPF_MAP_TYPE_RINGBUF, "5.8"), ("task_storage", BPF_MAP_TYPE_TASK_STORAGE, "5.11")):
        r = probe_map_type(t)
        if r == 1:
            out.append(Check(name, OK, f"map created by libbpf's feature probe (kernel >= {ver})"))
        else:
            out.append(Check(name, FAIL, f"this kernel refuses the map type (probe returned {r})",
                             f"tlstap needs Linux >= {ver} with BPF enabled"))

    # openssl.bpf.o: the variant a capture would load, then its fallback if refused
    direct = kernel_has_func(DIRECT_READ_KFUNC)
    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        try:
            path = bpf_object_path("openssl.bpf.o")
        except TlstapError as e:
            out.append(Check("openssl.bpf.o", FAIL, _one_line(e), "reinstall tlstap (pip install . runs clang)"))
            path = None
        first_err = None
        plan = None
        if path:
            try:
                plan = _openssl_load(stack, True)
            except TlstapError as e:
                first_err = _load_error(e)
                try:
                    plan = _openssl_load(stack, False)
                except TlstapError as e2:
                    out.append(Check("openssl.bpf.o", FAIL, f"{path}: the kernel refused it: {_load_error(e2)}",
                                     "run `TLSTAP_DEBUG=1 tlstap tls` for the verifier log and report it"))
        if plan is not None:
            ms = (time.monotonic() - t0) * 1000
            if first_err:
                out.append(Check("openssl.bpf.o", WARN, f"{path}: preferred programs refused ({first_err}); "
                                 f"the fallback (copy exit, classic tracepoints) loaded in {ms:.0f} ms",
                                 "capture works, a little slower; report the refusal with `uname -r`"))
            else:
                out.append(Check("openssl.bpf.o", OK, f"{path}: verified and loaded in {ms:.0f} ms "
                                 f"(text mode: {plan.exit_program}, "
                                 f"{'tp_btf/sys_enter' if plan.raw_syscalls else 'syscall tracepoints'})"))
            if plan.raw_syscalls:
                out.append(Check("tp_btf", OK, f"{RAW_SYSCALL_PROGRAM} loaded on tp_btf/sys_enter: one program "
                                               f"for the 8 socket syscalls (~70 ns per syscall of other processes)"))
            else:
                out.append(Check("tp_btf", INFO, "fallback: 8 classic syscall tracepoints (~165 ns per syscall "
                                                 "of other processes instead of ~70)"))
            if plan.exit_program == EXIT_PROGRAMS[True]:
                out.append(Check("dynptr_read", OK, f"{DIRECT_READ_KFUNC}: one-copy text capture (process memory "
                                                    f"straight into the ring buffer)"))
            else:
                why = "not in this kernel (6.16+)" if not direct else "refused at load"
                out.append(Check("dynptr_read", INFO, f"{DIRECT_READ_KFUNC} {why}: copy fallback through a "
                                                      f"per-CPU buffer"))

    out.extend(_keylog_and_uprobe(bpf_object_path))
    out.extend(_packets_and_tc(caps))
    return out


def _keylog_and_uprobe(bpf_object_path) -> list[Check]:
    from .. import abi
    from ..errors import TlstapError
    from ..libbpf import BpfObject
    from ..libbpf.object import num_possible_cpus
    from ..probes.elf import ElfImage

    out = []
    with contextlib.ExitStack() as stack:
        t0 = time.monotonic()
        try:
            obj = stack.enter_context(BpfObject.open(bpf_object_path("keylog.bpf.o")))
            conf = obj.rodata(abi.Config)
            conf.target_tgid = os.getpid()          # the uprobe test below fires in this process only
            conf.target_uid = abi.ANY_UID
            obj.map("key_events").max_entries = _PROBE_RING
            obj.load()
        except TlstapError as e:
            return [Check("keylog.bpf.o", FAIL, f"the kernel refused it: {_load_error(e)}",
                          "run `TLSTAP_DEBUG=1 tlstap tls -m keylog` for the verifier log and report it"),
                    Check("uprobe", WARN, "not probed: keylog.bpf.o did not load", "see keylog.bpf.o")]
        out.append(Check("keylog.bpf.o", OK, f"{obj.path}: verified and loaded in "
                                             f"{(time.monotonic() - t0) * 1000:.0f} ms"))

        # A uprobe and a uretprobe on libc's getppid, in this process alone (the kernel puts
        # the breakpoint in our mm only), must each fire once when we call it.
        libc_path = _libc_path()
        if libc_path is None:
            out.append(Check("uprobe", WARN, "not probed: no libc mapped in this process", ""))
            return out
        with ElfImage.open(libc_path) as img:
            sym = img.function("getppid")
            offset = img.vaddr_to_offset(sym.vaddr) if sym else None
        if offset is None:
            out.append(Check("uprobe", WARN, f"not probed: {libc_path} has no getppid symbol", ""))
            return out
        prog, counters = obj.program("update_key_enter"), obj.map("key_counters")
        ncpus = num_possible_cpus()
        before = _counter_sum(counters, abi.KCNT_MAX, ncpus)
        try:
            with prog.attach_uprobe(libc_path, offset, pid=os.getpid()), \
                    prog.attach_uprobe(libc_path, offset, pid=os.getpid(), retprobe=True):
                os.getppid()                # libc's getppid(), where the probes are
        except TlstapError as e:
            out.append(Check("uprobe", FAIL, f"attach to {libc_path}+{offset:#x} (getppid) failed: {_one_line(e)}",
                             "check /sys/bus/event_source/devices/uprobe exists (CONFIG_UPROBE_EVENTS=y)"))
            return out
        hits = _counter_sum(counters, abi.KCNT_MAX, ncpus) - before
        where = f"{os.path.basename(libc_path)} getppid (+{offset:#x}) in this process"
        if hits >= 2:
            out.append(Check("uprobe", OK, f"uprobe + uretprobe on {where}: attached, fired ({hits} hits), detached"))
        else:
            out.append(Check("uprobe", FAIL, f"uprobe + uretprobe on {where} attached but fired {hits} of 2 times",
                             "uprobes do not work here (seccomp or a sandbox?); report with `uname -r`"))
    return out


def _packets_and_tc(caps: int) -> list[Check]:
    from .. import abi
    from ..sources.base import CaptureConfig
    from ..errors import TlstapError
    from ..libbpf.object import kernel_has_func, kernel_has_tcx, num_possible_cpus
    from ..sources.packets import DIRECT_KFUNCS, MIN_RING, TC_ACT_UNSPEC, TC_PROGRAMS, load_object
    from ..sources.pktfilter import compile_filter

    if not (_has(caps, CAP_NET_ADMIN) or _has(caps, CAP_SYS_ADMIN)):
        return [Check("packets.bpf.o", WARN, "not probed (packets.bpf.o, TC): TC programs need CAP_NET_ADMIN "
                                             "(see cap_net_admin)", "add CAP_NET_ADMIN for -m pcapng")]
    direct = all(kernel_has_func(f) for f in DIRECT_KFUNCS)
    ingress = TC_PROGRAMS[direct][0]
    out = []
    t0 = time.monotonic()
    try:
        obj = load_object(CaptureConfig(mapsize=MIN_RING), compile_filter(""), 14, abi.PKT_CAP_MAX, False,
                          direct, [ingress])
    except TlstapError as e:
        return [Check("packets.bpf.o", FAIL, f"the kernel refused it: {_load_error(e)}",
                      "run `TLSTAP_DEBUG=1 tlstap tls -m pcapng -i lo` for the verifier log and report it"),
                Check("tc", WARN, "not probed: packets.bpf.o did not load", "see packets.bpf.o")]
    with obj:
        out.append(Check("packets.bpf.o", OK, f"{obj.path}: verified and loaded in "
                         f"{(time.monotonic() - t0) * 1000:.0f} ms ({ingress}: "
                         f"{'one-copy skb -> ring buffer' if direct else 'copy through a scratch buffer'})"))
        # a frame through the real program, nothing attached: BPF_PROG_TEST_RUN
        frame = (b"\x02\0\0\0\0\x02" b"\x02\0\0\0\0\x01" b"\x08\x00"              # Ethernet, IPv4
                 b"\x45\0\0\x28\0\x01\0\0\x40\x06\0\0" b"\x7f\0\0\x01\x7f\0\0\x01"  # IPv4 20 bytes, TCP
                 b"\x30\x39\x01\xbb" + bytes(8) + b"\x50\x02\x20\0\0\0\0\0")      # TCP SYN 12345 -> 443
        ncpus = num_possible_cpus()
        counters = obj.map("pkt_counters")
        before = sum(counters.lookup_percpu_u64(abi.PktCounter.PACKETS, ncpus))
        try:
            retval, _ns = obj.program(ingress).test_run(frame)
        except TlstapError as e:
            out.append(Check("tc", FAIL, f"BPF_PROG_TEST_RUN of {ingress}: {_one_line(e)}",
                             "report with `uname -r`"))
            return out
        seen = sum(counters.lookup_percpu_u64(abi.PktCounter.PACKETS, ncpus)) - before
        if retval == TC_ACT_UNSPEC and seen == 1:
            out.append(Check("tc", OK, f"sched_cls {ingress} ran on a test frame (BPF_PROG_TEST_RUN): captured "
                                       f"it, returned TC_ACT_UNSPEC (no verdict: other programs and filters "
                                       f"decide); nothing was attached"))
        else:
            out.append(Check("tc", FAIL, f"sched_cls {ingress} on a test frame returned {retval}, captured {seen}",
                             "report with `uname -r`"))
    if kernel_has_tcx():
        out.append(Check("tcx", OK, "-m pcapng attaches through tcx links (kernel 6.6+), which the kernel "
                                    "detaches when tlstap exits, even killed (SIGKILL)"))
    else:
        out.append(Check("tcx", INFO, "not in this kernel (6.6+): -m pcapng attaches cls_bpf filters on a clsact "
                                      "qdisc instead; if tlstap is killed (SIGKILL) they stay until `tc filter "
                                      "del`"))
    return out


# ---- libraries ---------------------------------------------------------------------------

def _other_tls_what(name: str, command: str | None) -> str:
    """What tlstap does with one of OTHER_TLS, from the CLI's own table of commands and modes."""
    from .capture import COMMANDS, modes_text
    if command in COMMANDS:
        return f"read by `tlstap {command}` ({modes_text(command)}), not by `tlstap tls`"
    if name == "Java":
        return ("Java's TLS (JSSE) runs in the JVM, not in a native library: no tlstap command "
                f"reads it (they are: {', '.join(COMMANDS)})")
    return f"no tlstap command reads {name} (they are: {', '.join(COMMANDS)})"


def openssl_checks(path: str, label: str, shown: str | None = None) -> list[Check]:
    """Version, probe placement and keylog layout of one OpenSSL file. `shown`: the path to
    print (a process's own view of a file we open through /proc/PID/root)."""
    from ..probes import openssl
    from ..probes.elf import ElfError
    from ..probes.openssl_keys import KeyLayoutUnknown, analyze_keys

    name = shown or path
    try:
        t = openssl.analyze(path)
    except openssl.NotOpenSSL:
        return [Check("libssl", FAIL, f"{name} ({label}): defines neither SSL_write nor SSL_write_ex: not OpenSSL",
                      "give --libssl a libssl.so.* or an executable with OpenSSL linked in (node)")]
    except ElfError as e:
        return [Check("libssl", FAIL, f"{name} ({label}): {_one_line(e)}", "give --libssl a readable x86-64 ELF file")]
    out = [Check("libssl", OK, f"{name} ({label}): {t.version or 'OpenSSL version unknown'}")]
    rw = [s for s in t.sites if s.role in ("read", "write")]
    sites = ", ".join(f"{s.symbol}({s.first_insn})" for s in rw)
    stepped = [s for s in rw if s.first_insn not in _EMULATED]
    if t.placement == "internal" and not stepped:
        out.append(Check("placement", OK, f"internal probes on push instructions: {sites}"))
    elif t.placement == "internal":
        out.append(Check("placement", WARN, f"internal probes, but single-stepped: {sites}",
                         "nothing to do: capture works at ~2.8 us per call instead of ~0.4"))
    else:
        cost = ("the API functions start with push, so each probe is cheap" if not stepped else
                "single-stepped probes cost ~2.8 us per call instead of ~0.4")
        out.append(Check("placement", WARN, f"api probes on {sites}: {t.reason}",
                         f"nothing to do: capture works ({cost}); report the build if it is a common one"))
    try:
        k = analyze_keys(path)
    except KeyLayoutUnknown as e:
        return out + [Check("keylog", FAIL, _one_line(e).replace(path, name),
                            "-m keylog and -m pcapng cannot read this build's secrets; text mode still works")]
    except ElfError as e:
        return out + [Check("keylog", FAIL, _one_line(e), "text mode still works")]
    updates = "key updates followed" if k.update_key is not None else "key updates not followed (no tls13_update_key)"
    out.append(Check("keylog", OK, f"client_random at +{k.client_random_off:#x}, server at +{k.server_off:#x}, "
                                   f"ssl_log_secret at {k.log_secret:#x}({k.log_secret_insn}); {updates}"))
    return out


def system_library_checks() -> list[Check]:
    from ..probes import discover
    try:
        path = discover.system_libssl()
    except discover.LibraryNotFound as e:
        return [Check("libssl", WARN, _one_line(e), "capture with --pid PID or --libssl PATH")]
    return openssl_checks(path, "system libssl, from the ld.so cache")


def other_tls_in_cache(cache: dict[str, str]) -> list[Check]:
    """Only what is installed: one INFO line per other TLS library present."""
    out = []
    for lib in OTHER_TLS:
        name, command = lib.name, lib.command
        if name == "Java":
            continue
        # the runtime name (libgnutls.so.30) before the development symlink (libgnutls.so)
        found = sorted((n for n in cache if lib.pattern.search(n)), key=lambda n: (n.endswith(".so"), n))
        if found:
            tail = "" if command else "; processes using it are not captured"
            out.append(Check(name.lower().replace(" ", ""), INFO,
                             f"{found[0]} installed ({cache[found[0]]}): {_other_tls_what(name, command)}{tail}"))
    return out


# ---- one process ---------------------------------------------------------------------------

def _status_fields(pid: int) -> dict[str, str]:
    out = {}
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _elf_facts(path: str, go_only: bool = False) -> dict:
    """What a binary is: Go (cheap: section names), else whether it defines SSL_write and which
    OpenSSL version string it holds (a symbol table scan: ~0.5 s on node)."""
    from ..probes.elf import ElfError, ElfImage
    from ..probes.openssl import detect_version
    facts = {"go": False, "ssl_symbol": False, "version": None}
    try:
        with ElfImage.open(path) as img:
            facts["go"] = any(img.elf.get_section_by_name(s) is not None for s in _GO_SECTIONS)
            if go_only:
                return facts
            if not facts["go"]:
                facts["ssl_symbol"] = any(img.function(s) for s in ("SSL_write", "SSL_write_ex"))
        if not facts["go"] and not facts["ssl_symbol"]:
            facts["version"] = detect_version(path)
    except (ElfError, OSError):
        pass
    return facts


def process_checks(pid: int) -> tuple[list[Check], bool]:
    """(checks, exists). A missing process is one line and nothing else."""
    from ..probes import discover

    st = _status_fields(pid)
    if pid <= 0 or not st:
        return [Check("process", FAIL, f"{pid}: no such process")], False
    comm = st.get("Name", "?")
    state = st.get("State", "?")
    if state.startswith(("Z", "X")):
        return [Check("process", FAIL, f"{pid} ({comm}) has exited ({state}): nothing to capture")], False
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        what = exe
    except OSError as e:
        exe = None
        what = "executable not readable (no access)" if e.errno == errno.EACCES else "no executable (kernel thread)"
    uids = st.get("Uid", "").split()
    uid = uids[0] if uids else "?"
    uid_note = f" (euid {uids[1]}; --uid matches the real uid)" if len(uids) > 1 and uids[1] != uid else ""
    out = [Check("process", OK, f"{pid} ({comm}): {what}, "
                                f"uid {uid}{uid_note}, state {state}: scope it with --pid {pid} or --uid {uid}")]

    # namespaces: files are opened through /proc/PID/root, the pid filter uses host pids
    try:
        ours, theirs = os.readlink("/proc/self/ns/mnt"), os.readlink(f"/proc/{pid}/ns/mnt")
        if ours == theirs:
            ns = "same mount namespace as tlstap"
        else:
            ns = f"own mount namespace (container or chroot): its files are opened through /proc/{pid}/root"
        nspid = st.get("NSpid", "").split()
        if len(nspid) > 1:
            ns += f"; pid {nspid[-1]} inside its pid namespace, {pid} here (use {pid})"
        out.append(Check("namespaces", OK, ns))
    except OSError as e:
        out.append(Check("namespaces", WARN, f"cannot read /proc/{pid}/ns/mnt: {e.strerror}",
                         "run as root (or with CAP_SYS_PTRACE)"))

    cg = next((l[3:] for l in (_read(f"/proc/{pid}/cgroup") or "").splitlines() if l.startswith("0::")), None)
    root = cgroup2_root()
    if cg is not None and root:
        d = os.path.normpath(root + cg)
        try:
            cid = os.stat(d).st_ino
            out.append(Check("cgroup", OK, f"{d} (id {cid}): scope it with --cgroup {d}"))
        except OSError:
            out.append(Check("cgroup", INFO, f"{cg} (not visible under {root} here: --cgroup cannot name it)"))
    else:
        out.append(Check("cgroup", WARN, "no cgroup v2 membership visible: --cgroup cannot scope this process",
                         "use --pid or --uid instead"))

    # its OpenSSL files, or why there are none
    try:
        libs = discover.libs_for_pid(pid)
    except discover.ProcessNotFound as e:
        fix = "run as root (or with CAP_SYS_PTRACE)" if "permission" in str(e) else ""
        out.append(Check("tls library", FAIL, _one_line(e), fix))
        return out, True
    except discover.LibraryNotFound:
        libs = []
    if libs:
        out.append(Check("tls library", OK, f"maps {len(libs)} OpenSSL file{'s' * (len(libs) > 1)}: "
                                            + ", ".join(m.path for m in libs)))
        for m in libs:
            out.extend(openssl_checks(m.host_path, f"mapped by {pid}", shown=m.path))
        return out, True
    out.extend(_why_no_openssl(pid, comm, exe))
    return out, True


def _why_no_openssl(pid: int, comm: str, exe: str | None) -> list[Check]:
    maps = _read(f"/proc/{pid}/maps") or ""
    mapped = {os.path.basename(l.split(maxsplit=5)[5]) for l in maps.splitlines() if len(l.split(maxsplit=5)) == 6}
    head = f"{pid} ({comm}) maps no OpenSSL"
    for lib in OTHER_TLS:
        name, command = lib.name, lib.command
        hit = sorted(n for n in mapped if lib.pattern.search(n))
        if hit and command:
            return [Check("tls library", WARN, f"{head}: it uses {name} ({hit[0]}), "
                                               f"{_other_tls_what(name, command)}",
                          f"tlstap {command} --pid {pid}")]
        if hit:
            return [Check("tls library", FAIL, f"{head}: it uses {name} ({hit[0]})", _other_tls_what(name, command))]
    exe_host = f"/proc/{pid}/exe"
    facts = _elf_facts(exe_host) if exe else {"go": False, "ssl_symbol": False, "version": None}
    if facts["go"]:
        from .capture import modes_text
        return [Check("tls library", WARN, f"{head}: {exe} is a Go binary (crypto/tls is Go code, not OpenSSL), "
                                           f"read by `tlstap gotls` ({modes_text('gotls')})",
                      f"tlstap gotls --pid {pid}")]
    if facts["ssl_symbol"]:
        return [Check("tls library", WARN, f"{head} library, but {exe} itself defines SSL_write",
                      f"tlstap tls --libssl /proc/{pid}/exe")]
    if facts["version"]:
        return [Check("tls library", FAIL, f"{head} library; {exe} contains {facts['version']} linked in, but "
                                           f"stripped of the SSL_* symbols tlstap needs to place probes",
                      "use a build that keeps its symbol table (or exports SSL_*), then --libssl /proc/PID/exe")]
    if any(n.startswith(("libcrypto.so", "libcrypto-")) for n in mapped):
        return [Check("tls library", FAIL, f"{head}: it maps libcrypto but not libssl (crypto without TLS, "
                                           f"e.g. ssh, or TLS done by another library)",
                      "nothing to capture with `tlstap tls` in this process")]
    return [Check("tls library", FAIL, f"{head} and no other TLS library: it does no TLS in-process "
                                       f"(yet: Python and others load libssl on first use)",
                  "if it loads TLS later, run `tlstap doctor --pid` again after its first connection; "
                  "if a proxy does its TLS, look at that process")]


# ---- what leaves the host ----------------------------------------------------------------

def export_check(url: str) -> list[Check]:
    """--export URL: the JetStream server answers and a stream holds the subject (the capture
    refuses to start otherwise)."""
    from ..export import nats
    try:
        target = nats.parse_url(url)
        return [Check("export", OK, f"{target.url}: {nats.check_target(target)}")]
    except nats.ExportTargetError as e:
        return [Check("export", FAIL, str(e), "start the server or create the stream (README: Exporting to NATS "
                                              "JetStream)")]


def metrics_check(addr: str) -> list[Check]:
    """--metrics-addr ADDR: the address parses and can be bound now."""
    from ..errors import TlstapError
    from ..metrics import server
    try:
        return [Check("metrics", OK, server.check_addr(addr))]
    except TlstapError as e:
        return [Check("metrics", FAIL, str(e), "choose a free port (--metrics-addr HOST:PORT)")]


# ---- the report --------------------------------------------------------------------------

def collect(pid: int | None = None, libssl: list[str] | None = None, export: str | None = None,
            metrics_addr: str | None = None) -> list[Check]:
    """Every check, in report order. Never raises for a problem it finds."""
    head: list[Check] = []
    if pid is not None:
        try:
            head, exists = process_checks(pid)
        except Exception as e:  # noqa: BLE001 - the report must complete
            head, exists = [Check("process", FAIL, f"check crashed: {type(e).__name__}: {_one_line(e)}",
                                  "report this as a tlstap bug, with this line")], True
        if not exists:
            return head
    checks: list[Check] = []
    caps = _caps()
    kernel = kernel_version(os.uname().release)
    _guard(checks, "kernel", kernel_checks)
    _guard(checks, "btf", btf_check)
    _guard(checks, "capabilities", lambda: capability_checks(caps))
    _guard(checks, "mounts", lambda: mount_checks(caps))
    _guard(checks, "sysctl", lambda: sysctl_checks(caps, kernel))
    _guard(checks, "spool", spool_check)
    _guard(checks, "pcapng encoder", native_check)
    _guard(checks, "huge pages", huge_pages_check)
    _guard(checks, "probes", lambda: probe_checks(caps))
    from ..probes import discover
    cache: dict[str, str] = {}
    if pid is None:
        _guard(checks, "ld.so cache", lambda: cache.update(discover.ld_cache()) or [])
        _guard(checks, "libssl", system_library_checks)
    for p in libssl or []:
        if not os.path.exists(p):
            checks.append(Check("libssl", FAIL, f"--libssl {p}: no such file", "give the path of a libssl.so.* "
                                                                                 "or a static binary"))
            continue
        if _elf_facts(p, go_only=True)["go"]:
            checks.append(Check("libssl", FAIL, f"{p} (--libssl): a Go binary: its TLS is Go's crypto/tls",
                                f"tlstap gotls --elfpath {p}"))
            continue
        _guard(checks, "libssl", lambda p=p: openssl_checks(p, "--libssl"))
    if pid is None:
        _guard(checks, "other tls", lambda: other_tls_in_cache(cache))
    else:
        checks.extend(head)
    if export is not None:
        _guard(checks, "export", lambda: export_check(export))
    if metrics_addr is not None:
        _guard(checks, "metrics", lambda: metrics_check(metrics_addr))
    # lockdown unreadable (no securityfs) but the objects loaded: it is not confidentiality
    loaded = any(c.check == "openssl.bpf.o" and c.status in (OK, WARN) and "loaded" in c.detail for c in checks)
    return [Check(c.check, OK, "not confidentiality: the BPF objects below loaded (securityfs is not mounted, so "
                               "the mode itself cannot be read)")
            if c.check == "lockdown" and c.status == INFO and loaded else c for c in checks]


def render_text(checks: list[Check]) -> str:
    width = max((len(c.check) for c in checks), default=0)
    lines = []
    for c in checks:
        lines.append(f"{c.status:<5} {c.check:<{width}}  {c.detail}")
        if c.fix and c.status in (WARN, FAIL):
            lines.append(f"{'':<5} {'':<{width}}  fix: {c.fix}")
    return "\n".join(lines) + "\n"


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


def run_doctor(pid: int | None, as_json: bool, libssl: list[str], export: str | None = None,
               metrics_addr: str | None = None) -> int:
    """Print the report to stdout; 0 if nothing FAILed, else 1."""
    t0 = time.monotonic()
    checks = collect(pid, libssl, export, metrics_addr)
    if as_json:
        sys.stdout.write(json.dumps([asdict(c) for c in checks], indent=1) + "\n")
    else:
        sys.stdout.write(render_text(checks))
        if len(checks) > 1:
            n = {s: sum(c.status == s for c in checks) for s in (OK, INFO, WARN, FAIL)}
            sys.stdout.write(f"{n[OK]} OK, {n[INFO]} INFO, {n[WARN]} WARN, {n[FAIL]} FAIL "
                             f"in {time.monotonic() - t0:.2f}s\n")
    sys.stdout.flush()
    return exit_code(checks)


def add_parsers(subparsers) -> argparse.ArgumentParser:
    """`tlstap doctor`: adds the subcommand; args.func(args) runs it and returns the exit code."""
    p = subparsers.add_parser("doctor", help="check this host (and a process) for what tlstap needs",
                              description="Check, by trying, what tlstap needs on this host: kernel, "
                                          "privileges, mounts, the BPF objects, uprobes, TC, the OpenSSL "
                                          "libraries. Attaches nothing outside its own process.")
    p.add_argument("-p", "--pid", type=int, help="also explain what tlstap can see of this process")
    p.add_argument("--json", action="store_true", help="a JSON list of {check, status, detail, fix}")
    p.add_argument("--libssl", action="append", metavar="PATH", default=[],
                   help="also analyse this libssl.so or static executable (repeatable)")
    p.add_argument("--export", metavar="URL",
                   help="also check this export target: the server answers, a JetStream stream holds the subject")
    p.add_argument("--metrics-addr", metavar="HOST:PORT", help="also check that this metrics address can be served")
    p.set_defaults(func=lambda args: run_doctor(args.pid, args.json, args.libssl, args.export, args.metrics_addr))
    return p

