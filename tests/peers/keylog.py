"""NSS key log lines (the oracle the TLS libraries write) and the TLS 1.3 key schedule steps
needed to check them (RFC 8446 section 7.1 / 7.2), with hmac + hashlib only.

Lines are handled as normalized strings "LABEL <client_random hex> <secret hex>" (single spaces,
lowercase hex) so key logs from different writers compare with plain set/list equality.

OpenSSL's own logging after a TLS 1.3 KeyUpdate (3.0.x since PR #19241, and 3.5) writes the
updated secrets with the literal label CLIENT_TRAFFIC_SECRET_N / SERVER_TRAFFIC_SECRET_N (the
letter N, not a number), one line per update, in order. number_key_updates() turns those into
the numbered _1, _2, ... form; derive_key_updates() computes the same lines from the _0 secrets.
"""
from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

TLS13_LABELS = ("CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
                "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0", "EXPORTER_SECRET")
TLS12_LABEL = "CLIENT_RANDOM"
DIRECTIONS = ("CLIENT", "SERVER")


@dataclass(frozen=True)
class KeyLogLine:
    label: str
    client_random: str   # 64 lowercase hex digits
    secret: str          # lowercase hex

    @classmethod
    def parse(cls, line: str) -> "KeyLogLine":
        f = line.split()
        if len(f) != 3:
            raise ValueError(f"not a key log line: {line!r}")
        label, cr, secret = f
        bytes.fromhex(cr), bytes.fromhex(secret)      # validate
        if len(cr) != 64:
            raise ValueError(f"client random is not 32 bytes: {line!r}")
        return cls(label.upper(), cr.lower(), secret.lower())

    def __str__(self) -> str:
        return f"{self.label} {self.client_random} {self.secret}"


def normalize_keylog_line(line: str) -> str:
    return str(KeyLogLine.parse(line))


def parse_keylog(text: str) -> list[str]:
    """Normalized lines in file order; blank lines and '#' comments dropped."""
    return [normalize_keylog_line(ln) for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]


