"""BpfObject, Program and Map: an ELF object from open to close.

A BpfObject owns its libbpf object; Programs and Maps are views that live as
long as it. close() is idempotent and also runs on `with` exit.
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from typing import Iterator

from ..errors import AttachError, LoadError
from . import _lib, btf
from ._lib import lib
from .link import Attachment

# libbpf reports through one process-wide print callback. We keep recent
# warnings so a failed load can show the verifier's words.
_log_lock = threading.Lock()
_log: list[str] = []
_LOG_KEEP = 2000  # lines; a verifier log for one program fits easily


@_lib.PRINT_FN
def _print(level: int, fmt: bytes, args: int) -> int:
    if level > 1:  # LIBBPF_DEBUG
        return 0
    buf = ctypes.create_string_buffer(1 << 20)  # a verifier log arrives as one message
    _lib.libc.vsnprintf(buf, len(buf), fmt, args)
    with _log_lock:
        _log.extend(buf.value.decode(errors="replace").rstrip("\n").split("\n"))
        del _log[:-_LOG_KEEP]
    return 0


lib.libbpf_set_print(_print)


def _take_log() -> str:
    with _log_lock:
        out = "\n".join(_log)
        _log.clear()
    return out


#: enum bpf_attach_type values of the tcx hooks (kernel 6.6+), newer than libbpf 1.1's headers
BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47
#: ... and of the cgroup skb hooks
BPF_CGROUP_INET_INGRESS, BPF_CGROUP_INET_EGRESS = 0, 1


def kernel_has_func(name: str) -> bool:
    """Whether the running kernel's BTF describes a function `name` (kfuncs, helpers' impls)."""
    return btf.kernel_has(name, btf.BTF_KIND_FUNC)


def kernel_has_tracepoint(name: str) -> bool:
    """Whether tp_btf/`name` can attach: the kernel's BTF has the tracepoint's btf_trace_ typedef."""
    return btf.kernel_has(f"btf_trace_{name}", btf.BTF_KIND_TYPEDEF)


def kernel_has_tcx() -> bool:
    """Whether this kernel attaches TC programs through tcx links (6.6+)."""
    return kernel_has_func("tcx_link_attach")


def probe_map_type(map_type: int) -> int:
    """libbpf's feature probe: 1 the kernel creates maps of `map_type`, 0 not, < 0 an error."""
    return lib.libbpf_probe_bpf_map_type(map_type, None)


def num_possible_cpus() -> int:
    """Slots of a per-CPU map (CPUs that may ever come online)."""
    return lib.libbpf_num_possible_cpus()


class Map:
    def __init__(self, ptr: int, owner: "BpfObject"):
        self._ptr, self._owner = ptr, owner

    @property
    def name(self) -> str:
        return lib.bpf_map__name(self._ptr).decode()

    @property
    def fd(self) -> int:
        return lib.bpf_map__fd(self._ptr)

    @property
    def max_entries(self) -> int:
        return lib.bpf_map__max_entries(self._ptr)

    @max_entries.setter
    def max_entries(self, n: int) -> None:
        if lib.bpf_map__set_max_entries(self._ptr, n):
            raise LoadError(_lib.err(f"set max_entries of map {self.name} to {n}"))

    @property
    def value_size(self) -> int:
        return lib.bpf_map__value_size(self._ptr)

    def initial_value(self, ctype: type) -> ctypes.Structure:
        """A ctypes view of the map's initial data (.rodata/.data), writable until load()."""
        size = ctypes.c_size_t()
        p = lib.bpf_map__initial_value(self._ptr, ctypes.byref(size))
        if not p or size.value < ctypes.sizeof(ctype):
            raise LoadError(f"map {self.name} has no initial value of {ctypes.sizeof(ctype)} bytes")
        return ctype.from_address(p)

    def update(self, key: ctypes.Structure | ctypes._SimpleCData, value: ctypes.Structure,
               flags: int = 0) -> bool:
        """bpf_map_update_elem; flags BPF_ANY (0), BPF_NOEXIST (1), BPF_EXIST (2).

        Returns False when BPF_NOEXIST found the key already there; raises otherwise."""
        if lib.bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value), flags):
            if flags == BPF_NOEXIST and ctypes.get_errno() == errno.EEXIST:
                return False
            raise LoadError(_lib.err(f"update map {self.name}"))
        return True

    def delete(self, key: ctypes.Structure | ctypes._SimpleCData) -> bool:
        """bpf_map_delete_elem; False if the key was not there."""
        return lib.bpf_map_delete_elem(self.fd, ctypes.byref(key)) == 0

    def lookup_percpu_u64(self, key: int, ncpus: int) -> list[int]:
        """Per-CPU values of a u64 PERCPU_ARRAY slot."""
        k = ctypes.c_uint32(key)
        vals = (ctypes.c_uint64 * ncpus)()
        if lib.bpf_map_lookup_elem(self.fd, ctypes.byref(k), vals):
            raise LoadError(_lib.err(f"lookup in map {self.name}"))
        return list(vals)

    def counter_sums(self, counters, ncpus: int) -> dict[str, int]:
        """{name.lower(): total over CPUs} of a PERCPU_ARRAY of u64 counters indexed by the
        IntEnum `counters` (abi.Counter, abi.KeyCounter, ...)."""
        return {c.name.lower(): sum(self.lookup_percpu_u64(c, ncpus)) for c in counters}


