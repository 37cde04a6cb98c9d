"""`tlstap mysqld`: each command MariaDB's server runs (COM_QUERY, COM_INIT_DB,
COM_STMT_PREPARE), with its connection id, database, text and how it ended.

Where the probes sit and what they read, found in the binary itself (mariadbd exports its
symbols; Debian's build has no DWARF):
  dispatch_command(enum_server_command, THD*, char *packet, uint length, bool)
      entry: the command, its text; return: the outcome (bpf/mysqld.bpf.c)
  THD::thread_id          from thd_get_thread_id:    mov (thd+X), %rax
  THD::db                 from thd_current_db:        lea/mov (thd+X), %rax
  THD::m_stmt_da and Diagnostics_area::m_sql_errno
                          from thd_get_error_number:  mov (thd+X),%rax; mov (%rax+Y),%eax
  Diagnostics_area::m_status and its DA_ERROR value
                          from Diagnostics_area::set_error_status: the DA_DISABLED test
                          `cmp $k, S(%rdi)` names the member, the store `movl $v, S(..)` the value
A missing accessor leaves its field out (told in the status line); a missing dispatch_command
refuses the binary.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from capstone import x86 as cx

from ..errors import UsageError
from ..probes.elf import ElfError, open_x86_64
from ..probes.x86 import Code
from .dbsource import (DB_QUERY_MAX, NO_OFF, DbAuditCapture, MysqldEvent, MysqldLayout,
                       Probe, cstr)
from .output import AuditEvent

DISPATCH = "_Z16dispatch_command19enum_server_commandP3THDPcjb"
SET_ERROR_STATUS = ("_ZN16Diagnostics_area16set_error_statusEjPKcS1_RK27Sql_user_condition_identity"
                    "PK13Sql_condition")
COMMANDS = {2: "init_db", 3: "query", 22: "prepare"}      # protocol command bytes we report
MYSQLD_QUERY, MYSQLD_DONE = 1, 2
_HEAD = struct.Struct("<BB2xIQIIIIQII16s")     # struct mysqld_event up to db: all a DONE record has
_DB, _QUERY = MysqldEvent.db.offset, MysqldEvent.query.offset


@dataclass
class MysqldSites:
    path: str
    dispatch: int                   #: file offset of dispatch_command's probe
    dispatch_insn: str
    version: str | None
    offsets: dict = field(default_factory=dict)     #: MysqldLayout field -> offset (absent: not found)
    da_error: int | None = None     #: Diagnostics_area's DA_ERROR status value


def _mem(op):
    return op.type == cx.X86_OP_MEM


def _body(code: Code, img, name: str) -> list:
    s = img.function(name)
    if s is None or not s.size:
        return []
    return code.body(s.vaddr, s.vaddr + s.size)


def _rdi_disp(insn, idx: int = 1) -> int | None:
    """X of an operand (%rdi+X)."""
    ops = insn.operands
    if len(ops) > idx and _mem(ops[idx]) and ops[idx].mem.base == cx.X86_REG_RDI and not ops[idx].mem.index:
        return ops[idx].mem.disp
    return None


def thread_id_offset(code: Code, img) -> int | None:
    """thd_get_thread_id(thd) { return thd->thread_id; }"""
    b = _body(code, img, "thd_get_thread_id")
    if len(b) >= 2 and b[0].mnemonic == "mov" and b[1].mnemonic == "ret":
        return _rdi_disp(b[0])
    return None


def db_offset(code: Code, img) -> int | None:
    """thd_current_db(thd): &thd->db (lea) or thd->db.str (mov); either way db.str is there."""
    b = _body(code, img, "thd_current_db")
    if len(b) >= 2 and b[0].mnemonic in ("lea", "mov") and b[1].mnemonic == "ret":
        return _rdi_disp(b[0])
    return None


def error_number_offsets(code: Code, img) -> tuple[int, int] | None:
    """thd_get_error_number(thd) { return thd->get_stmt_da()->sql_errno(); }"""
    b = _body(code, img, "thd_get_error_number")
    if len(b) >= 3 and b[0].mnemonic == "mov" and b[1].mnemonic == "mov" and b[2].mnemonic == "ret":
        da = _rdi_disp(b[0])
        ops = b[1].operands
        if da is not None and _mem(ops[1]) and ops[1].mem.base == b[0].operands[0].reg:
            return da, ops[1].mem.disp
    return None


def status_member(code: Code, img) -> tuple[int, int] | None:
    """(offset of m_status, DA_ERROR) from set_error_status(uint, const char*, const char*,
    const Sql_user_condition_identity&, const Sql_condition*): it returns at once when the
    area is disabled (`cmp $DA_DISABLED, m_status(%rdi)`) and ends storing DA_ERROR there,
    in its own body or in the function it jumps to."""
    b = _body(code, img, SET_ERROR_STATUS)
    if not b or b[0].mnemonic != "cmp" or _rdi_disp(b[0], 0) is None:
        return None
    status = _rdi_disp(b[0], 0)
    bodies = [b]
    for i in b:
        if i.mnemonic == "jmp" and i.operands[0].type == cx.X86_OP_IMM:
            rng = img.function_range(i.operands[0].imm)
            if rng is not None and rng[0] == i.operands[0].imm:
                bodies.append(code.body(*rng))
    for body in bodies:
        for i in body:
            ops = i.operands
            if (i.mnemonic == "mov" and len(ops) == 2 and _mem(ops[0]) and ops[0].mem.disp == status
                    and ops[0].size == 4 and ops[1].type == cx.X86_OP_IMM):
                return status, ops[1].imm
    return None


def analyze_mysqld(path: str) -> MysqldSites:
    try:
        _st, img = open_x86_64(path)
    except ElfError as e:
        raise UsageError(f"--mysqld: {e}") from None
    with img:
        fn = img.function(DISPATCH)
        if fn is None:
            raise UsageError(f"--mysqld {path}: no dispatch_command(enum_server_command, THD*, char*, uint, "
                             f"bool) in its symbols: not MariaDB's server (mariadbd)")
        code = Code(img)
        offset, insn = code.entry_site(fn.vaddr)
        sites = MysqldSites(path, offset, insn, _version(img))
        for name, value in (("thread_id", thread_id_offset(code, img)), ("db", db_offset(code, img))):
            if value is not None:
                sites.offsets[name] = value
        if (en := error_number_offsets(code, img)) is not None:
            sites.offsets["stmt_da"], sites.offsets["sql_errno"] = en
        if (sm := status_member(code, img)) is not None:
            sites.offsets["status"], sites.da_error = sm
        return sites


def _version(img) -> str | None:
    """The server version string (e.g. "10.11.14-MariaDB-0+deb12u2"), as it says of itself."""
    m = img.search_rodata(rb"\x00(\d+\.\d+\.\d+-MariaDB[\w.+~-]*)\x00")
    return m.group(1).decode() if m else None


class MysqldAudit(DbAuditCapture):
    OBJECT = "mysqld.bpf.o"
    KIND = "mysqld"
    LAYOUT = MysqldLayout

    def __init__(self, cfg, path: str):
        super().__init__(cfg, path)
        self._pending: dict[int, AuditEvent] = {}    # tid -> its command, until it returns

    def analyze(self, path: str) -> MysqldSites:
        return analyze_mysqld(path)

    def layout(self, sites: MysqldSites, lay) -> None:
        for name in ("thread_id", "db", "stmt_da", "sql_errno", "status"):
            setattr(lay, name, sites.offsets.get(name, NO_OFF))

    def probes(self, sites: MysqldSites) -> list[Probe]:
        return [Probe("dispatch_enter", sites.dispatch, "dispatch_command"),
                Probe("dispatch_exit", sites.dispatch, "dispatch_command", retprobe=True)]

    def attached(self) -> list[str]:
        s = self.targets[0]
        o = s.offsets
        have = [f"THD::thread_id +{o['thread_id']:#x}" if "thread_id" in o else "no connection id",
                f"THD::db +{o['db']:#x}" if "db" in o else "no database"]
        if s.da_error is not None and "stmt_da" in o:
            have.append(f"THD::m_stmt_da +{o['stmt_da']:#x} (errno +{o['sql_errno']:#x}, status "
                        f"+{o['status']:#x}, DA_ERROR={s.da_error})")
        else:
            have.append("no statement status")
        return [f"attached {s.path} ({s.version or 'version unknown'}): dispatch_command({s.dispatch_insn}) "
                f"entry and return; {', '.join(have)}"]

    def _on_record(self, view) -> None:
        if len(view) < _HEAD.size:
            return
        (kind, _ret, command, ts, pid, tid, uid, qlen, conn_id, da_status, sql_errno,
         comm) = _HEAD.unpack_from(view)
        if kind == MYSQLD_QUERY and len(view) >= _QUERY:     # the record ends with the query's bytes
            if (old := self._pending.pop(tid, None)) is not None:
                self.on_event(old)               # its return was lost: told without an outcome
            text = bytes(view[_QUERY:]).decode("utf-8", "replace")
            db = cstr(bytes(view[_DB:_QUERY]))
            fields = {"conn_id": conn_id if "thread_id" in self.targets[0].offsets else None,
                      "db": db or None, "command": COMMANDS.get(command, str(command)),
                      "status": None, "errno": None}
            if qlen > DB_QUERY_MAX:
                fields["truncated_from"] = qlen
            self._pending[tid] = AuditEvent(self.KIND, ts + self.wall, pid, tid, uid, cstr(comm), text, fields)
        elif kind == MYSQLD_DONE:
            ev = self._pending.pop(tid, None)
            if ev is None:
                return
            s = self.targets[0]
            if s.da_error is not None and "stmt_da" in s.offsets:
                error = da_status == s.da_error
                ev.fields["status"] = "error" if error else "ok"
                ev.fields["errno"] = sql_errno if error else None
            self.on_event(ev)

    def drain(self) -> None:
        super().drain()
        for ev in self._pending.values():        # still running when the capture ended
            self.on_event(ev)
        self._pending.clear()

