#!/usr/bin/env python3
"""Python-ssl TLS peer, run as its own process by tests/peers/pyssl.py.

Wire protocol: request = 8-byte big-endian length + body; server answers with --response
(or echoes the body) and serves further requests on the same connection until EOF.
All plaintext goes through SSLSocket.recv / sendall (SSL_read_ex / SSL_write_ex on OpenSSL 3).

server: prints "PORT <n>", serves (one thread per connection) until stdin reaches EOF,
        then writes the transcripts to --out.
client: prints "READY" once libssl is loaded and everything is prepared, waits for a line on
        stdin (so a tracer can attach to this pid first), then runs the connections and writes
        the transcripts to --out. Exit status 1 if any connection failed.

Options for key log tests: --keylog FILE (SSLContext.keylog_filename: OpenSSL's keylog callback,
Python writes the lines), --ciphers (TLS <= 1.2 cipher list), --resume (client: connections after
the first reuse the session of the previous one), --ecdh-curve (server: the only group it accepts,
e.g. prime256v1, which forces a HelloRetryRequest on a client whose first key share is X25519),
--messages (record handshake messages with the private SSLContext._msg_callback). Each
transcript entry carries an "info" dict: version, cipher, session_reused, messages.
"""
import argparse
import base64
import json
import os
import socket
import ssl
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HDR = struct.Struct(">Q")
VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class Conn:
    """Records the plaintext of one connection as this endpoint saw it."""

    def __init__(self, raw: socket.socket):
        self.local = raw.getsockname()[:2]   # v6 names are 4-tuples; keep (ip, port)
        self.remote = raw.getpeername()[:2]
        self.tid = threading.get_native_id()
        self.sent = bytearray()
        self.received = bytearray()
        self.error = None
        self.s = None                        # the SSLSocket once wrapped
        self.messages = []                   # [direction, handshake type] (with --messages)
        self.final_info = None               # info() taken just before close

    def send(self, data: bytes):
        self.s.sendall(data)
        self.sent += data

    def recv_exact(self, n: int, eof_ok: bool = False):
        """n bytes, or None on a clean EOF before the first byte (if eof_ok)."""
        got = bytearray()
        while len(got) < n:
            chunk = self.s.recv(min(n - len(got), 1 << 16))
            if not chunk:
                if eof_ok and not got:
                    return None
                raise EOFError(f"EOF after {len(got)} of {n} bytes")
            self.received += chunk
            got += chunk
        return bytes(got)

    def info(self):
        s = self.s
        ok = s is not None and s._sslobj is not None   # not yet closed
        return {"version": ok and s.version() or None, "cipher": ok and (s.cipher() or [None])[0] or None,
                "session_reused": ok and s.session_reused, "messages": self.messages}

    def close(self, raw):
        self.final_info = self.info()
        (self.s or raw).close()

    def to_json(self):
        return {"pid": os.getpid(), "tid": self.tid, "local": list(self.local), "remote": list(self.remote),
                "sent": base64.b64encode(bytes(self.sent)).decode(),
                "received": base64.b64encode(bytes(self.received)).decode(), "error": self.error,
                "info": self.final_info or self.info()}


def dump(path, conns):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump([c.to_json() for c in conns], f)
    os.replace(tmp, path)  # the wrapper never sees a half-written file


def context(server: bool, a):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    if server:
        ctx.load_cert_chain(a.cert, a.key)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if a.tls_version:
        ctx.minimum_version = ctx.maximum_version = VERSIONS[a.tls_version]
    if a.ciphers:
        ctx.set_ciphers(a.ciphers)
    if a.ecdh_curve:
        ctx.set_ecdh_curve(a.ecdh_curve)   # OpenSSL 3: the group list becomes just this curve
    if a.keylog:
        ctx.keylog_filename = a.keylog
    return ctx


