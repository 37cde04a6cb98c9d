"""Read what BPF objects the kernel holds: programs and links by id, and what a process's
perf event fd runs. These are the calls bpftool's `prog`, `link` and `perf` listings make.

The structs mirror the kernel UAPI (include/uapi/linux/bpf.h) as this kernel's BTF has them;
tests/unit/test_detect_abi.py compares every field offset and the sizes with
`bpftool btf dump file /sys/kernel/btf/vmlinux`. The kernel accepts an info struct shorter or
longer than its own (it copies min(len, its size) and checks the tail is zero), so a newer
kernel with more fields only means we do not see them.

Opening an object by id needs CAP_SYS_ADMIN; BPF_TASK_FD_QUERY needs it too.
"""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Iterator

from ._lib import lib

u8, u32, s32, u64 = ctypes.c_uint8, ctypes.c_uint32, ctypes.c_int32, ctypes.c_uint64

# enum bpf_link_type
LINK_RAW_TRACEPOINT, LINK_TRACING, LINK_CGROUP, LINK_ITER, LINK_NETNS, LINK_XDP = 1, 2, 3, 4, 5, 6
LINK_PERF_EVENT, LINK_KPROBE_MULTI, LINK_STRUCT_OPS, LINK_NETFILTER, LINK_TCX = 7, 8, 9, 10, 11
LINK_UPROBE_MULTI, LINK_NETKIT = 12, 13
# enum bpf_perf_event_type
PERF_EVENT_UPROBE, PERF_EVENT_URETPROBE = 1, 2
# enum bpf_task_fd_type
FD_TYPE_UPROBE, FD_TYPE_URETPROBE = 4, 5
# uprobe_multi flags
F_UPROBE_MULTI_RETURN = 1
# enum bpf_attach_type (the ones detect names)
ATTACH_NAMES = {0: "ingress", 1: "egress", 37: "xdp", 46: "ingress", 47: "egress"}
CGROUP_INET_INGRESS, CGROUP_INET_EGRESS = 0, 1
# enum bpf_prog_type (the ones detect names)
PROG_TYPE_NAMES = {1: "socket_filter", 2: "kprobe", 3: "sched_cls", 4: "sched_act", 5: "tracepoint", 6: "xdp",
                   7: "perf_event", 8: "cgroup_skb", 17: "raw_tracepoint", 26: "tracing"}


class _Uprobe(ctypes.Structure):
    _fields_ = [("file_name", u64), ("name_len", u32), ("offset", u32), ("cookie", u64), ("ref_ctr_offset", u64)]


class _Kprobe(ctypes.Structure):
    _fields_ = [("func_name", u64), ("name_len", u32), ("offset", u32), ("addr", u64), ("missed", u64),
                ("cookie", u64)]


class _PerfUnion(ctypes.Union):
    _fields_ = [("uprobe", _Uprobe), ("kprobe", _Kprobe)]


class _PerfEvent(ctypes.Structure):
    _anonymous_ = ("u",)
    _fields_ = [("type", u32), ("u", _PerfUnion)]


class _UprobeMulti(ctypes.Structure):
    _fields_ = [("path", u64), ("offsets", u64), ("ref_ctr_offsets", u64), ("cookies", u64),
                ("path_size", u32), ("count", u32), ("flags", u32), ("pid", u32)]


class _Cgroup(ctypes.Structure):
    _fields_ = [("cgroup_id", u64), ("attach_type", u32)]


class _IfAttach(ctypes.Structure):
    """tcx and netkit: an interface and ingress/egress."""
    _fields_ = [("ifindex", u32), ("attach_type", u32)]


class _Xdp(ctypes.Structure):
    _fields_ = [("ifindex", u32)]


class _LinkUnion(ctypes.Union):
    _fields_ = [("cgroup", _Cgroup), ("xdp", _Xdp), ("uprobe_multi", _UprobeMulti),
                ("perf_event", _PerfEvent), ("tcx", _IfAttach), ("netkit", _IfAttach),
                ("_size", u8 * 48)]          # the kernel's union is 48 bytes (its largest member)


class BpfLinkInfo(ctypes.Structure):
    """struct bpf_link_info: the members detect reads of its union."""
    _anonymous_ = ("u",)
    _fields_ = [("type", u32), ("id", u32), ("prog_id", u32), ("u", _LinkUnion)]


