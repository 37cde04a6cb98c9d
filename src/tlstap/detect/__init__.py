"""`tlstap detect`: what is capturing TLS on this host now, and who.

    findings, notes = detect.scan()

The process table (and who holds which BPF link, program, perf event and socket) is read
first; then each kind of capture is looked for on its own (uprobes, tc, xdp, cgroup_skb,
packet sockets, environments), and a failure in one becomes a note, not a lost report.
"""
from __future__ import annotations

from ..libbpf import introspect as bpf
from . import environ, net, procs, uprobes
from .report import Finding


def scan() -> tuple[list[Finding], list[str]]:
    table = procs.scan()
    held = procs.holders(table)
    links = [ln for ln in (bpf.link(i) for i in bpf.link_ids()) if ln is not None]
    findings: list[Finding] = []
    notes: list[str] = []
    parts = (("uprobes", lambda: uprobes.find(links, held)),
             ("tc", lambda: net.tc(links, held, notes)),
             ("xdp", lambda: net.xdp(links, held, notes)),
             ("cgroup skb", lambda: net.cgroup_skb(links, held, notes)),
             ("packet sockets", lambda: net.packet_sockets(table, held)),
             ("environments", lambda: environ.find(table)))
    for name, part in parts:
        try:
            findings.extend(part())
        except Exception as e:        # noqa: BLE001 - one part failing must not hide the others
            notes.append(f"{name} not checked: {type(e).__name__}: {e}")
    for f in findings:
        f.pinned = (held.pinned_links.get(f.detail.get("link_id"), [])
                    + held.pinned_progs.get(f.detail.get("prog_id"), []))
    return findings, notes


__all__ = ["Finding", "scan"]
