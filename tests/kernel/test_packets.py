"""Packet capture (sources/packets.py + bpf/packets.bpf.c) on real interfaces, with real BPF.

Oracles: tshark capturing the same traffic on lo at the same time (byte for byte, GSO
super-packets included), libpcap's verdicts for the filter corpus (run here through the BPF
program itself with BPF_PROG_TEST_RUN), and the pids of the peers we start.
"""
from __future__ import annotations

import collections
import contextlib
import os
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import needs
from tests.peers import CurlClient, NginxServer, have_tshark, wait_for
from tests.peers._common import wait_tcp_closed
from tests.peers import PacketCapture as TsharkCapture
from tests.unit.test_pktfilter import CORPUS, EXPRESSIONS, LIBPCAP, libpcap_verdicts
from tlstap import abi
from tlstap.abi import PktDir
from tlstap.sources.base import CaptureConfig
from tlstap.errors import UsageError
from tlstap.libbpf.object import TC_H_CLSACT_EGRESS, TC_H_CLSACT_INGRESS, kernel_has_func, tc_filter_count
from tlstap.events import Packet
from tlstap.sources.packets import (DIRECT_KFUNCS, LINKTYPE_ETHERNET, TC_ACT_UNSPEC, TC_PROGRAMS, Interface,
                            PacketCapture, load_object)
from tlstap.sources.pktfilter import compile_filter

BIG = 64 * 1024
FILES = {"big.bin": os.urandom(BIG), "small.txt": b"hello packets\n"}
DIRECT = all(kernel_has_func(f) for f in DIRECT_KFUNCS)


# ---------------------------------------------------------------- helpers

def tcp_fields(frame: bytes):
    """(src addr, sport, dst addr, dport, flags, payload) of an Ethernet/IP/TCP frame, else None."""
    et = frame[12:14]
    if et == b"\x08\x00" and frame[23] == 6:
        ihl = (frame[14] & 0xF) * 4
        ip_len = struct.unpack_from(">H", frame, 16)[0]
        src, dst, off, end = frame[26:30], frame[30:34], 14 + ihl, 14 + ip_len
    elif et == b"\x86\xdd" and frame[20] == 6:
        src, dst, off = frame[22:38], frame[38:54], 54
        end = 54 + struct.unpack_from(">H", frame, 18)[0]
    else:
        return None
    sport, dport = struct.unpack_from(">HH", frame, off)
    doff = (frame[off + 12] >> 4) * 4
    return src, sport, dst, dport, frame[off + 13], frame[off + doff:end]


def read_pcapng(path) -> list[bytes]:
    """Packet data of every Enhanced Packet Block (little-endian file, as tshark writes here)."""
    data = open(path, "rb").read()
    out, off = [], 0
    while off + 12 <= len(data):
        btype, blen = struct.unpack_from("<II", data, off)
        if btype == 6:
            caplen = struct.unpack_from("<I", data, off + 20)[0]
            out.append(data[off + 28:off + 28 + caplen])
        off += blen
    return out


class Collector:
    """PacketCapture on an interface, collecting Packets; run(...) stops it and drains."""

    def __init__(self, ifname="lo", expr="", cfg=None, **kw):
        self.packets: list[Packet] = []
        self.cap = PacketCapture(cfg or CaptureConfig(), ifname, expr, self.packets.append, **kw)

    def __enter__(self):
        self.cap.start()
        return self

    def stop(self):
        self.cap.poll(0)
        self.cap.detach_probes()
        self.cap.drain()
        self.counters = self.cap.counters()

    def __exit__(self, *exc):
        self.cap.close()

    def tcp(self, port: int) -> list[tuple[Packet, tuple]]:
        out = []
        for p in self.packets:
            f = tcp_fields(p.data)
            if f and port in (f[1], f[3]):
                out.append((p, f))
        return out


def nginx_worker(srv: NginxServer) -> int:
    workers = srv.worker_pids()
    assert len(workers) == 1
    return workers[0]


# ---------------------------------------------------------------- the filter, in the kernel

def _passes(prog, counters, ncpus, frame: bytes) -> bool:
    before = sum(counters.lookup_percpu_u64(abi.PktCounter.PACKETS, ncpus))
    retval, _ = prog.test_run(frame)
    assert retval == TC_ACT_UNSPEC     # no verdict, always
    return sum(counters.lookup_percpu_u64(abi.PktCounter.PACKETS, ncpus)) > before


