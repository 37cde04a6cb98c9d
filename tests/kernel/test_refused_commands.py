"""A refused command leaves the user's files as they were, and says why in one line.

Each case runs the real `tlstap` in a directory holding the user's files (known bytes, mode
0644, an old mtime), with relative output paths: after the refusal every file there is
byte-identical with the same mode and mtime, and no file was added (a default output name
such as tlstap.pcapng, or a spool file). The refusals come from where they really arise: a
bad flag, a library that is not what was said, an interface that does not exist, a BPF
object the kernel cannot load, a TC attach without CAP_NET_ADMIN.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

from .tap import tlstap_exe
from .test_cli_errors import assert_one_line_error, dead_pid

OLD_MTIME_NS = 1_600_000_000_123_456_789
USER_FILES = {"user.out": b"the user's capture, kept\n", "user.pcapng": b"\x0a\x0d\x0d\x0anot ours\n",
              "user.keys": b"CLIENT_RANDOM 00 11\n"}


def _snapshot(d) -> dict:
    out = {}
    for name in sorted(os.listdir(d)):
        st = os.lstat(os.path.join(d, name))
        with open(os.path.join(d, name), "rb") as f:
            out[name] = (f.read(), stat.S_IMODE(st.st_mode), st.st_mtime_ns, st.st_ino)
    return out


@pytest.fixture
def userdir(tmp_path):
    d = tmp_path / "cwd"
    d.mkdir()
    for name, data in USER_FILES.items():
        p = d / name
        p.write_bytes(data)
        p.chmod(0o644)
        os.utime(p, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    return d


@pytest.fixture(scope="module")
def broken_bpf_dir(tmp_path_factory):
    """The shipped BPF objects, with openssl.bpf.o and keylog.bpf.o cut short: libbpf refuses
    to open them (a LoadError once the command got that far)."""
    from tlstap.sources.base import bpf_object_path
    d = tmp_path_factory.mktemp("bpf")
    src = os.path.dirname(bpf_object_path("openssl.bpf.o"))
    for name in os.listdir(src):
        if name.endswith(".o"):
            shutil.copy(os.path.join(src, name), d / name)
    for name in ("openssl.bpf.o", "keylog.bpf.o"):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:2000])
    return str(d)


def refused(cwd, argv, needles, env=None, wrap=()) -> None:
    before = _snapshot(cwd)
    r = subprocess.run([*wrap, tlstap_exe(), *argv], cwd=cwd, capture_output=True, text=True, timeout=60,
                       env={**os.environ, **(env or {})})
    assert_one_line_error(r, *needles)
    after = _snapshot(cwd)
    assert sorted(after) == sorted(before), f"files added or removed: {sorted(set(after) ^ set(before))}"
    for name in before:
        assert after[name] == before[name], f"{name} changed: {before[name][:3]} -> {after[name][:3]}"


NOT_GO = "/bin/ls"
# (id, argv, what the one line must say)
CASES = [
    ("pcapng-bad-filter", ["tls", "-m", "pcapng", "-i", "lo", "-w", "user.pcapng", "tcp", "port"], ["port"]),
    ("pcapng-no-such-if", ["tls", "-m", "pcapng", "-i", "nosuchif", "-w", "user.pcapng"], ["nosuchif"]),
    ("pcapng-no-such-if-default-file", ["tls", "-m", "pcapng", "-i", "nosuchif"], ["nosuchif"]),
    ("pcapng-not-openssl", ["tls", "-m", "pcapng", "-i", "lo", "-w", "user.pcapng", "--libssl", "/bin/ls"],
     ["/bin/ls"]),
    ("gotls-pcapng-not-go", ["gotls", "-m", "pcapng", "-i", "lo", "-w", "user.pcapng", "--elfpath", NOT_GO],
     [NOT_GO]),
    ("text-not-openssl", ["tls", "-o", "user.out", "--libssl", "/bin/ls"], ["/bin/ls", "not OpenSSL"]),
    ("gotls-text-not-go", ["gotls", "--elfpath", NOT_GO, "-o", "user.out"], [NOT_GO, "not a Go binary"]),
    ("gnutls-text-not-gnutls", ["gnutls", "--gnutls", "/bin/ls", "-o", "user.out"], ["/bin/ls"]),
    ("nss-text-not-nspr", ["nss", "--nspr", "/bin/ls", "-o", "user.out"], ["/bin/ls"]),
    ("keylog-not-openssl", ["tls", "-m", "keylog", "-k", "user.keys", "--libssl", "/bin/ls"], ["/bin/ls"]),
    ("keylog-not-openssl-default-file", ["tls", "-m", "keylog", "--libssl", "/bin/ls"], ["/bin/ls"]),
    ("gnutls-keylog-not-gnutls", ["gnutls", "-m", "keylog", "-k", "user.keys", "--gnutls", "/bin/ls"], ["/bin/ls"]),
    ("gotls-keylog-not-go", ["gotls", "-m", "keylog", "-k", "user.keys", "--elfpath", NOT_GO], [NOT_GO]),
    ("spool-dir", ["tls", "-o", "user.out", "--spool-dir", "/nonexistent-dir"], ["--spool-dir"]),
    ("max-body", ["tls", "-o", "user.out", "--max-body", "lots"], ["--max-body lots"]),
    ("spool-max", ["tls", "-o", "user.out", "--spool-max", "1K"], ["--spool-max 1K"]),
    ("mapsize-1T", ["tls", "-o", "user.out", "--mapsize", "1T"], ["--mapsize 1T", "2G"]),
    ("mapsize-3G", ["tls", "-o", "user.out", "--mapsize", "3G"], ["--mapsize 3G", "4G", "2G"]),
    ("mapsize-0", ["tls", "-o", "user.out", "--mapsize", "0"], ["--mapsize 0"]),
    ("keylog-mapsize-0", ["tls", "-m", "keylog", "-k", "user.keys", "--mapsize", "0"], ["--mapsize 0"]),
    ("pcapng-mapsize-1T", ["tls", "-m", "pcapng", "-i", "lo", "-w", "user.pcapng", "--mapsize", "1T"],
     ["--mapsize 1T", "2G"]),
    ("mapsize-below-payload", ["tls", "--source", "probe", "-o", "user.out", "--mapsize", "64K"],
     ["--mapsize 64K", "--max-payload"]),
    ("max-payload-above-mapsize", ["tls", "--source", "probe", "-o", "user.out", "--max-payload", "64M"],
     ["--max-payload 64M"]),
    ("wire-ring-too-small", ["tls", "-o", "user.out", "--mapsize", "64K"], ["--mapsize 64K", "packet ring"]),
    ("max-payload-0", ["tls", "-o", "user.out", "--max-payload", "0"], ["--max-payload 0"]),
    ("mapsize-above-spool-max", ["tls", "-o", "user.out", "--mapsize", "1G"], ["--mapsize 1G", "--spool-max 2G"]),
    ("cgroup", ["tls", "-o", "user.out", "--cgroup", "/nonexistent-cgroup"], ["--cgroup"]),
    ("filter-in-text-mode", ["tls", "-o", "user.out", "tcp"], ["-m pcapng"]),
]


@pytest.mark.parametrize("argv,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_command_leaves_files_alone(userdir, argv, needles):
    refused(userdir, argv, needles)


@pytest.mark.parametrize("argv", [["tls", "-o", "user.out"], ["tls", "-m", "keylog", "-k", "user.keys"],
                                  ["tls", "-m", "pcapng", "-i", "lo", "-w", "user.pcapng"]],
                         ids=["text", "keylog", "pcapng"])
def test_dead_pid_leaves_files_alone(userdir, argv):
    pid = dead_pid()
    refused(userdir, [*argv, "--pid", str(pid)], [f"--pid {pid}"])


@pytest.mark.parametrize("argv", [["tls", "-o", "user.out"], ["tls", "-m", "keylog", "-k", "user.keys"],
                                  ["tls", "-m", "pcapng", "-i", "lo", "-w", "user.pcapng"]],
                         ids=["text", "keylog", "pcapng"])
def test_no_btf_leaves_files_alone(userdir, argv):
    refused(userdir, argv, ["BTF"], env={"TLSTAP_BTF_PATH": "/nonexistent/vmlinux"})


def test_no_capabilities_leaves_files_alone(userdir):
    os.chmod(userdir, 0o777)      # the unprivileged process could write here, were it let through
    wrap = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]
    refused(userdir, ["tls", "-o", "new.out"], ["CAP_BPF"], wrap=wrap)


@pytest.mark.parametrize("argv", [["tls", "-o", "user.out"], ["tls", "-o", "new.out"],
                                  ["tls", "-m", "keylog", "-k", "user.keys"], ["tls", "-m", "keylog"],
                                  ["tls", "-m", "pcapng", "-i", "lo", "-w", "user.pcapng"]],
                         ids=["text", "text-new-file", "keylog", "keylog-default-file", "pcapng"])
def test_load_error_after_open_leaves_files_alone(userdir, broken_bpf_dir, argv):
    """The output is opened before the BPF object is: the kernel (libbpf) refusing the object
    must not cost the user's file its content, nor leave a new one behind."""
    refused(userdir, argv, ["BPF object"], env={"TLSTAP_BPF_DIR": broken_bpf_dir})


@pytest.mark.parametrize("argv", [["-w", "user.pcapng"], []], ids=["existing", "default-file"])
def test_attach_failure_leaves_files_alone(userdir, argv):
    """Without CAP_SYS_ADMIN and CAP_NET_ADMIN the objects load (CAP_BPF) but the kernel refuses
    the first probe's attachment: after the pcapng file was opened. (CAP_NET_ADMIN alone no
    longer makes the TC step fail: a tcx link also takes CAP_SYS_ADMIN, which root keeps.)"""
    wrap = ["setpriv", "--bounding-set=-net_admin,-sys_admin", "--inh-caps=-net_admin,-sys_admin"]
    refused(userdir, ["tls", "-m", "pcapng", "-i", "lo", *argv], [], wrap=wrap)
