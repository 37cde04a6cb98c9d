"""The pcapng writer of -m pcapng, with tshark and capinfos as the oracles.

Test data is real traffic: curl fetches a file from a local nginx over TLS 1.3 and TLS 1.2
while tshark captures loopback; curl's SSLKEYLOGFILE gives the key log lines. The captured
frames are then written again through PcapngWriter with those lines in a Decryption Secrets
Block, and tshark, given no key file at all, must show curl's request and nginx's response.
"""
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import needs
from tests.peers import NginxServer, PacketCapture, have_tshark, make_cert, run_curl, tshark_fields, wait_for
from tlstap.sinks.pcapng import (DIR_INBOUND, DIR_OUTBOUND, LINKTYPE_ETHERNET, LINKTYPE_RAW, Gate, PcapngSink,
                                   PcapngWriter, process_comment)

pytestmark = needs(have_tshark(), "tshark is not installed")

BODY = b"".join(b"line %04d of the tlstap pcapng test body\n" % i for i in range(40))
URI = "/pcapng/body.txt?q=1"
SRC = Path(__file__).resolve().parents[2] / "src"


# ---------------------------------------------------------------- real traffic

def read_frames(pcapng: Path) -> list[tuple[int, bytes]]:
    """(epoch ns, frame) of every packet, via editcap's nanosecond pcap (a trivial format)."""
    pcap = pcapng.with_suffix(".pcap")
    subprocess.run(["editcap", "-F", "nsecpcap", str(pcapng), str(pcap)], check=True, capture_output=True)
    raw = pcap.read_bytes()
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", raw)
    assert magic == 0xA1B23C4D and linktype == 1, (hex(magic), linktype)
    frames, off = [], 24
    while off < len(raw):
        sec, nsec, incl, _orig = struct.unpack_from("<IIII", raw, off)
        frames.append((sec * 10**9 + nsec, raw[off + 16:off + 16 + incl]))
        off += 16 + incl
    return frames


def tcp_ports(frame: bytes) -> tuple[int, int] | None:
    """(sport, dport) of an Ethernet/IPv4/TCP frame, else None."""
    if frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    ihl = (frame[14] & 0x0F) * 4
    return struct.unpack_from(">HH", frame, 14 + ihl)


@pytest.fixture(scope="module", params=["1.3", "1.2"])
def exchange(request, tmp_path_factory):
    """One HTTPS/1.1 GET captured on lo: frames (TCP only), curl's key log, what curl got."""
    d = tmp_path_factory.mktemp(f"tls{request.param}")
    cert, key = make_cert(d / "certs")
    args = ["--tls-max", "1.2"] if request.param == "1.2" else ["--tlsv1.3"]
    with NginxServer(cert, key, {"pcapng/body.txt": BODY}) as srv:
        with PacketCapture(d / "raw.pcapng", [srv.port]) as cap:
            res = run_curl(srv.url(URI), extra_args=args, keylog=True)
        worker = srv.worker_pids()[0]
    assert res.status == 200 and res.body == BODY
    labels = {ln.split()[0] for ln in res.keylog}
    assert ("CLIENT_RANDOM" in labels) == (request.param == "1.2"), labels
    frames = [(ts, f) for ts, f in read_frames(cap.path) if tcp_ports(f)]
    assert len(frames) >= 10
    return {"version": request.param, "frames": frames, "keylog": res.keylog, "port": srv.port,
            "client": (res.pid, "curl"), "server": (worker, "nginx")}


def packet_args(ex, ts, frame):
    """add_packet keyword arguments: client->server outbound (we sit at the client), and the
    comment naming sender and receiver."""
    from_client = tcp_ports(frame)[1] == ex["port"]
    src, dst = (ex["client"], ex["server"]) if from_client else (ex["server"], ex["client"])
    return {"direction": DIR_OUTBOUND if from_client else DIR_INBOUND,
            "comment": process_comment(src[0], src[1], dst[0], dst[1])}


def write_exchange(path, ex, secrets="first") -> Path:
    """secrets: "first" (DSB before every packet), "last" (after them) or None."""
    with PcapngWriter(str(path)) as w:
        lo = w.add_interface("lo", LINKTYPE_ETHERNET, 262144, "loopback")
        if secrets == "first":
            w.add_secrets(ex["keylog"])
        for ts, frame in ex["frames"]:
            w.add_packet(lo, ts, frame, **packet_args(ex, ts, frame))
        if secrets == "last":
            w.add_secrets(ex["keylog"])
    return Path(path)


