"""GnuTLS: library discovery, version and uprobe placement (probes shared with OpenSSL).

The record API returns the byte count (ssize_t, <= 0: nothing moved) and takes
(session, data, size) in rdi, rsi, rdx, so the OpenSSL programs serve it unchanged with
out_arg None: gnutls_record_recv / gnutls_record_recv_seq read, gnutls_record_send2 /
gnutls_record_send / gnutls_record_send_range write, gnutls_deinit frees the session
(drops its cached connection), gnutls_handshake names the connection before the first
read (often served from bytes the handshake buffered).

Nesting: gnutls_record_send is `xor r8d,r8d; xor ecx,ecx; jmp gnutls_record_send2@plt`
(3.6.3+), so when the disassembly shows that, send2 alone covers both. Otherwise both are
probed; the BPF side counts a call once even when probed functions nest (stack depth) or
tail-jump into each other (the second entry overwrites the first with the same arguments,
and the first return clears the call). recv and recv_seq both jump to an internal
_gnutls_recv_int(session, type, data, ...), which has the buffer in the wrong register
for the shared programs, and never call each other.

Not covered: gnutls_record_recv_packet (zero-copy, no caller buffer),
gnutls_record_{send,recv}_early_data (TLS 1.3 0-RTT), kTLS sendfile
(gnutls_record_send_file with kTLS enabled).
"""
from __future__ import annotations

import re

from ..errors import TlstapError
from .elf import ElfImage, open_x86_64
from .openssl import OpenSSLTarget, ProbeSite
from .x86 import Code, trace

# the OpenSSL target type carries everything the capture and the CLI need
GnuTLSTarget = OpenSSLTarget

_LIB_NAME = re.compile(r"libgnutls\.so(\.|$)")       # not libgnutls-dane / libgnutlsxx / libgnutls-openssl
_PREFERRED = ("libgnutls.so.30",)
_MARKER = "gnutls_record_send"
_VERSION_RX = re.compile(rb"^\d+\.\d+\.\d+[0-9A-Za-z.+~-]*$")
_LOG_VERSION_RX = re.compile(rb"Enabled GnuTLS (\d+\.\d+\.\d+[0-9A-Za-z.+~-]*) logging")


class NotGnuTLS(TlstapError):
    """The file does not define gnutls_record_send / gnutls_record_recv."""


# ---- version -----------------------------------------------------------------------------

def detect_version(img: ElfImage, code: Code) -> str | None:
    v = code.lea_string("gnutls_check_version", _VERSION_RX)   # gnutls_check_version(NULL): VERSION
    if v is None:
        m = img.search_rodata(_LOG_VERSION_RX)
        v = m.group(1).decode() if m else None
    return f"GnuTLS {v}" if v else None


# ---- placement ---------------------------------------------------------------------------

def _calls(img: ElfImage, code: Code, caller: str, callee: str) -> bool | None:
    """Does `caller` call or jump to `callee` (directly or through the PLT)? None: unknown."""
    fn = img.function(caller)
    if fn is None:
        return None
    transfers, err = trace(code, fn)
    if err:
        return None
    target = img.function(callee)
    return any(code.name_of(t) == callee or (target is not None and t.target == target.vaddr)
               for t in transfers)


def analyze(path: str) -> GnuTLSTarget:
    """Where to attach in one GnuTLS build (libgnutls.so or an executable defining the API)."""
    st, img = open_x86_64(path)
    with img:
        names = ("gnutls_record_recv", "gnutls_record_recv_seq", "gnutls_record_send", "gnutls_record_send2",
                 "gnutls_record_send_range", "gnutls_deinit", "gnutls_handshake")
        syms = {n: img.function(n) for n in names}
        if syms["gnutls_record_send"] is None or syms["gnutls_record_recv"] is None:
            raise NotGnuTLS(f"{path} does not define gnutls_record_send and gnutls_record_recv: not GnuTLS")
        code = Code(img)
        plan = [("gnutls_record_recv", "read"), ("gnutls_record_recv_seq", "read")]
        if syms["gnutls_record_send2"] is not None:
            via = _calls(img, code, "gnutls_record_send", "gnutls_record_send2")
            if via:
                plan.append(("gnutls_record_send2", "write"))
                reason = "gnutls_record_send jumps to gnutls_record_send2: send2 covers both"
            else:
                plan += [("gnutls_record_send", "write"), ("gnutls_record_send2", "write")]
                reason = ("gnutls_record_send does not visibly call gnutls_record_send2: both probed "
                          "(nested calls are counted once)")
        else:
            plan.append(("gnutls_record_send", "write"))
            reason = "no gnutls_record_send2 (GnuTLS < 3.6.3)"
        plan += [("gnutls_record_send_range", "write"), ("gnutls_deinit", "free"),
                 ("gnutls_handshake", "handshake")]
        sites = []
        for name, role in plan:
            if syms[name] is None:
                continue
            off, insn = code.entry_site(syms[name].vaddr)
            sites.append(ProbeSite(name, off, role, None, insn))
        version = detect_version(img, code)
    return GnuTLSTarget(path, st.st_dev, st.st_ino, version, "api", reason, tuple(sites))


# ---- discovery ---------------------------------------------------------------------------

def system_libgnutls() -> str:
    """The x86-64 libgnutls the dynamic linker would load (ld.so cache): libgnutls.so.30 first."""
    from .discover import system_library
    return system_library(_LIB_NAME, _PREFERRED, "libgnutls.so*", "--gnutls")


def libs_for_pid(pid: int) -> list[str]:
    """Openable paths (/proc/PID/root/..., or map_files for deleted files) of the distinct files
    process `pid` maps that export gnutls_record_send: its libgnutls.so*, or a static build."""
    from .discover import mapped_exporting
    return mapped_exporting(pid, (_MARKER,), "GnuTLS", "--gnutls")


def find_targets(cfg) -> list[GnuTLSTarget]:
    """The GnuTLS builds to probe, each file once: cfg.libssl (the --gnutls paths), else what
    --pid maps, else the system libgnutls. For OpenSSLCapture(cfg, sink, find=find_targets)."""
    from .discover import target_paths
    return [analyze(p) for p in target_paths(cfg.libssl, cfg.pid, "--gnutls", libs_for_pid, system_libgnutls)]
