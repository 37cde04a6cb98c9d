"""wire/tcp.py: parse_segment and TcpStream on packets the kernel really sent.

Each fixture runs a real TCP connection over loopback (Python sockets, IPv4 and IPv6) that
exchanges known random bytes, and captures its packets with an AF_PACKET socket on "lo" (the
transmit copies, so each packet once, before any segmentation: lo is a GSO device, so large
writes appear as one packet of up to 64 KiB, as on a cgroup_skb egress hook). The reassembly
cases then replay those real segments reordered, duplicated, re-split with overlaps, dropped,
cut short, rebased across the 2**32 wrap, and started without their SYN.
"""
from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time
from typing import NamedTuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tlstap.wire.tcp import ACK, FIN, RST, SYN, Gap, Segment, TcpStream, parse_segment

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_RCVBUFFORCE = 33
TCP_FASTOPEN_NO_COOKIE = 34         # linux/tcp.h
ETH_HLEN = 14
MASK = 0xFFFFFFFF


class Capture(NamedTuple):
    family: int
    client: tuple            # (address bytes, port)
    server: tuple
    sent: dict               # port -> the bytes that side sent
    packets: list            # IP packets (bytes), in transmit order


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        assert time.monotonic() < deadline, "peer stalled"
        chunk = sock.recv(n - len(buf))
        assert chunk, "early EOF"
        buf += chunk
    return bytes(buf)


def _messages(rng: random.Random, count: int, top: int, big: int) -> list[bytes]:
    sizes = [rng.randint(1, top) for _ in range(count)] + [big]
    return [rng.randbytes(n) for n in sizes]


def capture(family: int, host: str, seed: int, end: str = "fin", mss: int | None = None,
            fast_open: bool = False) -> Capture:
    """One real connection on loopback and its packets. `end`: "fin" (both shut down) or "rst"
    (the client closes with SO_LINGER 0 after the exchange). `fast_open`: the client's first
    message rides on its SYN (TCP Fast Open without a cookie; the listener does not take it, so
    it is sent again after the handshake)."""
    rng = random.Random(seed)
    client_msgs = _messages(rng, 40, 4000, 150_000)
    server_msgs = _messages(rng, 20, 8000, 100_000)
    try:
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    except PermissionError:
        pytest.skip("an AF_PACKET capture needs CAP_NET_RAW")
    deadline = time.monotonic() + 10
    with raw, socket.socket(family, socket.SOCK_STREAM) as listener, \
            socket.socket(family, socket.SOCK_STREAM) as client:
        raw.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 64 << 20)
        raw.bind(("lo", 0))
        listener.bind((host, 0))
        listener.listen(1)
        if mss:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, mss)
        client.settimeout(10)
        first = 0
        if fast_open:
            client.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)
            client.sendto(client_msgs[0], socket.MSG_FASTOPEN, listener.getsockname()[:2])
            first = 1
        else:
            client.connect(listener.getsockname()[:2])
        server, _ = listener.accept()
        server.settimeout(10)
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cdata, sdata = b"".join(client_msgs), b"".join(server_msgs)

        def serve():
            assert _recv_exact(server, len(cdata), deadline) == cdata
            for m in server_msgs:
                server.sendall(m)

        def write():
            for m in client_msgs[first:]:
                client.sendall(m)

        threads = [threading.Thread(target=serve), threading.Thread(target=write)]
        for t in threads:
            t.start()
        got = _recv_exact(client, len(sdata), deadline)
        for t in threads:
            t.join(10)
        assert got == sdata
        if end == "fin":
            client.shutdown(socket.SHUT_WR)
            assert server.recv(1) == b""
            server.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""
        else:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        caddr, saddr = client.getsockname(), server.getsockname()
        client.close()
        server.close()
        ports = {caddr[1], saddr[1]}
        packets, ends = [], set()
        while len(ends) < (2 if end == "fin" else 1) and time.monotonic() < deadline:
            if not select.select([raw], [], [], 0.2)[0]:
                continue
            frame, addr = raw.recvfrom(1 << 18)
            if addr[2] != PACKET_OUTGOING:
                continue
            seg = parse_segment(frame[ETH_HLEN:])
            if seg is None or {seg.sport, seg.dport} != ports:
                continue
            packets.append(frame[ETH_HLEN:])
            if seg.flags & (FIN | RST):
                ends.add(seg.sport)
        assert len(ends) == (2 if end == "fin" else 1), "the connection's end was not captured"
    pton = lambda a: socket.inet_pton(family, a[0])   # noqa: E731
    return Capture(family, (pton(caddr), caddr[1]), (pton(saddr), saddr[1]),
                   {caddr[1]: cdata, saddr[1]: sdata}, packets)


