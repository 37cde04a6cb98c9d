"""Packet capture for `tlstap tls -m pcapng`: the packets of one interface, with their processes.

The kernel side (bpf/packets.bpf.c) runs as two TC programs on the interface, ingress and
egress; each packet that passes the filter (pktfilter.py, tcpdump syntax) and the
--pid/--uid/--cgroup scope arrives as one ring-buffer record: the bytes from the link-layer
header on, and the owners of the sending and the receiving socket when they are local and
known. Owners come from connect/accept/listen tracepoints in the kernel, and from /proc for
connections that existed before the capture (seed_owners).

Loopback: every packet passes lo's egress and then its ingress; only egress is attached
there, so each packet is captured once (tcpdump keeps one copy too), and a TCP packet may be
a GSO super-packet of up to 64 KiB, captured whole.

Only observing: the programs return TC_ACT_UNSPEC (= TCX_NEXT), no verdict, so every other
program and filter on the interface decides as it would without tlstap, and several captures
each see every packet. They attach through tcx links (kernel 6.6+), after the tcx programs
already there (tcx runs before any clsact filter). A link is a file descriptor: the kernel
detaches the program when it closes, also when tlstap is killed.

Kernels without tcx get the fallback (attach="clsact"): cls_bpf filters on the clsact qdisc,
created only if absent; close() removes exactly our two filters, then the qdisc if we created
it and nothing else was attached to it meanwhile. These outlive a tlstap killed by SIGKILL,
which fallback_note() tells the user.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import re
import struct
from dataclasses import dataclass
from typing import Callable

from .. import abi
from ..abi import PktCounter, PktDir
from ..events import Owner, Packet, wall_clock_offset_ns
from .base import Capture, CaptureConfig, bpf_object_path, set_scope
from ..errors import UsageError
from ..preflight import cgroup2_root
from ..libbpf import BpfObject, RingBuffer
from ..libbpf.object import (BPF_NOEXIST, TC_H_CLSACT_EGRESS, TC_H_CLSACT_INGRESS, kernel_has_func,
                            kernel_has_tcx, kernel_has_tracepoint, num_possible_cpus, tc_filter_count,
                            tc_hook_create, tc_hook_destroy)
from .pktfilter import Filter, compile_filter
from ..sinks.pcapng import LINKTYPE_ETHERNET, LINKTYPE_RAW

ARPHRD_ETHER, ARPHRD_LOOPBACK, ARPHRD_NONE = 1, 772, 0xFFFE
#: ARPHRD type -> (bytes of link header before IP, pcap link type)
_LINK = {ARPHRD_ETHER: (14, LINKTYPE_ETHERNET), ARPHRD_LOOPBACK: (14, LINKTYPE_ETHERNET),
         ARPHRD_NONE: (0, LINKTYPE_RAW)}
IFF_LOOPBACK = 0x8

TRACEPOINTS = ("sys_enter_connect", "sys_exit_connect", "sys_enter_listen", "sys_exit_listen",
               "sys_exit_accept4", "sys_exit_accept", "inet_sock_set_state", "sys_enter_close")
#: tp_btf programs that hand a connection to the process doing its I/O (sock:sock_send_length and
#: sock:sock_recv_length, loaded where the kernel has them); without them an owner changes only
#: at connect, accept and close
IO_TRACEPOINTS = ("sock_send_length", "sock_recv_length")
#: [direct] -> (ingress, egress) programs; direct copies skb -> ring with bpf_dynptr_copy (6.14+)
TC_PROGRAMS = {True: ("tc_ingress", "tc_egress"), False: ("tc_ingress_copy", "tc_egress_copy")}
#: the same as cgroup_skb programs, for the wire source (sources/wire.py)
CG_PROGRAMS = {True: ("cg_ingress", "cg_egress"), False: ("cg_ingress_copy", "cg_egress_copy")}
DIRECT_KFUNCS = ("bpf_dynptr_from_skb", "bpf_dynptr_copy")
#: the TC programs' only return value: no verdict (= TCX_NEXT), see the module docstring
TC_ACT_UNSPEC = -1
#: how the TC programs attach: tcx links (6.6+), or cls_bpf filters on a clsact qdisc
ATTACH_METHODS = ("tcx", "clsact")
#: smallest ring buffer: a few whole 64 KiB packets in flight
MIN_RING = 1 << 20

_EVENT = struct.Struct(abi.PACKET_EVENT_FORMAT)
#: a packet_event's leading fields (ts_ns, ifindex, len, caplen, dir, flags, sender's pid),
#: the bytes of its two owners (a cache key: connections repeat them), and its size (the
#: packet follows)
EVENT_HEAD = struct.Struct("<QIIIBB2xI")
assert _EVENT.format.startswith(EVENT_HEAD.format), "EVENT_HEAD must be a prefix of packet_event"
EVENT_OWNERS = slice(abi.PacketEvent.sender.offset,
                     abi.PacketEvent.receiver.offset + ctypes.sizeof(abi.SockOwner))
EVENT_SIZE = _EVENT.size
AF_INET, AF_INET6 = 2, 10


@dataclass(frozen=True)
class Interface:
    """What a pcapng Interface Description Block needs to know about the capture interface."""
    name: str
    ifindex: int
    arphrd: int           #: ARPHRD_* from /sys/class/net/NAME/type
    linktype: int         #: LINKTYPE_ETHERNET (ether, loopback) or LINKTYPE_RAW (no link header)
    link_hdr_len: int     #: bytes before the IP header: 14 or 0
    mtu: int
    loopback: bool
    mac: bytes | None     #: link-layer address, None without one

    @classmethod
    def lookup(cls, name: str) -> "Interface":
        """Raises UsageError (one line) for an unknown or unsupported interface."""
        if not re.fullmatch(r"[^/\s:]{1,15}", name or "") or name in (".", ".."):
            raise UsageError(f"-i {name!r}: not an interface name")
        d = f"/sys/class/net/{name}"
        try:
            ifindex = int(_read(f"{d}/ifindex"))
            arphrd = int(_read(f"{d}/type"))
            mtu = int(_read(f"{d}/mtu"))
            flags = int(_read(f"{d}/flags"), 0)
            addr = _read(f"{d}/address", "")
        except FileNotFoundError:
            raise UsageError(f"-i {name}: no such interface (see `ip link`)") from None
        if arphrd not in _LINK:
            raise UsageError(f"-i {name}: unsupported link type {arphrd} (supported: Ethernet, loopback, "
                             f"and interfaces without link header such as tun or wireguard)")
        hdr, linktype = _LINK[arphrd]
        mac = bytes.fromhex(addr.replace(":", "")) if addr and hdr else None
        return cls(name, ifindex, arphrd, linktype, hdr, mtu, bool(flags & IFF_LOOPBACK), mac)


def _read(path: str, default: str | None = None) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        if default is None:
            raise
        return default




class PacketCapture(Capture):
    """Use as a context manager; start() attaches, poll() hands Packets to `on_packet`.

    snaplen: bytes kept per packet (default PKT_CAP_MAX, i.e. whole packets). direct: force the
    one-copy (True) or the scratch-copy (False) programs; default: one-copy when the kernel can.
    attach: force one of ATTACH_METHODS; default: tcx when the kernel has it."""

    def __init__(self, cfg: CaptureConfig, ifname: str, filter_expr: str | None,
                 on_packet: Callable[[Packet], None], *, snaplen: int | None = None,
                 direct: bool | None = None, attach: str | None = None):
        super().__init__(cfg)
        self.ifname = ifname
        self.on_packet = on_packet
        self.filter_expr = filter_expr or ""
        self.filter: Filter = compile_filter(filter_expr)
        self.snaplen = snaplen or getattr(cfg, "snaplen", None) or abi.PKT_CAP_MAX
        if not 1 <= self.snaplen <= abi.PKT_CAP_MAX:
            raise UsageError(f"--snaplen must be between 1 and {abi.PKT_CAP_MAX}, not {self.snaplen}")
        if cfg.mapsize < MIN_RING or cfg.mapsize & (cfg.mapsize - 1):
            raise UsageError(f"--mapsize must be a power of two >= {MIN_RING} bytes for packet capture, "
                             f"not {cfg.mapsize}")
        if attach not in (None, *ATTACH_METHODS):
            raise ValueError(f"attach must be one of {ATTACH_METHODS}, not {attach!r}")
        self.interface: Interface | None = None
        self.attach = attach          #: one of ATTACH_METHODS, chosen by start() unless forced
        self.created_qdisc = False    #: the clsact qdisc was ours (close() removes it)
        self.direct = direct          #: one-copy path (bpf_dynptr_copy) in use
        self.seeded = 0               #: owner entries taken from /proc at start
        self.io_owners = has_io_tracepoints()   #: IO_TRACEPOINTS loaded and attached
        self.tc_links = []            #: FdLinks (tcx) or TcFilters (clsact)
        self._owners: dict[tuple, Owner | None] = {}
        self._wall = 0

    def choose_copy(self) -> None:
        """One copy (skb -> ring, bpf_dynptr_copy) where the kernel can, unless forced."""
        if self.direct is None:
            self.direct = all(kernel_has_func(f) for f in DIRECT_KFUNCS)

    def start(self) -> None:
        iface = Interface.lookup(self.ifname)
        self.choose_copy()
        if self.attach is None:
            self.attach = "tcx" if kernel_has_tcx() else "clsact"
        ingress, egress = TC_PROGRAMS[self.direct]
        # loopback: egress only, every packet passes both hooks
        points = [(egress, True)] if iface.loopback else [(ingress, False), (egress, True)]
        with contextlib.ExitStack() as stack:
            obj = self.load_with_owners(stack, [p for p, _ in points], iface.link_hdr_len, iface.loopback)
            if self.attach == "clsact":
                self.created_qdisc = tc_hook_create(iface.ifindex)
                if self.created_qdisc:
                    stack.callback(_remove_qdisc_if_unused, iface.ifindex)
            for name, is_egress in points:
                prog = obj.program(name)
                tc = prog.attach_tcx if self.attach == "tcx" else prog.attach_tc
                self.tc_links.append(stack.enter_context(tc(iface.ifindex, is_egress)))
            self.open_ring(stack, obj)
            self.interface = iface
            self._stack = stack.pop_all()

    def load_with_owners(self, stack: contextlib.ExitStack, programs: list[str], link_hdr_len: int,
                          both_local: bool, wire: bool = False) -> BpfObject:
        """Load the packet programs named and attach the owner tracepoints; seed the owners of
        connections older than the capture. The packet programs are left for the caller to attach."""
        obj = stack.enter_context(load_object(self.cfg, self.filter, link_hdr_len, self.snaplen, both_local,
                                              self.direct, programs, self.io_owners, wire))
        for name in TRACEPOINTS + (IO_TRACEPOINTS if self.io_owners else ()):
            self.links.append(stack.enter_context(obj.program(name).attach()))
        # after the tracepoints: a connection made meanwhile is in the kernel's entries,
        # which the seeding does not overwrite
        self.seeded = seed_owners(obj, self.cfg.pid)
        return obj

    def open_ring(self, stack: contextlib.ExitStack, obj: BpfObject) -> None:
        ev = obj.map("packets")
        self._ring = stack.enter_context(contextlib.closing(RingBuffer(ev.fd, ev.max_entries)))
        self._wall = wall_clock_offset_ns()
        self._obj = obj

    def _owner(self, pid: int, uid: int, comm: bytes) -> Owner | None:
        key = (pid, uid, comm)
        o = self._owners.get(key, False)
        if o is False:
            o = Owner(pid, uid, comm.split(b"\0", 1)[0].decode(errors="replace")) if pid else None
            if len(self._owners) > 65536:
                self._owners.clear()
            self._owners[key] = o
        return o

    @property
    def wall_offset(self) -> int:
        """Add to a record's ts_ns for CLOCK_REALTIME nanoseconds."""
        return self._wall

    def owner(self, view) -> tuple[Owner | None, Owner | None]:
        """(sender, receiver) of a packet_event record."""
        _ts, _ifindex, _len, _caplen, _d, _f, spid, suid, scomm, _sfd, rpid, ruid, rcomm, _rfd = _EVENT.unpack_from(view)
        return self._owner(spid, suid, scomm), self._owner(rpid, ruid, rcomm)

    def _on_record(self, view) -> None:
        ts, ifindex, length, caplen, d, _f, spid, suid, scomm, _sfd, rpid, ruid, rcomm, _rfd = _EVENT.unpack_from(view)
        off = _EVENT.size
        self.on_packet(Packet(ts + self._wall, ifindex, PktDir(d), length, bytes(view[off:off + caplen]),
                              self._owner(spid, suid, scomm), self._owner(rpid, ruid, rcomm)))

    def fallback_note(self) -> str | None:
        """What to tell the user when the programs attach by the clsact fallback, else None."""
        if self.attach != "clsact":
            return None
        return (f"no tcx in this kernel (6.6+): the packet programs attach as cls_bpf filters on the clsact "
                f"qdisc of {self.ifname}; if tlstap is killed (SIGKILL) they stay until removed with "
                f"`tc filter del dev {self.ifname} ingress|egress ...` (see `tc filter show`)")

    def detach_probes(self) -> None:
        """Stop producing (TC programs and tracepoints off); drain() then gets the rest."""
        for f in self.tc_links:
            f.close()
        super().detach_probes()

    def counters(self) -> dict[str, int]:
        c = self.counter_sums("pkt_counters", PktCounter)
        c["seeded_owners"] = self.seeded
        return c



