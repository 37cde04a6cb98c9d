"""The user-space half of keylog mode: HKDF-Expand-Label, key-update tracking, the key log file."""
import hashlib
import hmac
import os
import stat

import pytest

from tlstap.sources.keys import KeyTracker, hkdf_expand_label, next_traffic_secret
from tlstap.sinks.keylogfile import KeyLogWriter

CR = bytes(range(32))


def test_hkdf_expand_label_matches_rfc8448():
    # RFC 8448 section 3 (simple 1-RTT handshake): early secret, then Derive-Secret(., "derived", "")
    early = hmac.new(b"\0" * 32, b"\0" * 32, "sha256").digest()
    assert early.hex() == "33ad0a1c607ec03b09e6cd9893680ce210adf300aa1f2660e1b22e10f170f92a"
    derived = hkdf_expand_label(early, b"derived", hashlib.sha256(b"").digest(), 32, "sha256")
    assert derived.hex() == "6f2615a108c702c5678f54fc9dbab69716c076189c48250cebeac3576c3611ba"


def test_next_traffic_secret_picks_the_hash_by_length():
    s32, s48 = b"\x01" * 32, b"\x02" * 48
    assert next_traffic_secret(s32) == hkdf_expand_label(s32, b"traffic upd", b"", 32, "sha256")
    assert next_traffic_secret(s48) == hkdf_expand_label(s48, b"traffic upd", b"", 48, "sha384")
    assert len(next_traffic_secret(s48)) == 48


@pytest.mark.parametrize("server,sending,side", [
    (False, True, "CLIENT"),    # a client sends a KeyUpdate: its own (client) key changes
    (False, False, "SERVER"),   # a client receives one: the server's key changed
    (True, True, "SERVER"),
    (True, False, "CLIENT"),
])
def test_key_update_follows_the_right_direction(server, sending, side):
    t = KeyTracker()
    c0, s0 = b"\x11" * 32, b"\x22" * 32
    t.secret("CLIENT_TRAFFIC_SECRET_0", CR, c0, 1, 1, "x")
    t.secret("SERVER_TRAFFIC_SECRET_0", CR, s0, 1, 1, "x")
    first = t.update(CR, server, sending, False, 1, 1, "x")
    second = t.update(CR, server, sending, False, 1, 1, "x")
    base = c0 if side == "CLIENT" else s0
    assert (first.label, first.secret) == (f"{side}_TRAFFIC_SECRET_1", next_traffic_secret(base))
    assert (second.label, second.secret) == (f"{side}_TRAFFIC_SECRET_2",
                                             next_traffic_secret(next_traffic_secret(base)))
    assert first.derived and first.text().startswith(f"{side}_TRAFFIC_SECRET_1 {CR.hex()} ")


def test_library_logged_updates_are_numbered_and_checked():
    t = KeyTracker()
    s0 = b"\x33" * 48
    t.secret("SERVER_TRAFFIC_SECRET_0", CR, s0, 1, 1, "x")
    # 3.x: tls13_update_key is seen first (nothing to write), then the library's own _N line
    assert t.update(CR, True, True, True, 1, 1, "x") is None
    s1 = next_traffic_secret(s0)
    one = t.secret("SERVER_TRAFFIC_SECRET_N", CR, s1, 1, 1, "x")
    assert one.text() == f"SERVER_TRAFFIC_SECRET_1 {CR.hex()} {s1.hex()}" and not one.derived
    odd = t.secret("SERVER_TRAFFIC_SECRET_N", CR, b"\x44" * 48, 1, 1, "x")   # not the derivation
    assert odd.label == "SERVER_TRAFFIC_SECRET_2" and odd.secret == b"\x44" * 48
    assert (t.checked_updates, t.mismatched_updates) == (1, 1)


def test_update_without_a_handshake_is_counted_not_guessed():
    t = KeyTracker()
    assert t.update(CR, False, True, False, 1, 1, "x") is None
    assert t.secret("SERVER_TRAFFIC_SECRET_N", CR, b"\x01" * 32, 1, 1, "x") is None
    assert t.unfollowed_updates == 2


def test_tracker_is_bounded():
    t = KeyTracker(max_conns=2)
    for i in range(3):
        t.secret("CLIENT_TRAFFIC_SECRET_0", bytes([i]) * 32, b"\x01" * 32, 1, 1, "x")
    assert t.update(b"\x00" * 32, False, True, False, 1, 1, "x") is None      # oldest forgotten
    assert t.update(b"\x02" * 32, False, True, False, 1, 1, "x") is not None


def test_repr_hides_the_secret():
    line = KeyTracker().secret("CLIENT_RANDOM", CR, b"\xab" * 48, 1, 1, "curl")
    assert "abab" not in repr(line) and "48 bytes" in repr(line)


def test_key_log_file_is_private_appended_and_deduplicated(tmp_path):
    path = str(tmp_path / "keys.log")
    w = KeyLogWriter(path)
    assert w.write("CLIENT_RANDOM aa bb")
    assert not w.write("CLIENT_RANDOM aa bb")
    # visible at once, before close: each line is one write(2)
    with open(path) as f:
        assert f.read() == "CLIENT_RANDOM aa bb\n"
    w.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    w2 = KeyLogWriter(path)              # a second run does not repeat what the file holds
    assert not w2.write("CLIENT_RANDOM aa bb")
    assert w2.write("CLIENT_RANDOM cc dd")
    w2.close()
    with open(path) as f:
        assert f.read().splitlines() == ["CLIENT_RANDOM aa bb", "CLIENT_RANDOM cc dd"]
