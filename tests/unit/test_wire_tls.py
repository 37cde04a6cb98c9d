"""The wire source's TLS decryptor against real openssl s_client / s_server connections.

Each test records the bytes both directions carried through a loopback relay plus the client's key
log, feeds them (in several chunkings) to TlsConnection and compares the plaintext with what each
peer was given to send.
"""
from __future__ import annotations

import random
import shutil

import pytest

from tests.wire_peers import Server, make_certs, parse_keylog, run_client
from tlstap.wire.suites import SUITES
from tlstap.wire.tls import IN, OUT, Gap, Plain, Problem, TlsConnection

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(str(tmp_path_factory.mktemp("certs")))


def line(tag: str, n: int, rng=random.Random(17)) -> bytes:
    """A unique line of n bytes; starts with '=' so no s_client/s_server command letter."""
    body = "".join(rng.choice("abcdefghij0123456789") for _ in range(n - len(tag) - 2))
    return f"={tag}{body}\n".encode()


def chat(n: int = 3) -> list:
    script = []
    for i in range(n):
        script += [("c", line(f"c{i}", 40 + 7 * i)), ("s", line(f"s{i}", 300 + 11 * i))]
    return script


def session(certs, tmp_path, script, cargs=(), sargs=(), server_keylog=False):
    """One connection; returns (recorded Conn, {OUT: client's bytes, IN: server's}, keys callable)
    with the client's key log (or the server's)."""
    keylog, skeylog = str(tmp_path / "keylog"), str(tmp_path / "server-keylog")
    srv = Server(certs, [*sargs, "-keylogfile", skeylog] if server_keylog else sargs)
    try:
        conn, sent = run_client(srv, 0, keylog, script, cargs)
    finally:
        srv.close()
    keys = parse_keylog(skeylog if server_keylog else keylog)
    return conn, sent, lambda cr: keys.get(cr, {})


def pieces(events, how: str):
    """The recorded events re-cut: as captured, in 1-byte pieces, in random-sized pieces, or each
    direction whole, the server's first (the wire's order across directions lost)."""
    if how == "as-captured":
        return [(d, [b]) for d, b in events]
    if how == "server-first":
        return [(d, [b for e, b in events if e == d]) for d in (IN, OUT)]
    if how == "bytes":
        return [(d, [b[i:i + 1] for i in range(len(b))]) for d, b in events]
    rng = random.Random(5)
    out = []
    for d, b in events:
        i = 0
        while i < len(b):
            n = rng.randint(1, 700)
            out.append((d, [b[i:i + n]]))
            i += n
    return out


def decrypt(events, keys, how="as-captured", swap=False):
    """Feed the connection; swap: the local end is the server (its OUT is what the server sent)."""
    t = TlsConnection(keys)
    out = []
    for d, ps in pieces(events, how):
        out += t.feed(1 - d if swap else d, ps)
    return t, out


def plaintext(results, direction, early=False) -> bytes:
    return b"".join(r.data for r in results
                    if isinstance(r, Plain) and r.direction == direction and r.early == early)


def problems(results):
    return [r for r in results if isinstance(r, Problem)]


def assert_decrypts(conn, sent, keys, hows=("as-captured", "bytes", "random", "server-first")):
    for how in hows:
        for swap in (False, True):
            t, res = decrypt(conn.events, keys, how, swap)
            assert problems(res) == [], (how, swap)
            c, s = (IN, OUT) if swap else (OUT, IN)
            assert plaintext(res, c) == sent[OUT], (how, swap)
            assert plaintext(res, s) == sent[IN], (how, swap)
            assert not t.waiting and t.client_direction == c
    return t


TLS13 = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]


@pytest.mark.parametrize("suite", TLS13)
def test_tls13_suites(certs, tmp_path, suite):
    conn, sent, keys = session(certs, tmp_path, chat(), ["-ciphersuites", suite])
    t = assert_decrypts(conn, sent, keys)
    assert (t.version, t.suite) == ("TLS 1.3", suite)


