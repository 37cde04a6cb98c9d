"""tlstap.probes.nss_keys against Debian's NSS 3.87 (libnss3.so, libfreeblpriv3.so), and the
naming of its events (sources/nss_keys.py).

Expectations come from elsewhere than the analysis: the exported symbol table, objdump's
disassembly, and a copy of freebl whose vector is damaged (two slots swapped), which the
witnesses must refuse."""
import os
import re
import shutil
import struct
import subprocess

import pytest

from tests.conftest import needs
from tlstap import abi
from tlstap.probes import nss_keys
from tlstap.probes.elf import ElfImage
from tlstap.probes.nss_keys import SLOTS, NssKeysUnknown, analyze, analyze_freebl

LIBDIR = "/usr/lib/x86_64-linux-gnu"
NSS, FREEBL = f"{LIBDIR}/libnss3.so", f"{LIBDIR}/libfreeblpriv3.so"

pytestmark = needs(os.path.exists(NSS) and os.path.exists(FREEBL), "libnss3 is not installed")


def _vector_slots(path: str) -> tuple[int, dict[int, tuple[int, int]]]:
    """(vector address, {slot address: (file offset of its RELA entry, addend)}): the table
    FREEBL_GetVector returns per objdump, and readelf's view of the relocations."""
    with ElfImage.open(path) as img:
        fn = img.function("FREEBL_GetVector")
        dis = subprocess.run(["objdump", "-d", f"--start-address={fn.vaddr:#x}",
                              f"--stop-address={fn.vaddr + fn.size:#x}", path],
                             capture_output=True, text=True, check=True).stdout
        leas = [int(m.group(1), 16) for m in re.finditer(r"lea .*%rip\),%rax\s+# ([0-9a-f]+)", dis)]
        rela = img.elf.get_section_by_name(".rela.dyn")
        entries = {}
        for i, (off, info, addend) in enumerate(struct.iter_unpack("<QQq", rela.data())):
            entries[off] = (rela["sh_offset"] + 24 * i, addend)
    vec = [a for a in leas if a + 8 in entries]
    assert len(vec) == 1, leas
    return vec[0], entries


def _target(path: str, slot: int) -> int:
    vec, entries = _vector_slots(path)
    return entries[vec + 8 + 8 * slot][1]


def test_system_nss_points():
    s = analyze(NSS, FREEBL)
    assert s.version and s.version.startswith("NSS 3.")
    with ElfImage.open(NSS) as img:
        for p in s.points:
            if p.path == NSS:
                assert img.exports(p.what)
                assert img.vaddr_to_offset(img.function(p.what).vaddr) <= p.offset < \
                    img.vaddr_to_offset(img.function(p.what).vaddr) + 8
    with ElfImage.open(FREEBL) as img:
        for p in s.points:
            if p.path == FREEBL:
                start = img.vaddr_to_offset(_target(FREEBL, SLOTS[p.what]))
                assert start <= p.offset < start + 8, p
    assert {(p.program, p.retprobe) for p in s.points} >= {("hmac_finish_exit", True), ("clone_exit", True),
                                                          ("digest_final_exit", True)}
    assert any("TLS_P_hash calls" in e for e in s.evidence)


def test_damaged_vector_is_refused(tmp_path):
    """HMAC_Update's slot pointing at HMAC_Clone (the next slot): TLS_P_hash no longer calls
    what the vector says is HMAC_Update, so the analysis refuses instead of probing it."""
    bad = tmp_path / "libfreeblpriv3.so"
    shutil.copy(FREEBL, bad)
    vec, entries = _vector_slots(str(bad))
    upd, nxt = vec + 8 + 8 * SLOTS["HMAC_Update"], vec + 8 + 8 * (SLOTS["HMAC_Update"] + 1)
    with open(bad, "r+b") as f:
        f.seek(entries[upd][0] + 16)
        f.write(struct.pack("<q", entries[nxt][1]))
    analyze_freebl(FREEBL)       # the original passes
    with pytest.raises(NssKeysUnknown, match="HMAC_Update"):
        analyze_freebl(str(bad))


def test_not_freebl_or_nss(tmp_path):
    with pytest.raises(NssKeysUnknown, match="FREEBL_GetVector"):
        analyze_freebl(NSS)
    with pytest.raises(NssKeysUnknown, match="PK11_DigestOp"):
        analyze(FREEBL, FREEBL)


def _event(label: bytes, cr: bytes, secret: bytes) -> bytes:
    e = abi.KeyEvent(kind=abi.KeyKind.SECRET, secret_len=len(secret), pid=7, tid=8)
    e.comm = b"tstclnt"
    e.label = label
    e.client_random = (type(e.client_random))(*cr)
    e.secret = (type(e.secret))(*secret.ljust(abi.KEY_SECRET_MAX, b"\0"))
    return bytes(e)


def test_labels_named_as_nss_writes_them():
    from tlstap.sources.nss_keys import NssKeyLogCapture
    got = []
    cap = NssKeyLogCapture.__new__(NssKeyLogCapture)
    cap.subscribers, cap.no_client_random = [got.append], 0
    cr, secret = bytes(range(32)), bytes(range(100, 148))
    for label in (b"c hs traffic", b"s hs traffic", b"c ap traffic", b"s ap traffic", b"exp master",
                  b"c e traffic", b"e exp master", b"CLIENT_RANDOM", b"derived", b"res master", b"traffic upd"):
        cap._on_record(memoryview(_event(label, cr, secret)))
    cap._on_record(memoryview(_event(b"c hs traffic", bytes(32), secret)))
    assert [ln.label for ln in got] == ["CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
                                        "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0", "EXPORTER_SECRET",
                                        "CLIENT_EARLY_TRAFFIC_SECRET", "EARLY_EXPORTER_SECRET", "CLIENT_RANDOM"]
    assert got[0].text() == f"CLIENT_HANDSHAKE_TRAFFIC_SECRET {cr.hex()} {secret.hex()}"
    assert cap.no_client_random == 1


def test_find_keys_explicit_paths(tmp_path):
    class Cfg:
        libssl, pid = [f"{LIBDIR}/libnspr4.so"], None
    (s,) = nss_keys.find_keys(Cfg)
    assert (s.nss_path, s.freebl_path) == (NSS, FREEBL)