def load_object(cfg: CaptureConfig, filt: Filter, link_hdr_len: int, snaplen: int, both_local: bool,
                direct: bool, tc_programs: list[str], io_owners: bool | None = None,
                wire: bool = False) -> BpfObject:
    """packets.bpf.o configured and loaded, nothing attached; the caller owns (closes) it.
    tc_programs: the packet programs to load (names from TC_PROGRAMS[direct] or CG_PROGRAMS[direct]);
    io_owners: load IO_TRACEPOINTS too (default: where the kernel has them); wire: only the
    TCP segments the wire source needs (bpf/packets.bpf.c: wire_wants)."""
    obj = BpfObject.open(bpf_object_path("packets.bpf.o"))
    try:
        set_scope(obj, cfg)
        pconf = obj.map(".rodata.pkt").initial_value(abi.PktConfig)
        pconf.link_hdr_len = link_hdr_len
        pconf.snaplen = snaplen
        pconf.both_local = both_local
        pconf.wire = wire
        filt.fill(pconf)
        obj.map("packets").max_entries = cfg.mapsize
        obj.map("pkt_scratch").max_entries = 1 if direct else num_possible_cpus()
        for names in (*TC_PROGRAMS.values(), *CG_PROGRAMS.values()):
            for name in names:
                obj.program(name).autoload = name in tc_programs
        for name in IO_TRACEPOINTS:
            obj.program(name).autoload = has_io_tracepoints() if io_owners is None else io_owners
        obj.load()
    except BaseException:
        obj.close()
        raise
    return obj


