"""tcpdump-style capture filters, compiled to what bpf/packets.bpf.c evaluates in the kernel.

The kernel side has no interpreter: it tests a fixed structure (struct pkt_config in
bpf/tlstap.h), an OR of at most PF_CLAUSES_MAX clauses, each an AND of at most PF_TERMS_MAX
terms, every term a primitive or its negation. So an expression is parsed, its NOTs are
pushed down to the primitives (De Morgan), and it is multiplied out into that disjunctive
normal form; an expression that needs more clauses or terms is refused with a message saying
so (rewrite it, or filter afterwards with tshark -Y). The counts are .rodata constants, so
the verifier drops what a filter does not use: a short filter costs a few instructions.

Grammar (a subset of pcap-filter(7), with its meaning):

    expr      := and_expr (("or" | "||") and_expr)*
    and_expr  := unary (("and" | "&&") unary)*
    unary     := ("not" | "!") unary | "(" expr ")" | primitive
    primitive := [proto] [dir] type value     host ADDR, net CIDR | net A mask M | net 10.1,
                                              port N|name, portrange N-M
               | [dir] value                  a bare value reuses the previous qualifiers:
                                              "host a or b" = "host a or host b"
               | proto                        ip ip6 arp rarp tcp udp sctp icmp icmp6
               | ("ip" | "ip6") "proto" N    | "proto" N   (N a number or tcp/udp/...)
               | "less" N | "greater" N      packet length <= N, >= N
    dir       := src | dst | src or dst | src and dst        (default: src or dst)
    proto     := ip | ip6 | arp | rarp (before host/net), tcp | udp | sctp (before port)

As in libpcap: an IPv4 host/net also matches ARP and RARP sender/target addresses; port
means TCP, UDP or SCTP over IPv4 (first fragments only) or IPv6 (no extension headers);
tcp/udp/... over IPv6 also match after a fragment header. Host names are not resolved.
Not supported: vlan, ether, link-level and byte-offset expressions (ip[0] & 0xf), gateway,
broadcast/multicast, and everything else pcap-filter(7) has beyond the above.
tests/unit/test_pktfilter.py checks the compiled semantics against libpcap itself.
"""
from __future__ import annotations

import ipaddress
import re
import socket
import struct
from dataclasses import dataclass, replace

from .. import abi
from ..abi import PF_BOTH, PF_DST, PF_NOT, PF_SRC, PfKind
from ..errors import UsageError

ETH_IP, ETH_IP6, ETH_ARP, ETH_RARP = 0x0800, 0x86DD, 0x0806, 0x8035
IPPROTO = {"icmp": 1, "igmp": 2, "tcp": 6, "udp": 17, "icmp6": 58, "sctp": 132, "esp": 50, "ah": 51,
           "gre": 47, "pim": 103, "vrrp": 112}
_PROTO_ONLY = {"ip", "ip6", "arp", "rarp", "tcp", "udp", "sctp", "icmp", "icmp6"}
_DIRS = {"src", "dst"}
_TYPES = {"host", "net", "port", "portrange"}
_KEYWORDS = _PROTO_ONLY | _DIRS | _TYPES | {"and", "or", "not", "proto", "less", "greater", "mask"}
_ALL = 0xFFFFFFFFFFFFFFFF
#: how many clauses the expansion may reach before simplification (bounds the work)
_EXPANSION_LIMIT = 4096


@dataclass(frozen=True)
class Term:
    """One primitive as the kernel tests it (struct pf_term)."""
    kind: PfKind
    flags: int = PF_SRC | PF_DST
    family: int = 0
    lo: int = 0
    hi: int = 0
    addr: bytes = bytes(16)
    mask: bytes = bytes(16)

    def negated(self) -> "Term":
        return replace(self, flags=self.flags ^ PF_NOT)

    def __str__(self) -> str:
        neg = "not " if self.flags & PF_NOT else ""
        d = {PF_SRC: "src ", PF_DST: "dst ", PF_SRC | PF_DST: "", PF_SRC | PF_DST | PF_BOTH: "src and dst "}
        side = d.get(self.flags & ~PF_NOT, "?")
        if self.kind == PfKind.ETHERTYPE:
            return neg + {ETH_IP: "ip", ETH_IP6: "ip6", ETH_ARP: "arp", ETH_RARP: "rarp"}.get(self.lo, hex(self.lo))
        if self.kind == PfKind.PROTO:
            return f"{neg}{ {0: '', 4: 'ip ', 6: 'ip6 '}[self.family]}proto {self.lo}"
        if self.kind == PfKind.PORT:
            if self.lo == self.hi:
                return f"{neg}{side}port {self.lo}"
            return f"{neg}{side}portrange {self.lo}-{self.hi}"
        if self.kind == PfKind.NET:
            n = 4 if self.family == 4 else 16
            a = ipaddress.ip_address(self.addr[:n])
            plen = sum(bin(b).count("1") for b in self.mask[:n])
            return f"{neg}{side}net {a}/{plen}"
        lo, hi = struct.unpack("<QQ", self.addr)
        return f"{neg}len {lo}..{hi}"