@pytest.fixture(scope="module")
def v4():
    return capture(socket.AF_INET, "127.0.0.1", 1)


@pytest.fixture(scope="module")
def v6():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    return capture(socket.AF_INET6, "::1", 2, mss=1400)


@pytest.fixture(scope="module")
def v4rst():
    return capture(socket.AF_INET, "127.0.0.1", 3, end="rst")


@pytest.fixture(scope="module")
def v4tfo():
    return capture(socket.AF_INET, "127.0.0.1", 4, fast_open=True)


@pytest.fixture(params=["v4", "v6"])
def cap(request):
    return request.getfixturevalue(request.param)


# ---------------------------------------------------------------- helpers

class Seg(NamedTuple):
    """What TcpStream.add takes, detached from the packet."""
    seq: int
    flags: int
    payload: bytes
    missing: int = 0


def direction(c: Capture, port: int) -> list[Seg]:
    """The segments `port` sent, in transmit order."""
    out = []
    for p in c.packets:
        s = parse_segment(p)
        if s.sport == port:
            out.append(Seg(s.seq, s.flags, bytes(s.payload), s.missing))
    return out


def client_segs(c: Capture) -> tuple[list[Seg], bytes]:
    """The client's segments (SYN first) and the bytes it sent; at least 10 carry data."""
    segs = direction(c, c.client[1])
    assert segs[0].flags & SYN and sum(1 for s in segs if s.payload) >= 10
    return segs, c.sent[c.client[1]]


def feed(stream: TcpStream, segs) -> list:
    out = []
    for s in segs:
        out += stream.add(s.seq, s.flags, s.payload, s.missing)
    return out


def norm(pieces) -> list:
    """Adjacent bytes joined, adjacent Gaps summed: [b"...", Gap(n), b"..."]."""
    out: list = []
    for p in pieces:
        if isinstance(p, Gap):
            if out and isinstance(out[-1], Gap):
                out[-1] = Gap(out[-1].nbytes + p.nbytes)
            else:
                out.append(Gap(p.nbytes))
        elif out and isinstance(out[-1], bytes):
            out[-1] += p
        else:
            out.append(bytes(p))
    return [p for p in out if p != b""]


def lost_at(sent: bytes, off: int, n: int) -> list:
    """`sent` with bytes [off, off + n) a Gap, as norm() gives it."""
    return norm([sent[:off], Gap(n), sent[off + n:]])


def offset(segs: list[Seg], s: Seg) -> int:
    """Stream offset of `s` (segs[0] is the SYN)."""
    return (s.seq - segs[0].seq - 1) & MASK


# ---------------------------------------------------------------- the real connections

def test_real_connection_reassembles_both_directions(cap):
    streams = {cap.client[1]: TcpStream(), cap.server[1]: TcpStream()}
    out = {port: [] for port in streams}
    biggest = 0
    for p in cap.packets:
        s = parse_segment(memoryview(p))
        assert s.family == cap.family and s.missing == 0
        ends = {(s.src, s.sport), (s.dst, s.dport)}
        assert ends == {cap.client, cap.server}
        biggest = max(biggest, len(s.payload))
        out[s.sport] += streams[s.sport].add(s.seq, s.flags, s.payload, s.missing)
    assert biggest > 16384                # a GSO packet: more than one MSS (1400 on IPv6)
    for port, stream in streams.items():
        assert all(type(p) is bytes for p in out[port])
        assert b"".join(out[port]) == cap.sent[port]
        assert stream.synced and stream.finished and stream.held == 0
        assert stream.delivered == len(cap.sent[port])
        assert stream.flush() == [] and stream.add(0, ACK, b"x") == []


