"""`tlstap postgres` against a private PostgreSQL server (tests/peers/postgres.py): `psql`
for the simple protocol, libpq's PQexecParams (Parse, Bind, Describe, Execute, Sync) for the
extended one. The captured text is what the client sent, the pid is pg_backend_pid() (libpq's
PQbackendPID), user and database are the connection's, the tag and rows are the command's,
and a failing statement carries the SQLSTATE the client was told. --pid of the postmaster
covers the backends it forks; JSON and text."""
from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import needs
from tests.peers import postgres
from tests.peers._common import wait_for

from .tap import run_tlstap
from .test_cli_errors import assert_one_line_error, dead_pid
from .test_mysqld_audit import AuditTap

pytestmark = needs(postgres.available(), "PostgreSQL is not installed (apt-get install postgresql "
                                         "postgresql-client)")


@pytest.fixture(scope="module")
def server():
    with postgres.Postgres() as pg:
        pg.psql("CREATE ROLE auditor LOGIN; CREATE DATABASE auditdb OWNER auditor;")
        _psql_as_auditor(pg, "CREATE TABLE t (a int PRIMARY KEY);")
        yield pg


def _psql_as_auditor(pg, sql: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", "-X", "-A", "-t", "-h", str(pg.dir), "-p", str(pg.PORT), "-U", "auditor",
                           "-d", "auditdb", *args], input=sql, capture_output=True, text=True, timeout=60)


def test_simple_protocol(server, tmp_path):
    sql = ("\\set VERBOSITY verbose\n"
           "SELECT pg_backend_pid();\n"
           "INSERT INTO t VALUES (1), (2);\n"
           "SELECT a FROM t WHERE a > 0 ORDER BY a;\n"
           "SELECT * FROM no_such_table;\n")
    with AuditTap(tmp_path, "postgres", "--pid", str(server.pid)) as tap:
        r = _psql_as_auditor(server, sql)
        # -c sends its statements as one Query message (psql splits what it reads)
        multi = _psql_as_auditor(server, "", "-c", "SELECT pg_backend_pid(); SELECT 2, 3")
    backend = int(r.stdout.split()[0])
    code = re.search(r"ERROR:  (\w{5}): relation", r.stderr).group(1)     # VERBOSITY verbose: the SQLSTATE
    ours = [e for e in tap.events("postgres") if e["pid"] == backend]
    got = [(e["protocol"], e["message"], e["text"], e["status"], e["tag"], e["rows"], e["sqlstate"]) for e in ours]
    assert got == [
        ("simple", "query", "SELECT pg_backend_pid();", "ok", "SELECT", 1, None),
        ("simple", "query", "INSERT INTO t VALUES (1), (2);", "ok", "INSERT", 2, None),
        ("simple", "query", "SELECT a FROM t WHERE a > 0 ORDER BY a;", "ok", "SELECT", 2, None),
        ("simple", "query", "SELECT * FROM no_such_table;", "error", None, None, code),
    ]
    # several statements in one message: one event, the last command's result
    backend2 = int(multi.stdout.split()[0])
    (e,) = [e for e in tap.events("postgres") if e["pid"] == backend2]
    assert (e["text"], e["status"], e["tag"], e["rows"]) == ("SELECT pg_backend_pid(); SELECT 2, 3", "ok", "SELECT", 1)
    ours.append(e)
    for e in ours:
        assert (e["user"], e["db"], e["comm"], e["tid"]) == ("auditor", "auditdb", "postgres", e["pid"])
    assert tap.summary()["lost"] == 0


def test_extended_protocol(server, tmp_path):
    with AuditTap(tmp_path, "postgres", "--pid", str(server.pid)) as tap:
        c = postgres.Libpq(server.conninfo.replace("dbname=postgres", "dbname=auditdb"))
        try:
            results = [c.exec_params("SELECT $1::int + 1", ["41"]),
                       c.exec_params("SELECT count(*) FROM t WHERE a >= $1", ["0"]),
                       c.exec_params("SELECT * FROM t WHERE a = $1", ["not a number"]),    # fails at Bind
                       c.exec_params("SELEC 1", [])]                                       # fails at Parse
        finally:
            c.close()
    assert results[0] == ("SELECT 1", None, "42")
    bind_error, parse_error = results[2][1], results[3][1]
    assert bind_error and parse_error
    ours = [e for e in tap.events("postgres") if e["pid"] == c.backend_pid]
    got = [(e["protocol"], e["message"], e["text"], e["status"], e["tag"], e["rows"], e["sqlstate"]) for e in ours]
    assert got == [
        ("extended", "execute", "SELECT $1::int + 1", "ok", "SELECT", 1, None),
        ("extended", "execute", "SELECT count(*) FROM t WHERE a >= $1", "ok", "SELECT", 1, None),
        ("extended", "bind", "SELECT * FROM t WHERE a = $1", "error", None, None, bind_error),
        ("extended", "parse", "SELEC 1", "error", None, None, parse_error),
    ]
    assert {(e["user"], e["db"]) for e in ours} == {("postgres", "auditdb")}


