"""tlstap.probes.openssl_keys and ElfImage.function_range against real OpenSSL builds: Debian's
stripped libssl.so.3 (3.0), node's static OpenSSL (with symbols), the libssl of the
psycopg2-binary wheel (3.5: SSL* -> SSL_CONNECTION*), and small gcc-built stand-ins.

The expectations come from somewhere other than the analysis: symbol tables, readelf's own
FDE dump, a plain linear disassembly, and the live library itself (loaded with ctypes in a
child process, so two OpenSSL builds never share one process)."""
import glob
import os
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import time
from functools import lru_cache

import capstone
import pytest

from tests.conftest import needs
from tlstap.probes.elf import ElfImage
from tlstap.probes.openssl import NotOpenSSL
from tlstap.probes.openssl_keys import LOG_LABELS, UPDATE_LABEL, KeyLayoutUnknown, KeySites, analyze_keys

LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
NODE = "/usr/bin/node"


def _wheel_libssl() -> str | None:
    """OpenSSL 3.5 as bundled (auditwheel-renamed) in psycopg2-binary."""
    for d in (sysconfig.get_paths()["purelib"], "/tmp/wheels/psy"):
        hits = sorted(glob.glob(os.path.join(d, "psycopg2_binary.libs", "libssl-*.so.3")))
        if hits:
            return hits[0]
    return None


WHEEL = _wheel_libssl()

needs_gcc = needs(shutil.which("gcc") and shutil.which("strip"), "gcc and strip are not installed")
needs_readelf = needs(shutil.which("readelf"), "readelf (binutils) is not installed")
needs_libssl = needs(os.path.exists(LIBSSL), f"no {LIBSSL} (apt-get install libssl3)")
needs_wheel = needs(WHEEL, "psycopg2-binary is not installed (pip install .[test])")
needs_node = needs(os.path.exists(NODE), f"no {NODE} (apt-get install nodejs)")
SHARED = [pytest.param(LIBSSL, marks=needs_libssl, id="debian"), pytest.param(WHEEL, marks=needs_wheel, id="wheel")]


@lru_cache(maxsize=None)
def keys(path: str) -> tuple[KeySites, float]:
    t0 = time.perf_counter()
    k = analyze_keys(path)
    return k, time.perf_counter() - t0


def vaddr_of(img: ElfImage, offset: int) -> int:
    for va, _memsz, off, filesz, _x in img.loads:
        if off <= offset < off + filesz:
            return offset - off + va
    raise AssertionError(f"offset {offset:#x} not in a segment")


def readelf_fdes(path: str) -> list[tuple[int, int]]:
    out = subprocess.run(["readelf", "--debug-dump=frames", path], capture_output=True, text=True, check=True).stdout
    return [(int(a, 16), int(b, 16)) for a, b in re.findall(r"FDE cie=\w+ pc=(\w+)\.\.(\w+)", out)]


def label_sites(img: ElfImage) -> list[tuple[int, bytes, int | None]]:
    """(lea address, string, first direct call within 6 instructions if the string went
    straight to rsi) for every `lea reg,[rip+X]` of a key log label or "traffic upd", by a
    plain linear sweep of .text, printed operands only."""
    text = img.elf.get_section_by_name(".text")
    ro = img.elf.get_section_by_name(".rodata")
    rodata, ro_lo = ro.data(), ro["sh_addr"]

    def string_at(addr):
        if not ro_lo <= addr < ro_lo + len(rodata):
            return None
        end = rodata.find(b"\0", addr - ro_lo)
        s = rodata[addr - ro_lo:end]
        return s if s in (*LOG_LABELS, UPDATE_LABEL) else None

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    insns = list(md.disasm_lite(text.data(), text["sh_addr"]))
    out = []
    for n, (addr, size, mnem, ops) in enumerate(insns):
        m = re.fullmatch(r"(\w+), \[rip ([+-]) (0x[0-9a-f]+)\]", ops) if mnem == "lea" else None
        if not m:
            continue
        s = string_at(addr + size + int(m.group(3), 16) * (1 if m.group(2) == "+" else -1))
        if s is None:
            continue
        call = None
        if m.group(1) == "rsi":
            for _a, _s, mn, op in insns[n + 1:n + 7]:
                if mn == "call":
                    call = int(op, 16) if op.startswith("0x") else None
                    break
        out.append((addr, s, call))
    return out


