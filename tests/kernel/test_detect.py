"""`tlstap detect` against real capturers: tlstap in each mode, bpftrace, a tc filter, dumpcap,
and processes started with SSLKEYLOGFILE or LD_PRELOAD. Each capturer is started for real
against a real libssl process (openssl s_server); detect must name the library, the function
and the capturer's pid, and stop reporting it once the capturer has exited.

The uprobes detect reports for a pid are also compared with `bpftool perf` (an independent
enumeration: BPF_TASK_FD_QUERY per fd, in C).

Other tests may run capturers at the same time: every check is about the pids and program ids
this test started.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import subprocess
import time

import pytest

from tests.conftest import need_tool
from tests.peers import OpenSSLServer, wait_for

from .tap import Tap, run_tlstap, tlstap_exe

HERE = os.path.dirname(__file__)
VETH = ("detect0", "detect1")


def detect() -> list[dict]:
    r = run_tlstap("detect", "--json")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout)


def owned_by(findings: list[dict], pid: int) -> list[dict]:
    return [f for f in findings if any(o["pid"] == pid for o in f["owner"])]


def same_file(a: str, b: str) -> bool:
    sa, sb = os.stat(a), os.stat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def mapped_libssl(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        paths = {ln.split()[-1] for ln in f if "libssl.so" in ln}
    assert len(paths) == 1, paths
    return paths.pop()


def bpftool_uprobes(pid: int) -> set[tuple]:
    out = subprocess.run(["bpftool", "-j", "perf", "list"], capture_output=True, text=True, check=True).stdout
    return {(e["prog_id"], os.path.realpath(e["filename"]), e["offset"], e["fd_type"])
            for e in json.loads(out or "[]") if e["pid"] == pid and e["fd_type"] in ("uprobe", "uretprobe")}


def detect_uprobes(findings: list[dict], pid: int) -> set[tuple]:
    return {(f["prog_id"], os.path.realpath(f["path"]), f["offset"], f["probe"])
            for f in owned_by(findings, pid) if f["kind"] in ("uprobe", "uprobe_other")}


def assert_gone(pid: int, prog_ids: set[int]) -> None:
    after = detect()
    assert not owned_by(after, pid), owned_by(after, pid)
    assert not {f.get("prog_id") for f in after} & prog_ids


class Capturer(Tap):
    """`tlstap ARGS...` in the background, its status lines read like Tap's."""

    def __init__(self, *args: str):
        self._setup("", [tlstap_exe(), *args])


