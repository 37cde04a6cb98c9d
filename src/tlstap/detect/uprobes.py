"""Uprobes with a BPF program, and what they watch: which library, which function.

Two ways in, because tools attach uprobes two ways:
- BPF links (BPF_LINK_TYPE_PERF_EVENT since 5.15, UPROBE_MULTI since 6.6): enumerated by id
  (BPF_LINK_GET_NEXT_ID); bpf_link_info names the file, the offset and the cookie. libbpf
  >= 0.8 (tlstap, newer bpftrace) attaches so.
- A perf event with a program set on it by PERF_EVENT_IOC_SET_BPF and no link (BCC, bpftrace
  0.17 as Debian ships it): only the process's fd knows it. BPF_TASK_FD_QUERY on each
  anon_inode:[perf_event] fd of each process gives the program id, uprobe or uretprobe, the
  file and the offset (what `bpftool perf` lists). The perf fd a libbpf link keeps open is
  found this way too; it is merged with its link's finding.

The kernel reports the path the attacher gave, as seen from its mount namespace; it is read
through the holder's /proc/PID/root when it is not found as is.
"""
from __future__ import annotations

import bisect
import os
import re

from ..libbpf import introspect as bpf
from ..probes import x86
from ..probes.elf import ElfError, ElfImage
from ..probes.gobin import GoBinaryError, PcLnTab
from ..probes.tls_libraries import library_named
from .procs import Holders, Proc, boot_ns_to_wall
from .report import Finding

#: TLS libraries by file name: (pattern, what to call it)
class _Symbols:
    """Names a file offset: the function that holds it, from the ELF symbols or, for Go
    binaries without them, the Go function table. In a stripped library the function is
    found from the unwind table and named by the exported functions that call or jump to it
    (tlstap's own probes sit in such functions: "called by SSL_read_ex")."""

    def __init__(self, path: str):
        self.error = None
        self.go = False
        self.exports_ssl = False
        self._img = None
        self._starts: list[int] = []
        self._syms: list = []
        self._pcln = None
        self._branches: dict[int, list[int]] | None = None
        try:
            self._img = img = ElfImage.open(path)
        except ElfError as e:
            self.error = str(e)
            return
        funcs = sorted((s.vaddr, s.size, s.name) for s in img.functions.values() if s.vaddr)
        self._starts = [v for v, _s, _n in funcs]
        self._syms = funcs
        self.exports_ssl = "SSL_write" in img.functions or "SSL_read" in img.functions
        self.go = any(img.elf.get_section_by_name(n) is not None for n in (".go.buildinfo", ".gopclntab"))
        if self.go and not funcs:
            try:
                self._pcln = PcLnTab(img)
            except GoBinaryError:
                pass

    def close(self) -> None:
        if self._img is not None:
            self._img.close()

    def vaddr(self, offset: int) -> int | None:
        for va, _memsz, off, filesz, _x in self._img.loads:
            if off <= offset < off + filesz:
                return offset - off + va
        return None

    def _symbol(self, va: int) -> str | None:
        if self._pcln is not None:
            f = self._pcln.at(va)
            if f is not None:
                return f.name if va == f.entry else f"{f.name}+{va - f.entry:#x}"
        i = bisect.bisect_right(self._starts, va) - 1
        # the nearest symbols at or below va (a few: aliases and zero-sized labels share addresses)
        for start, size, name in reversed(self._syms[max(i - 7, 0): i + 1]):
            if va == start:
                return name
            if va < start + size:
                return f"{name}+{va - start:#x}"
        return None

    def _callers(self, target: int) -> list[str]:
        """Named functions with a direct call/jmp rel32 to target. Candidates come from a byte
        scan of the executable segments (E8/E9 + rel32), each confirmed by decoding its
        function from the start, so bytes inside another instruction are never taken."""
        if self._branches is None:
            self._branches = {}
            for va, _memsz, _off, filesz, x in self._img.loads:
                if not x or filesz > _SCAN_LIMIT:
                    continue
                buf = self._img.read_vaddr(va, filesz)
                for m in _BRANCH.finditer(buf):
                    p = m.start()
                    dest = va + p + 5 + int.from_bytes(buf[p + 1:p + 5], "little", signed=True)
                    self._branches.setdefault(dest, []).append(va + p)
        names = []
        code = None
        for site in self._branches.get(target, ()):
            name = self._symbol(site)
            rng = self._img.function_range(site)
            if name is None or rng is None:
                continue
            code = code or x86.Code(self._img)
            if any(i.address == site and x86.direct_target(i) == target for i in code.body(*rng)):
                base = name.split("+")[0]
                if base not in names:
                    names.append(base)
        return names

    def name(self, offset: int) -> tuple[str, list[str]]:
        """(what to call the code at offset, the exported functions that call it when it has no
        symbol of its own)."""
        va = self.vaddr(offset)
        if va is None:
            return f"offset {offset:#x} (not in the file's loaded segments)", []
        sym = self._symbol(va)
        if sym is not None:
            return sym, []
        rng = self._img.function_range(va)
        callers = self._callers(rng[0]) if rng else []
        if not callers:
            return f"offset {offset:#x} (no symbol)", []
        where = "an unexported function" if va == rng[0] else f"in an unexported function at {rng[0]:#x}"
        return f"offset {offset:#x} ({where}, called by {', '.join(callers)})", callers


