"""`tlstap tls -m pcapng -i IFACE` only observes the interface and does not outlive tlstap.

- A drop filter of the user's own (drop_port.bpf.c, a cls_bpf filter on the clsact qdisc)
  drops before, during and after a capture, which still captures the traffic let through.
- A capture killed with SIGKILL leaves no program, map, link, filter or qdisc behind, and
  the next capture works.
- Two captures of the same interface at once each get every packet.

Traffic goes over lo, or over a veth pair whose other end is in a network namespace of the
test's own ("tcx..."). The oracles are the bytes the peers sent (an echo server and its
clients, or Python ssl transcripts), compared with the TCP payload or the decrypted TLS in
each pcapng file.
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.conftest import needs
from tests.peers import PySSLServer, have_tshark, tshark_tls_streams, wait_for
from tlstap.sources.base import CaptureConfig
from tlstap.sources.packets import PacketCapture

from .conftest import client
from .tap import Tap, tlstap_exe
from .test_packets import read_pcapng

HERE = os.path.dirname(os.path.abspath(__file__))
#: a connect() to the blocked port gives up after this: its SYN never gets an answer
BLOCKED_AFTER = 1.5


# ---------------------------------------------------------------- peers

class EchoServer:
    """TCP echo on (host, ephemeral port), in threads of the test; what each connection
    received and sent, by the client's port."""

    def __init__(self, host: str):
        self.sock = socket.create_server((host, 0))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.received: dict[int, bytearray] = collections.defaultdict(bytearray)
        self.sent: dict[int, bytearray] = collections.defaultdict(bytearray)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, peer = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c, peer[1]), daemon=True).start()

    def _serve(self, c: socket.socket, port: int):
        with c:
            c.settimeout(30)
            while data := c.recv(65536):
                self.received[port] += data
                self.sent[port] += data     # before: the client may be done as soon as it is sent
                c.sendall(data)

    def close(self):
        self.sock.close()


CLIENT = r"""
import socket, sys
host, port, n, blocked_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
data = sys.stdin.buffer.read(n)
try:
    c = socket.create_connection((host, port), timeout=blocked_after)
except (TimeoutError, socket.timeout):
    print("blocked", flush=True)
    sys.exit(0)
print(c.getsockname()[1], flush=True)
c.settimeout(30)
c.sendall(data)
got = b""
while len(got) < n and (chunk := c.recv(65536)):
    got += chunk
c.close()
sys.exit(0 if got == data else 3)
"""


