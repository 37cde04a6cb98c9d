"""What the library analyses know about x86-64 code: capstone decoding on demand, register
names, a small abstract interpreter over the argument registers (trace), and the search for
the instructions that load given addresses (code_refs). The OpenSSL, GnuTLS and NSS probe
placements and the key log analyses all build on it."""
from __future__ import annotations

import re
from dataclasses import dataclass

import capstone
from capstone import x86 as _x86

from .elf import ElfError, ElfImage, Symbol

# ---- a tiny abstract interpreter over x86-64 registers -----------------------------------

ARG_REGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")
CALLER_SAVED = ("rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11")
_MASK32, _MASK64 = (1 << 32) - 1, (1 << 64) - 1
NORETURN = {"__stack_chk_fail", "abort", "exit", "_exit", "__assert_fail", "__fortify_fail", "OPENSSL_die"}
STEP_LIMIT = 20000       # instruction visits per analysed function: wrappers and getters need a few hundred

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


GPR = _gpr_names()
_ALL64 = sorted({v[0] for v in GPR.values()})


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


def meet(a: dict, b: dict) -> dict:
    """Join point: a register keeps its value only if every path agrees."""
    return {r: (a[r] if a[r] == b[r] else None) for r in a}


def mn(insn) -> str:
    return insn.mnemonic.split()[-1]         # "bnd jmp", "notrack jmp" -> "jmp"


@dataclass
class Transfer:
    """A call or a jump leaving the function, with the register state just before it."""
    addr: int
    kind: str              # "call" | "jmp"
    target: int | None     # direct target; None for indirect
    slot: int | None       # for `call/jmp *X(%rip)`: the GOT slot address
    state: dict


class Code:
    """Decodes single instructions on demand (following control flow, never sweeping
    linearly, so data or padding between functions is never misread)."""

    def __init__(self, img: ElfImage):
        self.img = img
        self.md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self.md.detail = True
        self._cache: dict[int, object] = {}
        self._bodies: dict[int, list] = {}

    def insn(self, addr: int):
        if addr not in self._cache:
            try:
                data = self.img.read_vaddr(addr, 15)
            except ElfError:
                data = b""
            self._cache[addr] = next(self.md.disasm(data, addr, 1), None)
        return self._cache[addr]

    def body(self, lo: int, hi: int) -> list:
        """The function at [lo, hi) decoded linearly (safe between a function's unwind-table
        bounds: compilers put no data in x86-64 text)."""
        if lo not in self._bodies:
            self._bodies[lo] = list(self.md.disasm(self.img.read_vaddr(lo, hi - lo), lo))
        return self._bodies[lo]

    def entry_site(self, vaddr: int) -> tuple[int, str]:
        """(file offset, mnemonic) to probe a function at. A CET `endbr64` is single-stepped;
        when a `push` follows we probe that instead: endbr64 changes no register and the
        return address is still at (%rsp), so entry and return probes see the same thing."""
        i = self.insn(vaddr)
        if i is None:
            raise ElfError(f"{self.img.path}: cannot decode instruction at {vaddr:#x}")
        if i.mnemonic == "endbr64":
            j = self.insn(vaddr + i.size)
            if j is not None and mn(j) == "push":
                return self.img.vaddr_to_offset(j.address), "push"
        return self.img.vaddr_to_offset(vaddr), mn(i)

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

    def name_of(self, t: Transfer) -> str | None:
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
            if mn(i) == "jmp":
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
        writes = insn.regs_access()[1]
    except capstone.CsError:                       # unknown semantics: forget everything
        writes = None
    if writes is None:
        new = dict.fromkeys(st)
    else:
        for r in writes:
            g = GPR.get(insn.reg_name(r))
            if g:
                new[g[0]] = None                   # any other write: unknown
    new["rsp"] = STACK                             # push/pop/sub/add/and keep rsp in the stack
    ops, m = insn.operands, mn(insn)
    if len(ops) != 2 or ops[0].type != _x86.X86_OP_REG:
        return new
    dst, dbits = GPR.get(insn.reg_name(ops[0].reg), (None, 0))
    if dst is None or dst == "rsp":
        return new
    src = ops[1]
    sname, sbits = GPR.get(insn.reg_name(src.reg), (None, 0)) if src.type == _x86.X86_OP_REG else (None, 0)
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
        base = GPR.get(insn.reg_name(src.mem.base))
        if base and st[base[0]] == STACK:
            new[dst] = STACK
    return new


