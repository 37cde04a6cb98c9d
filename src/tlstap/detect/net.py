"""Programs and sockets that see packets: TC (tcx links and cls_bpf filters), XDP, cgroup skb
programs, and packet sockets. Encrypted packets are half of a capture: with keys from a key
log (or a key uprobe) they are the plaintext.

TC's classic filters have no link: only a netlink dump of each interface's filters names their
programs. We run iproute2's `tc -j` for it rather than speak netlink ourselves: tc is on every
host that has such filters (it is what puts them there), its JSON carries the program id, and
only interfaces that have a clsact or ingress qdisc are asked (one `tc -j qdisc show` first).
Legacy XDP programs the same way, from `ip -j link show`.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess

from ..libbpf import introspect as bpf
from ..preflight import cgroup2_root
from .procs import Holders, Proc, boot_ns_to_wall, read
from .report import Finding

_TOOL_TIMEOUT = 10
_KERNEL_HELD = "no process holds it: its loader attached it and exited (tc, ip), or it is pinned"
#: `ip -j link`'s xdp mode (enum XDP_ATTACHED_*)
_XDP_MODES = {1: "native", 2: "generic", 3: "offloaded", 4: "several modes"}


def _ifname(ifindex: int) -> str:
    try:
        return socket.if_indextoname(ifindex)
    except OSError:
        return f"ifindex {ifindex} (not in this network namespace)"


def _tool_json(argv: list[str], notes: list[str]):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=_TOOL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        notes.append(f"`{' '.join(argv)}` failed ({e}): its part is not checked")
        return None
    if r.returncode:
        return None                      # e.g. the device went away since the listing
    try:
        return json.loads(r.stdout or "[]")
    except ValueError:
        notes.append(f"`{' '.join(argv)}` printed no JSON: its part is not checked")
        return None


def _prog_finding(kind: str, what: str, prog_id: int, h: Holders, detail: dict,
                  owners: list[Proc] | None = None) -> Finding:
    info = bpf.prog(prog_id)
    name = info.name.decode(errors="replace") if info else "?"
    return Finding(kind, f"{what}, program {prog_id} {name}", {**detail, "prog_id": prog_id, "prog_name": name},
                   owners if owners is not None else list(h.of_prog(prog_id)),
                   boot_ns_to_wall(info.load_time) if info else None, "program loaded" if info else "",
                   no_owner=_KERNEL_HELD)


def tc(links: list[bpf.Link], h: Holders, notes: list[str]) -> list[Finding]:
    out, seen = [], set()
    for ln in links:
        if ln.type in (bpf.LINK_TCX, bpf.LINK_NETKIT):
            dev, where = _ifname(ln.ifindex), bpf.ATTACH_NAMES.get(ln.attach_type, str(ln.attach_type))
            how = "tcx" if ln.type == bpf.LINK_TCX else "netkit"
            seen.add((dev, where, ln.prog_id))
            out.append(_prog_finding("tc", f"{how} {where} on {dev}", ln.prog_id, h,
                                     {"attach": how, "dev": dev, "direction": where, "link_id": ln.id},
                                     owners=h.links.get(ln.id, [])))
    qdiscs = _tool_json(["tc", "-j", "qdisc", "show"], notes) or []
    devs = sorted({q.get("dev") for q in qdiscs if q.get("kind") in ("clsact", "ingress") and q.get("dev")})
    for dev in devs:
        for where in ("ingress", "egress"):
            for f in _tool_json(["tc", "-j", "filter", "show", "dev", dev, where], notes) or []:
                prog_id = ((f.get("options") or {}).get("prog") or {}).get("id")
                if f.get("kind") != "bpf" or not prog_id or (dev, where, prog_id) in seen:
                    continue
                seen.add((dev, where, prog_id))
                out.append(_prog_finding("tc", f"cls_bpf filter {where} on {dev} (pref {f.get('pref')})",
                                         prog_id, h, {"attach": "cls_bpf", "dev": dev, "direction": where}))
    return out


def xdp(links: list[bpf.Link], h: Holders, notes: list[str]) -> list[Finding]:
    out, seen = [], set()
    for ln in links:
        if ln.type == bpf.LINK_XDP:
            dev = _ifname(ln.ifindex)
            seen.add((dev, ln.prog_id))
            out.append(_prog_finding("xdp", f"XDP link on {dev}", ln.prog_id, h,
                                     {"dev": dev, "link_id": ln.id}, owners=h.links.get(ln.id, [])))
    for dev in _tool_json(["ip", "-j", "link", "show"], notes) or []:
        x = dev.get("xdp") or {}
        progs = [x["prog"]] if "prog" in x else [a["prog"] for a in x.get("attached", []) if "prog" in a]
        for p in progs:
            if p.get("id") and (dev.get("ifname"), p["id"]) not in seen:
                seen.add((dev.get("ifname"), p["id"]))
                mode = _XDP_MODES.get(x.get("mode"), str(x.get("mode")))
                out.append(_prog_finding("xdp", f"XDP ({mode}) on {dev.get('ifname')}", p["id"], h,
                                         {"dev": dev.get("ifname"), "mode": mode}))
    return out


def cgroup_skb(links: list[bpf.Link], h: Holders, notes: list[str]) -> list[Finding]:
    """cgroup links, and BPF_PROG_QUERY on every cgroup of the v2 tree (programs attached
    without a link); a link's program shows up in both, once in the report."""
    root = cgroup2_root()
    paths: dict[int, str] = {}
    attached: list[tuple[str, int, int]] = []          # (cgroup path, attach type, prog id)
    if root is None:
        notes.append("no cgroup v2 hierarchy is mounted: cgroup programs attached without a link are not checked")
    else:
        for d, _subdirs, _files in os.walk(root):
            try:
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            try:
                rel = "/" if d == root else "/" + os.path.relpath(d, root)
                paths[os.fstat(fd).st_ino] = rel        # a cgroup's id is its directory's inode number
                for at in (bpf.CGROUP_INET_INGRESS, bpf.CGROUP_INET_EGRESS):
                    attached.extend((rel, at, pid) for pid in bpf.prog_query(fd, at))
            finally:
                os.close(fd)
    out, seen = [], set()
    for ln in links:
        if ln.type == bpf.LINK_CGROUP and ln.attach_type in (bpf.CGROUP_INET_INGRESS, bpf.CGROUP_INET_EGRESS):
            path = paths.get(ln.cgroup_id, f"cgroup id {ln.cgroup_id}")
            where = bpf.ATTACH_NAMES[ln.attach_type]
            seen.add((path, ln.attach_type, ln.prog_id))
            out.append(_prog_finding("cgroup_skb", f"{where} on cgroup {path}", ln.prog_id, h,
                                     {"cgroup": path, "direction": where, "link_id": ln.id},
                                     owners=h.links.get(ln.id, [])))
    for path, at, prog_id in attached:
        if (path, at, prog_id) not in seen:
            seen.add((path, at, prog_id))
            where = bpf.ATTACH_NAMES[at]
            out.append(_prog_finding("cgroup_skb", f"{where} on cgroup {path}", prog_id, h,
                                     {"cgroup": path, "direction": where}))
    return out