class Program:
    def __init__(self, ptr: int, owner: "BpfObject"):
        self._ptr, self._owner = ptr, owner

    @property
    def name(self) -> str:
        return lib.bpf_program__name(self._ptr).decode()

    @property
    def autoload(self) -> bool:
        return bool(lib.bpf_program__autoload(self._ptr))

    @autoload.setter
    def autoload(self, on: bool) -> None:
        lib.bpf_program__set_autoload(self._ptr, on)

    def attach_uprobe(self, path: str, offset: int, *, pid: int = -1, retprobe: bool = False,
                      cookie: int = 0) -> "Link":
        """Uprobe at file offset `offset` of `path`; pid -1 = every process mapping it.

        A pid makes the kernel install the breakpoint in that process only, so no
        other process pays the trap."""
        from .link import Link
        opts = _lib.UprobeOpts(sz=ctypes.sizeof(_lib.UprobeOpts), bpf_cookie=cookie, retprobe=retprobe)
        ptr = lib.bpf_program__attach_uprobe_opts(self._ptr, pid, path.encode(), offset, ctypes.byref(opts))
        kind = "uretprobe" if retprobe else "uprobe"
        if not ptr:
            why = _lib.err(f"attach {kind} {path}+{offset:#x}")
            if ctypes.get_errno() == errno.EACCES:      # preflight.UPROBES_NEED_SYS_ADMIN_SINCE
                why += " (uprobes need CAP_SYS_ADMIN on Linux 6.16+ and 2025's stable kernels)"
            raise AttachError(why)
        return Link(ptr, f"{kind}:{path}+{offset:#x}")

    @property
    def fd(self) -> int:
        return lib.bpf_program__fd(self._ptr)

    def attach_tcx(self, ifindex: int, egress: bool) -> "FdLink":
        """Attach this sched_cls program to the interface's tcx hook (kernel 6.6+), after
        the programs already there, through a link that ends with its file descriptor.

        libbpf 1.1 has no bpf_program__attach_tcx, but its bpf_link_create passes any
        attach type through to BPF_LINK_CREATE, and the ifindex in target_fd (a union with
        target_ifindex); the tcx fields it does not know (relative_fd, expected_revision)
        stay 0, which appends."""
        from .link import FdLink
        kind = BPF_TCX_EGRESS if egress else BPF_TCX_INGRESS
        fd = lib.bpf_link_create(self.fd, ifindex, kind, None)
        where = f"tcx {'egress' if egress else 'ingress'} ifindex {ifindex}"
        if fd < 0:
            raise AttachError(f"attach {self.name} to {where}: {os.strerror(-fd)}")
        return FdLink(fd, f"{self.name}@{where}")

    def attach_cgroup(self, cgroup_dir: str, egress: bool) -> "FdLink":
        """Attach this cgroup_skb program to a cgroup v2 directory through a link (kernel 5.7+):
        it runs beside the programs already there (a link attaches as BPF_F_ALLOW_MULTI does,
        and their verdicts are ANDed) and is detached when the link's descriptor closes."""
        from .link import FdLink
        kind = BPF_CGROUP_INET_EGRESS if egress else BPF_CGROUP_INET_INGRESS
        where = f"cgroup {cgroup_dir} {'egress' if egress else 'ingress'}"
        try:
            cg = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise AttachError(f"attach {self.name} to {where}: {e.strerror}") from None
        try:
            fd = lib.bpf_link_create(self.fd, cg, kind, None)
        finally:
            os.close(cg)
        if fd < 0:
            raise AttachError(f"attach {self.name} to {where}: {os.strerror(-fd)}")
        return FdLink(fd, f"{self.name}@{where}")

    def attach_tc(self, ifindex: int, egress: bool) -> "TcFilter":
        """Add this sched_cls program as a direct-action filter on the interface's clsact
        hook (which must exist: tc_hook_create), for kernels without tcx. The kernel picks
        handle and priority, so filters of others on the hook stay as they are;
        TcFilter.close() removes only ours. Unlike a tcx link, the filter stays when the
        process dies without closing it."""
        point = _lib.BPF_TC_EGRESS if egress else _lib.BPF_TC_INGRESS
        hook = _lib.TcHook(sz=ctypes.sizeof(_lib.TcHook), ifindex=ifindex, attach_point=point)
        opts = _lib.TcOpts(sz=ctypes.sizeof(_lib.TcOpts), prog_fd=self.fd)
        rc = lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts))
        where = f"tc {'egress' if egress else 'ingress'} ifindex {ifindex}"
        if rc:
            raise AttachError(f"attach {self.name} to {where}: {os.strerror(-rc)}")
        return TcFilter(ifindex, point, opts.handle, opts.priority, f"{self.name}@{where}")

    def test_run(self, data: bytes, repeat: int = 1) -> tuple[int, int]:
        """BPF_PROG_TEST_RUN on a packet (skb programs get it as an Ethernet frame):
        (return value, average ns per run)."""
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        opts = _lib.TestRunOpts(sz=ctypes.sizeof(_lib.TestRunOpts), data_in=ctypes.addressof(buf),
                                data_size_in=len(data), repeat=repeat)
        rc = lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(opts))
        if rc:
            raise LoadError(f"test run of {self.name}: {os.strerror(-rc)}")
        return ctypes.c_int32(opts.retval).value, opts.duration    # signed: TC_ACT_UNSPEC is -1

    def attach(self) -> "Link":
        """Attach by the program's SEC() name (tracepoints)."""
        from .link import Link
        ptr = lib.bpf_program__attach(self._ptr)
        if not ptr:
            raise AttachError(_lib.err(f"attach program {self.name}") + _last_log_line())
        return Link(ptr, self.name)


