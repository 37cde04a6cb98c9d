"""A small read-only view of an x86-64 ELF file: symbols, segments, PLT, .rodata.

pyelftools parses headers, sections and relocations. Symbol tables are decoded
with struct instead: iterating node's ~180k symbols through pyelftools takes
~4.5 s, a struct pass takes well under a second.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from functools import cached_property

from elftools.common.exceptions import ELFError as _PyElfError
from elftools.elf.elffile import ELFFile

from ..errors import TlstapError

_SYM = struct.Struct("<IBBHQQ")          # Elf64_Sym: name, info, other, shndx, value, size
_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_SHN_UNDEF = 0
_PF_X = 1
_PLT_SECTIONS = (".plt", ".plt.sec", ".plt.got")


class ElfError(TlstapError):
    """Not an ELF file we can read (one line, names the file)."""


@dataclass(frozen=True)
class Symbol:
    name: str
    vaddr: int
    size: int


class ElfImage:
    """Use ElfImage.open(path); close() (or `with`) releases the file."""

    def __init__(self, path: str, fh, elf: ELFFile):
        self.path = path
        self._fh = fh
        self.elf = elf
        # (vaddr, memsz, offset, filesz, executable) of each PT_LOAD
        self.loads = [(s["p_vaddr"], s["p_memsz"], s["p_offset"], s["p_filesz"], bool(s["p_flags"] & _PF_X))
                      for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]

    @classmethod
    def open(cls, path: str) -> "ElfImage":
        try:
            fh = open(path, "rb")
        except OSError as e:
            raise ElfError(f"cannot read {path}: {e.strerror}") from None
        try:
            elf = ELFFile(fh)
            if elf.elfclass != 64 or not elf.little_endian:
                raise ElfError(f"{path} is not a 64-bit little-endian ELF file")
            return cls(path, fh, elf)
        except (_PyElfError, struct.error) as e:
            fh.close()
            raise ElfError(f"{path} is not an ELF file ({e})") from None
        except BaseException:
            fh.close()
            raise

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "ElfImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def machine(self) -> str:
        return self.elf["e_machine"]           # e.g. "EM_X86_64"

    # ---- symbols -------------------------------------------------------------------------

    def _raw_symbols(self, secname: str):
        """(name, value, size, type, versym_index) of the defined symbols of one table, fast."""
        sec = self.elf.get_section_by_name(secname)
        if sec is None or sec["sh_type"] not in ("SHT_SYMTAB", "SHT_DYNSYM") or sec["sh_entsize"] != _SYM.size:
            return []
        strtab = self.elf.get_section(sec["sh_link"]).data()
        out = []
        for i, (st_name, info, _other, shndx, value, size) in enumerate(_SYM.iter_unpack(sec.data())):
            if shndx == _SHN_UNDEF or (info & 0xF) not in (_STT_FUNC, _STT_GNU_IFUNC):
                continue
            end = strtab.find(b"\0", st_name)
            out.append((strtab[st_name:end].decode("utf-8", "replace"), value, size, i))
        return out

    @cached_property
    def _hidden_versions(self) -> set[int]:
        """.dynsym indexes whose symbol version is hidden (foo@OLD, not the default foo@@NEW)."""
        sec = self.elf.get_section_by_name(".gnu.version")
        if sec is None:
            return set()
        data = sec.data()
        return {i for i, (v,) in enumerate(struct.iter_unpack("<H", data[: len(data) & ~1])) if v & 0x8000}

    @cached_property
    def functions(self) -> dict[str, Symbol]:
        """Defined function symbols by name. .dynsym first (what callers bind to), .symtab adds
        internal names. Among duplicates: default version over hidden, nonzero size over zero."""
        funcs: dict[str, tuple[tuple, Symbol]] = {}
        hidden = self._hidden_versions
        for table in (".dynsym", ".symtab"):
            for name, value, size, idx in self._raw_symbols(table):
                # rank: earlier table wins ties; lower tuple = better
                rank = (size == 0, table == ".dynsym" and idx in hidden, table == ".symtab")
                old = funcs.get(name)
                if old is None or rank < old[0]:
                    funcs[name] = (rank, Symbol(name, value, size))
        return {n: s for n, (_r, s) in funcs.items()}

    def function(self, name: str) -> Symbol | None:
        return self.functions.get(name)

    @cached_property
    def _names_by_vaddr(self) -> dict[int, str]:
        by = {}
        for s in self.functions.values():
            by.setdefault(s.vaddr, s.name)
        return by

    def name_at(self, vaddr: int) -> str | None:
        """A function symbol starting exactly at vaddr, if any (for naming call targets)."""
        return self._names_by_vaddr.get(vaddr)

    def exports(self, name: str) -> bool:
        """Does .dynsym define function `name`? Uses the hash table when present: O(1) even for
        huge binaries, which matters when scanning every file a process maps."""
        for hname in (".gnu.hash", ".hash"):
            h = self.elf.get_section_by_name(hname)
            if h is not None and hasattr(h, "get_symbol"):
                sym = h.get_symbol(name)
                return (sym is not None and sym["st_shndx"] != "SHN_UNDEF"
                        and sym["st_info"]["type"] in ("STT_FUNC", "STT_LOOS"))   # STT_LOOS == GNU_IFUNC
        return any(n == name for n, *_ in self._raw_symbols(".dynsym"))

    # ---- addresses -----------------------------------------------------------------------

    def vaddr_to_offset(self, vaddr: int) -> int:
        """File offset of a virtual address: what a uprobe attaches to."""
        for va, _memsz, off, filesz, _x in self.loads:
            if va <= vaddr < va + filesz:
                return vaddr - va + off
        raise ElfError(f"{self.path}: address {vaddr:#x} is not backed by the file")

    def read_vaddr(self, vaddr: int, n: int) -> bytes:
        """Up to n bytes at vaddr (shorter if the segment's file part ends earlier)."""
        for va, _memsz, off, filesz, _x in self.loads:
            if va <= vaddr < va + filesz:
                self._fh.seek(vaddr - va + off)
                return self._fh.read(min(n, va + filesz - vaddr))
        raise ElfError(f"{self.path}: address {vaddr:#x} is not backed by the file")

    def is_executable_vaddr(self, vaddr: int) -> bool:
        return any(x and va <= vaddr < va + memsz for va, memsz, _o, _f, x in self.loads)

    @cached_property
    def plt_ranges(self) -> list[tuple[int, int]]:
        """[start, end) of .plt, .plt.sec and .plt.got: calls there leave this file (or come back
        through the dynamic linker), so they are never internal functions."""
        out = []
        for name in _PLT_SECTIONS:
            s = self.elf.get_section_by_name(name)
            if s is not None and s["sh_size"]:
                out.append((s["sh_addr"], s["sh_addr"] + s["sh_size"]))
        return out

    def in_plt(self, vaddr: int) -> bool:
        return any(a <= vaddr < b for a, b in self.plt_ranges)

    @cached_property
    def _got_names(self) -> dict[int, str]:
        """GOT slot address -> symbol name, from JUMP_SLOT / GLOB_DAT relocations."""
        out = {}
        for sec in self.elf.iter_sections():
            if sec["sh_type"] not in ("SHT_RELA", "SHT_REL") or not sec["sh_flags"] & 2:   # SHF_ALLOC
                continue
            try:
                symtab = self.elf.get_section(sec["sh_link"])
            except Exception:                 # sh_link 0 / bogus: relocations without symbols
                continue
            if symtab is None or not hasattr(symtab, "get_symbol"):
                continue
            for rel in sec.iter_relocations():
                if rel["r_info_sym"]:
                    out[rel["r_offset"]] = symtab.get_symbol(rel["r_info_sym"]).name
        return out

    def got_symbol(self, slot_vaddr: int) -> str | None:
        """The imported/interposable symbol whose address a GOT slot holds (PLT stubs jump
        through these), e.g. to see that a PLT call goes to SSL_write_ex2."""
        return self._got_names.get(slot_vaddr)

    # ---- metadata ------------------------------------------------------------------------

    @cached_property
    def needed(self) -> list[str]:
        dyn = self.elf.get_section_by_name(".dynamic")
        if dyn is None or not hasattr(dyn, "iter_tags"):
            return []
        return [t.needed for t in dyn.iter_tags() if t.entry.d_tag == "DT_NEEDED"]

    @cached_property
    def build_id(self) -> str | None:
        for sec in self.elf.iter_sections():
            if sec["sh_type"] == "SHT_NOTE":
                for note in sec.iter_notes():
                    if note["n_type"] == "NT_GNU_BUILD_ID":
                        return note["n_desc"]
        return None

    def search_rodata(self, pattern: bytes | re.Pattern, chunk: int = 4 << 20,
                      overlap: int = 4096) -> re.Match | None:
        """First match of `pattern` in .rodata, read in chunks (node's .rodata is ~50 MB).
        Matches longer than `overlap` bytes may be missed at chunk borders."""
        rx = re.compile(pattern) if isinstance(pattern, bytes) else pattern
        sec = self.elf.get_section_by_name(".rodata")
        if sec is None or sec["sh_type"] == "SHT_NOBITS":
            return None
        start, size = sec["sh_offset"], sec["sh_size"]
        pos = 0
        while pos < size:
            self._fh.seek(start + pos)
            buf = self._fh.read(min(chunk + overlap, size - pos))
            m = rx.search(buf)
            if m:
                return m
            if pos + len(buf) >= size:
                break
            pos += chunk
        return None


def is_elf(path: str) -> bool:
    """Cheap magic check, without parsing (used when scanning every file a process maps)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


__all__ = ["ElfError", "ElfImage", "Symbol", "is_elf"]
