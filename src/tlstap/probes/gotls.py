"""Go crypto/tls: where to probe a Go executable (tlstap gotls).

Text mode probes (*tls.Conn).Read and (*tls.Conn).Write: one uprobe at the entry and one at
every RET of the body (bpf/gotls.bpf.c says why not uretprobes). The body's extent comes from
the pclntab (gobin.py), so stripped binaries work; the RETs from a linear capstone sweep
of that extent, which is sound for Go: the compiler puts no data in .text (jump tables live in
.rodata) and pads between functions with int3. A jump out of the body would be a tail call
whose return we would never see: the Go compiler emits none in these functions (checked for
1.19 and 1.27), and if a build ever does, analysis refuses rather than miss returns.

Keylog mode probes (*tls.Config).writeKeyLog at its entry (bpf/keylog.bpf.c).

Only Go 1.17+ on x86-64 is supported: the probes read arguments from the register ABI
(ABIInternal), which older releases do not have.
"""
from __future__ import annotations

from dataclasses import dataclass

import capstone

from ..errors import TlstapError, UsageError
from . import discover
from .elf import ElfError, open_x86_64
from .gobin import PCLN_MAGIC, GoBinaryError, GoFunc, PcLnTab, build_version, go_version_tuple
from .openssl import ProbeSite

READ = "crypto/tls.(*Conn).Read"
WRITE = "crypto/tls.(*Conn).Write"
WRITE_KEY_LOG = "crypto/tls.(*Config).writeKeyLog"
MIN_GO = (1, 17)          # the register ABI (ABIInternal) on amd64


class NotGoTLS(TlstapError):
    """The file is not a Go binary tlstap gotls can probe (the message says why)."""


@dataclass(frozen=True)
class GoTlsTarget:
    path: str
    dev: int
    ino: int
    version: str | None      # "Go 1.19.8"
    placement: str           # "go": entry + RET probes (the CLI prints `reason` for it)
    reason: str              # what was found: pclntab format, stripped, PIE, RET counts
    sites: tuple[ProbeSite, ...]     # text mode: Read/Write entries (role read/write)
    rets: tuple[ProbeSite, ...]      # text mode: their RET instructions (role read/write)
    keylog: ProbeSite | None         # keylog mode: writeKeyLog entry
    read_spilled: bool = False       # Read keeps c, b in its spill slots (spills_args)

    def describe(self) -> str:
        return f"{self.path} ({self.version or 'Go version unknown'}): {self.reason}"


def _md():
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = False
    return md


def return_sites(img, fn: GoFunc, md=None) -> list[int]:
    """vaddrs of the RET instructions of a Go function; GoBinaryError when the body cannot be
    swept cleanly or jumps out of itself (a tail call: its return would be missed)."""
    md = md or _md()
    code = img.read_vaddr(fn.entry, fn.end - fn.entry)
    rets, pos = [], fn.entry
    for addr, size, mnemonic, op_str in md.disasm_lite(code, fn.entry):
        pos = addr + size
        if mnemonic == "ret":
            rets.append(addr)
        elif mnemonic == "jmp":
            if not op_str.startswith("0x"):
                raise GoBinaryError(f"{img.path}: {fn.name} has an indirect jump at {addr:#x} ({op_str}): "
                                    f"cannot tell where it returns")
            target = int(op_str, 16)
            if not fn.entry <= target < fn.end:
                raise GoBinaryError(f"{img.path}: {fn.name} jumps out of its body at {addr:#x} (a tail call): "
                                    f"its return would not be seen")
    if pos < fn.end and any(b != 0xCC for b in code[pos - fn.entry:]):
        raise GoBinaryError(f"{img.path}: cannot disassemble {fn.name} past {pos:#x}")
    if not rets:
        raise GoBinaryError(f"{img.path}: {fn.name} has no RET instruction")
    return rets


def entry_site(img, fn: GoFunc, md=None) -> tuple[int, str]:
    """(vaddr, what) of the entry probe. A Go function starts with its stack-bound check,
    `cmp 0x10(%r14),%rsp` (or `lea -N(%rsp),%r12; cmp 0x10(%r14),%r12`) and `jbe morestack`.
    A uprobe on the first instruction is single-stepped (~10 us here); on the conditional jump
    the kernel emulates it (~1 us), and the arguments are still untouched in their registers.
    When the stack must grow, morestack re-enters at the entry and the jump is probed twice
    with the same arguments, which the BPF side simply saves again. Anything else: the entry."""
    md = md or _md()
    code = img.read_vaddr(fn.entry, 32)
    for i, (addr, _size, mnemonic, op_str) in enumerate(md.disasm_lite(code, fn.entry, 3)):
        if mnemonic in ("jbe", "jb") and i >= 1:
            return addr, mnemonic
        if not ((mnemonic == "cmp" and "[r14 + " in op_str) or
                (i == 0 and mnemonic == "lea" and op_str.startswith("r12, [rsp - "))):
            break
    return fn.entry, "entry"