@needs(LIBPCAP, "libpcap is not installed (apt-get install tshark brings it)")
@pytest.mark.parametrize("direct", [True, False] if DIRECT else [False], ids=["direct", "copy"][:1 + DIRECT])
def test_bpf_filter_matches_libpcap(direct):
    """Every corpus frame through the real TC program, for every expression: same verdicts."""
    from tlstap.libbpf._lib import lib
    ncpus = lib.libbpf_num_possible_cpus()
    ingress = TC_PROGRAMS[direct][0]
    exprs = EXPRESSIONS if direct == DIRECT else EXPRESSIONS[::5]
    for expr in exprs:
        want = libpcap_verdicts(expr, CORPUS)
        with load_object(CaptureConfig(mapsize=1 << 20), compile_filter(expr), 14, abi.PKT_CAP_MAX, False,
                         direct, [ingress]) as obj:
            prog, counters = obj.program(ingress), obj.map("pkt_counters")
            got = {name: _passes(prog, counters, ncpus, f) for name, f in CORPUS.items()}
        diff = {n: (got[n], want[n]) for n in CORPUS if got[n] != want[n]}
        assert not diff, f"{expr!r}: (bpf, libpcap) differ on {diff}"


@pytest.mark.parametrize("direct", [True, False] if DIRECT else [False], ids=["direct", "copy"][:1 + DIRECT])
def test_record_layout_and_snaplen(direct):
    """A record carries the frame as sent; snaplen truncates and counts; nothing is dropped."""
    from tlstap.libbpf import RingBuffer
    from tlstap.libbpf._lib import lib
    ncpus = lib.libbpf_num_possible_cpus()
    ingress = TC_PROGRAMS[direct][0]
    frame = CORPUS["v4 big tcp 443"]
    for snaplen in (abi.PKT_CAP_MAX, 100):
        with load_object(CaptureConfig(mapsize=1 << 20), compile_filter(""), 14, snaplen, False, direct,
                         [ingress]) as obj:
            ring = RingBuffer(obj.map("packets").fd, 1 << 20)
            recs = []
            obj.program(ingress).test_run(frame)
            ring.consume(lambda v: recs.append(bytes(v)))
            ring.close()
            c = {k: sum(obj.map("pkt_counters").lookup_percpu_u64(k, ncpus)) for k in abi.PktCounter}
        assert len(recs) == 1
        ev = abi.PacketEvent.from_buffer_copy(recs[0][:abi.ctypes.sizeof(abi.PacketEvent)])
        body = recs[0][abi.ctypes.sizeof(abi.PacketEvent):]
        assert ev.len == len(frame) and ev.dir == PktDir.INGRESS
        assert ev.caplen == min(len(frame), snaplen) and body[:ev.caplen] == frame[:ev.caplen]
        assert c[abi.PktCounter.TRUNCATED] == (snaplen < len(frame))
        assert c[abi.PktCounter.BYTES] == ev.caplen


def test_take_without_scan_moves_the_consumer_as_far_as_the_reader_used():
    """RingBuffer.take(scan=False), as -m pcapng reads: the reader gets everything
    published and says how much of it it used; the rest comes again in the next piece."""
    from tlstap.libbpf import RingBuffer
    from tlstap.libbpf.ringbuf import HDR_SZ, records
    ingress = TC_PROGRAMS[DIRECT][0]
    frames = [CORPUS["v4 big tcp 443"][:n] for n in (60, 200, 700)]
    size = abi.ctypes.sizeof(abi.PacketEvent)

    def framed(f):                  # a record's bytes in the ring: header, event, frame, padding
        return (HDR_SZ + size + len(f) + 7) & ~7

    with load_object(CaptureConfig(mapsize=1 << 20), compile_filter(""), 14, abi.PKT_CAP_MAX, False, DIRECT,
                     [ingress]) as obj:
        ring = RingBuffer(obj.map("packets").fd, 1 << 20)
        try:
            for f in frames:
                obj.program(ingress).test_run(f)
            pieces = []

            def first_only(piece):
                pieces.append(len(records(piece)[0]))
                return framed(frames[0])

            assert ring.take(first_only, None, scan=False) == framed(frames[0]) and pieces == [3]
            with pytest.raises(ValueError):
                ring.take(lambda piece: len(piece) + 8, None, scan=False)
            got = []

            def everything(piece):
                got.extend(bytes(r[size:]) for r in records(piece)[0])
                return len(piece)

            assert ring.take(everything, None, scan=False) == framed(frames[1]) + framed(frames[2])
            assert ring.pending_bytes() == 0 and ring.take(everything, None, scan=False) == 0
        finally:
            ring.close()
    assert got == frames[1:]


