"""Key log lines in the wire source's spool, beside the packet records.

The spool (spool.py) holds ring-buffer records, framing and all; the wire source writes its
key lines there as records of the same framing, so the decoder process sees secrets and
packets in the order the capture took them. A packet record starts with its ts_ns, which
bpf_ktime_get_ns() never makes 0: a record starting with 8 zero bytes is a key line.
"""
from __future__ import annotations

import struct

from ..events import KeyLine
from ..libbpf.ringbuf import HDR_SZ

MARK = bytes(8)
_HEAD = struct.Struct("<8sQBB")      # MARK, wall-clock ns when taken, label length, secret length
_RING_HDR = struct.Struct("<II")     # a ring record's length word and page offset (unused here)


def frame(line: KeyLine, wall_ns: int) -> bytes:
    """One ring-framed record holding `line`."""
    label = line.label.encode()
    body = (_HEAD.pack(MARK, wall_ns, len(label), len(line.secret)) + label + line.client_random
            + line.secret)
    pad = -(len(body) + HDR_SZ) % 8
    return _RING_HDR.pack(len(body), 0) + body + bytes(pad)


def is_key(rec) -> bool:
    return rec[:8] == MARK


def parse(rec) -> tuple[int, str, bytes, bytes]:
    """(wall ns, label, client_random, secret) of a record frame() made."""
    _, wall, nl, ns = _HEAD.unpack_from(rec, 0)
    off = _HEAD.size
    label = bytes(rec[off:off + nl]).decode()
    off += nl
    return wall, label, bytes(rec[off:off + 32]), bytes(rec[off + 32:off + 32 + ns])
