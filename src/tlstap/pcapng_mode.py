"""-m pcapng: packets from TC and TLS secrets from the keylog probes, in one pcapng file.

Two captures run side by side: KeyLogCapture (uprobes on ssl_log_secret, see keylog.py) and
PacketCapture (TC clsact on the interface, see packets.py). Their records arrive through two
ring buffers; PcapngSink holds packets back for a short lag so a secret learnt a little after
the first encrypted packet of its connection still lands in a Decryption Secrets Block before
it. Each pass drains the key ring first, then releases packets older than the lag.
"""
from __future__ import annotations

import time

from .capture import CaptureConfig
from .keylog import KeyLine, KeyLogCapture
from .outputs.pcapng import DIR_INBOUND, DIR_OUTBOUND, PcapngSink, PcapngWriter, process_comment
from .abi import PktDir
from .packets import Packet, PacketCapture

#: How long packets wait for the secrets that decrypt them. A client logs its handshake
#: secrets right after the ServerHello arrives, so the server's encrypted flight that came
#: with it needs the wait; 0.3 s covers a loaded 2-core machine with margin.
DEFAULT_LAG_NS = 300_000_000


class PcapngCapture:
    """Use as a context manager; start() attaches both halves, poll() moves records to the file."""

    def __init__(self, cfg: CaptureConfig, ifname: str, filter_expr: str, path: str,
                 lag_ns: int = DEFAULT_LAG_NS, make_keys=None):
        """make_keys(cfg, on_line): the library's key capture (default OpenSSL's)."""
        self.writer = PcapngWriter(path)
        self.sink = PcapngSink(self.writer, lag_ns=lag_ns)
        self.keys = (make_keys or KeyLogCapture)(cfg, self._on_key)
        self.packets = PacketCapture(cfg, ifname, filter_expr, self._on_packet)
        self.secrets_written = 0
        self.packets_written = 0
        self._if_id = None
        self._drops_pending = 0
        self._lost_seen = 0
        self._closed = False
        self._stats: tuple[int, int] | None = None   # (received, dropped) for the ISB
        self._comments: dict[tuple, str] = {}

    @property
    def targets(self):
        return self.keys.targets

    @property
    def interface(self):
        return self.packets.interface

    @property
    def links(self) -> list:
        return self.keys.links + self.packets.links

    def start(self) -> None:
        self.keys.start()
        self.packets.start()
        iface = self.packets.interface
        self._if_id = self.writer.add_interface(iface.name, iface.linktype, self.packets.snaplen,
                                                description=f"ifindex {iface.ifindex}, mtu {iface.mtu}")

    def _on_key(self, line: KeyLine) -> None:
        self.secrets_written += self.sink.secrets([line.text()])

    def _on_packet(self, p: Packet) -> None:
        direction = DIR_OUTBOUND if p.direction == PktDir.EGRESS else DIR_INBOUND
        s, r = p.sender, p.receiver
        comment = None
        if s or r:
            comment = self._comments.get((s, r))    # owners are cached, so few distinct pairs
            if comment is None:
                if len(self._comments) > 4096:
                    self._comments.clear()
                comment = self._comments[(s, r)] = process_comment(s and s.pid, s and s.comm,
                                                                   r and r.pid, r and r.comm)
        self.sink.packet(self._if_id, p.ts_ns_wall, p.data, p.orig_len, direction, comment,
                         self._drops_pending)
        self._drops_pending = 0
        self.packets_written += 1

    def poll(self, timeout: float) -> int:
        self.keys.poll(0)
        n = self.packets.poll(timeout)
        self.keys.poll(0)
        self.sink.flush(time.time_ns())
        return n

    def new_losses(self) -> int:
        """Packets the kernel could not deliver since the last call (also marked in the next EPB)."""
        lost = self.packets.counters()["lost"]
        delta, self._lost_seen = lost - self._lost_seen, lost
        self._drops_pending += delta
        return delta

    def drain(self) -> None:
        self.keys.drain()
        self.packets.drain()
        self.keys.drain()

    def detach_probes(self) -> None:
        self.packets.detach_probes()
        self.keys.detach_probes()

    def counters(self) -> dict[str, int]:
        """Both halves' counters (packet_*, key_*); also kept for the statistics block at close."""
        p = self.packets.counters()
        self._stats = (p["packets"] + p["lost"], p["lost"])
        c = {f"packet_{k}": v for k, v in p.items()}
        c.update({f"key_{k}": v for k, v in self.keys.counters().items()})
        return c

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._if_id is not None and self._stats is not None:
                self.sink.close(stats={self._if_id: self._stats})
            else:
                self.sink.close()
        finally:
            self.packets.close()
            self.keys.close()

    def __enter__(self) -> "PcapngCapture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
