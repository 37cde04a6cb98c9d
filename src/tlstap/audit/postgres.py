"""`tlstap postgres`: each statement PostgreSQL's backends run, with the backend pid, user,
database, the statement's text, and its result: the command tag and rows, or the SQLSTATE.

Probes (all on functions the server exports; bpf/postgres.bpf.c says what each tells):
PostgresMain, pq_getbyte (return), pgstat_report_activity, EndCommand, EmitErrorReport.
Layouts found in the binary (Debian's build is stripped and has no DWARF):
  QueryCompletion.commandTag/.nprocessed   InitializeQueryCompletion's two stores
  the command tag names                    GetCommandTagName: lea table(%rip); shl $k; mov (table+i)
  errordata[], errordata_stack_depth,      errcode(): movslq depth(%rip); imul $size;
  sizeof(ErrorData), .sqlerrcode             lea errordata(%rip); mov %edi, off(errordata+i*size)
Globals are given to the kernel relative to the probe that reads them (PIE: no load address).

What is reported, per backend (StatementTracker): a statement opens when the backend reports
it running (its text) and closes when the next one opens or the backend goes idle (ready for
query). Simple protocol: one event per Query message, its text as sent (several statements
in one message stay one event, with the last command's tag). Extended protocol: one event per
Execute, with the prepared statement's text; Parse and Bind are reported only when they fail
(an Execute follows a good one). The result: the tag and rows of the last command completed,
or the SQLSTATE of an error (classes 00-02 are not errors) sent while the statement ran.
"""
from __future__ import annotations

import os
import re
import struct
import time
from dataclasses import dataclass, field

from capstone import x86 as cx

from ..errors import UsageError
from ..probes.elf import ElfError, open_x86_64
from ..probes.x86 import Code
from .dbsource import DB_QUERY_MAX, DbAuditCapture, PgActivity, PgLayout, Probe, cstr
from .output import AuditEvent

PG_SESSION, PG_ACTIVITY, PG_END, PG_ERROR = 1, 2, 3, 4
MESSAGES = {"Q": "query", "P": "parse", "B": "bind", "E": "execute", "F": "function"}
_HEAD = struct.Struct("<BBBxIQIIIIQ16s64s64s")       # struct pg_event
_TEXT = PgActivity.text.offset

#: how often backends that exited are looked for (their statements told, their sessions dropped)
SWEEP_INTERVAL_S = 1.0

FUNCTIONS = ("PostgresMain", "pq_getbyte", "pgstat_report_activity", "EndCommand", "EmitErrorReport",
             "InitializeQueryCompletion", "GetCommandTagName", "errcode")


@dataclass
class PgSites:
    path: str
    version: str | None
    probes: dict = field(default_factory=dict)      #: function -> (file offset, vaddr, insn)
    layout: dict = field(default_factory=dict)      #: PgLayout field -> value


def _rip_target(insn, op) -> int | None:
    if op.type == cx.X86_OP_MEM and op.mem.base == cx.X86_REG_RIP:
        return insn.address + insn.size + op.mem.disp
    return None


def _body(code: Code, img, name: str) -> list:
    s = img.function(name)
    return code.body(s.vaddr, s.vaddr + s.size) if s and s.size else []


def query_completion(code: Code, img) -> tuple[int, int] | None:
    """(commandTag, nprocessed) offsets: InitializeQueryCompletion(qc) stores 0 in each, a
    4-byte enum and a uint64."""
    tag = rows = None
    for i in _body(code, img, "InitializeQueryCompletion"):
        ops = i.operands
        if i.mnemonic == "mov" and len(ops) == 2 and ops[0].type == cx.X86_OP_MEM and \
                ops[0].mem.base == cx.X86_REG_RDI and ops[1].type == cx.X86_OP_IMM:
            if ops[0].size == 4:
                tag = ops[0].mem.disp
            elif ops[0].size == 8:
                rows = ops[0].mem.disp
    return (tag, rows) if tag is not None and rows is not None else None


def tag_table(code: Code, img) -> tuple[int, int] | None:
    """(vaddr of the first tag's name pointer, bytes per tag) from GetCommandTagName."""
    table = stride = None
    for i in _body(code, img, "GetCommandTagName"):
        ops = i.operands
        if i.mnemonic == "lea" and (t := _rip_target(i, ops[1])) is not None:
            table = t
        elif i.mnemonic == "shl" and ops[1].type == cx.X86_OP_IMM:
            stride = 1 << ops[1].imm
        elif i.mnemonic == "mov" and table is not None and ops[1].type == cx.X86_OP_MEM and stride:
            return table + ops[1].mem.disp, stride
    return None