def test_payload_is_a_view_and_headers_are_parsed(v4):
    p = next(p for p in v4.packets if parse_segment(p).payload)
    s = parse_segment(p)
    assert isinstance(s, Segment) and isinstance(s.payload, memoryview)
    assert s.flags & ACK and not s.flags & (SYN | FIN | RST)
    first = parse_segment(v4.packets[0])
    assert first.flags & SYN and not first.flags & ACK and first.sport == v4.client[1]
    assert parse_segment(v4.packets[1]).ack == (first.seq + 1) & MASK


PADN = b"\x01\x04\0\0\0\0"          # an IPv6 PadN option filling an 8-byte extension header


def with_options(p: bytes) -> bytes:
    """IPv4 packet `p` with four NOP options."""
    out = bytearray(p[:20] + b"\x01" * 4 + p[20:])
    out[0] = 0x46
    struct.pack_into("!H", out, 2, len(p) + 4)
    return bytes(out)


def with_ext(p: bytes, chain: list[tuple[int, bytes]], last: int = 6) -> bytes:
    """IPv6 packet `p` with extension headers (type, 6 bytes after next/len) before its TCP
    header, the last one naming protocol `last`."""
    types = [t for t, _ in chain] + [last]
    ext = b"".join(bytes([nxt, 0]) + body for (_t, body), nxt in zip(chain, types[1:]))
    out = bytearray(p[:40] + ext + p[40:])
    out[6] = types[0]
    struct.pack_into("!H", out, 4, len(out) - 40)
    return bytes(out)


def layouts(c: Capture) -> list[tuple[str, bytes, int]]:
    """A real data packet as sent and with IP options or extension headers: (name, packet, offset
    of its TCP header)."""
    p = next(p for p in c.packets if len(parse_segment(p).payload) > 1000)
    if c.family == socket.AF_INET:
        assert p[0] == 0x45
        return [("plain", p, 20), ("options", with_options(p), 24)]
    chain = [(0, PADN), (43, b"\0" * 6), (60, PADN)]          # hop-by-hop, routing, destination
    return [("plain", p, 40), ("extension headers", with_ext(p, chain), 64)]


def test_ip_options_and_extension_headers_are_skipped(cap):
    (_, p, _), (_, q, _) = layouts(cap)
    assert parse_segment(q) == parse_segment(p)
    assert parse_segment(memoryview(bytearray(q))) == parse_segment(p)


def test_headers_cut_short(cap):
    for _name, p, t in layouts(cap):
        ref = parse_segment(p)
        assert parse_segment(p + b"\0" * 6) == ref                        # link padding is not payload
        hdr = t + (p[t + 12] >> 4) * 4
        assert parse_segment(p[:hdr]).missing == len(ref.payload)
        for cut in (hdr - 1, t + 19, t, 39, 19, 0):                       # in the TCP or IP headers
            assert parse_segment(p[:cut]) is None, cut
        bad = bytearray(p)
        bad[t + 12] = 4 << 4                                              # TCP data offset < 5 words
        assert parse_segment(bytes(bad)) is None
        bad[t + 12] = 15 << 4                                             # past the captured bytes
        assert parse_segment(bytes(bad)[:hdr + 20]) is None


@pytest.mark.parametrize("layout", [0, 1])
def test_ipv4_fragments_and_other_protocols(v4, layout):
    _name, p, _t = layouts(v4)[layout]
    for frag in (0x2000, 0x0001, 0x4000):                  # MF, an offset; DF alone is no fragment
        f = bytearray(p)
        struct.pack_into("!H", f, 6, frag)
        assert (parse_segment(bytes(f)) is None) == (frag != 0x4000)
    udp = bytearray(p)
    udp[9] = 17
    assert parse_segment(bytes(udp)) is None
    v5 = bytearray(p)
    v5[0] = 0x55
    assert parse_segment(bytes(v5)) is None


