#!/usr/bin/env python3
"""TLS client that drives an arbitrary libssl .so through ctypes; run by tests/peers/ctypes_ssl.py.

usage: python ctypes_ssl_peer.py CONFIG_JSON
  libssl (path), host, port, payload_dir, npayloads, expect_len, timeout, out, keylog (path),
  min_version / max_version ("1.2"/"1.3"), ciphersuites (TLS 1.3), cipher_list (TLS <= 1.2),
  groups, key_updates (request indices before which SSL_key_update is called),
  key_update_type ("requested"/"not_requested"), sni

Same wire protocol as pyssl_peer.py (8-byte big-endian length + body per request; the server
echoes or sends a fixed-size response), one connection, requests in order.

Loads ONLY the given libssl (and the libcrypto it links): this script never imports ssl or
hashlib, so the interpreter's own _ssl/_hashlib (system OpenSSL) are not mapped here; the
output lists every mapped libssl/libcrypto so a test can check that.

Prints READY once the library is loaded and the SSL_CTX is configured, then waits for a line
on stdin (a tracer can attach to this pid first), connects, and writes a JSON result to `out`.
The key log oracle is SSL_CTX_set_keylog_callback: every line the library hands out is kept
(and appended + flushed to `keylog`). SSL_CTX_set_msg_callback records handshake messages.
"""
import base64
import ctypes
import json
import os
import socket
import struct
import sys
import threading

HDR = struct.Struct(">Q")
SSL_CTRL_SET_TLSEXT_HOSTNAME = 55
SSL_CTRL_SET_GROUPS_LIST = 92
SSL_CTRL_SET_MIN_PROTO_VERSION = 123
SSL_CTRL_SET_MAX_PROTO_VERSION = 124
TLSEXT_NAMETYPE_host_name = 0
VERSIONS = {"1.2": 0x0303, "1.3": 0x0304}
KEY_UPDATE = {"not_requested": 0, "requested": 1}
SSL_VERIFY_NONE = 0
HANDSHAKE = 22
HS_NAMES = {1: "ClientHello", 2: "ServerHello", 4: "NewSessionTicket", 5: "EndOfEarlyData",
            8: "EncryptedExtensions", 11: "Certificate", 12: "ServerKeyExchange",
            13: "CertificateRequest", 14: "ServerHelloDone", 15: "CertificateVerify",
            16: "ClientKeyExchange", 20: "Finished", 24: "KeyUpdate"}
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")

KEYLOG_CB = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_char_p)
MSG_CB = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                          ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p)


class SSLError(Exception):
    pass


def bind(lib):
    """argtypes/restype for what we call (dlsym on the libssl handle also finds its libcrypto)."""
    P, I, L, S = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_size_t
    sigs = {
        "OpenSSL_version": ([I], ctypes.c_char_p),
        "ERR_get_error": ([], ctypes.c_ulong),
        "ERR_error_string_n": ([ctypes.c_ulong, ctypes.c_char_p, S], None),
        "TLS_client_method": ([], P),
        "SSL_CTX_new": ([P], P),
        "SSL_CTX_free": ([P], None),
        "SSL_CTX_ctrl": ([P, I, L, P], L),
        "SSL_CTX_set_verify": ([P, I, P], None),
        "SSL_CTX_set_ciphersuites": ([P, ctypes.c_char_p], I),
        "SSL_CTX_set_cipher_list": ([P, ctypes.c_char_p], I),
        "SSL_CTX_set_keylog_callback": ([P, KEYLOG_CB], None),
        "SSL_CTX_set_msg_callback": ([P, MSG_CB], None),
        "SSL_new": ([P], P),
        "SSL_free": ([P], None),
        "SSL_ctrl": ([P, I, L, P], L),
        "SSL_set_fd": ([P, I], I),
        "SSL_connect": ([P], I),
        "SSL_get_error": ([P, I], I),
        "SSL_write_ex": ([P, ctypes.c_char_p, S, ctypes.POINTER(S)], I),
        "SSL_read_ex": ([P, ctypes.c_char_p, S, ctypes.POINTER(S)], I),
        "SSL_key_update": ([P, I], I),
        "SSL_shutdown": ([P], I),
        "SSL_get_version": ([P], ctypes.c_char_p),
        "SSL_get_current_cipher": ([P], P),
        "SSL_CIPHER_get_name": ([P], ctypes.c_char_p),
        "SSL_session_reused": ([P], I),
    }
    for name, (args, res) in sigs.items():
        f = getattr(lib, name)
        f.argtypes, f.restype = args, res
    return lib