def error_data(code: Code, img) -> dict | None:
    """errcode(sqlerrcode) { errordata[errordata_stack_depth].sqlerrcode = sqlerrcode; }"""
    out = {}
    for i in _body(code, img, "errcode"):
        ops = i.operands
        if i.mnemonic == "movsxd" and (t := _rip_target(i, ops[1])) is not None:
            out["depth"] = t
        elif i.mnemonic == "imul" and len(ops) == 3 and ops[2].type == cx.X86_OP_IMM:
            out["stride"] = ops[2].imm
        elif i.mnemonic == "lea" and (t := _rip_target(i, ops[1])) is not None:
            out["errordata"] = t
        elif i.mnemonic == "mov" and ops[0].type == cx.X86_OP_MEM and ops[1].type == cx.X86_OP_REG \
                and i.reg_name(ops[1].reg) == "edi":
            out["code"] = ops[0].mem.disp
            break
    return out if len(out) == 4 else None


def analyze_postgres(path: str) -> PgSites:
    try:
        _st, img = open_x86_64(path)
    except ElfError as e:
        raise UsageError(f"--postgres: {e}") from None
    with img:
        missing = [f for f in FUNCTIONS if img.function(f) is None]
        if missing:
            raise UsageError(f"--postgres {path}: {', '.join(missing)} not in its symbols: not PostgreSQL's "
                             f"server (postgres)")
        code = Code(img)
        sites = PgSites(path, _version(img))
        for name in ("PostgresMain", "pq_getbyte", "pgstat_report_activity", "EndCommand", "EmitErrorReport"):
            fn = img.function(name)
            offset, insn = code.entry_site(fn.vaddr)
            sites.probes[name] = (offset, fn.vaddr + offset - img.vaddr_to_offset(fn.vaddr), insn)
        qc, tags, ed = query_completion(code, img), tag_table(code, img), error_data(code, img)
        for what, v in (("QueryCompletion (InitializeQueryCompletion)", qc),
                        ("the command tag table (GetCommandTagName)", tags), ("errordata (errcode)", ed)):
            if v is None:
                raise UsageError(f"--postgres {path}: cannot find {what} in its code: a build tlstap does not know")
        end = sites.probes["EndCommand"][1]
        err = sites.probes["EmitErrorReport"][1]
        sites.layout = {"qc_tag": qc[0], "qc_rows": qc[1], "tag_table": tags[0] - end, "tag_stride": tags[1],
                        "errordata": ed["errordata"] - err, "errordata_depth": ed["depth"] - err,
                        "errordata_stride": ed["stride"], "sqlerrcode": ed["code"]}
        return sites


def _version(img) -> str | None:
    m = img.search_rodata(rb"PostgreSQL (\d+\.\d+[^\x00]{0,60}) on x86_64")
    return m.group(1).decode().split(" ")[0] if m else None


def sqlstate(code: int) -> str:
    """MAKE_SQLSTATE's packing undone: five characters, six bits each, first lowest."""
    return "".join(chr(((code >> (6 * i)) & 0x3F) + ord("0")) for i in range(5))