#: call rel32 / jmp rel32; files whose code is larger are not scanned for callers (node's 27 MB: seconds)
_BRANCH = re.compile(rb"[\xe8\xe9]", re.S)
_SCAN_LIMIT = 16 << 20


class _Files:
    """The ELF files named by probes, each opened once per scan."""

    def __init__(self):
        self._open: dict[tuple, _Symbols] = {}

    def get(self, path: str) -> _Symbols:
        st = os.stat(path)
        key = (st.st_dev, st.st_ino, st.st_mtime)
        if key not in self._open:
            self._open[key] = _Symbols(path)
        return self._open[key]

    def close(self) -> None:
        for s in self._open.values():
            s.close()


def _open_path(path: str, holders: list[Proc]) -> str | None:
    for cand in [path] + [f"/proc/{p.pid}/root{path}" for p in holders if path.startswith("/")]:
        try:
            os.stat(cand)
            return cand
        except OSError:
            continue
    return None


def library_of(path: str, syms: _Symbols | None) -> str | None:
    base = os.path.basename(path)
    lib = library_named(base)
    if lib is not None:
        return lib.name
    if syms is not None:
        if syms.go:
            return "Go binary"
        if syms.exports_ssl:
            return "OpenSSL linked in (exports SSL_read/SSL_write)"
    return None


def _finding(files: _Files, path: str, offset: int, retprobe: bool, prog_id: int, owners: list[Proc],
             extra: dict) -> Finding:
    real = _open_path(path, owners)
    syms = None
    if real is not None:
        try:
            syms = files.get(real)
        except OSError:
            pass
    func, callers = (syms.name(offset) if syms is not None and syms.error is None
                     else (f"offset {offset:#x} (file not readable)", []))
    library = library_of(path, syms)
    info = bpf.prog(prog_id)
    probe = "uretprobe" if retprobe else "uprobe"
    prog_name = info.name.decode(errors="replace") if info else "?"
    what = f"{probe} {path} [{library or 'not a TLS library'}] at {func}, program {prog_id} {prog_name}"
    detail = {"probe": probe, "library": library, "path": path, "function": func, "called_by": callers,
              "offset": offset, "prog_id": prog_id, "prog_name": prog_name, **extra}
    f = Finding("uprobe" if library else "uprobe_other", what, detail, list(owners),
                boot_ns_to_wall(info.load_time) if info else None, "program loaded" if info else "")
    base, plus, site = func.partition("+")
    if plus and not func.startswith("offset "):
        f.merge_key = (probe, path, base, prog_id)
        f.merged = what.replace(f" at {func},", f" at {base}{{sites}},")
        f.site = "+" + site
    return f


def find(links: list[bpf.Link], h: Holders) -> list[Finding]:
    files = _Files()
    try:
        return _find(files, links, h)
    finally:
        files.close()


def _find(files: _Files, links: list[bpf.Link], h: Holders) -> list[Finding]:
    found: dict[tuple, Finding] = {}
    for ln in links:
        if ln.path is None or not ln.probes:
            continue
        owners = h.links.get(ln.id, [])
        for offset, cookie in ln.probes:
            extra = {"link_id": ln.id, "cookie": cookie}
            if ln.type == bpf.LINK_UPROBE_MULTI and ln.uprobe_pid:
                extra["only_pid"] = ln.uprobe_pid
            found[(ln.prog_id, ln.path, offset, ln.retprobe)] = _finding(
                files, ln.path, offset, ln.retprobe, ln.prog_id, owners, extra)
    for proc, fd in h.perf_fds:
        q = bpf.task_fd_query(proc.pid, fd)
        if q is None or q.fd_type not in (bpf.FD_TYPE_UPROBE, bpf.FD_TYPE_URETPROBE):
            continue
        key = (q.prog_id, q.name, q.offset, q.fd_type == bpf.FD_TYPE_URETPROBE)
        f = found.get(key)
        if f is None:
            found[key] = _finding(files, q.name, q.offset, key[3], q.prog_id, [proc], {"perf_event_fd": fd})
        elif proc not in f.owners:
            f.owners.append(proc)
    return list(found.values())