class BpfProgInfo(ctypes.Structure):
    """struct bpf_prog_info, whole."""
    _fields_ = [
        ("type", u32), ("id", u32), ("tag", u8 * 8), ("jited_prog_len", u32), ("xlated_prog_len", u32),
        ("jited_prog_insns", u64), ("xlated_prog_insns", u64), ("load_time", u64), ("created_by_uid", u32),
        ("nr_map_ids", u32), ("map_ids", u64), ("name", ctypes.c_char * 16), ("ifindex", u32),
        ("gpl_compatible", u32, 1), ("netns_dev", u64), ("netns_ino", u64), ("nr_jited_ksyms", u32),
        ("nr_jited_func_lens", u32), ("jited_ksyms", u64), ("jited_func_lens", u64), ("btf_id", u32),
        ("func_info_rec_size", u32), ("func_info", u64), ("nr_func_info", u32), ("nr_line_info", u32),
        ("line_info", u64), ("jited_line_info", u64), ("nr_jited_line_info", u32),
        ("line_info_rec_size", u32), ("jited_line_info_rec_size", u32), ("nr_prog_tags", u32),
        ("prog_tags", u64), ("run_time_ns", u64), ("run_cnt", u64), ("recursion_misses", u64),
        ("verified_insns", u32), ("attach_btf_obj_id", u32), ("attach_btf_id", u32),
    ]


_P32 = ctypes.POINTER(u32)
_P64 = ctypes.POINTER(u64)
for _fn, _res, _args in (
        ("bpf_link_get_next_id", ctypes.c_int, [u32, _P32]),
        ("bpf_prog_get_next_id", ctypes.c_int, [u32, _P32]),
        ("bpf_link_get_fd_by_id", ctypes.c_int, [u32]),
        ("bpf_prog_get_fd_by_id", ctypes.c_int, [u32]),
        ("bpf_obj_get_info_by_fd", ctypes.c_int, [ctypes.c_int, ctypes.c_void_p, _P32]),
        ("bpf_task_fd_query", ctypes.c_int, [ctypes.c_int, ctypes.c_int, u32, ctypes.c_char_p, _P32, _P32, _P32,
                                              _P64, _P64]),
        ("bpf_prog_query", ctypes.c_int, [ctypes.c_int, ctypes.c_int, u32, _P32, _P32, _P32]),
        ("bpf_obj_get", ctypes.c_int, [ctypes.c_char_p])):
    getattr(lib, _fn).restype, getattr(lib, _fn).argtypes = _res, _args

_PATH_MAX = 4096


def _ids(next_id) -> Iterator[int]:
    cur, nxt = u32(0), u32(0)
    while next_id(cur, ctypes.byref(nxt)) == 0:      # -ENOENT after the last one
        yield nxt.value
        cur.value = nxt.value


def link_ids() -> Iterator[int]:
    return _ids(lib.bpf_link_get_next_id)


def prog_ids() -> Iterator[int]:
    return _ids(lib.bpf_prog_get_next_id)


def _info(fd: int, info: ctypes.Structure) -> bool:
    n = u32(ctypes.sizeof(info))
    return lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)) == 0


@dataclass(frozen=True)
class Link:
    """One BPF link as the kernel reports it. For uprobes: `path`, and one (offset, cookie) per
    probe in `probes` (a perf_event link has one, an uprobe_multi link many)."""
    id: int
    type: int
    prog_id: int
    retprobe: bool = False
    path: str | None = None
    probes: tuple[tuple[int, int], ...] = ()
    uprobe_pid: int = 0                 # uprobe_multi's pid filter (0: every process)
    perf_type: int = 0                  # for perf_event links: enum bpf_perf_event_type
    cgroup_id: int = 0
    ifindex: int = 0
    attach_type: int = 0


def link(link_id: int) -> Link | None:
    """The link with this id, None if it went away (or cannot be opened)."""
    fd = lib.bpf_link_get_fd_by_id(link_id)
    if fd < 0:
        return None
    try:
        info = BpfLinkInfo()
        if not _info(fd, info):
            return None
        if info.type == LINK_PERF_EVENT:
            return _perf_link(fd, info)
        if info.type == LINK_UPROBE_MULTI:
            return _uprobe_multi_link(fd, info)
        kw = {}
        if info.type == LINK_CGROUP:
            kw = dict(cgroup_id=info.cgroup.cgroup_id, attach_type=info.cgroup.attach_type)
        elif info.type in (LINK_TCX, LINK_NETKIT):
            kw = dict(ifindex=info.tcx.ifindex, attach_type=info.tcx.attach_type)
        elif info.type == LINK_XDP:
            kw = dict(ifindex=info.xdp.ifindex)
        return Link(info.id, info.type, info.prog_id, **kw)
    finally:
        os.close(fd)


