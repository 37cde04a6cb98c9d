"""libbpf/introspect.py's structs against the running kernel's own: every field we mirror is
at the offset the kernel's BTF gives, and the sizes match (`bpftool btf dump ... format raw`)."""
from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import pytest

from tlstap.libbpf import introspect

VMLINUX = "/sys/kernel/btf/vmlinux"
_TYPE = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER = re.compile(r"^\t'([^']*)' type_id=(\d+) bits_offset=(\d+)")
_MODIFIERS = ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG")


@pytest.fixture(scope="module")
def btf():
    if not shutil.which("bpftool"):
        pytest.skip("bpftool is not installed")
    raw = subprocess.run(["bpftool", "btf", "dump", "file", VMLINUX, "format", "raw"],
                         capture_output=True, text=True, check=True).stdout
    types, cur = {}, None
    for line in raw.splitlines():
        m = _TYPE.match(line)
        if m:
            tid, kind, name, rest = m.groups()
            attrs = dict(kv.split("=", 1) for kv in rest.split() if "=" in kv)
            cur = types[int(tid)] = {"kind": kind, "name": name, "attrs": attrs, "members": []}
            continue
        m = _MEMBER.match(line)
        if m and cur is not None:
            cur["members"].append((m.group(1), int(m.group(2)), int(m.group(3))))
    by_name = {(t["kind"], t["name"]): tid for tid, t in types.items() if t["name"] != "(anon)"}
    return types, by_name


def _resolve(types, tid):
    while types[tid]["kind"] in _MODIFIERS:
        tid = int(types[tid]["attrs"]["type_id"])
    return types[tid]


def _check(types, ctype, btype, path, seen):
    """Every field of ctype is in btype at the same bit offset; nested aggregates recursively."""
    if issubclass(ctype, ctypes.Structure) or any(n == "_size" for n, *_ in ctype._fields_):
        assert ctypes.sizeof(ctype) == int(btype["attrs"]["size"]), f"{path}: size"
    anon = set(getattr(ctype, "_anonymous_", ()))
    members = btype["members"]
    for fname, ftype, *_bits in ctype._fields_:
        if fname == "_size":
            continue
        want = "(anon)" if fname in anon else fname
        cands = [(t, off) for n, t, off in members if n == want]
        assert cands, f"{path}.{fname}: no such member in the kernel's {btype['name'] or '(anon)'}"
        off_bits = getattr(ctype, fname).offset * 8
        if _bits:
            match = [(t, off) for t, off in cands if off_bits <= off < off_bits + 32]
        else:
            match = [(t, off) for t, off in cands if off == off_bits]
        assert match, f"{path}.{fname}: at bit {off_bits}, the kernel has it at {[o for _t, o in cands]}"
        sub = _resolve(types, match[0][0])
        if isinstance(ftype, type) and issubclass(ftype, (ctypes.Structure, ctypes.Union)):
            # an anonymous union of several candidates: the one whose members fit
            errors = []
            for t, _off in match:
                try:
                    _check(types, ftype, _resolve(types, t), f"{path}.{fname}", seen)
                    break
                except AssertionError as e:
                    errors.append(str(e))
            else:
                raise AssertionError("; ".join(errors))
        elif sub["kind"] in ("INT", "ENUM"):
            assert ctypes.sizeof(ftype) == int(sub["attrs"]["size"]) or _bits, f"{path}.{fname}: width"
        elif sub["kind"] == "ARRAY":
            assert ctypes.sizeof(ftype) == int(sub["attrs"].get("nr_elems", 0)) * ctypes.sizeof(ftype._type_)


@pytest.mark.parametrize("ctype,name", [(introspect.BpfLinkInfo, "bpf_link_info"),
                                        (introspect.BpfProgInfo, "bpf_prog_info")])
def test_struct_matches_kernel_btf(btf, ctype, name):
    types, by_name = btf
    btype = types[by_name[("STRUCT", name)]]
    assert ctypes.sizeof(ctype) == int(btype["attrs"]["size"])
    _check(types, ctype, btype, name, set())


def test_uprobe_fields_are_where_bpftool_reads_them(btf):
    """The fields detect depends on most, spelled out (a regression here names the field)."""
    li = introspect.BpfLinkInfo
    assert li.u.offset == 16
    up = introspect._Uprobe
    assert (up.file_name.offset, up.name_len.offset, up.offset.offset, up.cookie.offset) == (0, 8, 12, 16)
    assert introspect._PerfEvent.u.offset == 8
