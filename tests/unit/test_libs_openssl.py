"""tlstap.probes (elf, discover, openssl) against the real binaries of this machine:
Debian's libssl.so.3, /usr/bin/node (static OpenSSL), and small libraries built with gcc."""
import os
import re
import shutil
import subprocess
import sys

import capstone
import pytest


from tests.conftest import needs
from tlstap.probes import discover, openssl
from tlstap.probes.elf import ElfError, ElfImage

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
NODE = "/usr/bin/node"

needs_node = needs(os.path.exists(NODE), f"no {NODE} (apt-get install nodejs)")
needs_gcc = needs(shutil.which("gcc"), "gcc is not installed")


def first_call_target(img: ElfImage, name: str) -> int:
    """Independent of the analysis: linear sweep of `name` to its first direct call."""
    sym = img.function(name)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    for insn in md.disasm(img.read_vaddr(sym.vaddr, sym.size), sym.vaddr):
        if insn.mnemonic == "call" and insn.op_str.startswith("0x"):
            return int(insn.op_str, 16)
    raise AssertionError(f"{name} has no direct call")


def by_role(t: openssl.OpenSSLTarget) -> dict:
    out = {}
    for s in t.sites:
        out.setdefault(s.role, []).append(s)
    return out


# ---- the system libssl ------------------------------------------------------------------

@pytest.fixture(scope="module")
def libssl():
    return openssl.analyze(LIBSSL)


def test_libssl_internal_placement(libssl):
    assert libssl.placement == "internal", libssl.reason
    sites = by_role(libssl)
    (rd,), (wr,), (fr, cl) = sites["read"], sites["write"], sites["free"]
    assert rd.offset != wr.offset
    with ElfImage.open(LIBSSL) as img:
        assert rd.offset == img.vaddr_to_offset(first_call_target(img, "SSL_read_ex"))
        assert wr.offset == img.vaddr_to_offset(first_call_target(img, "SSL_write_ex"))
        assert fr.offset == img.vaddr_to_offset(img.function("SSL_free").vaddr)
        assert cl.offset == img.vaddr_to_offset(img.function("SSL_clear").vaddr)   # a reuse ends one too
        # the int API calls the same function (the point of the placement)
        assert first_call_target(img, "SSL_read") == first_call_target(img, "SSL_read_ex")
    assert (rd.out_arg, wr.out_arg, fr.out_arg) == (3, 3, None)
    assert (rd.first_insn, wr.first_insn) == ("push", "push")
    # Debian strips .symtab: the internal functions get synthetic names
    assert re.fullmatch(r"SSL_read_ex->0x[0-9a-f]+", rd.symbol), rd.symbol
    assert "SSL_read and SSL_read_ex both call" in libssl.reason and " rcx" in libssl.reason


def test_libssl_version_and_identity(libssl):
    out = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=True).stdout
    assert libssl.version == " ".join(out.split()[:2])          # "OpenSSL 3.0.19"
    st = os.stat(LIBSSL)
    assert (libssl.dev, libssl.ino) == (st.st_dev, st.st_ino)
    assert openssl.detect_version(LIBSSL) == libssl.version


def test_elf_basics():
    with ElfImage.open(LIBSSL) as img:
        assert "libcrypto.so.3" in img.needed
        assert img.function("SSL_read").size > 0
        assert img.exports("SSL_write_ex") and not img.exports("ssl_read_internal")
        assert img.plt_ranges and all(a < b for a, b in img.plt_ranges)
        read_ex = img.function("SSL_read_ex").vaddr
        assert img.is_executable_vaddr(read_ex) and not img.in_plt(read_ex)
        off = img.vaddr_to_offset(read_ex)
        with open(LIBSSL, "rb") as f:
            f.seek(off)
            assert f.read(8) == img.read_vaddr(read_ex, 8)
        assert re.fullmatch(r"[0-9a-f]{40}", img.build_id or "")