# ---- the shared libraries: checked against the running library ----------------------------

LIVE = r"""
import ctypes, sys
lib = ctypes.CDLL(sys.argv[1])
cr_off, srv_off = int(sys.argv[2]), int(sys.argv[3])
P = ctypes.c_void_p
for name, res, args in (("TLS_method", P, []), ("SSL_CTX_new", P, [P]), ("SSL_new", P, [P]),
                        ("BIO_s_mem", P, []), ("BIO_new", P, [P]), ("SSL_set_bio", None, [P, P, P]),
                        ("SSL_set_connect_state", None, [P]), ("SSL_set_accept_state", None, [P]),
                        ("SSL_do_handshake", ctypes.c_int, [P]), ("SSL_is_server", ctypes.c_int, [P]),
                        ("SSL_get_client_random", ctypes.c_size_t, [P, ctypes.c_char_p, ctypes.c_size_t])):
    f = getattr(lib, name)
    f.restype, f.argtypes = res, args
ctx = lib.SSL_CTX_new(lib.TLS_method())
cli, srv = lib.SSL_new(ctx), lib.SSL_new(ctx)
lib.SSL_set_connect_state(cli)
lib.SSL_set_accept_state(srv)
lib.SSL_set_bio(cli, lib.BIO_new(lib.BIO_s_mem()), lib.BIO_new(lib.BIO_s_mem()))
lib.SSL_do_handshake(cli)          # writes a ClientHello into the memory BIO: client_random is set
buf = ctypes.create_string_buffer(32)
assert lib.SSL_get_client_random(cli, buf, 32) == 32
print(buf.raw.hex(), ctypes.string_at(cli + cr_off, 32).hex(),
      lib.SSL_is_server(cli), ctypes.c_int.from_address(cli + srv_off).value,
      lib.SSL_is_server(srv), ctypes.c_int.from_address(srv + srv_off).value)
"""


