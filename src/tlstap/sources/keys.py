"""Keylog mode: NSS key log lines from OpenSSL's own ssl_log_secret, plus TLS 1.3 key updates.

The kernel side (bpf/keylog.bpf.c) reports two events: a secret OpenSSL is about to log
(label, client_random, secret: exactly the fields of its key log line) and a KeyUpdate
(which end, which direction). Lines for secrets come out as the library would write them.
After a KeyUpdate OpenSSL 3.x logs "CLIENT_TRAFFIC_SECRET_N" with a literal N, older builds
nothing; we write CLIENT/SERVER_TRAFFIC_SECRET_<n>, checking the library's secret against (or
deriving it from) the previous secret of that direction, RFC 8446 section 7.2:

    application_traffic_secret_N+1 = HKDF-Expand-Label(application_traffic_secret_N,
                                                       "traffic upd", "", Hash.length)

KeyTracker is sans-IO (events in, lines out); KeyLogCapture owns the BPF object and probes.
"""
from __future__ import annotations

import contextlib
import hmac
import struct
from collections import OrderedDict

from .. import abi
from ..events import KeyLine
from ..abi import KeyCounter, KeyKind
from .base import Capture, CaptureConfig, bpf_object_path, set_scope
from ..libbpf import BpfObject
from ..probes import discover
from ..probes.openssl_keys import analyze_keys

#: the key ring's size when --mapsize is for packets (-w): a key event is ~300 bytes, so this
#: holds ~14k of them, the secrets of a few thousand handshakes between two reads
KEY_RING_MAX = 4 << 20

#: Connections whose TLS 1.3 traffic secrets we keep to follow key updates. A handshake
#: costs ~300 bytes here; past the bound the oldest connection is forgotten (its later
#: key updates are then counted as unfollowed, never guessed).
MAX_TRACKED_CONNS = 65536

_HASH_BY_LEN = {32: "sha256", 48: "sha384"}    # TLS 1.3 suites: SHA-256 or SHA-384
_KEY_EVENT = struct.Struct(abi.KEY_EVENT_FORMAT)


def hkdf_expand_label(secret: bytes, label: bytes, context: bytes, length: int, hash_name: str) -> bytes:
    """RFC 8446 7.1 (HKDF-Expand of RFC 5869 with the TLS 1.3 HkdfLabel); the stdlib has HMAC."""
    full = b"tls13 " + label
    info = struct.pack(">HB", length, len(full)) + full + bytes([len(context)]) + context
    out, block, i = b"", b"", 1
    while len(out) < length:
        block = hmac.new(secret, block + info + bytes([i]), hash_name).digest()
        out += block
        i += 1
    return out[:length]


def next_traffic_secret(secret: bytes) -> bytes:
    return hkdf_expand_label(secret, b"traffic upd", b"", len(secret), _HASH_BY_LEN[len(secret)])


class KeyTracker:
    """Turns key events into key log lines; numbers TLS 1.3 key updates per connection.

    OpenSSL 3.x logs the new secret of a KeyUpdate under the literal label
    "CLIENT_TRAFFIC_SECRET_N" (or SERVER_): no key log reader understands that, so we count
    updates per connection and direction and write _1, _2, ... with the library's secret,
    after checking it against RFC 8446's derivation from the previous one. Builds that log
    nothing on an update (logs_updates false) get the derived secret written instead.
    """

    def __init__(self, max_conns: int = MAX_TRACKED_CONNS):
        self.max_conns = max_conns
        # client_random -> {"CLIENT": (n, secret), "SERVER": (n, secret)}
        self._traffic: OrderedDict[bytes, dict[str, tuple[int, bytes]]] = OrderedDict()
        self.unfollowed_updates = 0    # no _0 seen for the connection (capture began later)
        self.checked_updates = 0       # library's new secret == our derivation
        self.mismatched_updates = 0    # != : the library's secret is written, this is counted

    def secret(self, label: str, client_random: bytes, secret: bytes, pid: int, tid: int,
               comm: str) -> KeyLine | None:
        side = label.split("_", 1)[0]
        if label in ("CLIENT_TRAFFIC_SECRET_N", "SERVER_TRAFFIC_SECRET_N"):
            known = self._traffic.get(client_random, {}).get(side)
            if known is None:
                self.unfollowed_updates += 1
                return None
            if known[1] == secret:       # already derived from the tls13_update_key event
                return None
            if len(known[1]) in _HASH_BY_LEN and next_traffic_secret(known[1]) == secret:
                self.checked_updates += 1
            else:
                self.mismatched_updates += 1
            n = known[0] + 1
            self._remember(client_random)[side] = (n, secret)
            return KeyLine(f"{side}_TRAFFIC_SECRET_{n}", client_random, secret, pid, tid, comm)
        if label in ("CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"):
            self._remember(client_random)[side] = (0, secret)
        return KeyLine(label, client_random, secret, pid, tid, comm)

    def update(self, client_random: bytes, server: bool, sending: bool, logs_updates: bool, pid: int,
               tid: int, comm: str) -> KeyLine | None:
        """A KeyUpdate changed our sending key (sending) or the peer's (not sending). When the
        library logs the new secret itself, its line (secret()) does the work."""
        if logs_updates:
            return None
        side = "SERVER" if sending == server else "CLIENT"
        known = self._traffic.get(client_random, {}).get(side)
        if known is None or len(known[1]) not in _HASH_BY_LEN:
            self.unfollowed_updates += 1
            return None
        n, secret = known[0] + 1, next_traffic_secret(known[1])
        self._remember(client_random)[side] = (n, secret)
        return KeyLine(f"{side}_TRAFFIC_SECRET_{n}", client_random, secret, pid, tid, comm, derived=True)

    def _remember(self, client_random: bytes) -> dict:
        conn = self._traffic.get(client_random)
        if conn is None:
            conn = self._traffic[client_random] = {}
            if len(self._traffic) > self.max_conns:
                self._traffic.popitem(last=False)
        else:
            self._traffic.move_to_end(client_random)
        return conn