#: /proc/net/packet's Type column
_SOCK_TYPES = {"2": "SOCK_DGRAM", "3": "SOCK_RAW"}


def packet_sockets(procs: dict[int, Proc], h: Holders) -> list[Finding]:
    """AF_PACKET sockets of every network namespace a process is in (/proc/PID/net/packet shows
    the namespace of PID), each with the processes that hold it."""
    netns: dict[str, int] = {}
    for p in procs.values():
        try:
            netns.setdefault(os.readlink(f"/proc/{p.pid}/ns/net"), p.pid)
        except OSError:
            continue
    out = []
    for ns, pid in sorted(netns.items()):
        lines = (read(f"/proc/{pid}/net/packet") or "").splitlines()[1:]
        for ln in lines:
            cols = ln.split()
            if len(cols) < 9:
                continue
            _sk, _ref, typ, proto, ifindex, _r, _rmem, _user, inode = cols[:9]
            owners = h.sockets.get(int(inode), [])
            if not owners:
                continue           # a socket no process holds any more is closing
            proto_n = int(proto, 16)
            dev = "every interface" if ifindex == "0" else _ifname(int(ifindex))
            what = (f"{_SOCK_TYPES.get(typ, 'type ' + typ)} packet socket, protocol "
                    f"{'all (ETH_P_ALL)' if proto_n == 3 else hex(proto_n)}, on {dev}, inode {inode}, {ns}")
            out.append(Finding("packet_socket", what,
                               {"type": _SOCK_TYPES.get(typ, typ), "protocol": proto_n, "dev": dev,
                                "inode": int(inode), "netns": ns},
                               owners, min((o.start for o in owners if o.start), default=None), "process started"))
    return out
