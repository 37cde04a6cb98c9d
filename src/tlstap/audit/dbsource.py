"""What the database audit sources (mysqld.py, postgres.py) share: the BPF object with its
.rodata.layout written before load, uprobes on one server binary, the ring buffer, the
kernel's counters, and the C records' ctypes mirrors (bpf/dbaudit.h; tests/abi checks them)."""
from __future__ import annotations

import contextlib
import ctypes
import enum
import os
from dataclasses import dataclass

from ..errors import UsageError
from ..events import wall_clock_offset_ns
from ..libbpf import BpfObject
from ..sources.base import Capture, CaptureConfig, bpf_object_path, set_scope

# ---- bpf/dbaudit.h --------------------------------------------------------------------------

DB_QUERY_MAX = 8192
DB_NAME_MAX = 64
PG_TAG_MAX = 32
PG_ANCESTRY_MAX = 4
NO_OFF = 0xFFFFFFFF


class DbCounter(enum.IntEnum):
    EVENTS = 0
    LOST = 1
    READ_ERRORS = 2


def cstr(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "replace")


@dataclass
class Probe:
    program: str        #: the program in the object
    offset: int         #: file offset in the server binary
    what: str           #: for status lines and errors
    retprobe: bool = False


class DbAuditCapture(Capture):
    """One server binary, its probes, one ring. Subclasses set OBJECT, KIND, `_find` (cfg ->
    [sites]) and implement probes(sites), layout(sites, rodata), attach_pid(), _on_record;
    on_event (set by AuditOutput) receives each AuditEvent."""

    OBJECT: str
    KIND: str
    LAYOUT: type

    def __init__(self, cfg: CaptureConfig, path: str):
        super().__init__(cfg)
        self.path = path
        self._lost_told = 0
        self.wall = wall_clock_offset_ns()   # BPF's monotonic ns -> wall clock, once per capture
        self.on_event = lambda ev: None

    def _find(self, cfg):
        return [self.analyze(self.path)]

    def start(self) -> None:
        self.resolve()
        sites = self.targets[0]
        with contextlib.ExitStack() as stack:
            obj = stack.enter_context(BpfObject.open(bpf_object_path(self.OBJECT)))
            set_scope(obj, self.cfg)
            self.layout(sites, obj.map(".rodata.layout").initial_value(self.LAYOUT))
            obj.map("events").max_entries = self.cfg.mapsize
            obj.load()
            for p in self.probes(sites):
                self.attach_uprobe(stack, obj.program(p.program), self.path, p.offset, p.what,
                                   pid=self.attach_pid(), retprobe=p.retprobe)
            self.open_events(stack, obj, "events")
            self._stack = stack.pop_all()

    def attach_pid(self) -> int:
        return self.cfg.pid or -1

    def describe(self) -> str:
        return ""

    def new_lost(self) -> tuple[int, str]:
        lost = self.counters()["lost"]
        new, self._lost_told = lost - self._lost_told, lost
        return new, "ring buffer full (raise --mapsize)"

    def counters(self) -> dict:
        return self.counter_sums("counters", DbCounter)


def server_path(flag: str, given: str | None, pid: int | None, defaults: tuple[str, ...]) -> str:
    """The binary to probe: the flag's, else the --pid process's executable, else the first
    default that exists."""
    if given:
        if not os.path.isfile(given):
            raise UsageError(f"{flag} {given}: no such file")
        return given
    if pid:
        exe = f"/proc/{pid}/exe"
        try:
            real = os.path.realpath(exe, strict=True)
            # a process in another mount namespace: its file by the kernel's link, not our path
            return real if os.path.samefile(real, exe) else exe
        except OSError as e:
            raise UsageError(f"--pid {pid}: cannot read its executable ({e.strerror})") from None
    for d in defaults:
        if os.path.isfile(d):
            return os.path.realpath(d)
    raise UsageError(f"no server binary found ({', '.join(defaults)}); give {flag} PATH")


class MysqldEvent(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint8),
        ("retval", ctypes.c_uint8),
        ("_pad0", ctypes.c_uint8 * 2),
        ("command", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("query_len", ctypes.c_uint32),
        ("conn_id", ctypes.c_uint64),
        ("da_status", ctypes.c_uint32),
        ("sql_errno", ctypes.c_uint32),
        ("comm", ctypes.c_char * 16),
        ("db", ctypes.c_char * DB_NAME_MAX),
        ("query", ctypes.c_char * DB_QUERY_MAX),
    ]


class MysqldLayout(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint32) for n in ("thread_id", "db", "stmt_da", "sql_errno", "status", "_pad")]


class PgEvent(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint8),
        ("msg", ctypes.c_uint8),
        ("has_text", ctypes.c_uint8),
        ("_pad0", ctypes.c_uint8),
        ("text_len", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("sqlstate", ctypes.c_uint32),
        ("rows", ctypes.c_uint64),
        ("comm", ctypes.c_char * 16),
        ("name", ctypes.c_char * DB_NAME_MAX),
        ("db", ctypes.c_char * DB_NAME_MAX),
    ]


class PgActivity(ctypes.Structure):
    _fields_ = [("e", PgEvent), ("text", ctypes.c_char * DB_QUERY_MAX)]


class PgLayout(ctypes.Structure):
    _fields_ = [
        ("tag_table", ctypes.c_int64),
        ("errordata", ctypes.c_int64),
        ("errordata_depth", ctypes.c_int64),
        ("tag_stride", ctypes.c_uint32),
        ("qc_tag", ctypes.c_uint32),
        ("qc_rows", ctypes.c_uint32),
        ("errordata_stride", ctypes.c_uint32),
        ("sqlerrcode", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]