TLS12 = [s.name for sid, s in SUITES.items() if sid >> 8 != 0x13]     # every 1.2 suite we know
SUITES_BY_NAME = {s.name: s for s in SUITES.values()}
CASES12 = [(s, True) for s in TLS12] + [(s, False) for s in TLS12 if SUITES_BY_NAME[s].cipher == "cbc"]


@pytest.mark.parametrize("suite,etm", CASES12,
                         ids=[f"{s}-{'etm' if e else 'no_etm'}" for s, e in CASES12])
def test_tls12_suites(certs, tmp_path, suite, etm):
    """Every TLS 1.2 suite shape; CBC suites with encrypt-then-MAC (OpenSSL's default) and without."""
    cargs = ["-tls1_2", "-cipher", suite] + ([] if etm else ["-no_etm"])
    conn, sent, keys = session(certs, tmp_path, chat(), cargs)
    t = assert_decrypts(conn, sent, keys, ("as-captured", "random", "server-first"))
    assert (t.version, t.suite) == ("TLS 1.2", suite)
    assert t.encrypt_then_mac == (etm and SUITES_BY_NAME[suite].cipher == "cbc")


def sessions(certs, tmp_path, runs, sargs=()):
    """Several connections to one s_server (resumption needs its session cache / ticket keys):
    runs = [(script, client args)]; returns [(Conn, sent)] and the keys callable."""
    keylog = str(tmp_path / "keylog")
    srv = Server(certs, sargs, nconns=len(runs))
    try:
        out = [run_client(srv, i, keylog, script, cargs) for i, (script, cargs) in enumerate(runs)]
    finally:
        srv.close()
    keys = parse_keylog(keylog)
    return out, lambda cr: keys.get(cr, {})


def test_tls13_hello_retry_request(certs, tmp_path):
    """The server wants P-256, the client's key share is X25519: HelloRetryRequest, then a
    second ClientHello."""
    conn, sent, keys = session(certs, tmp_path, chat(), sargs=["-groups", "P-256"])
    assert HRR_RANDOM in conn.stream(IN)[:100]
    out = conn.stream(OUT)
    randoms = [out[o + 11:o + 43] for o, _n in records(out) if out[o] == 22 and out[o + 5] == 1]
    assert len(randoms) == 2 and randoms[0] == randoms[1]     # OpenSSL keeps it (RFC 8446 4.1.2)
    assert_decrypts(conn, sent, keys)


def test_tls13_key_update_both_directions(certs, tmp_path):
    # client K (update_requested): both ends update; then server K: both again. A peer answers
    # a request when it next writes, after it read the request: hence the line before each answer.
    script = chat(1) + [("c", b"K\n"), ("c", line("c1", 70)), ("s", line("s1", 80)),
                        ("s", b"K\n"), ("s", line("s2", 90)), ("c", line("c2", 50))]
    conn, sent, keys = session(certs, tmp_path, script, ["-ciphersuites", "TLS_AES_128_GCM_SHA256"])
    t = assert_decrypts(conn, sent, keys)
    assert t.stats["key_updates"] == 4


@pytest.mark.parametrize("how", ["session-id", "ticket"])
def test_tls12_resumption(certs, tmp_path, how):
    """An abbreviated handshake (the server's ChangeCipherSpec first), keyed by the new client random."""
    sess = str(tmp_path / "sess")
    ticket = ["-no_ticket"] if how == "session-id" else []
    base = ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256", *ticket]
    runs, keyf = sessions(certs, tmp_path, [(chat(), base + ["-sess_out", sess]),
                                            (chat(), base + ["-sess_in", sess])], ticket)
    (full, sent1), (resumed, sent2) = runs
    assert len(resumed.stream(IN)) < len(full.stream(IN)) - 200     # no certificate: resumed
    assert_decrypts(full, sent1, keyf, ("as-captured",))
    assert_decrypts(resumed, sent2, keyf)