def http_seen(pcap) -> tuple[list[str], list[bytes]]:
    """(request URIs, response bodies) tshark decrypts with no key file but the file's DSBs."""
    uris = [r[0] for r in tshark_fields(pcap, ["http.request.uri"], "http.request")]
    bodies = [file_data(r[0]) for r in tshark_fields(pcap, ["http.file_data"], "http.response")]
    return uris, bodies


def file_data(cell: str) -> bytes:
    # tshark 4.0 prints a text body as text with C escapes (\n); other versions print hex
    h = cell.replace(":", "")
    try:
        return bytes.fromhex(h)
    except ValueError:
        return cell.encode().decode("unicode_escape").encode("latin-1")


def tshark_run(pcap, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["tshark", "-n", "-r", str(pcap), "-o", "tls.keylog_file:", *args],
                          capture_output=True, text=True, timeout=120)


def whole_blocks(path) -> tuple[list[tuple[int, int, bytes]], int]:
    """(offset, type, body) of each whole block, and how many bytes follow the last one:
    a walker for the tests' own structural checks."""
    raw = Path(path).read_bytes()
    out, off = [], 0
    while off + 12 <= len(raw):
        btype, n = struct.unpack_from("<II", raw, off)
        assert n % 4 == 0 and n >= 12
        if off + n > len(raw):
            break
        assert struct.unpack_from("<I", raw, off + n - 4)[0] == n
        out.append((off, btype, raw[off + 8:off + n - 4]))
        off += n
    return out, len(raw) - off


def blocks(path) -> list[tuple[int, int, bytes]]:
    out, tail = whole_blocks(path)
    assert tail == 0, f"{tail} bytes after the last whole block"
    return out


