"""Where a keylog probe finds OpenSSL's secrets, read from the code of each build.

The keylog uprobe sits on OpenSSL's internal ssl_log_secret(s, label, secret, len): every
key log line passes through it, whether or not the application set a keylog callback. To
print the line it also needs two fields of the SSL object (SSL_CONNECTION since 3.2):
s3.client_random (the line's second field) and `server` (which end we are, to name the
direction of a TLS 1.3 KeyUpdate, seen by a second probe on tls13_update_key(s, sending)).

Why not per-version tables: eCapture keeps struct offsets per OpenSSL release; they break
on every patch release, distro patch and build option that moves a field. A table entry is a
guess about a build nobody looked at. Here each fact is read from the build itself and
cross-checked by a second, independent piece of code; when the two disagree, or one is
missing, we raise KeyLayoutUnknown instead of guessing.

How, on x86-64 (shared libssl or a static binary, symbols or stripped):

1. ssl_log_secret: its symbol if there is one (node exports it). Either way, the call sites
   that load an NSS key log label ("CLIENT_RANDOM", "EXPORTER_SECRET", ...) into rsi, the
   second argument (a rip-relative lea; a 32-bit immediate in non-PIE code such as node),
   and then make a direct call: the target at least two and most of them agree on is
   ssl_log_secret. A stripped libssl has nothing else to go by.
2. client_random: the SSL field SSL_get_client_random copies from. Checked twice:
   SSL_get_server_random must copy from 32 bytes lower (the two 32-byte arrays are adjacent
   in struct ssl3_state_st, server_random first), and ssl_log_secret itself must take the
   address (or read the bytes) of the same field.
3. server: the dword SSL_is_server returns. Checked, where tls13_update_key is known,
   against its code, which compares s->server with its `sending` argument.
4. tls13_update_key: its symbol, else the one function that references its HKDF label
   "traffic upd" (RFC 8446 7.2), starting where the unwind table says, and only if it makes
   that comparison. Optional: without it key updates are not followed; the evidence says why.

Since 3.2 the getters first turn the public SSL* into the SSL_CONNECTION* with a helper
call (for QUIC objects); the call's result then stands for the SSL pointer, and all three
getters must use the same helper. OpenSSL 1.1 keeps s3 behind a pointer: its getters read
the same pointer field, not two arrays 32 bytes apart, so that layout is refused.
"""
from __future__ import annotations

from dataclasses import dataclass

import capstone
from capstone import x86 as _x86

from ..errors import TlstapError
from ..abi import CLIENT_RANDOM_LEN  # SSL3_RANDOM_SIZE, GNUTLS_RANDOM_SIZE: a TLS random
from .elf import ElfImage, open_x86_64
from .openssl import NotOpenSSL, detect_version
from .x86 import CALLER_SAVED, GPR, STEP_LIMIT, Code, Ref, code_refs, direct_target, meet, mn, reg, written

#: NSS key log labels OpenSSL passes to ssl_log_secret (ssl/ssl_local.h, *_LABEL).
LOG_LABELS = (b"CLIENT_RANDOM", b"CLIENT_EARLY_TRAFFIC_SECRET", b"CLIENT_HANDSHAKE_TRAFFIC_SECRET",
              b"SERVER_HANDSHAKE_TRAFFIC_SECRET", b"CLIENT_TRAFFIC_SECRET_0", b"SERVER_TRAFFIC_SECRET_0",
              b"EARLY_EXPORTER_SECRET", b"EXPORTER_SECRET")
#: The HKDF label of RFC 8446 7.2; in OpenSSL only tls13_update_key uses it.
UPDATE_LABEL = b"traffic upd"
#: What 3.x's tls13_update_key logs after a KeyUpdate (the literal "N": NSS has no such
#: label, so tlstap writes the number). Builds without them get the next secret derived.
UPDATE_LOG_LABELS = (b"CLIENT_TRAFFIC_SECRET_N", b"SERVER_TRAFFIC_SECRET_N")