def server_hello_extensions(stream: bytes) -> set[int]:
    """Extension types of the (last, not HelloRetryRequest) ServerHello in the server's bytes."""
    found: set[int] = set()
    for o, n in records(stream):
        rec = stream[o:o + n]
        if rec[0] != 22 or rec[5] != 2:
            continue
        msg = rec[9:]
        if msg[2:34] == HRR_RANDOM:
            continue
        off = 35 + msg[34] + 3
        end, off = off + 2 + int.from_bytes(msg[off:off + 2], "big"), off + 2
        found = set()
        while off < end:
            found.add(int.from_bytes(msg[off:off + 2], "big"))
            off += 4 + int.from_bytes(msg[off + 2:off + 4], "big")
    return found


def test_tls13_psk_resumption(certs, tmp_path):
    sess = str(tmp_path / "sess")
    runs, keyf = sessions(certs, tmp_path, [(chat(), ["-sess_out", sess]), (chat(), ["-sess_in", sess])])
    (full, _sent1), (resumed, sent2) = runs
    assert 41 in server_hello_extensions(resumed.stream(IN))         # pre_shared_key: resumed
    assert 41 not in server_hello_extensions(full.stream(IN))
    assert_decrypts(resumed, sent2, keyf)


def test_tls13_early_data_accepted_then_replay_rejected(certs, tmp_path):
    """0-RTT: the first use of the ticket is accepted (early Plain), its replay rejected by
    OpenSSL's anti-replay (the client's early records: skipped, the rest decrypted)."""
    sess, early = str(tmp_path / "sess"), tmp_path / "early"
    early.write_bytes(line("early", 200))
    ed = ["-sess_in", sess, "-early_data", str(early)]
    runs, keyf = sessions(certs, tmp_path, [(chat(1), ["-sess_out", sess]), (chat(), ed), (chat(), ed)],
                          ["-early_data", "-max_early_data", "16384"])
    (_c0, _s0), (accepted, sent1), (rejected, sent2) = runs
    for how in ("as-captured", "bytes", "random", "server-first"):
        t, res = decrypt(accepted.events, keyf, how)
        assert problems(res) == []
        assert plaintext(res, OUT, early=True) == early.read_bytes() and t.early_data == "accepted"
        assert (plaintext(res, OUT), plaintext(res, IN)) == (sent1[OUT], sent1[IN])
        t, res = decrypt(rejected.events, keyf, how)
        assert problems(res) == []
        assert plaintext(res, OUT, early=True) == b""
        assert (plaintext(res, OUT), plaintext(res, IN)) == (sent2[OUT], sent2[IN])
        assert t.stats["early_records_skipped"] >= 1


def records(stream: bytes) -> list[tuple[int, int]]:
    """(offset, length incl. header) of each record in a recorded direction."""
    out, i = [], 0
    while i + 5 <= len(stream):
        n = 5 + int.from_bytes(stream[i + 3:i + 5], "big")
        out.append((i, n))
        i += n
    return out


def client_lines(n):
    """n client lines of distinct lengths, then one server line (so the client's are all sent)."""
    return [("c", line(f"c{i}", 60 + 29 * i)) for i in range(n)] + [("s", line("s", 100))]


def find_record(stream: bytes, overhead: int, msg: bytes) -> tuple[int, int]:
    """The record that carries msg, known by its length (msg lengths are distinct)."""
    (hit,) = [(o, n) for o, n in records(stream) if n == 5 + len(msg) + overhead]
    return hit


def with_client_stream(events, new_out: list) -> list:
    """events with the client's bytes replaced by new_out's pieces (fed where the first OUT was)."""
    out, done = [], False
    for d, b in events:
        if d == IN:
            out.append((IN, b))
        elif not done:
            out.append((OUT, new_out))
            done = True
    return out