@pytest.mark.parametrize("path", SHARED)
def test_offsets_match_the_live_library(path):
    """Read the SSL object of a real client (after its ClientHello) and server at the
    discovered offsets; the library's own getters must agree."""
    k, _ = keys(path)
    out = subprocess.run([sys.executable, "-c", LIVE, path, str(k.client_random_off), str(k.server_off)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    api_random, raw_random, cli_api, cli_raw, srv_api, srv_raw = out.stdout.split()
    assert raw_random == api_random != "00" * 32
    assert (cli_api, cli_raw, srv_api, srv_raw) == ("0", "0", "1", "1")


@pytest.mark.parametrize("path", SHARED)
def test_stripped_shared_library(path):
    k, elapsed = keys(path)
    assert elapsed < 1.0
    with ElfImage.open(path) as img:
        assert img.function("ssl_log_secret") is None and img.function("tls13_update_key") is None
        sites = label_sites(img)
        log_secret, update_key = vaddr_of(img, k.log_secret), vaddr_of(img, k.update_key)
    # every label that goes straight to rsi before a call goes to the function we found
    calls = {call for _a, s, call in sites if s != UPDATE_LABEL and call is not None}
    assert calls == {log_secret}
    assert len([1 for _a, s, call in sites if call == log_secret]) >= 2
    # tls13_update_key is the function (per readelf's unwind dump) around the one "traffic upd" lea
    (upd,) = [a for a, s, _c in sites if s == UPDATE_LABEL]
    if shutil.which("readelf"):
        (fde,) = [(lo, hi) for lo, hi in readelf_fdes(path) if lo <= upd < hi]
        assert fde[0] == update_key
    assert k.log_secret_insn and k.update_key_insn == "push"
    assert k.version is None or k.version.startswith("OpenSSL 3.")
    assert all("\n" not in e for e in k.evidence)
    joined = "\n".join(k.evidence)
    for fact in ("ssl_log_secret: no symbol", "32 bytes lower", "ssl_log_secret takes" if path == LIBSSL else
                 "ssl_log_secret reads", "SSL_is_server returns", "tls13_update_key: no symbol",
                 "tls13_update_key compares"):
        assert fact in joined


@needs_libssl
def test_debian_libssl_values():
    """The values read by hand from Debian's 3.0.19 (secondary to the live check above)."""
    k, _ = keys(LIBSSL)
    assert (k.client_random_off, k.server_off) == (0x160, 0x38)
    assert "SSL* is the object itself" in "\n".join(k.evidence)
    assert (k.path, k.dev, k.ino) == (LIBSSL, os.stat(LIBSSL).st_dev, os.stat(LIBSSL).st_ino)


@needs_wheel
def test_wheel_libssl_values():
    """3.5.8: the getters convert SSL* to SSL_CONNECTION* through one helper call."""
    k, _ = keys(WHEEL)
    assert (k.client_random_off, k.server_off) == (0x188, 0x78)
    assert "SSL* -> SSL_CONNECTION* through the call to" in "\n".join(k.evidence)


# ---- node: a static OpenSSL with symbols ----------------------------------------------------

@needs_node
def test_node_heuristics_agree_with_symbols():
    k, _elapsed = keys(NODE)
    with ElfImage.open(NODE) as img:
        assert img.elf["e_type"] == "ET_EXEC"    # labels are 32-bit immediates, not rip-relative
        assert k.log_secret == img.vaddr_to_offset(img.function("ssl_log_secret").vaddr)
        assert k.update_key == img.vaddr_to_offset(img.function("tls13_update_key").vaddr)
    joined = "\n".join(k.evidence)
    assert "ssl_log_secret: symbol at" in joined and "call sites agree" in joined
    assert "tls13_update_key: symbol at" in joined and "; agrees:" in joined
    assert "tls13_update_key compares" in joined and "ssl_log_secret takes" in joined
    assert (k.client_random_off, k.server_off) == (0x160, 0x38)
    assert (k.log_secret_insn, k.update_key_insn) == ("push", "push")


# ---- ElfImage.function_range -----------------------------------------------------------------

@needs_readelf
@pytest.mark.parametrize("path", SHARED)
def test_function_range_matches_readelf(path):
    fdes = readelf_fdes(path)
    with ElfImage.open(path) as img:
        got = {(lo, hi): (img.function_range(lo), img.function_range(hi - 1), img.function_range((lo + hi) // 2))
               for lo, hi in fdes}
    for fde, ranges in got.items():
        assert set(ranges) in ({fde}, {None})            # None: the PLT, or a fragment
    assert sum(r[0] == fde for fde, r in got.items()) > 0.99 * len(fdes)


@needs_node
def test_function_range_refuses_cold_fragments():
    """GCC's foo.cold parts have FDEs of their own; they are not functions."""
    with ElfImage.open(NODE) as img:
        cold = [s for n, s in img.functions.items() if n.endswith(".cold")]
        hot = [img.function(n) for n in ("ssl_log_secret", "tls13_update_key", "SSL_is_server")]
        # the cold parts of functions without a frame look like functions (~2% here)
        assert len(cold) > 100 and sum(img.function_range(s.vaddr) is None for s in cold) > 0.95 * len(cold)
        assert all(img.function_range(s.vaddr) == (s.vaddr, s.vaddr + s.size) for s in hot)


def test_function_range_outside_code():
    with ElfImage.open(sys.executable) as img:
        assert img.function_range(0) is None
        assert img.function_range(img.elf.get_section_by_name(".eh_frame_hdr")["sh_addr"]) is None


# ---- not OpenSSL -----------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/bin/ls", "/usr/lib/x86_64-linux-gnu/libc.so.6"])
def test_not_openssl(path):
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    with pytest.raises((NotOpenSSL, KeyLayoutUnknown)) as e:
        analyze_keys(path)
    assert path in str(e.value) and "\n" not in str(e.value)


# ---- gcc-built stand-ins ---------------------------------------------------------------------

FAKE_C = r"""
/* libssl's shape where it matters to openssl_keys: a hidden ssl_log_secret called with NSS
   labels, a hidden tls13_update_key using "traffic upd", and the exported getters.
   S3_POINTER gives 1.1's s3-behind-a-pointer layout. */
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#define HIDDEN __attribute__((visibility("hidden"), noinline, noclone))

struct ssl3_state { unsigned char server_random[32]; unsigned char client_random[32]; };
typedef struct ssl_st {
    int version;
    void (*keylog)(const struct ssl_st *, const char *);
    char pad1[40];
    int server;
    char pad2[200];
#ifdef S3_POINTER
    struct ssl3_state *s3;
#else
    struct ssl3_state s3;
#endif
} SSL;
#ifdef S3_POINTER
#define S3(s) ((s)->s3)
const size_t fake_layout[2] = { offsetof(SSL, s3), offsetof(SSL, server) };
#else
#define S3(s) (&(s)->s3)
const size_t fake_layout[2] = { offsetof(SSL, s3.client_random), offsetof(SSL, server) };
#endif

HIDDEN int ssl_log_secret(SSL *s, const char *label, const unsigned char *secret, size_t len)
{
    char line[512];
    size_t n = (size_t)snprintf(line, sizeof line, "%s ", label);
    for (size_t i = 0; i < 32; i++)
        n += (size_t)snprintf(line + n, sizeof line - n, "%02x", S3(s)->client_random[i]);
    line[n++] = ' ';
    for (size_t i = 0; i < len && n + 3 < sizeof line; i++)
        n += (size_t)snprintf(line + n, sizeof line - n, "%02x", secret[i]);
    if (s->keylog != NULL)
        s->keylog(s, line);
    return 1;
}

void fake_hkdf(unsigned char *out, const unsigned char *label, size_t n);

HIDDEN int tls13_update_key(SSL *s, int sending)
{
    static const unsigned char application_traffic[] = "traffic upd";
    unsigned char secret[32];
    fake_hkdf(secret, application_traffic, sizeof(application_traffic) - 1);
#ifndef NO_SERVER_COMPARE
    if (s->server == sending)
        secret[0] ^= 1;
#endif
    return ssl_log_secret(s, "TRAFFIC_SECRET_N", secret, sizeof secret);
}

#ifdef SECOND_UPDATER
int fake_other_updater(unsigned char *out) { fake_hkdf(out, (const unsigned char *)"traffic upd", 11); return 0; }
#endif

int fake_master(SSL *s, const unsigned char *m)
{
    if (!ssl_log_secret(s, "CLIENT_RANDOM", m, 48))
        return -1;
    return 0;
}

int fake_exporters(SSL *s, const unsigned char *m, int early)
{
    int r;
    if (early)
        r = ssl_log_secret(s, "EARLY_EXPORTER_SECRET", m, 32);
    else
        r = ssl_log_secret(s, "EXPORTER_SECRET", m, 48);
    return r ? 0 : -1;
}

int SSL_key_update(SSL *s, int sending) { return tls13_update_key(s, sending) ? 1 : 0; }
int SSL_write(SSL *s, const void *buf, int num) { (void)s; (void)buf; return num; }
int SSL_is_server(const SSL *s) { return s->server; }

size_t SSL_get_client_random(const SSL *s, unsigned char *out, size_t outlen)
{
    if (outlen == 0)
        return 32;
    if (outlen > 32)
        outlen = 32;
    memcpy(out, S3(s)->client_random, outlen);
    return outlen;
}

size_t SSL_get_server_random(const SSL *s, unsigned char *out, size_t outlen)
{
    if (outlen == 0)
        return 32;
    if (outlen > 32)
        outlen = 32;
    memcpy(out, S3(s)->server_random, outlen);
    return outlen;
}
"""

FAKE_HKDF_C = r"""
#include <stddef.h>
void fake_hkdf(unsigned char *out, const unsigned char *label, size_t n)
{ for (size_t i = 0; i < 32; i++) out[i] = label[i % n]; }
int main(void) { return 0; }
"""


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """build(name, *gcc_flags) -> (path of the stripped build, path of the unstripped one)."""
    d = tmp_path_factory.mktemp("fakekeys")
    (d / "fake.c").write_text(FAKE_C)
    (d / "hkdf.c").write_text(FAKE_HKDF_C)

    def build(name: str, *flags: str) -> tuple[str, str]:
        full, stripped = d / f"{name}.full", d / f"{name}.stripped"
        if not full.exists():
            subprocess.run(["gcc", "-O2", *flags, "-o", str(full), str(d / "fake.c"), str(d / "hkdf.c")], check=True)
            subprocess.run(["strip", "--strip-all", "-o", str(stripped), str(full)], check=True)
        return str(stripped), str(full)
    return build


def symtab_truth(path: str) -> tuple[int, int, int, int]:
    """(ssl_log_secret, tls13_update_key as file offsets of their probe sites, client_random_off,
    server_off) from the unstripped build's .symtab and its fake_layout object."""
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)

    def site(name):
        # with -fcf-protection the probe goes onto the push after endbr64
        vaddr = img.function(name).vaddr
        first, second = [i.mnemonic for i in md.disasm(img.read_vaddr(vaddr, 30), vaddr, 2)]
        return img.vaddr_to_offset(vaddr) + (4 if (first, second) == ("endbr64", "push") else 0)

    with ElfImage.open(path) as img:
        (layout,) = img.elf.get_section_by_name(".symtab").get_symbol_by_name("fake_layout")
        cr, srv = struct.unpack("<QQ", img.read_vaddr(layout["st_value"], 16))
        return site("ssl_log_secret"), site("tls13_update_key"), cr, srv


@needs_gcc
@pytest.mark.parametrize("flags", [("-fPIC", "-shared"), ("-no-pie", "-fno-pic", "-rdynamic"),
                                   ("-fPIC", "-shared", "-fcf-protection")],
                         ids=["shared", "non-pie-executable", "cet"])
def test_fake_found_without_symbols(fake, flags):
    stripped, full = fake("plain-" + "".join(flags), *flags)
    k = analyze_keys(stripped)
    assert (k.log_secret, k.update_key, k.client_random_off, k.server_off) == symtab_truth(full)
    assert (k.log_secret_insn, k.update_key_insn, k.version) == ("push", "push", None)
    assert "ssl_log_secret: no symbol; 3 of 3 call sites" in "\n".join(k.evidence)
    # with symbols, the same answers, and the call-site vote agrees with the symbol
    k2 = analyze_keys(full)
    assert (k2.log_secret, k2.update_key, k2.client_random_off, k2.server_off) == symtab_truth(full)
    assert "call sites agree" in "\n".join(k2.evidence)


@needs_gcc
def test_fake_s3_pointer_is_refused(fake):
    """OpenSSL 1.1 keeps s3 behind a pointer: no single client_random offset; refused, one line."""
    stripped, _ = fake("s3ptr", "-fPIC", "-shared", "-DS3_POINTER")
    with pytest.raises(KeyLayoutUnknown) as e:
        analyze_keys(stripped)
    msg = str(e.value)
    assert msg.startswith(f"{stripped} (OpenSSL version unknown): cannot establish s3.client_random")
    assert "not 32 bytes lower" in msg and "\n" not in msg


@needs_gcc
def test_fake_two_updaters_leave_update_key_unset(fake):
    """"traffic upd" used by two functions: we cannot tell which is tls13_update_key."""
    stripped, full = fake("two-updaters", "-fPIC", "-shared", "-DSECOND_UPDATER")
    k = analyze_keys(stripped)
    assert k.update_key is None and k.update_key_insn is None
    assert k.log_secret == symtab_truth(full)[0]
    joined = "\n".join(k.evidence)
    assert "tls13_update_key: not found (key updates not followed): 2 functions reference 'traffic upd'" in joined
    assert "not cross-checked (no tls13_update_key)" in joined


@needs_gcc
def test_fake_label_user_must_look_like_update_key(fake):
    """Without a symbol, the function using "traffic upd" is taken only if it compares
    s->server with its second argument, as tls13_update_key does."""
    stripped, _ = fake("no-compare", "-fPIC", "-shared", "-DNO_SERVER_COMPARE")
    k = analyze_keys(stripped)
    assert k.update_key is None
    assert "but it compares no SSL field with its second argument (SSL_is_server reads s+0x38)" in "\n".join(k.evidence)
