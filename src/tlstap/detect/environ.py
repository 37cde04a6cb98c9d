"""What a process's environment asks of its TLS library: SSLKEYLOGFILE (what honours it, NSS,
GnuTLS, curl, browsers, OpenSSL 3.5 built with enable-sslkeylog, writes each session's keys there) and
LD_PRELOAD in processes that map a TLS library (a preloaded library can wrap SSL_read/SSL_write).
Also /etc/ld.so.preload, which preloads into every process.

/proc/PID/environ is the environment the process started with: a variable set or removed
later by the process itself (setenv) is not seen.
"""
from __future__ import annotations

import os

from .procs import Proc, read
from .report import Finding
from .uprobes import library_of

LD_SO_PRELOAD = "/etc/ld.so.preload"


def _tls_libraries(p: Proc) -> list[str]:
    libs = []
    for path in sorted(p.mapped_files()):
        name = library_of(path, None)
        if name and f"{name} ({path})" not in libs:
            libs.append(f"{name} ({path})")
    return libs


def find(procs: dict[int, Proc]) -> list[Finding]:
    out = []
    for p in procs.values():
        env = p.environ()
        if not env:
            continue
        if "SSLKEYLOGFILE" in env:
            path = env["SSLKEYLOGFILE"]
            out.append(Finding("sslkeylogfile", f"SSLKEYLOGFILE={path}", {"path": path}, [p], p.start,
                               "process started"))
        if env.get("LD_PRELOAD"):
            libs = _tls_libraries(p)
            if libs:
                pre = env["LD_PRELOAD"]
                out.append(Finding("ld_preload", f"LD_PRELOAD={pre} in a process mapping {', '.join(libs)}",
                                   {"preload": pre, "tls_libraries": libs}, [p], p.start, "process started"))
    text = read(LD_SO_PRELOAD)
    if text and text.split():
        st = os.stat(LD_SO_PRELOAD)
        out.append(Finding("ld_preload", f"{LD_SO_PRELOAD} preloads {' '.join(text.split())} into every process",
                           {"preload": " ".join(text.split()), "file": LD_SO_PRELOAD}, [], st.st_mtime,
                           "file last changed", no_owner="every process started since"))
    return out
