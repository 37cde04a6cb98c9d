"""The wire source of text mode: a connection's packets and its TLS secrets, not its plaintext.

Probes on SSL_read/SSL_write cost the traced process a uprobe per call, on its own CPU. Here
the traced process pays only what pcapng mode costs it: a key probe per handshake
(sources/keys.py) and a cgroup_skb program per TCP segment that carries data, which copies
the segment into a ring buffer. This process moves those records, and the key lines, into the
decoder's spool; the decoder process (wire/decoder.py) reassembles the TCP streams and
decrypts them, at idle priority, on CPU the traced service does not need.

Why cgroup_skb and not TC (scripts/hook_cost.py; the README has the figures): a cgroup program
sees each packet of the sockets in its cgroup whatever the interface or network namespace, with
no interface to name and none to miss (TC needs a program per interface, and new veths appear);
attached to the scope's cgroup it does not run for the host's other sockets at all; for the
traced process the two cost about the same (the copy dominates). The programs are those of pcapng mode (bpf/packets.bpf.c), with
its owner attribution (connect/accept tracepoints, /proc seeding), loaded with link header 0
(cgroup programs see packets from the IP header on) and only TCP segments with data or
SYN/FIN/RST.
"""
from __future__ import annotations

import contextlib
import time

from ..events import KeyLine
from ..preflight import cgroup2_mounted
from ..wire import keyrecord
from .base import CaptureConfig
from .packets import CG_PROGRAMS, PacketCapture

class WireCapture(PacketCapture):
    """Packets of the scope's TCP connections, and the key lines of `keys` (a KeyLogCapture,
    started by the runner as a source of its own), for the decoder's spool."""

    def __init__(self, cfg: CaptureConfig, keys, cgroup_path: str | None = None):
        super().__init__(cfg, "", None, None)
        self.keys = keys
        #: where the programs attach: --cgroup's directory, else the cgroup v2 root (every socket
        #: of the host passes; the --pid/--uid scope is applied by the programs, on the owner)
        self.cgroup = cgroup_path
        self._pending: list[bytes] = []      # framed key records not yet spooled
        self._lost_seen = (0, 0)
        keys.subscribers.append(self._on_key)

    def start(self) -> None:
        self.choose_copy()
        ingress, egress = CG_PROGRAMS[self.direct]
        with contextlib.ExitStack() as stack:
            obj = self.load_with_owners(stack, [ingress, egress], 0, False, wire=True)
            with contextlib.ExitStack() as mounted:
                where = self.cgroup or mounted.enter_context(cgroup2_mounted())
                for name, is_egress in ((ingress, False), (egress, True)):
                    self.tc_links.append(stack.enter_context(obj.program(name).attach_cgroup(where, is_egress)))
            self.open_ring(stack, obj)
            self._stack = stack.pop_all()

    def _on_key(self, line: KeyLine) -> None:
        self._pending.append(keyrecord.frame(line, time.time_ns()))

    def _flush_keys(self, write) -> int:
        if not self._pending:
            return 0
        data = b"".join(self._pending)
        self._pending.clear()
        write(memoryview(data))
        return len(data)

    # the text output's source interface (sinks/textfile.py)

    def take(self, write, max_bytes: int | None = None, scan: bool = True) -> int:
        """Key lines first (a record's keys are then in the spool before it, as a rule), then
        the packet ring's committed bytes."""
        self.keys.deliver()
        return self._flush_keys(write) + super().take(write, max_bytes, scan)

    def drain_to(self, write, max_bytes: int | None = None, scan: bool = True) -> None:
        self.keys.drain()
        self._flush_keys(write)
        super().drain_to(write, max_bytes, scan)

    def new_losses(self) -> tuple[int, int, int]:
        """(packets, bytes, packets lost with room) since the last call: packet records the
        ring refused (the bytes they held are unknown: 0)."""
        c = self.counters()
        now = (c["lost"], c["lost_room"])
        delta = now[0] - self._lost_seen[0], 0, now[1] - self._lost_seen[1]
        self._lost_seen = now
        return delta

    def counters(self) -> dict[str, int]:
        """The packet counters, with the text output's names for losses (packets; their bytes
        are unknown)."""
        c = super().counters()
        c["lost_records"], c["lost_bytes"] = c["lost"], 0
        return c

    def attached(self) -> list[str]:
        how = "one copy" if self.direct else "copied through a per-CPU buffer"
        where = f"cgroup {self.cgroup}" if self.cgroup else "the root cgroup, filtered by the scope"
        return self.keys.attached() + [
            f"wire source: cgroup_skb programs on {where} (TCP segments with data, {how}); "
            f"{self.seeded} older connections' owners from /proc"]

    def summary(self, why: str, c: dict) -> str:
        return (f"{why}: {c['packets']} packets, {c['bytes']} bytes captured from the wire; lost "
                f"{c['lost_records']} packets ({c['lost_room']} refused with room free)")

    def describe(self) -> str:
        return f", packet ring {self.cfg.mapsize >> 10} KiB"
