"""`tlstap doctor` on this machine: real kernel, real processes, nothing mocked.

Most tests call run_doctor in-process (its report goes to stdout, captured by capsys); the
unprivileged one runs `python -m tlstap.cli doctor` as uid nobody with every capability dropped.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

import tlstap
from tests.conftest import missing, needs
from tests.peers import wait_for
from tlstap.commands.doctor import FAIL, INFO, OK, WARN, run_doctor
from tlstap.libbpf.object import TC_H_CLSACT_EGRESS, TC_H_CLSACT_INGRESS, tc_filter_count

from .conftest import static_node

STATUSES = (OK, INFO, WARN, FAIL)


def report(capsys, pid=None, libssl=(), as_json=False):
    """(exit code, stdout) of one in-process run."""
    rc = run_doctor(pid, as_json, list(libssl))
    return rc, capsys.readouterr().out


def parse_text(out: str) -> list[tuple[str, str, str, str]]:
    """(status, check, detail, fix) per report line; the fix is on the next, indented line."""
    rows = []
    for line in out.splitlines():
        if line.split(" ", 1)[0] in STATUSES:
            # "STATUS check name  detail": names are padded to one column, then two spaces
            status, rest = line[:5].strip(), line[6:]
            cut = rest.index("  ")
            name, detail = rest[:cut].strip(), rest[cut:].strip()
            rows.append([status, name, detail, ""])
        elif line.strip().startswith("fix: "):
            assert rows and rows[-1][3] == "", f"fix line without its check: {line!r}"
            rows[-1][3] = line.strip()[len("fix: "):]
    return [tuple(r) for r in rows]


def by_name(rows) -> dict[str, tuple]:
    return {r[1]: r for r in rows}


@pytest.fixture
def proc():
    """spawn(argv, ready="asleep") -> Popen, killed at teardown. `ready`: a line to wait for on
    stdout; "asleep": until it sleeps in the kernel (sleep(1): its libraries are mapped by
    then); None: no wait."""
    procs = []

    def spawn(argv, ready="asleep"):
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        if ready == "asleep":
            wait_for(lambda: "nanosleep" in open(f"/proc/{p.pid}/wchan").read(), 10, f"{argv[0]} to sleep")
        elif ready:
            assert p.stdout.readline().strip() == ready
        return p
    yield spawn
    for p in procs:
        p.kill()
        p.wait()


# ---- the host ----------------------------------------------------------------------------

def test_host_report_is_ok(capsys):
    t0 = time.monotonic()
    rc, out = report(capsys)
    took = time.monotonic() - t0
    rows = parse_text(out)
    checks = by_name(rows)
    assert rc == 0, out
    for name in ("kernel", "btf", "capabilities", "cap_net_admin", "bpffs", "tracefs", "ringbuf", "task_storage",
                 "openssl.bpf.o", "tp_btf", "keylog.bpf.o", "uprobe", "packets.bpf.o", "tc", "libssl",
                 "placement", "keylog", "spool", "pcapng encoder", "huge pages"):
        assert checks[name][0] == OK, checks.get(name)
    assert "fired" in checks["uprobe"][2] and "detached" in checks["uprobe"][2]
    assert "BPF_PROG_TEST_RUN" in checks["tc"][2] and "TC_ACT_UNSPEC" in checks["tc"][2]
    assert checks["tcx"][0] == OK and "tcx links" in checks["tcx"][2]      # 6.18 has them
    assert "not needed" in checks["bpffs"][2] and "not needed" in checks["memlock"][2]
    assert "OpenSSL 3" in checks["libssl"][2]
    assert checks["placement"][2].startswith("internal probes on push instructions")
    assert "client_random at +0x" in checks["keylog"][2]
    assert "GiB free" in checks["spool"][2]
    assert "MiB of huge pages" in checks["huge pages"][2]     # allocated and looked at, not assumed
    # every WARN and FAIL says what to do
    assert all(r[3] for r in rows if r[0] in (WARN, FAIL)), out
    assert out.rstrip().splitlines()[-1].endswith("s") and " FAIL in " in out
    assert took < 2, f"doctor took {took:.2f}s"


def test_huge_pages_off_or_absent(tmp_path, monkeypatch):
    from tlstap.commands import doctor
    enabled = tmp_path / "enabled"
    enabled.write_text("always madvise [never]\n")
    monkeypatch.setattr(doctor, "THP_ENABLED", str(enabled))
    (c,) = doctor.huge_pages_check()
    assert c.status == WARN and "never" in c.detail and c.fix == f"echo madvise > {enabled}"
    monkeypatch.setattr(doctor, "THP_ENABLED", str(tmp_path / "absent"))
    (c,) = doctor.huge_pages_check()
    assert c.status == INFO and "4 KiB pages" in c.detail


def test_json_has_the_same_checks(capsys):
    _, text = report(capsys)
    rc, out = report(capsys, as_json=True)
    assert rc == 0
    items = json.loads(out)
    assert all(set(i) == {"check", "status", "detail", "fix"} for i in items)
    assert all(i["status"] in STATUSES for i in items)
    assert [i["check"] for i in items] == [r[1] for r in parse_text(text)]
    assert [i["status"] for i in items] == [r[0] for r in parse_text(text)]


def _bpf_fds() -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("anon_inode:bpf") or link.startswith("anon_inode:[perf_event]"):
            out.append(link)
    return sorted(out)


def test_leaves_nothing_behind(capsys):
    """No BPF program, map, link or perf event left open; lo's TC hooks and the uprobe list
    as they were."""
    lo = int(open("/sys/class/net/lo/ifindex").read())

    def state():
        qdiscs = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout \
            if shutil.which("tc") else ""
        try:
            uprobes = open("/sys/kernel/tracing/uprobe_events").read()
        except OSError:
            uprobes = None
        return (_bpf_fds(), tc_filter_count(lo, TC_H_CLSACT_INGRESS), tc_filter_count(lo, TC_H_CLSACT_EGRESS),
                qdiscs, uprobes)

    before = state()
    rc, out = report(capsys)
    assert rc == 0, out
    assert state() == before


# ---- unprivileged --------------------------------------------------------------------------

def test_unprivileged_fails_on_capabilities_without_traceback():
    src = os.path.dirname(os.path.dirname(tlstap.__file__))       # the tlstap being tested
    env = {**os.environ, "PYTHONPATH": src}
    r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--inh-caps=-all",
                        sys.executable, "-m", "tlstap.cli", "doctor"], capture_output=True, text=True, timeout=60, env=env,
                       cwd="/")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    checks = by_name(parse_text(r.stdout))
    status, _, detail, fix = checks["capabilities"]
    assert status == FAIL and "uid 65534" in detail and "CAP_BPF" in detail
    assert "root" in fix and "setcap" in fix
    # what needs no privilege is still checked
    assert checks["btf"][0] == OK and checks["libssl"][0] == OK
    assert checks["bpf probes"][0] == WARN


# ---- --pid ---------------------------------------------------------------------------------

def test_pid_python_ssl_finds_libssl(capsys, proc):
    p = proc([sys.executable, "-c", "import ssl, time; print('ready', flush=True); time.sleep(60)"], ready="ready")
    rc, out = report(capsys, pid=p.pid)
    assert rc == 0, out
    checks = by_name(parse_text(out))
    assert checks["process"][0] == OK and str(p.pid) in checks["process"][2]
    assert f"--uid {os.getuid()}" in checks["process"][2]
    assert checks["namespaces"][2].startswith("same mount namespace")
    assert checks["cgroup"][0] != OK or "--cgroup /" in checks["cgroup"][2]
    assert checks["tls library"][0] == OK and "libssl.so" in checks["tls library"][2]
    assert checks["libssl"][0] == OK and "OpenSSL" in checks["libssl"][2] and f"mapped by {p.pid}" in out
    assert checks["placement"][0] in (OK, WARN) and checks["keylog"][0] == OK
    # --pid replaces the system libssl section; the environment is still checked
    assert "system libssl" not in out and checks["uprobe"][0] == OK


def test_pid_without_tls_says_why(capsys, proc):
    p = proc(["sleep", "60"])
    rc, out = report(capsys, pid=p.pid)
    assert rc == 1
    status, _, detail, fix = by_name(parse_text(out))["tls library"]
    assert status == FAIL and "maps no OpenSSL and no other TLS library" in detail
    assert "first connection" in fix


@pytest.mark.parametrize("soname,uses,command", [("libgnutls.so.30", "uses GnuTLS (libgnutls.so.30", "gnutls"),
                                                  ("libssl3.so", "uses NSS (lib", "nss")])
def test_pid_other_tls_library_names_its_command(capsys, proc, soname, uses, command):
    p = proc([sys.executable, "-c", f"import ctypes, time; ctypes.CDLL({soname!r}); print('ready', flush=True); "
                                    "time.sleep(60)"], ready=None)
    line = p.stdout.readline().strip()
    if line != "ready":
        missing(f"{soname} is not installed (apt-get install gnutls-bin libnss3-tools)")
    rc, out = report(capsys, pid=p.pid)
    status, _, detail, fix = by_name(parse_text(out))["tls library"]
    assert status == WARN and uses in detail
    assert fix == f"tlstap {command} --pid {p.pid}"


@needs(shutil.which("objcopy"), "objcopy (binutils) is not installed")
def test_pid_go_binary(capsys, proc, tmp_path):
    """A binary with Go's build-info section is recognised as Go (sleep dressed up as one)."""
    fake = tmp_path / "gosleep"
    (tmp_path / "buildinfo").write_bytes(b"\xff Go buildinf:" + bytes(18))
    subprocess.run(["objcopy", "--add-section", f".go.buildinfo={tmp_path / 'buildinfo'}",
                    shutil.which("sleep"), str(fake)], check=True)
    fake.chmod(0o755)
    p = proc([str(fake), "60"])
    rc, out = report(capsys, pid=p.pid)
    status, _, detail, fix = by_name(parse_text(out))["tls library"]
    assert status == WARN and "Go binary" in detail and fix == f"tlstap gotls --pid {p.pid}"


