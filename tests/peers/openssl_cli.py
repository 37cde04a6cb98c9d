"""`openssl s_server` / `s_client` peers (the OpenSSL CLI, linked to the system libssl.so.3).

How exact bytes are achieved: both run with -quiet, so stdin is forwarded verbatim through
SSL_write and whatever SSL_read returns is written raw to stdout (no banners, no command
letters, no CRLF translation). We feed server_data / client_data through stdin pipes and read
stdout until the expected byte counts arrived.

Addresses: neither tool reports its socket addresses in -quiet mode, so while the connection is
up we read them from /proc/PID/fd + /proc/PID/net/tcp{,6} (real kernel values, both ends).

Limitations:
  * one connection per OpenSSLServer (-naccept 1); s_server/s_client are single-threaded, so
    tid == pid.
  * The connection is ended by closing s_server's stdin: in -quiet mode s_server then calls
    SSL_write(buf, 0) (a zero-length write a tracer may see), fails it, and sends close_notify;
    s_client exits on that close_notify. Its own stdin is kept open until then so it never does
    a zero-length write itself.
  * How the bytes are split into SSL_write calls depends on pipe reads (<=16 KiB per call);
    only the concatenation is meaningful.

Key log oracle (openssl_client + OpenSSLServer(keylog=True, ...)): both tools write their own
NSS key log (-keylogfile) and -msg output (-msgfile), so a test knows which secrets the library
derived and which handshake really happened (HelloRetryRequest, resumption, KeyUpdate). See
openssl_client() for how its s_client is driven (-brief instead of -quiet).
"""
from __future__ import annotations

import os
import re
import select
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ._common import (TCP_ESTABLISHED, TCP_LISTEN, Transcript, stop_and_close, stop_process, tail, tcp_sockets,
                      wait_for)
from .keylog import read_keylog

TLS_FLAG = {"1.3": "-tls1_3", "1.2": "-tls1_2"}
# RFC 8446 4.1.3: a ServerHello with this random is a HelloRetryRequest
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


def _tls_opts(tls, ciphersuites, cipher, groups) -> list[str]:
    argv = [TLS_FLAG[tls]] if tls else []
    if ciphersuites:
        argv += ["-ciphersuites", ciphersuites]
    if cipher:
        argv += ["-cipher", cipher]
    if groups:
        argv += ["-groups", groups]
    return argv


@dataclass(frozen=True)
class TLSMessage:
    """One protocol message from -msg output (record headers / inner content types dropped)."""
    direction: str      # "sent" (>>>) or "received" (<<<)
    record: str         # Handshake, Alert, ChangeCipherSpec, ...
    name: str           # ClientHello, ServerHello, KeyUpdate, ..., or alert text
    body: bytes = field(repr=False, default=b"")

    @property
    def is_hello_retry_request(self) -> bool:
        # ServerHello: type(1) length(3) legacy_version(2) random(32)
        return self.name == "ServerHello" and self.body[6:38] == HRR_RANDOM


_MSG_HEAD = re.compile(r"^(<<<|>>>) (?:[^,]+), (\w+) \[length [0-9a-fA-F]+\](?:, (.*))?$")


def parse_msg_output(text: str) -> list[TLSMessage]:
    """Parse `-msg` output: header lines followed by indented hex dump lines."""
    out: list[TLSMessage] = []
    cur, hexes = None, []

    def flush():
        if cur is not None and cur[1] not in ("RecordHeader", "InnerContent"):
            out.append(TLSMessage(cur[0], cur[1], cur[2], bytes.fromhex("".join(hexes))))

    for line in text.splitlines():
        m = _MSG_HEAD.match(line)
        if m:
            flush()
            cur, hexes = ("sent" if m[1] == ">>>" else "received", m[2], m[3] or m[2]), []
        elif cur is not None and line.startswith(" "):
            hexes.append(line.strip().replace(" ", ""))
    flush()
    return out


