"""Events that flow from the sources to the outputs: TlsData (a read or write call's
plaintext), Lost, KeyLine (a secret), Packet (with its Owners).

Dataclasses with bytes payloads; repr never dumps a whole payload. Treat them as
immutable. TlsData, made once per captured call, is not frozen=True: a frozen
dataclass's __init__ sets each field through object.__setattr__, 1.4 us for 14
fields against 0.2 us (Python 3.11), and that was a tenth of text mode's cost per call.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from .abi import Direction, PktDir


def wall_clock_offset_ns() -> int:
    """Add to a BPF timestamp (bpf_ktime_get_ns: CLOCK_MONOTONIC) for CLOCK_REALTIME ns, as
    the events carry them. The tightest of a few samples."""
    best = None
    for _ in range(5):
        a = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        r = time.clock_gettime_ns(time.CLOCK_REALTIME)
        b = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if best is None or b - a < best[0]:
            best = (b - a, r - (a + b) // 2)
    return best[1]


@dataclass(frozen=True, slots=True)
class Endpoint:
    ip: str
    port: int

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if ":" in self.ip else f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class Conn:
    """A TCP connection as the capturing process sees it (local = its own socket)."""

    family: int
    local: Endpoint
    remote: Endpoint

    @classmethod
    def from_raw(cls, family: int, lport: int, rport: int, laddr: bytes, raddr: bytes) -> "Conn | None":
        if family == socket.AF_INET:
            return cls(family, Endpoint(socket.inet_ntop(family, laddr[:4]), lport),
                       Endpoint(socket.inet_ntop(family, raddr[:4]), rport))
        if family == socket.AF_INET6:
            return cls(family, Endpoint(socket.inet_ntop(family, laddr), lport),
                       Endpoint(socket.inet_ntop(family, raddr), rport))
        return None


@dataclass(slots=True)
class TlsData:
    """The plaintext of one SSL read or write call.

    `data` holds the captured bytes; `total` what the call really moved. When
    the per-call cap cut it, truncated = total - len(data) - lost."""

    ts_ns: int            # wall clock, ns since the epoch
    pid: int
    tid: int
    uid: int
    comm: str
    fd: int               # -1 when unknown
    direction: Direction
    conn: Conn | None
    ssl: int              # SSL* address: with conn_id, the connection's identity inside the process
    data: bytes = field(repr=False)
    total: int = 0
    truncated: int = 0    # bytes over --max-payload, not captured
    lost: int = 0         # captured bytes the ring buffer dropped
    fd_cached: bool = False  # fd/conn known from an earlier call (no syscall in this one)
    conn_id: int = 0      # the connection's generation (tlstap.h): (pid, ssl, conn_id) is one connection

    def __repr__(self) -> str:
        return (f"TlsData(pid={self.pid}, {self.direction.name}, {self.conn}, "
                f"data={self.data[:20]!r}{'...' if len(self.data) > 20 else ''} ({len(self.data)}/{self.total}))")


#: Why records were lost (Lost.why, the JSON `lost` record, the status lines).
RING_FULL = "ring buffer full"
RING_ROOM = "ring buffer refused with room free"      # a reservation failed with room (ring.h)
BACKLOG_FULL = "decoder backlog full"                  # the decoder's spool had no room (spool.py)


def ring_why(recs: int, room: int) -> tuple[str, str]:
    """Why a ring buffer refused records (for the `lost` record, for the status line):
    full, or a reservation failed with room free (ring.h: not a matter of --mapsize)."""
    if not room:
        return RING_FULL, f"{RING_FULL}; raise --mapsize"
    if room == recs:
        return RING_ROOM, f"{RING_ROOM} (not a matter of --mapsize)"
    return RING_FULL, f"{recs - room} for {RING_FULL}; raise --mapsize; {room} refused with room free"


@dataclass(frozen=True, slots=True)
class Lost:
    """Records lost since the last report, and why (RING_FULL, RING_ROOM, BACKLOG_FULL)."""

    records: int
    bytes: int
    why: str = RING_FULL


@dataclass(frozen=True, slots=True)
class KeyLine:
    """One NSS key log line and who produced it. repr() hides the secret."""
    label: str
    client_random: bytes
    secret: bytes
    pid: int
    tid: int
    comm: str
    derived: bool = False      # computed from a key update, not logged by the library

    def text(self) -> str:
        return f"{self.label} {self.client_random.hex()} {self.secret.hex()}"

    def __repr__(self) -> str:
        return (f"KeyLine({self.label} {self.client_random.hex()[:16]}... <{len(self.secret)} bytes> "
                f"pid={self.pid} comm={self.comm!r})")


@dataclass(frozen=True, slots=True)
class Owner:
    """The process owning a local socket of a packet."""
    pid: int
    uid: int
    comm: str


@dataclass(slots=True)   # not frozen: one per packet, and frozen __init__ costs ~0.1 us per field
class Packet:
    """One captured packet. data starts at the link-layer header (Interface.linktype)."""
    ts_ns_wall: int          #: CLOCK_REALTIME nanoseconds
    ifindex: int
    direction: PktDir
    orig_len: int            #: bytes on the wire; len(data) may be less (snaplen)
    data: bytes
    sender: Owner | None     #: owner of the source socket, if local and known
    receiver: Owner | None   #: owner of the destination socket, if local and known

    def __repr__(self) -> str:
        return (f"Packet({self.direction.name.lower()} {self.orig_len} bytes, {len(self.data)} captured, "
                f"sender={self.sender} receiver={self.receiver})")