Clause = tuple[Term, ...]


class _And(tuple):
    pass


class _Or(tuple):
    pass


class _Not(tuple):
    pass


@dataclass(frozen=True)
class Filter:
    """A compiled filter: `clauses` ORed, terms in each ANDed; no clause = everything."""
    expr: str
    clauses: tuple[Clause, ...]

    def fill(self, conf: abi.PktConfig) -> None:
        """Write the clauses into the object's .rodata.pkt (before load)."""
        conf.nclauses = len(self.clauses)
        for ci, clause in enumerate(self.clauses):
            c = conf.clauses[ci]
            c.nterms = len(clause)
            for ti, t in enumerate(clause):
                d = c.terms[ti]
                d.kind, d.flags, d.family, d.lo, d.hi = t.kind, t.flags, t.family, t.lo, t.hi
                d.addr[0], d.addr[1] = struct.unpack("<QQ", t.addr)
                d.mask[0], d.mask[1] = struct.unpack("<QQ", t.mask)

    def matches(self, frame: bytes, link_hdr_len: int = 14, wire_len: int | None = None) -> bool:
        """Python model of the kernel's test, for checks against libpcap (tests)."""
        p = parse_frame(frame, link_hdr_len)
        n = len(frame) if wire_len is None else wire_len
        return not self.clauses or any(all(_term_match(t, p, n) for t in c) for c in self.clauses)

    def __str__(self) -> str:
        if not self.clauses:
            return "(everything)"
        return " or ".join("(" + " and ".join(map(str, c)) + ")" for c in self.clauses)


# ---------------------------------------------------------------- parsing

_TOKEN = re.compile(r"\s*(?:(\(|\)|&&|\|\||!)|([^\s()!&|]+)|(\S))")


def _tokenize(expr: str) -> list[str]:
    out = []
    for m in _TOKEN.finditer(expr):
        if m.group(3):
            raise UsageError(f"filter: unexpected '{m.group(3)}' in {expr!r}")
        tok = m.group(1) or m.group(2)
        if tok:
            out.append({"&&": "and", "||": "or", "!": "not"}.get(tok, tok))
    return out