_MIN_AGREEING_SITES = 2    # label call sites that must name the same ssl_log_secret
_WALK = 12                 # instructions from a label's load to the call it feeds

@dataclass(frozen=True)
class KeySites:
    """What the keylog probes need in one file. Offsets are file offsets (uprobe offsets)."""
    path: str
    dev: int
    ino: int
    version: str | None
    log_secret: int             # ssl_log_secret(s, label, secret, len)
    log_secret_insn: str        # mnemonic at that offset ("push" is cheap to probe)
    update_key: int | None      # tls13_update_key(s, sending); None: key updates not followed
    update_key_insn: str | None
    client_random_off: int      # offsetof(SSL / SSL_CONNECTION, s3.client_random)
    server_off: int | None      # offsetof(..., server): what SSL_is_server returns (None: unused)
    logs_updates: bool          # tls13_update_key itself logs *_TRAFFIC_SECRET_N lines
    evidence: tuple[str, ...]   # one line per fact: how it was established
    log_secret_name: str = "ssl_log_secret"     # what the library calls it (GnuTLS: another name)


class KeyLayoutUnknown(TlstapError):
    """A fact the keylog probes need could not be established from the build's code."""


# ---- ssl_log_secret from its callers ---------------------------------------------------------

def _label_call(code: Code, ref: Ref) -> int | None:
    """The direct call a label load feeds as the second argument (rsi), within _WALK
    instructions and without a branch in between; None if it goes anywhere else."""
    insn = ref.insn
    ops = insn.operands
    dst, bits = reg(insn, ops[0]) if len(ops) == 2 else (None, 0)
    if mn(insn) not in ("lea", "mov") or dst is None or bits < 32:
        return None                           # pushed or stored: passed some other way
    holders, addr = {dst}, insn.address + insn.size
    for _ in range(_WALK):
        i = code.insn(addr)
        if i is None:
            return None
        m = mn(i)
        if i.group(capstone.CS_GRP_CALL):
            return direct_target(i) if "rsi" in holders else None
        if m == "ret" or i.group(capstone.CS_GRP_JUMP):
            return None
        # mov %label_reg,%rsi passes it on; any other write to a holder loses it
        dst_i, bits_i = reg(i, i.operands[0]) if len(i.operands) == 2 else (None, 0)
        copied = m == "mov" and bits_i >= 32 and reg(i, i.operands[1])[0] in holders
        holders -= written(i)
        if copied:
            holders.add(dst_i)
        addr += i.size
    return None


def vote_log_secret(code: Code, label_refs: list[Ref], labels_at: dict[int, bytes]) -> tuple[int | None, str]:
    """(ssl_log_secret's address or None, the evidence or the reason)."""
    calls: dict[int, list[bytes]] = {}
    for ref in label_refs:
        t = _label_call(code, ref)
        if t is not None:
            calls.setdefault(t, []).append(labels_at[ref.target])
    total = sum(map(len, calls.values()))
    if not calls:
        return None, (f"none of the {len(label_refs)} key log label loads in the code is passed "
                      f"in rsi to a direct call")
    ranked = sorted(calls.items(), key=lambda kv: -len(kv[1]))
    target, labels = ranked[0]
    names = ", ".join(sorted({lb.decode() for lb in labels}))
    if len(labels) < _MIN_AGREEING_SITES or 2 * len(labels) <= total:
        return None, ("label call sites do not agree: " +
                      ", ".join(f"{t:#x} <- {len(lbs)}" for t, lbs in ranked))
    img = code.img
    if not img.is_executable_vaddr(target) or img.in_plt(target):
        return None, f"the label call sites call {target:#x}, which is not code in this file"
    return target, f"{len(labels)} of {total} call sites that pass a key log label in rsi call {target:#x} ({names})"


# ---- register data flow through one function -------------------------------------------------

# Register values, relative to function entry:
SSL_POINTER = ("ssl",)      # the SSL (or SSL_CONNECTION) pointer
_SENDING = ("sending",)     # the low 32 bits of the second argument of tls13_update_key
#   ("field", d)            the dword at SSL + d
#   None                    anything else


