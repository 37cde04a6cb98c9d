"""pktfilter: parsing, normal form, errors; and the compiled semantics against libpcap's own.

The oracle is libpcap itself (pcap_compile + pcap_offline_filter through ctypes): the same
code tcpdump, dumpcap and `tshark -f` run. Every expression of EXPRESSIONS is compiled by both
and tried on every frame of CORPUS (crafted Ethernet frames: IPv4 with and without options
and fragments, IPv6 with and without a fragment header, TCP/UDP/SCTP/ICMP, ARP, RARP, LLDP,
short and long); the verdicts must agree. tests/kernel/test_packets.py runs the same corpus
through the BPF program itself.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import struct

import pytest

from tests.conftest import need, needs
from tlstap import abi
from tlstap.errors import UsageError
from tlstap.sources.pktfilter import compile_filter

# ---------------------------------------------------------------- crafted frames

MAC_A, MAC_B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")


def eth(ethertype: int, payload: bytes) -> bytes:
    return MAC_B + MAC_A + struct.pack(">H", ethertype) + payload


def tcp(sport: int, dport: int, flags: int = 0x18, data: bytes = b"") -> bytes:
    return struct.pack(">HHIIBBHHH", sport, dport, 1, 2, 5 << 4, flags, 65535, 0, 0) + data


def udp(sport: int, dport: int, data: bytes = b"") -> bytes:
    return struct.pack(">HHHH", sport, dport, 8 + len(data), 0) + data


def sctp(sport: int, dport: int) -> bytes:
    return struct.pack(">HHII", sport, dport, 7, 0)


ICMP_ECHO = bytes([8, 0, 0, 0, 0, 1, 0, 1])


def ipv4(src: str, dst: str, proto: int, payload: bytes, frag: int = 0, options: bytes = b"") -> bytes:
    ihl = 5 + len(options) // 4
    hdr = struct.pack(">BBHHHBBH4s4s", 0x40 | ihl, 0, 4 * ihl + len(payload), 1, frag, 64, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return eth(0x0800, hdr + options + payload)


def ipv6(src: str, dst: str, nh: int, payload: bytes) -> bytes:
    hdr = struct.pack(">IHBB16s16s", 6 << 28, len(payload), nh, 64, ipaddress.IPv6Address(src).packed,
                      ipaddress.IPv6Address(dst).packed)
    return eth(0x86DD, hdr + payload)


def arp(spa: str, tpa: str, ethertype: int = 0x0806) -> bytes:
    body = struct.pack(">HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, MAC_A, ipaddress.IPv4Address(spa).packed,
                       bytes(6), ipaddress.IPv4Address(tpa).packed)
    return eth(ethertype, body + bytes(18))


def frag6(nh: int, payload: bytes) -> bytes:
    return struct.pack(">BBHI", nh, 0, 1, 42) + payload


CORPUS = {
    "v4 tcp 443->50000": ipv4("127.0.0.1", "127.0.0.1", 6, tcp(443, 50000)),
    "v4 tcp 50000->443 syn": ipv4("10.1.2.3", "192.168.0.7", 6, tcp(50000, 443, 0x02)),
    "v4 tcp 8080->80": ipv4("192.168.0.7", "10.1.2.3", 6, tcp(8080, 80, data=b"x" * 40)),
    "v4 udp 53": ipv4("10.0.0.53", "10.9.9.9", 17, udp(53, 33333, b"q" * 20)),
    "v4 udp 5353->5353": ipv4("172.16.5.5", "224.0.0.251", 17, udp(5353, 5353)),
    "v4 sctp 443": ipv4("10.1.2.3", "10.1.2.4", 132, sctp(1234, 443)),
    "v4 icmp": ipv4("10.1.2.3", "8.8.8.8", 1, ICMP_ECHO),
    "v4 gre": ipv4("10.1.2.3", "8.8.8.8", 47, bytes(8)),
    "v4 options tcp 22": ipv4("10.1.2.3", "10.3.2.1", 6, tcp(22, 61000), options=bytes([1, 1, 1, 0])),
    "v4 later fragment": ipv4("10.1.2.3", "10.3.2.1", 6, struct.pack(">HH", 443, 443) + bytes(16), frag=100),
    "v4 first fragment": ipv4("10.1.2.3", "10.3.2.1", 17, udp(443, 9999), frag=0x2000),
    "v4 big tcp 443": ipv4("127.0.0.1", "127.0.0.2", 6, tcp(40000, 443, data=b"y" * 1400)),
    "v6 tcp ::1 443": ipv6("::1", "::1", 6, tcp(443, 51000)),
    "v6 tcp 2001:db8 80": ipv6("2001:db8::1", "2001:db8:1::2", 6, tcp(51000, 80)),
    "v6 udp 53": ipv6("fe80::1", "fe80::2", 17, udp(53, 40000)),
    "v6 icmp6": ipv6("fe80::1", "ff02::1", 58, ICMP_ECHO),
    "v6 frag tcp": ipv6("2001:db8::1", "2001:db8::2", 44, frag6(6, tcp(443, 1000))),
    "v6 frag udp": ipv6("2001:db8::1", "2001:db8::2", 44, frag6(17, udp(53, 53))),
    "v6 hop-by-hop": ipv6("2001:db8::1", "2001:db8::2", 0, bytes([6, 0]) + bytes(6) + tcp(443, 1)),
    "arp 10.1.2.3 -> 10.1.2.4": arp("10.1.2.3", "10.1.2.4"),
    "rarp": arp("192.168.0.7", "10.0.0.53", 0x8035),
    "lldp": eth(0x88CC, bytes(40)),
}

EXPRESSIONS = [
    "tcp", "udp", "sctp", "icmp", "icmp6", "ip", "ip6", "arp", "rarp",
    "port 443", "src port 443", "dst port 443", "tcp port 443", "udp port 53", "sctp port 443",
    "tcp dst port 443", "port 443 or port 53", "port https", "portrange 50-90", "tcp portrange 400-500",
    "src portrange 5000-6000", "not port 443", "!tcp", "tcp and not port 22",
    "host 10.1.2.3", "src host 10.1.2.3", "dst host 10.1.2.3", "ip host 10.1.2.3", "arp host 10.1.2.3",
    "host 10.1.2.3 or 10.0.0.53", "host ::1", "ip6 host 2001:db8::1", "dst host 2001:db8:1::2",
    "net 10.0.0.0/8", "net 10", "net 10.1", "src net 192.168.0.0/16", "dst net 10.1.2.0/24",
    "net 2001:db8::/32", "net 10.0.0.0 mask 255.0.0.0", "not net 127.0.0.0/8",
    "src and dst net 10.0.0.0/8", "src or dst host 10.1.2.3",
    "ip proto 47", "ip6 proto 6", "ip6 proto 44", "proto 17", "ip proto \\tcp",
    "less 100", "greater 200", "less 60 or greater 1000",
    "(tcp or udp) and not (port 443 or port 53)",
    "tcp && (port 80 || port 443) && !host 127.0.0.1",
    "not (host 10.1.2.3 and port 443)",
    "ip and not tcp", "ip6 and udp port 53", "host 10.1.2.3 and (arp or tcp)",
    "tcp and tcp", "tcp and not tcp", "tcp or not tcp",
]


# ---------------------------------------------------------------- libpcap oracle

class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]


class _PktHdr(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long), ("caplen", ctypes.c_uint32),
                ("len", ctypes.c_uint32)]


DLT_EN10MB, DLT_RAW = 1, 12


def _libpcap():
    name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p, ctypes.c_int,
                                 ctypes.c_uint32]
    lib.pcap_offline_filter.argtypes = [ctypes.POINTER(_BpfProgram), ctypes.POINTER(_PktHdr), ctypes.c_char_p]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_close.argtypes = [ctypes.c_void_p]
    return lib


LIBPCAP = _libpcap()


def libpcap_verdicts(expr: str, frames: dict[str, bytes], dlt: int = DLT_EN10MB) -> dict[str, bool]:
    """{name: passes} as libpcap (tcpdump, dumpcap, tshark -f) decides."""
    p = LIBPCAP.pcap_open_dead(dlt, 262144)
    prog = _BpfProgram()
    try:
        if LIBPCAP.pcap_compile(p, ctypes.byref(prog), expr.encode(), 1, 0xFFFFFFFF):
            err = LIBPCAP.pcap_geterr(p).decode()
            if "rejects all packets" in err:     # the optimiser proved it (tcp and not tcp)
                return dict.fromkeys(frames, False)
            raise ValueError(err)
        out = {}
        for name, f in frames.items():
            hdr = _PktHdr(0, 0, len(f), len(f))
            out[name] = LIBPCAP.pcap_offline_filter(ctypes.byref(prog), ctypes.byref(hdr), f) != 0
        LIBPCAP.pcap_freecode(ctypes.byref(prog))
        return out
    finally:
        LIBPCAP.pcap_close(p)


needs_libpcap = needs(LIBPCAP, "libpcap is not installed (apt-get install tshark brings it)")


@needs_libpcap
@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_semantics_match_libpcap(expr):
    want = libpcap_verdicts(expr, CORPUS)
    f = compile_filter(expr)
    got = {name: f.matches(frame) for name, frame in CORPUS.items()}
    diff = {n: (got[n], want[n]) for n in CORPUS if got[n] != want[n]}
    assert not diff, f"{expr!r} compiled to {f}: (ours, libpcap) differ on {diff}"


@needs_libpcap
@pytest.mark.parametrize("expr", ["ip", "ip6", "tcp port 443", "host ::1", "net 10.0.0.0/8", "udp",
                                  "not port 443"])
def test_semantics_match_libpcap_without_link_header(expr):
    """ARPHRD_NONE (tun, wireguard): packets start at the IP header (DLT_RAW)."""
    raw = {n: f[14:] for n, f in CORPUS.items() if f[12:14] in (b"\x08\x00", b"\x86\xdd")}
    want = libpcap_verdicts(expr, raw, DLT_RAW)
    f = compile_filter(expr)
    got = {n: f.matches(frame, link_hdr_len=0) for n, frame in raw.items()}
    assert got == want


def test_every_corpus_frame_is_decided_both_ways():
    """The corpus is useful: each frame passes some expression and fails another."""
    need(LIBPCAP, "libpcap is not installed (apt-get install tshark brings it)")
    verdicts = [libpcap_verdicts(e, CORPUS) for e in EXPRESSIONS]
    for name in CORPUS:
        assert {v[name] for v in verdicts} == {True, False}, name


# ---------------------------------------------------------------- parsing and normal form

def test_empty_filter_is_everything():
    assert compile_filter("").clauses == ()
    assert compile_filter(None).clauses == ()
    assert compile_filter("   ").clauses == ()


def test_operators_and_aliases():
    assert compile_filter("tcp and port 1").clauses == compile_filter("tcp && port 1").clauses
    assert compile_filter("not tcp").clauses == compile_filter("!tcp").clauses
    assert compile_filter("tcp or udp").clauses == compile_filter("tcp || udp").clauses


def test_dnf_shape():
    f = compile_filter("(tcp or udp) and (port 1 or port 2)")
    assert len(f.clauses) == 4 and all(len(c) == 2 for c in f.clauses)
    # De Morgan: not (a or b) = not a and not b: one clause of two negated terms
    f = compile_filter("not (host 1.2.3.4 or port 5)")
    assert len(f.clauses) == 1 and all(t.flags & abi.PF_NOT for t in f.clauses[0])
    # absorption and duplicates
    assert len(compile_filter("tcp or (tcp and port 1)").clauses) == 1
    assert len(compile_filter("tcp and tcp").clauses[0]) == 1


def test_qualifier_inheritance():
    assert compile_filter("host 1.1.1.1 or 2.2.2.2").clauses == \
        compile_filter("host 1.1.1.1 or host 2.2.2.2").clauses
    assert compile_filter("tcp dst port 1 or 2").clauses == \
        compile_filter("tcp dst port 1 or tcp dst port 2").clauses


def test_contradiction_matches_nothing():
    f = compile_filter("tcp and not tcp")
    assert f.clauses and not any(f.matches(fr) for fr in CORPUS.values())


def test_fill_writes_rodata_layout():
    conf = abi.PktConfig()
    compile_filter("tcp port 443 or host ::1").fill(conf)
    assert conf.nclauses == 2
    kinds = sorted((conf.clauses[i].terms[j].kind for i in range(2) for j in range(conf.clauses[i].nterms)))
    assert kinds == [abi.PfKind.PROTO, abi.PfKind.PORT, abi.PfKind.NET]
    net = next(conf.clauses[i].terms[0] for i in range(2) if conf.clauses[i].terms[0].kind == abi.PfKind.NET)
    assert net.family == 6 and struct.pack("<QQ", *net.addr) == ipaddress.IPv6Address("::1").packed


def test_limits():
    ok = " or ".join(f"port {i}" for i in range(abi.PF_CLAUSES_MAX))
    assert len(compile_filter(ok).clauses) == abi.PF_CLAUSES_MAX
    with pytest.raises(UsageError, match="too complex.*9 alternatives"):
        compile_filter(ok + " or port 99")
    long = " and ".join(f"not port {i}" for i in range(abi.PF_TERMS_MAX + 1))
    with pytest.raises(UsageError, match="too complex.*9 conditions"):
        compile_filter(long)
    with pytest.raises(UsageError, match="too complex"):   # 2^16 before simplification
        compile_filter(" and ".join(f"(port {i} or port {i + 100})" for i in range(16)))


@pytest.mark.parametrize("expr,token", [
    ("tcp port", "port"), ("port 99999", "99999"), ("host foo.example", "foo.example"),
    ("host 1.2.3", "1.2.3"), ("tcp host 1.2.3.4", "tcp"), ("(tcp", "')'"), ("tcp)", ")"),
    ("vlan", "vlan"), ("ether host 1.2.3.4", "ether"), ("ip host ::1", "::1"),
    ("ip6 host 1.2.3.4", "1.2.3.4"), ("net 10.1.2.3/8", "10.1.2.3/8"), ("port 1 & port 2", "&"),
    ("port 1 port 2", "port"), ("portrange 5", "5"), ("proto foo", "foo"), ("ip proto 300", "300"),
    ("less x", "x"), ("and tcp", "and"), ("not", "primitive"), ("host", "host"),
    ("src host", "host"), ("icmp port 1", "icmp"), ("port nosuchservice", "nosuchservice"),
])
def test_errors_name_the_token(expr, token):
    with pytest.raises(UsageError) as e:
        compile_filter(expr)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("filter")
    assert token in msg, msg
