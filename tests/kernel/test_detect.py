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

import json
import os
import shutil
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
                # the probes sit in unexported functions; detect names them by their callers
                called = {(f["probe"], c) for f in probes for c in f["called_by"]}
                assert {("uprobe", "SSL_read_ex"), ("uretprobe", "SSL_read_ex"),
                        ("uprobe", "SSL_write_ex"), ("uretprobe", "SSL_write_ex")} <= called, probes
            if mode == "text-wire":
                cg = {f["direction"] for f in mine if f["kind"] == "cgroup_skb"}
                assert cg == {"ingress", "egress"}
            if mode == "pcapng":
                assert {f["dev"] for f in mine if f["kind"] == "tc"} == {"lo"}
            progs = {f["prog_id"] for f in mine}
    assert_gone(pid, progs)


def test_detects_bpftrace(tmp_path, cert):
    need_tool("bpftrace")
    with OpenSSLServer(*cert) as srv:
        libssl = mapped_libssl(srv.pid)
        script = f'BEGIN {{ printf("ready\\n"); }} uprobe:{libssl}:SSL_write {{ @n = count(); }}'
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
            assert [(f["kind"], f["probe"], f["function"], f["library"]) for f in mine] == [
                ("uprobe", "uprobe", "SSL_write", "OpenSSL libssl")], mine
            assert same_file(mine[0]["path"], libssl)
            assert "perf_event_fd" in mine[0]        # bpftrace 0.17: a perf event with a program, no link
            assert detect_uprobes(found, bt.pid) == bpftool_uprobes(bt.pid)
            progs = {mine[0]["prog_id"]}
        finally:
            bt.terminate()
            bt.wait(10)
    assert_gone(bt.pid, progs)


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
