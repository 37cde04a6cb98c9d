"""Where a keylog probe finds NSS's secrets, read from the builds under capture.

NSS writes a key log only when built with NSS_ALLOW_SSLKEYLOGFILE (Debian's 3.87 is not:
its libssl3.so has no "SSLKEYLOGFILE" string), and its ssl3_RecordKeyLog gets a PK11SymKey,
a handle: the bytes of every secret live in softoken (libsoftokn3.so), which computes them
with freebl (libfreeblpriv3.so). Softoken reaches freebl only through the table of function
pointers FREEBL_GetVector returns (lib/freebl/loader.h); the table is freebl's ABI between
separately shipped libraries, so its slots keep their positions and it only grows at the end
(its header holds its length and a 3.x version). bpf/nss_keys.bpf.c says what each probe
reads. The facts, each read from the file and checked by a second witness:

1. The vector: the address FREEBL_GetVector returns (a rip-relative lea), whose header says
   version 3.x and a length that covers the slots used; its slots' targets come from the
   file's relative relocations (the table is in RELRO data), RELA or RELR.
2. HMAC_Create, HMAC_Begin, HMAC_Update, HMAC_Finish, TLS_P_hash, TLS_PRF: their slots
   (SLOTS). Witnesses: TLS_P_hash calls all four HMAC functions (RFC 5246's P_hash is HMAC
   over label and seed), and TLS_PRF calls TLS_P_hash. A slot that moved would fail this.
3. The transcript side: PK11_DigestOp, PK11_CloneContext, PK11_DigestFinal and
   PK11_DestroyContext, libnss3.so's public API (exported symbols, no layout involved).

The only structure read is SECItem {type, data, len}, NSS's public byte string.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass

from capstone import x86 as _x86

from ..errors import TlstapError
from .elf import ElfError, ElfImage, open_x86_64
from .x86 import Code, direct_target

#: positions in FREEBLVectorStr (lib/freebl/loader.h): pointers after the 8-byte header
SLOTS = {"TLS_PRF": 136, "HMAC_Create": 138, "HMAC_Begin": 140, "HMAC_Update": 141, "HMAC_Finish": 143,
         "TLS_P_hash": 174}
_VECTOR_MAJOR = 3
_HEADER = struct.Struct("<HH")          # length of the vector in bytes, version (major << 8 | minor)
_R_X86_64_RELATIVE = 8
#: (program, symbol, return probe) in libnss3.so, return probes first (bpf/nss_keys.bpf.c)
NSS_PLAN = (("clone_exit", "PK11_CloneContext", True), ("digest_final_exit", "PK11_DigestFinal", True),
            ("digest_op_enter", "PK11_DigestOp", False), ("clone_enter", "PK11_CloneContext", False),
            ("digest_final_enter", "PK11_DigestFinal", False),
            ("digest_destroy_enter", "PK11_DestroyContext", False))
#: (program, vector slot, return probe) in libfreeblpriv3.so
FREEBL_PLAN = (("hmac_finish_exit", "HMAC_Finish", True), ("hmac_update_enter", "HMAC_Update", False),
               ("hmac_finish_enter", "HMAC_Finish", False), ("p_hash_enter", "TLS_P_hash", False),
               ("prf_enter", "TLS_PRF", False))
NSS_MARKER = "PK11_DigestOp"
FREEBL_NAME = "libfreeblpriv3.so"


class NssKeysUnknown(TlstapError):
    """A fact the NSS keylog probes need could not be established from the build."""


@dataclass(frozen=True)
class Point:
    program: str
    path: str
    offset: int          # file offset (uprobe offset)
    what: str            # the function, for messages
    retprobe: bool


@dataclass(frozen=True)
class NssKeySites:
    """What the keylog probes need for one NSS installation (libnss3 + its freebl)."""
    nss_path: str
    freebl_path: str
    version: str | None
    points: tuple[Point, ...]
    evidence: tuple[str, ...]

    def describe(self) -> str:
        return (f"{self.nss_path} ({self.version or 'NSS version unknown'}): "
                f"PK11_DigestOp/CloneContext/DigestFinal; {self.freebl_path}: "
                f"HMAC_Update/HMAC_Finish/TLS_P_hash/TLS_PRF from FREEBL_GetVector")


# ---- freebl --------------------------------------------------------------------------------

def _relocations(img: ElfImage) -> dict[int, int]:
    """slot address -> the address the dynamic linker stores there: R_X86_64_RELATIVE entries
    of RELA sections (addend in the entry), and RELR (Mozilla's builds; the addend is the slot's
    own content in the file)."""
    out = {}
    for sec in img.elf.iter_sections():
        if sec["sh_type"] == "SHT_RELA":
            for off, info, addend in struct.iter_unpack("<QQq", sec.data()):
                if info & 0xFFFFFFFF == _R_X86_64_RELATIVE:
                    out[off] = addend
        elif sec["sh_type"] == "SHT_RELR" or sec.name == ".relr.dyn":
            for where in _relr_slots(sec.data()):
                out[where] = struct.unpack("<Q", img.read_vaddr(where, 8))[0]
    return out


def _relr_slots(data: bytes):
    """The addresses a RELR section relocates: an even entry is an address, an odd one a
    bitmap of the 63 words after the last address (the ELF gABI's RELR format)."""
    where = 0
    for (e,) in struct.iter_unpack("<Q", data):
        if not e & 1:
            yield e
            where = e + 8
        else:
            for i in range(63):
                if e >> (i + 1) & 1:
                    yield where + 8 * i
            where += 8 * 63


def _returned_tables(img: ElfImage, code: Code, fn) -> list[int]:
    """The addresses FREEBL_GetVector's `lea X(%rip), %rax` load (candidates for its result)."""
    rng = img.function_range(fn.vaddr) or (fn.vaddr, fn.vaddr + max(fn.size, 1))
    out = []
    for insn in code.body(*rng):
        ops = insn.operands
        if insn.mnemonic == "lea" and len(ops) == 2 and insn.reg_name(ops[0].reg) == "rax" and \
                ops[1].type == _x86.X86_OP_MEM and ops[1].mem.base == _x86.X86_REG_RIP:
            out.append(insn.address + insn.size + ops[1].mem.disp)
    return out


def _calls(img: ElfImage, code: Code, vaddr: int) -> set[int]:
    """Direct call and jump targets of the function at vaddr (its unwind-table range)."""
    rng = img.function_range(vaddr)
    if rng is None:
        return set()
    return {t for i in code.body(*rng) if i.mnemonic in ("call", "jmp") and (t := direct_target(i)) is not None}


def analyze_freebl(path: str) -> tuple[dict[str, int], list[str]]:
    """File offsets of the SLOTS functions in one freebl build, and the evidence."""
    _st, img = open_x86_64(path)
    with img:
        fn = img.function("FREEBL_GetVector")
        if fn is None:
            raise NssKeysUnknown(f"{path} does not define FREEBL_GetVector: not NSS's freebl")
        code, rel = Code(img), _relocations(img)
        need = 8 + 8 * (max(SLOTS.values()) + 1)
        tables = []
        for t in _returned_tables(img, code, fn):
            try:
                length, version = _HEADER.unpack(img.read_vaddr(t, 4))
            except (ElfError, struct.error):
                continue
            if version >> 8 == _VECTOR_MAJOR and length >= need and all(
                    t + 8 + 8 * i in rel for i in SLOTS.values()):
                tables.append((t, length, version))
        if len(tables) != 1:
            raise NssKeysUnknown(f"{path}: FREEBL_GetVector returns {len(tables)} tables with a 3.x header "
                                 f"covering slot {max(SLOTS.values())}, expected one")
        t, length, version = tables[0]
        addr = {name: rel[t + 8 + 8 * i] for name, i in SLOTS.items()}
        evidence = [f"freebl vector at {t:#x}: version {version >> 8}.{version & 0xff:#04x}, "
                    f"{(length - 8) // 8} slots"]
        p_hash_calls = _calls(img, code, addr["TLS_P_hash"])
        missing = [n for n in ("HMAC_Create", "HMAC_Begin", "HMAC_Update", "HMAC_Finish")
                   if addr[n] not in p_hash_calls]
        if missing:
            raise NssKeysUnknown(f"{path}: the vector's TLS_P_hash ({addr['TLS_P_hash']:#x}) does not call "
                                 f"its {', '.join(missing)}: the slots are not where freebl 3.x keeps them")
        evidence.append("TLS_P_hash calls the vector's HMAC_Create/Begin/Update/Finish")
        if addr["TLS_P_hash"] not in _calls(img, code, addr["TLS_PRF"]):
            raise NssKeysUnknown(f"{path}: the vector's TLS_PRF ({addr['TLS_PRF']:#x}) does not call its "
                                 f"TLS_P_hash")
        evidence.append("TLS_PRF calls the vector's TLS_P_hash")
        return {n: code.entry_site(a)[0] for n, a in addr.items()}, evidence


# ---- libnss3 ---------------------------------------------------------------------------------

def analyze(nss_path: str, freebl_path: str) -> NssKeySites:
    """The probes for one libnss3.so and the freebl its softoken loads. Raises NssKeysUnknown
    when a fact is not established, ElfError for unreadable files."""
    from .nss import detect_version
    _st, img = open_x86_64(nss_path)
    with img:
        code = Code(img)
        version = detect_version(img, code, nss_path)   # "NSS 3.87.1" (libnss3 has no PR_GetVersion)
        syms = {s: img.function(s) for _p, s, _r in NSS_PLAN}
        missing = sorted(s for s, sym in syms.items() if sym is None or not img.exports(s))
        if missing:
            raise NssKeysUnknown(f"{nss_path} does not export {', '.join(missing)}: not NSS's libnss3")
        points = [Point(p, nss_path, code.entry_site(syms[s].vaddr)[0], s, r) for p, s, r in NSS_PLAN]
    offsets, evidence = analyze_freebl(freebl_path)
    points += [Point(p, freebl_path, offsets[s], s, r) for p, s, r in FREEBL_PLAN]
    return NssKeySites(nss_path, freebl_path, version, tuple(points), tuple(evidence))


def _pair(nss_path: str) -> tuple[str, str]:
    """libnss3 and the freebl next to it: softoken loads freebl from its own directory, and
    distributions and Firefox install the three together."""
    return nss_path, os.path.join(os.path.dirname(nss_path), FREEBL_NAME)


def _explicit(path: str) -> tuple[str, str]:
    """--nspr PATH: PATH itself when it is a libnss3 (--nspr /usr/lib/firefox-esr/libnss3.so:
    Firefox ESR's own NSS on the system's NSPR), else the libnss3.so in the directory of PATH,
    which must be NSPR (text mode's check)."""
    from .nss import analyze as analyze_nspr
    with ElfImage.open(path) as img:
        if img.exports(NSS_MARKER):
            return _pair(path)
    analyze_nspr(path)      # not NSPR either: its one-line error
    return _pair(os.path.join(os.path.dirname(path), "libnss3.so"))


def _for_pid(pid: int) -> list[tuple[str, str]]:
    """What process `pid` maps: its libnss3 and its loaded freebl (softoken loads freebl at
    NSS_Init, so a process that has not initialised NSS yet is refused)."""
    from .discover import mapped_exporting
    nss = mapped_exporting(pid, (NSS_MARKER,), "libnss3", "--nspr")
    freebl = [p for p in mapped_exporting(pid, ("FREEBL_GetVector",))
              if os.path.basename(p).startswith("libfreeblpriv")]
    if len(freebl) != 1:
        raise NssKeysUnknown(f"process {pid} maps {len(freebl)} {FREEBL_NAME}, expected one (NSS not "
                             f"initialised yet? --nspr PATH names the installation)")
    return [(p, freebl[0]) for p in nss]


def find_keys(cfg) -> list[NssKeySites]:
    """The NSS installations to probe: the --nspr paths' directories, else what --pid maps,
    else the system libnss3.so and its freebl."""
    from .discover import dedupe_by_inode, system_library
    if cfg.libssl:
        pairs = [_explicit(p) for p in cfg.libssl]
    elif cfg.pid:
        pairs = _for_pid(cfg.pid)
    else:
        pairs = [_pair(system_library(re.compile(r"libnss3\.so(\.|$)"), ("libnss3.so",), "libnss3.so",
                                      "--nspr"))]
    keep = set(dedupe_by_inode(p for p, _f in pairs))
    return [analyze(n, f) for n, f in pairs if n in keep]