def exchange(srv: EchoServer, netns: str | None = None, size: int = 50_000) -> int | None:
    """A client (in netns, if given) sends `size` random bytes to srv and reads them back:
    its local port, or None when its SYN went unanswered (dropped)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    r = subprocess.run([*prefix, sys.executable, "-c", CLIENT, srv.host, str(srv.port), str(size),
                        str(BLOCKED_AFTER)], input=os.urandom(size), capture_output=True, timeout=60)
    out = r.stdout.decode().strip()
    assert r.returncode == 0, (out, r.stderr.decode())
    return None if out == "blocked" else int(out)


# ---------------------------------------------------------------- reading the pcapng

def _ipv4_tcp(frame: bytes):
    """(sport, dport, seq, payload) of an Ethernet/IPv4/TCP frame, else None."""
    if frame[12:14] != b"\x08\x00" or frame[23] != 6:
        return None
    off = 14 + (frame[14] & 0xF) * 4
    end = 14 + struct.unpack_from(">H", frame, 16)[0]
    sport, dport, seq = struct.unpack_from(">HHI", frame, off)
    return sport, dport, seq, frame[off + (frame[off + 12] >> 4) * 4:end]


def tcp_payload(frames: list[bytes], sport: int, dport: int) -> bytes:
    """The TCP payload from sport to dport in frames, by sequence number (each byte once;
    a gap fails)."""
    segs = [t[2:] for f in frames if (t := _ipv4_tcp(f)) and t[:2] == (sport, dport) and t[3]]
    if not segs:
        return b""
    first = min(s for s, _ in segs)     # no wrap within 2 GiB of a random ISN, for these sizes
    out = bytearray()
    for s, p in sorted(segs):
        at = (s - first) % (1 << 32)
        assert at <= len(out), f"a gap of {at - len(out)} bytes before seq {s}"
        out[at:at + len(p)] = p
    return bytes(out)


def assert_captured(frames: list[bytes], srv: EchoServer, port: int) -> None:
    """frames hold every byte the client sent to srv from `port` and srv sent back."""
    assert srv.received[port] and srv.sent[port]
    assert tcp_payload(frames, port, srv.port) == srv.received[port]
    assert tcp_payload(frames, srv.port, port) == srv.sent[port]


# ---------------------------------------------------------------- the interface and the kernel

@contextlib.contextmanager
def netns_veth():
    """(namespace, host-side veth, its address): a veth pair with one end in a namespace
    of ours, each end with an address of a /30."""
    tag = uuid.uuid4().hex[:8]
    ns, host, peer = f"tcx{tag}", f"tcx{tag}h", f"tcx{tag}n"
    net, base = f"10.{random.randrange(64, 128)}.{random.randrange(256)}", random.randrange(0, 256, 4)
    a, b = f"{net}.{base + 1}", f"{net}.{base + 2}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["ip", "link", "add", host, "type", "veth", "peer", "name", peer, "netns", ns],
                    ["ip", "addr", "add", f"{a}/30", "dev", host],
                    ["ip", "link", "set", host, "up"],
                    ["ip", "-n", ns, "addr", "add", f"{b}/30", "dev", peer],
                    ["ip", "-n", ns, "link", "set", peer, "up"],
                    ["ip", "-n", ns, "link", "set", "lo", "up"]):
            subprocess.run(cmd, check=True)
        yield ns, host, a
    finally:
        subprocess.run(["ip", "link", "del", host], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False)


def add_drop_filter(tmp_path, ifname: str, port: int) -> None:
    """The user's own: drop_port.bpf.c built for `port`, a cls_bpf filter on ifname's
    ingress (the clsact qdisc goes with the interface)."""
    obj = str(tmp_path / "drop_port.bpf.o")
    subprocess.run(["clang", "-O2", "-g", "-Wall", "-Werror", "-target", "bpf",
                    f"-I/usr/include/{os.uname().machine}-linux-gnu", f"-DDROP_PORT={port}",
                    "-c", os.path.join(HERE, "drop_port.bpf.c"), "-o", obj], check=True)
    subprocess.run(["tc", "qdisc", "add", "dev", ifname, "clsact"], check=True)
    subprocess.run(["tc", "filter", "add", "dev", ifname, "ingress", "bpf", "da", "obj", obj,
                    "sec", "classifier"], check=True)


def tc_show(*args: str) -> str:
    return subprocess.run(["tc", *args], capture_output=True, text=True, check=True).stdout


def bpftool(*args: str):
    """bpftool -j ARGS, parsed; again when an object went away while it listed them (it
    then fails), as those of other tests on this machine may."""
    for _ in range(20):
        r = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True)
        if r.returncode == 0:
            return json.loads(r.stdout or "[]")
    raise AssertionError(f"bpftool {' '.join(args)}: {r.stdout} {r.stderr}")


def remove_left_filters(ifname: str, prog_ids: set[int], had_clsact: bool) -> None:
    """Teardown after a failure: the filters running prog_ids, then the clsact qdisc if it
    was not there before and is empty now."""
    removed = 0
    for hook in ("ingress", "egress"):
        for pref, handle, pid in re.findall(r"pref (\d+) bpf .*handle (0x[0-9a-f]+) .* id (\d+)",
                                            tc_show("filter", "show", "dev", ifname, hook)):
            if int(pid) in prog_ids:
                subprocess.run(["tc", "filter", "del", "dev", ifname, hook, "pref", pref, "handle", handle, "bpf"])
                removed += 1
    if removed and not had_clsact and not (tc_show("filter", "show", "dev", ifname, "ingress") +
                                           tc_show("filter", "show", "dev", ifname, "egress")):
        subprocess.run(["tc", "qdisc", "del", "dev", ifname, "clsact"], capture_output=True)


def held_bpf_ids(pid: int) -> dict[str, set[int]]:
    """The ids of the BPF programs, maps and links process pid holds (/proc/PID/fdinfo);
    "tcx": the tcx links among them, as (ifindex, attach_type)."""
    kinds = {"anon_inode:bpf-prog": ("prog", "prog_id"), "anon_inode:bpf-map": ("map", "map_id"),
             "anon_inode:bpf_link": ("link", "link_id")}
    ids: dict[str, set] = {"prog": set(), "map": set(), "link": set(), "tcx": set()}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            kind = kinds.get(os.readlink(f"/proc/{pid}/fd/{fd}"))
            info = dict(ln.split(":", 1) for ln in open(f"/proc/{pid}/fdinfo/{fd}").read().splitlines())
        except OSError:
            continue
        if kind:
            ids[kind[0]].add(int(info[kind[1]]))
        if info.get("link_type", "").strip() == "tcx":       # attach_type: "47 (egress)"
            ids["tcx"].add((int(info["ifindex"]), re.search(r"\((\w+)\)", info["attach_type"])[1]))
    return ids


def live_bpf_ids() -> dict[str, set[int]]:
    return {k: {o["id"] for o in bpftool(k, "show")} for k in ("prog", "map", "link")}


#: tlstap as on a kernel without tcx: the only way to run the CLI's fallback on this one
AS_IF_NO_TCX = ("import sys, tlstap.sources.packets; tlstap.sources.packets.kernel_has_tcx = lambda: False; "
                "from tlstap.cli import main; sys.exit(main(sys.argv[1:]))")


class IfTap(Tap):
    """`tlstap tls -m pcapng -i IFNAME -w FILE ARGS...` in the background; no_tcx: as if
    the kernel had no tcx (the clsact fallback)."""

    def __init__(self, tmp_path, ifname: str, *args: str, no_tcx: bool = False):
        out = str(tmp_path / f"cap-{time.monotonic_ns()}.pcapng")
        exe = [sys.executable, "-c", AS_IF_NO_TCX] if no_tcx else [tlstap_exe()]
        self._setup(out, [*exe, "tls", "-m", "pcapng", "-i", ifname, "-w", out, *args])


# ---------------------------------------------------------------- the user's filter still decides

@pytest.mark.parametrize("no_tcx", [False, True], ids=["tcx", "fallback"])
def test_a_drop_filter_of_the_users_drops_before_during_and_after_a_capture(tmp_path, no_tcx):
    """The user's filter on the veth's ingress drops TCP to one port; tlstap, attached by
    tcx or by the fallback, captures everything and changes none of that."""
    with netns_veth() as (ns, veth, addr):
        allowed, blocked = EchoServer(addr), EchoServer(addr)
        try:
            add_drop_filter(tmp_path, veth, blocked.port)
            assert exchange(blocked, ns) is None, "the drop filter does not drop"
            assert exchange(allowed, ns)
            with IfTap(tmp_path, veth, "tcp", no_tcx=no_tcx) as tap:
                assert exchange(blocked, ns) is None, f"dropped no more during the capture\n{tap.stderr}"
                port = exchange(allowed, ns)
                assert port
                tap.stop()
            assert "lost 0 packets" in tap.stderr, tap.stderr
            # the fallback says so, before it is ready; tcx goes without saying
            said = [ln for ln in tap.stderr_lines if "no tcx in this kernel" in ln and "clsact" in ln]
            assert len(said) == no_tcx and (not said or tap.stderr.index(said[0]) < tap.stderr.index("ready in"))
            assert exchange(blocked, ns) is None
            assert exchange(allowed, ns)
            # the capture had the traffic let through, every byte of it both ways
            assert_captured(read_pcapng(tap.out), allowed, port)
            assert not blocked.received
            out = tc_show("filter", "show", "dev", veth, "ingress") + tc_show("filter", "show", "dev", veth, "egress")
            assert len(re.findall(r"^filter .* bpf .* drop_port", out, re.M)) == 1, out   # the user's
            assert not re.search(r"\btc_(ingress|egress)", out), out                      # alone
        finally:
            allowed.close()
            blocked.close()


@pytest.mark.parametrize("attach", ["tcx", "clsact"])
def test_the_users_drop_filter_decides_with_either_attach_method(tmp_path, attach):
    """The library with each attach method (clsact: kernels without tcx): the programs
    return no verdict, so the user's filter after them still drops."""
    with netns_veth() as (ns, veth, addr):
        allowed, blocked = EchoServer(addr), EchoServer(addr)
        try:
            add_drop_filter(tmp_path, veth, blocked.port)
            packets = []
            cap = PacketCapture(CaptureConfig(), veth, f"tcp port {allowed.port} or tcp port {blocked.port}",
                                packets.append, attach=attach)
            with cap:
                cap.start()
                assert cap.attach == attach
                assert exchange(blocked, ns) is None, f"{attach}: the user's filter no longer drops"
                port = exchange(allowed, ns)
                # the echo came back, so every packet of it went through the programs: in the ring
                cap.detach_probes()
                cap.drain()
            assert not blocked.received
            frames = [p.data for p in packets]
            assert_captured(frames, allowed, port)
            # the blocked SYNs reached the capture first (ingress), then the user's filter dropped them
            assert any(t[1] == blocked.port for f in frames if (t := _ipv4_tcp(f)))
        finally:
            allowed.close()
            blocked.close()


