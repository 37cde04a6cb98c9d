"""Checks that must pass before any BPF work, each failing with one actionable line."""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile

from .errors import EnvironmentProblem

#: capability numbers (linux/capability.h)
CAP_NET_ADMIN, CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 19, 21, 38, 39
BTF_PATH = os.environ.get("TLSTAP_BTF_PATH", "/sys/kernel/btf/vmlinux")  # override: tests, odd distros
TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
#: Linux 6.16 made uprobes ask for CAP_SYS_ADMIN again (commit ba677dbe77af "perf: Revert to
#: requiring CAP_SYS_ADMIN for uprobes", also in 2025's stable kernels): from there, CAP_BPF +
#: CAP_PERFMON load the programs but perf_event_open refuses the uprobe (EACCES). Every capture
#: command has uprobes (the key probes of the wire source, pcapng and keylog too).
UPROBES_NEED_SYS_ADMIN_SINCE = (6, 16)
SETCAP_HINT = "run as root, or `setcap cap_sys_admin,cap_bpf,cap_perfmon,cap_sys_ptrace+eip` on the interpreter"


def kernel_version(release: str | None = None) -> tuple[int, int, int]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release or os.uname().release)
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else (0, 0, 0)


def privilege_problem(caps: int, kernel: tuple[int, int, int]) -> str | None:
    """Why these capabilities cannot load BPF programs and attach uprobes on this kernel, or None."""
    has = lambda c: bool(caps >> c & 1)  # noqa: E731
    if has(CAP_SYS_ADMIN):
        return None
    missing = [n for c, n in ((CAP_BPF, "CAP_BPF"), (CAP_PERFMON, "CAP_PERFMON")) if not has(c)]
    if missing:
        return f"needs root, or {' and '.join(missing)} (kernel >= 5.8), to load BPF programs"
    if kernel[:2] >= UPROBES_NEED_SYS_ADMIN_SINCE:
        return (f"needs CAP_SYS_ADMIN: since Linux 6.16 uprobes ask for it again, and CAP_BPF + "
                f"CAP_PERFMON no longer attach them (this kernel is {'.'.join(map(str, kernel))})")
    return None


def effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    problem = privilege_problem(effective_caps(), kernel_version())
    if problem:
        raise EnvironmentProblem(f"{problem}; {SETCAP_HINT}")


def check_btf() -> None:
    if not os.path.exists(BTF_PATH):
        raise EnvironmentProblem(
            f"no kernel BTF at {BTF_PATH}: tlstap's CO-RE programs need a kernel built with "
            f"CONFIG_DEBUG_INFO_BTF=y (most distribution kernels >= 5.4 have it)")


def tracefs_dir() -> str | None:
    for d in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(d, "events")):
            return d
    return None


def ensure_tracefs() -> str:
    """Syscall tracepoints are looked up in tracefs; mount it if nobody has."""
    d = tracefs_dir()
    if d:
        return d
    target = TRACEFS_DIRS[0]
    r = subprocess.run(["mount", "-t", "tracefs", "nodev", target], capture_output=True, text=True)
    if r.returncode == 0 and tracefs_dir():
        return target
    raise EnvironmentProblem(
        f"tracefs is not mounted and `mount -t tracefs nodev {target}` failed "
        f"({(r.stderr or r.stdout).strip() or 'exit ' + str(r.returncode)}); "
        f"mount it, or give the container /sys/kernel/tracing")


def cgroup2_root() -> str | None:
    """Where the cgroup v2 hierarchy's root is mounted: /sys/fs/cgroup on a unified host,
    /sys/fs/cgroup/unified on a hybrid one (systemd's), None if nowhere."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[sep + 1] == "cgroup2" and fields[3] == "/":
                    return fields[4].replace("\\040", " ")
    except (OSError, ValueError, IndexError):
        pass
    return None


@contextlib.contextmanager
def cgroup2_mounted():
    """The cgroup v2 root's directory: the host's mount, or, on a host that mounts none, a
    private mount made for the caller and removed when it is done (a BPF link holds the
    cgroup it was attached to, not the mount)."""
    root = cgroup2_root()
    if root:
        yield root
        return
    d = tempfile.mkdtemp(prefix="tlstap-cgroup2-")
    r = subprocess.run(["mount", "-t", "cgroup2", "none", d], capture_output=True, text=True)
    if r.returncode:
        os.rmdir(d)
        raise EnvironmentProblem(
            f"no cgroup v2 hierarchy is mounted and `mount -t cgroup2 none {d}` failed "
            f"({(r.stderr or r.stdout).strip() or 'exit ' + str(r.returncode)}): the wire source attaches "
            f"to a cgroup; mount cgroup2, or use --source probe")
    try:
        yield d
    finally:
        subprocess.run(["umount", d], capture_output=True)
        os.rmdir(d)


def check_all() -> None:
    check_privileges()
    check_btf()
    ensure_tracefs()
