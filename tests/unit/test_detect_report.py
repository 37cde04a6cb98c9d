"""detect's report: text grouped by kind with a verdict line, JSON objects with kind, detail,
owner and since; and /proc parsing of a process whose name has parentheses and spaces."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

from tests.peers import wait_for
from tlstap.detect import procs, report
from tlstap.detect.report import Finding

T0 = 1_700_000_000.0          # 2023-11-14T22:13:20Z


def _proc(pid=42, comm="tool"):
    return procs.Proc(pid, comm, f"/usr/bin/{comm}", 0, T0)


def test_nothing_found():
    assert report.text([], []) == "nothing capturing TLS found\n"
    assert json.loads(report.as_json([])) == []


def test_text_groups_by_kind_in_a_fixed_order_with_a_count():
    fs = [Finding("tc", "tcx egress on lo, program 7 tc_egress", {}, [], T0, "program loaded",
                  no_owner="no process holds it"),
          Finding("uprobe", "uprobe /lib/libssl.so.3 [OpenSSL libssl] at SSL_write, program 5 x", {},
                  [_proc()], T0, "program loaded")]
    lines = report.text(fs, ["tc not checked: x"]).splitlines()
    assert lines[0].startswith("uprobes on TLS libraries")
    assert lines[1] == ("  uprobe /lib/libssl.so.3 [OpenSSL libssl] at SSL_write, program 5 x: pid 42 (tool, uid 0, "
                        "/usr/bin/tool); since 2023-11-14T22:13:20Z (program loaded)")
    assert lines[2].startswith("TC programs")
    assert lines[3] == ("  tcx egress on lo, program 7 tc_egress: no process holds it; "
                        "since 2023-11-14T22:13:20Z (program loaded)")
    assert lines[4:] == ["note: tc not checked: x", "2 findings"]
    assert report.text(fs[:1], []).splitlines()[-1] == "1 finding"


def test_json_objects():
    f = Finding("sslkeylogfile", "SSLKEYLOGFILE=/k", {"path": "/k"}, [_proc(7, "curl")], T0, "process started")
    assert json.loads(report.as_json([f])) == [{
        "kind": "sslkeylogfile", "path": "/k",
        "owner": [{"pid": 7, "comm": "curl", "exe": "/usr/bin/curl", "uid": 0}], "pinned": [],
        "since": "2023-11-14T22:13:20Z", "since_what": "process started"}]


def test_proc_with_parentheses_in_its_name(tmp_path):
    """/proc/PID/stat's comm may hold ') (': detect reads around the last ')'."""
    odd = tmp_path / "a) b (c"
    shutil.copy("/bin/sleep", odd)
    p = subprocess.Popen([str(odd), "30"])
    try:
        t0 = time.time()
        def started():
            pr = procs.scan().get(p.pid)
            return pr if pr and pr.exe == str(odd) else None
        pr = wait_for(started, 10, "the process to exec")
        assert (pr.comm, pr.uid) == ("a) b (c", os.getuid())
        assert abs(pr.start - t0) < 5
    finally:
        p.kill()
        p.wait()


def test_sites_of_one_function_share_a_line_per_owner():
    def ret(site, pid):
        f = Finding("uprobe", f"uprobe /bin/go [Go] at F+{site}, program 9 r", {}, [_proc(pid)], T0, "program loaded")
        f.merge_key, f.merged, f.site = ("uprobe", "/bin/go", "F", 9), "uprobe /bin/go [Go] at F{sites}, program 9 r", \
            f"+{site}"
        return f
    lines = report.text([ret("0x10", 1), ret("0x20", 1), ret("0x10", 2)], []).splitlines()
    assert lines[1].startswith("  uprobe /bin/go [Go] at F (2 sites: +0x10, +0x20), program 9 r: pid 1 ")
    assert lines[2].startswith("  uprobe /bin/go [Go] at F+0x10, program 9 r: pid 2 ")
    assert lines[-1] == "3 findings"
