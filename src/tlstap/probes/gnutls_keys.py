"""Where a keylog probe finds GnuTLS's secrets, read from the code of each build.

Every NSS key log line GnuTLS produces (3.6.13+) passes through one internal function,
_gnutls_call_keylog_func(session, label, data, size), which hands it to the session's
keylog hook (by default the SSLKEYLOGFILE writer). Its arguments are those of OpenSSL's
ssl_log_secret, so the same uprobe program reads them; it needs one field of the session:
security_parameters.client_random. As for OpenSSL (openssl_keys.py says why there are no
per-version tables), each fact is read from the build and checked by a second witness:

1. _gnutls_call_keylog_func is hidden (not exported). The call sites that load an NSS key
   log label into rsi and then call agree on it (at least two, a clear majority).
2. client_random: what gnutls_session_get_random(session, client, server) stores in
   client->data; server->data must be 32 bytes higher (the two arrays are adjacent, client
   first), and the SSLKEYLOGFILE writer (the function that uses the "%s %s %s\\n" format)
   must take the address of the same field.

GnuTLS logs nothing at a TLS 1.3 KeyUpdate, and neither does tlstap (lines identical to the
library's own), so no update probe and no server flag are needed.
"""
from __future__ import annotations

from capstone import x86 as _x86

from ..abi import CLIENT_RANDOM_LEN  # SSL3_RANDOM_SIZE, GNUTLS_RANDOM_SIZE: a TLS random
from .elf import ElfImage, open_x86_64
from .gnutls import NotGnuTLS, detect_version
# the label-vote and data-flow machinery is the OpenSSL analysis's; only the facts differ
from .openssl_keys import LOG_LABELS, SSL_POINTER, KeyLayoutUnknown, KeySites, ssl_flow, vote_log_secret
from .x86 import GPR, Code, code_refs, written

_WRITER_FORMAT = b"%s %s %s\n"  # the default hook's fprintf format: label, client random, secret
NAME = "_gnutls_call_keylog_func"


