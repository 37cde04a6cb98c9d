"""OpenSSL version detection and uprobe placement.

Why not just probe SSL_read/SSL_write: a uprobe on an instruction the kernel must
single-step (Debian's SSL_read starts with `sub $0x18,%rsp`) costs ~2.8 us per hit,
one on an instruction it emulates (push, call, jmp, ret) ~0.4 us. OpenSSL's int and
_ex wrappers both call one internal function (ssl_read_internal(s, buf, num,
&readbytes), ssl_write_internal(s, buf, num, [flags,] &written)) that starts with
`push`, so one probe pair there covers both APIs and is ~7x cheaper. That function
is not exported; we find it as the direct call target of the exported wrappers, and
use it only when the register-level evidence is unambiguous. Otherwise: the four
exported functions ("api" placement).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import capstone
from capstone import x86 as _x86

from ..errors import TlstapError
from .elf import ElfError, ElfImage, Symbol, open_x86_64


class NotOpenSSL(TlstapError):
    """The file defines neither SSL_write nor SSL_write_ex."""


@dataclass(frozen=True)
class ProbeSite:
    symbol: str          # "SSL_read_ex", "ssl_read_internal", or "SSL_read_ex->0x35290" (no symbol table)
    offset: int          # file offset to attach the uprobe at
    role: str            # "read" | "write" | "free" | "handshake"
    out_arg: int | None  # SysV arg index (rdi,rsi,rdx,rcx,r8,r9) of the size_t* byte count; None: return value
    first_insn: str      # mnemonic at the site ("push" is emulated by the kernel: cheap)
    entry: str = "ssl_rw_enter"  # BPF entry program of read/write/handshake sites (NSPR: nspr_rw_enter)


@dataclass(frozen=True)
class OpenSSLTarget:
    path: str
    dev: int
    ino: int
    version: str | None
    placement: str       # "internal" | "api"
    reason: str
    sites: tuple[ProbeSite, ...]
    #: offsets of s3.client_random and of the server flag in the SSL object, when the keylog
    #: analysis establishes them: a call on a memory BIO is then tied to the socket its
    #: handshake's hello went out on (bpf/openssl.bpf.c: prove_by_hello); None: never tied
    hello: tuple[int, int] | None = None


# ---- version -----------------------------------------------------------------------------

# OPENSSL_VERSION_TEXT, e.g. "OpenSSL 3.0.19 27 Jan 2026", "OpenSSL 1.1.1w  11 Sep 2023",
# "OpenSSL 3.1.4+quic 24 Oct 2023". The date keeps us off messages like "OpenSSL 1.1.0 or later".
_VERSION_RX = re.compile(rb"OpenSSL (\d+\.\d+\.\d+[a-z]{0,2}(?:[-+][0-9A-Za-z.+-]+)?) +\d{1,2} [A-Z][a-z]{2} \d{4}\0")


def detect_version(path: str) -> str | None:
    """"OpenSSL X.Y.Z..." from .rodata; for a shared libssl the string lives in libcrypto,
    found through DT_NEEDED in the same directory (this also works under /proc/PID/root).
    Wheels rename it (auditwheel: libcrypto-fb8d5b21.so.3)."""
    with ElfImage.open(path) as img:
        m = img.search_rodata(_VERSION_RX)
        needed = img.needed
    if m:
        return "OpenSSL " + m.group(1).decode()
    for lib in needed:
        if lib.startswith(("libcrypto.", "libcrypto-")):
            crypto = os.path.join(os.path.dirname(path), lib)
            try:
                with ElfImage.open(crypto) as img:
                    m = img.search_rodata(_VERSION_RX)
            except ElfError:
                continue
            if m:
                return "OpenSSL " + m.group(1).decode()
    return None


# ---- a tiny abstract interpreter over x86-64 registers -----------------------------------

ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
_CALLER_SAVED = ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")
MAX_OUT_ARG = 4          # the BPF side reads out-params from argument registers 0..4 (abi.site_cookie)
_MASK32, _MASK64 = (1 << 32) - 1, (1 << 64) - 1
_NORETURN = {"__stack_chk_fail", "abort", "exit", "_exit", "__assert_fail", "__fortify_fail", "OPENSSL_die"}
_STEP_LIMIT = 20000      # instruction visits per function: wrappers need a few hundred

# Values a register can hold, relative to function entry:
#   ("arg", i)   the original 64-bit argument i
#   ("sext", i)  the low 32 bits of argument i, sign-extended (movslq %edx,%rdx)
#   ("zext", i)  the same, zero-extended (any 32-bit write)
#   ("const", k) a known constant
#   STACK        an address in this frame (&local)
#   None         unknown
STACK = ("stack",)


def _gpr_names() -> dict[str, tuple[str, int]]:
    """capstone register name -> (64-bit register, width in bits)."""
    t = {}
    for r in "abcd":
        t |= {f"r{r}x": (f"r{r}x", 64), f"e{r}x": (f"r{r}x", 32), f"{r}x": (f"r{r}x", 16),
              f"{r}l": (f"r{r}x", 8), f"{r}h": (f"r{r}x", 8)}
    for r in ("si", "di", "bp", "sp"):
        t |= {f"r{r}": (f"r{r}", 64), f"e{r}": (f"r{r}", 32), r: (f"r{r}", 16), f"{r}l": (f"r{r}", 8)}
    for n in range(8, 16):
        t |= {f"r{n}": (f"r{n}", 64), f"r{n}d": (f"r{n}", 32), f"r{n}w": (f"r{n}", 16), f"r{n}b": (f"r{n}", 8)}
    return t


_GPR = _gpr_names()
_ALL64 = sorted({v[0] for v in _GPR.values()})


def _entry_state() -> dict:
    st = dict.fromkeys(_ALL64)
    st.update({r: ("arg", i) for i, r in enumerate(ARG_REGS)})
    st["rsp"] = STACK
    return st


def _low32(v):
    """Value after a 32-bit copy (which zero-extends into the 64-bit register)."""
    if v and v[0] in ("arg", "sext", "zext"):
        return ("zext", v[1])
    if v and v[0] == "const":
        return ("const", v[1] & _MASK32)
    return None


def _sext32(v):
    if v and v[0] in ("arg", "sext", "zext"):
        return ("sext", v[1])
    if v and v[0] == "const":
        k = v[1] & _MASK32
        return ("const", (k - (1 << 32) if k >> 31 else k) & _MASK64)
    return None


def _meet(a: dict, b: dict) -> dict:
    """Join point: a register keeps its value only if every path agrees."""
    return {r: (a[r] if a[r] == b[r] else None) for r in a}


def _mn(insn) -> str:
    return insn.mnemonic.split()[-1]         # "bnd jmp", "notrack jmp" -> "jmp"


@dataclass
class _Transfer:
    """A call or a jump leaving the function, with the register state just before it."""
    addr: int
    kind: str              # "call" | "jmp"
    target: int | None     # direct target; None for indirect
    slot: int | None       # for `call/jmp *X(%rip)`: the GOT slot address
    state: dict


class _Code:
    """Decodes single instructions on demand (following control flow, never sweeping
    linearly, so data or padding between functions is never misread)."""

    def __init__(self, img: ElfImage):
        self.img = img
        self.md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self.md.detail = True
        self._cache: dict[int, object] = {}

    def insn(self, addr: int):
        if addr not in self._cache:
            try:
                data = self.img.read_vaddr(addr, 15)
            except ElfError:
                data = b""
            self._cache[addr] = next(self.md.disasm(data, addr, 1), None)
        return self._cache[addr]

    def entry_site(self, vaddr: int) -> tuple[int, str]:
        """(file offset, mnemonic) to probe a function at. A CET `endbr64` is single-stepped;
        when a `push` follows we probe that instead: endbr64 changes no register and the
        return address is still at (%rsp), so entry and return probes see the same thing."""
        i = self.insn(vaddr)
        if i is None:
            raise ElfError(f"{self.img.path}: cannot decode instruction at {vaddr:#x}")
        if i.mnemonic == "endbr64":
            j = self.insn(vaddr + i.size)
            if j is not None and _mn(j) == "push":
                return self.img.vaddr_to_offset(j.address), "push"
        return self.img.vaddr_to_offset(vaddr), _mn(i)

    def lea_string(self, func: str, rx: re.Pattern, limit: int = 16) -> str | None:
        """The string loaded by the first `lea X(%rip), reg` of function `func` (version getters
        such as gnutls_check_version and PR_GetVersion return a constant that way), if it matches
        rx; None otherwise."""
        fn = self.img.function(func)
        if fn is None:
            return None
        addr, end = fn.vaddr, fn.vaddr + max(fn.size, 64)
        for _ in range(limit):
            insn = self.insn(addr) if addr < end else None
            if insn is None:
                return None
            if insn.mnemonic == "lea" and "rip" in insn.op_str:
                target = insn.address + insn.size + insn.operands[1].mem.disp
                try:
                    raw = self.img.read_vaddr(target, 64).split(b"\0", 1)[0]
                except ElfError:
                    return None
                return raw.decode() if rx.match(raw) else None
            addr += insn.size
        return None

    def name_of(self, t: _Transfer) -> str | None:
        """The function a transfer reaches, if it has a name: a local symbol, or the import a
        PLT stub / GOT slot jumps to."""
        slot = t.slot
        if t.target is not None and self.img.in_plt(t.target):
            slot = self._plt_slot(t.target)
        if slot is not None:
            return self.img.got_symbol(slot)
        return self.img.name_at(t.target) if t.target is not None else None

    def _plt_slot(self, addr: int) -> int | None:
        # .plt: jmp *slot(%rip); .plt.sec: endbr64; bnd jmp *slot(%rip); .plt.got: jmp *slot(%rip)
        for _ in range(3):
            i = self.insn(addr)
            if i is None:
                return None
            if _mn(i) == "jmp":
                return _rip_slot(i)
            addr += i.size
        return None


def _rip_slot(insn) -> int | None:
    ops = insn.operands
    if len(ops) == 1 and ops[0].type == _x86.X86_OP_MEM and ops[0].mem.base == _x86.X86_REG_RIP \
            and ops[0].mem.index == 0:
        return insn.address + insn.size + ops[0].mem.disp
    return None


def _step(insn, st: dict) -> dict:
    """Register state after a non-control-flow instruction."""
    new = dict(st)
    try:
        written = insn.regs_access()[1]
    except capstone.CsError:                       # unknown semantics: forget everything
        written = None
    if written is None:
        new = dict.fromkeys(st)
    else:
        for r in written:
            g = _GPR.get(insn.reg_name(r))
            if g:
                new[g[0]] = None                   # any other write: unknown
    new["rsp"] = STACK                             # push/pop/sub/add/and keep rsp in the stack
    ops, m = insn.operands, _mn(insn)
    if len(ops) != 2 or ops[0].type != _x86.X86_OP_REG:
        return new
    dst, dbits = _GPR.get(insn.reg_name(ops[0].reg), (None, 0))
    if dst is None or dst == "rsp":
        return new
    src = ops[1]
    sname, sbits = _GPR.get(insn.reg_name(src.reg), (None, 0)) if src.type == _x86.X86_OP_REG else (None, 0)
    if m == "mov" and sname:
        if dbits == sbits == 64:
            new[dst] = st[sname]
        elif dbits == sbits == 32:
            new[dst] = _low32(st[sname])
    elif m == "mov" and src.type == _x86.X86_OP_IMM and dbits in (32, 64):
        new[dst] = ("const", src.imm & (_MASK32 if dbits == 32 else _MASK64))
    elif m == "movsxd" and sname and dbits == 64 and sbits == 32:
        new[dst] = _sext32(st[sname])
    elif m in ("xor", "sub") and src.type == _x86.X86_OP_REG and src.reg == ops[0].reg and dbits in (32, 64):
        new[dst] = ("const", 0)
    elif m == "lea" and src.type == _x86.X86_OP_MEM and dbits == 64 and src.mem.index == 0 and src.mem.base:
        base = _GPR.get(insn.reg_name(src.mem.base))
        if base and st[base[0]] == STACK:
            new[dst] = STACK
    return new


def _trace(code: _Code, fn: Symbol) -> tuple[list[_Transfer], str | None]:
    """Data-flow over the function's control-flow graph from its entry: every call and every
    jump leaving it, with the register state that holds on all paths reaching it.
    Conditional branches leaving [start, start+size) are followed (GCC's .cold parts can jump
    back in); unconditional ones from the body are tail calls."""
    lo, hi = fn.vaddr, fn.vaddr + fn.size
    img = code.img
    if fn.size == 0:
        return [], f"{fn.name} has no size in the symbol table"
    states = {lo: _entry_state()}
    work, transfers, visits = [lo], {}, 0

    def is_function_start(t):
        name = img.name_at(t)
        return img.in_plt(t) or (name is not None and ".cold" not in name)

    while work:
        addr = work.pop()
        visits += 1
        if visits > _STEP_LIMIT:
            return [], f"{fn.name} is too large to analyse"
        st = states[addr]
        insn = code.insn(addr)
        if insn is None:
            return [], f"cannot decode {fn.name} at {addr:#x}"
        inside = lo <= addr < hi
        nxt = addr + insn.size
        ft = [] if inside and nxt >= hi else [nxt]     # fall-through (not past the end of the body)
        m, ops = _mn(insn), insn.operands
        direct = ops[0].imm if len(ops) == 1 and ops[0].type == _x86.X86_OP_IMM else None
        succ: list[tuple[int, dict]] = []
        if insn.group(capstone.CS_GRP_RET) or m in ("ud2", "hlt", "int3"):
            pass
        elif insn.group(capstone.CS_GRP_CALL):
            t = _Transfer(addr, "call", direct, None if direct is not None else _rip_slot(insn), st)
            transfers[addr] = t
            if code.name_of(t) not in _NORETURN:
                after = dict(st)
                after.update(dict.fromkeys(_CALLER_SAVED))
                succ = [(a, after) for a in ft]
        elif m == "jmp":
            if direct is None:
                # switch tables jump through a register or an indexed table: we would need the
                # table to know the successors. A plain memory operand is a tail call.
                if ops[0].type == _x86.X86_OP_REG or (ops[0].type == _x86.X86_OP_MEM and ops[0].mem.index):
                    return [], f"{fn.name} has a computed jump at {addr:#x}"
                transfers[addr] = _Transfer(addr, "jmp", None, _rip_slot(insn), st)
            elif lo <= direct < hi or not (inside or is_function_start(direct)):
                succ = [(direct, st)]
            else:
                transfers[addr] = _Transfer(addr, "jmp", direct, None, st)
        elif insn.group(capstone.CS_GRP_JUMP):        # jcc, jrcxz, loop
            if direct is None:
                return [], f"{fn.name} has an indirect conditional jump at {addr:#x}"
            after = _step(insn, st)                   # `loop` decrements rcx
            succ = [(a, after) for a in ft]
            if lo <= direct < hi or not is_function_start(direct):
                succ.append((direct, after))
            else:
                transfers[addr] = _Transfer(addr, "jmp", direct, None, st)
        else:
            after = _step(insn, st)
            succ = [(a, after) for a in ft]
        for a, s in succ:
            old = states.get(a)
            new = s if old is None else _meet(old, s)
            if new != old:
                states[a] = new
                work.append(a)
    # each address was last processed with its final (fixpoint) state
    return sorted(transfers.values(), key=lambda t: t.addr), None


# ---- placement ---------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "?"
    if v == STACK:
        return "&local"
    if v[0] == "const":
        return hex(v[1])
    return {"arg": "arg{}", "sext": "(long)arg{}", "zext": "(u32)arg{}"}[v[0]].format(v[1])


def _regs(st: dict, n: int = 5) -> str:
    return "(" + ", ".join(f"{r}={_fmt(st[r])}" for r in ARG_REGS[:n]) + ")"


def _ignorable(name: str | None) -> bool:
    """Error-path calls that happen to see the arguments still in registers."""
    return name is not None and (name.startswith("ERR_") or name in _NORETURN)


@dataclass(frozen=True)
class _Found:
    target: int
    out_arg: int
    caller: str          # the wrapper whose call we probe through (names the site)


class _Analysis:
    def __init__(self, img: ElfImage):
        self.img = img
        self.code = _Code(img)
        self.traces: dict[str, tuple[list[_Transfer], str | None]] = {}

    def trace(self, fn: Symbol):
        if fn.name not in self.traces:
            self.traces[fn.name] = _trace(self.code, fn)
        return self.traces[fn.name]

    def describe(self, addr: int) -> str:
        name = self.img.name_at(addr)
        return f"{name} ({addr:#x})" if name else hex(addr)

    def ex_target(self, fn: Symbol, out_idx: int, follow: dict[str, int], depth: int = 0) -> _Found | str:
        """Where the _ex wrapper `fn` (args: s, buf, num, ..., out at out_idx) hands its
        arguments on: the direct call/jump with rdi, rsi, rdx = arg0..2 and the out-param in
        one argument register. `follow`: exported functions to look through (SSL_write_ex2,
        which takes the out-param at the given index)."""
        transfers, err = self.trace(fn)
        if err:
            return err
        found: set[_Found] = set()
        for t in transfers:
            s = t.state
            if (s["rdi"], s["rsi"], s["rdx"]) != (("arg", 0), ("arg", 1), ("arg", 2)):
                continue
            outs = [i for i in range(3, len(ARG_REGS)) if s[ARG_REGS[i]] == ("arg", out_idx)]
            if not outs:
                continue
            name = self.code.name_of(t)
            if _ignorable(name):
                continue
            where = f"{t.kind} at {t.addr:#x}"
            if len(outs) > 1:
                return f"{fn.name}: out-param in several registers at the {where}"
            if name in follow and depth == 0:
                if outs[0] != follow[name]:
                    return f"{fn.name} passes the out-param to {name} as arg{outs[0]}, expected arg{follow[name]}"
                inner = self.img.function(name)
                if inner is None:
                    return f"{fn.name} calls {name}, which is not defined in this file"
                r = self.ex_target(inner, follow[name], follow, depth + 1)
                if isinstance(r, str):
                    return r
                found.add(r)
                continue
            if t.target is None:
                return (f"{fn.name} hands (ssl, buf, num, out) to an indirect {where}"
                        f"{f' ({name})' if name else ''}: no internal function to probe (inlined?)")
            if self.img.in_plt(t.target):
                return (f"{fn.name} hands (ssl, buf, num, out) to {name or hex(t.target)} through the PLT "
                        f"({where}): not an internal function")
            if not self.img.is_executable_vaddr(t.target):
                return f"{fn.name}: the {where} goes to {t.target:#x}, outside executable code"
            if outs[0] > MAX_OUT_ARG:
                return f"{fn.name} passes the out-param in {ARG_REGS[outs[0]]}, which the probes cannot read"
            found.add(_Found(t.target, outs[0], fn.name))
        if not found:
            return (f"{fn.name} makes no direct call with (ssl, buf, num) in rdi, rsi, rdx and its out-param "
                    f"in an argument register (internal function inlined, or not the usual OpenSSL wrapper)")
        if len({(f.target, f.out_arg) for f in found}) > 1:
            return f"{fn.name} passes its arguments to several functions: " + ", ".join(
                f"{self.describe(f.target)} (out in {ARG_REGS[f.out_arg]})" for f in sorted(found, key=lambda f: f.target))
        return min(found, key=lambda f: f.caller != fn.name)

    def int_api_agrees(self, fn: Symbol, f: _Found) -> str | None:
        """None if int-returning `fn` (SSL_read/SSL_write) calls f.target with (s, buf,
        (size_t)num, &local in the out-param register) and hands (s, buf, num) to nothing else."""
        transfers, err = self.trace(fn)
        if err:
            return err
        hits = 0
        for t in transfers:
            s = t.state
            args_in_place = s["rdi"] == ("arg", 0) and s["rsi"] == ("arg", 1) and s["rdx"] in (("sext", 2), ("zext", 2))
            if t.target == f.target:
                if not (args_in_place and s[ARG_REGS[f.out_arg]] == STACK):
                    return f"{fn.name} calls {self.describe(f.target)} at {t.addr:#x} with {_regs(s, f.out_arg + 1)}"
                hits += 1
            elif args_in_place and STACK in (s[r] for r in ARG_REGS[3:]) and not _ignorable(self.code.name_of(t)):
                return f"{fn.name} also passes (ssl, buf, num, &local) to the {t.kind} at {t.addr:#x}"
        if not hits:
            return f"{fn.name} does not call {self.describe(f.target)}"
        return None

    def direction(self, role: str, syms: dict[str, Symbol]) -> tuple[_Found | None, str]:
        api, ex = ("SSL_read", "SSL_read_ex") if role == "read" else ("SSL_write", "SSL_write_ex")
        if syms.get(ex) is None or syms.get(api) is None:
            return None, f"{ex if syms.get(ex) is None else api} is not defined"
        # OpenSSL 3.3+: SSL_write_ex(s, buf, num, w) -> SSL_write_ex2(s, buf, num, 0, w)
        follow = {"SSL_write_ex2": 4} if role == "write" else {}
        f = self.ex_target(syms[ex], 3, follow)
        if isinstance(f, str):
            return None, f
        ex2 = self.img.function("SSL_write_ex2") if role == "write" else None
        if ex2 is not None and f.caller != ex2.name:
            # SSL_write_ex inlined SSL_write_ex2: the exported SSL_write_ex2 must agree too
            g = self.ex_target(ex2, 4, {})
            if isinstance(g, str):
                return None, g
            if (g.target, g.out_arg) != (f.target, f.out_arg):
                return None, (f"SSL_write_ex calls {self.describe(f.target)} but SSL_write_ex2 calls "
                              f"{self.describe(g.target)}")
        why = self.int_api_agrees(syms[api], f)
        if why:
            return None, why
        return f, (f"{api} and {ex} both call {self.describe(f.target)} with the out-param in "
                   f"{ARG_REGS[f.out_arg]}" + (f" (via {f.caller})" if f.caller != ex else ""))


_API = (("SSL_read", "read", None), ("SSL_read_ex", "read", 3), ("SSL_write", "write", None),
        ("SSL_write_ex", "write", 3))


def analyze(path: str) -> OpenSSLTarget:
    """Decide where to attach in one OpenSSL build (shared libssl or a static binary)."""
    st, img = open_x86_64(path)
    with img:
        syms = {n: img.function(n) for n in ("SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex", "SSL_free",
                                             "SSL_clear", "SSL_do_handshake")}
        if syms["SSL_write"] is None and syms["SSL_write_ex"] is None:
            raise NotOpenSSL(f"{path} does not define SSL_write or SSL_write_ex: not OpenSSL")
        a = _Analysis(img)
        results = {role: a.direction(role, syms) for role in ("read", "write")}
        (r, _), (w, _) = results["read"], results["write"]
        if r is not None and w is not None and r.target == w.target:   # one probe cannot be both
            results["write"] = (None, f"reads and writes both go through {a.describe(r.target)}")
        sites = []
        if all(f is not None for f, _ in results.values()):
            placement = "internal"
            reason = "; ".join(why for _, why in results.values())
            for role, (f, _) in results.items():
                off, insn = a.code.entry_site(f.target)
                name = img.name_at(f.target) or f"{f.caller}->{f.target:#x}"
                sites.append(ProbeSite(name, off, role, f.out_arg, insn))
        else:
            placement = "api"
            reason = "; ".join(f"{role}: {why}" for role, (f, why) in results.items() if f is None)
            for name, role, out in _API:
                if syms[name] is not None:
                    off, insn = a.code.entry_site(syms[name].vaddr)
                    sites.append(ProbeSite(name, off, role, out, insn))
        # the connection an SSL* serves ends when it is freed, or cleared for reuse: SSL_clear,
        # which the handshake state machine also calls as a fresh handshake begins (before
        # any byte of it moves), so an SSL* reused for another connection gets a new generation
        for name in ("SSL_free", "SSL_clear"):
            if syms[name] is not None:
                off, insn = a.code.entry_site(syms[name].vaddr)
                sites.append(ProbeSite(name, off, "free", None, insn))
        if syms["SSL_do_handshake"] is not None:
            # no data: the syscalls inside name the connection before its first read, which
            # is often served from bytes the handshake already buffered (no syscall of its own)
            off, insn = a.code.entry_site(syms["SSL_do_handshake"].vaddr)
            sites.append(ProbeSite("SSL_do_handshake", off, "handshake", None, insn))
    return OpenSSLTarget(path, st.st_dev, st.st_ino, detect_version(path), placement, reason, tuple(sites),
                         hello_layout(path))


def hello_layout(path: str) -> tuple[int, int] | None:
    """(client_random offset, server flag offset) of the build's SSL object, or None when the
    keylog analysis does not establish both (OpenSSL 1.1.x, an unfamiliar build)."""
    from .openssl_keys import analyze_keys      # it imports this module
    try:
        k = analyze_keys(path)
    except TlstapError:
        return None
    return None if k.server_off is None else (k.client_random_off, k.server_off)