def test_elf_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an ELF file\n")
    for p in (str(text), str(tmp_path / "missing.so")):
        with pytest.raises(ElfError) as e:
            ElfImage.open(p)
        assert p in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ElfError):
        openssl.analyze(str(text))


def test_not_openssl():
    with pytest.raises(openssl.NotOpenSSL, match="/bin/true"):
        openssl.analyze("/bin/true")


# ---- node: OpenSSL linked statically ----------------------------------------------------

@needs_node
def test_node():
    t = openssl.analyze(NODE)
    want = subprocess.run([NODE, "-p", "process.versions.openssl"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert t.version == f"OpenSSL {want}"
    # node's build inlines ssl_read_internal/ssl_write_internal into the wrappers, which then
    # call s->method->ssl_read/ssl_write indirectly: nothing shared to probe, so fall back.
    assert t.placement == "api"
    assert "SSL_read_ex hands" in t.reason and "indirect call" in t.reason
    with ElfImage.open(NODE) as img:
        want_sites = {(n, img.vaddr_to_offset(img.function(n).vaddr), r, o)
                      for n, r, o in [("SSL_read", "read", None), ("SSL_read_ex", "read", 3),
                                      ("SSL_write", "write", None), ("SSL_write_ex", "write", 3),
                                      ("SSL_free", "free", None), ("SSL_clear", "free", None),
                                      ("SSL_do_handshake", "handshake", None)]}
    assert {(s.symbol, s.offset, s.role, s.out_arg) for s in t.sites} == want_sites
    # node keeps frame pointers: every API function starts with `push %rbp` (cheap anyway)
    assert all(s.first_insn == "push" for s in t.sites if s.role != "free")


# ---- synthetic libraries ----------------------------------------------------------------

FAKE_C = r"""
#include <stddef.h>
#include <stdint.h>
typedef struct ssl_st SSL;
struct meth { int (*rd)(SSL *, void *, size_t, size_t *); int (*wr)(SSL *, const void *, size_t, size_t *); };
struct ssl_st { const struct meth *m; size_t pending; };
#define NOINLINE __attribute__((noinline))
extern void ERR_raise_cold(int) __attribute__((cold));   /* error path -> SSL_read.cold */

#if defined(VTABLE)          /* like node: internal functions inlined, work through s->method */
#define RD(s, b, n, o) (s)->m->rd(s, b, n, o)
#define WR(s, b, n, f, o) (s)->m->wr(s, b, n, o)
#else                        /* OpenSSL 1.1.1 .. 3.2: one internal function per direction */
static NOINLINE int ssl_read_internal(SSL *s, void *b, size_t n, size_t *o)
{ if (!s->m) return -1; return s->m->rd(s, b, n, o); }
#define RD(s, b, n, o) ssl_read_internal(s, b, n, o)
#if defined(EX2)             /* OpenSSL 3.3+: flags before the out-param, SSL_write_ex -> SSL_write_ex2 */
static NOINLINE int ssl_write_internal(SSL *s, const void *b, size_t n, uint64_t f, size_t *o)
{ if (!s->m || f > 7) return -1; return s->m->wr(s, b, n, o); }
#define WR(s, b, n, f, o) ssl_write_internal(s, b, n, f, o)
#else
static NOINLINE int ssl_write_internal(SSL *s, const void *b, size_t n, size_t *o)
{ if (!s->m) return -1; return s->m->wr(s, b, n, o); }
#define WR(s, b, n, f, o) ssl_write_internal(s, b, n, o)
#endif
#endif

#if defined(SPLIT)           /* SSL_read does not use SSL_read_ex's function */
static NOINLINE int ssl_read_other(SSL *s, void *b, size_t n, size_t *o)
{ if (!s->pending) return -1; return s->m->rd(s, b, n, o); }
#define RD_INT(s, b, n, o) ssl_read_other(s, b, n, o)
#else
#define RD_INT RD
#endif

int SSL_read(SSL *s, void *buf, int num)
{ size_t n; int r; if (num < 0) { ERR_raise_cold(num); return -1; }
  r = RD_INT(s, buf, (size_t)num, &n); return r > 0 ? (int)n : r; }
#if defined(MISMATCH)        /* SSL_read_ex calls nothing with its arguments */
int SSL_read_ex(SSL *s, void *buf, size_t num, size_t *rb) { *rb = s->pending; s->pending = num; return buf != 0; }
#else
int SSL_read_ex(SSL *s, void *buf, size_t num, size_t *rb) { int r = RD(s, buf, num, rb); return r < 0 ? 0 : r; }
#endif
int SSL_write(SSL *s, const void *buf, int num)
{ size_t n; int r; if (num < 0) { ERR_raise_cold(num); return -1; }
  r = WR(s, buf, (size_t)num, 0, &n); return r > 0 ? (int)n : r; }
#if defined(EX2)
int SSL_write_ex2(SSL *s, const void *buf, size_t num, uint64_t flags, size_t *w)
{ int r = WR(s, buf, num, flags, w); return r < 0 ? 0 : r; }
int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *w) { return SSL_write_ex2(s, buf, num, 0, w); }
#else
int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *w) { int r = WR(s, buf, num, 0, w); return r < 0 ? 0 : r; }
#endif
void SSL_free(SSL *s) { if (s) s->pending = 0; }
"""


@pytest.fixture(scope="module")
def fake_lib(tmp_path_factory):
    d = tmp_path_factory.mktemp("fakessl")
    (d / "fake.c").write_text(FAKE_C)
    built = {}

    def build(variant: str, strip: bool = False, cflags: tuple = ()) -> str:
        out = d / f"libssl_{variant}{'_stripped' if strip else ''}{''.join(cflags)}.so"
        if out not in built:
            subprocess.run(["gcc", "-O2", "-fPIC", "-shared", f"-D{variant}", *cflags, "-o", str(out),
                            str(d / "fake.c")], check=True)
            if strip:
                subprocess.run(["strip", "--strip-all", str(out)], check=True)
            built[out] = True
        return str(out)
    return build


@needs_gcc
def test_fake_plain_stripped(fake_lib):
    """The 1.1.1-3.2 shape, without .symtab and with GCC .cold error paths: found anyway."""
    path = fake_lib("PLAIN", strip=True)
    t = openssl.analyze(path)
    assert t.placement == "internal", t.reason
    rd, wr = by_role(t)["read"][0], by_role(t)["write"][0]
    with ElfImage.open(path) as img:
        assert img.function("ssl_read_internal") is None
        assert rd.offset == img.vaddr_to_offset(first_call_target(img, "SSL_read_ex"))
    assert rd.symbol.startswith("SSL_read_ex->0x") and (rd.out_arg, wr.out_arg) == (3, 3)
    assert t.version is None


@needs_gcc
def test_fake_ex2(fake_lib):
    """3.3+: SSL_write_ex tail-calls SSL_write_ex2 through the PLT; the internal function takes
    (s, buf, num, flags, written), so the out-param is in r8."""
    t = openssl.analyze(fake_lib("EX2"))
    assert t.placement == "internal", t.reason
    (wr,) = by_role(t)["write"]
    assert (wr.symbol, wr.out_arg) == ("ssl_write_internal", 4)
    assert "via SSL_write_ex2" in t.reason


@needs_gcc
@pytest.mark.parametrize("variant,needle", [
    ("VTABLE", "read: SSL_read_ex hands (ssl, buf, num, out) to an indirect call"),
    ("MISMATCH", "read: SSL_read_ex makes no direct call"),
    ("SPLIT", "read: SSL_read "),
])
def test_fake_fallback(fake_lib, variant, needle):
    t = openssl.analyze(fake_lib(variant))
    assert t.placement == "api"
    assert needle in t.reason and "\n" not in t.reason
    assert [(s.symbol, s.role, s.out_arg) for s in t.sites] == [
        ("SSL_read", "read", None), ("SSL_read_ex", "read", 3), ("SSL_write", "write", None),
        ("SSL_write_ex", "write", 3), ("SSL_free", "free", None)]
    if variant != "VTABLE":      # only the read side was broken
        assert "write:" not in t.reason


@needs_gcc
def test_fake_cet_endbr64(fake_lib):
    """With -fcf-protection every exported function starts with endbr64, which the kernel
    single-steps; when a push follows, the site moves onto the push."""
    path = fake_lib("VTABLE", cflags=("-fcf-protection", "-fno-omit-frame-pointer"))
    sites = {s.symbol: s for s in openssl.analyze(path).sites}
    with ElfImage.open(path) as img:
        def off(name):
            return img.vaddr_to_offset(img.function(name).vaddr)
        assert img.read_vaddr(img.function("SSL_read_ex").vaddr, 4) == bytes.fromhex("f30f1efa")
        assert (sites["SSL_read_ex"].offset, sites["SSL_read_ex"].first_insn) == (off("SSL_read_ex") + 4, "push")
        # endbr64; test ...: nothing cheap behind it, stay on the symbol
        assert (sites["SSL_free"].offset, sites["SSL_free"].first_insn) == (off("SSL_free"), "endbr64")


# ---- discovery --------------------------------------------------------------------------

def test_system_libssl():
    out = subprocess.run([shutil.which("ldconfig") or "/sbin/ldconfig", "-p"], capture_output=True, text=True,
                         check=True).stdout
    m = re.search(r"^\s*libssl\.so\.3 \([^)]*x86-64[^)]*\) => (\S+)$", out, re.M)
    assert discover.system_libssl() == m.group(1)


def test_dedupe_by_inode():
    real = os.path.realpath(LIBSSL)
    assert discover.dedupe_by_inode([LIBSSL, real, "/lib/x86_64-linux-gnu/libssl.so.3", NODE]) == [LIBSSL, NODE]
    with pytest.raises(discover.LibraryNotFound, match="/nonexistent"):
        discover.dedupe_by_inode(["/nonexistent/libssl.so.3"])


def _spawn(argv, ready=None):
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if ready:
        assert p.stdout.readline().strip() == ready
    return p


def _stop(p):
    p.kill()
    p.wait()


def test_libs_for_pid_python_ssl():
    p = _spawn([sys.executable, "-c", "import ssl, sys; print('ready', flush=True); sys.stdin.read()"], "ready")
    try:
        libs = discover.libs_for_pid(p.pid)
    finally:
        _stop(p)
    ssl_libs = [m for m in libs if os.path.basename(m.path).startswith("libssl.so")]
    assert len(ssl_libs) == 1, libs
    m = ssl_libs[0]
    assert m.host_path == f"/proc/{p.pid}/root{m.path}"
    st = os.stat(m.path)
    assert (m.dev, m.ino) == (st.st_dev, st.st_ino)
    assert (m.dev, m.ino) == (os.stat(LIBSSL).st_dev, os.stat(LIBSSL).st_ino)


@needs_node
def test_libs_for_pid_node_static():
    # wait for node to say so: before its exec, /proc/PID/maps is still the forking python's
    p = _spawn([NODE, "-e", "console.log('ready'); setTimeout(()=>{},5000)"], "ready")
    try:
        libs = discover.libs_for_pid(p.pid)
    finally:
        _stop(p)
    assert [m.path for m in libs] == [NODE]      # via the exe mapping; node maps no libssl.so
    assert libs[0].ino == os.stat(NODE).st_ino


def test_libs_for_pid_dead():
    p = subprocess.Popen(["true"])
    p.wait()
    with pytest.raises(discover.ProcessNotFound, match=str(p.pid)):
        discover.libs_for_pid(p.pid)


def test_libs_for_pid_without_openssl():
    p = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(discover.LibraryNotFound, match=rf"process {p.pid} \(sleep\) maps no OpenSSL"):
            discover.libs_for_pid(p.pid)
    finally:
        _stop(p)