def record_messages(ctx, conns_by_sslobj):
    """Handshake messages per connection, via the private SSLContext._msg_callback hook."""
    def cb(conn, direction, version, content_type, msg_type, data):
        if content_type == ssl._TLSContentType.HANDSHAKE:
            c = conns_by_sslobj.get(id(conn))
            if c is not None:
                name = msg_type.name if hasattr(msg_type, "name") else str(msg_type)
                c.messages.append([direction, name])
    ctx._msg_callback = cb


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def run_server(a):
    ctx = context(True, a)
    response = open(a.response, "rb").read() if a.response else None
    conns, threads, lock = [], [], threading.Lock()
    by_obj = {}
    if a.messages:
        record_messages(ctx, by_obj)

    def handle(raw):
        try:
            c = Conn(raw)
        except OSError:              # peer already gone: nothing to record
            raw.close()
            return
        with lock:
            conns.append(c)
        try:
            raw.settimeout(a.timeout)  # a stuck peer must not keep this thread forever
            c.s = ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            by_obj[id(c.s)] = c
            c.s.do_handshake()
            while True:
                hdr = c.recv_exact(HDR.size, eof_ok=True)
                if hdr is None:
                    break
                body = c.recv_exact(HDR.unpack(hdr)[0])
                c.send(response if response is not None else body)
        except Exception as e:
            c.error = f"{type(e).__name__}: {e}"
        finally:
            c.close(raw)

    ls = socket.socket(family(a.host))
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((a.host, 0))
    ls.listen(256)
    ls.settimeout(0.1)  # accept loop polls `stop` instead of blocking forever
    stop = threading.Event()

    def accept_loop():
        while not stop.is_set():
            try:
                raw, _ = ls.accept()
            except (socket.timeout, BlockingIOError):
                continue
            raw.settimeout(None)
            t = threading.Thread(target=handle, args=(raw,), daemon=True)
            t.start()
            threads.append(t)

    acc = threading.Thread(target=accept_loop, daemon=True)
    acc.start()
    print(f"PORT {ls.getsockname()[1]}", flush=True)
    sys.stdin.buffer.read()  # EOF = stop (also when the test process dies)
    stop.set()
    acc.join(5)
    ls.close()
    deadline = time.monotonic() + a.grace
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    with lock:
        for c in conns:
            if c.error is None and any(t.is_alive() and t.native_id == c.tid for t in threads):
                c.error = "connection still open at server shutdown"
        dump(a.out, conns)


def run_client(a):
    ctx = context(False, a)
    by_obj = {}
    if a.messages:
        record_messages(ctx, by_obj)
    payloads = [open(os.path.join(a.payload_dir, f"{i}.bin"), "rb").read() for i in range(a.npayloads)]
    print("READY", flush=True)
    if not sys.stdin.readline():  # EOF without "go": the test gave up
        sys.exit(3)
    last_session = [None]

    def one(i):
        p = payloads[i % len(payloads)]
        raw = socket.create_connection((a.host, a.port), timeout=a.timeout)
        c = Conn(raw)
        try:
            c.s = ctx.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False,
                                  session=last_session[0] if a.resume else None)
            by_obj[id(c.s)] = c
            c.s.do_handshake()
            for _ in range(a.requests):   # keep-alive: several exchanges on one connection
                c.send(HDR.pack(len(p)) + p)
                c.recv_exact(a.expect_len if a.expect_len is not None else len(p))
            # TLS 1.3 tickets arrive after the handshake: read by now (the response came after them)
            last_session[0] = c.s.session
        except Exception as e:
            c.error = f"{type(e).__name__}: {e}"
        finally:
            c.close(raw)
        return c

    if a.resume:   # each connection needs the previous one's session: strictly sequential
        conns = [one(i) for i in range(a.conns)]
    else:
        with ThreadPoolExecutor(max_workers=a.threads) as ex:
            conns = list(ex.map(one, range(a.conns)))
    dump(a.out, conns)
    sys.exit(1 if any(c.error for c in conns) else 0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["server", "client"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--response")
    ap.add_argument("--tls-version", choices=sorted(VERSIONS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--timeout", type=float, default=30)
    ap.add_argument("--grace", type=float, default=5)
    ap.add_argument("--payload-dir")
    ap.add_argument("--npayloads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=1, help="requests per connection")
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--expect-len", type=int)
    ap.add_argument("--keylog", help="SSLContext.keylog_filename")
    ap.add_argument("--ciphers", help="SSLContext.set_ciphers (TLS <= 1.2)")
    ap.add_argument("--ecdh-curve", help="SSLContext.set_ecdh_curve (server: the one accepted group)")
    ap.add_argument("--resume", action="store_true", help="client: reuse the previous connection's session")
    ap.add_argument("--messages", action="store_true", help="record handshake messages")
    a = ap.parse_args()
    (run_server if a.mode == "server" else run_client)(a)


if __name__ == "__main__":
    main()
