"""A finding and its two renderings: text (grouped by kind, one line each, a verdict line) and
JSON (a list of objects)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from .procs import Proc

#: kinds in the order the text report shows them, with their group titles
KINDS = {
    "uprobe": "uprobes on TLS libraries (see plaintext or keys inside the process)",
    "uprobe_other": "uprobes on other files",
    "tc": "TC programs (see every packet of an interface)",
    "xdp": "XDP programs (see every packet an interface receives)",
    "cgroup_skb": "cgroup skb programs (see the packets of a cgroup's sockets)",
    "packet_socket": "packet sockets (tcpdump, tshark, ...: copies of packets)",
    "sslkeylogfile": "SSLKEYLOGFILE in a process's environment (the TLS library writes its keys there)",
    "ld_preload": "LD_PRELOAD in processes that map a TLS library",
}


@dataclass
class Finding:
    kind: str                     # one of KINDS
    what: str                     # one line, without owner and time
    detail: dict                  # the facts, for --json
    owners: list[Proc] = field(default_factory=list)
    since: float | None = None    # Unix time
    since_what: str = ""          # "program loaded", "process started"
    #: said instead of owners when nobody holds it (a pinned link, a tc filter whose loader exited)
    no_owner: str = "no process holds it (pinned, or left in the kernel by its loader)"
    #: where the link or program is pinned in a BPF filesystem (it outlives every process)
    pinned: list[str] = field(default_factory=list)
    #: text only: findings with the same key (and owners) share one line, `merged` with "{sites}"
    #: replaced by their `site`s (Go's return probes: one per RET of a function)
    merge_key: tuple | None = None
    merged: str = ""
    site: str = ""

    def as_json(self) -> dict:
        return {"kind": self.kind, **self.detail,
                "owner": [p.owner() for p in self.owners], "pinned": self.pinned,
                "since": _iso(self.since) if self.since else None, "since_what": self.since_what or None}

    def line(self, what: str | None = None) -> str:
        who = [str(p) for p in self.owners] + [f"pinned at {p}" for p in self.pinned]
        who = "; ".join(who) if who else self.no_owner
        since = f"; since {_iso(self.since)} ({self.since_what})" if self.since else ""
        return f"  {what or self.what}: {who}{since}"


def _lines(group: list[Finding]) -> list[str]:
    """One line per finding, but one for all those of a merge key with the same owners."""
    merged: dict[tuple, list[Finding]] = {}
    for f in group:
        key = (f.merge_key, tuple(p.pid for p in f.owners), tuple(f.pinned)) if f.merge_key else (id(f),)
        merged.setdefault(key, []).append(f)
    out = []
    for fs in merged.values():
        if len(fs) == 1:
            out.append(fs[0].line())
        else:
            sites = f" ({len(fs)} sites: {', '.join(f.site for f in fs)})"
            out.append(fs[0].line(fs[0].merged.replace("{sites}", sites)))
    return out


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def text(findings: list[Finding], notes: list[str]) -> str:
    out = []
    for kind, title in KINDS.items():
        group = [f for f in findings if f.kind == kind]
        if group:
            out.append(f"{title}:")
            out.extend(_lines(group))
    out.extend(f"note: {n}" for n in notes)
    out.append(f"{len(findings)} finding{'s' if len(findings) != 1 else ''}" if findings
               else "nothing capturing TLS found")
    return "\n".join(out) + "\n"


def as_json(findings: list[Finding]) -> str:
    return json.dumps([f.as_json() for f in findings], indent=1) + "\n"
