"""A Python `ssl` TLS peer (server or client) run as its own process.

Framing: each request is an 8-byte big-endian length plus body; the server
answers with --respond-bytes of deterministic data (or echoes the body).
Each endpoint records exactly what it sent and received per connection, with
getsockname/getpeername, and writes that transcript as JSON when done: the
oracle the capture tests compare against byte for byte.
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


def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def addresses(s):
    """Taken while connected: after the peer's close getpeername() fails."""
    return list(s.getsockname()[:2]), list(s.getpeername()[:2])


def transcript(addrs, sent, received):
    return {"pid": os.getpid(), "tid": threading.get_native_id(), "local": addrs[0], "remote": addrs[1],
            "sent": base64.b64encode(sent).decode(), "received": base64.b64encode(received).decode()}


def response_for(body, size):
    if size is None:
        return body
    seed = body[:16]
    return (seed * (size // max(1, len(seed)) + 1))[:size] if seed else bytes(size)


def serve(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(args.cert, args.key)
    fam = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    ls = socket.socket(fam)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((args.host, 0))
    ls.listen(128)
    print(ls.getsockname()[1], flush=True)
    results, lock = [], threading.Lock()

    def handle(raw):
        addrs = addresses(raw)
        s = ctx.wrap_socket(raw, server_side=True)
        sent, received = bytearray(), bytearray()
        try:
            while True:
                hdr = recv_exact(s, 8)
                body = recv_exact(s, struct.unpack(">Q", hdr)[0])
                received += hdr + body
                resp = response_for(body, args.respond_bytes)
                s.sendall(resp)
                sent += resp
        except (EOFError, ConnectionError, ssl.SSLError):
            pass
        with lock:
            results.append(transcript(addrs, bytes(sent), bytes(received)))
        s.close()

    ls.settimeout(0.2)
    threads = []
    while not os.path.exists(args.stop_file):
        try:
            raw, _ = ls.accept()
        except socket.timeout:
            continue
        t = threading.Thread(target=handle, args=(raw,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join(10)
    with open(args.out, "w") as f:
        json.dump(results, f)


def client(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with open(args.payloads, "rb") as f:
        payloads = [base64.b64decode(p) for p in json.load(f)]
    print("ready", flush=True)
    sys.stdin.readline()  # "go": lets a test start a capture scoped to this pid first
    results, lock = [None] * args.conns, threading.Lock()

    def run(i):
        s = ctx.wrap_socket(socket.create_connection((args.host, args.port), timeout=60))
        sent, received = bytearray(), bytearray()
        for _ in range(args.requests):
            body = payloads[i % len(payloads)]
            req = struct.pack(">Q", len(body)) + body
            s.sendall(req)
            sent += req
            want = len(body) if args.respond_bytes is None else args.respond_bytes
            received += recv_exact(s, want)
        t = transcript(addresses(s), bytes(sent), bytes(received))
        s.close()
        with lock:
            results[i] = t

    per_thread = [list(range(k, args.conns, args.threads)) for k in range(args.threads)]
    threads = [threading.Thread(target=lambda ids=ids: [run(i) for i in ids]) for ids in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    with open(args.out, "w") as f:
        json.dump(results, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("server", "client"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    ap.add_argument("--out", required=True)
    ap.add_argument("--stop-file")
    ap.add_argument("--payloads")
    ap.add_argument("--conns", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=1)
    ap.add_argument("--respond-bytes", type=int)
    args = ap.parse_args()
    serve(args) if args.mode == "server" else client(args)


if __name__ == "__main__":
    main()
