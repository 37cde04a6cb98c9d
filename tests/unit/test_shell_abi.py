"""audit/shell.py must mirror bpf/shell.h: its structs against the BTF of shell.bpf.o, its
#defines and enums against the header text (as tests/abi does for tlstap.h)."""
import json
import os
import re
import subprocess

import pytest

from tests.abi.test_abi import assert_mirrors

from tlstap.audit import shell
from tlstap.sources.base import bpf_object_path

HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "bpf", "shell.h")


@pytest.fixture(scope="module")
def btf_types():
    out = subprocess.run(["bpftool", "btf", "dump", "file", bpf_object_path("shell.bpf.o"), "-j"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["types"]


@pytest.mark.parametrize("cname,pytype", [("shell_event", shell.ShellEvent), ("shell_config", shell.ShellConfig)])
def test_struct_matches_btf(btf_types, cname, pytype):
    (t,) = [t for t in btf_types if t["kind"] == "STRUCT" and t.get("name") == cname]
    assert_mirrors(t, pytype)


def test_config_is_rodata_shell(btf_types):
    """ShellCapture writes struct shell_config at offset 0 of .rodata.shell."""
    by_id = {t["id"]: t for t in btf_types}
    (sec,) = [t for t in btf_types if t["kind"] == "DATASEC" and t["name"] == ".rodata.shell"]
    (var,) = sec["vars"]
    assert var["offset"] == 0
    t = by_id[by_id[var["type_id"]]["type_id"]]
    while t["kind"] in ("CONST", "VOLATILE", "TYPEDEF"):
        t = by_id[t["type_id"]]
    assert t["name"] == "shell_config"


def _members(text: str, enum: str, prefix: str) -> list[tuple[str, int]]:
    body = re.search(rf"enum {enum} \{{(.*?)\}};", text, re.S).group(1)
    return [(n, int(v)) for n, v in re.findall(rf"^\s*{prefix}(\w+) = (\d+)", body, re.M)]


def test_header_constants_match():
    with open(HEADER) as f:
        text = f.read()
    defines = dict(re.findall(r"^#define (\w+) (0x[0-9a-fA-F]+|\d+)", text, re.M))
    assert set(defines) == {"SHELL_LINE_MAX", "SHELL_CHUNKS_MAX", "SHELL_TTY_MAX", "SF_MORE", "SF_TRUNCATED"}
    for name, val in defines.items():
        assert getattr(shell, name) == int(val, 0), name
    assert _members(text, "shell_kind", "") == [(k.name, k.value) for k in shell.ShellKind]
    counters = _members(text, "shell_counter", "")
    assert counters[-1] == ("SCNT_MAX", len(shell.ShellCounter))
    assert counters[:-1] == [(c.name, c.value) for c in shell.ShellCounter]