def read_keylog(path) -> list[str]:
    """parse_keylog of a file; [] if it does not exist (the library wrote nothing yet).

    A final line without newline may be half written by a running process: it is skipped."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    if text and not text.endswith("\n"):
        text = text.rpartition("\n")[0]
    return parse_keylog(text)


def entries(lines) -> list[KeyLogLine]:
    return [KeyLogLine.parse(ln) for ln in lines]


def client_randoms(lines) -> list[str]:
    """Distinct client randoms in order of first appearance (one per connection)."""
    seen = {}
    for e in entries(lines):
        seen.setdefault(e.client_random, None)
    return list(seen)


def for_connection(lines, client_random: str) -> list[str]:
    """The lines of one connection (its client random), in order."""
    cr = client_random.lower()
    return [str(e) for e in entries(lines) if e.client_random == cr]


def by_client_random(lines) -> dict[str, dict[str, list[str]]]:
    """{client_random: {label: [secret, ...]}} (a label can repeat: literal _N lines, resumption)."""
    out: dict[str, dict[str, list[str]]] = {}
    for e in entries(lines):
        out.setdefault(e.client_random, {}).setdefault(e.label, []).append(e.secret)
    return out


def number_key_updates(lines) -> list[str]:
    """Rewrite OpenSSL's literal X_TRAFFIC_SECRET_N lines to X_TRAFFIC_SECRET_1, _2, ... counted
    per connection and direction in file order. Other lines are passed through unchanged."""
    count: dict[tuple[str, str], int] = {}
    out = []
    for e in entries(lines):
        for d in DIRECTIONS:
            if e.label == f"{d}_TRAFFIC_SECRET_N":
                n = count[(e.client_random, d)] = count.get((e.client_random, d), 0) + 1
                e = KeyLogLine(f"{d}_TRAFFIC_SECRET_{n}", e.client_random, e.secret)
        out.append(str(e))
    return out


# ---------------------------------------------------------------- TLS 1.3 key schedule (RFC 8446 7.1)

def hash_for_secret(secret: bytes) -> str:
    """TLS 1.3 traffic secrets are Hash.length long: 32 -> sha256, 48 -> sha384."""
    try:
        return {32: "sha256", 48: "sha384"}[len(secret)]
    except KeyError:
        raise ValueError(f"no TLS 1.3 hash with {len(secret)}-byte output") from None


def hkdf_extract(salt: bytes, ikm: bytes, hash_name: str = "sha256") -> bytes:
    """RFC 5869 HKDF-Extract; an empty salt means Hash.length zero bytes."""
    if not salt:
        salt = bytes(hashlib.new(hash_name).digest_size)
    return hmac.new(salt, ikm, hash_name).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int, hash_name: str = "sha256") -> bytes:
    """RFC 5869 HKDF-Expand: T(i) = HMAC(PRK, T(i-1) | info | i)."""
    out, t, i = b"", b"", 1
    while len(out) < length:
        t = hmac.new(prk, t + info + bytes([i]), hash_name).digest()
        out += t
        i += 1
    return out[:length]


def hkdf_expand_label(secret: bytes, label: str | bytes, context: bytes, length: int,
                      hash_name: str = "sha256") -> bytes:
    """RFC 8446 7.1: HKDF-Expand(secret, HkdfLabel, length) with
    HkdfLabel = uint16 length | opaque label<7..255> = "tls13 " + label | opaque context<0..255>."""
    full = b"tls13 " + (label.encode() if isinstance(label, str) else label)
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + bytes([len(context)]) + context
    return hkdf_expand(secret, info, length, hash_name)


def derive_secret(secret: bytes, label: str, transcript_hash: bytes, hash_name: str = "sha256") -> bytes:
    """Derive-Secret(Secret, Label, Messages) given Transcript-Hash(Messages) already computed."""
    return hkdf_expand_label(secret, label, transcript_hash, hashlib.new(hash_name).digest_size, hash_name)


def tls13_next_secret(secret: bytes, hash_name: str | None = None) -> bytes:
    """RFC 8446 7.2: application_traffic_secret_N+1 =
    HKDF-Expand-Label(application_traffic_secret_N, "traffic upd", "", Hash.length).
    hash_name defaults to the one the secret's length implies."""
    hash_name = hash_name or hash_for_secret(secret)
    return hkdf_expand_label(secret, "traffic upd", b"", hashlib.new(hash_name).digest_size, hash_name)


def traffic_key_iv(secret: bytes, key_len: int, hash_name: str | None = None) -> tuple[bytes, bytes]:
    """RFC 8446 7.3: [sender]_write_key / _iv (iv is 12 bytes for every TLS 1.3 suite)."""
    hash_name = hash_name or hash_for_secret(secret)
    return (hkdf_expand_label(secret, "key", b"", key_len, hash_name),
            hkdf_expand_label(secret, "iv", b"", 12, hash_name))


def derive_key_updates(lines, updates: int | dict[str, int], hash_name: str | None = None) -> list[str]:
    """For every connection in `lines` that has X_TRAFFIC_SECRET_0, the lines
    X_TRAFFIC_SECRET_1 .. _n computed from it (n = updates, or updates[direction] with
    direction 'CLIENT'/'SERVER'). Independent of anything the library logged after _0."""
    per_dir = updates if isinstance(updates, dict) else {d: updates for d in DIRECTIONS}
    out = []
    for e in entries(lines):
        for d in DIRECTIONS:
            if e.label == f"{d}_TRAFFIC_SECRET_0":
                s = bytes.fromhex(e.secret)
                for n in range(1, per_dir.get(d, 0) + 1):
                    s = tls13_next_secret(s, hash_name)
                    out.append(f"{d}_TRAFFIC_SECRET_{n} {e.client_random} {s.hex()}")
    return out
