"""Go executables: the toolchain version (.go.buildinfo) and function extents (.gopclntab).

Written by hand because no Python library reads them: pyelftools sees only ELF symbols, which
`-ldflags=-s -w` removes, while the Go runtime keeps its own function table (pclntab: names,
entry points, in address order) in every binary because tracebacks need it. The layouts
follow the Go sources of the releases named below (runtime/symtab.go: pcHeader, functab,
_func; debug/buildinfo/buildinfo.go: the .go.buildinfo header).

    pcHeader (ptrSize = 8)                   1.16, 1.17            1.18+
      magic u32, pad u8 u8, minLC u8, ptrSize u8, nfunc int, nfiles uint
      textStart uintptr                      absent                present
      funcnameOffset, cuOffset, filetabOffset, pctabOffset, pclnOffset   (uintptr each)
    functab at pclnOffset: nfunc+1 pairs     (entry uintptr, funcoff uintptr)   (entryoff u32, funcoff u32)
    _func at pclnOffset+funcoff starts with  entry uintptr, nameOff i32         entryOff u32, nameOff i32

The (nfunc+1)th functab entry is the end of the text, so function i spans
[entry_i, entry_i+1): its body plus the int3 padding up to the next function.

Two cases the header alone does not settle: recent releases leave textStart 0 in PIE builds,
and external linking (cgo) can merge the table into .data.rel.ro with no section of its own.
Both are resolved through runtime.firstmoduledata, which starts with a pointer to the table.
"""
from __future__ import annotations

import bisect
import re
import struct
from dataclasses import dataclass
from functools import cached_property

from ..errors import TlstapError
from .elf import ElfError, ElfImage, uleb128

# pclntab magics (runtime/symtab.go); 1.2 is used by Go 1.2-1.15
PCLN_MAGIC = {0xFFFFFFFB: "1.2", 0xFFFFFFFA: "1.16", 0xFFFFFFF0: "1.18", 0xFFFFFFF1: "1.20"}
_PCLN_SECTIONS = (".gopclntab", ".data.rel.ro.gopclntab")
_BUILDINFO_MAGIC = b"\xff Go buildinf:"
_GO_VERSION_RX = re.compile(r"go(\d+)\.(\d+)")
_RELA = struct.Struct("<QQq")            # Elf64_Rela: r_offset, r_info, r_addend
_R_X86_64_RELATIVE = 8
_MD_TEXT = 22 * 8                        # moduledata.text (see PcLnTab._moduledata_text)


class GoBinaryError(TlstapError):
    """Not a Go binary we can read (one line, names the file)."""


@dataclass(frozen=True)
class GoFunc:
    name: str
    entry: int       # vaddr
    end: int         # vaddr of the next function (or the end of the text)


def go_version_tuple(version: str) -> tuple[int, int] | None:
    """"go1.19.8" -> (1, 19); "devel go1.23-abc" -> (1, 23); None if unrecognised."""
    m = _GO_VERSION_RX.search(version)
    return (int(m.group(1)), int(m.group(2))) if m else None


# ---- .go.buildinfo ---------------------------------------------------------------------------

def _buildinfo_blob(img: ElfImage) -> tuple[int, bytes] | None:
    """(vaddr, bytes) of the buildinfo header: its section, else the magic in a writable segment
    (16-byte aligned, as the linker places it)."""
    sec = img.elf.get_section_by_name(".go.buildinfo")
    if sec is not None:
        return sec["sh_addr"], sec.data()
    for va, _memsz, _off, filesz, x in img.loads:
        if x:
            continue
        data = img.read_vaddr(va, filesz)
        for m in re.finditer(re.escape(_BUILDINFO_MAGIC), data):
            if m.start() % 16 == 0:
                return va + m.start(), data[m.start():m.start() + 4096]
    return None


