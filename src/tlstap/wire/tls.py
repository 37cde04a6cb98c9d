"""Sans-IO TLS record layer decryption of one captured TCP connection (both directions).

Bytes in (per direction, in stream order, with Gaps where packets were never captured), key log
secrets looked up by client random, plaintext out. The plaintext handshake tells us who the client
is, the version, the suite and the randoms; the encrypted handshake messages we must follow are
Finished (1.3: next epoch), EndOfEarlyData, EncryptedExtensions (was 0-RTT accepted) and KeyUpdate.

A direction's bytes queue in `_Dir.buf` and `_Dir.pending`; processing stops ("blocks") at a record
whose keys are not in the key log yet, or (0-RTT) whose key depends on what the other direction has
not said yet. Blocked bytes are the held bytes: retry() resumes, give_up() drops them.
"""
from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

from ..sources.keys import next_traffic_secret
from .suites import SUITES, opener13, openers12
from .tcp import Gap   # what a TcpStream reports for bytes never captured

OUT, IN = 0, 1

_MAX_RECORD = (1 << 14) + 256       # RFC 8446 5.2 / RFC 5246 6.2.3: ciphertext length bound
_MAX_HANDSHAKE = 1 << 18            # a certificate chain fits; longer: garbage, not buffered
_HOLD_MAX = 4 << 20                 # held bytes per connection before giving up on keys
_RESYNC_SEQS = 64                   # records a gap may hide: sequence numbers tried after one
_RESYNC_TRIES = 32                  # plausible headers tried after a gap before giving up on it
_HEADER = re.compile(rb"[\x14-\x18]\x03[\x01-\x04]")   # a record header's type and version
_HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
_CCS, _HANDSHAKE, _APPDATA = 20, 22, 23
_EXT_ETM, _EXT_PSK, _EXT_EARLY, _EXT_VERSIONS = 22, 41, 42, 43


@dataclass(slots=True)
class Plain:
    """Decrypted application data, in stream order per direction (OUT or IN)."""
    direction: int
    data: bytes
    early: bool = False    #: TLS 1.3 0-RTT early data

    def __repr__(self) -> str:
        more = f"...<{len(self.data)} bytes>" if len(self.data) > 20 else ""
        return f"Plain(direction={self.direction}, data={self.data[:20]!r}{more}, early={self.early})"


@dataclass(slots=True)
class Problem:
    """Something the user must be told. kind: "auth" (a record failed its tag or MAC: never shown),
    "gap", "nokeys", "notls", "unsupported" (suite or version), "midstream" (no handshake seen)."""
    direction: int | None
    kind: str
    detail: str


class _Block(Exception):
    """Processing of a direction stops at this record (keys or the other direction pending)."""


def _plausible(b, i: int) -> bool:
    return 20 <= b[i] <= 24 and b[i + 1] == 3 and 1 <= b[i + 2] <= 4 and \
        ((b[i + 3] << 8) | b[i + 4]) <= _MAX_RECORD


def _chained(b, i: int) -> bool:
    """Two plausible record headers in a row somewhere in b[i:]: TLS caught mid-record."""
    end = min(len(b), i + _MAX_RECORD + 5)
    for j in range(i, end - 4):
        if _plausible(b, j):
            k = j + 5 + ((b[j + 3] << 8) | b[j + 4])
            if k + 5 <= len(b) and _plausible(b, k):
                return True
    return False


def _extensions(b: bytes, off: int) -> dict[int, bytes]:
    out = {}
    if off + 2 > len(b):
        return out
    end = min(len(b), off + 2 + int.from_bytes(b[off:off + 2], "big"))
    off += 2
    while off + 4 <= end:
        t, n = int.from_bytes(b[off:off + 2], "big"), int.from_bytes(b[off + 2:off + 4], "big")
        out[t] = b[off + 4:off + 4 + n]
        off += 4 + n
    return out