def decode_key_event(view) -> tuple:
    """struct key_event -> a tuple in abi.KeyEvent field order, pads dropped."""
    return _KEY_EVENT.unpack_from(view)


def keylog_paths(cfg: CaptureConfig) -> list[str]:
    """The OpenSSL files to probe, each once (by device and inode)."""
    return discover.target_paths(cfg.libssl, cfg.pid)


class KeyLogCapture(Capture):
    """Use as a context manager; start() analyses and attaches, poll() hands KeyLines to `on_line`."""

    def __init__(self, cfg: CaptureConfig, on_line=None, find=None, describe=None):
        """find(cfg) -> KeySites per file (default: OpenSSL's; GnuTLS: probes.gnutls_keys.find_keys);
        on_line(KeyLine): a first subscriber (every output that takes key lines subscribes);
        describe(target): its status line, where the OpenSSL-style one does not fit (Go)."""
        super().__init__(cfg)
        self._find = find or (lambda c: [analyze_keys(p) for p in keylog_paths(c)])
        self.subscribers = [on_line] if on_line else []
        self._describe = describe
        self._lost_told = 0
        self.tracker = KeyTracker()

    #: the keylog.bpf.o programs this capture uses (the others are not loaded)
    PROGRAMS = ("log_secret_enter", "update_key_enter")

    def attach_points(self, t) -> list[tuple[str, int, str, int]]:
        """(program, file offset, what, cookie) of one target's probes."""
        cookie = abi.key_cookie(t.client_random_off, t.server_off, t.logs_updates)
        points = [("log_secret_enter", t.log_secret, t.log_secret_name, cookie)]
        if t.update_key is not None:
            points.append(("update_key_enter", t.update_key, "tls13_update_key", cookie))
        return points

    def start(self) -> None:
        self.resolve()
        with contextlib.ExitStack() as stack:
            obj = stack.enter_context(BpfObject.open(bpf_object_path("keylog.bpf.o")))
            set_scope(obj, self.cfg)
            obj.map("key_events").max_entries = self.cfg.mapsize
            for prog in obj.programs():
                prog.autoload = prog.name in self.PROGRAMS
            obj.load()
            pid = self.cfg.pid or -1
            for t in self.targets:
                for prog, offset, what, cookie in self.attach_points(t):
                    self.attach_uprobe(stack, obj.program(prog), t.path, offset, what, pid=pid, cookie=cookie)
            self.open_events(stack, obj, "key_events")
            self._stack = stack.pop_all()

    def _on_record(self, view) -> None:
        (kind, server, sending, logs_updates, secret_len, _ts, _ssl, pid, tid, _uid, comm, label, cr,
         secret) = decode_key_event(view)
        comm = comm.split(b"\0", 1)[0].decode(errors="replace")
        if kind == KeyKind.SECRET:
            line = self.tracker.secret(label.split(b"\0", 1)[0].decode("ascii", "replace"), cr,
                                       secret[:secret_len], pid, tid, comm)
        elif kind == KeyKind.UPDATE:
            line = self.tracker.update(cr, bool(server), bool(sending), bool(logs_updates), pid, tid, comm)
        else:
            line = None
        if line is not None:
            for deliver in self.subscribers:
                deliver(line)

    def attached(self) -> list[str]:
        """A status line per target: where the probes sit and what they read."""
        if self._describe:
            return [self._describe(t) for t in self.targets]
        lines = []
        for t in self.targets:
            if t.update_key is not None:
                upd = f", tls13_update_key({t.update_key_insn})"
            elif t.server_off is None:
                upd = ""         # the library logs nothing at a key update (GnuTLS): neither do we
            else:
                upd = " (key updates not followed: tls13_update_key not found)"
            server = f", server flag at +{t.server_off:#x}" if t.server_off is not None else ""
            lines.append(f"attached {t.path} ({t.version or 'version unknown'}): "
                         f"{t.log_secret_name}({t.log_secret_insn}){upd}; client_random at "
                         f"+{t.client_random_off:#x}{server}")
        return lines

    def new_lost(self) -> int:
        """Key events lost since the last call (several outputs may ask: each loss is told once)."""
        lost = self.counters()["lost"]
        new, self._lost_told = lost - self._lost_told, lost
        return new

    def counters(self) -> dict[str, int]:
        c = self.counter_sums("key_counters", KeyCounter)
        c["unfollowed_updates"] = self.tracker.unfollowed_updates
        c["checked_updates"] = self.tracker.checked_updates
        c["mismatched_updates"] = self.tracker.mismatched_updates
        return c

