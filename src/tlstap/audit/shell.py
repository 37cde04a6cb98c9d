"""tlstap bash / tlstap zsh: the command lines users enter, with their tty and exit status.

Where the probes go, found in the shell's own binary (its symbols, and for zsh a look at its
code with capstone), never from a table of versions:

  bash  readline() returns each line the parser reads. Debian links readline into bash
        statically, and bash exports all its symbols (for loadable builtins), so readline's
        functions, parse_command and the globals are in .dynsym. The probes sit on
        readline_internal_teardown, whose return value readline returns, called once the line
        is entered. parse_command() starts each top-level command; there
        last_command_exit_value is $? of the previous one. Nested calls (eval,
        source, PROMPT_COMMAND go through parse_and_execute) have parse_and_execute_level > 0;
        `read -e` reads with readline inside a builtin (executing_builtin > 0).
  zsh   the zle module (zle.so, which an interactive zsh loads) edits a line in zleread(lp,
        rp, flags, context, ...), whose last step, zlegetline(NULL, NULL), returns it with a
        newline appended (an aborted edit gets none). That step too comes after Enter. zleread's
        context leaves out select's replies and vared's edits. $? is lastval, in the zsh
        binary, read where the main loop asks for a command's first line: zleentry(cmd READ,
        ..., context LINE_START). The constants are those execselect passes to zleentry (READ
        and SELECT); the other contexts follow from the enum's order (LINE_START, LINE_CONT,
        SELECT, VARED), which SELECT's value checks.
  A line being typed when tlstap starts is seen (its editor's last step comes later); a
  return probe on readline or zleentry would miss it, the call having begun before the probe.

The kernel side (bpf/shell.bpf.c) sends SHELL_LINE records (the line, in chunks) and
SHELL_PROMPT records (the status); CommandGrouper turns them into commands: the lines since
the last prompt of that shell, with the status of the next prompt. A command still running
when the shell exits or tlstap stops is written with no status.
"""
from __future__ import annotations

import contextlib
import ctypes
import enum
import os
import re
import shutil
import time
from dataclasses import dataclass, field

from ..errors import UsageError
from ..events import wall_clock_offset_ns
from ..libbpf import BpfObject
from ..probes.elf import ElfImage, open_x86_64
from ..probes.x86 import Code
from ..sources.base import Capture, CaptureConfig, bpf_object_path, set_scope
from .output import AuditEvent

# ---- the ABI of bpf/shell.h (tests/unit/test_shell_abi.py checks this mirror) ----------------

SHELL_LINE_MAX = 4096
SHELL_CHUNKS_MAX = 16
SHELL_TTY_MAX = 32
SF_MORE = 0x1
SF_TRUNCATED = 0x2


class ShellKind(enum.IntEnum):
    SHELL_LINE = 1
    SHELL_PROMPT = 2


class ShellCounter(enum.IntEnum):
    SCNT_LINES = 0
    SCNT_PROMPTS = 1
    SCNT_LOST = 2
    SCNT_READ_ERRORS = 3


class ShellEvent(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("len", ctypes.c_uint16),
        ("status", ctypes.c_int32),
        ("ts_ns", ctypes.c_uint64),
        ("start_ns", ctypes.c_uint64),
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("comm", ctypes.c_char * 16),
        ("tty", ctypes.c_char * SHELL_TTY_MAX),
        ("line", ctypes.c_char * SHELL_LINE_MAX),
    ]


class ShellConfig(ctypes.Structure):
    _fields_ = [
        ("status_off", ctypes.c_int64),
        ("nest_off", ctypes.c_int64),
        ("busy_off", ctypes.c_int64),
        ("read_cmd", ctypes.c_int32),
        ("start_ctx", ctypes.c_int32),
        ("select_ctx", ctypes.c_int32),
        ("vared_ctx", ctypes.c_int32),
    ]


# ---- where to probe --------------------------------------------------------------------------


@dataclass
class Probe:
    program: str        #: in shell.bpf.o
    offset: int         #: file offset of the probed instruction
    retprobe: bool
    what: str           #: for status lines and errors
    path: str = ""      #: the file, when not the shell's own (zsh's zle.so)