def test_forced_wakeups_start_at_an_eighth_and_come_at_most_once_a_millisecond():
    """ring.h: past an eighth of the ring the producer forces the reader's wakeup, which on a
    VM is a self-IPI and an exit per record; so at most one per millisecond (1 GB/s into an
    8 MiB ring cost nginx a quarter of its requests without the limit). Records go in one
    BPF_PROG_TEST_RUN at a time, none is read, and the time of the last forced wakeup is
    looked at after each."""
    import time as _time
    from tlstap.libbpf import RingBuffer
    from tlstap.libbpf._lib import lib
    ingress = TC_PROGRAMS[DIRECT][0]
    frame = CORPUS["v4 big tcp 443"]
    size = 4 << 20
    with load_object(CaptureConfig(mapsize=size), compile_filter(""), 14, abi.PKT_CAP_MAX, False, DIRECT,
                     [ingress]) as obj:
        ring = RingBuffer(obj.map("packets").fd, size)
        wake = obj.map(".data.ring_wake")
        key, val = abi.ctypes.c_uint32(0), abi.ctypes.c_uint64()

        def woken() -> int:       # ring_woken_ns
            assert lib.bpf_map_lookup_elem(wake.fd, abi.ctypes.byref(key), abi.ctypes.byref(val)) == 0
            return val.value

        prog = obj.program(ingress)
        try:
            while ring.pending_bytes() < size // 8:
                assert woken() == 0, "a wakeup forced before an eighth of the ring"
                prog.test_run(frame)
            stamps, past = set(), 0
            t0 = _time.monotonic()
            while ring.pending_bytes() < size * 3 // 4:
                prog.test_run(frame)
                past += 1
                stamps.add(woken())
            elapsed_ms = (_time.monotonic() - t0) * 1000
        finally:
            ring.close()
    stamps.discard(0)
    assert past > 1000 and 1 <= len(stamps) <= elapsed_ms + 2, (past, len(stamps), elapsed_ms)


# ---------------------------------------------------------------- curl <-> nginx on lo

@needs(have_tshark(), "tshark is not installed")
def test_curl_nginx_same_bytes_as_tshark_and_attributed(tmp_path, nginx):
    srv = nginx(FILES)
    worker = nginx_worker(srv)
    with TsharkCapture(tmp_path / "tshark.pcapng", [srv.port]) as ts, \
            Collector("lo", f"tcp port {srv.port}") as col:
        cl = CurlClient(srv.url("big.bin"))
        res = cl.go().wait()
        assert res.body == FILES["big.bin"]
        wait_tcp_closed(res.local[1], srv.port)   # its FIN/ACKs, after curl exits, in both captures
        ts.stop()
        col.stop()
    theirs = [f for f in read_pcapng(ts.path) if (t := tcp_fields(f)) and srv.port in (t[1], t[3])]
    ours = [p.data for p, _ in col.tcp(srv.port)]
    assert theirs, ts.stderr()
    # byte for byte, the same packets (each once: lo is captured at egress only)
    assert collections.Counter(ours) == collections.Counter(theirs)
    for d in (True, False):     # and in the same order per direction
        side = [f for f in ours if (tcp_fields(f)[3] == srv.port) == d]
        assert side == [f for f in theirs if (tcp_fields(f)[3] == srv.port) == d]
    # GSO: a 64 KiB response leaves lo in super-packets, tshark sees them as such too
    assert max(len(f) for f in theirs) > 16 * 1024
    assert col.counters["lost"] == 0 and col.counters["truncated"] == 0
    assert col.cap.interface.linktype == LINKTYPE_ETHERNET
    # attribution: the client's packets are curl's, the server's are the nginx worker's
    to_srv = [(p, f) for p, f in col.tcp(srv.port) if f[3] == srv.port and f[1] == res.local[1]]
    from_srv = [(p, f) for p, f in col.tcp(srv.port) if f[1] == srv.port and f[3] == res.local[1]]
    assert to_srv and from_srv
    for p, f in to_srv:
        if f[5]:
            assert (p.sender.pid, p.receiver.pid) == (res.pid, worker), p
    for p, f in from_srv:
        if f[5]:
            assert (p.sender.pid, p.receiver.pid) == (worker, res.pid), p
    syn = next(p for p, f in to_srv if f[4] & 0x12 == 0x02)
    assert syn.sender.pid == res.pid and syn.sender.comm == "curl"
    assert all(p.direction == PktDir.EGRESS and p.ifindex == 1 for p in col.packets)
    wall = time.time_ns()
    assert all(wall - 60e9 < p.ts_ns_wall <= wall for p in col.packets)