def spills_args(img, fn: GoFunc, md=None) -> bool:
    """Does the function store c (RAX) and b.ptr (RBX) into its argument spill slots (just above
    the return address) in its prologue, and never write those slots again? Then, at a RET,
    [rsp+8] and [rsp+16] still hold them (bpf/gotls.bpf.c: COOKIE_GO_SPILLED)."""
    md = md or _md()
    md.detail = False
    code = img.read_vaddr(fn.entry, fn.end - fn.entry)
    frame, stored, prologue = 0, set(), True
    for _addr, _size, mnemonic, op_str in md.disasm_lite(code, fn.entry):
        if mnemonic == "call":
            prologue = False
        if prologue and mnemonic == "push" and op_str == "rbp":
            frame += 8
        elif prologue and mnemonic == "sub" and op_str.startswith("rsp, "):
            frame += int(op_str.split(", ")[1], 0)
        if mnemonic.startswith("mov") and op_str.startswith("qword ptr [rsp + "):
            disp = int(op_str[len("qword ptr [rsp + "):op_str.index("]")], 0)
            slot = disp - frame
            if slot in (8, 16):
                reg = op_str.rsplit(", ", 1)[1]
                if prologue and reg == {8: "rax", 16: "rbx"}[slot]:
                    stored.add(slot)
                elif frame:
                    return False          # the slot is reused for something else
    return stored == {8, 16} and frame > 0


def _register_abi(img, fn: GoFunc, md) -> bool:
    """Without a version string: ABIInternal functions check the stack bound through R14 (g);
    ABI0 ones load g from TLS first."""
    code = img.read_vaddr(fn.entry, 32)
    for _addr, _size, mnemonic, op_str in md.disasm_lite(code, fn.entry, 4):
        if mnemonic == "cmp" and "r14" in op_str:
            return True
    return False


def analyze(path: str, keylog: bool = False) -> GoTlsTarget:
    """Where to attach in one Go executable for text mode (keylog False) or keylog mode;
    NotGoTLS / GoBinaryError (one line) if it cannot be probed."""
    try:
        st, img = open_x86_64(path)
    except ElfError as e:
        raise NotGoTLS(f"--elfpath: {e}") from None
    with img:
        version = build_version(img)
        try:
            pcln = PcLnTab(img)
        except GoBinaryError as e:
            if version is None:
                raise NotGoTLS(f"{path} is not a Go binary (no .go.buildinfo, no .gopclntab)") from None
            raise NotGoTLS(f"{path} ({version}): {e}") from None
        vt = go_version_tuple(version) if version else None
        if vt is not None and vt < MIN_GO:
            raise NotGoTLS(f"{path} was built by {version}: tlstap gotls needs Go 1.17 or later "
                           f"(arguments in registers)")
        if vt is None and pcln.format == "1.2":
            raise NotGoTLS(f"{path} is a Go 1.2-1.15 binary (pclntab magic): tlstap gotls needs Go 1.17 "
                           f"or later (arguments in registers)")
        fns = {n: pcln.lookup(n) for n in (READ, WRITE, WRITE_KEY_LOG)}
        if fns[READ] is None or fns[WRITE] is None:
            raise NotGoTLS(f"{path} ({version or 'Go'}) does not link crypto/tls: no {READ} / {WRITE} in "
                           f"its function table")
        md = _md()
        if vt is None and not _register_abi(img, fns[READ], md):
            raise NotGoTLS(f"{path}: Go version unknown and {READ} does not use the register ABI: "
                           f"tlstap gotls needs Go 1.17 or later")
        sites, rets = [], []
        key_site, read_spilled = None, False
        if keylog:
            fn = fns[WRITE_KEY_LOG]
            if fn is None:
                raise NotGoTLS(f"{path} ({version or 'Go'}): no {WRITE_KEY_LOG} in its function table")
            at, what = entry_site(img, fn, md)
            key_site = ProbeSite(WRITE_KEY_LOG, img.vaddr_to_offset(at), "keylog", None, what)
            probes = f"{WRITE_KEY_LOG} entry at {at:#x} ({what})"
        else:
            for name, role in ((READ, "read"), (WRITE, "write")):
                fn = fns[name]
                at, what = entry_site(img, fn, md)
                sites.append(ProbeSite(name, img.vaddr_to_offset(at), role, None, what))
                for r in return_sites(img, fn, md):
                    rets.append(ProbeSite(f"{name}+{r - fn.entry:#x}", img.vaddr_to_offset(r), role, None, "ret"))
            nret = {role: sum(r.role == role for r in rets) for role in ("read", "write")}
            read_spilled = spills_args(img, fns[READ], md)
            probes = (f"Read: entry + {nret['read']} RET probes"
                      f"{' (arguments in spill slots)' if read_spilled else ''}, "
                      f"Write: entry + {nret['write']} RET probes")
        stripped = img.elf.get_section_by_name(".symtab") is None
        pie = img.elf["e_type"] == "ET_DYN"
        reason = (f"pclntab {PCLN_MAGIC_NAMES[pcln.format]}, {len(pcln.funcs)} functions"
                  f"{', stripped' if stripped else ''}{', PIE' if pie else ''}; {probes}")
    ver = f"Go {version[2:]}" if version and version.startswith("go") else version
    return GoTlsTarget(path, st.st_dev, st.st_ino, ver, "go", reason, tuple(sites), tuple(rets), key_site,
                       read_spilled)


PCLN_MAGIC_NAMES = {v: f"Go {v}+ format" for v in PCLN_MAGIC.values()}


def find_targets(cfg, keylog: bool = False) -> list[GoTlsTarget]:
    """The executable to probe: --elfpath (cfg.libssl), else the --pid process's own."""
    if cfg.libssl:
        paths = []
        for p in cfg.libssl:
            discover.check_file("--elfpath", p)
            paths.append(p)
    elif cfg.pid:
        paths = [f"/proc/{cfg.pid}/exe"]
    else:
        raise UsageError("tlstap gotls needs --elfpath PATH (a Go executable) or --pid PID")
    return [analyze(p, keylog) for p in paths]
