"""The TLS libraries tlstap knows by file name, in one table: `tlstap doctor` names the other
TLS libraries a host or a process has (and the command that reads each), `tlstap detect`
names the library a probe sits in."""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class TlsLibrary:
    pattern: re.Pattern        #: matched against a file's base name
    name: str
    command: str | None        #: the tlstap command that reads it; None: none does
    openssl: bool = False      #: OpenSSL itself (doctor analyses those; the others it names)


TLS_LIBRARIES = (
    TlsLibrary(re.compile(r"^libssl\.so"), "OpenSSL libssl", "tls", openssl=True),
    TlsLibrary(re.compile(r"^libcrypto\.so"), "OpenSSL libcrypto", "tls", openssl=True),
    TlsLibrary(re.compile(r"^(node|nodejs)$"), "Node.js (OpenSSL built in)", "tls", openssl=True),
    TlsLibrary(re.compile(r"^libgnutls\.so"), "GnuTLS", "gnutls"),
    TlsLibrary(re.compile(r"^(libnss3|libssl3|libsmime3)\.so"), "NSS", "nss"),
    TlsLibrary(re.compile(r"^libnspr4\.so"), "NSPR (NSS's I/O layer)", "nss"),
    TlsLibrary(re.compile(r"^libwolfssl\.so"), "wolfSSL", None),
    TlsLibrary(re.compile(r"^libmbed(tls|crypto)\.so"), "mbed TLS", None),
    TlsLibrary(re.compile(r"^libboringssl|^libssl_boring"), "BoringSSL", None),
    TlsLibrary(re.compile(r"^libjvm\.so"), "Java", None),
)

#: what doctor names besides OpenSSL: one line per library, not per file (NSPR goes with NSS)
OTHER_TLS = tuple(lib for lib in TLS_LIBRARIES if not lib.openssl and not lib.name.startswith("NSPR"))


def library_named(basename: str) -> TlsLibrary | None:
    for lib in TLS_LIBRARIES:
        if lib.pattern.search(basename):
            return lib
    return None
