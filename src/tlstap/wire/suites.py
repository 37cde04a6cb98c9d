"""Cipher suites the wire decryptor handles, and the record keys each derives from a key log secret.

One table keyed by the suite id of the ServerHello. TLS 1.3 keys come from a traffic secret by
HKDF-Expand-Label (RFC 8446 7.3); TLS 1.2 keys from the master secret by the PRF's key block
(RFC 5246 6.3). An "opener" turns one record (header, body, sequence number) into
(content type, plaintext) or None when it fails authentication.
"""
from __future__ import annotations

import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ..sources.keys import hkdf_expand_label

_TAG = 16
_AAD12 = struct.Struct(">QBHH")       # TLS 1.2 additional data: seq, type, version, length


@dataclass(frozen=True, slots=True)
class Suite:
    name: str
    cipher: str          # "gcm", "chacha" or "cbc"
    key_len: int
    hash: str            # HKDF hash (1.3) or PRF hash (1.2)
    mac: str | None = None   # CBC suites: the record MAC's hash

    @property
    def mac_len(self) -> int:
        return {None: 0, "sha1": 20, "sha256": 32, "sha384": 48}[self.mac]

    @property
    def iv_len(self) -> int:
        # 1.2 GCM: a 4-byte salt (the other 8 bytes travel in each record); CBC: explicit per record
        return {"gcm": 4, "chacha": 12, "cbc": 0}[self.cipher]


# suite id -> (name, cipher, key length, HKDF/PRF hash, CBC MAC hash). The TLS 1.2 suites that
# differ only by key exchange (ECDHE-ECDSA, ECDHE-RSA, DHE-RSA, RSA) protect records alike.
_TABLE = {
    0x1301: ("TLS_AES_128_GCM_SHA256", "gcm", 16, "sha256", None),
    0x1302: ("TLS_AES_256_GCM_SHA384", "gcm", 32, "sha384", None),
    0x1303: ("TLS_CHACHA20_POLY1305_SHA256", "chacha", 32, "sha256", None),
    0xC02B: ("ECDHE-ECDSA-AES128-GCM-SHA256", "gcm", 16, "sha256", None),
    0xC02F: ("ECDHE-RSA-AES128-GCM-SHA256", "gcm", 16, "sha256", None),
    0x009E: ("DHE-RSA-AES128-GCM-SHA256", "gcm", 16, "sha256", None),
    0x009C: ("AES128-GCM-SHA256", "gcm", 16, "sha256", None),
    0xC02C: ("ECDHE-ECDSA-AES256-GCM-SHA384", "gcm", 32, "sha384", None),
    0xC030: ("ECDHE-RSA-AES256-GCM-SHA384", "gcm", 32, "sha384", None),
    0x009F: ("DHE-RSA-AES256-GCM-SHA384", "gcm", 32, "sha384", None),
    0x009D: ("AES256-GCM-SHA384", "gcm", 32, "sha384", None),
    0xCCA9: ("ECDHE-ECDSA-CHACHA20-POLY1305", "chacha", 32, "sha256", None),
    0xCCA8: ("ECDHE-RSA-CHACHA20-POLY1305", "chacha", 32, "sha256", None),
    0xCCAA: ("DHE-RSA-CHACHA20-POLY1305", "chacha", 32, "sha256", None),
    0xC009: ("ECDHE-ECDSA-AES128-SHA", "cbc", 16, "sha256", "sha1"),
    0xC013: ("ECDHE-RSA-AES128-SHA", "cbc", 16, "sha256", "sha1"),
    0x0033: ("DHE-RSA-AES128-SHA", "cbc", 16, "sha256", "sha1"),
    0x002F: ("AES128-SHA", "cbc", 16, "sha256", "sha1"),
    0xC00A: ("ECDHE-ECDSA-AES256-SHA", "cbc", 32, "sha256", "sha1"),
    0xC014: ("ECDHE-RSA-AES256-SHA", "cbc", 32, "sha256", "sha1"),
    0x0039: ("DHE-RSA-AES256-SHA", "cbc", 32, "sha256", "sha1"),
    0x0035: ("AES256-SHA", "cbc", 32, "sha256", "sha1"),
    0xC023: ("ECDHE-ECDSA-AES128-SHA256", "cbc", 16, "sha256", "sha256"),
    0xC027: ("ECDHE-RSA-AES128-SHA256", "cbc", 16, "sha256", "sha256"),
    0x0067: ("DHE-RSA-AES128-SHA256", "cbc", 16, "sha256", "sha256"),
    0x003C: ("AES128-SHA256", "cbc", 16, "sha256", "sha256"),
    0x006B: ("DHE-RSA-AES256-SHA256", "cbc", 32, "sha256", "sha256"),
    0x003D: ("AES256-SHA256", "cbc", 32, "sha256", "sha256"),
    0xC024: ("ECDHE-ECDSA-AES256-SHA384", "cbc", 32, "sha384", "sha384"),
    0xC028: ("ECDHE-RSA-AES256-SHA384", "cbc", 32, "sha384", "sha384"),
}
SUITES = {sid: Suite(*row) for sid, row in _TABLE.items()}