class _Parser:
    def __init__(self, expr: str):
        self.expr = expr
        self.toks = _tokenize(expr)
        self.i = 0
        self.last: tuple | None = None      # (proto, dir, type) of the previous primitive

    def peek(self, k: int = 0) -> str | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def next(self, what: str) -> str:
        tok = self.peek()
        if tok is None:
            raise UsageError(f"filter: {what} expected at the end of {self.expr!r}")
        self.i += 1
        return tok

    def fail(self, tok: str, why: str):
        raise UsageError(f"filter: '{tok}': {why}")

    def parse(self):
        node = self.or_expr()
        if self.peek() is not None:
            self.fail(self.peek(), "unexpected here (missing 'and'/'or'?)")
        return node

    def or_expr(self):
        items = [self.and_expr()]
        while self.peek() == "or":
            self.i += 1
            items.append(self.and_expr())
        return items[0] if len(items) == 1 else _Or(items)

    def and_expr(self):
        items = [self.unary()]
        while self.peek() == "and":
            self.i += 1
            items.append(self.unary())
        return items[0] if len(items) == 1 else _And(items)

    def unary(self):
        tok = self.peek()
        if tok == "not":
            self.i += 1
            return _Not([self.unary()])
        if tok == "(":
            self.i += 1
            node = self.or_expr()
            close = self.next("')'")
            if close != ")":
                self.fail(close, "expected ')'")
            return node
        return self.primitive()

    def number(self, what: str, limit: int) -> int:
        tok = self.next(what)
        try:
            v = int(tok, 0)
        except ValueError:
            self.fail(tok, f"{what} must be a number")
        if not 0 <= v <= limit:
            self.fail(tok, f"{what} out of range (0-{limit})")
        return v

    def proto_number(self) -> int:
        tok = self.next("a protocol")
        if tok.lstrip("\\") in IPPROTO:
            return IPPROTO[tok.lstrip("\\")]
        try:
            v = int(tok, 0)
        except ValueError:
            self.fail(tok, "unknown protocol (use a number or " + ", ".join(sorted(IPPROTO)) + ")")
        if not 0 <= v <= 255:
            self.fail(tok, "protocol out of range (0-255)")
        return v

    def primitive(self):
        tok = self.next("a primitive")
        if tok in (")", "and", "or"):
            self.fail(tok, "expected a primitive (host, net, port, tcp, ...)")
        if (re.fullmatch(r"[a-z][a-z0-9]*", tok) and tok not in _KEYWORDS and self.last is None) or tok in (
                "ether", "vlan", "mpls", "gateway", "broadcast", "multicast", "inbound", "outbound", "len"):
            self.fail(tok, "unknown or unsupported primitive (supported: host, net, port, portrange, "
                           "ip, ip6, arp, rarp, tcp, udp, sctp, icmp, icmp6, proto, less, greater)")
        if tok in ("less", "greater"):
            n = self.number("a length", 0xFFFFFFFF)
            lo, hi = (0, n) if tok == "less" else (n, _ALL)
            return Term(PfKind.LEN, 0, addr=struct.pack("<QQ", lo, hi))
        if tok == "proto":
            return Term(PfKind.PROTO, 0, 0, self.proto_number())
        proto = dir_ = typ = None
        if tok in _PROTO_ONLY:
            proto = tok
            if tok in ("ip", "ip6") and self.peek() == "proto":
                self.i += 1
                return Term(PfKind.PROTO, 0, 4 if tok == "ip" else 6, self.proto_number())
            if self.peek() not in _DIRS | _TYPES:
                return _proto_only(tok)
            tok = self.next("a qualifier")
        if tok in _DIRS:
            dir_ = tok
            if self.peek() in ("or", "and") and self.peek(1) == ({"src", "dst"} - {tok}).pop():
                dir_ = "src and dst" if self.peek() == "and" else "src or dst"
                self.i += 2
            tok = self.next("host, net, port or a value")
        if tok in _TYPES:
            typ = tok
            value = self.next(f"a value for '{typ}'")
        elif tok in _KEYWORDS or tok in ("(", ")"):
            self.fail(tok, "expected host, net, port, portrange or a value")
        elif proto is None and dir_ is None:
            if self.last is None:
                self.fail(tok, "expected a primitive (host, net, port, tcp, ...)")
            proto, dir_, typ = self.last
            value = tok
        else:
            typ, value = "host", tok
        if value in _KEYWORDS or value in ("(", ")"):
            self.fail(value, f"expected a value after '{typ}'")
        self.last = (proto, dir_, typ)
        return self.build(proto, dir_, typ, value)

    def build(self, proto, dir_, typ, value):
        flags = {None: PF_SRC | PF_DST, "src or dst": PF_SRC | PF_DST, "src": PF_SRC, "dst": PF_DST,
                 "src and dst": PF_SRC | PF_DST | PF_BOTH}[dir_]
        if typ in ("port", "portrange"):
            if proto not in (None, "tcp", "udp", "sctp"):
                self.fail(proto, f"'{typ}' takes tcp, udp or sctp as protocol, not {proto}")
            if typ == "port":
                lo = hi = self.port(value, proto)
            else:
                a, sep, b = value.partition("-")
                if not sep:
                    self.fail(value, "portrange needs N-M")
                lo, hi = self.port(a, proto), self.port(b, proto)
                if lo > hi:
                    lo, hi = hi, lo
            term = Term(PfKind.PORT, flags, 0, lo, hi)
            return term if proto is None else _And([_proto_only(proto), term])
        if proto in ("tcp", "udp", "sctp", "icmp", "icmp6"):
            self.fail(proto, f"'{proto}' does not qualify '{typ}' (use 'ip' or 'ip6', or 'and')")
        if typ == "host":
            addr = self.address(value)
            term = _net(addr, addr.max_prefixlen, flags)
        else:
            term = self.network(value, flags)
        fam = term.family
        want = {None: fam, "ip": 4, "arp": 4, "rarp": 4, "ip6": 6}[proto]
        if want != fam:
            self.fail(value, f"'{proto} {typ}' needs an IPv{want} address")
        if proto is None:
            return term
        return _And([_proto_only(proto), term])

    def port(self, text: str, proto) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            try:
                v = socket.getservbyname(text, "udp" if proto == "udp" else "tcp")
            except OSError:
                self.fail(text, "not a port number or a known service name")
        if not 0 <= v <= 0xFFFF:
            self.fail(text, "port out of range (0-65535)")
        return v

    def address(self, text: str):
        try:
            return ipaddress.ip_address(text)
        except ValueError:
            if re.fullmatch(r"[0-9.]+|[0-9a-fA-F:.]+", text):
                self.fail(text, "not a valid IP address")
            self.fail(text, "host names are not resolved: give an IPv4 or IPv6 address")

    def network(self, text: str, flags: int) -> Term:
        if self.peek() == "mask":
            self.i += 1
            m = self.next("a netmask")
            try:
                net = ipaddress.ip_network(f"{text}/{m}", strict=True)
            except ValueError as e:
                self.fail(f"{text} mask {m}", str(e))
            return _net(net.network_address, net.prefixlen, flags)
        if "/" not in text and re.fullmatch(r"\d+(\.\d+){0,2}", text):   # net 10, net 10.1: /8, /16
            parts = text.split(".")
            text = ".".join(parts + ["0"] * (4 - len(parts))) + f"/{8 * len(parts)}"
        try:
            net = ipaddress.ip_network(text, strict=True)
        except ValueError as e:
            if "has host bits set" in str(e):
                self.fail(text, "non-network bits set (the address has bits outside the prefix)")
            self.address(text.partition("/")[0])
            self.fail(text, "not a valid network (ADDR/LEN)")
        return _net(net.network_address, net.prefixlen, flags)