class _Dir:
    __slots__ = ("d", "client", "buf", "pos", "pending", "seq", "open", "want", "secret", "early",
                 "trial", "hs", "lost", "missing", "skipped", "blocked", "blocked_on_keys", "encrypted",
                 "queued", "tries", "gone", "need", "gen")

    def __init__(self, d):
        self.d = d
        self.client = None          # True / False once the ClientHello told us
        self.buf = bytearray()
        self.pos = 0                # start of the first unprocessed record in buf
        self.need = 0               # len(buf) the next record needs (0: unknown)
        self.pending = deque()      # pieces not yet appended to buf (queued behind a block)
        self.seq = 0
        self.open = None            # opener of the current epoch, None while plaintext / not built
        self.want = None            # key log label of the epoch to build, None: plaintext
        self.secret = None          # 1.3: current traffic secret (KeyUpdate derives the next)
        self.early = False          # records of this epoch are 0-RTT data
        self.trial = False          # 1.3 client after rejected 0-RTT: skip records the key fails on
        self.hs = bytearray()       # handshake message reassembly
        self.lost = False           # after a Gap: record boundary unknown
        self.missing = 0            # bytes gaps left out since the last record (for the report)
        self.skipped = 0            # captured bytes scanned past while resynchronising
        self.queued = 0             # bytes in pending
        self.tries = 0              # candidate records tried since the gap
        self.gone = False           # resynchronisation failed: this direction's bytes are dropped
        self.blocked = False        # stopped at a record (keys, or the other direction first)
        self.blocked_on_keys = False
        self.encrypted = False      # 1.2: ChangeCipherSpec seen in this direction
        self.gen = 0                # 1.2: the handshake (1: first) whose keys this epoch uses


