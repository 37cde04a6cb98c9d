"""The kernel's BTF is read once per process, however many feature questions are asked."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

# the questions a pcapng capture with text mode asks at start (sources/probe.py, sources/packets.py)
_ASK = ("from tlstap.libbpf.object import kernel_has_func, kernel_has_tcx, kernel_has_tracepoint\n"
        "from tlstap.sources.packets import DIRECT_KFUNCS, IO_TRACEPOINTS\n"
        "from tlstap.sources.probe import DIRECT_READ_KFUNC\n"
        "print(kernel_has_func(DIRECT_READ_KFUNC), all(kernel_has_func(f) for f in DIRECT_KFUNCS),\n"
        "      kernel_has_tcx(), all(kernel_has_tracepoint(t) for t in IO_TRACEPOINTS),\n"
        "      kernel_has_func(DIRECT_READ_KFUNC), kernel_has_func('no_such_function_in_any_kernel'))\n")


@pytest.mark.skipif(not os.path.exists("/sys/kernel/btf/vmlinux"), reason="kernel without BTF")
def test_btf_read_once_per_process(tmp_path):
    if shutil.which("strace") is None:
        pytest.skip("strace not installed")
    trace = tmp_path / "trace"
    out = subprocess.run(["strace", "-f", "-e", "trace=openat,open", "-o", str(trace), sys.executable, "-c", _ASK],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    answers = out.split()
    assert len(answers) == 6 and answers[-1] == "False" and answers[0] == answers[4], out
    reads = [line for line in trace.read_text().splitlines() if "/sys/kernel/btf/vmlinux" in line]
    assert len(reads) == 1, reads