def mapped_openssl():
    """Paths of every mapped libssl*/libcrypto* file in this process."""
    out = set()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            path = parts[5].strip() if len(parts) == 6 else ""
            name = os.path.basename(path)
            if name.startswith(("libssl", "libcrypto")):
                out.add(path)
    return sorted(out)


def main():
    cfg = json.loads(sys.argv[1])
    lib = bind(ctypes.CDLL(cfg["libssl"]))
    payloads = [open(os.path.join(cfg["payload_dir"], f"{i}.bin"), "rb").read()
                for i in range(cfg["npayloads"])]

    def err_text(what, ssl=None, ret=None):
        parts = [what]
        if ssl is not None and ret is not None:
            parts.append(f"SSL_get_error={lib.SSL_get_error(ssl, ret)}")
        buf = ctypes.create_string_buffer(256)
        while True:
            e = lib.ERR_get_error()
            if not e:
                break
            lib.ERR_error_string_n(e, buf, len(buf))
            parts.append(buf.value.decode(errors="replace"))
        return "; ".join(parts)

    keylog_lines = []
    keylog_file = open(cfg["keylog"], "a") if cfg.get("keylog") else None
    messages = []

    @KEYLOG_CB
    def on_keylog(ssl, line):
        text = line.decode()
        keylog_lines.append(text)
        if keylog_file:
            keylog_file.write(text + "\n")
            keylog_file.flush()

    @MSG_CB
    def on_msg(write_p, version, content_type, buf, length, ssl, arg):
        if content_type != HANDSHAKE or not length:
            return
        data = ctypes.string_at(buf, length)
        name = HS_NAMES.get(data[0], str(data[0]))
        if data[0] == 2 and data[6:38] == HRR_RANDOM:
            name = "HelloRetryRequest"
        messages.append(["sent" if write_p else "received", name])

    ctx = lib.SSL_CTX_new(lib.TLS_client_method())
    if not ctx:
        raise SSLError(err_text("SSL_CTX_new"))
    lib.SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, None)
    lib.SSL_CTX_set_keylog_callback(ctx, on_keylog)
    lib.SSL_CTX_set_msg_callback(ctx, on_msg)
    for key, ctrl in (("min_version", SSL_CTRL_SET_MIN_PROTO_VERSION),
                      ("max_version", SSL_CTRL_SET_MAX_PROTO_VERSION)):
        if cfg.get(key) and lib.SSL_CTX_ctrl(ctx, ctrl, VERSIONS[cfg[key]], None) != 1:
            raise SSLError(err_text(f"set {key}"))
    if cfg.get("ciphersuites") and lib.SSL_CTX_set_ciphersuites(ctx, cfg["ciphersuites"].encode()) != 1:
        raise SSLError(err_text("SSL_CTX_set_ciphersuites"))
    if cfg.get("cipher_list") and lib.SSL_CTX_set_cipher_list(ctx, cfg["cipher_list"].encode()) != 1:
        raise SSLError(err_text("SSL_CTX_set_cipher_list"))
    if cfg.get("groups"):
        groups = ctypes.c_char_p(cfg["groups"].encode())
        if lib.SSL_CTX_ctrl(ctx, SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.cast(groups, ctypes.c_void_p)) != 1:
            raise SSLError(err_text("set groups"))

    print("READY", flush=True)
    if not sys.stdin.readline():  # EOF without "go": the test gave up
        sys.exit(3)

    result = {"pid": os.getpid(), "tid": threading.get_native_id(), "local": None, "remote": None,
              "sent": b"", "received": b"", "error": None, "keylog": keylog_lines, "messages": messages,
              "version": None, "cipher": None, "session_reused": None, "key_updates_called": 0,
              "openssl_version": lib.OpenSSL_version(0).decode(), "libssl": cfg["libssl"]}
    sent, received = bytearray(), bytearray()
    ssl = None
    sock = None
    try:
        sock = socket.create_connection((cfg["host"], cfg["port"]), timeout=cfg["timeout"])
        sock.settimeout(None)  # libssl needs a blocking fd; SO_*TIMEO bound each syscall instead
        tv = struct.pack("ll", int(cfg["timeout"]), int((cfg["timeout"] % 1) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        result["local"], result["remote"] = list(sock.getsockname()[:2]), list(sock.getpeername()[:2])
        ssl = lib.SSL_new(ctx)
        if not ssl or lib.SSL_set_fd(ssl, sock.fileno()) != 1:
            raise SSLError(err_text("SSL_new/SSL_set_fd"))
        if cfg.get("sni"):
            name = ctypes.c_char_p(cfg["sni"].encode())
            lib.SSL_ctrl(ssl, SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name,
                         ctypes.cast(name, ctypes.c_void_p))
        r = lib.SSL_connect(ssl)
        if r != 1:
            raise SSLError(err_text("SSL_connect", ssl, r))
        result["version"] = lib.SSL_get_version(ssl).decode()
        result["cipher"] = lib.SSL_CIPHER_get_name(lib.SSL_get_current_cipher(ssl)).decode()
        result["session_reused"] = bool(lib.SSL_session_reused(ssl))
        n = ctypes.c_size_t()
        buf = ctypes.create_string_buffer(1 << 16)
        for i, p in enumerate(payloads):
            if i in cfg.get("key_updates", []):
                if lib.SSL_key_update(ssl, KEY_UPDATE[cfg.get("key_update_type", "requested")]) != 1:
                    raise SSLError(err_text("SSL_key_update"))
                result["key_updates_called"] += 1
            msg = HDR.pack(len(p)) + p
            off = 0
            while off < len(msg):       # the KeyUpdate (if scheduled) goes out with this write
                chunk = msg[off:off + (1 << 20)]
                r = lib.SSL_write_ex(ssl, chunk, len(chunk), ctypes.byref(n))
                if r != 1:
                    raise SSLError(err_text(f"SSL_write_ex request {i}", ssl, r))
                sent.extend(chunk[:n.value])
                off += n.value
            want = cfg["expect_len"] if cfg.get("expect_len") is not None else len(p)
            got = 0
            while got < want:
                r = lib.SSL_read_ex(ssl, buf, min(len(buf), want - got), ctypes.byref(n))
                if r != 1:
                    raise SSLError(err_text(f"SSL_read_ex request {i} after {got}/{want} bytes", ssl, r))
                received.extend(buf.raw[:n.value])
                got += n.value
        lib.SSL_shutdown(ssl)           # close_notify (we do not wait for the server's)
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    finally:
        if ssl:
            lib.SSL_free(ssl)
        if sock is not None:
            sock.close()
        lib.SSL_CTX_free(ctx)
        if keylog_file:
            keylog_file.close()
    result["sent"] = base64.b64encode(bytes(sent)).decode()
    result["received"] = base64.b64encode(bytes(received)).decode()
    result["mapped"] = mapped_openssl()
    result["modules"] = sorted(m for m in ("ssl", "_ssl", "_hashlib") if m in sys.modules)
    tmp = cfg["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, cfg["out"])
    sys.exit(1 if result["error"] else 0)


if __name__ == "__main__":
    main()