class TlsConnection:
    """One TCP connection's TLS: feed both directions, get Plain and Problem items in order.

    keys: callable(client_random) -> {key log label: secret} of the lines known so far (may be
    empty, may grow: call retry() when it did). The local end may be the client or the server:
    the ClientHello tells. stats counts records_decrypted, bytes_decrypted, auth_failures, gaps,
    bytes_skipped (after gaps), records_held_dropped (give_up), early_records_skipped (0-RTT the
    server rejected), key_updates.
    """

    def __init__(self, keys):
        self._keys = keys
        self._dirs = (_Dir(OUT), _Dir(IN))
        self._out: list = []
        self._chunks: list = []
        self._chunk_key = None
        self._started = False
        self._dead = False          # notls / midstream / unsupported / nokeys: ignore the rest
        self._client_random = None
        self._suite = None
        self._tls13 = None
        self._etm = False
        self._early_offered = False
        self._early_state = None    # None (unknown yet), "accepted", "rejected"
        # 1.2: per handshake (the first, then each renegotiation), what its keys are made of;
        # a direction's CCS takes it to the handshake of its own latest hello
        self._hellos = [0, 0]       # ClientHellos, ServerHellos (not HRR) seen
        self._gens: dict[int, dict] = {}
        self.stats = {"records_decrypted": 0, "bytes_decrypted": 0, "auth_failures": 0, "gaps": 0,
                      "bytes_skipped": 0, "records_held_dropped": 0, "early_records_skipped": 0,
                      "key_updates": 0}

    # -- API -------------------------------------------------------------------------------
    def feed(self, direction: int, pieces: list) -> list:
        """pieces: bytes (the direction's stream, in order) or Gap; returns Plain | Problem.
        The two directions may be fed in any order relative to each other."""
        if self._dead:
            return []
        d = self._dirs[direction]
        if d.blocked:                       # behind a held record: queue (retry() resumes)
            self._queue(d, pieces)
        else:
            self._run(d, pieces)
        if self._dirs[1 - direction].blocked or d.blocked:
            self._pump(keys_changed=False)
        return self._take()

    @property
    def waiting(self) -> bool:
        """True while records are held because their keys are not (yet) in the key log."""
        return not self._dead and any(d.blocked_on_keys for d in self._dirs)

    def retry(self) -> list:
        """The key log grew: decrypt what was held."""
        if not self._dead:
            self._pump(keys_changed=True)
        return self._take()

    def give_up(self, reason: str) -> list:
        """Keys did not come in time: drop what is held, return one Problem("nokeys") saying
        so; the rest of the connection is ignored."""
        self._give_up(reason)
        return self._take()

    def close(self) -> list:
        """The connection ended (or the capture did): a gap that decryption never got past is
        reported now, with what it left undecrypted, rather than not at all."""
        for d in self._dirs:
            if d.lost and not d.gone and not self._dead:
                left = len(d.buf) - d.pos
                self._problem(d.d, "gap", f"{d.missing} bytes not captured; decryption did not resume "
                              f"before the connection ended ({d.skipped + left} captured bytes after it "
                              f"not decrypted)")
                d.gone = True
        return self._take()

    @property
    def version(self) -> str | None:
        """TLS 1.2 or TLS 1.3 (as that string) once the ServerHello was read."""
        return None if self._tls13 is None else ("TLS 1.3" if self._tls13 else "TLS 1.2")

    @property
    def client_direction(self) -> int | None:
        """OUT or IN: the direction the ClientHello came in (None before it)."""
        return next((d.d for d in self._dirs if d.client), None)

    @property
    def encrypt_then_mac(self) -> bool:
        """TLS 1.2 CBC with RFC 7366's encrypt-then-MAC negotiated."""
        return self._etm

    @property
    def early_data(self) -> str | None:
        """TLS 1.3 0-RTT: "accepted" or "rejected" by the server; None: not offered (or not
        known yet)."""
        return self._early_state

    @property
    def suite(self) -> str | None:
        """The cipher suite's OpenSSL name once the ServerHello was read."""
        return self._suite and self._suite.name

    # -- output ----------------------------------------------------------------------------
    def _data(self, d: int, data, early: bool) -> None:
        # consecutive records of one direction become one Plain: one join, fewer objects
        if self._chunk_key != (d, early):
            self._flush()
            self._chunk_key = (d, early)
        self._chunks.append(data)

    def _flush(self) -> None:
        if self._chunks:
            d, early = self._chunk_key
            self._out.append(Plain(d, b"".join(self._chunks), early))
            self._chunks = []
        self._chunk_key = None

    def _problem(self, d, kind, detail) -> None:
        self._flush()
        self._out.append(Problem(d, kind, detail))

    def _take(self) -> list:
        if not self._out and not self._chunks:
            return []
        self._flush()
        out, self._out = self._out, []
        return out

    def _give_up(self, reason: str) -> None:
        if self._dead:
            return
        held = self._held()
        records = sum(self._count_records(d) for d in self._dirs)
        self.stats["records_held_dropped"] += records
        self._problem(None, "nokeys", f"{reason}: {held} bytes ({records} whole records) held "
                      "were dropped undecrypted; the rest of the connection is not decrypted")
        self._kill()

    @staticmethod
    def _count_records(d: _Dir) -> int:
        """Complete records held in d (up to a gap in the queue: after it, boundaries are lost)."""
        parts = [d.buf[d.pos:]]
        for p in d.pending:
            if isinstance(p, Gap):
                break
            parts.append(p)
        b, i, n = b"".join(parts), 0, 0
        while i + 5 <= len(b):
            i += 5 + ((b[i + 3] << 8) | b[i + 4])
            n += i <= len(b)
        return n

    def _kill(self) -> None:
        self._dead = True
        for d in self._dirs:
            d.buf, d.pos, d.blocked, d.blocked_on_keys, d.queued = bytearray(), 0, False, False, 0
            d.pending.clear()

    # -- the loop --------------------------------------------------------------------------
    def _pump(self, keys_changed: bool) -> None:
        # a direction may wait on the other (the client's records on the server's ServerHello
        # or EncryptedExtensions): run both until neither moves. One waiting for keys moves
        # only once retry() says the key log grew.
        progress = True
        while progress and not self._dead:
            progress = False
            for d in self._dirs:
                if d.blocked and (keys_changed or not d.blocked_on_keys):
                    before = (d.pos, len(d.buf), d.queued)
                    self._run(d, self._unqueue(d), requeue=False)
                    progress |= before != (d.pos, len(d.buf), d.queued) or not d.blocked
        if not self._dead and self._held() > _HOLD_MAX:
            self._give_up(f"keys not logged while {_HOLD_MAX >> 20} MiB of records waited")

    def _held(self) -> int:
        return sum(len(d.buf) - d.pos + d.queued for d in self._dirs)

    @staticmethod
    def _queue(d: _Dir, pieces) -> None:
        for p in pieces:
            d.pending.append(p)
            if not isinstance(p, Gap):
                d.queued += len(p)

    @staticmethod
    def _unqueue(d: _Dir):
        # pieces leave the queue one by one as they are used: a block leaves the rest queued
        while d.pending:
            p = d.pending.popleft()
            if not isinstance(p, Gap):
                d.queued -= len(p)
            yield p

    def _run(self, d: _Dir, pieces, requeue: bool = True) -> None:
        """Process d's buffered records, then each piece; on a block the rest is queued."""
        d.blocked = d.blocked_on_keys = False
        it = iter(pieces)
        try:
            if d.need <= len(d.buf) > d.pos:
                self._records(d)
            for piece in it:
                if self._dead:
                    return
                if isinstance(piece, Gap):
                    self._gap(d, piece.nbytes)
                else:
                    if d.pos == len(d.buf):
                        d.buf.clear()
                        d.need -= d.pos
                        d.pos = 0
                    d.buf += piece
                    if len(d.buf) < d.need:
                        continue           # the next record is not complete yet
                self._records(d)
        except _Block:
            d.blocked = True
            if requeue:
                self._queue(d, it)
        if d.pos > 65536 or (d.pos and d.pos == len(d.buf)):
            del d.buf[:d.pos]
            d.need -= d.pos
            d.pos = 0

    def _records(self, d: _Dir) -> None:
        b = d.buf
        d.need = 0
        i = d.pos
        if d.open is not None and not (d.lost or d.trial) and \
                i + 5 <= len(b) and i + 5 + ((b[i + 3] << 8) | b[i + 4]) <= len(b):
            self._app_records(d)
        while not self._dead:
            if d.gone:
                d.pos = len(b)
                return
            if d.lost and not self._resync(d):
                return
            i = d.pos
            if i + 5 > len(b):
                d.need = i + 5 if self._started else 0
                return
            if not self._started and (not self._first(d) or self._dead):
                return
            n = (b[i + 3] << 8) | b[i + 4]
            if n > _MAX_RECORD:
                return self._not_tls(d, f"record length {n} exceeds the TLS bound")
            if i + 5 + n > len(b):
                d.need = i + 5 + n
                return
            self._record(d, b[i], memoryview(b)[i:i + 5], memoryview(b)[i + 5:i + 5 + n])
            d.pos = i + 5 + n

    def _app_records(self, d: _Dir) -> None:
        """The steady state, kept tight: application data records in an established epoch.
        Anything else (another content type, a failed tag, a short record) is left to _record."""
        b, i, seq, open_, end = d.buf, d.pos, d.seq, d.open, len(d.buf)
        chunks, start = None, seq
        with memoryview(b) as mv:
            while i + 5 <= end and b[i] == _APPDATA:
                n = (b[i + 3] << 8) | b[i + 4]
                if i + 5 + n > end or n > _MAX_RECORD:
                    break
                res = open_(mv[i:i + 5], mv[i + 5:i + 5 + n], seq)
                if res is None or res[0] != _APPDATA:
                    break                  # _record opens it again and deals with it
                if chunks is None:
                    if self._chunk_key != (d.d, d.early):
                        self._flush()
                        self._chunk_key = (d.d, d.early)
                    chunks = self._chunks
                data = res[1]
                if data:
                    chunks.append(data)
                    self.stats["bytes_decrypted"] += len(data)
                seq += 1
                i += 5 + n
        self.stats["records_decrypted"] += seq - start
        d.seq, d.pos = seq, i

    def _first(self, d: _Dir) -> bool:
        """Decide from the connection's first bytes: TLS from its ClientHello (that end is the
        client), TLS joined midstream, or not TLS. False: need more bytes."""
        b, i = d.buf, d.pos
        if _plausible(b, i):
            if i + 6 > len(b):
                return False
            if b[i] == _HANDSHAKE and b[i + 5] == 1:
                self._started = True
                d.client = True
                self._dirs[1 - d.d].client = False
                return True
            if b[i] == _HANDSHAKE and b[i + 5] == 2:
                # a ServerHello fed before the ClientHello (the caller's order across the two
                # directions is not the wire's): the other direction decides
                raise _Block
            self._midstream(d)
        elif _chained(b, i):             # records, but the capture began inside one
            self._midstream(d)
        elif all(32 <= c < 127 or c in b"\r\n\t" for c in b[i:i + 5]) or \
                len(b) - i > _MAX_RECORD + 5:
            # text (HTTP, SMTP, SSH banners ...), or binary without a record boundary where one
            # must be; binary that may still turn out to be a record's inside: wait for more
            self._started = True
            self._not_tls(d, f"first bytes {bytes(b[i:i + 5]).hex()} are not a TLS record")
        else:
            return False
        return True

    def _midstream(self, d: _Dir) -> None:
        self._started = True
        self._problem(d.d, "midstream", "the capture began after the handshake (no ClientHello): "
                      "the connection is not decrypted")
        self._kill()

    def _not_tls(self, d: _Dir, why: str) -> None:
        self._problem(d.d, "notls", why)
        self._kill()

    # -- one record ------------------------------------------------------------------------
    def _record(self, d: _Dir, rtype: int, hdr, body) -> None:
        if not (20 <= rtype <= 24):
            return self._not_tls(d, f"record type {rtype}")
        if self._tls13 is None and rtype != _HANDSHAKE:
            raise _Block                  # 1.2 or 1.3 decides what this is: wait for the ServerHello
        if self._tls13 is False:
            if not d.encrypted:           # 1.2: ChangeCipherSpec switches this direction's keys
                if rtype == _CCS:
                    d.encrypted = True
                    self._epoch12(d)
                elif rtype == _HANDSHAKE:
                    self._handshake(d, body)
                return
        elif rtype != _APPDATA:           # 1.3 (or not known yet): only type 23 is encrypted
            if rtype == _HANDSHAKE:
                self._handshake(d, body)
            return                        # ChangeCipherSpec of compatibility mode, plain alerts
        if d.open is None:
            self._build(d)                # raises _Block when the keys are not there yet
        res = d.open(hdr, body, d.seq)
        if res is None:
            if d.trial:                   # 0-RTT the server rejected: not for its keys either
                self.stats["early_records_skipped"] += 1
                return
            d.seq += 1
            self.stats["auth_failures"] += 1
            return self._problem(d.d, "auth", f"a {len(body)}-byte record (sequence number {d.seq - 1}) "
                                 "failed authentication: not shown")
        d.trial = False
        d.seq += 1
        self._content(d, res[0], res[1])

    def _content(self, d: _Dir, ctype: int, data) -> None:
        self.stats["records_decrypted"] += 1
        if ctype == _APPDATA:
            if data:
                self.stats["bytes_decrypted"] += len(data)
                self._data(d.d, data, d.early)
        elif ctype == _HANDSHAKE:
            self._handshake(d, data)
        elif ctype == _CCS and self._tls13 is False:
            self._epoch12(d)                   # 1.2 renegotiation: the new handshake's keys

    # -- handshake messages ----------------------------------------------------------------
    def _handshake(self, d: _Dir, data) -> None:
        h = d.hs
        h += data
        while len(h) >= 4:
            n = int.from_bytes(h[1:4], "big")
            if n > _MAX_HANDSHAKE:         # not a message we could use: do not buffer it
                h.clear()
                break
            if len(h) < 4 + n:
                break
            mtype, msg = h[0], bytes(h[4:4 + n])
            del h[:4 + n]
            self._message(d, mtype, msg)

    def _message(self, d: _Dir, mtype: int, msg: bytes) -> None:
        if mtype == 1 and d.client:
            self._client_hello(msg)
        elif mtype == 2 and d.client is False and (d.want is None or self._tls13 is False):
            self._server_hello(d, msg)     # (1.2: also a renegotiation's, encrypted)
        elif not self._tls13:
            return                         # 1.2: keys switch on ChangeCipherSpec, not on messages
        elif mtype == 8 and not d.client:  # EncryptedExtensions: did the server take 0-RTT?
            if self._early_offered and self._early_state is None:
                accepted = _EXT_EARLY in _extensions(msg, 0)
                self._early_state = "accepted" if accepted else "rejected"
                self._client_plan()
        elif mtype == 20:                  # Finished: the next record is under application keys
            if d.want and d.want.endswith("HANDSHAKE_TRAFFIC_SECRET"):
                self._epoch(d, ("CLIENT_" if d.client else "SERVER_") + "TRAFFIC_SECRET_0")
        elif mtype == 5 and d.client:      # EndOfEarlyData
            self._epoch(d, "CLIENT_HANDSHAKE_TRAFFIC_SECRET")
        elif mtype == 24 and d.secret is not None and "TRAFFIC_SECRET_" in d.want:   # KeyUpdate
            gen = int(d.want.rsplit("_", 1)[1]) + 1
            d.want = d.want.rsplit("_", 1)[0] + f"_{gen}"
            d.secret = next_traffic_secret(d.secret)
            self.stats["key_updates"] += 1
            d.open, d.seq = opener13(self._suite, d.secret), 0

    def _client_hello(self, msg: bytes) -> None:
        if len(msg) < 35:
            return
        self._client_random = msg[2:34]
        self._hellos[0] += 1
        self._gens.setdefault(self._hellos[0], {})["cr"] = self._client_random
        off = 34
        off += 1 + msg[off]                                         # session id
        off += 2 + int.from_bytes(msg[off:off + 2], "big")          # cipher suites
        off += 1 + msg[off] if off < len(msg) else 0                # compression methods
        ext = _extensions(msg, off)
        self._early_offered = _EXT_EARLY in ext and _EXT_PSK in ext and self._early_state is None

    def _server_hello(self, d: _Dir, msg: bytes) -> None:
        if len(msg) < 38 or self._client_random is None:
            return
        random = msg[2:34]
        off = 35 + msg[34]
        suite_id = int.from_bytes(msg[off:off + 2], "big")
        ext = _extensions(msg, off + 3)
        sv = ext.get(_EXT_VERSIONS)
        version = int.from_bytes(sv, "big") if sv and len(sv) == 2 else int.from_bytes(msg[:2], "big")
        if random == _HRR_RANDOM:           # HelloRetryRequest: TLS 1.3, a second ClientHello
            self._tls13 = True              # follows (with the same client random, RFC 8446 4.1.2)
            self._early_state = "rejected" if self._early_offered else None
            return
        suite = SUITES.get(suite_id)
        if version not in (0x0303, 0x0304) or suite is None or \
                (version == 0x0304) != (suite_id >> 8 == 0x13):
            vname = {0x0300: "SSL 3.0", 0x0301: "TLS 1.0", 0x0302: "TLS 1.1", 0x0303: "TLS 1.2",
                     0x0304: "TLS 1.3"}.get(version, hex(version))
            self._problem(None, "unsupported", f"{vname} with cipher suite 0x{suite_id:04x}"
                          + (f" ({suite.name})" if suite else "") + " is not decrypted")
            return self._kill()
        self._suite, self._tls13 = suite, version == 0x0304
        self._etm = _EXT_ETM in ext and suite.cipher == "cbc"
        self._hellos[1] += 1
        self._gens.setdefault(self._hellos[1], {}).update(sr=random, suite=suite, etm=self._etm)
        if self._tls13:
            if self._early_offered and self._early_state is None and _EXT_PSK not in ext:
                self._early_state = "rejected"
            self._epoch(d, "SERVER_HANDSHAKE_TRAFFIC_SECRET")
            if not self._early_offered or self._early_state is not None:
                self._client_plan()

    def _client_plan(self) -> None:
        """1.3: which key the client's next encrypted records use (0-RTT or handshake)."""
        c = self._dirs[0] if self._dirs[0].client else self._dirs[1]
        if self._early_state == "accepted":
            self._epoch(c, "CLIENT_EARLY_TRAFFIC_SECRET", early=True)
        else:
            self._epoch(c, "CLIENT_HANDSHAKE_TRAFFIC_SECRET")
            c.trial = self._early_state == "rejected"

    def _epoch(self, d: _Dir, label: str, early: bool = False) -> None:
        d.want, d.open, d.secret, d.seq, d.early, d.trial = label, None, None, 0, early, False

    def _epoch12(self, d: _Dir) -> None:
        self._epoch(d, "CLIENT_RANDOM")
        d.gen = self._hellos[0 if d.client else 1]

    def _build(self, d: _Dir) -> None:
        """The opener for d's epoch from the key log, or _Block until it is there."""
        if d.want is None:
            # the server's EncryptedExtensions will tell which key the client's records use
            # (0-RTT accepted or not): the other direction must move first
            raise _Block
        if not self._tls13:
            return self._build12(d)
        secret = (self._keys(self._client_random) or {}).get(d.want)
        if secret is None:
            d.blocked_on_keys = True
            raise _Block
        d.secret = secret
        d.open = opener13(self._suite, secret)

    def _build12(self, d: _Dir) -> None:
        g = self._gens.get(d.gen, {})
        if "cr" not in g or "sr" not in g:
            # a renegotiation whose other hello is in the other direction, not read yet
            raise _Block
        if "openers" not in g:
            master = (self._keys(g["cr"]) or {}).get("CLIENT_RANDOM")
            if master is None:
                d.blocked_on_keys = True
                raise _Block
            g["openers"] = openers12(g["suite"], master, g["cr"], g["sr"], g["etm"])
        d.open = g["openers"][0 if d.client else 1]

    # -- gaps ------------------------------------------------------------------------------
    def _gap(self, d: _Dir, nbytes: int) -> None:
        partial = len(d.buf) - d.pos
        self.stats["gaps"] += 1
        d.buf.clear()
        d.pos = d.need = 0
        d.hs.clear()
        if not self._started:
            self._started = True
            self._problem(d.d, "midstream", f"{nbytes} bytes before the first captured ones were "
                          "never captured (no ClientHello): not decrypted")
            return self._kill()
        if self._suite is None or d.want is None:
            # the plaintext handshake, which the keys are made of, is incomplete
            self._problem(d.d, "gap", f"{nbytes} bytes not captured during the handshake: "
                          "the connection is not decrypted")
            return self._kill()
        d.missing += nbytes
        d.skipped += partial        # the cut record's start: useless without its end
        d.lost = True

    def _resync(self, d: _Dir) -> bool:
        """Find the next record after a gap: a plausible header whose record some expected key
        and sequence number opens. True once found (the record is processed)."""
        if d.open is None:
            self._build(d)                 # the gap came right after a key change
        b, i = d.buf, d.pos
        while (m := _HEADER.search(b, i)) is not None:
            i = m.start()
            if i + 5 > len(b):
                break
            n = (b[i + 3] << 8) | b[i + 4]
            if n > _MAX_RECORD:
                i += 1
                continue
            if i + 5 + n > len(b):
                break                      # wait for the whole candidate
            hdr, body = memoryview(b)[i:i + 5], memoryview(b)[i + 5:i + 5 + n]
            # the gap hid at least this many records (of the largest size); a bulk transfer's
            # records are near it, so the window starts there (a 4 MiB hole: ~250 records)
            least = max(0, d.missing // (_MAX_RECORD + 5) - 1)   # (-1: the cut records at its ends)
            for open_, seq, switch in self._candidates(d):
                for s in range(seq + least, seq + least + _RESYNC_SEQS):
                    res = open_(hdr, body, s)
                    if res is not None:
                        switch()
                        skipped = d.skipped + i - d.pos
                        self.stats["bytes_skipped"] += i - d.pos
                        self._problem(d.d, "gap", f"{d.missing} bytes not captured; decryption "
                                      f"resumed after skipping {skipped} captured bytes, at "
                                      f"record sequence number {s} ({s - d.seq} records lost)")
                        d.lost, d.missing, d.skipped, d.seq, d.tries = False, 0, 0, s + 1, 0
                        d.pos = i + 5 + n
                        self._content(d, res[0], res[1])
                        return True
            d.tries += 1
            if d.tries >= _RESYNC_TRIES:
                # every record after the gap fails (several records and a KeyUpdate lost?):
                # stop spending trial decryptions on this direction
                self._problem(d.d, "gap", f"{d.missing} bytes not captured; no key opened any of "
                              f"the next {_RESYNC_TRIES} records: this direction is not decrypted "
                              "any more")
                d.gone = True
                i = len(b)
                break
            i += 1
        else:
            i = max(i, len(b) - 4)         # a header may start in the last 4 bytes
        # nothing yet: bytes before i can hold no record start we can open
        self.stats["bytes_skipped"] += i - d.pos
        d.skipped += i - d.pos
        d.pos = i
        return False

    def _candidates(self, d: _Dir):
        """(opener, first sequence number, make-it-current) for the keys a record after a gap
        may use: the current epoch's, and in 1.3 the next one (a Finished or KeyUpdate lost)."""
        yield d.open, d.seq, lambda: None
        if not self._tls13 or d.secret is None:
            return
        if d.want.endswith("HANDSHAKE_TRAFFIC_SECRET"):
            label = ("CLIENT_" if d.client else "SERVER_") + "TRAFFIC_SECRET_0"
            secret = (self._keys(self._client_random) or {}).get(label)
        elif d.want[-1].isdigit():
            label = d.want.rsplit("_", 1)[0] + f"_{int(d.want.rsplit('_', 1)[1]) + 1}"
            secret = next_traffic_secret(d.secret)
        else:
            return
        if secret is None:
            return
        opener = opener13(self._suite, secret)

        def switch():
            d.want, d.secret, d.open, d.early = label, secret, opener, False
        yield opener, 0, switch
