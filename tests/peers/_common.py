"""Shared pieces of the TLS peer harness: Transcript, certificates, process and /proc helpers."""
from __future__ import annotations

import base64
import os
import select
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tlstap.commands import nginx
from tlstap.commands.nginx import free_port, tail  # the peers import them from here

HERE = Path(__file__).resolve().parent
Addr = tuple[str, int]


@dataclass
class Transcript:
    """One TLS connection as one endpoint saw it (plaintext through SSL_read/SSL_write)."""
    pid: int
    tid: int | None
    local: Addr
    remote: Addr
    sent: bytes
    received: bytes
    # Not part of the comparison: a peer-side error (None when the exchange completed).
    error: str | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, d: dict) -> "Transcript":
        return cls(pid=d["pid"], tid=d.get("tid"), local=tuple(d["local"]), remote=tuple(d["remote"]),
                   sent=base64.b64decode(d["sent"]), received=base64.b64decode(d["received"]),
                   error=d.get("error"))

    def to_json(self) -> dict:
        d = asdict(self)
        d["sent"] = base64.b64encode(self.sent).decode()
        d["received"] = base64.b64encode(self.received).decode()
        return d

    def mirrors(self, other: "Transcript") -> bool:
        """True if `other` is the peer end of this connection with identical byte streams."""
        return (self.local == other.remote and self.remote == other.local
                and self.sent == other.received and self.received == other.sent)


# ---------------------------------------------------------------- certificates

_cert_lock = threading.Lock()


def make_cert(dir) -> tuple[Path, Path]:
    """Self-signed RSA-2048 cert for CN=localhost (+SAN 127.0.0.1, ::1, localhost); cached per dir."""
    d = Path(dir)
    cert, key = d / "cert.pem", d / "key.pem"
    with _cert_lock:
        if cert.exists() and key.exists():
            return cert, key
        d.mkdir(parents=True, exist_ok=True)
        tc, tk = d / f".cert.{os.getpid()}.tmp", d / f".key.{os.getpid()}.tmp"
        nginx.make_cert(str(tc), str(tk), cn="localhost", sans="IP:127.0.0.1,IP:::1,DNS:localhost")
        # key first: the cache test above requires both, and cert is the last to appear
        os.replace(tk, key)
        os.replace(tc, cert)
        return cert, key


# ---------------------------------------------------------------- waiting / processes

def wait_for(pred, timeout: float, what: str, interval: float = 0.02):
    """Poll pred() until it returns something truthy; raise TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stop_process(p: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 10) -> int:
    """Signal p (if still running) and reap it; SIGKILL if it does not exit in time."""
    if p.poll() is None:
        try:
            p.send_signal(sig)
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
    return p.wait(10)


def stop_and_close(p: subprocess.Popen, timeout: float = 5) -> None:
    """stop_process, then close the pipes we held to it (already closed ones are fine)."""
    stop_process(p, timeout=timeout)
    for f in (p.stdin, p.stdout):
        try:
            if f:
                f.close()
        except OSError:
            pass


class ListeningServer:
    """A TLS server process on a free loopback port, for `with`: retries a lost free_port race,
    waits (bounded) until it listens, stops it and removes its directory at exit. Subclasses
    set `name` and give argv(port, tmp); `env` is the server's environment (None: ours)."""

    name = "server"
    env: dict | None = None

    def __init__(self, start_timeout: float = 15):
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def argv(self, port: int, tmp: Path) -> list[str]:
        raise NotImplementedError

    def __enter__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{self.name}-")
        tmp = Path(self._tmp.name)
        self._err = tmp / "serv.stderr"
        for _ in range(5):                      # free_port is racy: retry on a lost race
            self.port = free_port()
            argv = self.argv(self.port, tmp)
            with open(self._err, "wb") as err:
                self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=self.env)
            try:
                wait_for(lambda: self.proc.poll() is not None or any(
                    s[0][1] == self.port for s in tcp_sockets(self.proc.pid, TCP_LISTEN)),
                    self.start_timeout, f"{self.name} to listen")
            except TimeoutError:
                stop_process(self.proc, timeout=5)
                raise
            if self.proc.poll() is None:
                return self
        self._tmp.cleanup()
        raise RuntimeError(f"{self.name} did not start: {tail(self._err)}")

    def stderr(self) -> str:
        return tail(self._err)

    def __exit__(self, *exc):
        if self.proc is not None:
            stop_process(self.proc, timeout=5)
        self._tmp.cleanup()


