"""audit/dbsource.py must mirror bpf/dbaudit.h: structs against the BTF of the built objects,
#defines and enums against the header text (as test_abi.py does for abi.py and tlstap.h)."""
import ctypes
import os
import re

import pytest

from tlstap import abi
from tlstap.audit import dbsource

from .test_abi import _btf_structs, assert_mirrors

HEADER = os.path.join(os.path.dirname(__file__), "..", "..", "bpf", "dbaudit.h")


@pytest.fixture(scope="module")
def btf_structs():
    return {obj: _btf_structs(obj) for obj in ("mysqld.bpf.o", "postgres.bpf.o")}


@pytest.mark.parametrize("obj,cname,pytype", [
    ("mysqld.bpf.o", "mysqld_event", dbsource.MysqldEvent), ("mysqld.bpf.o", "mysqld_layout", dbsource.MysqldLayout),
    ("mysqld.bpf.o", "config", abi.Config),
    ("postgres.bpf.o", "pg_event", dbsource.PgEvent), ("postgres.bpf.o", "pg_activity", dbsource.PgActivity),
    ("postgres.bpf.o", "pg_layout", dbsource.PgLayout), ("postgres.bpf.o", "config", abi.Config)])
def test_struct_matches_btf(btf_structs, obj, cname, pytype):
    assert_mirrors(btf_structs[obj][cname], pytype)


def test_record_heads_match_ctypes():
    """The struct formats the sources decode with cover the C record heads exactly."""
    from tlstap.audit import mysqld, postgres
    assert mysqld._HEAD.size == dbsource.MysqldEvent.db.offset
    assert postgres._HEAD.size == ctypes.sizeof(dbsource.PgEvent)


def test_defines_and_enums_match():
    with open(HEADER) as f:
        text = f.read()
    defines = dict(re.findall(r"^#define (\w+) (0x[0-9a-fA-F]+|\d+)\b", text, re.M))
    assert {"DB_QUERY_MAX", "DB_NAME_MAX", "PG_TAG_MAX", "PG_ANCESTRY_MAX", "NO_OFF"} <= set(defines)
    for name, val in defines.items():
        assert getattr(dbsource, name) == int(val, 0), name
    body = re.search(r"enum db_counter \{(.*?)\};", text, re.S).group(1)
    names = re.findall(r"^\s*DCNT_(\w+) = (\d+)", body, re.M)
    assert names[-1][0] == "MAX"
    assert [(c.name, c.value) for c in dbsource.DbCounter] == [(n, int(v)) for n, v in names[:-1]]
    from tlstap.audit import mysqld, postgres
    kinds = dict(re.findall(r"(MYSQLD_\w+|PG_[A-Z]+) = (\d+)", text))
    assert {k: int(v) for k, v in kinds.items()} == {
        "MYSQLD_QUERY": mysqld.MYSQLD_QUERY, "MYSQLD_DONE": mysqld.MYSQLD_DONE,
        "PG_SESSION": postgres.PG_SESSION, "PG_ACTIVITY": postgres.PG_ACTIVITY, "PG_END": postgres.PG_END,
        "PG_ERROR": postgres.PG_ERROR}
