"""Python mirror of bpf/tlstap.h: the kernel/user record layouts and constants.

tests/abi/test_abi.py checks every size and offset here against the BTF of the
built objects, so the two cannot drift apart silently.
"""
from __future__ import annotations

import ctypes
import enum

TASK_COMM_LEN = 16
CHUNK_MAX = 32 * 1024
CHUNKS_MAX = 2048

COOKIE_DIR_MASK = 0x3
COOKIE_OUT_SHIFT = 8
COOKIE_RET_IS_COUNT = 0xFF
COOKIE_RANDOM_SHIFT = 16
COOKIE_SERVER_SHIFT = 32
COOKIE_NO_OFF = 0xFFFF
COOKIE_GO_SPILLED = 0x10000

DF_FIRST = 0x1
DF_LAST = 0x2
DF_FD_CACHED = 0x4

REC_DATA = 1

KEY_LABEL_MAX = 48
KEY_SECRET_MAX = 64
CLIENT_RANDOM_LEN = 32
KCOOKIE_SERVER_SHIFT = 16
KCOOKIE_NO_SERVER = 0xFFFF
KCOOKIE_LOGS_UPDATES_SHIFT = 32
PKT_CAP_MAX = 256 * 1024


class Direction(enum.IntEnum):
    READ = 1
    WRITE = 2
    HANDSHAKE = 3


class Counter(enum.IntEnum):
    CALLS = 0
    RECORDS = 1
    BYTES = 2
    LOST_RECORDS = 3
    LOST_BYTES = 4
    TRUNC_CALLS = 5
    TRUNC_BYTES = 6
    READ_ERRORS = 7
    LOST_ROOM = 8


CNT_MAX = len(Counter)


class KeyKind(enum.IntEnum):
    SECRET = 1
    UPDATE = 2


class KeyCounter(enum.IntEnum):
    SECRETS = 0
    UPDATES = 1
    LOST = 2
    READ_ERRORS = 3


KCNT_MAX = len(KeyCounter)


class PktDir(enum.IntEnum):
    INGRESS = 1
    EGRESS = 2


class PktFlag(enum.IntFlag):
    TO_LISTENER = 1


class PktCounter(enum.IntEnum):
    PACKETS = 0
    BYTES = 1
    LOST = 2
    FILTERED = 3
    TRUNCATED = 4
    LOST_ROOM = 5
    COPY_ERRORS = 6


PCNT_MAX = len(PktCounter)

PF_CLAUSES_MAX = 8
PF_TERMS_MAX = 8
PF_NOT = 0x1
PF_SRC = 0x2
PF_DST = 0x4
PF_BOTH = 0x8


class PfKind(enum.IntEnum):
    ETHERTYPE = 1
    PROTO = 2
    PORT = 3
    NET = 4
    LEN = 5


class ConnTuple(ctypes.Structure):
    _fields_ = [
        ("family", ctypes.c_uint16),
        ("lport", ctypes.c_uint16),
        ("rport", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16),
        ("laddr", ctypes.c_uint8 * 16),
        ("raddr", ctypes.c_uint8 * 16),
    ]