def _perf_link(fd: int, info: BpfLinkInfo) -> Link:
    # the second call fills the file name; the kernel wants the buffer and its size up front
    perf_type = info.perf_event.type
    if perf_type not in (PERF_EVENT_UPROBE, PERF_EVENT_URETPROBE):
        return Link(info.id, info.type, info.prog_id, perf_type=perf_type)
    buf = ctypes.create_string_buffer(_PATH_MAX)
    info2 = BpfLinkInfo()
    info2.perf_event.uprobe.file_name = ctypes.addressof(buf)
    info2.perf_event.uprobe.name_len = _PATH_MAX
    if _info(fd, info2):
        info = info2
    up = info.perf_event.uprobe
    return Link(info.id, info.type, info.prog_id, retprobe=perf_type == PERF_EVENT_URETPROBE,
                path=buf.value.decode(errors="replace") or None, probes=((up.offset, up.cookie),),
                perf_type=perf_type)


def _uprobe_multi_link(fd: int, info: BpfLinkInfo) -> Link:
    count = info.uprobe_multi.count
    path = ctypes.create_string_buffer(_PATH_MAX)
    offsets, cookies = (u64 * max(count, 1))(), (u64 * max(count, 1))()
    info2 = BpfLinkInfo()
    um = info2.uprobe_multi
    um.path, um.path_size = ctypes.addressof(path), _PATH_MAX
    um.offsets, um.cookies, um.count = ctypes.addressof(offsets), ctypes.addressof(cookies), count
    if _info(fd, info2):
        info = info2
    um = info.uprobe_multi
    return Link(info.id, info.type, info.prog_id, retprobe=bool(um.flags & F_UPROBE_MULTI_RETURN),
                path=path.value.decode(errors="replace") or None,
                probes=tuple((offsets[i], cookies[i]) for i in range(min(count, um.count))), uprobe_pid=um.pid)


def prog(prog_id: int) -> BpfProgInfo | None:
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        info = BpfProgInfo()
        return info if _info(fd, info) else None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TaskFd:
    """What BPF_TASK_FD_QUERY says of one fd of a process: a perf event (or raw tracepoint)
    running program `prog_id`; for uprobes, the file and the offset in it."""
    prog_id: int
    fd_type: int
    name: str
    offset: int
    addr: int


def task_fd_query(pid: int, fd: int) -> TaskFd | None:
    """None when the fd carries no BPF program (or is gone)."""
    buf = ctypes.create_string_buffer(_PATH_MAX)
    n, prog_id, fd_type = u32(_PATH_MAX), u32(), u32()
    off, addr = u64(), u64()
    if lib.bpf_task_fd_query(pid, fd, 0, buf, ctypes.byref(n), ctypes.byref(prog_id), ctypes.byref(fd_type),
                             ctypes.byref(off), ctypes.byref(addr)) != 0:
        return None
    return TaskFd(prog_id.value, fd_type.value, buf.value.decode(errors="replace"), off.value, addr.value)


def prog_query(target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to a cgroup (or other target) for one attach type."""
    ids = (u32 * 64)()
    cnt, flags = u32(64), u32()
    if lib.bpf_prog_query(target_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(cnt)) != 0:
        return []
    return list(ids[:cnt.value])


def pinned_ids(path: str) -> tuple[int, int] | None:
    """(link id, prog id) of a file in a BPF filesystem (0 where it is not one), None for a map
    or a file that is no BPF object."""
    fd = lib.bpf_obj_get(path.encode())
    if fd < 0:
        return None
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            info = dict(ln.split(":", 1) for ln in f.read().splitlines() if ":" in ln)
    finally:
        os.close(fd)
    link_id, prog_id = int(info.get("link_id", 0)), int(info.get("prog_id", 0))
    return (link_id, prog_id) if link_id or prog_id else None


__all__ = ["BpfLinkInfo", "BpfProgInfo", "Link", "TaskFd", "link", "link_ids", "pinned_ids", "prog", "prog_ids",
           "prog_query", "task_fd_query"]