def feed_events(t, events):
    res = []
    for d, b in events:
        res += t.feed(d, b if isinstance(b, list) else [b])
    return res


# (client args, bytes a record adds to its plaintext: 1.3 inner type + tag; 1.2 CBC: IV + MAC + pad)
AUTH_CASES = {"tls13-aes128gcm": (["-ciphersuites", "TLS_AES_128_GCM_SHA256"], 17),
              "tls12-aes128gcm": (["-tls1_2", "-cipher", "ECDHE-RSA-AES128-GCM-SHA256"], 24),
              "tls12-cbc-sha1-mte": (["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA", "-no_etm"], None)}


def cbc_len(msg_len: int) -> int:
    """AES-CBC-SHA1 MAC-then-encrypt record body length for msg_len plaintext bytes."""
    return 16 + (msg_len + 20) // 16 * 16 + 16


def locate(stream, overhead, msg):
    if overhead is None:
        (hit,) = [(o, n) for o, n in records(stream) if n == 5 + cbc_len(len(msg))]
        return hit
    return find_record(stream, overhead, msg)


@pytest.mark.parametrize("case", list(AUTH_CASES))
def test_flipped_bit_is_auth_problem_rest_decrypted(certs, tmp_path, case):
    cargs, overhead = AUTH_CASES[case]
    script = client_lines(4)
    conn, sent, keys = session(certs, tmp_path, script, cargs)
    msgs = [d for w, d in script if w == "c"]
    out = bytearray(conn.stream(OUT))
    off, n = locate(out, overhead, msgs[1])
    out[off + n - 3] ^= 0x10
    t = TlsConnection(keys)
    res = feed_events(t, with_client_stream(conn.events, [bytes(out)]))
    assert [(p.direction, p.kind) for p in problems(res)] == [(OUT, "auth")]
    assert plaintext(res, OUT) == msgs[0] + msgs[2] + msgs[3]
    assert plaintext(res, IN) == sent[IN]
    assert t.stats["auth_failures"] == 1


@pytest.mark.parametrize("case", list(AUTH_CASES))
def test_gap_resynchronises(certs, tmp_path, case):
    """Bytes from inside one record to inside the next are never captured: a Gap; decryption
    resumes at the record after (its sequence number found by trial)."""
    cargs, overhead = AUTH_CASES[case]
    script = client_lines(6)
    conn, sent, keys = session(certs, tmp_path, script, cargs)
    msgs = [d for w, d in script if w == "c"]
    out = conn.stream(OUT)
    o1, n1 = locate(out, overhead, msgs[1])
    o2, n2 = locate(out, overhead, msgs[2])
    cut_from, cut_to = o1 + n1 // 2, o2 + n2 // 2          # msgs[1] and msgs[2] are lost
    for how in ("as-captured", "bytes"):
        tail = out[cut_to:]
        tail_pieces = [tail] if how == "as-captured" else [tail[i:i + 1] for i in range(len(tail))]
        t = TlsConnection(keys)
        res = feed_events(t, with_client_stream(conn.events,
                                                [out[:cut_from], Gap(cut_to - cut_from), *tail_pieces]))
        kinds = [(p.direction, p.kind) for p in problems(res)]
        assert kinds == [(OUT, "gap")], res
        assert f"{cut_to - cut_from} bytes not captured" in problems(res)[0].detail
        assert plaintext(res, OUT) == msgs[0] + b"".join(msgs[3:]), how
        assert plaintext(res, IN) == sent[IN]