@dataclass
class ShellTarget:
    shell: str                    #: "bash" or "zsh"
    path: str
    probes: list[Probe]
    config: dict                  #: ShellConfig's fields
    found: str                    #: what the status line says was found


def _global(img: ElfImage, name: str) -> int | None:
    """The address of a data symbol (exported, or in .symtab)."""
    for table in (".dynsym", ".symtab"):
        sec = img.elf.get_section_by_name(table)
        if sec is None:
            continue
        for sym in sec.get_symbol_by_name(name) or ():
            if sym["st_info"]["type"] == "STT_OBJECT" and sym["st_shndx"] != "SHN_UNDEF":
                return sym["st_value"]
    return None


def _site(code: Code, vaddr: int) -> tuple[int, int]:
    """(file offset, address) of the instruction a probe on the function at vaddr sits on
    (Code.entry_site: past a CET endbr64 when a push follows)."""
    offset, _mn = code.entry_site(vaddr)
    return offset, vaddr + offset - code.img.vaddr_to_offset(vaddr)


def _need(img: ElfImage, path: str, shell: str, functions: tuple, globals_: tuple) -> dict[str, int]:
    """The addresses of the symbols a shell's probes use; a one-line error naming the file and
    what it lacks."""
    found = {}
    for name in functions:
        sym = img.function(name)
        if sym is not None:
            found[name] = sym.vaddr
    for name in globals_:
        addr = _global(img, name)
        if addr is not None:
            found[name] = addr
    missing = [n for n in functions + globals_ if n not in found]
    if missing:
        what = {"bash": "bash with readline linked in", "zsh": "zsh"}[shell]
        dyn = [n for n in img.needed if "readline" in n]
        hint = f" (it loads {dyn[0]}: a readline linked dynamically is not supported)" if dyn else ""
        raise UsageError(f"{path}: no {', '.join(missing)}: not a {what}{hint} (--{shell} PATH)")
    return found


def find_bash(path: str) -> ShellTarget:
    _st, img = open_x86_64(path)
    with img:
        code = Code(img)
        a = _need(img, path, "bash", ("readline_internal_teardown", "parse_command"),
                  ("last_command_exit_value", "parse_and_execute_level", "executing_builtin"))
        rl_off, rl_addr = _site(code, a["readline_internal_teardown"])
        pc_off, pc_addr = _site(code, a["parse_command"])
        config = {"status_off": a["last_command_exit_value"] - pc_addr,
                  "nest_off": a["parse_and_execute_level"] - pc_addr,
                  "busy_off": a["executing_builtin"] - rl_addr}
        probes = [Probe("bash_read_enter", rl_off, False, "readline_internal_teardown"),
                  Probe("read_return", rl_off, True, "readline_internal_teardown"),
                  Probe("bash_prompt", pc_off, False, "parse_command")]
        found = ("readline (linked in) returns the lines from readline_internal_teardown, "
                 "parse_command reads $? from last_command_exit_value")
        return ShellTarget("bash", path, probes, config, found)


#: zsh's enum of zle contexts (zsh.h: ZLCON_LINE_START, ZLCON_LINE_CONT, ZLCON_SELECT,
#: ZLCON_VARED): its order is checked by SELECT's value, which execselect shows
_ZLCON_LINE_START, _ZLCON_SELECT, _ZLCON_VARED = 0, 2, 3
_IMM = re.compile(r"0x[0-9a-f]+|\d+")
#: where zsh keeps its modules: a string in its .rodata such as /usr/lib/x86_64-linux-gnu/zsh/5.9
_MODULE_DIR = re.compile(rb"/[\x21-\x7e]*/zsh/[0-9][\x21-\x7e]*(?=\0)")