def test_filter_leaves_out_other_ports(nginx, cert):
    srv = nginx(FILES)
    with NginxServer(cert[0], cert[1], FILES) as other, Collector("lo", f"tcp port {srv.port}") as col:
        ends = [(CurlClient(s.url("small.txt")).go().wait().local[1], s.port) for s in (other, srv)]
        for end in ends:
            wait_tcp_closed(*end)          # the close is among the packets counted
        col.stop()
    assert col.tcp(srv.port)
    assert not col.tcp(other.port)
    assert all(srv.port in tcp_fields(p.data)[1:4:2] for p in col.packets)
    assert col.counters["filtered"] >= 10     # the other exchange: handshake, TLS, close


def test_pid_scope(nginx):
    srv = nginx(FILES)
    one, two = CurlClient(srv.url("big.bin")), CurlClient(srv.url("small.txt"))
    try:
        with Collector("lo", f"tcp port {srv.port}", CaptureConfig(pid=one.pid)) as col:
            r2 = two.go().wait()
            r1 = one.go().wait()
            wait_tcp_closed(r1.local[1], srv.port)
            col.stop()
    finally:
        one.close()
        two.close()
    ports = {f[1] if f[3] == srv.port else f[3] for _, f in col.tcp(srv.port)}
    assert ports == {r1.local[1]}
    assert r2.local[1] not in ports
    assert all(one.pid in (p.sender and p.sender.pid, p.receiver and p.receiver.pid) for p in col.packets)
    got = sum(len(f[5]) for _, f in col.tcp(srv.port) if f[1] == srv.port)
    assert got > BIG                          # the whole response (plus TLS overhead)
    assert any(f[4] & 0x12 == 0x02 for _, f in col.tcp(srv.port))  # the SYN, attributed at once
    assert col.counters["filtered"] > 0


@pytest.mark.skipif(not os.path.exists("/proc/net/if_inet6"), reason="no IPv6")
def test_ipv6(cert):
    with NginxServer(cert[0], cert[1], FILES, ipv6=True) as srv, \
            Collector("lo", f"ip6 and tcp port {srv.port}") as col:
        worker = nginx_worker(srv)
        res = CurlClient(srv.url("big.bin", ipv6=True)).go().wait()
        wait_tcp_closed(res.local[1], srv.port)
        col.stop()
    assert res.body == FILES["big.bin"]
    pk = col.tcp(srv.port)
    assert pk and all(p.data[12:14] == b"\x86\xdd" for p, _ in pk)
    data = [(p, f) for p, f in pk if f[5]]
    assert data
    for p, f in data:
        want = (res.pid, worker) if f[3] == srv.port else (worker, res.pid)
        assert (p.sender.pid, p.receiver.pid) == want


# ---------------------------------------------------------------- connections older than the capture

PEER = r"""
import socket, sys
if sys.argv[1] == "server":
    ls = socket.socket(); ls.bind(("127.0.0.1", 0)); ls.listen(1)
    print(ls.getsockname()[1], flush=True)
    c, _ = ls.accept()
    while (b := c.recv(65536)):
        c.sendall(b)
else:
    c = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
    print(c.getsockname()[1], flush=True)
    n = int(sys.stdin.readline())
    c.sendall(b"p" * n)
    got = 0
    while got < n:
        got += len(c.recv(65536))
    print("done", flush=True)
"""