def test_keys_late_then_retry_and_give_up(certs, tmp_path):
    conn, sent, keys = session(certs, tmp_path, chat(), ["-ciphersuites", "TLS_AES_128_GCM_SHA256"])
    have = {}
    t = TlsConnection(lambda cr: have)
    res = feed_events(t, conn.events)
    assert res == [] and t.waiting
    have.update(keys(next(iter(parse_keylog(str(tmp_path / "keylog"))))))
    res = t.retry()
    assert not t.waiting and problems(res) == []
    assert (plaintext(res, OUT), plaintext(res, IN)) == (sent[OUT], sent[IN])

    t = TlsConnection(lambda cr: {})
    assert feed_events(t, conn.events) == [] and t.waiting
    (p,) = t.give_up("no key log line within 5 s")
    assert p.kind == "nokeys" and "no key log line within 5 s" in p.detail and not t.waiting
    assert feed_events(t, conn.events) == [] and t.retry() == []


def test_big_transfer_and_held_bytes_bounded(certs, tmp_path):
    """4.8 MB in near-full records, fed in packet-sized pieces: decrypted. With keys that never
    come: past 4 MiB held, the connection gives up by itself, once."""
    big = [("c", line(f"b{i}", 16000)) for i in range(300)] + [("s", line("s", 10))]
    conn, sent, keys = session(certs, tmp_path, big, ["-ciphersuites", "TLS_AES_128_GCM_SHA256"])
    t = TlsConnection(keys)
    res = feed_events(t, [(d, [b[i:i + 1448] for i in range(0, len(b), 1448)])
                          for d, b in conn.events])
    assert problems(res) == [] and (plaintext(res, OUT), plaintext(res, IN)) == (sent[OUT], sent[IN])
    t = TlsConnection(lambda cr: {})
    res = feed_events(t, conn.events)
    assert [p.kind for p in problems(res)] == ["nokeys"] and not t.waiting


