"""Where is OpenSSL: the system libssl, the files a process maps, or explicit paths."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from ..errors import TlstapError, UsageError
from .elf import ElfError, ElfImage, is_elf

_LIBSSL_NAME = re.compile(r"libssl\.so(\.|$)")     # libssl.so, libssl.so.3; not NSS's libssl3.so
_PREFERRED = ("libssl.so.3", "libssl.so.1.1")
_MARKERS = ("SSL_write", "SSL_write_ex")


class LibraryNotFound(TlstapError):
    """No library (OpenSSL, GnuTLS, NSPR) where we looked."""


class ProcessNotFound(TlstapError):
    """The pid does not name a live process."""


@dataclass(frozen=True)
class MappedLib:
    path: str        # as the process sees it (inside its mount namespace)
    host_path: str   # openable from here: /proc/PID/root/<path> (containers, chroots)
    dev: int         # st_dev of the mapped file, as os.makedev(major, minor)
    ino: int


# ---- system ------------------------------------------------------------------------------

def _ldconfig() -> str | None:
    # ldconfig lives in /sbin, which a non-root PATH often lacks
    return shutil.which("ldconfig") or shutil.which("ldconfig", path="/sbin:/usr/sbin")


def ld_cache() -> dict[str, str]:
    """The dynamic linker's cache (`ldconfig -p`): x86-64 library name -> path, first entry
    kept (the one ld.so would load); {} when ldconfig is missing or fails."""
    exe = _ldconfig()
    if not exe:
        return {}
    try:
        out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    found: dict[str, str] = {}
    # "\tlibssl.so.3 (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl.so.3"
    for m in re.finditer(r"^\s*(\S+) \(([^)]*)\) => (\S+)$", out, re.M):
        name, flags, path = m.groups()
        if "x86-64" in (f.strip() for f in flags.split(",")):
            found.setdefault(name, path)
    return found


def pick_from_cache(cache: dict[str, str], name_rx: re.Pattern, preferred: tuple[str, ...]) -> str | None:
    """The path of the first `preferred` name in the cache, else of the highest name matching
    name_rx, else None."""
    found = {n: p for n, p in cache.items() if name_rx.match(n)}
    for name in preferred:
        if name in found:
            return found[name]
    return found[max(found)] if found else None


def system_library(name_rx: re.Pattern, preferred: tuple[str, ...], what: str, flag: str) -> str:
    """The x86-64 library the dynamic linker would load, from its cache (`ldconfig -p`): the
    first `preferred` name, else the highest matching name_rx; LibraryNotFound names `what`
    and the `flag` that points tlstap at one."""
    path = pick_from_cache(ld_cache(), name_rx, preferred)
    if path:
        return path
    exe = _ldconfig()
    where = f"the dynamic linker cache ({exe} -p)" if exe else "the dynamic linker cache (no ldconfig found)"
    raise LibraryNotFound(f"no x86-64 {what} in {where}; point tlstap at one with {flag} PATH")


def system_libssl() -> str:
    """libssl.so.3, else libssl.so.1.1, else any libssl.so*."""
    return system_library(_LIBSSL_NAME, _PREFERRED, "libssl.so*", "--libssl")


# ---- per process -------------------------------------------------------------------------

def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def _read_maps(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise ProcessNotFound(f"process {pid}: no such process") from None
    except PermissionError:
        raise ProcessNotFound(f"cannot read /proc/{pid}/maps: permission denied (run as root)") from None
    except ProcessLookupError:                      # exited between open and read
        raise ProcessNotFound(f"process {pid} exited") from None
    if not lines:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            raise ProcessNotFound(f"process {pid} exited") from None
        if state in ("Z", "X"):
            raise ProcessNotFound(f"process {pid} ({_comm(pid)}) has exited (zombie)")
    return lines


def _exports_openssl(host_path: str, is_exe: bool) -> bool:
    # regular files only: reading an executable mapping of a device could block
    if not os.path.isfile(host_path) or not is_elf(host_path):
        return False
    try:
        with ElfImage.open(host_path) as img:
            if any(img.exports(s) for s in _MARKERS):
                return True
            # .symtab is a full scan: only worth it for the main executable (static builds
            # that do not export their OpenSSL symbols but kept a symbol table)
            return is_exe and any(img.function(s) for s in _MARKERS)
    except ElfError:
        return False


def file_mappings(pid: int, lines: list[str]):
    """(MappedLib, perms) for each file-backed mapping in `lines` (from _read_maps(pid)), in
    maps order, one per mapping: a file mapped r--p and r-xp comes twice."""
    for line in lines:
        # start-end perms offset major:minor inode path  (path may contain spaces)
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        rng, perms, _off, devstr, inode, path = parts
        ino = int(inode)
        if ino == 0:
            continue
        major, minor = (int(x, 16) for x in devstr.split(":"))
        if path.endswith(" (deleted)"):
            # replaced on disk (package upgrade): the old inode is only reachable via map_files
            path = path[: -len(" (deleted)")]
            host = f"/proc/{pid}/map_files/{rng}"
        else:
            host = f"/proc/{pid}/root{path}"
        yield MappedLib(path, host, os.makedev(major, minor), ino), perms


def elf_exports_all(host_path: str, symbols) -> bool:
    """Is host_path a regular ELF file exporting every one of `symbols`? (Regular files only:
    reading an executable mapping of a device could block.)"""
    if not os.path.isfile(host_path) or not is_elf(host_path):
        return False
    try:
        with ElfImage.open(host_path) as img:
            return all(img.exports(s) for s in symbols)
    except ElfError:
        return False


def mapped_exporting(pid: int, symbols, library: str | None = None, flag: str = "") -> list[str]:
    """Openable paths (/proc/PID/root/..., or map_files for deleted files) of the distinct
    files process `pid` maps executable that export all of `symbols`, in maps order: a
    library's shared object, or a static build defining its API. With `library` (its name
    for people), finding none is a LibraryNotFound that names `flag`."""
    seen: set[tuple[int, int]] = set()
    out: list[str] = []
    for m, perms in file_mappings(pid, _read_maps(pid)):
        if "x" not in perms or (m.dev, m.ino) in seen:
            continue
        seen.add((m.dev, m.ino))
        if elf_exports_all(m.host_path, symbols):
            out.append(m.host_path)
    if not out and library:
        raise LibraryNotFound(f"process {pid} ({_comm(pid)}) maps no {library}: no mapped file exports "
                              f"{' and '.join(symbols)}; try {flag} PATH")
    return out


def libs_for_pid(pid: int) -> list[MappedLib]:
    """Each distinct file process `pid` maps that is OpenSSL: a libssl.so*, or any ELF (main
    executable, static node/nginx, ...) defining SSL_write or SSL_write_ex. In maps order."""
    lines = _read_maps(pid)
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None
    seen: set[tuple[int, int]] = set()
    out: list[MappedLib] = []
    for m, perms in file_mappings(pid, lines):
        key = (m.dev, m.ino)
        if key in seen:
            continue
        if _LIBSSL_NAME.match(os.path.basename(m.path)):
            hit = True
        elif "x" not in perms:
            # code lives in an executable mapping; the file will come round again with r-xp
            continue
        else:
            hit = _exports_openssl(m.host_path, m.path == exe)
        seen.add(key)
        if hit:
            out.append(m)
    if not out:
        raise LibraryNotFound(f"process {pid} ({_comm(pid)}) maps no OpenSSL library: no libssl.so* and no "
                              f"mapped ELF defines {' or '.join(_MARKERS)}; try --libssl PATH")
    return out


# ---- explicit paths ----------------------------------------------------------------------

def dedupe_by_inode(paths) -> list[str]:
    """Paths naming distinct files (by st_dev, st_ino), first spelling kept, order kept:
    /lib/x/libssl.so.3, /usr/lib/x/libssl.so.3 and /proc/N/root/... are often one file, and a
    uprobe is per inode, so probing it twice would report every call twice."""
    seen: set[tuple[int, int]] = set()
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise LibraryNotFound(f"cannot use {p}: {e.strerror}") from None
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            out.append(p)
    return out


def check_file(flag: str, path: str) -> None:
    """A file named on the command line: there and readable, or a one-line reason why not
    (a /proc/PID/root path of another user's process answers EACCES without CAP_SYS_PTRACE:
    that is not "no such file")."""
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except PermissionError:
        why = " (another process's /proc/PID/root needs CAP_SYS_PTRACE)" if path.startswith("/proc/") else ""
        raise UsageError(f"{flag} {path}: permission denied{why}") from None
    except IsADirectoryError:
        raise UsageError(f"{flag} {path}: a directory, not a file") from None
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror}") from None


def target_paths(explicit: list[str], pid: int | None, flag: str = "--libssl",
                 mapped=None, system=None) -> list[str]:
    """The files a capture probes, each file once: the `flag` paths if given, else what process
    `pid` maps (mapped(pid) -> paths), else the system's library (system() -> path). mapped
    and system default to OpenSSL's: libs_for_pid and system_libssl."""
    if explicit:
        for p in explicit:
            check_file(flag, p)
        paths = list(explicit)
    elif pid:
        paths = mapped(pid) if mapped else [m.host_path for m in libs_for_pid(pid)]
    else:
        paths = [(system or system_libssl)()]
    return dedupe_by_inode(paths)