def _last_log_line() -> str:
    log = _take_log().strip().splitlines()
    return f" ({log[-1].strip()})" if log else ""


BPF_NOEXIST = 1


class TcFilter(Attachment):
    """One cls_bpf filter on a clsact hook; close() deletes it (idempotent)."""

    def __init__(self, ifindex: int, attach_point: int, handle: int, priority: int, desc: str):
        self.ifindex, self.attach_point, self.handle, self.priority = ifindex, attach_point, handle, priority
        self.desc = desc
        self._live = True

    def close(self) -> None:
        if not self._live:
            return
        self._live = False
        hook = _lib.TcHook(sz=ctypes.sizeof(_lib.TcHook), ifindex=self.ifindex, attach_point=self.attach_point)
        opts = _lib.TcOpts(sz=ctypes.sizeof(_lib.TcOpts), handle=self.handle, priority=self.priority)
        lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts))   # ENOENT: the qdisc went away

    def __repr__(self) -> str:
        return f"TcFilter({self.desc} handle={self.handle:#x} prio={self.priority})"


def tc_hook_create(ifindex: int) -> bool:
    """Create the clsact qdisc of an interface: True if we created it, False if one was
    there already (then it is not ours to delete)."""
    hook = _lib.TcHook(sz=ctypes.sizeof(_lib.TcHook), ifindex=ifindex,
                       attach_point=_lib.BPF_TC_INGRESS | _lib.BPF_TC_EGRESS)
    rc = lib.bpf_tc_hook_create(ctypes.byref(hook))
    if rc == -errno.EEXIST:
        return False
    if rc:
        raise AttachError(f"create clsact qdisc on ifindex {ifindex}: {os.strerror(-rc)}")
    return True