def _zle_read_call(img: ElfImage, code: Code, caller: str, callee: int) -> tuple[int, int] | None:
    """(cmd, context): the constants in edi and r8d at `caller`'s call of zleentry."""
    fn = img.function(caller)
    if fn is None:
        return None
    body = code.body(fn.vaddr, fn.vaddr + fn.size)
    for k, insn in enumerate(body):
        if insn.mnemonic != "call" or not insn.op_str.startswith("0x") or int(insn.op_str, 16) != callee:
            continue
        regs = {}
        for prev in reversed(body[max(0, k - 16):k]):
            ops = prev.op_str.split(", ")
            if len(ops) == 2 and ops[0] in ("edi", "r8d") and ops[0] not in regs:
                if prev.mnemonic == "mov" and _IMM.fullmatch(ops[1]):
                    regs[ops[0]] = int(ops[1], 0)
                elif prev.mnemonic == "xor" and ops[1] == ops[0]:
                    regs[ops[0]] = 0
            if prev.mnemonic in ("call", "ret", "jmp"):
                break
        if "edi" in regs and "r8d" in regs:
            return regs["edi"], regs["r8d"]
    return None


def zle_module(zsh: str, img: ElfImage, pid: int | None) -> str:
    """zsh's zle.so: the one --pid has loaded, else the one in the module directory the binary
    names."""
    if pid is not None:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5].rstrip().endswith("/zsh/zle.so"):
                        return parts[5].rstrip()
        except OSError:
            pass
    for m in _MODULE_DIR.finditer(_rodata(img)):
        cand = os.path.join(m.group().decode(), "zsh", "zle.so")
        if os.path.isfile(cand):
            return cand
    raise UsageError(f"{zsh}: its zle module (zsh/zle.so) is not where the binary says: no line editor to probe")


def _rodata(img: ElfImage) -> bytes:
    sec = img.elf.get_section_by_name(".rodata")
    return sec.data() if sec is not None else b""


def find_zsh(path: str, pid: int | None = None) -> ShellTarget:
    _st, img = open_x86_64(path)
    with img:
        code = Code(img)
        a = _need(img, path, "zsh", ("zleentry", "execselect"), ("lastval",))
        call = _zle_read_call(img, code, "execselect", a["zleentry"])
        if call is None or call[1] != _ZLCON_SELECT:
            raise UsageError(f"{path}: execselect's call of zleentry does not show zle's read command and "
                             f"contexts as tlstap knows them (as in zsh 5.9): not supported")
        read_cmd, select_ctx = call
        off, addr = _site(code, a["zleentry"])
        zle = zle_module(path, img, pid)
    _st, zimg = open_x86_64(zle)
    with zimg:
        zcode = Code(zimg)
        z = _need(zimg, zle, "zsh", ("zleread", "zlegetline"), ())
        read_off, _ = _site(zcode, z["zleread"])
        line_off, _ = _site(zcode, z["zlegetline"])
    config = {"status_off": a["lastval"] - addr, "read_cmd": read_cmd, "start_ctx": _ZLCON_LINE_START,
              "select_ctx": select_ctx, "vared_ctx": _ZLCON_VARED}
    probes = [Probe("zsh_prompt", off, False, "zleentry", path),
              Probe("zsh_read_enter", read_off, False, "zleread", zle),
              Probe("zsh_line_enter", line_off, False, "zlegetline", zle),
              Probe("read_return", line_off, True, "zlegetline", zle)]
    found = (f"zle ({zle}) returns the lines from zleread's zlegetline (select's replies, context "
             f"{select_ctx}, and vared left out); $? from lastval at zleentry(cmd {read_cmd}) for a command's "
             f"first line")
    return ShellTarget("zsh", path, probes, config, found)


