"""A small read-only view of an x86-64 ELF file: symbols, segments, PLT, .rodata.

pyelftools parses headers, sections and relocations. Symbol tables are decoded
with struct instead: iterating node's ~180k symbols through pyelftools takes
~4.5 s, a struct pass takes well under a second.
"""
from __future__ import annotations

import bisect
import os
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

# DWARF pointer encodings (DW_EH_PE_*) used by .eh_frame and .eh_frame_hdr
_DW_EH_PE_absptr, _DW_EH_PE_pcrel, _DW_EH_PE_datarel = 0x00, 0x10, 0x30
_DW_EH_PE_sdata4 = 0x0B
# x86-64 CIE initial instructions at a call: DW_CFA_def_cfa rsp+8; DW_CFA_offset rip, cfa-8
_CFA_AT_CALL = bytes([0x0C, 7, 8, 0x80 | 16, 1])
_EH_FORMATS = {0x00: "<Q", 0x02: "<H", 0x03: "<I", 0x04: "<Q", 0x0A: "<h", 0x0B: "<i", 0x0C: "<q"}


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

    # ---- unwind table: function bounds without symbols -----------------------------------

    def function_range(self, vaddr: int) -> tuple[int, int] | None:
        """[start, end) of the function whose code contains vaddr, from the .eh_frame_hdr
        search table and the FDE it points to: how a stripped file still tells where its
        functions begin. None when no FDE covers vaddr, or when the covering FDE is a
        fragment rather than a function: GCC gives foo.cold parts FDEs of their own, whose
        rules at the first address already describe foo's frame. (The cold part of a
        function without a frame cannot be told apart; callers confirm what they find.)

        Hand-written because pyelftools does not expose the .eh_frame_hdr table, and
        parsing every FDE through it takes seconds on node."""
        table = self._eh_table
        if table is None:
            return None
        starts, fdes = table
        i = bisect.bisect_right(starts, vaddr) - 1
        if i < 0:
            return None
        fde = self._fde(fdes[i])
        if fde is None:
            return None
        begin, size, entry_state = fde
        if begin != starts[i] or not begin <= vaddr < begin + size or not entry_state:
            return None
        return begin, begin + size

    @cached_property
    def _eh_table(self) -> tuple[list[int], list[int]] | None:
        """(initial locations, FDE addresses), sorted, from .eh_frame_hdr (LSB 'Exception Frame
        Header'). Only the table encoding datarel|sdata4 is read: the one GNU ld, gold and lld
        write, and the only one libgcc's unwinder binary-searches."""
        sec = self.elf.get_section_by_name(".eh_frame_hdr")
        if sec is None or sec["sh_type"] == "SHT_NOBITS":
            return None
        data, base = sec.data(), sec["sh_addr"]
        if len(data) < 4 or data[0] != 1:
            return None
        ptr_enc, count_enc, table_enc = data[1:4]
        try:
            _, pos = _eh_decode(data, 4, ptr_enc, base, base)       # eh_frame_ptr: not needed
            count, pos = _eh_decode(data, pos, count_enc, base, base)
        except ValueError:
            return None
        if table_enc != _DW_EH_PE_datarel | _DW_EH_PE_sdata4 or len(data) < pos + 8 * count:
            return None
        pairs = struct.unpack_from(f"<{2 * count}i", data, pos)
        return [base + v for v in pairs[0::2]], [base + v for v in pairs[1::2]]

    def _fde(self, addr: int) -> tuple[int, int, bool] | None:
        """(pc_begin, pc_range, starts in the call-entry state) of the FDE at addr."""
        try:
            head = self.read_vaddr(addr, 64)
            length, cie_ptr = struct.unpack_from("<Ii", head)
            if length in (0, 0xFFFFFFFF) or cie_ptr == 0:   # terminator, 64-bit DWARF, or a CIE
                return None
            cie = self._cie(addr + 4 - cie_ptr)
            if cie is None:
                return None
            enc, has_aug_data, cie_entry = cie
            begin, pos = _eh_decode(head, 8, enc, addr, None)
            size, pos = _eh_decode(head, pos, enc & 0x0F, addr, None)   # pc_range: the format only
            if has_aug_data:
                aug_len, pos = uleb128(head, pos)
                pos += aug_len
        except (ElfError, ValueError, struct.error, IndexError):
            return None
        # The first call frame instruction, if any, must move the location (advance_loc*) or
        # be a nop; anything else changes the rules at pc_begin itself, i.e. a fragment.
        op = head[pos] if pos < 4 + length and pos < len(head) else 0
        entry_state = cie_entry and (op == 0 or op >> 6 == 1 or op in (0x02, 0x03, 0x04))
        return begin, size, entry_state

    def _cie(self, addr: int) -> tuple[int, bool, bool] | None:
        """(FDE pointer encoding, augmentation data present, starts in the call-entry state)
        of the CIE at addr."""
        if addr not in self._cies:
            self._cies[addr] = self._parse_cie(addr)
        return self._cies[addr]

    @cached_property
    def _cies(self) -> dict[int, tuple[int, bool, bool] | None]:
        return {}                       # a file has a handful of CIEs shared by all its FDEs

    def _parse_cie(self, addr: int) -> tuple[int, bool, bool] | None:
        length, cie_id, version = struct.unpack("<IIB", self.read_vaddr(addr, 9))
        if length in (0, 0xFFFFFFFF) or cie_id != 0 or version not in (1, 3) or length > 4096:
            return None
        head = self.read_vaddr(addr, 4 + length)
        end = head.index(b"\0", 9)
        aug, pos = head[9:end].decode("ascii", "replace"), end + 1
        if aug and not aug.startswith("z"):
            return None                                  # e.g. "eh": a pre-z format we skip
        _, pos = uleb128(head, pos)                        # code alignment
        _, pos = uleb128(head, pos)                        # data alignment (sleb; only skipped)
        pos = pos + 1 if version == 1 else uleb128(head, pos)[1]   # return address register
        enc = _DW_EH_PE_absptr
        if aug:
            aug_len, pos = uleb128(head, pos)
            data, pos = head[pos:pos + aug_len], pos + aug_len
            i = 0
            for c in aug[1:]:
                if c == "R":
                    enc = data[i]
                    i += 1
                elif c == "P":
                    i += 1 + _eh_size(data[i])
                elif c == "L":
                    i += 1
                elif c not in "SBG":
                    return None
        # GCC gives its .cold fragments a CIE of their own that already describes a frame;
        # a function's CIE describes only the return address at the top of the stack.
        entry = head[pos:].rstrip(b"\0") == _CFA_AT_CALL
        return enc, bool(aug), entry

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

    def find_all_rodata(self, needles, chunk: int = 16 << 20) -> dict[bytes, list[int]]:
        """Virtual address of every occurrence of each needle in .rodata, overlapping ones
        included: the linker may merge "EXPORTER_SECRET" into the tail of
        "EARLY_EXPORTER_SECRET", so one string can live inside another."""
        out: dict[bytes, list[int]] = {n: [] for n in needles}
        sec = self.elf.get_section_by_name(".rodata")
        if sec is None or sec["sh_type"] == "SHT_NOBITS" or not out:
            return out
        start, size, addr = sec["sh_offset"], sec["sh_size"], sec["sh_addr"]
        overlap = max(map(len, out)) - 1
        for pos in range(0, size, chunk):
            self._fh.seek(start + pos)
            buf = self._fh.read(min(chunk + overlap, size - pos))
            for needle, found in out.items():
                i = buf.find(needle)
                while 0 <= i < chunk:          # matches starting in the overlap belong to the next chunk
                    found.append(addr + pos + i)
                    i = buf.find(needle, i + 1)
        return out