def tc_hook_destroy(ifindex: int) -> None:
    """Delete the clsact qdisc of an interface, with every filter on it."""
    hook = _lib.TcHook(sz=ctypes.sizeof(_lib.TcHook), ifindex=ifindex,
                       attach_point=_lib.BPF_TC_INGRESS | _lib.BPF_TC_EGRESS)
    lib.bpf_tc_hook_destroy(ctypes.byref(hook))


# rtnetlink, for what libbpf cannot tell: how many filters a clsact hook holds
_RTM_GETTFILTER, _RTM_NEWTFILTER = 46, 44
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
TC_H_CLSACT_INGRESS, TC_H_CLSACT_EGRESS = 0xFFFFFFF2, 0xFFFFFFF3


def tc_filter_count(ifindex: int, parent: int) -> int:
    """Filters on one clsact hook (parent TC_H_CLSACT_INGRESS or _EGRESS), by an
    RTM_GETTFILTER dump; 0 when the interface has no clsact qdisc."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
        tcmsg = struct.pack("=BxxxiIII", socket.AF_UNSPEC, ifindex, 0, parent, 0)
        s.send(struct.pack("=IHHII", 16 + len(tcmsg), _RTM_GETTFILTER, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0)
               + tcmsg)
        n = 0
        while True:
            buf = s.recv(1 << 16)
            off = 0
            while off + 16 <= len(buf):
                ln, typ = struct.unpack_from("=IH", buf, off)
                if typ == _NLMSG_DONE:
                    return n
                if typ == _NLMSG_ERROR:
                    code = struct.unpack_from("=i", buf, off + 16)[0]
                    if code in (0, -errno.EINVAL, -errno.ENOENT):   # no clsact: nothing there
                        return n
                    raise AttachError(f"list tc filters of ifindex {ifindex}: {os.strerror(-code)}")
                if typ == _RTM_NEWTFILTER:
                    n += 1
                off += (ln + 3) & ~3
                if ln == 0:
                    return n


class BpfObject:
    """An opened (and later loaded) BPF ELF object."""

    def __init__(self, ptr: int, path: str):
        self._ptr, self.path = ptr, path
        self.loaded = False

    @classmethod
    def open(cls, path: str) -> "BpfObject":
        _take_log()
        ptr = lib.bpf_object__open_file(path.encode(), None)
        if not ptr:
            raise LoadError(_lib.err(f"open BPF object {path}"), _take_log())
        return cls(ptr, path)

    def programs(self) -> Iterator[Program]:
        p = lib.bpf_object__next_program(self._ptr, None)
        while p:
            yield Program(p, self)
            p = lib.bpf_object__next_program(self._ptr, p)

    def maps(self) -> Iterator[Map]:
        m = lib.bpf_object__next_map(self._ptr, None)
        while m:
            yield Map(m, self)
            m = lib.bpf_object__next_map(self._ptr, m)

    def program(self, name: str) -> Program:
        p = lib.bpf_object__find_program_by_name(self._ptr, name.encode())
        if not p:
            raise LoadError(f"{self.path}: no program named {name}")
        return Program(p, self)

    def map(self, name: str) -> Map:
        m = lib.bpf_object__find_map_by_name(self._ptr, name.encode())
        if not m:
            raise LoadError(f"{self.path}: no map named {name}")
        return Map(m, self)

    def rodata(self, ctype: type) -> ctypes.Structure:
        """The load-time config struct at offset 0 of .rodata (see abi.Config)."""
        for m in self.maps():
            if m.name.endswith(".rodata"):
                return m.initial_value(ctype)
        raise LoadError(f"{self.path}: no .rodata map")

    def load(self) -> None:
        _take_log()
        if lib.bpf_object__load(self._ptr):
            msg = _lib.err(f"load BPF object {self.path}")
            raise LoadError(msg, _take_log())
        self.loaded = True

    def close(self) -> None:
        if self._ptr:
            lib.bpf_object__close(self._ptr)
            self._ptr = None

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