def _proto_only(name: str):
    if name in ("ip", "ip6", "arp", "rarp"):
        return Term(PfKind.ETHERTYPE, 0, 0, {"ip": ETH_IP, "ip6": ETH_IP6, "arp": ETH_ARP, "rarp": ETH_RARP}[name])
    fam = {"icmp": 4, "icmp6": 6}.get(name, 0)
    return Term(PfKind.PROTO, 0, fam, IPPROTO[name])


def _net(addr, prefixlen: int, flags: int) -> Term:
    raw = addr.packed
    bits = (1 << len(raw) * 8) - (1 << (len(raw) * 8 - prefixlen)) if prefixlen else 0
    mask = bits.to_bytes(len(raw), "big")
    a = bytes(x & m for x, m in zip(raw, mask))
    return Term(PfKind.NET, flags, 4 if addr.version == 4 else 6, addr=a.ljust(16, b"\0"),
                mask=mask.ljust(16, b"\0"))


# ---------------------------------------------------------------- normal form

def _nnf(node, neg: bool = False):
    """Push NOTs down to the terms."""
    if isinstance(node, Term):
        return node.negated() if neg else node
    if isinstance(node, _Not):
        return _nnf(node[0], not neg)
    kids = [_nnf(k, neg) for k in node]
    return (_Or if isinstance(node, _And) == neg else _And)(kids)


def _dnf(node, expr: str) -> list[frozenset]:
    if isinstance(node, Term):
        return [frozenset([node])]
    parts = [_dnf(k, expr) for k in node]
    if isinstance(node, _Or):
        out = [c for p in parts for c in p]
    else:
        out = [frozenset()]
        for p in parts:
            out = [a | b for a in out for b in p]
            if len(out) > _EXPANSION_LIMIT:
                break
    if len(out) > _EXPANSION_LIMIT:
        raise UsageError(f"filter too complex: {expr!r} expands to more than {_EXPANSION_LIMIT} "
                         f"alternatives (at most {abi.PF_CLAUSES_MAX} are allowed)")
    return out


def _simplify(clauses: list[frozenset]) -> list[frozenset]:
    live = []
    for c in clauses:
        if any(t.negated() in c for t in c):
            continue                     # "x and not x": never true
        if c not in live:
            live.append(c)
    # absorption: (a) or (a and b) == (a)
    return [c for c in live if not any(o < c for o in live)]


def _term_key(t: Term):
    return (t.kind, t.family, t.lo, t.hi, t.addr, t.mask, t.flags)