class ClientProcess:
    """Teardown shared by the idle-start clients (PySSL, curl, node): stop the
    process, close its pipes, remove its temp dir. Subclasses set proc and _tmp."""

    proc: subprocess.Popen | None
    _tmp: "tempfile.TemporaryDirectory"
    _err: Path

    def _spawn(self, argv: list[str], what: str) -> None:
        """Start argv and wait (bounded) for its READY line: it is idle until go()."""
        with open(self._err, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self.pid = self.proc.pid
        try:
            line = read_line(self.proc, 15, bytearray())
            if line != "READY":
                raise RuntimeError(f"unexpected {what} output {line!r}")
        except Exception as e:
            stop_process(self.proc, timeout=5)
            msg = tail(self._err)
            self.close()
            raise RuntimeError(f"{what} failed to start: {e}\n{msg}") from e

    def close(self):
        if self.proc is not None:
            stop_and_close(self.proc)
            self.proc = None
        self._tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def tls_read_to_eof(t: ssl.SSLSocket, timeout: float) -> bytes:
    """All a TLS peer sends until it closes (close_notify or a bare EOF), read for at most
    `timeout` seconds in all."""
    got = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = t.recv(1 << 16)
        except ssl.SSLZeroReturnError:
            break
        if not chunk:
            break
        got += chunk
    return bytes(got)


def read_line(p: subprocess.Popen, timeout: float, buf: bytearray) -> str:
    """Read one line from p.stdout within `timeout` (select-based: never blocks past the deadline).

    `buf` carries bytes read past the newline between calls."""
    fd = p.stdout.fileno()
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no line from pid {p.pid} within {timeout}s")
        r, _, _ = select.select([fd], [], [], left)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError(f"pid {p.pid} closed stdout (rc={p.poll()})")
            buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


# ---------------------------------------------------------------- /proc socket lookup

TCP_ESTABLISHED, TCP_LISTEN = "01", "0A"


def _decode_addr(hexaddr: str) -> Addr:
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    # /proc prints each 32-bit word in host (little-endian) order
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    fam = socket.AF_INET if len(raw) == 4 else socket.AF_INET6
    # inet_ntop gives the same text as Python's getsockname() (e.g. '::ffff:127.0.0.1')
    return socket.inet_ntop(fam, raw), int(port, 16)


def tcp_sockets(pid: int, state: str | None = None) -> list[tuple[Addr, Addr, str]]:
    """(local, remote, state) of the TCP sockets that `pid` holds open, read from /proc.

    Works for any process (e.g. openssl s_client, nginx) without its cooperation."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    inodes = set()
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    out = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in inodes and (state is None or f[3] == state):
                out.append((_decode_addr(f[1]), _decode_addr(f[2]), f[3]))
    return out


TCP_TIME_WAIT = "06"


def tcp_closed(port: int, peer_port: int) -> bool:
    """The TCP connection between these ports (this network namespace, IPv4 or IPv6) has sent
    its last packet: each of its sockets is gone or in TIME_WAIT. The side that enters
    TIME_WAIT sends the last ACK before it does, and the other side's socket goes when that
    ACK arrives."""
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            f = line.split()
            ports = {_decode_addr(f[1])[1], _decode_addr(f[2])[1]}
            if ports == {port, peer_port} and f[3] != TCP_TIME_WAIT:
                return False
    return True


def wait_tcp_closed(port: int, peer_port: int, timeout: float = 10) -> None:
    """Until tcp_closed(): after it, nothing more of that connection crosses the interface."""
    wait_for(lambda: tcp_closed(port, peer_port), timeout, f"the connection {port}<->{peer_port} to close")


def child_pids(ppid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            # comm may contain spaces/parens: fields after the last ')' are fixed
            if int(stat.rpartition(")")[2].split()[1]) == ppid:
                out.append(int(d))
    return sorted(out)


# ---------------------------------------------------------------- stdin/stdout TLS clients

def _feed(f, data: bytes):
    try:
        f.write(data)
        f.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass


def stdin_echo_client(argv: list[str], server, data: bytes, timeout: float = 20, logs=(),
                      exits_on_eof: bool = True, env: dict | None = None,
                      send: bytes | None = None) -> tuple[Transcript, Transcript]:
    """Run a TLS client that sends its stdin and prints what it receives (gnutls-cli, NSS's
    tstclnt) against an echo `server` (.pid, .stderr()); feed it `data` and read the echo.
    Returns (client, server) transcripts with the addresses from /proc while the connection is
    open; both ends sent and received `data` (checked). exits_on_eof False: the client is
    stopped with SIGTERM once stdin is closed (tstclnt waits for the server to close). send:
    what goes to stdin when it is not `data` itself (inline commands); env: the client's."""
    deadline = time.monotonic() + timeout
    tmp = tempfile.TemporaryDirectory(prefix="echo-client-")
    err_path = Path(tmp.name) / "client.stderr"
    name = os.path.basename(argv[0])
    with open(err_path, "wb") as err:
        cli = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env)
    got = bytearray()
    fd = cli.stdout.fileno()

    def logs_tail() -> str:
        return "\n".join([tail(err_path), *(tail(p) for p in logs)])
    try:
        threading.Thread(target=_feed, args=(cli.stdin, data if send is None else send), daemon=True).start()
        while len(got) < len(data):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{name}: echoed {len(got)} of {len(data)} bytes\n{logs_tail()}"
                                   f"\n{server.stderr()}")
            if select.select([fd], [], [], min(left, 0.1))[0]:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"{name} closed after {len(got)} of {len(data)} bytes\n{logs_tail()}")
                got += chunk
        # the connection is still open on both ends: the real addresses
        c_sock = wait_for(lambda: tcp_sockets(cli.pid, TCP_ESTABLISHED), 5, f"{name} socket")[0]
        s_sock = wait_for(lambda: [s for s in tcp_sockets(server.pid, TCP_ESTABLISHED)
                                   if s[1][1] == c_sock[0][1]], 5, "server socket")[0]
        cli.stdin.close()            # EOF -> gnutls-cli sends close_notify and exits
        if not exits_on_eof:
            # tstclnt does nothing on EOF (it stays connected), and the whole echo is in:
            # nothing is left to wait for
            stop_process(cli, timeout=5)
        while select.select([fd], [], [], max(0.1, deadline - time.monotonic()))[0]:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            got += chunk
        cli.wait(max(1.0, deadline - time.monotonic()))
        # the server is done once its socket for this connection is gone
        wait_for(lambda: not any(s[1][1] == c_sock[0][1] for s in tcp_sockets(server.pid, TCP_ESTABLISHED)),
                 max(1.0, deadline - time.monotonic()), "the server to close the connection")
    finally:
        stop_and_close(cli)
        tmp.cleanup()
    if bytes(got) != data:
        raise RuntimeError(f"the server echoed {len(got)} bytes that differ from the {len(data)} sent")
    c = Transcript(cli.pid, cli.pid, c_sock[0], c_sock[1], data, bytes(got))
    s = Transcript(server.pid, server.pid, s_sock[0], s_sock[1], data, data)
    return c, s
