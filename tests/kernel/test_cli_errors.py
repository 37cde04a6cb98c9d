"""Bad input: one clear line on stderr, a non-zero exit, never a traceback."""
import os
import subprocess

import pytest

from .tap import run_tlstap, tlstap_exe


def assert_one_line_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0, r
    assert "Traceback" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_dead_pid():
    pid = dead_pid()
    assert_one_line_error(run_tlstap("tls", "--pid", str(pid)), f"--pid {pid}", "no such process")


def test_libssl_missing():
    assert_one_line_error(run_tlstap("tls", "--libssl", "/nonexistent/libssl.so.3"), "/nonexistent/libssl.so.3")


def test_libssl_not_openssl():
    assert_one_line_error(run_tlstap("tls", "--libssl", "/bin/ls"), "/bin/ls")


def test_pid_without_openssl():
    p = subprocess.Popen(["sleep", "30"])
    try:
        assert_one_line_error(run_tlstap("tls", "--pid", str(p.pid)), str(p.pid))
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("path", ["/proc/version/x", "/nonexistent-dir/out.jsonl"])
def test_unwritable_output(path):
    assert_one_line_error(run_tlstap("tls", "-o", path), "cannot write", path)


def test_bad_sizes():
    assert_one_line_error(run_tlstap("tls", "--mapsize", "lots"), "--mapsize")
    assert_one_line_error(run_tlstap("tls", "--source", "probe", "--max-payload", "64M", "--mapsize", "8M"),
                          "--max-payload")


def test_bad_spool_flags():
    assert_one_line_error(run_tlstap("tls", "--spool-max", "1M"), "--spool-max", "--mapsize")
    assert_one_line_error(run_tlstap("tls", "--spool-dir", "/nonexistent-dir"), "--spool-dir", "/nonexistent-dir")


def test_bench_bad_workdir():
    assert_one_line_error(run_tlstap("bench", "--workdir", "/nonexistent-dir", "--configs", "base", "--sizes", "1k",
                                     "--rounds", "1", "--duration", "2"), "--workdir", "/nonexistent-dir")


def test_not_root_without_caps():
    # A real unprivileged process: uid nobody with every capability dropped.
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                        "--bounding-set=-all", tlstap_exe(), "tls"], capture_output=True, text=True, timeout=30)
    assert_one_line_error(r, "CAP_BPF")


def test_bpf_and_perfmon_without_sys_admin_on_a_kernel_that_wants_it():
    """Linux 6.16 made uprobes ask for CAP_SYS_ADMIN again: with CAP_BPF + CAP_PERFMON alone the
    command must say so in one line before anything is loaded, not fail at the first attach.
    On an older kernel those two are enough, and the capture starts (stopped at once)."""
    from tlstap.preflight import UPROBES_NEED_SYS_ADMIN_SINCE, kernel_version
    argv = ["setpriv", "--inh-caps=-all", "--bounding-set=-all,+bpf,+perfmon,+net_admin,+sys_ptrace,+dac_override",
            tlstap_exe(), "tls", "-m", "keylog", "-k", "/dev/null"]
    if kernel_version()[:2] >= UPROBES_NEED_SYS_ADMIN_SINCE:
        assert_one_line_error(subprocess.run(argv, capture_output=True, text=True, timeout=30),
                              "CAP_SYS_ADMIN", "6.16")
    else:
        pytest.skip("this kernel attaches uprobes with CAP_PERFMON")


def test_libssl_behind_another_users_proc_root_without_ptrace():
    """/proc/PID/root of another user's process answers EACCES without CAP_SYS_PTRACE: the
    error says so (it once said "no such file")."""
    from tlstap.probes import discover
    lib = discover.system_libssl()
    p = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "30"])
    try:
        path = f"/proc/{p.pid}/root{lib}"
        r = subprocess.run(["setpriv", "--inh-caps=-all", "--bounding-set=-all,+sys_admin,+bpf,+perfmon",
                            tlstap_exe(), "tls", "-m", "keylog", "-k", "/dev/null", "--libssl", path],
                           capture_output=True, text=True, timeout=30)
        assert_one_line_error(r, path, "permission denied", "CAP_SYS_PTRACE")
    finally:
        p.kill()
        p.wait()


def test_no_btf():
    r = subprocess.run([tlstap_exe(), "tls"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "TLSTAP_BTF_PATH": "/nonexistent/vmlinux"})
    assert_one_line_error(r, "BTF")


def test_unknown_mode_is_usage_error():
    r = run_tlstap("tls", "-m", "bogus")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_mounts_tracefs_when_missing(tmp_path):
    # A private mount namespace without tracefs: tlstap must mount it itself.
    out = tmp_path / "o.jsonl"
    script = (f"umount /sys/kernel/tracing 2>/dev/null; umount /sys/kernel/debug/tracing 2>/dev/null; "
              f"umount /sys/kernel/debug 2>/dev/null; "
              f"test ! -e /sys/kernel/tracing/events || exit 90; "
              f"timeout -s INT 3 {tlstap_exe()} tls --format json -o {out}")
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=30)
    if r.returncode == 90:
        pytest.skip("could not unmount tracefs in a private mount namespace")
    assert r.returncode == 124, r.stderr   # timeout(1) reports that it had to send SIGINT
    assert "ready in" in r.stderr and "interrupted:" in r.stderr and "Traceback" not in r.stderr