def compile_filter(expr: str | None) -> Filter:
    """Parse and normalise a filter; raises UsageError naming the offending token."""
    expr = (expr or "").strip()
    if not expr:
        return Filter("", ())
    clauses = _simplify(_dnf(_nnf(_Parser(expr).parse()), expr))
    if not clauses:      # contradiction: one term that is never true
        never = Term(PfKind.LEN, PF_NOT, addr=struct.pack("<QQ", 0, _ALL))
        return Filter(expr, ((never,),))
    if any(not c for c in clauses):
        return Filter(expr, ())
    if len(clauses) > abi.PF_CLAUSES_MAX:
        raise UsageError(f"filter too complex: {expr!r} needs {len(clauses)} alternatives when written "
                         f"as an OR of ANDs (at most {abi.PF_CLAUSES_MAX}); simplify it")
    longest = max(len(c) for c in clauses)
    if longest > abi.PF_TERMS_MAX:
        raise UsageError(f"filter too complex: {expr!r} needs {longest} conditions in one alternative "
                         f"(at most {abi.PF_TERMS_MAX}); simplify it")
    return Filter(expr, tuple(tuple(sorted(c, key=_term_key)) for c in clauses))


# ---------------------------------------------------------------- Python model

@dataclass
class _Pkt:
    proto: int = 0
    ipver: int = 0
    l4: int = 0
    l4_frag: int = -1
    fam: int = 0
    has_ports: bool = False
    sport: int = 0
    dport: int = 0
    saddr: bytes = bytes(16)
    daddr: bytes = bytes(16)


def parse_frame(frame: bytes, link_hdr_len: int = 14) -> _Pkt:
    """The header fields packets.bpf.c's parse() extracts (skb->protocol from the frame)."""
    p = _Pkt()
    off = link_hdr_len
    if link_hdr_len >= 14:
        if len(frame) < 14:
            return p
        p.proto = int.from_bytes(frame[12:14], "big")
    elif frame:
        p.proto = {4: ETH_IP, 6: ETH_IP6}.get(frame[0] >> 4, 0)
    if p.proto == ETH_IP:
        if len(frame) < off + 20:
            return p
        p.ipver = p.fam = 4
        p.l4 = frame[off + 9]
        p.saddr = frame[off + 12:off + 16].ljust(16, b"\0")
        p.daddr = frame[off + 16:off + 20].ljust(16, b"\0")
        if int.from_bytes(frame[off + 6:off + 8], "big") & 0x1FFF:
            return p
        off += (frame[off] & 0xF) * 4
    elif p.proto == ETH_IP6:
        if len(frame) < off + 40:
            return p
        p.ipver = p.fam = 6
        p.l4 = frame[off + 6]
        p.saddr, p.daddr = frame[off + 8:off + 24], frame[off + 24:off + 40]
        off += 40
        if p.l4 == 44:
            if len(frame) > off:
                p.l4_frag = frame[off]
            return p
    elif p.proto in (ETH_ARP, ETH_RARP):
        if len(frame) < off + 36:
            return p
        p.fam = 4
        p.saddr = frame[off + 14:off + 18].ljust(16, b"\0")
        p.daddr = frame[off + 24:off + 28].ljust(16, b"\0")
        return p
    else:
        return p
    if p.l4 in (6, 17, 132) and len(frame) >= off + 4:
        p.has_ports = True
        p.sport, p.dport = struct.unpack_from(">HH", frame, off)
    return p


def _term_match(t: Term, p: _Pkt, length: int) -> bool:
    if t.kind == PfKind.ETHERTYPE:
        r = p.proto == t.lo
    elif t.kind == PfKind.PROTO:
        r = bool(p.ipver) and (not t.family or t.family == p.ipver) and (
            p.l4 == t.lo or (p.ipver == 6 and p.l4 == 44 and p.l4_frag == t.lo))
    elif t.kind == PfKind.LEN:
        lo, hi = struct.unpack("<QQ", t.addr)
        r = lo <= length <= hi
    else:
        if t.kind == PfKind.PORT:
            ok = p.has_ports
            s, d = t.lo <= p.sport <= t.hi, t.lo <= p.dport <= t.hi
        else:
            ok = p.fam == t.family
            s = all(a & m == v for a, m, v in zip(p.saddr, t.mask, t.addr))
            d = all(a & m == v for a, m, v in zip(p.daddr, t.mask, t.addr))
        if not ok:
            r = False
        elif t.flags & PF_BOTH:
            r = s and d
        else:
            r = bool((t.flags & PF_SRC and s) or (t.flags & PF_DST and d))
    return r != bool(t.flags & PF_NOT)


__all__ = ["Filter", "Term", "compile_filter", "parse_frame"]