#: mode -> (tlstap arguments after the output file's flag, kinds of finding it must cause)
MODES = {
    "text-probe": (["tls", "--source", "probe", "--format", "text", "-o"], {"uprobe"}),
    "text-wire": (["tls", "--source", "wire", "--format", "text", "-o"], {"uprobe", "cgroup_skb"}),
    "keylog": (["tls", "-m", "keylog", "-k"], {"uprobe"}),
    "pcapng": (["tls", "-i", "lo", "-w"], {"uprobe", "tc"}),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_detects_tlstap(tmp_path, cert, mode):
    args, kinds = MODES[mode]
    with OpenSSLServer(*cert) as srv:
        libssl = mapped_libssl(srv.pid)
        with Capturer(*args, str(tmp_path / "out"), "--pid", str(srv.pid)) as tap:
            pid = tap.proc.pid
            found = detect()
            mine = owned_by(found, pid)
            assert {f["kind"] for f in mine} == kinds, mine
            probes = [f for f in mine if f["kind"] == "uprobe"]
            assert probes and all(f["library"] == "OpenSSL libssl" and same_file(f["path"], libssl) for f in probes)
            assert detect_uprobes(found, pid) == bpftool_uprobes(pid)
            since = [f["since"] for f in mine]
            assert all(s and s.endswith("Z") for s in since), since
            if mode == "text-probe":
                # tlstap's probes sit in unexported functions here; detect names them by their callers
                called = {(f["probe"], c) for f in probes for c in [f["function"].split("+")[0], *f["called_by"]]}
                assert {("uprobe", "SSL_read_ex"), ("uretprobe", "SSL_read_ex"),
                        ("uprobe", "SSL_write_ex"), ("uretprobe", "SSL_write_ex")} <= called, probes
            if mode == "text-wire":
                cg = {f["direction"] for f in mine if f["kind"] == "cgroup_skb"}
                assert cg == {"ingress", "egress"}
            if mode == "pcapng":
                assert {f["dev"] for f in mine if f["kind"] == "tc"} == {"lo"}
            progs = {f["prog_id"] for f in mine}
    assert_gone(pid, progs)


@pytest.fixture(scope="module")
def go_stripped(tmp_path_factory):
    """tests/peers/go/tlspeer.go built stripped (-s -w): detect must name functions from the Go
    function table alone. The user's Go build cache is kept: a warm build takes seconds."""
    from tests.peers.gotls import SOURCE, VARIANTS
    go = need_tool("go")
    out = str(tmp_path_factory.mktemp("detect-go") / "tlspeer-stripped")
    env = {**os.environ, "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GOFLAGS": "", "GO111MODULE": "auto"}
    subprocess.run([go, "build", *VARIANTS["stripped"], "-o", out, str(SOURCE)], env=env, check=True,
                   capture_output=True, timeout=600, cwd=os.path.dirname(out))
    return out


def test_detects_tlstap_gotls_on_a_stripped_go_binary(tmp_path, cert, go_stripped):
    from tests.peers.gotls import GoServer
    with GoServer(go_stripped, *cert) as srv:
        with Capturer("gotls", "--source", "probe", "--format", "text", "-o", str(tmp_path / "out"),
                      "--elfpath", go_stripped, "--pid", str(srv.pid)) as tap:
            pid = tap.proc.pid
            found = detect()
            mine = owned_by(found, pid)
            assert mine and all(f["kind"] == "uprobe" and f["library"] == "Go binary"
                                and same_file(f["path"], go_stripped) for f in mine), mine
            assert {f["function"].split("+")[0] for f in mine} == {"crypto/tls.(*Conn).Read",
                                                                   "crypto/tls.(*Conn).Write"}, mine
            assert detect_uprobes(found, pid) == bpftool_uprobes(pid)
            # the text report gives a function's return sites one line
            text = run_tlstap("detect").stdout
            assert any("at crypto/tls.(*Conn).Read (" in ln and "sites: +0x" in ln and f"pid {pid} " in ln
                       for ln in text.splitlines()), text
            progs = {f["prog_id"] for f in mine}
    assert_gone(pid, progs)


#: bpftrace scripts: one uprobe, and BCC sslsniff's probe set (entry and return of SSL_read and
#: SSL_write; BCC itself cannot run here, see the README), attached the way BCC attaches
BPFTRACE = {
    "SSL_write": ("uprobe:{lib}:SSL_write {{ @n = count(); }}", {("uprobe", "SSL_write")}),
    "sslsniff-probes": ("uprobe:{lib}:SSL_read, uprobe:{lib}:SSL_write {{ @buf[tid] = arg1; }} "
                        "uretprobe:{lib}:SSL_read, uretprobe:{lib}:SSL_write {{ delete(@buf[tid]); }}",
                        {(p, f) for p in ("uprobe", "uretprobe") for f in ("SSL_read", "SSL_write")}),
}


@pytest.mark.parametrize("which", sorted(BPFTRACE))
def test_detects_bpftrace(tmp_path, cert, which):
    need_tool("bpftrace")
    probes, want = BPFTRACE[which]
    with OpenSSLServer(*cert) as srv:
        libssl = mapped_libssl(srv.pid)
        script = 'BEGIN { printf("ready\\n"); } ' + probes.format(lib=libssl)
        bt = subprocess.Popen(["bpftrace", "-B", "line", "-e", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        try:
            # BEGIN runs once every probe is attached: its line is the sync point (after "Attaching N probes...")
            lines = []
            while len(lines) < 3 and (not lines or lines[-1].strip() != "ready") and bt.poll() is None:
                lines.append(bt.stdout.readline())
            assert lines and lines[-1].strip() == "ready", (lines, bt.stderr.read() if bt.poll() is not None else "")
            found = detect()
            mine = owned_by(found, bt.pid)
            assert {(f["probe"], f["function"]) for f in mine} == want and len(mine) == len(want), mine
            assert all(f["kind"] == "uprobe" and f["library"] == "OpenSSL libssl" and same_file(f["path"], libssl)
                       for f in mine), mine
            # bpftrace 0.17 attaches as BCC does: a perf event with a program set on it, no link
            assert all("perf_event_fd" in f and "link_id" not in f for f in mine), mine
            assert detect_uprobes(found, bt.pid) == bpftool_uprobes(bt.pid)
            progs = {f["prog_id"] for f in mine}
        finally:
            bt.terminate()
            bt.wait(10)
    assert_gone(bt.pid, progs)


def uprobe_multi_link(prog_fd: int, path: str, offsets: list[int], cookies: list[int], retprobe: bool,
                      pid: int) -> int:
    """BPF_LINK_CREATE of a BPF_TRACE_UPROBE_MULTI link (kernel >= 6.6; what bpftrace >= 0.20 and
    cilium/ebpf use; Debian's libbpf 1.1 cannot make one): the bpf_attr link_create layout of
    include/uapi/linux/bpf.h, through the raw syscall."""
    n = len(offsets)
    c_path, c_offs, c_cookies = ctypes.create_string_buffer(path.encode()), (ctypes.c_uint64 * n)(*offsets), \
        (ctypes.c_uint64 * n)(*cookies)
    attr = struct.pack("<IIIIQQQQIII", prog_fd, 0, BPF_TRACE_UPROBE_MULTI, 0, ctypes.addressof(c_path),
                       ctypes.addressof(c_offs), 0, ctypes.addressof(c_cookies), n, int(retprobe), pid)
    buf = ctypes.create_string_buffer(attr, 64)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(SYS_BPF, BPF_LINK_CREATE, buf, 64)
    if fd < 0:
        pytest.fail(f"BPF_LINK_CREATE uprobe_multi: {os.strerror(ctypes.get_errno())}")
    return fd


SYS_BPF, BPF_LINK_CREATE, BPF_TRACE_UPROBE_MULTI = 321, 28, 48


def test_detects_uprobe_multi_link(cert):
    from tlstap.libbpf._lib import lib
    from tlstap.libbpf.object import BpfObject
    from tlstap.probes.elf import ElfImage
    if os.uname().machine != "x86_64":
        pytest.skip("the syscall number is x86-64's")
    lib.bpf_program__set_expected_attach_type.argtypes = [ctypes.c_void_p, ctypes.c_int]
    with OpenSSLServer(*cert) as srv:
        libssl = mapped_libssl(srv.pid)
        with ElfImage.open(libssl) as img:
            offs = [img.vaddr_to_offset(img.function(n).vaddr) for n in ("SSL_read", "SSL_write")]
        with BpfObject.open(os.path.join(os.path.dirname(__import__("tlstap").__file__), "bpf", "noop.bpf.o")) as obj:
            prog = obj.program("noop")
            lib.bpf_program__set_expected_attach_type(prog._ptr, BPF_TRACE_UPROBE_MULTI)
            obj.load()
            fd = uprobe_multi_link(prog.fd, libssl, offs, [7, 8], retprobe=True, pid=srv.pid)
            pin = f"/sys/fs/bpf/tlstap-detect-{os.getpid()}"
            try:
                mine = owned_by(detect(), os.getpid())
                assert {(f["kind"], f["probe"], f["function"], f["cookie"], f["only_pid"]) for f in mine} == {
                    ("uprobe", "uretprobe", "SSL_read", 7, srv.pid),
                    ("uprobe", "uretprobe", "SSL_write", 8, srv.pid)}, mine
                progs = {f["prog_id"] for f in mine}
                links = {f["link_id"] for f in mine}
                # pinned, the link outlives its fd: no process holds it, the pin is named
                lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
                assert lib.bpf_obj_pin(fd, pin.encode()) == 0
                os.close(fd)
                fd = None
                obj.close()
                pinned = [f for f in detect() if f.get("link_id") in links]
                assert [(f["function"], f["owner"], f["pinned"]) for f in sorted(pinned, key=lambda f: f["offset"])] \
                    == [("SSL_read", [], [pin]), ("SSL_write", [], [pin])], pinned
                text = run_tlstap("detect").stdout
                assert f"pinned at {pin}" in text, text
            finally:
                if fd is not None:
                    os.close(fd)
                if os.path.exists(pin):
                    os.unlink(pin)
    assert_gone(os.getpid(), progs)


@pytest.fixture
def veth():
    subprocess.run(["ip", "link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1]], check=True)
    try:
        yield VETH[0]
    finally:
        subprocess.run(["ip", "link", "del", VETH[0]], check=False, capture_output=True)


def test_detects_tc_filter_left_by_tc(tmp_path, veth):
    """A classic cls_bpf filter added with `tc`: no link, and no process holds it once tc exits."""
    obj = str(tmp_path / "drop_port.bpf.o")
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{os.uname().machine}-linux-gnu",
                    "-DDROP_PORT=9", "-c", os.path.join(HERE, "drop_port.bpf.c"), "-o", obj], check=True)
    subprocess.run(["tc", "qdisc", "add", "dev", veth, "clsact"], check=True)
    subprocess.run(["tc", "filter", "add", "dev", veth, "ingress", "bpf", "da", "obj", obj, "sec", "classifier"],
                   check=True)
    mine = [f for f in detect() if f["kind"] == "tc" and f["dev"] == veth]
    assert [(f["attach"], f["direction"], f["prog_name"], f["owner"]) for f in mine] == [
        ("cls_bpf", "ingress", "drop_port", [])], mine
    r = run_tlstap("detect")
    assert f"cls_bpf filter ingress on {veth}" in r.stdout and "no process holds it" in r.stdout, r.stdout
    subprocess.run(["tc", "qdisc", "del", "dev", veth, "clsact"], check=True)
    assert not [f for f in detect() if f["kind"] == "tc" and f.get("dev") == veth]


XDP_PASS_C = """
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
SEC("xdp") int detect_pass(struct xdp_md *ctx) { return XDP_PASS; }
char LICENSE[] SEC("license") = "GPL";
"""


def test_detects_xdp_left_by_ip(tmp_path, veth):
    src, obj = tmp_path / "pass.bpf.c", str(tmp_path / "pass.bpf.o")
    src.write_text(XDP_PASS_C)
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-I/usr/include/{os.uname().machine}-linux-gnu",
                    "-c", str(src), "-o", obj], check=True)
    subprocess.run(["ip", "link", "set", "dev", veth, "xdpgeneric", "obj", obj, "sec", "xdp"], check=True)
    mine = [f for f in detect() if f["kind"] == "xdp" and f["dev"] == veth]
    assert [(f["mode"], f["prog_name"], f["owner"]) for f in mine] == [("generic", "detect_pass", [])], mine
    subprocess.run(["ip", "link", "set", "dev", veth, "xdpgeneric", "off"], check=True)
    assert not [f for f in detect() if f["kind"] == "xdp" and f["dev"] == veth]


def test_detects_packet_capture(tmp_path):
    need_tool("dumpcap")
    cap = subprocess.Popen(["dumpcap", "-i", "lo", "-w", str(tmp_path / "lo.pcapng")], stderr=subprocess.PIPE,
                           text=True)
    try:
        deadline = time.monotonic() + 20
        err = ""
        while "Capturing on" not in err and time.monotonic() < deadline and cap.poll() is None:
            err += cap.stderr.readline()
        assert "Capturing on" in err, err
        mine = owned_by(detect(), cap.pid)
        assert [(f["kind"], f["dev"], f["protocol"]) for f in mine] == [("packet_socket", "lo", 3)], mine
    finally:
        cap.terminate()
        cap.wait(10)
    assert not owned_by(detect(), cap.pid)


def _s_server(cert, env: dict) -> subprocess.Popen:
    p = subprocess.Popen(["openssl", "s_server", "-accept", "127.0.0.1:0", "-naccept", "1", "-quiet",
                          "-cert", str(cert[0]), "-key", str(cert[1])], env={**os.environ, **env},
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def mapped():
        assert p.poll() is None, "s_server exited"
        with open(f"/proc/{p.pid}/maps") as f:
            return "libssl.so" in f.read()
    wait_for(mapped, 10, "s_server to map libssl")
    return p


def test_detects_sslkeylogfile(tmp_path, cert):
    keys = str(tmp_path / "keys.log")
    p = _s_server(cert, {"SSLKEYLOGFILE": keys})
    try:
        mine = owned_by(detect(), p.pid)
        assert [(f["kind"], f["path"]) for f in mine] == [("sslkeylogfile", keys)], mine
        assert mine[0]["owner"][0]["comm"] == "openssl"
    finally:
        p.kill()
        p.wait(10)
    assert not owned_by(detect(), p.pid)


def test_detects_ld_preload_in_tls_process(tmp_path, cert):
    preload = "/lib/x86_64-linux-gnu/libdl.so.2"
    if not os.path.exists(preload):
        pytest.skip(f"no {preload} to preload")
    p = _s_server(cert, {"LD_PRELOAD": preload})
    try:
        mine = owned_by(detect(), p.pid)
        assert [(f["kind"], f["preload"]) for f in mine] == [("ld_preload", preload)], mine
        assert any("OpenSSL libssl" in lib and mapped_libssl(p.pid) in lib for lib in mine[0]["tls_libraries"])
    finally:
        p.kill()
        p.wait(10)
    assert not owned_by(detect(), p.pid)


def test_without_capabilities_says_which_and_exits_1():
    if not shutil.which("setpriv"):
        pytest.skip("no setpriv")
    r = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--", tlstap_exe(), "detect"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr
    assert "CAP_SYS_ADMIN" in r.stderr and "Traceback" not in r.stderr


def test_text_report_verdict():
    r = run_tlstap("detect")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    last = r.stdout.splitlines()[-1]
    assert last == "nothing capturing TLS found" or last.split()[1] in ("finding", "findings"), r.stdout