def test_long_query_is_cut_and_says_so(server, tmp_path):
    sql = f"SELECT '{'y' * 10000}' AS long_one;"
    with AuditTap(tmp_path, "postgres", "--pid", str(server.pid)) as tap:
        r = server.psql("SELECT pg_backend_pid();\n" + sql + "\n")
    backend = int(r.stdout.split()[0])
    e = [e for e in tap.events("postgres") if e["pid"] == backend][-1]
    assert (e["text"], e.get("truncated"), e["status"]) == (sql[:8191], True, "ok")


def test_session_started_before_the_capture(server, tmp_path):
    """A backend whose start the capture missed: user and database from its process title."""
    c = postgres.Libpq(server.conninfo.replace("dbname=postgres", "dbname=auditdb"))
    try:
        with AuditTap(tmp_path, "postgres", "--pid", str(server.pid)) as tap:
            c.exec_params("SELECT 'late'", [])
    finally:
        c.close()
    (e,) = [e for e in tap.events("postgres") if e["pid"] == c.backend_pid]
    assert (e["user"], e["db"], e["text"], e["status"]) == ("postgres", "auditdb", "SELECT 'late'", "ok")


def test_terminated_backend(server, tmp_path):
    """A statement whose backend is terminated (FATAL 57P01, no idle report) is told while
    the capture runs, once the backend has exited."""
    with AuditTap(tmp_path, "postgres", "--pid", str(server.pid)) as tap:
        victim = subprocess.Popen(["psql", "-X", "-A", "-t", "-h", str(server.dir), "-p", str(server.PORT),
                                   "-U", "postgres", "-c", "SELECT 'victim', pg_sleep(60)"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        victims = "FROM pg_stat_activity WHERE query LIKE 'SELECT ''victim''%' AND pid <> pg_backend_pid()"
        try:
            wait_for(lambda: server.psql(f"SELECT count(*) {victims};").stdout.split() == ["1"], 20,
                     "the victim's statement to run")
            r = server.psql(f"SELECT pg_terminate_backend(pid) {victims};")
            assert r.stdout.split() == ["t"], r.stdout        # the victim was running and is gone
            _out, err = victim.communicate(timeout=30)
        finally:
            victim.kill()
            victim.wait()
        tap.wait_events(lambda recs: any(x.get("text", "").startswith("SELECT 'victim'") for x in recs))
    (e,) = [e for e in tap.events("postgres") if e["text"] == "SELECT 'victim', pg_sleep(60)"]
    assert (e["status"], e["sqlstate"]) == ("error", "57P01"), err


def test_text_format(server, tmp_path):
    with AuditTap(tmp_path, "postgres", "--pid", str(server.pid), fmt="text") as tap:
        r = server.psql("SELECT pg_backend_pid();\nSELECT 1/0;\n", check=False)
    backend = int(r.stdout.split()[0])
    lines = [ln for ln in tap.lines() if f" pid={backend} " in ln]
    assert len(lines) == 2, tap.lines()
    assert lines[0].endswith("comm=postgres user=postgres db=postgres protocol=simple message=query status=ok "
                             "tag=SELECT rows=1: SELECT pg_backend_pid();"), lines[0]
    assert lines[1].endswith("protocol=simple message=query status=error sqlstate=22012: SELECT 1/0;"), lines[1]


def test_pid_of_postmaster_covers_backends_only(server, tmp_path):
    """--pid P: P's children (each connection's backend) are in scope, other processes not."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        with AuditTap(tmp_path, "postgres", "--pid", str(other.pid), "--postgres",
                      f"{server.bin}/postgres") as wrong, \
                AuditTap(tmp_path, "postgres", "--uid", "4242") as wrong_uid, \
                AuditTap(tmp_path, "postgres", "--pid", str(server.pid)) as right:
            r = server.psql("SELECT pg_backend_pid();\n")
    finally:
        other.kill()
        other.wait()
    backend = int(r.stdout.split()[0])
    assert backend != server.pid
    assert [e["text"] for e in right.events("postgres") if e["pid"] == backend] == ["SELECT pg_backend_pid();"]
    assert wrong.events("postgres") == [] and wrong_uid.events("postgres") == []
    assert wrong.summary()["events"] == 0 and wrong_uid.summary()["events"] == 0


def test_refused():
    assert_one_line_error(run_tlstap("postgres", "--postgres", "/bin/ls"), "/bin/ls", "PostgresMain")
    pid = dead_pid()
    assert_one_line_error(run_tlstap("postgres", "--pid", str(pid)), f"--pid {pid}", "no such process")
    assert_one_line_error(run_tlstap("postgres", "-o", "/nonexistent-dir/out"), "/nonexistent-dir/out")