def test_ipv6_fragments_and_other_protocols(v6):
    p = layouts(v6)[0][1]
    assert parse_segment(with_ext(p, [(44, b"\0" * 6)])) is None             # a fragment header
    assert parse_segment(with_ext(p, [(0, PADN), (44, b"\0" * 6)])) is None
    assert parse_segment(with_ext(p, [(0, PADN), (60, PADN)], last=17)) is None   # UDP
    assert parse_segment(with_ext(p, [(60, PADN)])[:44]) is None            # cut in the ext header
    udp = bytearray(p)
    udp[6] = 17
    assert parse_segment(bytes(udp)) is None


@pytest.mark.parametrize("layout", [0, 1])
def test_snaplen_cut_is_reported_as_missing(cap, layout):
    _name, p, _t = layouts(cap)[layout]
    ref = parse_segment(p)
    k = len(ref.payload) // 3
    cut = parse_segment(p[:-k])
    assert bytes(cut.payload) == bytes(ref.payload)[:-k] and cut.missing == k
    assert cut[:8] == ref[:8]


@pytest.mark.parametrize("layout", [0, 1])
def test_length_zero_big_tcp_uses_wire_len(cap, layout):
    """A GSO packet past 64 KiB has no IP length (BIG TCP): the caller's wire_len, else what was
    captured, bounds it."""
    _name, p, _t = layouts(cap)[layout]
    ref = parse_segment(p)
    z = bytearray(p)
    struct.pack_into("!H", z, 2 if cap.family == socket.AF_INET else 4, 0)
    assert parse_segment(bytes(z)) == ref
    s = parse_segment(bytes(z), wire_len=len(p) + 100)
    assert bytes(s.payload) == bytes(ref.payload) and s.missing == 100


# ---------------------------------------------------------------- reassembly of the real segments

@pytest.mark.parametrize("seed", range(5))
def test_reordered(cap, seed):
    segs, sent = client_segs(cap)
    rest = segs[1:]
    random.Random(seed).shuffle(rest)
    st = TcpStream()
    assert norm(feed(st, [segs[0]] + rest)) == [sent]
    assert st.finished and st.held == 0


def test_in_order_output_per_segment(v4):
    """In order, each data segment's bytes come out at once (nothing waits)."""
    segs, _ = client_segs(v4)
    st = TcpStream()
    for s in segs:
        out = st.add(s.seq, s.flags, s.payload)
        assert norm(out) == ([s.payload] if s.payload else [])


def test_retransmissions(cap):
    segs, sent = client_segs(cap)
    rng = random.Random(7)
    replay = []
    for i, s in enumerate(segs):
        replay.append(s)
        replay += rng.sample(segs[:i + 1], min(2, i + 1))               # old segments again
    st = TcpStream()
    assert norm(feed(st, replay)) == [sent]


@pytest.mark.parametrize("seed", range(3))
def test_overlapping_resegmentation(cap, seed):
    """Each real segment re-sent as overlapping pieces that reach into its neighbours, shuffled
    a little: every byte comes out once, in place."""
    segs, sent = client_segs(cap)
    rng = random.Random(seed)
    isn = segs[0].seq
    replay = [segs[0]]
    for s in segs[1:]:
        if not s.payload:
            replay.append(s)
            continue
        a, b = offset(segs, s), offset(segs, s) + len(s.payload)
        cuts = sorted(rng.randint(a, b) for _ in range(2))
        for lo, hi in zip([a] + cuts, cuts + [b]):
            lo, hi = max(0, lo - rng.randint(0, 300)), min(len(sent), hi + rng.randint(0, 300))
            replay.append(Seg((isn + 1 + lo) & MASK, ACK, sent[lo:hi]))
    for i in range(0, len(replay) - 3, 3):
        if rng.random() < 0.5:
            replay[i + 1], replay[i + 2] = replay[i + 2], replay[i + 1]
    replay.append(segs[-1])
    st = TcpStream()
    assert norm(feed(st, replay)) == [sent]


