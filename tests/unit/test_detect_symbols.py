"""detect's naming of a uprobe's file offset, on this host's real libssl: an exported function,
an offset inside one, an unexported function named by its callers, bytes that are no code."""
from __future__ import annotations

import glob

import pytest

from tlstap.detect.uprobes import _Files, library_of
from tlstap.probes.elf import ElfImage


@pytest.fixture(scope="module")
def libssl():
    paths = sorted(glob.glob("/usr/lib/x86_64-linux-gnu/libssl.so.3"))
    if not paths:
        pytest.skip("no libssl.so.3")
    files = _Files()
    yield paths[0], files.get(paths[0])
    files.close()


def _offset(path: str, name: str) -> int:
    with ElfImage.open(path) as img:
        return img.vaddr_to_offset(img.function(name).vaddr)


def test_exported_function_and_inside_it(libssl):
    path, syms = libssl
    off = _offset(path, "SSL_write")
    assert syms.name(off) == ("SSL_write", [])
    assert syms.name(off + 3) == ("SSL_write+0x3", [])


def test_unexported_function_is_named_by_its_callers(libssl):
    """SSL_read_ex and SSL_read both call OpenSSL's internal ssl_read_internal (static, so no
    symbol in Debian's stripped build): the call target of SSL_read_ex's body."""
    path, syms = libssl
    from tlstap.probes import x86
    with ElfImage.open(path) as img:
        code = x86.Code(img)
        fn = img.function("SSL_read_ex")
        targets = [x86.direct_target(i) for i in code.body(fn.vaddr, fn.vaddr + fn.size)]
        internal = [t for t in targets if t and img.name_at(t) is None and img.function_range(t)]
        assert internal, "SSL_read_ex calls no unexported function in this build"
        off = img.vaddr_to_offset(internal[0])
    text, callers = syms.name(off)
    assert "SSL_read_ex" in callers and text.startswith(f"offset {off:#x} (an unexported function, called by ")
    text, callers = syms.name(off + 4)
    assert text.startswith(f"offset {off + 4:#x} (in an unexported function at {off:#x}, called by ")
    assert "SSL_read_ex" in callers


def test_offset_outside_code(libssl):
    _path, syms = libssl
    assert syms.name(0) == ("offset 0x0 (no symbol)", [])
    assert syms.name(1 << 40)[0] == f"offset {1 << 40:#x} (not in the file's loaded segments)"


@pytest.mark.parametrize("path,name", [
    ("/usr/lib/x86_64-linux-gnu/libssl.so.3", "OpenSSL libssl"),
    ("/lib/x86_64-linux-gnu/libcrypto.so.3", "OpenSSL libcrypto"),
    ("/usr/lib/x86_64-linux-gnu/libgnutls.so.30", "GnuTLS"),
    ("/usr/lib/x86_64-linux-gnu/libnss3.so", "NSS"),
    ("/usr/lib/x86_64-linux-gnu/libnspr4.so", "NSPR (NSS's I/O layer)"),
    ("/usr/bin/node", "Node.js (OpenSSL built in)"),
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", None),
])
def test_library_names(path, name):
    assert library_of(path, None) == name