def test_connection_older_than_capture_is_seeded():
    srv = subprocess.Popen([sys.executable, "-c", PEER, "server"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(srv.stdout.readline())
        cl = subprocess.Popen([sys.executable, "-c", PEER, "client", str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
        try:
            cport = int(cl.stdout.readline())
            with Collector("lo", f"tcp port {port}") as col:
                assert col.cap.seeded >= 2       # at least the two ends of this connection
                cl.stdin.write("100000\n")
                cl.stdin.flush()
                # the echo is all back: every data packet went through the TC hook (on lo
                # it runs in the sender's transmit path, before the receiver sees it)
                assert cl.stdout.readline().strip() == "done"
                col.stop()
        finally:
            cl.kill()
            cl.wait()
    finally:
        srv.kill()
        srv.wait()
    data = [(p, f) for p, f in col.tcp(port) if f[5]]
    assert sum(len(f[5]) for _, f in data if f[3] == port) == 100000
    for p, f in data:
        want = (cl.pid, srv.pid) if f[1] == cport else (srv.pid, cl.pid)
        assert (p.sender.pid, p.receiver.pid) == want, p


# ---------------------------------------------------------------- a real (non-loopback) interface

@contextlib.contextmanager
def veth_pair():
    a = f"tlp{uuid.uuid4().hex[:8]}"
    b = a + "p"
    subprocess.run(["ip", "link", "add", a, "type", "veth", "peer", "name", b], check=True)
    try:
        for n in (a, b):
            subprocess.run(["ip", "link", "set", n, "up"], check=True)
        yield a, b
    finally:
        subprocess.run(["ip", "link", "del", a], check=False)


def qdiscs(ifname: str) -> str:
    return subprocess.run(["tc", "qdisc", "show", "dev", ifname], capture_output=True, text=True).stdout


def send_raw(ifname: str, frame: bytes) -> None:
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((ifname, 0))
        s.send(frame)


@pytest.mark.parametrize("attach", ["tcx", "clsact"])
def test_veth_both_directions_and_cleanup(attach):
    frame = CORPUS["v4 udp 53"]
    with veth_pair() as (a, b):
        iface = Interface.lookup(a)
        assert (iface.linktype, iface.link_hdr_len, iface.loopback) == (LINKTYPE_ETHERNET, 14, False)
        assert "clsact" not in qdiscs(a)
        with Collector(a, "udp port 53", attach=attach) as col:
            # tcx needs no qdisc; the fallback makes one
            assert col.cap.created_qdisc == ("clsact" in qdiscs(a)) == (attach == "clsact")
            send_raw(b, frame)          # arrives at a: ingress
            send_raw(a, frame)          # leaves a: egress
            send_raw(a, CORPUS["v4 tcp 443->50000"])   # filtered
            wait_for(lambda: col.cap.poll(0.05) or len(col.packets) >= 2, 5, "two packets")
            col.stop()
        assert sorted(p.direction for p in col.packets) == [PktDir.INGRESS, PktDir.EGRESS]
        assert all(p.data == frame and p.ifindex == iface.ifindex and p.sender is None for p in col.packets)
        assert col.counters["filtered"] >= 1
        assert "clsact" not in qdiscs(a)       # ours: removed


@pytest.mark.parametrize("attach", ["tcx", "clsact"])
def test_existing_clsact_and_filters_untouched(attach):
    with veth_pair() as (a, _):
        subprocess.run(["tc", "qdisc", "add", "dev", a, "clsact"], check=True)
        # someone else's filter (classic BPF returning TC_ACT_OK)
        subprocess.run(["tc", "filter", "add", "dev", a, "ingress", "prio", "7", "bpf", "da", "bytecode",
                        "1,6 0 0 0,"], check=True)
        ifindex = Interface.lookup(a).ifindex
        before = tc_filter_count(ifindex, TC_H_CLSACT_INGRESS)
        with Collector(a, attach=attach) as col:
            assert not col.cap.created_qdisc
            # filters: ours in the fallback, none with tcx
            assert (tc_filter_count(ifindex, TC_H_CLSACT_INGRESS) > before) == (attach == "clsact")
            assert (tc_filter_count(ifindex, TC_H_CLSACT_EGRESS) > 0) == (attach == "clsact")
            col.stop()
        assert "clsact" in qdiscs(a)
        assert tc_filter_count(ifindex, TC_H_CLSACT_INGRESS) == before
        assert tc_filter_count(ifindex, TC_H_CLSACT_EGRESS) == 0
        out = subprocess.run(["tc", "filter", "show", "dev", a, "ingress"], capture_output=True, text=True).stdout
        assert "pref 7 bpf" in out and "bytecode '1,6 0 0 0'" in out


def test_fallback_qdisc_we_created_stays_while_another_capture_uses_it():
    with veth_pair() as (a, _):
        first = Collector(a, attach="clsact")
        first.__enter__()
        with Collector(a, attach="clsact") as second:
            assert first.cap.created_qdisc and not second.cap.created_qdisc
            first.stop()
            first.__exit__(None, None, None)
            assert "clsact" in qdiscs(a)       # second still attached
            second.stop()
        # created by the first, now unused: it stays (only its creator removes it)
        assert "clsact" in qdiscs(a)


# ---------------------------------------------------------------- errors

def test_unknown_interface_is_a_one_line_usage_error():
    cap = PacketCapture(CaptureConfig(), "nosuchif0", "", lambda p: None)
    with pytest.raises(UsageError) as e:
        cap.start()
    assert "nosuchif0" in str(e.value) and "\n" not in str(e.value)
    cap.close()


def test_bad_filter_is_a_usage_error_before_anything_is_loaded():
    with pytest.raises(UsageError, match="'bogus'"):
        PacketCapture(CaptureConfig(), "lo", "tcp and bogus", lambda p: None)