def test_dead_pid_is_one_line(capsys):
    p = subprocess.Popen(["true"])
    p.wait()
    rc, out = report(capsys, pid=p.pid)
    assert rc == 1
    assert out.splitlines() == [f"FAIL  process  {p.pid}: no such process"]
    rc, out = report(capsys, pid=p.pid, as_json=True)
    assert rc == 1 and json.loads(out) == [{"check": "process", "status": FAIL,
                                            "detail": f"{p.pid}: no such process", "fix": ""}]


# ---- --libssl ------------------------------------------------------------------------------

def test_libssl_not_openssl_and_missing(capsys):
    rc, out = report(capsys, libssl=["/bin/ls", "/nonexistent/libssl.so.3"])
    assert rc == 1
    fails = [r for r in parse_text(out) if r[0] == FAIL]
    assert [r[1] for r in fails] == ["libssl", "libssl"]
    assert "/bin/ls (--libssl): defines neither SSL_write nor SSL_write_ex" in fails[0][2]
    assert "no such file" in fails[1][2] and all(r[3] for r in fails)


@needs(static_node(), "no node binary with statically linked OpenSSL (set TLSTAP_TEST_NODE; quickstart.sh test does)")
def test_libssl_static_node(capsys):
    node = static_node()
    rc, out = report(capsys, libssl=[node])
    assert rc == 0, out
    rows = [r for r in parse_text(out) if r[1] in ("libssl", "placement", "keylog")]
    node_rows = rows[3:]                   # after the system libssl's three lines
    assert [r[1] for r in node_rows] == ["libssl", "placement", "keylog"]
    assert node in node_rows[0][2] and "OpenSSL" in node_rows[0][2]
    assert node_rows[2][0] == OK
