"""Packet capture on loopback (tshark) and decryption of the capture with a key log file.

PacketCapture: `tshark -i lo -f "<port filter>" -w FILE` as a context manager. "Capturing"
is proven, not assumed: tshark also prints (-P -l) the UDP payload of every captured packet,
and we send UDP canaries to a port we hold ourselves (included in the filter) until one shows
up; at stop a last canary must show up too, so every packet before it has been written (libpcap
hands packets over in blocks, and a capture stopped right after the traffic loses the last
block). Then tshark gets SIGINT and finishes the file. The canaries stay in the file as a few
UDP packets to that port; they never touch the TLS streams.

Decryption helpers run `tshark -r` (never live): tshark_fields (any fields / display filter),
tshark_http_uris (what tshark decrypted: HTTP/1 request URIs and HTTP/2 :path values) and
tshark_tls_streams (the decrypted bytes of every TLS stream, both directions, via
`-z follow,tls,raw`). keylog=None means no key file: nothing inside TLS is visible then.
"""
from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ._common import Addr, stop_process, tail

TSHARK = shutil.which("tshark") or "/usr/bin/tshark"


def have_tshark() -> bool:
    return shutil.which("tshark") is not None


class PacketCapture:
    """Capture TCP traffic of `ports` on `iface` (default lo) into `path` (pcapng).

        with PacketCapture(tmp_path / "c.pcapng", [srv.port]) as cap:
            ... traffic ...
        tshark_http_uris(cap.path, keylog_file)

    start_timeout bounds the wait for the first canary; stop_timeout the wait for the last
    canary and for tshark to exit."""

    def __init__(self, path, ports, iface: str = "lo", start_timeout: float = 20, stop_timeout: float = 20):
        self.path = Path(path)
        self.ports = [ports] if isinstance(ports, int) else list(ports)
        if not self.ports:
            raise ValueError("need at least one port")
        self.iface, self.start_timeout, self.stop_timeout = iface, start_timeout, stop_timeout
        self.proc = None
        self._canary_sock = None
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        self._reader = None
        self.packets = 0        # packets tshark reported (including canaries)

    @property
    def bpf_filter(self) -> str:
        tcp = " or ".join(f"tcp port {p}" for p in self.ports)
        return f"({tcp}) or (udp dst port {self.canary_port})"

    def __enter__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="tshark-")
        self._err = Path(self._tmp.name) / "stderr"
        # a UDP port we own: canaries go there (no ICMP unreachable, nobody else uses it)
        self._canary_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._canary_sock.bind(("127.0.0.1", 0))
        self._canary_sock.setblocking(False)
        self.canary_port = self._canary_sock.getsockname()[1]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # -B 64: a 64 MiB kernel buffer (dumpcap's default is 2 MiB): on a loaded 2-CPU host the
        # default dropped a 28 KiB loopback segment of a 200 KB HTTP/2 body once
        argv = [TSHARK, "-n", "-i", self.iface, "-B", "64", "-f", self.bpf_filter, "-w", str(self.path),
                "-P", "-l", "-T", "fields", "-e", "udp.payload"]
        with open(self._err, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()
        try:
            self._await_canary("start", self.start_timeout, repeat=True)
        except BaseException:
            self._kill()
            raise
        return self

    def _read_stdout(self):
        # one line per captured packet: the UDP payload in hex (empty for TCP)
        for line in self.proc.stdout:
            v = line.strip().decode(errors="replace")
            with self._lock:
                self.packets += 1
                if v:
                    self._seen.add(v)

    def _send_canary(self, token: bytes):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(token, ("127.0.0.1", self.canary_port))
        try:
            while True:                # drain what we hold so the socket buffer never fills
                self._canary_sock.recv(2048)
        except BlockingIOError:
            pass

    def _await_canary(self, what: str, timeout: float, repeat: bool):
        """Send canaries (once, or every 0.1 s if repeat) until tshark reports one of them."""
        tokens: list[str] = []
        deadline = time.monotonic() + timeout
        next_send = 0.0
        while True:
            now = time.monotonic()
            if now >= next_send and (repeat or not tokens):
                tok = f"tlstap-{what}-{uuid.uuid4().hex}".encode()
                tokens.append(tok.hex())
                self._send_canary(tok)
                next_send = now + 0.1
            with self._lock:
                if any(t in self._seen for t in tokens):
                    return
            if self.proc.poll() is not None:
                raise RuntimeError(f"tshark exited rc={self.proc.returncode}\n{tail(self._err)}")
            if now >= deadline:
                raise TimeoutError(f"tshark did not capture the {what} canary within {timeout}s\n{tail(self._err)}")
            time.sleep(0.02)

    def stop(self):
        """Wait for the stop canary (everything before it is captured), then SIGINT tshark."""
        if self.proc is None:
            return
        try:
            self._await_canary("stop", self.stop_timeout, repeat=False)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                pass
        finally:
            self._kill()

    def _kill(self):
        if self.proc is not None:
            stop_process(self.proc, timeout=5)
            if self._reader is not None:
                self._reader.join(5)
            self.proc.stdout.close()
            self.proc = None
        if self._canary_sock is not None:
            self._canary_sock.close()
            self._canary_sock = None

    def __exit__(self, *exc):
        try:
            self.stop()
        finally:
            self._tmp.cleanup()

    def stderr(self) -> str:
        return tail(self._err, 10000)


# ---------------------------------------------------------------- reading a capture

def _tshark_read(pcap, args: list[str], keylog=None, decode_as=(), timeout: float = 120) -> str:
    argv = [TSHARK, "-n", "-r", str(pcap)]
    # an explicit empty key file path, so a user preference file cannot supply keys either
    argv += ["-o", f"tls.keylog_file:{keylog if keylog is not None else ''}"]
    for d in decode_as:
        argv += ["-d", d]
    p = subprocess.run(argv + args, capture_output=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"tshark rc={p.returncode}: {p.stderr.decode(errors='replace')[-2000:]}")
    return p.stdout.decode(errors="replace")


def _decode_as(tls_ports) -> list[str]:
    return [f"tcp.port=={p},tls" for p in (tls_ports or ())]


def tshark_fields(pcap, fields: list[str], display_filter: str | None = None, keylog=None,
                  tls_ports=(), timeout: float = 120) -> list[list[str]]:
    """Rows of `-T fields -e F...` (tab separated; multiple occurrences joined by ',').
    tls_ports: TCP ports to dissect as TLS whatever tshark's heuristics say."""
    args = ["-T", "fields"]
    for f in fields:
        args += ["-e", f]
    if display_filter:
        args += ["-Y", display_filter]
    out = _tshark_read(pcap, args, keylog, _decode_as(tls_ports), timeout)
    return [line.split("\t") for line in out.splitlines() if line.strip()]


def tshark_http_uris(pcap, keylog=None, tls_ports=()) -> list[str]:
    """Request URIs tshark could see in the capture: HTTP/1.x http.request.uri and HTTP/2
    :path headers, in packet order. Over TLS that needs the right key log file."""
    rows = tshark_fields(pcap, ["http.request.uri", "http2.headers.path"],
                         "http.request or http2.headers.path", keylog, tls_ports)
    out = []
    for row in rows:
        for cell in row:
            out += [v for v in cell.split(",") if v]
    return out


@dataclass
class TLSStream:
    """The decrypted application data of one TCP stream as tshark reassembled it."""
    stream: int                 # tcp.stream index
    client: Addr                # sender of the SYN
    server: Addr
    client_data: bytes          # application data client -> server
    server_data: bytes          # application data server -> client

    def sent_by(self, addr: Addr) -> bytes:
        """Data sent by the endpoint `addr` (e.g. a Transcript's local address)."""
        addr = tuple(addr)
        if addr == self.client:
            return self.client_data
        if addr == self.server:
            return self.server_data
        raise KeyError(f"{addr} is not an endpoint of stream {self.stream} ({self.client} <-> {self.server})")

    def received_by(self, addr: Addr) -> bytes:
        """Data sent to the endpoint `addr`."""
        addr = tuple(addr)
        if addr == self.client:
            return self.server_data
        if addr == self.server:
            return self.client_data
        raise KeyError(f"{addr} is not an endpoint of stream {self.stream} ({self.client} <-> {self.server})")


def _parse_addr(text: str) -> Addr:
    host, _, port = text.strip().rpartition(":")
    return host.strip("[]"), int(port or 0)


def _stream_endpoints(pcap, tls_ports, timeout) -> dict[int, tuple[Addr, Addr]]:
    """{stream: (client, server)}: the SYN's source is the client (else the first packet's)."""
    rows = tshark_fields(pcap, ["tcp.stream", "ip.src", "ipv6.src", "tcp.srcport", "ip.dst", "ipv6.dst",
                                "tcp.dstport", "tcp.flags.syn", "tcp.flags.ack"], "tcp", None, tls_ports, timeout)
    first: dict[int, tuple[Addr, Addr]] = {}
    syn: dict[int, tuple[Addr, Addr]] = {}
    for r in rows:
        r += [""] * (9 - len(r))
        n = int(r[0])
        ends = (r[1] or r[2], int(r[3])), (r[4] or r[5], int(r[6]))
        first.setdefault(n, ends)
        if r[7] in ("1", "True") and r[8] in ("0", "False"):
            syn.setdefault(n, ends)
    return {n: syn.get(n, first[n]) for n in first}


def tshark_tls_streams(pcap, keylog=None, tls_ports=(), timeout: float = 120) -> list[TLSStream]:
    """Decrypted data of every TCP stream in the capture (`-z follow,tls,raw,N`), in stream
    order. Without the right keys both directions come back empty."""
    ends = _stream_endpoints(pcap, tls_ports, timeout)
    if not ends:
        return []
    args = ["-q"]
    for n in sorted(ends):
        args += ["-z", f"follow,tls,raw,{n}"]
    out = _tshark_read(pcap, args, keylog, _decode_as(tls_ports), timeout)
    result = []
    for block in re.split(r"^=+$", out, flags=re.M):
        lines = block.splitlines()
        head = {ln.partition(":")[0]: ln.partition(":")[2].strip() for ln in lines if ": " in ln}
        if "Filter" not in head:
            continue
        n = int(head["Filter"].rpartition(" ")[2])
        # follow output: chunks sent by "Node 0" unindented, the other end's with a leading tab
        node0 = _parse_addr(head.get("Node 0", ":0"))
        a, b = bytearray(), bytearray()
        for ln in lines:
            data = ln.strip()
            if not data or ": " in ln or not all(c in "0123456789abcdef" for c in data):
                continue
            (b if ln.startswith("\t") else a).extend(bytes.fromhex(data))
        client, server = ends[n]
        if node0 == server:
            a, b = b, a
        elif node0 != client and (a or b):     # no data: tshark names no node 0
            raise RuntimeError(f"tshark follow stream {n}: node 0 {node0} is neither {client} nor {server}")
        result.append(TLSStream(n, client, server, bytes(a), bytes(b)))
    return sorted(result, key=lambda s: s.stream)


def write_keylog(path, lines) -> Path:
    """Write key log lines (e.g. a peer's keylog()) to a file tshark can read."""
    p = Path(path)
    p.write_text("".join(f"{ln}\n" for ln in lines))
    return p


__all__ = ["PacketCapture", "TLSStream", "have_tshark", "tshark_fields", "tshark_http_uris",
           "tshark_tls_streams", "write_keylog"]
