"""An NSS client driven through ctypes (run as its own process): the NSPR calls tstclnt and
selfserv do not make, on one connection to an echo server.

    python nss_ctypes_peer.py PORT [--layer] [--plain-port N] [--file PATH]

Connects with a Python socket (so its getsockname/getpeername are known), hands it to NSPR
(PR_ImportTCPSocket) and NSS (SSL_ImportFD, server certificate accepted by a hook), then
sends with PR_Write, PR_Send and PR_Writev (vectors from a few bytes to over 64 KiB) and
reads the echo back with PR_Read/PR_Recv in small pieces (served from NSS's buffer, no
syscall). --layer pushes a pass-through NSPR layer above the SSL layer first (the
application then holds that layer). --plain-port / --file also write bytes through
PR_Write to a plain NSPR socket / file, which must not be captured. Prints one JSON
object: pid, local, remote, sent, received (base64), plain (base64 of the plain bytes).
"""
from __future__ import annotations

import argparse
import base64
import ctypes as C
import json
import os
import socket
import sys

PR_INTERVAL_NO_TIMEOUT = 0xFFFFFFFF
PR_TOP_IO_LAYER = -2
SSL_SECURITY, SSL_HANDSHAKE_AS_CLIENT = 1, 5
PR_WRONLY, PR_CREATE_FILE = 0x02, 0x08

nspr = C.CDLL("libnspr4.so")
nss = C.CDLL("libnss3.so")
ssl = C.CDLL("libssl3.so")
P = C.c_void_p

for fn, res, args in (
        (nspr.PR_ImportTCPSocket, P, [C.c_int]),
        (nspr.PR_Write, C.c_int, [P, C.c_char_p, C.c_int]),
        (nspr.PR_Send, C.c_int, [P, C.c_char_p, C.c_int, C.c_int, C.c_uint32]),
        (nspr.PR_Read, C.c_int, [P, P, C.c_int]),
        (nspr.PR_Recv, C.c_int, [P, P, C.c_int, C.c_int, C.c_uint32]),
        (nspr.PR_Writev, C.c_int, [P, P, C.c_int, C.c_uint32]),
        (nspr.PR_Close, C.c_int, [P]),
        (nspr.PR_Open, P, [C.c_char_p, C.c_int, C.c_int]),
        (nspr.PR_GetUniqueIdentity, C.c_int, [C.c_char_p]),
        (nspr.PR_GetDefaultIOMethods, P, []),
        (nspr.PR_CreateIOLayerStub, P, [C.c_int, P]),
        (nspr.PR_PushIOLayer, C.c_int, [P, C.c_int, P]),
        (nss.NSS_NoDB_Init, C.c_int, [C.c_char_p]),
        (ssl.NSS_SetDomesticPolicy, C.c_int, []),
        (ssl.SSL_ImportFD, P, [P, P]),
        (ssl.SSL_OptionSet, C.c_int, [P, C.c_int, C.c_int]),
        (ssl.SSL_SetURL, C.c_int, [P, C.c_char_p]),
        (ssl.SSL_AuthCertificateHook, C.c_int, [P, P, P]),
        (ssl.SSL_ResetHandshake, C.c_int, [P, C.c_int]),
        (ssl.SSL_ForceHandshake, C.c_int, [P])):
    fn.restype, fn.argtypes = res, args

AUTH_HOOK = C.CFUNCTYPE(C.c_int, P, P, C.c_int, C.c_int)
_accept_any = AUTH_HOOK(lambda arg, fd, check_sig, is_server: 0)   # SECSuccess: a test certificate


class PRIOVec(C.Structure):
    _fields_ = [("iov_base", C.c_char_p), ("iov_len", C.c_int)]


def check(ok: bool, what: str) -> None:
    if not ok:
        sys.exit(f"nss_ctypes_peer: {what} failed")


def write_all(fn, data: bytes) -> None:
    while data:
        n = fn(data)
        check(n > 0, "write")
        data = data[n:]