def session_from_cmdline(pid: int) -> tuple[str | None, str | None]:
    """(user, database) of a backend that started before the capture, from the process title it
    sets: "postgres: [cluster_name: ]USER DATABASE HOST ACTIVITY"."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().split(b"\0", 1)[0].decode("utf-8", "replace")
    except OSError:
        return None, None
    m = re.match(r"postgres: (?:\S+: )?(\S+) (\S+) ", title)
    return (m.group(1), m.group(2)) if m else (None, None)


@dataclass
class _Statement:
    event: AuditEvent
    msg: str
    tag: str | None = None
    rows: int | None = None
    error: str | None = None


class StatementTracker:
    """Sans-IO: the kernel's records of one host in, AuditEvents out (see the module doc)."""

    def __init__(self, on_event, wall_ns: int = 0):
        self.on_event = on_event
        self.wall = wall_ns
        self.sessions: dict[int, tuple[str | None, str | None]] = {}
        self.open: dict[int, _Statement] = {}

    def session(self, pid: int, user: str, db: str) -> None:
        self.sessions[pid] = (user, db)

    def activity(self, pid: int, tid: int, uid: int, comm: str, ts: int, msg: str, text: str | None,
                 text_len: int) -> None:
        self.close(pid)
        if text is None or not msg:       # idle; or no frontend message (a parallel worker, autovacuum)
            return
        if pid not in self.sessions:
            self.sessions[pid] = session_from_cmdline(pid)
        user, db = self.sessions[pid]
        fields = {"user": user, "db": db, "protocol": "simple" if msg == "Q" else "extended",
                  "message": MESSAGES.get(msg, msg), "status": None, "tag": None, "rows": None, "sqlstate": None}
        if text_len >= DB_QUERY_MAX:      # the kernel kept DB_QUERY_MAX - 1 bytes of a longer text
            fields["truncated"] = True
        self.open[pid] = _Statement(AuditEvent("postgres", ts + self.wall, pid, tid, uid, comm, text, fields), msg)

    def end(self, pid: int, tag: str, rows: int) -> None:
        if (st := self.open.get(pid)) is not None:
            st.tag, st.rows, st.error = tag, rows, None

    def error(self, pid: int, code: str) -> None:
        if (st := self.open.get(pid)) is not None:
            st.error = code

    def close(self, pid: int) -> None:
        st = self.open.pop(pid, None)
        if st is None or (st.msg in ("P", "B") and st.error is None):
            return                        # a good Parse or Bind: its Execute is the event
        f = st.event.fields
        f["status"] = "error" if st.error else "ok"
        f["sqlstate"] = st.error
        if not st.error:
            f["tag"], f["rows"] = st.tag, st.rows
        self.on_event(st.event)

    def close_all(self) -> None:
        for pid in list(self.open):
            self.close(pid)

    def sweep(self, alive) -> None:
        """Backends that exited (alive(pid) false): their open statement is told as it stands
        (a FATAL error ends a backend without an idle report), their session forgotten."""
        for pid in [p for p in self.sessions.keys() | self.open.keys() if not alive(p)]:
            self.close(pid)
            self.sessions.pop(pid, None)


class PostgresAudit(DbAuditCapture):
    OBJECT = "postgres.bpf.o"
    KIND = "postgres"
    LAYOUT = PgLayout

    def __init__(self, cfg, path: str):
        super().__init__(cfg, path)
        self.tracker = StatementTracker(lambda ev: self.on_event(ev), self.wall)
        self._swept = time.monotonic()

    def analyze(self, path: str) -> PgSites:
        return analyze_postgres(path)

    def layout(self, sites: PgSites, lay) -> None:
        for k, v in sites.layout.items():
            setattr(lay, k, v)

    def attach_pid(self) -> int:
        return -1       # the backends are other processes: the kernel's scope test follows parents

    def probes(self, sites: PgSites) -> list[Probe]:
        p = sites.probes
        return [Probe("postgres_main", p["PostgresMain"][0], "PostgresMain"),
                Probe("getbyte_exit", p["pq_getbyte"][0], "pq_getbyte", retprobe=True),
                Probe("report_activity", p["pgstat_report_activity"][0], "pgstat_report_activity"),
                Probe("end_command", p["EndCommand"][0], "EndCommand"),
                Probe("emit_error", p["EmitErrorReport"][0], "EmitErrorReport")]

    def attached(self) -> list[str]:
        s = self.targets[0]
        lay = s.layout
        return [f"attached {s.path} (PostgreSQL {s.version or 'version unknown'}): "
                + ", ".join(f"{n}({insn})" for n, (_o, _v, insn) in s.probes.items())
                + f"; QueryCompletion tag +{lay['qc_tag']:#x} rows +{lay['qc_rows']:#x}, command tags every "
                  f"{lay['tag_stride']} bytes, ErrorData {lay['errordata_stride']} bytes (sqlerrcode "
                  f"+{lay['sqlerrcode']:#x})"]

    def _on_record(self, view) -> None:
        if len(view) < _HEAD.size:
            return
        (kind, msg, has_text, text_len, ts, pid, tid, uid, code, rows, comm, name,
         db) = _HEAD.unpack_from(view)
        t = self.tracker
        if kind == PG_SESSION:
            t.session(pid, cstr(name), cstr(db))
        elif kind == PG_ACTIVITY:
            text = cstr(bytes(view[_TEXT:])) if has_text else None     # the record ends with its text
            t.activity(pid, tid, uid, cstr(comm), ts, chr(msg) if msg else "", text, text_len)
        elif kind == PG_END:
            t.end(pid, cstr(name), rows)
        elif kind == PG_ERROR:
            t.error(pid, sqlstate(code))

    def deliver(self) -> int:
        n = super().deliver()
        now = time.monotonic()
        if now - self._swept >= SWEEP_INTERVAL_S:
            self._swept = now
            self.tracker.sweep(lambda pid: os.path.exists(f"/proc/{pid}"))
        return n

    def drain(self) -> None:
        super().drain()
        self.tracker.close_all()        # still running when the capture ended: told as they stand