def build_version(img: ElfImage) -> str | None:
    """The Go release that built the binary ("go1.19.8"), from .go.buildinfo; None if absent."""
    blob = _buildinfo_blob(img)
    if blob is None:
        return None
    _va, data = blob
    if len(data) < 32 or not data.startswith(_BUILDINFO_MAGIC):
        return None
    ptr_size, flags = data[14], data[15]
    if flags & 2:
        # Go 1.18+: the version and module strings follow inline, varint-length prefixed
        try:
            n, pos = uleb128(data, 32)
        except ValueError:
            raise GoBinaryError("truncated varint in .go.buildinfo") from None
        return data[pos:pos + n].decode("utf-8", "replace")
    # before 1.18: two pointers to Go string headers (ptr, len) in the data
    if ptr_size != 8:
        return None
    (str_hdr,) = struct.unpack_from("<Q", data, 16)
    try:
        ptr, length = struct.unpack("<QQ", img.read_vaddr(str_hdr, 16))
        return img.read_vaddr(ptr, min(length, 64)).decode("utf-8", "replace")
    except (ElfError, struct.error):
        return None


# ---- .gopclntab ------------------------------------------------------------------------------

class PcLnTab:
    """The function table of a Go binary; .funcs in address order, .lookup(name)."""

    def __init__(self, img: ElfImage):
        self.path = img.path
        self._img = img
        sec = next((img.elf.get_section_by_name(n) for n in _PCLN_SECTIONS
                    if img.elf.get_section_by_name(n) is not None), None)
        if sec is not None:
            self.vaddr, self.data = sec["sh_addr"], sec.data()
        else:
            # external linking (cgo) merges the table into .data.rel.ro, at least in 1.19
            found = self._search()
            if found is None:
                raise GoBinaryError(f"{img.path} has no .gopclntab: not a Go binary, or stripped of "
                                    f"its function table")
            self.vaddr, self.data = found
        if len(self.data) < 8:
            raise GoBinaryError(f"{img.path}: .gopclntab is truncated")
        (magic,) = struct.unpack_from("<I", self.data, 0)
        self.format = PCLN_MAGIC.get(magic)
        if self.format is None:
            raise GoBinaryError(f"{img.path}: unknown .gopclntab magic {magic:#x}")
        self.quantum, self.ptr_size = self.data[6], self.data[7]
        if self.ptr_size != 8:
            raise GoBinaryError(f"{img.path}: .gopclntab pointer size {self.ptr_size}: not a 64-bit Go binary")

    @cached_property
    def funcs(self) -> list[GoFunc]:
        try:
            return self._parse()
        except (struct.error, ValueError, IndexError) as e:   # offsets pointing outside the table
            raise GoBinaryError(f"{self.path}: malformed .gopclntab ({e})") from None

    def _parse(self) -> list[GoFunc]:
        d = self.data
        if self.format == "1.2":
            raise GoBinaryError(f"{self.path}: .gopclntab of Go 1.2-1.15 is not read")
        nfunc = struct.unpack_from("<Q", d, 8)[0]
        if self.format == "1.16":
            funcname, _cu, _file, _pc, pcln = struct.unpack_from("<5Q", d, 24)
            tab = struct.unpack_from(f"<{2 * (nfunc + 1)}Q", d, pcln)
            entries = tab[0::2]
            funcoffs = tab[1::2]

            def name_off(fo: int) -> int:
                return struct.unpack_from("<i", d, pcln + fo + 8)[0]
        else:
            text_start, funcname, _cu, _file, _pc, pcln = struct.unpack_from("<6Q", d, 24)
            # recent releases leave textStart 0 in PIE builds (the runtime takes
            # moduledata.text): read that then. Not the .text section address: with external
            # linking (cgo) C code comes first in .text
            text_start = text_start or self._moduledata_text(funcname)
            tab = struct.unpack_from(f"<{2 * (nfunc + 1)}I", d, pcln)
            entries = [text_start + e for e in tab[0::2]]
            funcoffs = tab[1::2]

            def name_off(fo: int) -> int:
                return struct.unpack_from("<i", d, pcln + fo + 4)[0]
        out = []
        for i in range(nfunc):
            start = funcname + name_off(funcoffs[i])
            name = d[start:d.index(b"\0", start)].decode("utf-8", "replace")
            out.append(GoFunc(name, entries[i], entries[i + 1]))
        return out

    def _search(self) -> tuple[int, bytes] | None:
        """(vaddr, bytes to the end of its segment) of a pclntab header found by its magic in a
        data segment, confirmed by the moduledata that points to it."""
        heads = [struct.pack("<I", m) + b"\0\0" for m in PCLN_MAGIC if PCLN_MAGIC[m] != "1.2"]
        for va, _memsz, _off, filesz, x in self._img.loads:
            if x:
                continue
            data = self._img.read_vaddr(va, filesz)
            for head in heads:
                at = data.find(head)
                while at >= 0:
                    if at % 8 == 0 and data[at + 7:at + 8] == b"\x08":
                        funcname = struct.unpack_from("<Q", data, at + (24 if head[0] == 0xFA else 32))[0]
                        self.vaddr = va + at
                        if self._moduledata(funcname) is not None:
                            return va + at, data[at:]
                    at = data.find(head, at + 1)
        return None

    @cached_property
    def _words(self) -> dict[int, int]:
        """Pointer-sized words the dynamic loader fills in (PIE: R_X86_64_RELATIVE addends)."""
        words: dict[int, int] = {}
        for sec in self._img.elf.iter_sections():
            if sec["sh_type"] == "SHT_RELA":
                for off, info, addend in _RELA.iter_unpack(sec.data()):
                    if info & 0xFFFFFFFF == _R_X86_64_RELATIVE:
                        words[off] = addend
        return words

    def _moduledata(self, funcname_off: int) -> int | None:
        """runtime.firstmoduledata's text field: moduledata starts with pcHeader (this table's
        address) then funcnametab's data pointer; text is its word 22 in every release with the
        register ABI (runtime/symtab.go). PIE: the words are relocations (the addend is the
        value); otherwise plain words in the data segments. None if not found."""
        want = (self.vaddr, self.vaddr + funcname_off)
        words = self._words
        for off, value in words.items():
            if value == want[0] and words.get(off + 8) == want[1] and words.get(off + _MD_TEXT):
                return words[off + _MD_TEXT]
        needle = struct.pack("<QQ", *want)
        for va, _memsz, _foff, filesz, x in self._img.loads:
            if x:
                continue
            data = self._img.read_vaddr(va, filesz)
            at = data.find(needle)
            while at >= 0:
                if at % 8 == 0 and at + _MD_TEXT + 8 <= len(data):
                    return struct.unpack_from("<Q", data, at + _MD_TEXT)[0]
                at = data.find(needle, at + 1)
        return None

    def _moduledata_text(self, funcname_off: int) -> int:
        text = self._moduledata(funcname_off)
        if not text:
            raise GoBinaryError(f"{self.path}: cannot find where the Go text starts (runtime.firstmoduledata)")
        return text

    @cached_property
    def _by_name(self) -> dict[str, GoFunc]:
        by: dict[str, GoFunc] = {}
        for f in self.funcs:
            by.setdefault(f.name, f)
        return by

    def lookup(self, name: str) -> GoFunc | None:
        return self._by_name.get(name)

    def at(self, vaddr: int) -> GoFunc | None:
        """The function whose extent holds vaddr."""
        i = bisect.bisect_right([f.entry for f in self.funcs], vaddr) - 1
        return self.funcs[i] if i >= 0 and vaddr < self.funcs[i].end else None


__all__ = ["GoBinaryError", "GoFunc", "PcLnTab", "build_version", "go_version_tuple", "PCLN_MAGIC"]