def trace(code: Code, fn: Symbol) -> tuple[list[Transfer], str | None]:
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
        if visits > STEP_LIMIT:
            return [], f"{fn.name} is too large to analyse"
        st = states[addr]
        insn = code.insn(addr)
        if insn is None:
            return [], f"cannot decode {fn.name} at {addr:#x}"
        inside = lo <= addr < hi
        nxt = addr + insn.size
        ft = [] if inside and nxt >= hi else [nxt]     # fall-through (not past the end of the body)
        m, ops = mn(insn), insn.operands
        direct = direct_target(insn)
        succ: list[tuple[int, dict]] = []
        if insn.group(capstone.CS_GRP_RET) or m in ("ud2", "hlt", "int3"):
            pass
        elif insn.group(capstone.CS_GRP_CALL):
            t = Transfer(addr, "call", direct, None if direct is not None else _rip_slot(insn), st)
            transfers[addr] = t
            if code.name_of(t) not in NORETURN:
                after = dict(st)
                after.update(dict.fromkeys(CALLER_SAVED))
                succ = [(a, after) for a in ft]
        elif m == "jmp":
            if direct is None:
                # switch tables jump through a register or an indexed table: we would need the
                # table to know the successors. A plain memory operand is a tail call.
                if ops[0].type == _x86.X86_OP_REG or (ops[0].type == _x86.X86_OP_MEM and ops[0].mem.index):
                    return [], f"{fn.name} has a computed jump at {addr:#x}"
                transfers[addr] = Transfer(addr, "jmp", None, _rip_slot(insn), st)
            elif lo <= direct < hi or not (inside or is_function_start(direct)):
                succ = [(direct, st)]
            else:
                transfers[addr] = Transfer(addr, "jmp", direct, None, st)
        elif insn.group(capstone.CS_GRP_JUMP):        # jcc, jrcxz, loop
            if direct is None:
                return [], f"{fn.name} has an indirect conditional jump at {addr:#x}"
            after = _step(insn, st)                   # `loop` decrements rcx
            succ = [(a, after) for a in ft]
            if lo <= direct < hi or not is_function_start(direct):
                succ.append((direct, after))
            else:
                transfers[addr] = Transfer(addr, "jmp", direct, None, st)
        else:
            after = _step(insn, st)
            succ = [(a, after) for a in ft]
        for a, s in succ:
            old = states.get(a)
            new = s if old is None else meet(old, s)
            if new != old:
                states[a] = new
                work.append(a)
    # each address was last processed with its final (fixpoint) state
    return sorted(transfers.values(), key=lambda t: t.addr), None


# ---- single instructions ---------------------------------------------------------------------

def reg(insn, op) -> tuple[str | None, int]:
    """(64-bit register, width in bits) of a register operand; (None, 0) for any other."""
    return GPR.get(insn.reg_name(op.reg), (None, 0)) if op.type == _x86.X86_OP_REG else (None, 0)


def written(insn) -> set[str]:
    """64-bit registers an instruction writes (all of them if capstone cannot tell)."""
    try:
        regs = insn.regs_access()[1]
    except capstone.CsError:
        return {g for g, _ in GPR.values()}
    return {GPR[n][0] for n in map(insn.reg_name, regs) if n in GPR}


def direct_target(insn) -> int | None:
    ops = insn.operands
    return ops[0].imm if len(ops) == 1 and ops[0].type == _x86.X86_OP_IMM else None


# ---- the instructions that load an address -----------------------------------------------------

# lea r64,[rip+disp32]: REX.W (REX.R allowed), 8D, ModRM mod=00 rm=101. Three bytes that
# cannot overlap a second match, so finditer misses none.
_LEA_RIP = re.compile(rb"[\x48\x4c]\x8d[\x05\x0d\x15\x1d\x25\x2d\x35\x3d]")


def _references(insn, target: int) -> bool:
    """Does insn load the address `target`: rip-relative operand, or (non-PIE) an immediate?"""
    for op in insn.operands:
        if op.type == _x86.X86_OP_MEM and op.mem.base == _x86.X86_REG_RIP and \
                insn.address + insn.size + op.mem.disp == target:
            return True
        if op.type == _x86.X86_OP_IMM and op.imm & 0xFFFFFFFF == target:
            return True
    return False


@dataclass(frozen=True)
class Ref:
    insn: object           # the instruction that loads the address
    target: int            # the address (of a string)
    function: int          # start of the function containing insn


def code_refs(code: Code, targets: set[int]) -> list[Ref]:
    """Instructions that load one of `targets`: a rip-relative lea in position-independent
    code, a 32-bit immediate in a non-PIE executable (node: `mov $label,%esi`, `push $label`).
    Byte patterns find candidates in all executable segments quickly (a full disassembly of
    node's 27 MB of text is far too slow); each is then confirmed by decoding its function
    from the start, so bytes inside some other instruction are never taken for one."""
    img = code.img
    imm_rx = None
    if img.elf["e_type"] == "ET_EXEC":        # only non-PIE code holds absolute addresses
        imms = [re.escape(t.to_bytes(4, "little")) for t in targets if t < 1 << 32]
        imm_rx = re.compile(b"|".join(imms)) if imms else None
    hits: set[int] = set()                    # vaddrs of the bytes that matched
    for va, _memsz, _off, filesz, x in img.loads:
        if not x:
            continue
        buf = img.read_vaddr(va, filesz)
        for m in _LEA_RIP.finditer(buf):
            p = m.start()
            if va + p + 7 + int.from_bytes(buf[p + 3:p + 7], "little", signed=True) in targets:
                hits.add(va + p)
        if imm_rx is not None:
            hits.update(va + m.start() for m in imm_rx.finditer(buf))
    refs = []
    for v in sorted(hits):
        rng = img.function_range(v)
        if rng is None:
            continue
        for insn in code.body(*rng):
            if insn.address <= v < insn.address + insn.size:
                refs += [Ref(insn, t, rng[0]) for t in targets if _references(insn, t)]
                break
    return refs