def options(body: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 0
    while off + 4 <= len(body):
        code, n = struct.unpack_from("<HH", body, off)
        if code == 0:
            break
        out.append((code, body[off + 4:off + 4 + n]))
        off += 4 + n + (-n & 3)
    return out


# ---------------------------------------------------------------- decryption

def test_tshark_decrypts_with_no_key_file(exchange, tmp_path):
    out = write_exchange(tmp_path / "out.pcapng", exchange)
    uris, bodies = http_seen(out)
    assert uris == [URI]
    assert bodies == [BODY]
    # the control: the same packets with no DSB show TLS but nothing inside it
    bare = write_exchange(tmp_path / "bare.pcapng", exchange, secrets=None)
    assert http_seen(bare) == ([], [])
    assert tshark_fields(bare, ["tls.record.content_type"], "tls")


def test_capinfos_counts_one_decryption_secrets_block(exchange, tmp_path):
    out = write_exchange(tmp_path / "out.pcapng", exchange)
    p = subprocess.run(["capinfos", "-D", "-c", str(out)], capture_output=True, text=True, check=True)
    assert "Number of decryption secrets in file: 1" in p.stdout, p.stdout
    assert f"Number of packets:   {len(exchange['frames'])}" in p.stdout, p.stdout


def test_secrets_after_the_packets_do_not_decrypt(exchange, tmp_path):
    # why the order matters: tshark reads in one pass and keeps a session it could not decrypt
    out = write_exchange(tmp_path / "late.pcapng", exchange, secrets="last")
    assert http_seen(out) == ([], [])


def late_key_arrivals(ex, key_delay_ns):
    """Events in the order a capture loop would see them: each packet at its own timestamp,
    the key lines `key_delay_ns` after the first packet nginx sent with payload (its
    ServerHello flight, encrypted from there on in TLS 1.3)."""
    port = ex["port"]
    first_srv = next(ts for ts, f in ex["frames"] if tcp_ports(f)[0] == port and len(f) > 66)
    events = [(ts, "pkt", (ts, f)) for ts, f in ex["frames"]]
    events.append((first_srv + key_delay_ns, "keys", ex["keylog"]))
    return sorted(events, key=lambda e: e[0])


def write_through_sink(path, ex, lag_ns, key_delay_ns=50_000_000) -> Path:
    sink = PcapngSink(PcapngWriter(str(path)), lag_ns=lag_ns)
    lo = sink.writer.add_interface("lo", LINKTYPE_ETHERNET)
    for now, kind, what in late_key_arrivals(ex, key_delay_ns):
        if kind == "keys":
            sink.secrets(what)
        else:
            ts, frame = what
            sink.packet(lo, ts, frame, **packet_args(ex, ts, frame))
        sink.flush(now_ns=now)
    sink.close()
    return Path(path)


def test_reordering_queue_puts_a_late_key_before_its_packets(exchange, tmp_path):
    # without holding packets back the key lands after the packets that needed it ...
    assert http_seen(write_through_sink(tmp_path / "lag0.pcapng", exchange, lag_ns=0)) == ([], [])
    # ... with the default lag it is written before them
    out = write_through_sink(tmp_path / "lag.pcapng", exchange, lag_ns=300_000_000)
    assert http_seen(out) == ([URI], [BODY])
    kinds = [b[1] for b in blocks(out)]
    assert kinds.count(0x0A) == 1
    assert tshark_fields(out, ["frame.len"]) == [[str(len(f))] for _, f in exchange["frames"]]


# ---------------------------------------------------------------- packet metadata

def test_comments_directions_and_timestamps_visible_to_tshark(exchange, tmp_path):
    out = write_exchange(tmp_path / "out.pcapng", exchange)
    rows = tshark_fields(out, ["frame.comment", "frame.packet_flags_direction", "tcp.srcport",
                               "frame.time_epoch", "frame.interface_name"])
    assert len(rows) == len(exchange["frames"])
    (cpid, _), (spid, _) = exchange["client"], exchange["server"]
    to_server = f"pid={cpid} comm=curl -> pid={spid} comm=nginx"
    to_client = f"pid={spid} comm=nginx -> pid={cpid} comm=curl"
    for row, (ts, _) in zip(rows, exchange["frames"]):
        comment, direction, sport, epoch, ifname = row
        from_server = int(sport) == exchange["port"]
        assert comment == (to_client if from_server else to_server)
        assert int(direction, 0) == (DIR_INBOUND if from_server else DIR_OUTBOUND)
        assert epoch.replace(".", "") == f"{ts // 10**9}{ts % 10**9:09d}"     # ns kept exactly
        assert ifname == "lo"


def test_process_comment_names_unknown_ends():
    assert process_comment(1, "curl", 2, "nginx") == "pid=1 comm=curl -> pid=2 comm=nginx"
    assert process_comment(1, "curl", None, None) == "pid=1 comm=curl -> ?"
    assert process_comment(None, "x", 7, "") == "pid=? comm=x -> pid=7 comm=?"


def raw_ipv4_udp(payload: bytes) -> bytes:
    hdr = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 1, 0, 64, 17, 0,
                      bytes([127, 0, 0, 1]), bytes([127, 0, 0, 2]))
    s = sum(struct.unpack(">10H", hdr))
    s = (s & 0xFFFF) + (s >> 16)
    hdr = hdr[:10] + struct.pack(">H", ~((s & 0xFFFF) + (s >> 16)) & 0xFFFF) + hdr[12:]
    return hdr + struct.pack(">HHHH", 4000, 5000, 8 + len(payload), 0) + payload


def test_header_blocks_raw_interfaces_snaplen_and_drops(tmp_path):
    path = tmp_path / "meta.pcapng"
    t0 = 1_700_000_000_123_456_789
    with PcapngWriter(str(path)) as w:
        eth = w.add_interface("lo", LINKTYPE_ETHERNET, 262144, "loopback", start_ns=t0 - 10)
        raw = w.add_interface("wg0", LINKTYPE_RAW, 64, start_ns=t0 - 5)
        pkt = raw_ipv4_udp(b"x" * 100)
        w.add_packet(raw, t0, pkt, comment="pid=1 comm=a -> ?", drops=3)
        w.add_packet(raw, t0 + 1, pkt)
        w.set_stats(raw, received=12, dropped=7)
        w.set_stats(eth, dropped=0)
    rows = tshark_fields(path, ["frame.interface_name", "frame.cap_len", "frame.len", "udp.dstport",
                                "frame.drop_count", "frame.comment", "frame.packet_flags"])
    assert rows == [["wg0", "64", str(len(pkt)), "5000", "3", "pid=1 comm=a -> ?", ""],
                    ["wg0", "64", str(len(pkt)), "5000", "", "", ""]]
    info = subprocess.run(["capinfos", str(path)], capture_output=True, text=True, check=True).stdout
    assert "Capture application: tlstap " in info and "Capture oper-sys:    Linux" in info, info
    assert "Encapsulation = Raw IP (7 - rawip)" in info and "Capture length = 64" in info, info
    assert info.count("Time precision = nanoseconds (9)") == 2, info
    assert info.count("Number of stat entries = 1") == 2, info      # capinfos parsed both ISBs
    # tshark/capinfos 4.0 print no ISB counters (only the GUI's capture file properties do):
    # check the values structurally
    isbs = [b for b in blocks(path) if b[1] == 5]
    got = {}
    for _, _, body in isbs:
        if_id = struct.unpack_from("<I", body)[0]
        opts = dict(options(body[12:]))
        got[if_id] = {k: struct.unpack("<Q", v)[0] if k in (4, 5) else v for k, v in opts.items()}
    assert got[1][4] == 12 and got[1][5] == 7
    assert got[0][4] == 0 and got[0][5] == 0
    hi, lo = struct.unpack("<II", got[1][2])
    assert (hi << 32 | lo) == t0 - 5                                   # isb_starttime
    hi, lo = struct.unpack("<II", got[1][3])
    assert (hi << 32 | lo) >= t0 + 1                                   # isb_endtime


