"""`tlstap doctor`'s lines on TLS libraries say what the commands really do.

The modes a line names for a library are checked against the command itself: every mode
named must be accepted by `tlstap COMMAND -m MODE` (it goes on to analyse the library), every
mode not named must be refused as not implemented. Nothing is hard-coded here: a command
that gains a mode makes doctor say so, or this test fails.
"""
from __future__ import annotations

import re

import pytest

from tests.conftest import need
from tlstap.commands.doctor import run_doctor
from tlstap.probes import discover

from .tap import run_tlstap
from .test_doctor import by_name, parse_text

#: the library flag of each command that reads a non-OpenSSL library, and the file name
#: the ld.so cache must hold for doctor to report it
LIBRARIES = {"gnutls": ("--gnutls", "libgnutls.so"), "nss": ("--nspr", "libnss3.so")}
#: every mode of -m (eCapture's aliases key and pcap aside), with an output of its kind
OUTPUT = {"text": ["-o", "{tmp}/o"], "keylog": ["-k", "{tmp}/k"], "pcapng": ["-i", "lo", "-w", "{tmp}/p"]}


def _named_modes(detail: str) -> set[str]:
    m = re.search(r"\(([a-z, ]+) modes?\)", detail)
    assert m, f"no modes named in {detail!r}"
    return set(re.split(r", | and ", m.group(1)))


@pytest.mark.parametrize("command", sorted(LIBRARIES))
def test_library_line_names_the_modes_the_command_has(capsys, tmp_path, command):
    flag, soname = LIBRARIES[command]
    need(any(n.startswith(soname) for n in discover.ld_cache()), f"{soname} is not installed: doctor has no line on it")
    run_doctor(None, False, [])
    rows = by_name(parse_text(capsys.readouterr().out))
    line = rows[command][2]
    assert f"`tlstap {command}`" in line, line
    assert "yet" not in line, line
    named = _named_modes(line)
    for mode in sorted(OUTPUT):
        out = [a.replace("{tmp}", str(tmp_path)) for a in OUTPUT[mode]]
        r = run_tlstap(command, "-m", mode, flag, "/bin/ls", *out)
        assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
        refused = "only -m" in r.stderr
        if mode in named:
            assert not refused and "/bin/ls" in r.stderr, f"doctor names -m {mode}: {r.stderr}"
        else:
            assert refused, f"doctor does not name -m {mode}, but `tlstap {command} -m {mode}` runs: {r.stderr}"
