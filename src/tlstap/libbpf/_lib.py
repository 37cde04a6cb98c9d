"""dlopen libbpf.so.1 and declare the functions we call (argtypes/restype only)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os

from ..errors import EnvironmentProblem

c_void_p, c_char_p, c_int, c_size_t, c_uint32, c_uint64, c_bool = (
    ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_size_t,
    ctypes.c_uint32, ctypes.c_uint64, ctypes.c_bool)


class UprobeOpts(ctypes.Structure):
    """struct bpf_uprobe_opts as of libbpf 1.1 (sz makes newer libbpf accept it)."""

    _fields_ = [
        ("sz", c_size_t),
        ("ref_ctr_offset", c_size_t),
        ("bpf_cookie", c_uint64),
        ("retprobe", c_bool),
        ("func_name", c_char_p),
    ]


class TcHook(ctypes.Structure):
    """struct bpf_tc_hook (libbpf 1.1): a clsact qdisc of an interface."""

    _fields_ = [
        ("sz", c_size_t),
        ("ifindex", c_int),
        ("attach_point", c_int),      # BPF_TC_INGRESS | BPF_TC_EGRESS
        ("parent", c_uint32),
    ]                                 # size_t :0 -> 24 bytes, as ctypes pads it


class TcOpts(ctypes.Structure):
    """struct bpf_tc_opts (libbpf 1.1): one cls_bpf filter; handle/priority 0 = kernel picks."""

    _fields_ = [
        ("sz", c_size_t),
        ("prog_fd", c_int),
        ("flags", c_uint32),
        ("prog_id", c_uint32),
        ("handle", c_uint32),
        ("priority", c_uint32),
    ]                                 # 28 bytes + padding to 32


class TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts (libbpf 1.1): BPF_PROG_TEST_RUN arguments."""

    _fields_ = [
        ("sz", c_size_t),
        ("data_in", c_void_p),
        ("data_out", c_void_p),
        ("data_size_in", c_uint32),
        ("data_size_out", c_uint32),
        ("ctx_in", c_void_p),
        ("ctx_out", c_void_p),
        ("ctx_size_in", c_uint32),
        ("ctx_size_out", c_uint32),
        ("retval", c_uint32),
        ("repeat", c_int),
        ("duration", c_uint32),
        ("flags", c_uint32),
        ("cpu", c_uint32),
        ("batch_size", c_uint32),
    ]


BPF_TC_INGRESS, BPF_TC_EGRESS = 1, 2


PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)

_SIGNATURES = {
    "libbpf_set_print": (c_void_p, [PRINT_FN]),
    "bpf_object__open_file": (c_void_p, [c_char_p, c_void_p]),
    "bpf_object__load": (c_int, [c_void_p]),
    "bpf_object__close": (None, [c_void_p]),
    "bpf_object__find_program_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__find_map_by_name": (c_void_p, [c_void_p, c_char_p]),
    "bpf_object__next_program": (c_void_p, [c_void_p, c_void_p]),
    "bpf_object__next_map": (c_void_p, [c_void_p, c_void_p]),
    "bpf_program__name": (c_char_p, [c_void_p]),
    "bpf_program__set_autoload": (c_int, [c_void_p, c_bool]),
    "bpf_program__autoload": (c_bool, [c_void_p]),
    "bpf_program__fd": (c_int, [c_void_p]),
    "bpf_program__attach": (c_void_p, [c_void_p]),
    "bpf_program__attach_uprobe_opts": (c_void_p, [c_void_p, c_int, c_char_p, c_size_t, ctypes.POINTER(UprobeOpts)]),
    "bpf_program__attach_tracepoint": (c_void_p, [c_void_p, c_char_p, c_char_p]),
    "bpf_map__name": (c_char_p, [c_void_p]),
    "bpf_map__fd": (c_int, [c_void_p]),
    "bpf_map__max_entries": (c_uint32, [c_void_p]),
    "bpf_map__set_max_entries": (c_int, [c_void_p, c_uint32]),
    "bpf_map__value_size": (c_uint32, [c_void_p]),
    "bpf_map__initial_value": (c_void_p, [c_void_p, ctypes.POINTER(c_size_t)]),
    "bpf_link__destroy": (c_int, [c_void_p]),
    "bpf_link_create": (c_int, [c_int, c_int, c_int, c_void_p]),
    "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
    "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, c_uint64]),
    "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
    "bpf_tc_hook_create": (c_int, [ctypes.POINTER(TcHook)]),
    "bpf_tc_hook_destroy": (c_int, [ctypes.POINTER(TcHook)]),
    "bpf_tc_attach": (c_int, [ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts)]),
    "bpf_tc_detach": (c_int, [ctypes.POINTER(TcHook), ctypes.POINTER(TcOpts)]),
    "bpf_prog_test_run_opts": (c_int, [c_int, ctypes.POINTER(TestRunOpts)]),
    "libbpf_num_possible_cpus": (c_int, []),
    "libbpf_probe_bpf_map_type": (c_int, [c_int, c_void_p]),
    "btf__load_vmlinux_btf": (c_void_p, []),
    "btf__find_by_name_kind": (c_int, [c_void_p, c_char_p, c_uint32]),
    "btf__free": (None, [c_void_p]),
}


def _load():
    name = os.environ.get("TLSTAP_LIBBPF") or ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as e:
        raise EnvironmentProblem(f"cannot load libbpf ({name}): {e}; install libbpf1") from None
    for fn, (res, args) in _SIGNATURES.items():
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    return lib


lib = _load()
libc = ctypes.CDLL(None, use_errno=True)
libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]


def err(what: str) -> str:
    """'what: strerror(errno)' for the errno libbpf left behind."""
    e = ctypes.get_errno()
    return f"{what}: {os.strerror(e) if e else 'failed'}"