@pytest.mark.parametrize("first", ["part", "whole", "cut"])
def test_retransmission_with_the_same_start_while_held(cap, first):
    """Two copies of a segment held after a hole, starting at the same byte: the one reaching
    further (or holding more captured bytes) is kept, so no new hole opens when the first fills."""
    segs, sent = client_segs(cap)
    i, s = max(enumerate(segs), key=lambda e: len(e[1].payload))
    half = len(s.payload) // 2
    copies = {"part": [s._replace(payload=s.payload[:half]), s],
              "whole": [s, s._replace(payload=s.payload[:half])],
              "cut": [s._replace(payload=s.payload[:half], missing=len(s.payload) - half), s]}[first]
    j = max(k for k in range(i) if segs[k].payload)                    # the data before it: late
    st = TcpStream()
    out = feed(st, segs[:j] + copies + [segs[j]] + segs[i + 1:])
    assert norm(out) == [sent] and st.finished


def _drop_one(segs: list[Seg]) -> tuple[int, Seg]:
    data = [i for i, s in enumerate(segs) if s.payload]
    i = data[len(data) // 2]
    return i, segs[i]


def test_lost_segment_is_a_gap_at_flush(cap):
    segs, sent = client_segs(cap)
    i, lost = _drop_one(segs)
    off = offset(segs, lost)
    st = TcpStream()
    out = feed(st, segs[:i] + segs[i + 1:])
    assert norm(out) == [sent[:off]] and not st.finished and st.held > 0
    rest = st.flush()
    assert norm(out + rest) == lost_at(sent, off, len(lost.payload))
    assert st.finished and st.held == 0


@pytest.mark.parametrize("limit", ["segments", "bytes"])
def test_lost_segment_is_a_gap_past_the_hold_bound(cap, limit):
    segs, sent = client_segs(cap)
    i, lost = _drop_one(segs)
    off, n = offset(segs, lost), len(lost.payload)
    st = TcpStream(max_ooo_segments=2) if limit == "segments" else TcpStream(max_hold=1)
    out = []
    for s in segs[:i] + segs[i + 1:]:
        out += st.add(s.seq, s.flags, s.payload)
        assert limit == "segments" or st.held <= 1
    assert st.finished and st.held == 0                                  # no flush needed
    assert norm(out) == lost_at(sent, off, n)
    assert st.add(lost.seq, lost.flags, lost.payload) == []             # too late: already a gap


@pytest.mark.parametrize("isn", [MASK - 3000, MASK, MASK - 1])
def test_sequence_numbers_wrap(cap, isn):
    segs, sent = client_segs(cap)
    shift = isn - segs[0].seq
    moved = [s._replace(seq=(s.seq + shift) & MASK) for s in segs]
    assert any(s.seq < isn for s in moved[1:])                          # really wraps
    st = TcpStream()
    assert norm(feed(st, moved)) == [sent] and st.finished
    rest = moved[1:]
    random.Random(isn).shuffle(rest)
    rest += moved[3:6]                                                  # and retransmitted
    st = TcpStream()
    assert norm(feed(st, [moved[0]] + rest)) == [sent]


@pytest.mark.parametrize("order", ["in order", "reordered"])
def test_snaplen_cut_segment(cap, order):
    """A segment whose tail the capture did not hold: its captured bytes, Gap(missing), then the
    rest of the stream in place."""
    segs, sent = client_segs(cap)
    i, s = max(enumerate(segs), key=lambda e: len(e[1].payload))
    k = len(s.payload) // 3
    packet = next(p for p in cap.packets
                  if (parse_segment(p).sport, parse_segment(p).seq) == (cap.client[1], s.seq))
    cut = parse_segment(packet[:-k])
    replay = segs[:i] + [Seg(cut.seq, cut.flags, bytes(cut.payload), cut.missing)] + segs[i + 1:]
    if order == "reordered":
        replay[i], replay[i + 1] = replay[i + 1], replay[i]
        replay[i - 1], replay[i + 2] = replay[i + 2], replay[i - 1]
    off = offset(segs, s)
    st = TcpStream()
    end = off + len(s.payload)
    assert norm(feed(st, replay)) == lost_at(sent, end - k, k)
    assert st.delivered == len(sent) - k and st.finished


def test_segment_beyond_any_window_is_ignored(cap):
    """More than 2**30 (the largest TCP window) ahead: not this stream's, neither held nor a gap."""
    segs, sent = client_segs(cap)
    st = TcpStream()
    out = feed(st, segs[:5])
    assert st.add((segs[4].seq + (1 << 30) + 5000) & MASK, ACK, b"stray") == [] and st.held == 0
    assert norm(out + feed(st, segs[5:])) == [sent]


def test_fin_ends_the_stream(cap):
    segs, sent = client_segs(cap)
    fin = segs[-1]
    assert fin.flags & FIN
    st = TcpStream()
    feed(st, segs[:-1])
    assert not st.finished
    after = (fin.seq + len(fin.payload) + 1) & MASK
    assert st.add(fin.seq, fin.flags, fin.payload) == ([fin.payload] if fin.payload else [])
    assert st.finished
    assert st.add(after, ACK, b"beyond the FIN") == [] and st.add(fin.seq, ACK, b"x" * 50) == []
    assert st.delivered == len(sent)


def test_fin_before_the_data_it_ends(cap):
    """The FIN seen first: the data before it still comes out, then the stream is finished; a
    hole before the FIN is a Gap up to it at flush."""
    segs, sent = client_segs(cap)
    data = [s for s in segs[1:-1]]
    st = TcpStream()
    feed(st, [segs[0], segs[-1]])
    assert not st.finished
    assert norm(feed(st, data)) == [sent] and st.finished
    i, lost = _drop_one(segs)
    st = TcpStream()
    out = feed(st, [segs[0], segs[-1]] + [s for s in data if s is not lost])
    assert not st.finished
    off = offset(segs, lost)
    assert norm(out + st.flush()) == lost_at(sent, off, len(lost.payload))
    assert st.finished
    last = max(i for i, s in enumerate(segs) if s.payload)         # the bytes just before the FIN lost
    st = TcpStream()
    out = feed(st, segs[:last] + segs[last + 1:])
    assert not st.finished and st.held == 0
    assert norm(out + st.flush()) == lost_at(sent, offset(segs, segs[last]), len(segs[last].payload))
    assert st.finished


def test_data_past_the_fin_is_cut(cap):
    """The FIN seen first, then the last data segment re-sent with bytes past the FIN's place (a
    broken sender): only the stream's bytes come out."""
    segs, sent = client_segs(cap)
    last = max(i for i, s in enumerate(segs) if s.payload)
    assert last < len(segs) - 1                   # the client's FIN came after the exchange, alone
    st = TcpStream()
    out = feed(st, [segs[0], segs[-1]] + segs[1:last])
    out += st.add(segs[last].seq, segs[last].flags, segs[last].payload + b"junk")
    assert norm(out) == [sent] and st.finished


def test_fin_before_bytes_already_held(cap):
    """Bytes held after a hole, then a FIN placed before some of them (a broken sender): the bytes
    past the FIN are dropped, and the stream ends at it, at flush or past the hold bound."""
    segs, sent = client_segs(cap)
    d = [s for s in segs if s.payload]
    mid = d[len(d) // 2]
    st = TcpStream()
    out = feed(st, [segs[0]] + d[1:] + [Seg(mid.seq, FIN | ACK, b"")] + d[1:3])
    assert st.held == offset(segs, mid) - len(d[0].payload)              # none past the FIN
    out += st.flush()
    assert st.finished and st.held == 0
    assert norm(out) == [Gap(len(d[0].payload)), sent[len(d[0].payload):offset(segs, mid)]]
    st = TcpStream(max_ooo_segments=2)
    out = feed(st, [segs[0], d[2], d[3], Seg(d[2].seq, FIN | ACK, b""), d[1]]) + st.flush()
    assert st.finished and st.held == 0
    assert norm(out) == [Gap(len(d[0].payload)), sent[offset(segs, d[1]):offset(segs, d[2])]]


def test_syn_with_data(v4tfo):
    """A real SYN carrying data (TCP Fast Open), then the same data again after the handshake:
    the SYN's bytes come out at once, their retransmission does not."""
    segs, sent = client_segs(v4tfo)
    if not segs[0].payload:
        pytest.skip("this kernel put no data on the SYN (net.ipv4.tcp_fastopen has no client bit)")
    again = next(s for s in segs[1:] if s.payload)
    assert again.seq == (segs[0].seq + 1) & MASK and again.payload[:len(segs[0].payload)] == segs[0].payload
    st = TcpStream()
    assert st.add(segs[0].seq, segs[0].flags, segs[0].payload) == [segs[0].payload] and st.synced
    assert norm(feed(st, segs[1:])) == [sent[len(segs[0].payload):]] and st.finished


def test_rst_ends_the_stream(v4rst):
    segs, sent = client_segs(v4rst)
    rst = segs[-1]
    assert rst.flags & RST
    st = TcpStream()
    assert norm(feed(st, segs)) == [sent] and st.finished
    for seq in (rst.seq, (rst.seq + 1) & MASK):
        assert st.add(seq, ACK, b"after the reset") == []
    # an RST with a hole before it: the hole is a gap, the held bytes come out, the stream ends
    i, lost = _drop_one(segs)
    st = TcpStream()
    out = feed(st, segs[:i] + segs[i + 1:])
    assert st.finished and st.held == 0
    off = offset(segs, lost)
    assert norm(out) == lost_at(sent, off, len(lost.payload))


@pytest.mark.parametrize("skip", [1, 4])
def test_started_without_a_syn(cap, skip):
    """The capture began after the handshake (or lost the SYN): data starts at the first segment."""
    segs, sent = client_segs(cap)
    st = TcpStream()
    first = segs[skip]
    out = feed(st, segs[skip:])
    assert not st.synced and st.finished
    assert norm(out) == [sent[offset(segs, first):]]
    st = TcpStream()                                                    # a late copy of older data
    assert norm(feed(st, segs[skip + 1:skip + 2] + segs[skip:])) == [sent[offset(segs, segs[skip + 1]):]]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_order_loss_and_bound_keep_every_byte_in_place(v4, v6, data):
    """Real segments dropped, duplicated, cut short and reordered, under any hold bound: what
    comes out (with a flush at the end) accounts for the whole stream, and every byte that comes
    out is the byte sent at that place."""
    c = data.draw(st.sampled_from([v4, v6]), label="capture")
    segs, sent = client_segs(c)
    body = segs[1:-1]
    fates = data.draw(st.lists(st.sampled_from(["keep", "drop", "twice", "cut"]),
                               min_size=len(body), max_size=len(body)), label="fates")
    replay = []
    for s, fate in zip(body, fates):
        if fate == "cut" and s.payload:
            k = len(s.payload) // 2
            s = s._replace(payload=s.payload[:k], missing=len(s.payload) - k)
        if fate != "drop":
            replay += [s] * (2 if fate == "twice" else 1)
    reach = data.draw(st.sampled_from([0, 1, 3, len(replay)]), label="reorder reach")
    jitter = data.draw(st.lists(st.integers(0, reach), min_size=len(replay), max_size=len(replay)))
    replay = [s for _, s in sorted(zip((i + j for i, j in enumerate(jitter)), replay), key=lambda e: e[0])]
    bound = data.draw(st.sampled_from([1, 2, 8, 1024]), label="max_ooo_segments")
    stream = TcpStream(max_ooo_segments=bound)
    out = feed(stream, [segs[0]] + replay + [segs[-1]]) + stream.flush()
    assert stream.finished and stream.held == 0
    pos = lost = 0
    for p in out:
        if isinstance(p, Gap):
            assert p.nbytes > 0
            pos, lost = pos + p.nbytes, lost + p.nbytes
        else:
            assert p and p == sent[pos:pos + len(p)], pos
            pos += len(p)
    assert pos == len(sent) and stream.delivered == len(sent) - lost
    if set(fates) <= {"keep", "twice"} and bound == 1024:
        assert norm(out) == [sent]