@dataclass(frozen=True)
class _Access:
    addr: int              # instruction
    disp: int              # SSL + disp
    lea: bool              # address taken rather than loaded or stored
    size: int              # bytes accessed (for lea: 0)


@dataclass
class _Flow:
    accesses: list[_Access]
    returns: list          # rax at each reachable ret
    compares: dict[int, int]          # addr -> d: the dword at SSL+d compared with `sending`
    helpers: dict[int, int]           # call site -> target whose result became the SSL pointer
    error: str | None = None


def _ssl_base(insn, op, st: dict) -> bool:
    return op.type == _x86.X86_OP_MEM and op.mem.base != 0 and op.mem.segment == 0 and \
        st.get(GPR.get(insn.reg_name(op.mem.base), (None,))[0]) == SSL_POINTER


def _step(insn, st: dict) -> dict:
    """Register values after a non-branch instruction."""
    new = dict(st)
    for r in written(insn):
        new[r] = None
    ops, m = insn.operands, mn(insn)
    if m != "mov" or len(ops) != 2:
        return new
    dst, dbits = reg(insn, ops[0])
    src, sbits = reg(insn, ops[1])
    if dst is None:
        return new
    if src is not None and dbits == sbits == 64:
        new[dst] = st[src]
    elif src is not None and dbits == sbits == 32 and st[src] is not None and st[src] != SSL_POINTER:
        new[dst] = st[src]                    # 32-bit values survive a 32-bit copy; pointers do not
    elif dbits == 32 and _ssl_base(insn, ops[1], st) and ops[1].mem.index == 0 and ops[1].size == 4:
        new[dst] = ("field", ops[1].mem.disp)
    return new


def ssl_flow(code: Code, lo: int, hi: int, entry: dict[str, tuple], convert_calls: bool = False) -> _Flow:
    """Data flow over the control-flow graph of the function at [lo, hi), from its entry.
    Records what is done with the SSL pointer. `convert_calls`: a direct call made with the
    SSL pointer in rdi returns the SSL pointer (the 3.2+ SSL* -> SSL_CONNECTION* helper);
    only for the small exported getters, where that is the only call."""
    start = dict.fromkeys({g for g, _ in GPR.values()})
    start.update(entry)
    states, work, visits = {lo: start}, [lo], 0
    accesses: dict[int, list[_Access]] = {}
    returns, compares, helpers = {}, {}, {}
    while work:
        addr = work.pop()
        visits += 1
        if visits > STEP_LIMIT:
            return _Flow([], [], {}, {}, f"too large to analyse from {lo:#x}")
        st, insn = states[addr], code.insn(addr)
        if insn is None:
            return _Flow([], [], {}, {}, f"cannot decode {addr:#x}")
        m, ops, nxt = mn(insn), insn.operands, addr + insn.size
        accesses[addr] = [_Access(addr, op.mem.disp, m == "lea", 0 if m == "lea" else op.size)
                          for op in ops if _ssl_base(insn, op, st)]
        if m == "cmp" and len(ops) == 2:          # cmp %sending,d(%ssl) or via a loaded register
            mem = [op for op in ops if _ssl_base(insn, op, st) and op.mem.index == 0 and op.size == 4]
            vals = [st[r] for r, bits in (reg(insn, op) for op in ops) if r and bits == 32]
            if mem and vals == [_SENDING]:
                compares[addr] = mem[0].mem.disp
            elif not mem and len(vals) == 2 and _SENDING in vals:
                other = vals[1] if vals[0] == _SENDING else vals[0]
                if other and other[0] == "field":
                    compares[addr] = other[1]
        target = direct_target(insn)
        succ = []
        if insn.group(capstone.CS_GRP_RET):
            returns[addr] = st["rax"]
        elif insn.group(capstone.CS_GRP_CALL):
            after = dict(st)
            after.update(dict.fromkeys(CALLER_SAVED))
            if convert_calls and target is not None and st["rdi"] == SSL_POINTER:
                after["rax"] = SSL_POINTER
                helpers[addr] = target
            succ = [(nxt, after)]
        elif m == "jmp":
            succ = [(target, st)] if target is not None else []     # leaving: a tail call
        elif insn.group(capstone.CS_GRP_JUMP):
            succ = [(nxt, st)] + ([(target, st)] if target is not None else [])
        elif m not in ("ud2", "hlt", "int3"):
            succ = [(nxt, _step(insn, st))]
        for a, s in succ:
            if not lo <= a < hi:
                continue                      # a tail call or a jump to a .cold part
            old = states.get(a)
            new = s if old is None else meet(old, s)
            if new != old:
                states[a] = new
                work.append(a)
    # each address was last processed with its final (fixpoint) state
    return _Flow([a for acc in accesses.values() for a in acc], list(returns.values()), compares, helpers)


