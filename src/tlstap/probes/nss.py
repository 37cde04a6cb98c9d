"""NSS: library discovery, version and uprobe placement on NSPR's I/O API.

NSS applications move TLS plaintext through NSPR: PR_Read/PR_Write/PR_Recv/PR_Send on
the PRFileDesc* that SSL_ImportFD turned into an SSL socket. These take (fd, buf, amount)
in rdi, rsi, rdx and return the byte count (PRInt32, <= 0: nothing moved), so the OpenSSL
programs serve them with out_arg None, keyed by the PRFileDesc*. In NSPR 4.35 each of the
four is a two-instruction dispatcher (`mov (%rdi),%rax; jmp *N(%rax)`): the tail jump keeps the caller's return
address, so the return probe fires when the layer's method returns.

The same four functions serve files, pipes and plain sockets (tstclnt copies stdin and
stdout with PR_Read/PR_Write), so their entry program is nspr_rw_enter, which takes a call
only when the fd's layer stack holds NSS's SSL layer (bpf/openssl.bpf.c says how). The SSL
layer reaches the socket below it through lower->methods, never the exported functions,
so a call is seen once. PR_Close drops the fd's cached connection (its address is reused).

No handshake probe (GnuTLS and OpenSSL have one): NSS reads the socket one TLS record at a
time (recv of the 5-byte header, then of exactly the body, seen with strace), so a
handshake never leaves application data behind; a read served from NSS's buffer is the rest
of a record whose first read made the syscall that named the connection.

PR_Writev (selfserv answers with it) has its own entry program: the exit copies the bytes
from the PRIOVec array, one call whose records follow the vectors.

Not covered: PR_TransmitFile/PR_SendFile, DTLS (PR_SendTo/PR_RecvFrom), and applications
that call a layer's methods directly (fd->methods->read) instead of the PR_* functions.
"""
from __future__ import annotations

import os
import re

from ..errors import TlstapError
from .elf import ElfError, ElfImage, open_x86_64
from .openssl import OpenSSLTarget, ProbeSite
from .x86 import Code

NSSTarget = OpenSSLTarget

_LIB_NAME = re.compile(r"libnspr4\.so(\.|$)")
_PREFERRED = ("libnspr4.so",)
_MARKERS = ("PR_Read", "PR_Write")
_PLAN = (("PR_Read", "read"), ("PR_Recv", "read"), ("PR_Write", "write"), ("PR_Send", "write"),
         ("PR_Writev", "write"), ("PR_Close", "free"))
ENTRY = "nspr_rw_enter"
#: PR_Writev passes a PRIOVec array, not the bytes: its entry marks the call so the exit walks it
ENTRY_FOR = {"PR_Writev": "nspr_writev_enter"}
_NSPR_VERSION_RX = re.compile(rb"^\d+\.\d+(\.\d+)*[0-9A-Za-z.+~-]*$")
_NSS_VERSION_RX = re.compile(rb"Version: NSS (\d+\.\d+(?:\.\d+)*)")


class NotNSPR(TlstapError):
    """The file does not define PR_Read and PR_Write."""


# ---- version -----------------------------------------------------------------------------

def _nss_version(nspr_path: str) -> str | None:
    """"NSS X.Y.Z" from libnss3.so next to libnspr4 (how distributions install them; under
    /proc/PID/root too): the RCS-style "Version: NSS 3.87.1" string in its .rodata."""
    nss = os.path.join(os.path.dirname(nspr_path), "libnss3.so")
    try:
        with ElfImage.open(nss) as img:
            m = img.search_rodata(_NSS_VERSION_RX)
    except (ElfError, OSError):
        return None
    return "NSS " + m.group(1).decode() if m else None


def detect_version(img: ElfImage, code: Code, path: str) -> str | None:
    """"NSPR 4.35, NSS 3.87.1" as far as known. PR_GetVersion returns PR_VERSION: the first
    `lea X(%rip), %rax` in it."""
    nspr = code.lea_string("PR_GetVersion", _NSPR_VERSION_RX)
    parts = [f"NSPR {nspr}" if nspr else None, _nss_version(path)]
    return ", ".join(p for p in parts if p) or None


# ---- placement ---------------------------------------------------------------------------

def analyze(path: str) -> NSSTarget:
    """Where to attach in one NSPR build: libnspr4.so, or any file exporting PR_Read and
    PR_Write (Firefox's libnss3.so carries NSPR folded in)."""
    st, img = open_x86_64(path)
    with img:
        syms = {n: img.function(n) for n, _ in _PLAN}
        if any(syms[m] is None for m in _MARKERS):
            raise NotNSPR(f"{path} does not define PR_Read and PR_Write: not NSPR (libnspr4.so)")
        code = Code(img)
        sites = []
        for name, role in _PLAN:
            if syms[name] is None:
                continue
            off, insn = code.entry_site(syms[name].vaddr)
            # ("free" sites run ssl_free_enter whatever their entry says)
            sites.append(ProbeSite(name, off, role, None, insn, entry=ENTRY_FOR.get(name, ENTRY)))
        version = detect_version(img, code, path)
    return NSSTarget(path, st.st_dev, st.st_ino, version, "api",
                     "NSPR I/O entry points, filtered to fds with NSS's SSL layer", tuple(sites))


# ---- discovery ---------------------------------------------------------------------------

def system_libnspr() -> str:
    """The x86-64 libnspr4.so the dynamic linker would load (ld.so cache)."""
    from .discover import system_library
    return system_library(_LIB_NAME, _PREFERRED, "libnspr4.so", "--nspr")


def libs_for_pid(pid: int) -> list[str]:
    """Openable paths of the distinct files process `pid` maps that export PR_Read and
    PR_Write: its libnspr4.so, or a static build."""
    from .discover import mapped_exporting
    return mapped_exporting(pid, _MARKERS, "NSPR", "--nspr")


def find_targets(cfg) -> list[NSSTarget]:
    """The NSPR builds to probe, each file once: cfg.libssl (the --nspr paths), else what
    --pid maps, else the system libnspr4. For OpenSSLCapture(cfg, sink, find=find_targets)."""
    from .discover import target_paths
    return [analyze(p) for p in target_paths(cfg.libssl, cfg.pid, "--nspr", libs_for_pid, system_libnspr)]