class OpenSSLServer:
    """`openssl s_server -naccept 1 -quiet` on an ephemeral port of host (127.0.0.1 or ::1).

    Key log options: keylog=True (-keylogfile; keylog() = the lines, all connections, file
    order), msg=True (-msg -msgfile; messages() after exit: OpenSSL buffers that file),
    ciphersuites / cipher / groups (-ciphersuites, -cipher, -groups: e.g. groups="P-256" makes a
    client that offers an X25519 key share first do a HelloRetryRequest), naccept (several
    connections, e.g. for resumption, which needs the same s_server process: its ticket key and
    session cache), tls=None for no version flag, extra_args for anything else."""

    def __init__(self, cert, key, tls: str | None = "1.3", host: str = "127.0.0.1", start_timeout: float = 10,
                 keylog: bool = False, msg: bool = False, ciphersuites: str | None = None,
                 cipher: str | None = None, groups: str | None = None, naccept: int = 1, extra_args=()):
        self.cert, self.key, self.tls, self.host = cert, key, tls, host
        self.start_timeout = start_timeout
        self.keylog_enabled, self.msg = keylog, msg
        self.ciphersuites, self.cipher, self.groups = ciphersuites, cipher, groups
        self.naccept, self.extra_args = naccept, list(extra_args)
        self.proc = self.port = self.pid = None
        self.keylog_path = self.msg_path = None
        self._final_keylog = self._final_msg = None
        self._stdout_buf = bytearray()   # s_server stdout read past what one exchange expected

    @property
    def hostport(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __enter__(self):
        self._tmp = tempfile.TemporaryDirectory(prefix="s_server-")
        self._err = Path(self._tmp.name) / "stderr"
        acc = f"[{self.host}]:0" if ":" in self.host else f"{self.host}:0"
        d = Path(self._tmp.name)
        extra = _tls_opts(self.tls, self.ciphersuites, self.cipher, self.groups)
        if self.keylog_enabled:
            self.keylog_path = d / "server.keylog"
            extra += ["-keylogfile", str(self.keylog_path)]
        if self.msg:
            self.msg_path = d / "server.msg"
            extra += ["-msg", "-msgfile", str(self.msg_path)]
        with open(self._err, "wb") as err:
            # port 0: the kernel picks a free port, no race; we read it back from /proc below
            self.proc = subprocess.Popen(
                ["openssl", "s_server", "-accept", acc, "-naccept", str(self.naccept), "-quiet",
                 "-cert", str(self.cert), "-key", str(self.key), *extra, *self.extra_args],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self.pid = self.proc.pid
        try:
            def listening():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"s_server exited rc={self.proc.returncode}")
                # "accepting" == a LISTEN socket exists; probing with a connect would use up -naccept
                return tcp_sockets(self.pid, TCP_LISTEN)
            listen = wait_for(listening, self.start_timeout, "s_server to listen")
            self.port = listen[0][0][1]
        except Exception as e:
            stop_process(self.proc, timeout=5)
            msg = tail(self._err)
            self.__exit__(None, None, None)
            raise RuntimeError(f"s_server did not start: {e}\n{msg}") from e
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            if self.msg and self.proc.poll() is None:
                # -msgfile is a buffered FILE: let s_server exit by itself (all -naccept
                # connections done) rather than lose its tail to SIGTERM
                try:
                    self.proc.wait(3)
                except subprocess.TimeoutExpired:
                    pass
            stop_process(self.proc, timeout=5)
        if self.keylog_path is not None:
            self._final_keylog = read_keylog(self.keylog_path)
        if self.msg_path is not None:
            self._final_msg = tail(self.msg_path, 1 << 30)
        self._tmp.cleanup()

    def stderr(self) -> str:
        return tail(self._err, 10000)

    def keylog(self) -> list[str]:
        """The server's key log lines (normalized, file order); live while running (s_server
        flushes each line), kept after exit."""
        if self.keylog_path is None:
            raise RuntimeError("OpenSSLServer was started without keylog=True")
        return self._final_keylog if self._final_keylog is not None else read_keylog(self.keylog_path)

    def messages(self) -> list[TLSMessage]:
        """The server's -msg output, parsed (complete only after the server has exited)."""
        if self.msg_path is None:
            raise RuntimeError("OpenSSLServer was started without msg=True")
        return parse_msg_output(self._final_msg if self._final_msg is not None else tail(self.msg_path, 1 << 30))


def _feed(f, data: bytes, close: bool):
    try:
        f.write(data)
        f.flush()
        if close:
            f.close()
    except (BrokenPipeError, ValueError, OSError):
        pass  # peer died; the byte-count wait reports it


def openssl_exchange(server: OpenSSLServer, client_data: bytes, server_data: bytes,
                     timeout: float = 20) -> tuple[Transcript, Transcript]:
    """Connect s_client to `server`, send client_data one way and server_data the other way.

    Returns (client_transcript, server_transcript) with real addresses from /proc."""
    deadline = time.monotonic() + timeout
    srv = server.proc
    err_path = Path(server._tmp.name) / "client.stderr"
    with open(err_path, "wb") as err:
        cli = subprocess.Popen(["openssl", "s_client", "-connect", server.hostport, "-quiet",
                                "-servername", "localhost"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    sfd, cfd = srv.stdout.fileno(), cli.stdout.fileno()
    try:
        # writers in threads: pipes block when full and s_server reads stdin only after accept
        for f, data in ((srv.stdin, server_data), (cli.stdin, client_data)):
            threading.Thread(target=_feed, args=(f, data, False), daemon=True).start()

        got = {sfd: bytearray(), cfd: bytearray()}
        want = {sfd: len(client_data), cfd: len(server_data)}
        open_fds = set(got)

        def pump(until_eof: bool):
            while open_fds:
                pending = [fd for fd in open_fds if until_eof or len(got[fd]) < want[fd]]
                if not pending:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"openssl exchange: got {[len(b) for b in got.values()]} "
                                       f"of {list(want.values())} bytes\n{tail(err_path)}\n{server.stderr()}")
                for fd in select.select(pending, [], [], left)[0]:
                    chunk = os.read(fd, 1 << 16)
                    if chunk:
                        got[fd] += chunk
                    else:
                        open_fds.discard(fd)
                if not until_eof and any(fd not in open_fds and len(got[fd]) < want[fd] for fd in got):
                    raise RuntimeError(f"openssl peer closed early\n{tail(err_path)}\n{server.stderr()}")

        pump(until_eof=False)
        # both ends hold the connection open now: read the real addresses
        s_sock = wait_for(lambda: tcp_sockets(srv.pid, TCP_ESTABLISHED), 5, "s_server socket")[0]
        c_sock = wait_for(lambda: tcp_sockets(cli.pid, TCP_ESTABLISHED), 5, "s_client socket")[0]
        srv.stdin.close()            # -> s_server sends close_notify, s_client exits on it
        pump(until_eof=True)         # anything extra would still belong in the transcripts
        left = max(1.0, deadline - time.monotonic())
        cli.wait(left)
        srv.wait(left)
    finally:
        stop_and_close(cli)
    c = Transcript(cli.pid, cli.pid, c_sock[0], c_sock[1], client_data, bytes(got[cfd]))
    s = Transcript(srv.pid, srv.pid, s_sock[0], s_sock[1], server_data, bytes(got[sfd]))
    return c, s


# ---------------------------------------------------------------- s_client with key log / -msg

KEY_UPDATE_STEPS = ("k", "K")     # K = update_requested: the server answers with its own KeyUpdate
_COMMAND_LETTERS = b"QRkK"        # s_client 3.0 acts on these as the first byte of a stdin read
_CHUNK = 4096                     # <= PIPE_BUF: one write() is one s_client stdin read


@dataclass
class OpenSSLClientRun:
    """One s_client connection run by openssl_client()."""
    client: Transcript
    server: Transcript
    keylog: list[str]            # s_client's -keylogfile (normalized lines, file order)
    messages: list[TLSMessage]   # s_client's -msg output
    summary: dict[str, str]      # -brief summary: 'Protocol version', 'Ciphersuite', 'Server Temp Key', ...
    stderr: str
    returncode: int

    @property
    def pid(self) -> int:
        return self.client.pid

    def _count(self, direction: str, name: str) -> int:
        return sum(1 for m in self.messages if m.direction == direction and m.name == name)

    @property
    def client_random(self) -> str:
        """From the (first) ClientHello: type(1) length(3) version(2) random(32)."""
        ch = next(m for m in self.messages if m.direction == "sent" and m.name == "ClientHello")
        return ch.body[6:38].hex()

    @property
    def hello_retry(self) -> bool:
        """The server answered with a HelloRetryRequest (checked by its random) and the client
        sent a second ClientHello."""
        return (any(m.direction == "received" and m.is_hello_retry_request for m in self.messages)
                and self._count("sent", "ClientHello") == 2)

    @property
    def resumed(self) -> bool:
        """Abbreviated handshake: completed (server Finished received) without a server Certificate."""
        return self._count("received", "Finished") >= 1 and self._count("received", "Certificate") == 0

    @property
    def key_updates_sent(self) -> int:
        return self._count("sent", "KeyUpdate")

    @property
    def key_updates_received(self) -> int:
        return self._count("received", "KeyUpdate")


def _split_chunks(data: bytes) -> list[bytes]:
    """<= _CHUNK byte pieces none of which starts with an s_client command letter."""
    out, i = [], 0
    while i < len(data):
        end = min(i + _CHUNK, len(data))
        # move the cut back so the next piece does not start with a command letter
        while end < len(data) and data[end] in _COMMAND_LETTERS and end > i + 1:
            end -= 1
        piece = data[i:end]
        if piece[0] in _COMMAND_LETTERS:
            raise ValueError(f"s_client would take {piece[:1]!r} at offset {i} as a command: data "
                             "must not start with Q, R, k or K nor hold a run of 4 KiB of them")
        out.append(piece)
        i = end
    return out


def openssl_client(server: OpenSSLServer, steps, *, tls: str | None = None,
                   ciphersuites: str | None = None, cipher: str | None = None, groups: str | None = None,
                   sess_out=None, sess_in=None, timeout: float = 20, extra_args=()) -> OpenSSLClientRun:
    """Run one `openssl s_client -brief -keylogfile -msg` connection against `server`.

    steps: a list of (client_data, server_data) exchanges and the key update commands "k"
    (SSL_key_update NOT_REQUESTED) / "K" (REQUESTED: the server updates its sending key too),
    e.g. [(b"a", b"b"), "K", (b"c", b"d")]. Each exchange completes (both directions fully
    received) before the next step. tls / ciphersuites / cipher / groups: the s_client flags;
    sess_out / sess_in: session file paths for resumption (TLS 1.3 tickets are written when
    they arrive, i.e. during the first exchange).

    Why -brief and not -quiet: -brief keeps stdout raw (received data only) and puts a summary on
    stderr, but unlike -quiet it does not ignore stdin EOF: closing stdin makes s_client send
    close_notify and exit, which ends the connection from the client side (s_server can serve
    -naccept > 1 then). Without key update steps -nocommands is added, so data is passed
    verbatim. With them, the command letters are live: s_client checks the first byte of every
    stdin read, so client data is written in <= 4 KiB pieces, one at a time (each fully received
    by the server before the next), none of which starts with Q/R/k/K (ValueError if the data
    itself starts so). After "k"/"K" s_client does SSL_key_update + a zero-length SSL_write,
    which sends the KeyUpdate at once; we wait for its KEYUPDATE notice on stderr.
    """
    steps = list(steps)
    exchanges = [s for s in steps if not isinstance(s, str)]
    if not exchanges:
        raise ValueError("need at least one (client_data, server_data) exchange")
    bad = [s for s in steps if isinstance(s, str) and s not in KEY_UPDATE_STEPS]
    if bad:
        raise ValueError(f"unknown steps {bad}")
    commands = len(exchanges) != len(steps)
    deadline = time.monotonic() + timeout
    srv = server.proc
    tmp = tempfile.TemporaryDirectory(prefix="s_client-")
    d = Path(tmp.name)
    keylog_path, msg_path, err_path = d / "client.keylog", d / "client.msg", d / "client.stderr"
    argv = ["openssl", "s_client", "-connect", server.hostport, "-brief", "-servername", "localhost",
            "-keylogfile", str(keylog_path), "-msg", "-msgfile", str(msg_path),
            *_tls_opts(tls, ciphersuites, cipher, groups)]
    if not commands:
        argv.append("-nocommands")
    if sess_out:
        argv += ["-sess_out", str(sess_out)]
    if sess_in:
        argv += ["-sess_in", str(sess_in)]
    argv += list(extra_args)
    with open(err_path, "wb") as err:
        cli = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    sfd, cfd = srv.stdout.fileno(), cli.stdout.fileno()
    got = {sfd: server._stdout_buf, cfd: bytearray()}
    open_fds = {sfd, cfd}
    server._stdout_buf = bytearray()

    def diag() -> str:
        return f"\n--- s_client:\n{tail(err_path)}\n--- s_server:\n{server.stderr()}"

    def pump(cond, what: str):
        """Read both stdouts until cond() (bounded by the deadline)."""
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"openssl_client: timed out waiting for {what}; got "
                                   f"client {len(got[cfd])} / server {len(got[sfd])} bytes{diag()}")
            if not open_fds:
                raise RuntimeError(f"openssl_client: both ends closed before {what}{diag()}")
            r = select.select(list(open_fds), [], [], min(left, 0.05))[0]
            for fd in r:
                chunk = os.read(fd, 1 << 16)
                if chunk:
                    got[fd] += chunk
                else:
                    open_fds.discard(fd)
            if cfd not in open_fds and not cond() and cli.poll() is not None:
                raise RuntimeError(f"s_client exited rc={cli.returncode} before {what}{diag()}")

    c_sent = bytearray()
    s_sent = bytearray()
    c_sock = s_sock = None
    updates = 0
    try:
        for step in steps:
            if isinstance(step, str):
                cli.stdin.write(step.encode() + b"\n")
                cli.stdin.flush()
                updates += 1
                pump(lambda: tail(err_path, 1 << 20).count("KEYUPDATE") >= updates, f"KEYUPDATE #{updates}")
                continue
            cdata, sdata = step
            if sdata:
                threading.Thread(target=_feed, args=(srv.stdin, sdata, False), daemon=True).start()
            if commands:
                for piece in _split_chunks(cdata):
                    cli.stdin.write(piece)
                    cli.stdin.flush()
                    want = len(c_sent) + len(piece)
                    c_sent += piece
                    pump(lambda: len(got[sfd]) >= want, "the server to receive client data")
            elif cdata:
                threading.Thread(target=_feed, args=(cli.stdin, cdata, False), daemon=True).start()
                c_sent += cdata
            s_sent += sdata
            pump(lambda: len(got[sfd]) >= len(c_sent) and len(got[cfd]) >= len(s_sent), "an exchange")
            if c_sock is None:
                # both ends hold the connection open now: read the real addresses
                c_sock = wait_for(lambda: tcp_sockets(cli.pid, TCP_ESTABLISHED), 5, "s_client socket")[0]
                s_sock = wait_for(lambda: [s for s in tcp_sockets(srv.pid, TCP_ESTABLISHED)
                                           if s[1] == c_sock[0]], 5, "s_server socket")[0]
        cli.stdin.close()                 # -> s_client: DONE, close_notify, exit
        pump(lambda: cfd not in open_fds, "s_client to exit")
        cli.wait(max(1.0, deadline - time.monotonic()))
        # the server is done with this connection once its socket is gone (or it exited)
        wait_for(lambda: srv.poll() is not None or not any(
            s[1] == c_sock[0] for s in tcp_sockets(srv.pid, TCP_ESTABLISHED)),
            max(1.0, deadline - time.monotonic()), "s_server to close the connection")
        if srv.poll() is None:            # whatever is already in the pipe belongs here
            while select.select([sfd], [], [], 0.05)[0]:
                chunk = os.read(sfd, 1 << 16)
                if not chunk:
                    break
                got[sfd] += chunk
        run = OpenSSLClientRun(
            client=Transcript(cli.pid, cli.pid, c_sock[0], c_sock[1], bytes(c_sent), bytes(got[cfd])),
            server=Transcript(srv.pid, srv.pid, s_sock[0], s_sock[1], bytes(s_sent), bytes(got[sfd])),
            keylog=read_keylog(keylog_path), messages=parse_msg_output(tail(msg_path, 1 << 30)),
            summary=_brief_summary(tail(err_path, 1 << 20)), stderr=tail(err_path, 1 << 20),
            returncode=cli.returncode)
        return run
    finally:
        stop_and_close(cli)
        tmp.cleanup()


def _brief_summary(stderr: str) -> dict[str, str]:
    out = {}
    _, _, rest = stderr.partition("CONNECTION ESTABLISHED\n")
    for line in rest.splitlines():
        k, sep, v = line.partition(": ")
        if sep and not line.startswith(" "):
            out.setdefault(k, v)
    return out
