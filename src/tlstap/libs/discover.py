"""Where is OpenSSL: the system libssl, the files a process maps, or explicit paths."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from ..errors import TlstapError
from .elf import ElfError, ElfImage, is_elf

_LIBSSL_NAME = re.compile(r"libssl\.so(\.|$)")     # libssl.so, libssl.so.3; not NSS's libssl3.so
_PREFERRED = ("libssl.so.3", "libssl.so.1.1")
_MARKERS = ("SSL_write", "SSL_write_ex")


class LibraryNotFound(TlstapError):
    """No OpenSSL library where we looked."""


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


def system_libssl() -> str:
    """The x86-64 libssl the dynamic linker would load, from its cache (`ldconfig -p`):
    libssl.so.3, else libssl.so.1.1, else any libssl.so*."""
    exe = _ldconfig()
    found: dict[str, str] = {}
    if exe:
        try:
            out = subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        # "\tlibssl.so.3 (libc6,x86-64) => /lib/x86_64-linux-gnu/libssl.so.3"
        for m in re.finditer(r"^\s*(\S+) \(([^)]*)\) => (\S+)$", out, re.M):
            name, flags, path = m.groups()
            if _LIBSSL_NAME.match(name) and "x86-64" in (f.strip() for f in flags.split(",")):
                found.setdefault(name, path)
    for name in _PREFERRED:
        if name in found:
            return found[name]
    if found:
        return found[sorted(found)[-1]]
    where = f"the dynamic linker cache ({exe} -p)" if exe else "the dynamic linker cache (no ldconfig found)"
    raise LibraryNotFound(f"no x86-64 libssl.so* in {where}; point tlstap at one with --libssl PATH")


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
    for line in lines:
        # start-end perms offset major:minor inode path  (path may contain spaces)
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        rng, perms, _off, devstr, inode, path = parts
        ino = int(inode)
        major, minor = (int(x, 16) for x in devstr.split(":"))
        key = (os.makedev(major, minor), ino)
        if ino == 0 or key in seen:
            continue
        deleted = path.endswith(" (deleted)")
        if deleted:
            # replaced on disk (package upgrade): the old inode is only reachable via map_files
            path = path[: -len(" (deleted)")]
            host = f"/proc/{pid}/map_files/{rng}"
        else:
            host = f"/proc/{pid}/root{path}"
        if _LIBSSL_NAME.match(os.path.basename(path)):
            hit = True
        elif "x" not in perms:
            # code lives in an executable mapping; the file will come round again with r-xp
            continue
        else:
            hit = _exports_openssl(host, path == exe)
        seen.add(key)
        if hit:
            out.append(MappedLib(path, host, key[0], key[1]))
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


def target_paths(libssl: list[str], pid: int | None) -> list[str]:
    """The OpenSSL files a capture probes, each file once: the --libssl paths if given, else
    what process `pid` maps, else the system libssl."""
    if libssl:
        for p in libssl:
            if not os.path.exists(p):
                raise LibraryNotFound(f"--libssl {p}: no such file")
        paths = list(libssl)
    elif pid:
        paths = [m.host_path for m in libs_for_pid(pid)]
    else:
        paths = [system_libssl()]
    return dedupe_by_inode(paths)