def test_not_tls_and_midstream(certs, tmp_path):
    t = TlsConnection(lambda cr: {})
    res = t.feed(OUT, [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"])
    assert [p.kind for p in res] == ["notls"]
    assert t.feed(IN, [b"HTTP/1.1 200 OK\r\n\r\n"]) == [] and t.feed(OUT, [b"more"]) == []

    conn, _sent, keys = session(certs, tmp_path, client_lines(3))
    out = conn.stream(OUT)
    app = records(out)[3][0]           # ClientHello, ChangeCipherSpec, Finished, then data
    for first in ([out[app:]], [out[app + 7:]], [Gap(app), out[app:]]):
        t = TlsConnection(keys)
        res = t.feed(OUT, first)
        assert [p.kind for p in res] == ["midstream"], first[0][:8]
        assert t.feed(IN, [conn.stream(IN)]) == []


def test_tls12_renegotiation(certs, tmp_path):
    """s_client's "R" command: a new handshake under the old keys, then new keys from the new
    client random's CLIENT_RANDOM line after each direction's ChangeCipherSpec."""
    script = chat(1) + [("c", b"R\n"), ("c", line("c1", 70)), ("s", line("s1", 90)),
                        ("c", line("c2", 80)), ("s", line("s2", 80))]
    conn, sent, keys = session(certs, tmp_path, script,
                               ["-tls1_2", "-cipher", "ECDHE-RSA-AES256-GCM-SHA384"],
                               ["-client_renegotiation"])
    assert len(parse_keylog(str(tmp_path / "keylog"))) == 2      # two client randoms: renegotiated
    assert_decrypts(conn, sent, keys)


def test_midstream_in_small_pieces(certs, tmp_path):
    """Joining inside a record, fed a byte at a time: midstream once a record boundary shows."""
    conn, _sent, keys = session(certs, tmp_path, client_lines(3))
    out = conn.stream(OUT)
    start = records(out)[3][0] + 7
    t = TlsConnection(keys)
    res = []
    for i in range(start, len(out)):
        res += t.feed(OUT, [out[i:i + 1]])
    assert [p.kind for p in res] == ["midstream"]


@pytest.mark.parametrize("cargs,sargs,name", [
    (["-ciphersuites", "TLS_AES_128_CCM_SHA256"], ["-ciphersuites", "TLS_AES_128_CCM_SHA256"],
     "TLS 1.3 with cipher suite 0x1304"),
    (["-tls1_1", "-cipher", "ECDHE-RSA-AES128-SHA@SECLEVEL=0"], ["-cipher", "ALL@SECLEVEL=0"],
     "TLS 1.1 with cipher suite 0xc013")])
def test_unsupported(certs, tmp_path, cargs, sargs, name):
    conn, _sent, keys = session(certs, tmp_path, chat(1), cargs, sargs)
    t, res = decrypt(conn.events, keys)
    assert [(p.kind, p.detail.startswith(name)) for p in res] == [("unsupported", True)], res


@pytest.fixture(scope="module")
def recorded(certs, tmp_path_factory):
    """A TLS 1.3, a TLS 1.2 CBC (MAC-then-encrypt) and a TLS 1.3 0-RTT connection, with what
    each end sent (the early data counted with the client's)."""
    out = []
    for cargs in (["-ciphersuites", "TLS_AES_128_GCM_SHA256"],
                  ["-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA", "-no_etm"]):
        out.append(session(certs, tmp_path_factory.mktemp("rec"), client_lines(4) + chat(2), cargs))
    tmp = tmp_path_factory.mktemp("rec")
    sess, early = str(tmp / "sess"), tmp / "early"
    early.write_bytes(line("early", 300))
    runs, keys = sessions(certs, tmp, [(chat(1), ["-sess_out", sess]),
                                       (chat(2), ["-sess_in", sess, "-early_data", str(early)])],
                          ["-early_data", "-max_early_data", "16384"])
    conn, sent = runs[1]
    out.append((conn, {OUT: early.read_bytes() + sent[OUT], IN: sent[IN]}, keys))
    return out


def test_hostile_bytes_never_raise_and_never_show_forgeries(recorded):
    """Flipped bytes, gaps, odd cuts, keys that come late or never: only Plain and Problem come
    out, and every Plain is a piece of what that end really sent."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    unit = st.floats(0, 1)

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(which=st.integers(0, 2), flips=st.lists(st.tuples(unit, unit, st.integers(1, 255)),
                                                    max_size=4),
           cuts=st.lists(unit, max_size=6), gap=st.none() | st.tuples(unit, st.integers(1, 3000)),
           keys_come=st.sampled_from(["now", "late", "never"]))
    def check(which, flips, cuts, gap, keys_come):
        conn, sent, keys = recorded[which]
        have = [keys_come == "now"]
        t = TlsConnection(lambda cr: keys(cr) if have[0] else {})
        res = []
        for n, (d, b) in enumerate(conn.events):
            b = bytearray(b)
            for event, where, x in flips:
                if n == int(event * (len(conn.events) - 1)):
                    b[int(where * (len(b) - 1))] ^= x
            ps: list = [bytes(b)]
            if gap is not None and d == OUT:
                at = int(gap[0] * len(b))
                ps = [bytes(b[:at]), Gap(gap[1]), bytes(b[at + gap[1]:])]
            for c in cuts:
                i = int(c * len(ps[-1]))
                ps[-1:] = [ps[-1][:i], ps[-1][i:]] if isinstance(ps[-1], bytes) else ps[-1:]
            res += t.feed(d, ps)
        have[0] = keys_come == "late"
        res += t.retry()
        if t.waiting:
            res += t.give_up("test")
        assert not t.waiting
        for r in res:
            assert isinstance(r, (Plain, Problem))
            if isinstance(r, Plain):
                assert r.data in sent[r.direction]
    check()


def test_gap_right_after_the_handshake(certs, tmp_path):
    """The client's first application record is lost (its epoch's keys not built yet)."""
    script = client_lines(3)
    conn, sent, keys = session(certs, tmp_path, script, ["-ciphersuites", "TLS_AES_128_GCM_SHA256"])
    msgs = [d for w, d in script if w == "c"]
    out = conn.stream(OUT)
    o0, n0 = find_record(out, 17, msgs[0])
    t = TlsConnection(keys)
    res = feed_events(t, with_client_stream(conn.events, [out[:o0], Gap(n0), out[o0 + n0:]]))
    assert [(p.direction, p.kind) for p in problems(res)] == [(OUT, "gap")]
    assert plaintext(res, OUT) == msgs[1] + msgs[2] and plaintext(res, IN) == sent[IN]


def test_gap_hiding_two_key_updates_gives_the_direction_up(certs, tmp_path):
    """Two client KeyUpdates inside a gap: no expected key opens what follows; after a bounded
    number of tries the direction is reported and dropped, the other still decrypted."""
    script = client_lines(1) + [("c", b"K\n"), ("c", line("k1", 50)), ("c", b"K\n")] + \
        [("c", line(f"t{i}", 40)) for i in range(40)] + [("s", line("end", 30))]
    conn, sent, keys = session(certs, tmp_path, script, ["-ciphersuites", "TLS_AES_128_GCM_SHA256"])
    out = conn.stream(OUT)
    updates = [(o, n) for o, n in records(out) if n == 5 + 5 + 17]    # KeyUpdate: 5-byte message
    (o1, _n1), (o2, n2) = updates
    t = TlsConnection(keys)
    res = feed_events(t, with_client_stream(conn.events, [out[:o1], Gap(o2 + n2 - o1), out[o2 + n2:]]))
    assert [(p.direction, p.kind) for p in problems(res)] == [(OUT, "gap")]
    assert "not decrypted any more" in problems(res)[0].detail
    assert plaintext(res, OUT) == script[0][1] and plaintext(res, IN) == sent[IN]


def test_tls13_record_padding(certs, tmp_path):
    """Both ends pad records to 512-byte blocks: the zeros after the inner content type go."""
    pad = ["-record_padding", "512"]
    conn, sent, keys = session(certs, tmp_path, chat(), pad, pad)
    assert all(n % 512 == 5 + 16 for _o, n in records(conn.stream(OUT))[3:-1])   # really padded
    assert_decrypts(conn, sent, keys)


@pytest.mark.parametrize("sargs,why", [
    (["-max_early_data", "16384"], "ee"),                       # no -early_data: not read
    (["-early_data", "-max_early_data", "16384", "-groups", "P-256"], "hrr")])
def test_tls13_early_data_rejected(certs, tmp_path, sargs, why):
    """The server rejects the 0-RTT data though it resumes (PSK): its EncryptedExtensions has no
    early_data (s_server without -early_data); or it asks for another key share (HRR: OpenSSL
    then makes a full handshake)."""
    sess, early = str(tmp_path / "sess"), tmp_path / "early"
    early.write_bytes(line("early", 200))
    runs, keyf = sessions(certs, tmp_path, [(chat(1), ["-sess_out", sess]),
                                            (chat(), ["-sess_in", sess, "-early_data", str(early)])],
                          sargs)
    (_full, _s0), (resumed, sent) = runs
    assert (41 in server_hello_extensions(resumed.stream(IN))) == (why == "ee")  # PSK kept
    if why == "hrr":
        assert HRR_RANDOM in resumed.stream(IN)[:100]
    for how in ("as-captured", "bytes", "random", "server-first"):
        t, res = decrypt(resumed.events, keyf, how)
        assert problems(res) == []
        assert plaintext(res, OUT, early=True) == b""
        assert (plaintext(res, OUT), plaintext(res, IN)) == (sent[OUT], sent[IN])
        assert t.stats["early_records_skipped"] >= 1 and t.early_data == "rejected"


@pytest.mark.parametrize("cargs", [[], ["-tls1_2"]], ids=["tls13", "tls12"])
def test_server_side_key_log(certs, tmp_path, cargs):
    """The secrets as the server logs them (the local end may be the server) work the same."""
    conn, sent, keys = session(certs, tmp_path, chat(), cargs, server_keylog=True)
    assert_decrypts(conn, sent, keys, ("as-captured",))