def test_file_is_private(tmp_path):
    path = tmp_path / "p.pcapng"
    path.write_bytes(b"old")
    path.chmod(0o644)
    PcapngWriter(str(path)).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert blocks(path)[0][1] == 0x0A0D0D0A


def test_duplicate_secrets_are_written_once(tmp_path):
    path = tmp_path / "dup.pcapng"
    lines = [f"CLIENT_HANDSHAKE_TRAFFIC_SECRET {i:064x} {'ab' * (32 + i)}" for i in range(4)]
    with PcapngWriter(str(path)) as w:
        w.add_interface("lo", LINKTYPE_ETHERNET)
        assert w.add_secrets(lines[:2]) == 2
        assert w.add_secrets(lines) == len(lines) - 2
        assert w.add_secrets(lines) == 0               # nothing new: no block at all
        assert w.add_secrets([lines[0] + "\n"]) == 0
    dsbs = [body for _, t, body in blocks(path) if t == 0x0A]
    assert len(dsbs) == 2
    texts = []
    for body in dsbs:
        stype, n = struct.unpack_from("<II", body)
        assert stype == 0x544C534B                    # "TLSK"
        data = body[8:8 + n]
        assert data.endswith(b"\n") and body[8 + n:8 + n + (-n & 3)] == bytes(-n & 3)
        texts += data.decode().splitlines()
    assert sorted(texts) == sorted(lines)
    p = subprocess.run(["capinfos", "-D", str(path)], capture_output=True, text=True, check=True)
    assert "Number of decryption secrets in file: 2" in p.stdout


# ---------------------------------------------------------------- durability

def test_file_cut_at_any_block_boundary_is_readable(exchange, tmp_path):
    out = write_exchange(tmp_path / "out.pcapng", exchange)
    raw = out.read_bytes()
    bl = blocks(out)
    ends = [off for off, _, _ in bl[1:]] + [len(raw)]
    for i, end in enumerate(ends):
        cut = tmp_path / f"cut{i}.pcapng"
        cut.write_bytes(raw[:end])
        p = tshark_run(cut, "-T", "fields", "-e", "frame.number")
        assert p.returncode == 0, (i, p.stderr)
        epbs = sum(1 for off, t, _ in bl if t == 6 and off < end)
        assert len(p.stdout.split()) == epbs, (i, p.stdout)
    # with every packet but no ISB (a kill before close) it still decrypts
    last_epb = max(i for i, (_, t, _) in enumerate(bl) if t == 6)
    cut = tmp_path / "noisb.pcapng"
    cut.write_bytes(raw[:ends[last_epb]])
    assert http_seen(cut) == ([URI], [BODY])
    # the control: a cut inside a block is what tshark complains about
    mid = tmp_path / "mid.pcapng"
    mid.write_bytes(raw[:bl[-2][0] + 10])
    assert tshark_run(mid).returncode != 0