# ---------------------------------------------------------------- nothing outlives tlstap

@pytest.mark.parametrize("where", ["lo", "veth"])
def test_sigkill_leaves_nothing_attached_and_the_next_capture_works(tmp_path, where):
    """What the killed tlstap held, by id (/proc/PID/fdinfo), is gone from the kernel, and
    nothing of it is on the interface."""
    with contextlib.ExitStack() as stack:
        if where == "lo":
            ifname, addr, ns = "lo", "127.0.0.1", None
        else:
            ns, ifname, addr = stack.enter_context(netns_veth())
        ifindex = int(open(f"/sys/class/net/{ifname}/ifindex").read())
        srv = EchoServer(addr)
        stack.callback(srv.close)
        filt = ("tcp", "port", str(srv.port))

        tap = IfTap(tmp_path, ifname, *filt)
        had_clsact = "clsact" in tc_show("qdisc", "show", "dev", ifname)
        with tap:
            held = held_bpf_ids(tap.proc.pid)
            tap.kill()
        stack.callback(remove_left_filters, ifname, held["prog"], had_clsact)   # if this test fails
        assert held["prog"] and held["map"] and held["link"]
        # the kernel releases what the process held; programs and maps go after an RCU grace period
        try:
            wait_for(lambda: not any(held[k] & live for k, live in live_bpf_ids().items()), 10,
                     "the killed capture's programs, maps and links to go")
        except TimeoutError:
            left = {k: held[k] & live for k, live in live_bpf_ids().items()}
            raise AssertionError(f"left behind after SIGKILL: {left}; egress filters of {ifname}:\n"
                                 f"{tc_show('filter', 'show', 'dev', ifname, 'egress')}") from None
        ours = re.compile(r"\bid (\d+)\b")
        for hook in ("ingress", "egress"):
            out = tc_show("filter", "show", "dev", ifname, hook)
            assert not {int(i) for i in ours.findall(out)} & held["prog"], out
        (net,) = bpftool("net", "show", "dev", ifname)
        assert not {p.get("id") for p in net.get("tc", [])} & held["prog"], net
        if where == "veth":      # ours alone: nothing at all is left on it
            assert net.get("tc") == [] and "clsact" not in tc_show("qdisc", "show", "dev", ifname)
            assert tc_show("filter", "show", "dev", ifname, "ingress") == ""
            assert tc_show("filter", "show", "dev", ifname, "egress") == ""
        # it had attached through tcx links, which the kernel detached with it
        hooks = {"egress"} if where == "lo" else {"ingress", "egress"}
        assert held["tcx"] == {(ifindex, h) for h in hooks}, held["tcx"]

        with IfTap(tmp_path, ifname, *filt) as tap:
            port = exchange(srv, ns)
            tap.stop()
        assert_captured(read_pcapng(tap.out), srv, port)


# ---------------------------------------------------------------- two captures at once

@needs(have_tshark(), "tshark is not installed")
def test_two_captures_at_once_each_get_every_packet(tmp_path, cert):
    payloads = [os.urandom(30_000), b"second request " * 100]
    with PySSLServer(*cert, host="127.0.0.1") as srv:
        filt = ("tcp", "port", str(srv.port))
        with IfTap(tmp_path, "lo", *filt) as first, IfTap(tmp_path, "lo", *filt) as second:
            (t,) = client(srv, payloads).wait()
            srv.stop()
            second.stop()
            first.stop()
    frames = []
    for tap in (first, second):
        (s,) = tshark_tls_streams(tap.out, tls_ports=[srv.port])
        assert s.sent_by(t.local) == t.sent and s.received_by(t.local) == t.received, tap.stderr
        frames.append(collections.Counter(f for f in read_pcapng(tap.out)
                                          if (p := _ipv4_tcp(f)) and srv.port in p[:2]))
        assert "lost 0 packets" in tap.stderr, tap.stderr
    assert frames[0] == frames[1] and sum(frames[0].values()) >= 10
