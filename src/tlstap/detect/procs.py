"""The processes of this host as /proc shows them: who they are, and which of their fds are BPF
links, BPF programs, perf events and sockets. One pass over /proc/*/fd, done before detect
opens any BPF object itself, so its own fds never show up as holders.

A process can exit between two reads: every read tolerates that (it then has no fds).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def boot_ns_to_wall(ns: int) -> float:
    """CLOCK_BOOTTIME nanoseconds (bpf_prog_info.load_time) to a Unix time."""
    return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + ns / 1e9


def read(path: str, mode: str = "r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except (OSError, ValueError):
        return None


@dataclass
class Proc:
    pid: int
    comm: str
    exe: str | None
    uid: int | None
    start: float | None                  # Unix time the process started
    #: fd -> what readlink says ("anon_inode:bpf-link", "socket:[123]", ...), only the kinds detect reads
    fds: dict[int, str] = field(default_factory=dict)

    def owner(self) -> dict:
        return {"pid": self.pid, "comm": self.comm, "exe": self.exe, "uid": self.uid}

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.comm}, uid {self.uid}, {self.exe or '?'})"

    def fdinfo(self, fd: int) -> dict[str, str]:
        text = read(f"/proc/{self.pid}/fdinfo/{fd}") or ""
        return dict(ln.split(":", 1) for ln in text.splitlines() if ":" in ln)

    def environ(self) -> dict[str, str] | None:
        raw = read(f"/proc/{self.pid}/environ", "rb")
        if raw is None:
            return None
        env = {}
        for item in raw.split(b"\0"):
            k, sep, v = item.partition(b"=")
            if sep:
                env[k.decode(errors="replace")] = v.decode(errors="replace")
        return env

    def mapped_files(self) -> set[str]:
        text = read(f"/proc/{self.pid}/maps") or ""
        return {parts[5] for parts in (ln.split(None, 5) for ln in text.splitlines())
                if len(parts) == 6 and parts[5].startswith("/")}


#: link fds are "bpf-link" or, for links that can be polled (6.x), "bpf_link"
_WANTED = ("anon_inode:bpf-link", "anon_inode:bpf_link", "anon_inode:bpf-prog", "anon_inode:[perf_event]", "socket:[")


def _proc(pid: int) -> Proc | None:
    stat = read(f"/proc/{pid}/stat")
    if not stat:
        return None
    # comm is in parentheses and may itself hold spaces or parentheses: split at the last ')'
    comm = stat[stat.index("(") + 1: stat.rindex(")")]
    rest = stat[stat.rindex(")") + 2:].split()
    start = boot_ns_to_wall(int(rest[19]) * 1_000_000_000 // _CLK_TCK) if len(rest) > 19 else None
    uid = None
    for ln in (read(f"/proc/{pid}/status") or "").splitlines():
        if ln.startswith("Uid:"):
            uid = int(ln.split()[1])
            break
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None                        # a kernel thread, or gone
    p = Proc(pid, comm, exe, uid, start)
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return p
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith(_WANTED):
            p.fds[int(name)] = target
    return p


def scan() -> dict[int, Proc]:
    me = os.getpid()
    procs = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me:
            p = _proc(int(name))
            if p is not None:
                procs[p.pid] = p
    return procs


@dataclass
class Holders:
    """Who holds which BPF object: link id -> processes, prog id -> processes (through a prog
    fd, or through a link fd whose program it is), socket inode -> processes."""
    links: dict[int, list[Proc]] = field(default_factory=dict)
    progs: dict[int, list[Proc]] = field(default_factory=dict)
    sockets: dict[int, list[Proc]] = field(default_factory=dict)
    perf_fds: list[tuple[Proc, int]] = field(default_factory=list)
    #: link id / prog id -> the paths it is pinned at in a BPF filesystem
    pinned_links: dict[int, list[str]] = field(default_factory=dict)
    pinned_progs: dict[int, list[str]] = field(default_factory=dict)

    def of_prog(self, prog_id: int) -> list[Proc]:
        return self.progs.get(prog_id, [])


def _add(d: dict, key: int, p: Proc) -> None:
    lst = d.setdefault(key, [])
    if p not in lst:
        lst.append(p)


def holders(procs: dict[int, Proc]) -> Holders:
    h = Holders()
    for p in procs.values():
        for fd, target in p.fds.items():
            if target.startswith("socket:["):
                _add(h.sockets, int(target[8:-1]), p)
            elif target == "anon_inode:[perf_event]":
                h.perf_fds.append((p, fd))
            else:
                info = p.fdinfo(fd)
                if "link_id" in info:
                    _add(h.links, int(info["link_id"]), p)
                if "prog_id" in info:
                    _add(h.progs, int(info["prog_id"]), p)
    _pins(h)
    return h


def bpffs_mounts() -> list[str]:
    mounts = []
    for ln in (read("/proc/self/mountinfo") or "").splitlines():
        fields = ln.split()
        if "-" in fields and fields[fields.index("-") + 1] == "bpf":
            mounts.append(fields[4].replace("\\040", " "))
    return mounts


def _pins(h: Holders) -> None:
    """Links and programs pinned in a BPF filesystem: they live without a process."""
    from ..libbpf import introspect
    for mount in bpffs_mounts():
        for d, _subdirs, files in os.walk(mount):
            for name in files:
                path = os.path.join(d, name)
                ids = introspect.pinned_ids(path)
                if ids is None:
                    continue
                link_id, prog_id = ids
                if link_id:
                    h.pinned_links.setdefault(link_id, []).append(path)
                elif prog_id:
                    h.pinned_progs.setdefault(prog_id, []).append(path)
