"""abi.py must mirror bpf/tlstap.h: structs against the BTF of the built object,
#defines and enums against the header text."""
import ctypes
import json
import os
import re
import struct
import subprocess

import pytest

from tlstap import abi
from tlstap.sources.base import bpf_object_path

HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "bpf", "tlstap.h")


def _btf_structs(obj: str) -> dict:
    out = subprocess.run(["bpftool", "btf", "dump", "file", bpf_object_path(obj), "-j"],
                         check=True, capture_output=True, text=True).stdout
    return {t["name"]: t for t in json.loads(out)["types"] if t["kind"] == "STRUCT" and t.get("name")}


@pytest.fixture(scope="module")
def btf_structs():
    return {obj: _btf_structs(obj) for obj in ("openssl.bpf.o", "keylog.bpf.o", "packets.bpf.o", "gotls.bpf.o")}


@pytest.mark.parametrize("obj,cname,pytype", [
    ("openssl.bpf.o", "data_event", abi.DataEvent), ("openssl.bpf.o", "config", abi.Config),
    ("openssl.bpf.o", "conn_tuple", abi.ConnTuple),
    ("gotls.bpf.o", "data_event", abi.DataEvent), ("gotls.bpf.o", "config", abi.Config),
    ("keylog.bpf.o", "key_event", abi.KeyEvent), ("keylog.bpf.o", "config", abi.Config),
    ("packets.bpf.o", "packet_event", abi.PacketEvent), ("packets.bpf.o", "sock_owner", abi.SockOwner),
    ("packets.bpf.o", "sock_entry", abi.SockEntry), ("packets.bpf.o", "conn_tuple", abi.ConnTuple),
    ("packets.bpf.o", "pf_term", abi.PfTerm), ("packets.bpf.o", "pf_clause", abi.PfClause),
    ("packets.bpf.o", "pkt_config", abi.PktConfig), ("packets.bpf.o", "config", abi.Config)])
def test_struct_matches_btf(btf_structs, obj, cname, pytype):
    assert_mirrors(btf_structs[obj][cname], pytype)


def assert_mirrors(t: dict, pytype) -> None:
    """A ctypes mirror has the BTF struct `t`'s size and its members, in order, at its offsets."""
    assert t["size"] == ctypes.sizeof(pytype)
    members = [(m["name"], m["bits_offset"] // 8) for m in t["members"]]
    mirror = [(name, getattr(pytype, name).offset) for name, _ in pytype._fields_]
    assert members == mirror


def test_struct_format_matches_ctypes():
    assert struct.calcsize(abi.DATA_EVENT_FORMAT) == ctypes.sizeof(abi.DataEvent)
    assert struct.calcsize(abi.KEY_EVENT_FORMAT) == ctypes.sizeof(abi.KeyEvent)
    assert struct.calcsize(abi.PACKET_EVENT_FORMAT) == ctypes.sizeof(abi.PacketEvent)


def _header():
    with open(HEADER) as f:
        return f.read()


def test_defines_match():
    text = _header()
    defines = dict(re.findall(r"^#define (\w+) (0x[0-9a-fA-F]+|\d+)\s*(?:/\*.*\*/)?\s*$", text, re.M))
    exprs = dict(re.findall(r"^#define (\w+) \(([^)]*)\)", text, re.M))
    for name, val in defines.items():
        assert getattr(abi, name) == int(val, 0), name
    for name, expr in exprs.items():
        assert getattr(abi, name) == eval(expr, {}), name  # e.g. (32 * 1024)
    assert {"CHUNK_MAX", "CHUNKS_MAX", "DF_LAST", "COOKIE_RET_IS_COUNT"} <= set(defines) | set(exprs)


def test_enums_match():
    text = _header()
    body = re.search(r"enum counter \{(.*?)\};", text, re.S).group(1)
    names = re.findall(r"^\s*CNT_(\w+)", body, re.M)
    assert names[-1] == "MAX"
    assert [c.name for c in abi.Counter] == names[:-1]
    assert [c.value for c in abi.Counter] == list(range(len(names) - 1))
    dirs = dict(re.findall(r"DIR_(\w+) = (\d+)", text))
    assert {k: int(v) for k, v in dirs.items()} == {d.name: d.value for d in abi.Direction}
    assert int(re.search(r"REC_DATA = (\d+)", text).group(1)) == abi.REC_DATA
    kinds = dict(re.findall(r"KEY_(\w+) = (\d+)", text))
    assert {k: int(v) for k, v in kinds.items()} == {k.name: k.value for k in abi.KeyKind}
    body = re.search(r"enum key_counter \{(.*?)\};", text, re.S).group(1)
    names = re.findall(r"^\s*KCNT_(\w+)", body, re.M)
    assert [c.name for c in abi.KeyCounter] == names[:-1] and names[-1] == "MAX"
    assert [c.value for c in abi.KeyCounter] == list(range(len(names) - 1))


def _enum_members(text: str, enum: str, prefix: str) -> list[tuple[str, int]]:
    """(NAME, value) of an enum's members, values explicit or counted on."""
    body = re.search(rf"enum {enum} \{{(.*?)\}};", text, re.S).group(1)
    out, nxt = [], 0
    for name, val in re.findall(rf"^\s*{prefix}(\w+)(?:\s*=\s*(\d+))?", body, re.M):
        nxt = int(val) if val else nxt
        out.append((name, nxt))
        nxt += 1
    return out


def test_packet_enums_match():
    text = _header()
    assert _enum_members(text, "pkt_dir", "PKT_") == [(d.name, d.value) for d in abi.PktDir]
    members = _enum_members(text, "pkt_counter", "PCNT_")
    assert members[-1][0] == "MAX" and members[:-1] == [(c.name, c.value) for c in abi.PktCounter]
    assert _enum_members(text, "pf_kind", "PF_") == [(k.name, k.value) for k in abi.PfKind]


def test_packets_sections():
    """packets.py configures .rodata (struct config) and .rodata.pkt (struct pkt_config)."""
    out = subprocess.run(["bpftool", "btf", "dump", "file", bpf_object_path("packets.bpf.o"), "-j"],
                         check=True, capture_output=True, text=True).stdout
    types = json.loads(out)["types"]
    by_id = {t["id"]: t for t in types}
    secs = {t["name"]: t for t in types if t["kind"] == "DATASEC"}
    for sec, var, cname in ((".rodata", "cfg", "config"), (".rodata.pkt", "pcfg", "pkt_config")):
        (v,) = [by_id[vs["type_id"]] for vs in secs[sec]["vars"] if by_id[vs["type_id"]]["name"] == var]
        assert [vs["offset"] for vs in secs[sec]["vars"] if by_id[vs["type_id"]]["name"] == var] == [0]
        t = by_id[v["type_id"]]
        while t["kind"] in ("CONST", "VOLATILE", "TYPEDEF"):
            t = by_id[t["type_id"]]
        assert t["name"] == cname