def _eh_size(enc: int) -> int:
    fmt = _EH_FORMATS.get(enc & 0x0F)
    if fmt is None:
        raise ValueError(f"unsupported pointer encoding {enc:#x}")
    return struct.calcsize(fmt)


def _eh_decode(data: bytes, pos: int, enc: int, data_vaddr: int, datarel_base: int | None) -> tuple[int, int]:
    """(value, next pos) of a DW_EH_PE-encoded pointer at data[pos]; data starts at data_vaddr.
    ValueError for what we do not read: omitted (0xff), indirect, uleb/sleb, text/func-relative."""
    fmt = _EH_FORMATS.get(enc & 0x0F)
    app = enc & 0xF0
    if enc == 0xFF or fmt is None or app not in (_DW_EH_PE_absptr, _DW_EH_PE_pcrel, _DW_EH_PE_datarel):
        raise ValueError(f"unsupported pointer encoding {enc:#x}")
    (v,) = struct.unpack_from(fmt, data, pos)
    if app == _DW_EH_PE_pcrel:
        v += data_vaddr + pos
    elif app == _DW_EH_PE_datarel:
        if datarel_base is None:
            raise ValueError("data-relative pointer outside .eh_frame_hdr")
        v += datarel_base
    return v, pos + struct.calcsize(fmt)


def uleb128(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the unsigned LEB128 at data[pos] (DWARF's encoding, and Go's
    uvarint); ValueError if data ends inside it."""
    v = shift = 0
    while pos < len(data):
        b = data[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return v, pos
    raise ValueError("truncated LEB128 number")


def open_x86_64(path: str) -> tuple[os.stat_result, ElfImage]:
    """The file's identity (uprobes attach per inode) and its image, for the analyses that
    place probes: one-line ElfError when it is unreadable or not x86-64. Close the image."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise ElfError(f"cannot read {path}: {e.strerror}") from None
    img = ElfImage.open(path)
    if img.machine != "EM_X86_64":
        img.close()
        raise ElfError(f"{path} is {img.machine}, tlstap handles x86-64 only")
    return st, img


def is_elf(path: str) -> bool:
    """Cheap magic check, without parsing (used when scanning every file a process maps)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


__all__ = ["ElfError", "ElfImage", "Symbol", "is_elf", "open_x86_64"]