class _Analysis:
    def __init__(self, img: ElfImage, version: str | None):
        self.img, self.code, self.version = img, Code(img), version
        self.evidence: list[str] = []

    def fail(self, what: str, why: str) -> KeyLayoutUnknown:
        return KeyLayoutUnknown(f"{self.img.path} ({self.version or 'GnuTLS version unknown'}): "
                                f"cannot establish {what}: {why}")

    def call_keylog(self) -> int:
        found = self.img.find_all_rodata([lb + b"\0" for lb in LOG_LABELS])
        labels_at = {a: lb for lb in LOG_LABELS for a in found[lb + b"\0"]}
        voted, why = vote_log_secret(self.code, code_refs(self.code, set(labels_at)), labels_at)
        if voted is None:
            raise self.fail(NAME, why)
        rng = self.img.function_range(voted)
        if rng is None or rng[0] != voted:
            raise self.fail(NAME, f"{why}, but no function starts there in the unwind table")
        self.evidence.append(f"{NAME}: {why}")
        return voted

    def random_fields(self) -> tuple[int, int]:
        """(client, server) offsets gnutls_session_get_random stores into the two datums. A
        straight walk suffices: the getter is `if (client) client->data = s + X; if (server)
        server->data = s + Y`, its branches only skip forward."""
        fn = self.img.function("gnutls_session_get_random")
        if fn is None or not fn.size:
            raise self.fail("client_random", "gnutls_session_get_random is not defined")
        regs: dict[str, tuple] = {"rdi": ("s", 0), "rsi": ("client",), "rdx": ("server",)}
        stored: dict[str, set[int]] = {"client": set(), "server": set()}
        for insn in self.code.body(fn.vaddr, fn.vaddr + fn.size):
            ops = insn.operands
            if insn.mnemonic in ("ret", "call") or len(ops) != 2:
                continue
            dst = GPR.get(insn.reg_name(ops[0].reg), (None,))[0] if ops[0].type == _x86.X86_OP_REG else None
            src = ops[1]
            if insn.mnemonic == "lea" and dst and src.mem.index == 0:
                base = regs.get(GPR.get(insn.reg_name(src.mem.base), (None,))[0])
                regs[dst] = ("s", base[1] + src.mem.disp) if base and base[0] == "s" else ()
            elif insn.mnemonic == "add" and dst and src.type == _x86.X86_OP_IMM and regs.get(dst, ())[:1] == ("s",):
                regs[dst] = ("s", regs[dst][1] + src.imm)
            elif insn.mnemonic == "mov" and ops[0].type == _x86.X86_OP_MEM and ops[0].size == 8 and \
                    src.type == _x86.X86_OP_REG:
                datum = regs.get(GPR.get(insn.reg_name(ops[0].mem.base), (None,))[0], ())
                val = regs.get(GPR.get(insn.reg_name(src.reg), (None,))[0], ())
                if datum in (("client",), ("server",)) and ops[0].mem.disp == 0 and val[:1] == ("s",):
                    stored[datum[0]].add(val[1])
            else:
                for r in written(insn):
                    regs[r] = ()
        if len(stored["client"]) != 1 or len(stored["server"]) != 1:
            raise self.fail("client_random", f"gnutls_session_get_random stores {stored['client'] or 'nothing'} "
                                             f"as client and {stored['server'] or 'nothing'} as server random")
        return min(stored["client"]), min(stored["server"])

    def client_random(self) -> int:
        off, soff = self.random_fields()
        self.evidence.append(f"client_random +{off:#x}: gnutls_session_get_random gives s+{off:#x}")
        if soff - off != CLIENT_RANDOM_LEN:
            raise self.fail("client_random", f"the server random is at s+{soff:#x}, not {CLIENT_RANDOM_LEN} bytes "
                                             f"above the client random at s+{off:#x}")
        self.evidence.append(f"client_random +{off:#x}: the server random is {CLIENT_RANDOM_LEN} bytes above")
        found = self.img.find_all_rodata([_WRITER_FORMAT + b"\0"])[_WRITER_FORMAT + b"\0"]
        users = sorted({r.function for r in code_refs(self.code, set(found))})
        if len(users) != 1:
            raise self.fail("client_random", f"{len(users)} functions use the key log line format, expected one")
        rng = self.img.function_range(users[0])
        f = ssl_flow(self.code, *rng, {"rdi": SSL_POINTER})
        if f.error or not any(a.disp == off and (a.lea or a.size == 1) for a in f.accesses):
            raise self.fail("client_random", f"the SSLKEYLOGFILE writer at {users[0]:#x} does not take s+{off:#x}"
                                             + (f" ({f.error})" if f.error else ""))
        self.evidence.append(f"client_random +{off:#x}: the SSLKEYLOGFILE writer at {users[0]:#x} takes it")
        return off


def analyze_keys(path: str) -> KeySites:
    """Find _gnutls_call_keylog_func and the client random's offset in one GnuTLS build.
    Raises KeyLayoutUnknown when a fact is not established by agreeing evidence, NotGnuTLS for
    other files, ElfError for unreadable ones."""
    st, img = open_x86_64(path)
    with img:
        if img.function("gnutls_record_send") is None:
            raise NotGnuTLS(f"{path} does not define gnutls_record_send: not GnuTLS")
        a = _Analysis(img, detect_version(img, Code(img)))
        call_keylog = a.call_keylog()
        client_random = a.client_random()
        off, insn = a.code.entry_site(call_keylog)
    return KeySites(path, st.st_dev, st.st_ino, a.version, off, insn, None, None, client_random, None,
                    False, tuple(a.evidence), log_secret_name=NAME)


def find_keys(cfg) -> list[KeySites]:
    """The GnuTLS builds to probe for keys: the same files as text mode (gnutls.find_targets)."""
    from .discover import target_paths
    from .gnutls import libs_for_pid, system_libgnutls
    return [analyze_keys(p) for p in target_paths(cfg.libssl, cfg.pid, "--gnutls", libs_for_pid, system_libgnutls)]