def shell_path(shell: str, given: str | None, pid: int | None) -> str:
    """The binary to probe: --bash/--zsh PATH, else what --pid runs, else the one on PATH
    (resolved: uprobes attach to a file, /bin/bash is a link to /usr/bin/bash)."""
    flag = f"--{shell}"
    if given:
        if not os.path.isfile(given):
            raise UsageError(f"{flag} {given}: no such file")
        path = os.path.realpath(given)
        if pid is not None:
            try:
                same = os.path.samestat(os.stat(f"/proc/{pid}/exe"), os.stat(path))
            except OSError:
                same = True           # a kernel thread or a process we cannot see: its probes say
            if not same:
                raise UsageError(f"--pid {pid} runs {os.path.realpath(f'/proc/{pid}/exe')}, not {given}")
        return path
    if pid is not None:
        try:
            return os.path.realpath(os.readlink(f"/proc/{pid}/exe"))
        except OSError as e:
            raise UsageError(f"--pid {pid}: cannot see its program ({e.strerror})") from None
    found = shutil.which(shell)
    if not found:
        raise UsageError(f"no {shell} on PATH: give {flag} PATH")
    return os.path.realpath(found)


# ---- records -> commands ---------------------------------------------------------------------


def unmetafy(raw: bytes) -> bytes:
    """zsh keeps strings 'metafied': a byte it uses internally (NUL, 0x83-0xa2) is stored as
    Meta (0x83) and the byte xor 32. zleentry returns the line that way."""
    if b"\x83" not in raw:
        return raw
    out, it = bytearray(), iter(raw)
    for b in it:
        out.append(next(it, 0x20) ^ 0x20 if b == 0x83 else b)
    return bytes(out)


@dataclass
class Command:
    pid: int
    tid: int
    uid: int
    comm: str
    tty: str
    ts_ns: int                   #: when its first line was read (bpf_ktime_get_ns)
    text: str
    status: int | None
    truncated: bool


@dataclass
class _Pending:
    first: ShellEvent
    lines: list = field(default_factory=list)
    chunk: bytearray = field(default_factory=bytearray)     #: a line whose last chunk is to come
    truncated: bool = False


def tty_name(raw: bytes) -> str:
    """The kernel's tty name as /dev names it: pts3 -> pts/3 (a pty slave), tty1 stays."""
    name = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    if name.startswith("pts") and name[3:].isdigit():
        return f"pts/{name[3:]}"
    return name


class CommandGrouper:
    """Sans-IO: SHELL_LINE and SHELL_PROMPT records in, Commands out. A shell is (pid, start
    time): a reused pid is another shell."""

    def __init__(self, zsh: bool):
        self.zsh = zsh
        self.pending: dict[tuple[int, int], _Pending] = {}

    def feed(self, ev: ShellEvent) -> Command | None:
        key = (ev.pid, ev.start_ns)
        if ev.kind == ShellKind.SHELL_LINE:
            p = self.pending.get(key)
            if p is None:
                p = self.pending[key] = _Pending(ShellEvent.from_buffer_copy(ev))
            p.chunk += ctypes.string_at(ctypes.addressof(ev) + _LINE_OFF, ev.len)
            if not ev.flags & SF_MORE:
                p.lines.append(bytes(p.chunk))
                p.chunk.clear()
            p.truncated |= bool(ev.flags & SF_TRUNCATED)
            return None
        if ev.kind == ShellKind.SHELL_PROMPT:
            return self.close(key, ev.status)
        return None

    def close(self, key: tuple[int, int], status: int | None) -> Command | None:
        """The shell's pending lines as one command (None: nothing was typed but blanks)."""
        p = self.pending.pop(key, None)
        if p is None:
            return None
        lines = p.lines + ([bytes(p.chunk)] if p.chunk else [])
        if self.zsh:
            # zleread appends "\n" to a line entered; without it, the edit was aborted (Ctrl-C)
            lines = [unmetafy(ln)[:-1] for ln in lines if ln.endswith(b"\n")]
        text = b"\n".join(lines).decode("utf-8", "backslashreplace")
        if not text.strip():
            return None
        e = p.first
        return Command(e.pid, e.tid, e.uid, e.comm.decode(errors="replace"), tty_name(e.tty), e.ts_ns, text,
                       status, p.truncated or bool(p.chunk))


_LINE_OFF = ShellEvent.line.offset