def tls12_prf(secret: bytes, label: bytes, seed: bytes, length: int, hash_name: str) -> bytes:
    """RFC 5246 5: P_hash(secret, label + seed). By hand: `cryptography` has no public TLS PRF
    (its HMAC would do, but the stdlib's one-shot hmac.digest is simpler; once per handshake)."""
    seed = label + seed
    out, a = b"", seed
    while len(out) < length:
        a = hmac.digest(secret, a, hash_name)
        out += hmac.digest(secret, a + seed, hash_name)
    return out[:length]


def _aead(suite: Suite, key: bytes):
    return ChaCha20Poly1305(key) if suite.cipher == "chacha" else AESGCM(key)


def opener13(suite: Suite, secret: bytes):
    """TLS 1.3 record protection (RFC 8446 5.2): nonce = iv XOR seq, the header is the AAD, the
    inner plaintext ends with its real content type followed by zero padding."""
    aead = _aead(suite, hkdf_expand_label(secret, b"key", b"", suite.key_len, suite.hash))
    iv = int.from_bytes(hkdf_expand_label(secret, b"iv", b"", 12, suite.hash), "big")
    decrypt = aead.decrypt

    def open_(hdr, body, seq):
        try:
            p = decrypt((iv ^ seq).to_bytes(12, "big"), body, hdr)
        except InvalidTag:
            return None
        end = len(p) - 1
        if end >= 0 and p[end] == 0:       # padded (rare): strip in C, not byte by byte
            end = len(p.rstrip(b"\0")) - 1
        if end < 0:
            return None      # all padding, no content type: RFC 8446 says unexpected_message
        return p[end], memoryview(p)[:end]
    return open_


def openers12(suite: Suite, master: bytes, client_random: bytes, server_random: bytes, etm: bool):
    """(client opener, server opener) for TLS 1.2 from the master secret's key block."""
    m, k, i = suite.mac_len, suite.key_len, suite.iv_len
    kb = tls12_prf(master, b"key expansion", server_random + client_random, 2 * (m + k + i), suite.hash)
    macs, kb = (kb[:m], kb[m:2 * m]), kb[2 * m:]
    keys, ivs = (kb[:k], kb[k:2 * k]), (kb[2 * k:2 * k + i], kb[2 * k + i:2 * k + 2 * i])
    make = {"gcm": _gcm12, "chacha": _chacha12, "cbc": _cbc12}[suite.cipher]
    return tuple(make(suite, macs[n], keys[n], ivs[n], etm) for n in (0, 1))


def _gcm12(suite, _mac, key, salt, _etm):
    decrypt, pack = AESGCM(key).decrypt, _AAD12.pack

    def open_(hdr, body, seq):
        # 8 bytes of explicit nonce, then ciphertext and tag (RFC 5288 3)
        if len(body) < 8 + _TAG:
            return None
        aad = pack(seq, hdr[0], (hdr[1] << 8) | hdr[2], len(body) - 8 - _TAG)
        try:
            return hdr[0], decrypt(salt + bytes(body[:8]), body[8:], aad)
        except InvalidTag:
            return None
    return open_


def _chacha12(suite, _mac, key, iv, _etm):
    decrypt, pack, iv = ChaCha20Poly1305(key).decrypt, _AAD12.pack, int.from_bytes(iv, "big")

    def open_(hdr, body, seq):
        # RFC 7905 2: no explicit nonce, the sequence number XORed into the 12-byte IV
        if len(body) < _TAG:
            return None
        aad = pack(seq, hdr[0], (hdr[1] << 8) | hdr[2], len(body) - _TAG)
        try:
            return hdr[0], decrypt((iv ^ seq).to_bytes(12, "big"), body, aad)
        except InvalidTag:
            return None
    return open_


def _cbc12(suite, mac_key, key, _iv, etm):
    m, h, pack, aes = suite.mac_len, suite.mac, _AAD12.pack, algorithms.AES(key)

    def unpad(p):
        pad = p[-1] if p else 256
        if pad + 1 > len(p) or any(b != pad for b in p[len(p) - pad - 1:]):
            return None
        return p[:len(p) - pad - 1]

    def open_(hdr, body, seq):
        # each record: a 16-byte explicit IV, then the CBC blocks (RFC 5246 6.2.3.2)
        ver = (hdr[1] << 8) | hdr[2]
        if etm:     # RFC 7366: the MAC covers IV + ciphertext and is checked before decrypting
            n = len(body) - m
            if n < 32 or n % 16:
                return None
            want = hmac.digest(mac_key, pack(seq, hdr[0], ver, n) + body[:n], h)
            if not hmac.compare_digest(want, body[n:]):
                return None
            d = Cipher(aes, modes.CBC(bytes(body[:16]))).decryptor()
            p = unpad(d.update(body[16:n]) + d.finalize())
            return None if p is None else (hdr[0], p)
        if len(body) < 32 or len(body) % 16:
            return None
        d = Cipher(aes, modes.CBC(bytes(body[:16]))).decryptor()
        p = unpad(d.update(body[16:]) + d.finalize())
        if p is None or len(p) < m:
            return None
        data, tag = p[:len(p) - m], p[len(p) - m:]
        want = hmac.digest(mac_key, pack(seq, hdr[0], ver, len(data)) + data, h)
        return (hdr[0], data) if hmac.compare_digest(want, tag) else None
    return open_