class DataEvent(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint8),
        ("dir", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("_pad0", ctypes.c_uint8),
        ("len", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
        ("ssl", ctypes.c_uint64),
        ("call_id", ctypes.c_uint64),
        ("total", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
        ("conn_id", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("comm", ctypes.c_char * TASK_COMM_LEN),
        ("tuple", ConnTuple),
    ]


class KeyEvent(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint8),
        ("server", ctypes.c_uint8),
        ("sending", ctypes.c_uint8),
        ("logs_updates", ctypes.c_uint8),
        ("secret_len", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
        ("ssl", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("_pad1", ctypes.c_uint32),
        ("comm", ctypes.c_char * TASK_COMM_LEN),
        ("label", ctypes.c_char * KEY_LABEL_MAX),
        ("client_random", ctypes.c_uint8 * CLIENT_RANDOM_LEN),
        ("secret", ctypes.c_uint8 * KEY_SECRET_MAX),
    ]


class SockOwner(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("comm", ctypes.c_char * TASK_COMM_LEN),
        ("fd", ctypes.c_int32),
    ]


class PacketEvent(ctypes.Structure):
    _fields_ = [
        ("ts_ns", ctypes.c_uint64),
        ("ifindex", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
        ("caplen", ctypes.c_uint32),
        ("dir", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("_pad0", ctypes.c_uint8 * 2),
        ("sender", SockOwner),
        ("receiver", SockOwner),
    ]


class SockEntry(ctypes.Structure):
    """Value of packets.bpf.c's sock_owner and listeners maps."""

    _fields_ = [
        ("owner", SockOwner),
        ("cgroup_id", ctypes.c_uint64),
        ("closed_ns", ctypes.c_uint64),
    ]


class PfTerm(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("_pad0", ctypes.c_uint8),
        ("lo", ctypes.c_uint16),
        ("hi", ctypes.c_uint16),
        ("addr", ctypes.c_uint64 * 2),
        ("mask", ctypes.c_uint64 * 2),
    ]


class PfClause(ctypes.Structure):
    _fields_ = [
        ("nterms", ctypes.c_uint32),
        ("_pad0", ctypes.c_uint32),
        ("terms", PfTerm * PF_TERMS_MAX),
    ]


class PktConfig(ctypes.Structure):
    """struct pkt_config: packets.bpf.c's second load-time variable, in section .rodata.pkt."""

    _fields_ = [
        ("link_hdr_len", ctypes.c_uint32),
        ("snaplen", ctypes.c_uint32),
        ("both_local", ctypes.c_uint8),
        ("wire", ctypes.c_uint8),
        ("_pad0", ctypes.c_uint8 * 2),
        ("nclauses", ctypes.c_uint32),
        ("clauses", PfClause * PF_CLAUSES_MAX),
    ]


class Config(ctypes.Structure):
    """struct config: the only variable in each object's .rodata (offset 0)."""

    _fields_ = [
        ("target_tgid", ctypes.c_uint32),
        ("target_uid", ctypes.c_uint32),
        ("max_payload", ctypes.c_uint64),
        ("target_cgroup", ctypes.c_uint64),
    ]


ANY_UID = 0xFFFFFFFF


def site_cookie(direction: Direction, out_arg: int | None,
                hello: tuple[int, int] | None = None) -> int:
    """The uprobe cookie for an attach point (see COOKIE_* in tlstap.h); hello: the offsets of
    s3.client_random and of the server flag in the build's SSL object, when established."""
    out = COOKIE_RET_IS_COUNT if out_arg is None else out_arg
    if out != COOKIE_RET_IS_COUNT and not 0 <= out <= 4:
        raise ValueError(f"out-param index {out} not supported")
    random_off, server_off = hello if hello is not None else (COOKIE_NO_OFF, COOKIE_NO_OFF)
    for off in (random_off, server_off):
        if not 0 <= off <= 0xFFFF:
            raise ValueError(f"struct offset {off:#x} does not fit the cookie")
    return (int(direction) | (out << COOKIE_OUT_SHIFT) | (random_off << COOKIE_RANDOM_SHIFT)
            | (server_off << COOKIE_SERVER_SHIFT))


def key_cookie(client_random_off: int, server_off: int | None, logs_updates: bool) -> int:
    """The uprobe cookie of a keylog attach point (see KCOOKIE_* in tlstap.h); server_off
    None: not known (no key update probe needs it)."""
    if server_off is None:
        server_off = KCOOKIE_NO_SERVER
    for off in (client_random_off, server_off):
        if not 0 <= off <= 0xFFFF:
            raise ValueError(f"struct offset {off:#x} does not fit the cookie")
    return (client_random_off | server_off << KCOOKIE_SERVER_SHIFT
            | int(logs_updates) << KCOOKIE_LOGS_UPDATES_SHIFT)


def _struct_format(ctype: type) -> str:
    """A struct-module format equal to a ctypes Structure's layout (checked by tests)."""
    codes = {ctypes.c_uint8: "B", ctypes.c_uint16: "H", ctypes.c_uint32: "I", ctypes.c_int32: "i",
             ctypes.c_uint64: "Q"}
    fmt = ""
    for name, t in ctype._fields_:
        if name.startswith("_pad"):
            fmt += f"{ctypes.sizeof(t)}x"
        elif t in codes:
            fmt += codes[t]
        elif issubclass(t, ctypes.Array):
            fmt += f"{ctypes.sizeof(t)}s"
        else:
            fmt += _struct_format(t)
    return fmt


#: DataEvent as a flat struct format: unpack_from is ~10x faster than ctypes copies.
DATA_EVENT_FORMAT = "<" + _struct_format(DataEvent)
KEY_EVENT_FORMAT = "<" + _struct_format(KeyEvent)
PACKET_EVENT_FORMAT = "<" + _struct_format(PacketEvent)