def _alive(pid: int, start_ns: int) -> bool:
    """Is the shell (pid, its start time since boot) still running? /proc's start time is in
    clock ticks."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    ticks = int(stat.rsplit(b")", 1)[1].split()[19])
    return abs(ticks - start_ns * os.sysconf("SC_CLK_TCK") // 1_000_000_000) <= 1


class ShellCapture(Capture):
    """The source of tlstap bash / zsh (audit/output.py's AuditSource)."""

    #: how often shells with pending lines are checked for having exited
    CHECK_S = 1.0

    def __init__(self, cfg: CaptureConfig, shell: str, path: str, errnumber: int | None = None):
        super().__init__(cfg)
        self.shell = shell
        self.path = path
        self.errnumber = errnumber
        self._find = lambda c: [find_bash(path) if shell == "bash" else find_zsh(path, c.pid)]
        self.grouper = CommandGrouper(zsh=shell == "zsh")
        self.on_event = lambda ev: None
        self.commands = self.filtered = 0
        self._lost_told = 0
        self._checked = 0.0
        self._clock_off = 0

    def start(self) -> None:
        self.resolve()
        t = self.targets[0]
        with contextlib.ExitStack() as stack:
            obj = stack.enter_context(BpfObject.open(bpf_object_path("shell.bpf.o")))
            set_scope(obj, self.cfg)
            sc = obj.map(".rodata.shell").initial_value(ShellConfig)
            for k, v in t.config.items():
                setattr(sc, k, v)
            used = {p.program for p in t.probes}
            for prog in obj.programs():
                prog.autoload = prog.name in used
            obj.load()
            for p in t.probes:
                self.attach_uprobe(stack, obj.program(p.program), p.path or t.path, p.offset, p.what,
                                   pid=self.cfg.pid or -1, retprobe=p.retprobe)
            self.open_events(stack, obj, "shell_events")
            self._clock_off = wall_clock_offset_ns()
            self._stack = stack.pop_all()

    def _on_record(self, view) -> None:
        ev = ShellEvent()
        n = min(len(view), ctypes.sizeof(ev))
        ctypes.memmove(ctypes.addressof(ev), bytes(view[:n]), n)
        self._emit(self.grouper.feed(ev))

    def _emit(self, cmd: Command | None) -> None:
        if cmd is None:
            return
        self.commands += 1
        if self.errnumber is not None and cmd.status != self.errnumber:
            self.filtered += 1
            return
        fields = {"tty": cmd.tty or None, "status": cmd.status}
        if cmd.truncated:
            fields["truncated"] = True
        self.on_event(AuditEvent(self.shell, cmd.ts_ns + self._clock_off, cmd.pid, cmd.tid, cmd.uid, cmd.comm,
                                 cmd.text, fields))

    def deliver(self) -> int:
        n = super().deliver()
        now = time.monotonic()
        if now - self._checked >= self.CHECK_S:
            self._checked = now
            for key in [k for k in self.grouper.pending if not _alive(*k)]:
                self._emit(self.grouper.close(key, None))     # it exited: its last command has no $?
        return n

    def drain(self) -> None:
        super().drain()
        for key in list(self.grouper.pending):
            self._emit(self.grouper.close(key, None))         # still running at our exit

    def attached(self) -> list[str]:
        return [f"attached {t.path}: {t.found}" for t in self.targets]

    def describe(self) -> str:
        only = f"; only commands that exit with {self.errnumber}" if self.errnumber is not None else ""
        return f"; {self.shell} command lines{only}"

    def new_lost(self) -> tuple[int, str]:
        lost = self.counters()["lost"]
        new, self._lost_told = lost - self._lost_told, lost
        return new, "the ring buffer was full"

    def counters(self) -> dict[str, int]:
        c = self.counter_sums("shell_counters", ShellCounter)
        c = {k.removeprefix("scnt_"): v for k, v in c.items()}
        return {"events": self.commands - self.filtered, "commands": self.commands, "filtered": self.filtered,
                "lines": c.get("lines", 0), "prompts": c.get("prompts", 0), "lost": c.get("lost", 0),
                "read_errors": c.get("read_errors", 0)}


__all__ = ["ShellCapture", "CommandGrouper", "find_bash", "find_zsh", "shell_path", "unmetafy"]