CHILD = textwrap.dedent("""
    import signal, sys, time
    from tlstap.sinks.pcapng import PcapngWriter, LINKTYPE_ETHERNET
    stop = []
    if sys.argv[2] == "flag":       # what tlstap's CLI does with SIGTERM (and SIGINT)
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    frame = bytes(12) + b"\\x08\\x00" + bytes(20) + bytes(4000)
    with PcapngWriter(sys.argv[1]) as w:
        lo = w.add_interface("lo", LINKTYPE_ETHERNET)
        w.add_secrets(["CLIENT_RANDOM " + "00" * 32 + " " + "11" * 48])
        w.flush()
        print("ready", flush=True)
        i = 0
        while not stop:
            i += 1
            w.add_packet(lo, time.time_ns(), frame, comment=f"{i}")
            if i % 7 == 0:
                w.flush()
                time.sleep(0.0002)      # the signal may also land between writes
""")


@pytest.mark.parametrize("sig,how", [(signal.SIGINT, "default"), (signal.SIGTERM, "flag"),
                                     (signal.SIGKILL, "default")])
def test_killed_writer_leaves_a_valid_file(sig, how, tmp_path):
    """A writer stopped mid-stream. SIGINT (KeyboardInterrupt, possibly raised right after a
    writev) and a SIGTERM handler that sets a flag (the CLI's way) both end in close(): the
    ISBs are written, no block is half or twice in the file. SIGKILL can cut a write in the
    middle (the kernel stops a regular-file write at a page for a fatal signal): every block
    before that write is intact and tshark shows all of them."""
    path = tmp_path / "killed.pcapng"
    env = dict(os.environ, PYTHONPATH=str(SRC))
    for attempt in range(3):
        p = subprocess.Popen([sys.executable, "-c", CHILD, str(path), how], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, env=env)
        assert p.stdout.readline().strip() == b"ready"
        # mid-stream: once the file holds packets, a little further on each attempt
        wait_for(lambda: path.stat().st_size > (1 + attempt) * (1 << 20), 20, "the writer's packets in the file")
        p.send_signal(sig)
        p.wait(10)
        p.stdout.close()
        bl, tail = whole_blocks(path)
        epbs = sum(1 for b in bl if b[1] == 6)
        assert epbs > 10
        r = tshark_run(path, "-T", "fields", "-e", "frame.comment")
        comments = r.stdout.split()
        if sig == signal.SIGKILL:
            assert comments[:epbs] == [str(i) for i in range(1, epbs + 1)]
            assert r.returncode == 0 or (tail and "cut short" in r.stderr), r.stderr
        else:
            assert tail == 0 and bl[-1][1] == 5           # ended by close(): the ISB is last
            assert r.returncode == 0, r.stderr
            assert comments == [str(i) for i in range(1, epbs + 1)]     # none lost, none twice


# ---------------------------------------------------------------- the reordering queue

def test_sink_orders_by_timestamp_and_holds_for_the_lag(tmp_path):
    path = tmp_path / "order.pcapng"
    sink = PcapngSink(PcapngWriter(str(path)), lag_ns=1000)
    lo = sink.writer.add_interface("lo", LINKTYPE_RAW)
    pkt = raw_ipv4_udp(b"abc")
    for ts in (5000, 3000, 4000, 3000):
        sink.packet(lo, ts, pkt, comment=str(ts))
    assert sink.flush(now_ns=3999) == 0
    assert sink.flush(now_ns=4000) == 2          # 3000, 3000: not newer than now - lag
    assert sink.pending == 2
    with pytest.raises(ValueError):
        sink.flush()
    assert sink.flush(now_ns=4500) == 0
    sink.close(stats={lo: (10, 1)})
    assert sink.pending == 0
    rows = tshark_fields(path, ["frame.comment", "frame.time_epoch"])
    assert [r[0] for r in rows] == ["3000", "3000", "4000", "5000"]


def held_sink(path):
    """A sink with a 1000 ns lag, its raw interface, and enc(ts, hold): queue one packet whose
    comment is its timestamp."""
    sink = PcapngSink(PcapngWriter(str(path)), lag_ns=1000)
    w = sink.writer
    lo = w.add_interface("lo", LINKTYPE_RAW)
    pkt = raw_ipv4_udp(b"abc")

    def enc(ts, hold):
        b = bytearray()
        w.put_epb(b, lo, ts, pkt, len(pkt), w.epb_trailer(len(pkt), comment=str(ts)))
        sink.encoded(lo, b, 1, ts, ts, hold=hold)
    return sink, enc