def text(n: int) -> bytes:
    """n bytes of hex digits ending in a newline: gnutls-serv --echo answers line by line."""
    return os.urandom(n).hex()[:n - 1].encode() + b"\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("port", type=int)
    ap.add_argument("--layer", action="store_true")
    ap.add_argument("--plain-port", type=int)
    ap.add_argument("--file")
    a = ap.parse_args()

    check(nss.NSS_NoDB_Init(None) == 0, "NSS_NoDB_Init")
    check(ssl.NSS_SetDomesticPolicy() == 0, "NSS_SetDomesticPolicy")
    sock = socket.create_connection(("127.0.0.1", a.port))
    local, remote = sock.getsockname()[:2], sock.getpeername()[:2]
    tcp = nspr.PR_ImportTCPSocket(sock.detach())
    fd = ssl.SSL_ImportFD(None, tcp)
    check(bool(fd), "SSL_ImportFD")
    check(ssl.SSL_OptionSet(fd, SSL_SECURITY, 1) == 0 and ssl.SSL_OptionSet(fd, SSL_HANDSHAKE_AS_CLIENT, 1) == 0,
          "SSL_OptionSet")
    check(ssl.SSL_SetURL(fd, b"localhost") == 0, "SSL_SetURL")
    check(ssl.SSL_AuthCertificateHook(fd, C.cast(_accept_any, P), None) == 0, "SSL_AuthCertificateHook")
    check(ssl.SSL_ResetHandshake(fd, 0) == 0, "SSL_ResetHandshake")
    if a.layer:
        # a pass-through layer on top: its methods forward to fd->lower (the SSL layer);
        # PR_PushIOLayer swaps contents, so `fd` stays the pointer the application holds
        stub = nspr.PR_CreateIOLayerStub(nspr.PR_GetUniqueIdentity(b"tlstap-test"), nspr.PR_GetDefaultIOMethods())
        check(bool(stub) and nspr.PR_PushIOLayer(fd, PR_TOP_IO_LAYER, stub) == 0, "PR_PushIOLayer")
    check(ssl.SSL_ForceHandshake(fd) == 0, "SSL_ForceHandshake")

    plain = bytearray()
    if a.plain_port:
        ps = socket.create_connection(("127.0.0.1", a.plain_port))
        pfd = nspr.PR_ImportTCPSocket(ps.detach())
        msg = b"plain NSPR socket, not TLS\n"
        write_all(lambda d: nspr.PR_Write(pfd, d, len(d)), msg)
        plain += msg
        nspr.PR_Close(pfd)
    if a.file:
        ffd = nspr.PR_Open(a.file.encode(), PR_WRONLY | PR_CREATE_FILE, 0o600)
        check(bool(ffd), "PR_Open")
        msg = b"an NSPR file\n"
        write_all(lambda d: nspr.PR_Write(ffd, d, len(d)), msg)
        plain += msg
        nspr.PR_Close(ffd)

    sent = bytearray()
    first = text(3000)
    write_all(lambda d: nspr.PR_Write(fd, d, len(d)), first)
    sent += first
    second = text(5000)
    write_all(lambda d: nspr.PR_Send(fd, d, len(d), 0, PR_INTERVAL_NO_TIMEOUT), second)
    sent += second
    vecs = [text(n) for n in (7, 40_000, 1, 70_000, 300)]
    iov = (PRIOVec * len(vecs))(*[PRIOVec(v, len(v)) for v in vecs])
    n = nspr.PR_Writev(fd, C.cast(iov, P), len(vecs), PR_INTERVAL_NO_TIMEOUT)
    check(n == sum(map(len, vecs)), f"PR_Writev ({n})")
    sent += b"".join(vecs)

    got = bytearray()
    buf = C.create_string_buffer(1 << 16)
    use_recv = False
    while len(got) < len(sent):
        # small reads: most are served from the record NSS already decrypted (no syscall)
        want = min(997, len(sent) - len(got))
        n = (nspr.PR_Recv(fd, buf, want, 0, PR_INTERVAL_NO_TIMEOUT) if use_recv
             else nspr.PR_Read(fd, buf, want))
        check(n > 0, "read")
        got += buf.raw[:n]
        use_recv = not use_recv
    nspr.PR_Close(fd)
    json.dump({"pid": os.getpid(), "local": list(local), "remote": list(remote),
               "sent": base64.b64encode(bytes(sent)).decode(), "received": base64.b64encode(bytes(got)).decode(),
               "plain": base64.b64encode(bytes(plain)).decode()}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
