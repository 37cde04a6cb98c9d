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

from ..errors import TlstapError
from .elf import ElfError, ElfImage, Symbol, open_x86_64
from .x86 import ARG_REGS, NORETURN, STACK, Code, Transfer, trace


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


#: the BPF side reads out-params from argument registers 0..4 (abi.site_cookie)
MAX_OUT_ARG = 4


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
    return name is not None and (name.startswith("ERR_") or name in NORETURN)


@dataclass(frozen=True)
class _Found:
    target: int
    out_arg: int
    caller: str          # the wrapper whose call we probe through (names the site)


class _Analysis:
    def __init__(self, img: ElfImage):
        self.img = img
        self.code = Code(img)
        self.traces: dict[str, tuple[list[Transfer], str | None]] = {}

    def trace(self, fn: Symbol):
        if fn.name not in self.traces:
            self.traces[fn.name] = trace(self.code, fn)
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