def has_io_tracepoints() -> bool:
    """Whether this kernel has the tracepoints of IO_TRACEPOINTS."""
    return all(kernel_has_tracepoint(t) for t in IO_TRACEPOINTS)


def _remove_qdisc_if_unused(ifindex: int) -> None:
    """Delete the clsact qdisc we created, unless someone attached a filter meanwhile."""
    try:
        busy = tc_filter_count(ifindex, TC_H_CLSACT_INGRESS) or tc_filter_count(ifindex, TC_H_CLSACT_EGRESS)
    except OSError:
        return   # the interface is gone
    if not busy:
        tc_hook_destroy(ifindex)


# ---------------------------------------------------------------- seeding from /proc

_TCP_LISTEN, _TCP_CLOSE = 0x0A, 0x07
_V4MAPPED = bytes(10) + b"\xff\xff"


def _hex_addr(text: str) -> tuple[bytes, int]:
    """'0100007F:1F90' -> (b'\\x7f\\0\\0\\1', 8080): words are printed in host order (x86: LE)."""
    a, _, p = text.partition(":")
    raw = b"".join(int(a[i:i + 8], 16).to_bytes(4, "little") for i in range(0, len(a), 8))
    return raw, int(p, 16)


def proc_sockets():
    """(proto, family, laddr, lport, raddr, rport, state, inode) of this network namespace's
    TCP/UDP sockets; v4-mapped IPv6 sockets are reported as IPv4, as their packets are."""
    for proto, fam in (("tcp", AF_INET), ("tcp6", AF_INET6), ("udp", AF_INET), ("udp6", AF_INET6)):
        try:
            with open(f"/proc/net/{proto}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for ln in lines:
            f = ln.split()
            if len(f) < 10 or not int(f[9]):
                continue
            (la, lp), (ra, rp) = _hex_addr(f[1]), _hex_addr(f[2])
            fa = fam
            if fam == AF_INET6 and la.startswith(_V4MAPPED) and ra[:12] in (_V4MAPPED, bytes(12)):
                fa, la, ra = AF_INET, la[12:], ra[12:]
            yield proto.rstrip("6"), fa, la, lp, ra, rp, int(f[3], 16), int(f[9])


def socket_holders(inodes: set[int], fd_of: dict | None = None) -> dict[int, list[int]]:
    """socket inode -> pids holding it open (of those asked for); fd_of, if given, gets
    (inode, pid) -> the lowest descriptor number of it."""
    out: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                ino = int(link[8:-1])
                if ino in inodes:
                    lst = out.setdefault(ino, [])
                    if int(pid) not in lst:
                        lst.append(int(pid))
                    if fd_of is not None and (ino, int(pid)) not in fd_of:
                        fd_of[ino, int(pid)] = int(fd)
    return out


def _pid_info(pid: int) -> tuple[int, int, bytes, int] | None:
    """(ppid, uid, comm, cgroup id) of a process, None if it is gone."""
    try:
        stat = _read(f"/proc/{pid}/stat")
        ppid = int(stat.rpartition(")")[2].split()[1])
        uid = next(int(ln.split()[1]) for ln in _read(f"/proc/{pid}/status").splitlines() if ln.startswith("Uid:"))
        comm = _read(f"/proc/{pid}/comm").encode()[:abi.TASK_COMM_LEN - 1]
        cg = 0
        root = cgroup2_root()
        for ln in _read(f"/proc/{pid}/cgroup").splitlines():
            if ln.startswith("0::") and root:
                with contextlib.suppress(OSError):
                    cg = os.stat(root + ln[3:]).st_ino
        return ppid, uid, comm, cg
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _pick(pids: list[int], info: dict, target: int | None) -> int:
    """The holder to name: the scope's pid if it holds the socket; else the lowest of the
    holders none of whose children holds it too. A server's descendants do the I/O: a child
    forked to serve a connection while its parent still holds a copy (or a grandchild, forked
    again), nginx's workers rather than the master that opened the listener. The kernel
    corrects a wrong guess at the first send or recv (IO_TRACEPOINTS)."""
    if target in pids:
        return target
    parents = {info[p][0] for p in pids if info.get(p)}
    return min([p for p in pids if p not in parents] or pids)


def seed_owners(obj: BpfObject, target_pid: int | None = None) -> int:
    """Add owners of sockets that existed before the capture (kernel entries win). Returns
    how many entries were added."""
    socks = list(proc_sockets())
    fds: dict[tuple[int, int], int] = {}
    holders = socket_holders({s[7] for s in socks}, fds)
    info = {pid: _pid_info(pid) for pids in holders.values() for pid in pids}
    conns, listeners = obj.map("sock_owner"), obj.map("listeners")
    n = 0
    for proto, fam, la, lp, ra, rp, state, inode in socks:
        pids = [p for p in holders.get(inode, []) if info.get(p)]
        if not pids:
            continue
        pid = _pick(pids, info, target_pid)
        _, uid, comm, cg = info[pid]
        value = abi.SockEntry(owner=abi.SockOwner(pid=pid, uid=uid, comm=comm, fd=fds.get((inode, pid), -1)),
                              cgroup_id=cg)
        if proto == "tcp" and state == _TCP_LISTEN:
            n += listeners.update(ctypes.c_uint32(lp), value, BPF_NOEXIST)
        elif rp and (proto == "udp" or state != _TCP_CLOSE):
            key = abi.ConnTuple(family=fam, lport=lp, rport=rp)
            key.laddr[:len(la)] = list(la)
            key.raddr[:len(ra)] = list(ra)
            n += conns.update(key, value, BPF_NOEXIST)
    return n


__all__ = ["PacketCapture", "Packet", "Owner", "Interface", "LINKTYPE_ETHERNET", "LINKTYPE_RAW",
           "load_object", "seed_owners", "proc_sockets"]