def test_sink_lets_packets_that_need_no_wait_out_unless_behind_one_that_waits(tmp_path):
    path = tmp_path / "hold.pcapng"
    sink, enc = held_sink(path)
    w = sink.writer
    enc(100, False)
    assert sink.flush(now_ns=100) == 1           # nothing held before it: out at once
    enc(200, True)
    enc(300, False)
    assert sink.flush(now_ns=300) == 0           # behind one that waits
    assert sink.flush(now_ns=1200) == 2          # 200's lag is up, 300 follows
    enc(400, False)
    enc(500, True)
    enc(600, False)
    assert sink.release() == 2 and w.packets == 4   # 400 written; 500 waits, 600 behind it
    sink.close()
    assert [r[0] for r in tshark_fields(path, ["frame.comment"])] == ["100", "200", "300", "400", "500", "600"]


def test_sink_gate_holds_until_opened_or_the_lag(tmp_path):
    """A Gate (pcapng_output: packets of an open TLS 1.3 handshake) holds what waits on it
    until open(), which is sooner than the lag; the lag still bounds it; items behind it wait."""
    path = tmp_path / "gate.pcapng"
    sink, enc = held_sink(path)
    w = sink.writer
    gate = Gate()
    enc(100, gate)
    enc(200, False)
    assert sink.release() == 2 and sink.flush(now_ns=300) == 0 and w.packets == 0   # shut: all wait
    gate.open()
    assert sink.release() == 0 and w.packets == 2           # open: out before the lag is up
    late = Gate()
    enc(300, late)
    enc(400, True)
    assert sink.flush(now_ns=1300) == 1 and w.packets == 3  # never opened: the lag lets it go
    sink.close()
    assert [r[0] for r in tshark_fields(path, ["frame.comment"])] == ["100", "200", "300", "400"]


def test_sink_bounds_its_memory(tmp_path):
    # held as encoded EPBs: 28 bytes of header, 300 of packet, 8 of option end and length
    sink = PcapngSink(PcapngWriter(str(tmp_path / "b.pcapng")), lag_ns=10**12, max_queued_bytes=3 * 336)
    lo = sink.writer.add_interface("lo", LINKTYPE_RAW)
    for ts in range(10):
        sink.packet(lo, ts, bytes(300))
    assert sink.forced == 7 and sink.pending == 3
    sink.close()
    assert sink.writer.packets == 10


def test_queued_views_are_copied(tmp_path):
    # ring buffer records are views into memory the kernel reuses after the callback
    path = tmp_path / "v.pcapng"
    buf = bytearray(raw_ipv4_udp(b"before"))
    with PcapngSink(PcapngWriter(str(path))) as sink:
        lo = sink.writer.add_interface("lo", LINKTYPE_RAW)
        sink.packet(lo, 1, memoryview(buf))
        sink.writer.add_packet(lo, 2, memoryview(buf))
        buf[-6:] = b"after!"
    assert [r[0] for r in tshark_fields(path, ["udp.payload"])] == [b"before".hex()] * 2


# ---------------------------------------------------------------- 64 KiB packets
# (how fast: `tlstap bench`; a unit test on a shared machine times the neighbours)

def test_64k_packets_are_written_whole_in_order_with_their_options(tmp_path):
    """GSO-sized loopback packets through the sink's flushes: every EPB holds its packet's
    bytes, lengths, timestamp, direction and comment, read back from the file's blocks."""
    pkts = [os.urandom(65536) for _ in range(150)]
    path = tmp_path / "big.pcapng"
    sink = PcapngSink(PcapngWriter(str(path)))
    lo = sink.writer.add_interface("lo", LINKTYPE_ETHERNET, 0)
    comment = process_comment(1234, "curl", 567, "nginx")
    for i, pkt in enumerate(pkts):
        sink.packet(lo, 10**18 + i, pkt, direction=DIR_OUTBOUND, comment=comment)
        if i % 16 == 0:
            sink.flush(now_ns=10**18 + i)
    sink.close()
    epbs = [body for _, t, body in blocks(path) if t == 6]
    assert len(epbs) == len(pkts)
    for i, (body, pkt) in enumerate(zip(epbs, pkts)):
        ifid, ts_hi, ts_lo, cap, orig = struct.unpack_from("<IIIII", body)
        assert (ifid, (ts_hi << 32 | ts_lo), cap, orig) == (0, 10**18 + i, len(pkt), len(pkt)), i
        assert body[20:20 + cap] == pkt, i
        opts = dict(options(body[20 + cap + (-cap & 3):]))
        assert opts[1] == comment.encode() and int.from_bytes(opts[2], "little") & 3 == 2, (i, opts)