# ---- the analysis ------------------------------------------------------------------------------

def _fields(flow: _Flow) -> set[int]:
    """Displacements used off the SSL pointer; 0 is the object-type check of 3.2+ (and never
    one of our fields)."""
    return {a.disp for a in flow.accesses if a.disp != 0}


class _Analysis:
    def __init__(self, img: ElfImage, version: str | None):
        self.img = img
        self.code = Code(img)
        self.version = version
        self.evidence: list[str] = []

    def fail(self, what: str, why: str) -> KeyLayoutUnknown:
        return KeyLayoutUnknown(f"{self.img.path} ({self.version or 'OpenSSL version unknown'}): "
                                f"cannot establish {what}: {why}")

    def bounds(self, name: str, vaddr: int) -> tuple[int, int] | None:
        sym = self.img.function(name)
        if sym is not None and sym.vaddr == vaddr and sym.size:
            return vaddr, vaddr + sym.size
        rng = self.img.function_range(vaddr)
        return rng if rng is not None and rng[0] == vaddr else None

    def flow(self, what: str, name: str, vaddr: int, entry: dict, convert_calls: bool = False) -> _Flow:
        rng = self.bounds(name, vaddr)
        if rng is None:
            raise self.fail(what, f"no size or unwind entry for {name} at {vaddr:#x}")
        f = ssl_flow(self.code, *rng, entry, convert_calls)
        if f.error:
            raise self.fail(what, f"{name}: {f.error}")
        return f

    def getter(self, what: str, name: str) -> _Flow:
        sym = self.img.function(name)
        if sym is None:
            raise self.fail(what, f"{name} is not defined")
        return self.flow(what, name, sym.vaddr, {"rdi": SSL_POINTER}, convert_calls=True)

    def log_secret(self, label_refs: list[Ref], labels_at: dict[int, bytes]) -> int:
        voted, why = vote_log_secret(self.code, label_refs, labels_at)
        sym = self.img.function("ssl_log_secret")
        if sym is not None:
            verdict = ("call sites agree: " if voted == sym.vaddr else
                       "call sites DISAGREE: " if voted is not None else "not confirmed by call sites: ")
            self.evidence.append(f"ssl_log_secret: symbol at {sym.vaddr:#x}; {verdict}{why}")
            return sym.vaddr
        if voted is None:
            raise self.fail("ssl_log_secret", f"no symbol, and {why}")
        rng = self.img.function_range(voted)
        if rng is None or rng[0] != voted:
            raise self.fail("ssl_log_secret", f"{why}, but no function starts there in the unwind table")
        self.evidence.append(f"ssl_log_secret: no symbol; {why}")
        return voted

    def client_random(self, cr: _Flow, sr: _Flow, log_secret: int) -> int:
        what = "s3.client_random"
        for name, f in (("SSL_get_client_random", cr), ("SSL_get_server_random", sr)):
            if len(_fields(f)) != 1:
                raise self.fail(what, f"{name} uses {len(_fields(f))} SSL fields "
                                      f"({', '.join(map(hex, sorted(_fields(f)))) or 'none'}), expected one")
        (off,), (soff,) = _fields(cr), _fields(sr)
        self.evidence.append(f"client_random +{off:#x}: SSL_get_client_random copies from s+{off:#x}")
        if off - soff != CLIENT_RANDOM_LEN:
            raise self.fail(what, f"SSL_get_client_random reads s+{off:#x} but SSL_get_server_random s+{soff:#x}, "
                                  f"not {CLIENT_RANDOM_LEN} bytes lower (s3 behind a pointer, as in 1.1?)")
        self.evidence.append(f"client_random +{off:#x}: SSL_get_server_random copies from s+{soff:#x}, "
                             f"{CLIENT_RANDOM_LEN} bytes lower")
        own = [a for a in self.flow(what, "ssl_log_secret", log_secret, {"rdi": SSL_POINTER}).accesses
               if a.disp == off and (a.lea or a.size == 1)]
        if not own:
            raise self.fail(what, f"ssl_log_secret ({log_secret:#x}) neither takes the address of nor reads "
                                  f"bytes at s+{off:#x}")
        self.evidence.append(f"client_random +{off:#x}: ssl_log_secret {'takes' if own[0].lea else 'reads'} "
                             f"s+{off:#x} at {own[0].addr:#x}")
        return off

    def server(self, f: _Flow) -> int:
        fields = {v[1] for v in f.returns if v and v[0] == "field"} - {0}
        if len(fields) != 1:
            raise self.fail("the server flag", f"SSL_is_server returns {len(fields)} different SSL fields, expected one")
        (off,) = fields
        self.evidence.append(f"server +{off:#x}: SSL_is_server returns the dword at s+{off:#x}")
        return off

    def helpers(self, flows: dict[str, _Flow]) -> None:
        """The 3.2+ getters convert SSL* to SSL_CONNECTION* first: all with the same helper."""
        used = {name: set(f.helpers.values()) for name, f in flows.items()}
        if len({frozenset(u) for u in used.values()}) != 1 or any(len(u) > 1 for u in used.values()):
            raise self.fail("the SSL object", "the getters reach it through different calls: " + "; ".join(
                f"{n} via {', '.join(map(hex, sorted(u))) or 'no call'}" for n, u in used.items()))
        (u,) = {frozenset(u) for u in used.values()}
        self.evidence.append("SSL* is the object itself in " + ", ".join(used) if not u else
                             f"SSL* -> SSL_CONNECTION* through the call to {min(u):#x} in " + ", ".join(used))

    def update_key(self, update_refs: list[Ref], server_off: int) -> int | None:
        """tls13_update_key by symbol, else by its "traffic upd" label. Either way it compares
        s->server with `sending` to pick the direction: a second witness for server_off and,
        without a symbol, the sign that the label led to the right function."""
        starts = sorted({r.function for r in update_refs})
        found = (f"the only function referencing {UPDATE_LABEL.decode()!r} starts at {starts[0]:#x}"
                 if len(starts) == 1 else
                 f"{len(starts)} functions reference {UPDATE_LABEL.decode()!r}"
                 + (f" ({', '.join(map(hex, starts))})" if starts else ""))
        sym = self.img.function("tls13_update_key")
        if sym is None and len(starts) != 1:
            self.evidence.append(f"tls13_update_key: not found (key updates not followed): {found}")
            return None
        addr = sym.vaddr if sym is not None else starts[0]
        f = self.flow("the server flag", "tls13_update_key", addr, {"rdi": SSL_POINTER, "rsi": _SENDING})
        seen = sorted(set(f.compares.values()))
        compares = f"compares s+{', s+'.join(map(hex, seen))} with its sending argument"
        if sym is None and seen != [server_off]:
            self.evidence.append(f"tls13_update_key: not found (key updates not followed): {found}, but it "
                                 + (compares if seen else "compares no SSL field with its second argument")
                                 + f" (SSL_is_server reads s+{server_off:#x})")
            return None
        if sym is not None:
            verdict = "agrees" if starts == [sym.vaddr] else "does not agree"
            self.evidence.append(f"tls13_update_key: symbol at {sym.vaddr:#x}; {verdict}: {found}")
        else:
            self.evidence.append(f"tls13_update_key: no symbol; {found} (unwind table)")
        if not seen:
            self.evidence.append(f"server +{server_off:#x}: not cross-checked (tls13_update_key compares no "
                                 f"SSL field with its sending argument)")
        elif seen != [server_off]:
            raise self.fail("the server flag", f"SSL_is_server reads s+{server_off:#x} but tls13_update_key {compares}")
        else:
            self.evidence.append(f"server +{server_off:#x}: tls13_update_key compares s+{server_off:#x} with "
                                 f"its sending argument at {min(f.compares):#x}")
        return addr

    def logs_updates(self, update: int | None, n_refs: list[Ref]) -> bool:
        users = {r.function for r in n_refs}
        if update is not None and update in users:
            self.evidence.append(f"key updates: tls13_update_key logs {' and '.join(l.decode() for l in UPDATE_LOG_LABELS)} "
                                 f"itself; tlstap numbers them")
            return True
        self.evidence.append("key updates: the build logs no *_TRAFFIC_SECRET_N line; tlstap derives the next "
                             "secret (RFC 8446 7.2)" if update is not None else "key updates: not followed")
        return False

    def run(self) -> tuple[int, int | None, int, int, bool]:
        found = self.img.find_all_rodata([lb + b"\0" for lb in (*LOG_LABELS, UPDATE_LABEL, *UPDATE_LOG_LABELS)])
        labels_at = {a: lb for lb in LOG_LABELS for a in found[lb + b"\0"]}
        update_at = set(found[UPDATE_LABEL + b"\0"])
        n_at = {a for lb in UPDATE_LOG_LABELS for a in found[lb + b"\0"]}
        refs = code_refs(self.code, set(labels_at) | update_at | n_at)     # one pass over the code for all
        log_secret = self.log_secret([r for r in refs if r.target in labels_at], labels_at)
        getters = {name: self.getter(what, name) for name, what in (
            ("SSL_get_client_random", "s3.client_random"), ("SSL_get_server_random", "s3.client_random"),
            ("SSL_is_server", "the server flag"))}
        self.helpers(getters)
        client_random = self.client_random(getters["SSL_get_client_random"], getters["SSL_get_server_random"],
                                           log_secret)
        server_off = self.server(getters["SSL_is_server"])
        update = self.update_key([r for r in refs if r.target in update_at], server_off)
        if update is None:
            self.evidence.append(f"server +{server_off:#x}: not cross-checked (no tls13_update_key)")
        logs = self.logs_updates(update, [r for r in refs if r.target in n_at])
        return log_secret, update, client_random, server_off, logs


def analyze_keys(path: str) -> KeySites:
    """Find ssl_log_secret, tls13_update_key and the two SSL fields in one OpenSSL build
    (shared libssl or a static binary). Raises KeyLayoutUnknown when a fact is not established
    by agreeing evidence, NotOpenSSL for other files, ElfError for unreadable ones."""
    st, img = open_x86_64(path)
    with img:
        if img.function("SSL_write") is None and img.function("SSL_write_ex") is None:
            raise NotOpenSSL(f"{path} does not define SSL_write or SSL_write_ex: not OpenSSL")
        a = _Analysis(img, detect_version(path))
        log_secret, update, client_random, server_off, logs_updates = a.run()
        ls_off, ls_insn = a.code.entry_site(log_secret)
        uk_off, uk_insn = a.code.entry_site(update) if update is not None else (None, None)
    return KeySites(path, st.st_dev, st.st_ino, a.version, ls_off, ls_insn, uk_off, uk_insn,
                    client_random, server_off, logs_updates, tuple(a.evidence))


__all__ = ["KeyLayoutUnknown", "KeySites", "LOG_LABELS", "UPDATE_LABEL", "analyze_keys"]
