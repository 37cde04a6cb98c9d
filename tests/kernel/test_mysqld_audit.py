"""`tlstap mysqld` against a private MariaDB server (tests/peers/mariadb.py) and the real
`mariadb` client: the captured text is what the client sent, the connection id is what the
server says CONNECTION_ID() is, the database follows USE, a failing statement carries the
error code the client was told; --pid/--uid scope in the kernel; JSON and text."""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import time

import pytest

from tests.conftest import needs
from tests.peers import mariadb
from tests.peers._common import wait_for

from .tap import Tap, run_tlstap, tlstap_exe
from .test_cli_errors import assert_one_line_error, dead_pid

pytestmark = needs(mariadb.available(), "MariaDB is not installed (apt-get install mariadb-server mariadb-client)")


class AuditTap(Tap):
    """`tlstap COMMAND --format FMT -o FILE ARGS...` in the background (see Tap)."""

    def __init__(self, tmp_path, command: str, *args: str, fmt: str = "json"):
        out = str(tmp_path / f"{command}-{time.monotonic_ns()}.{'jsonl' if fmt == 'json' else 'txt'}")
        self._setup(out, [tlstap_exe(), command, "--format", fmt, "-o", out, *args])

    def events(self, kind: str) -> list[dict]:
        return [r for r in self.records() if r["type"] == kind]

    def lines(self) -> list[str]:
        with open(self.out) as f:
            return f.read().splitlines()

    def wait_events(self, pred, timeout: float = 20) -> None:
        """Until pred(records) holds. A MariaDB command's event is written once dispatch_command
        has returned, which may be just after the client has its reply."""
        def ready():
            try:
                return pred(self.records())
            except (OSError, json.JSONDecodeError):    # a line being written
                return False
        wait_for(ready, timeout, "the expected events in tlstap's output")


@pytest.fixture(scope="module")
def server():
    with mariadb.MariaDB() as m:
        m.client("CREATE DATABASE tlstap_a; CREATE DATABASE tlstap_b; "
                 "CREATE TABLE tlstap_a.t (a INT PRIMARY KEY);")
        yield m


def _connection_id(out: str) -> int:
    return int(out.split()[0])


def test_queries_ids_database_and_errors(server, tmp_path):
    marker = f"m{time.monotonic_ns()}"
    sql = (f"SELECT CONNECTION_ID();\n"
           f"INSERT INTO t VALUES (1), (2);\n"
           f"SELECT '{marker}', a FROM t ORDER BY a;\n"
           f"USE tlstap_b;\n"
           f"SELECT '{marker}' AS again;\n"
           f"INSERT INTO tlstap_a.t VALUES (1);\n")
    with AuditTap(tmp_path, "mysqld", "--pid", str(server.pid)) as tap:
        r = server.client(sql, db="tlstap_a", check=False)
        tap.wait_events(lambda recs: any(x["text"].startswith("INSERT INTO tlstap_a.t") for x in recs))
    conn = _connection_id(r.stdout)
    m = re.search(r"ERROR (\d+) \(", r.stderr)
    assert m, r.stderr                                   # the duplicate key the client was told of
    ours = [e for e in tap.events("mysqld") if e["conn_id"] == conn]
    got = [(e["command"], e["db"], e["text"], e["status"], e["errno"]) for e in ours
           if e["text"] != "SELECT DATABASE()"]          # the client asks before its USE
    assert got == [
        ("query", "tlstap_a", "SELECT CONNECTION_ID()", "ok", None),
        ("query", "tlstap_a", "INSERT INTO t VALUES (1), (2)", "ok", None),
        ("query", "tlstap_a", f"SELECT '{marker}', a FROM t ORDER BY a", "ok", None),
        ("init_db", "tlstap_a", "tlstap_b", "ok", None),
        ("query", "tlstap_b", f"SELECT '{marker}' AS again", "ok", None),
        ("query", "tlstap_b", "INSERT INTO tlstap_a.t VALUES (1)", "error", int(m.group(1))),
    ]
    for e in ours:
        assert e["pid"] == server.pid and e["comm"] == "mariadbd"
    assert tap.summary()["lost"] == 0


def test_prepare(server, tmp_path):
    """COM_STMT_PREPARE (libmariadb's mysql_stmt_prepare): its text, and a failing one's error."""
    with AuditTap(tmp_path, "mysqld", "--pid", str(server.pid)) as tap:
        c = mariadb.LibMariaDB(server.socket, db="tlstap_a")
        try:
            ok, bad = c.prepare("SELECT a FROM t WHERE a = ?"), c.prepare("SELECT nope FROM t WHERE a = ?")
        finally:
            c.close()
        tap.wait_events(lambda recs: any(x.get("text") == "SELECT nope FROM t WHERE a = ?" for x in recs))
    assert ok == 0 and bad
    got = [(e["command"], e["db"], e["text"], e["status"], e["errno"]) for e in tap.events("mysqld")
           if e["conn_id"] == c.connection_id]
    assert got == [("prepare", "tlstap_a", "SELECT a FROM t WHERE a = ?", "ok", None),
                   ("prepare", "tlstap_a", "SELECT nope FROM t WHERE a = ?", "error", bad)]


def test_long_query_is_cut_and_says_so(server, tmp_path):
    body = "x" * 10000
    sql = f"SELECT '{body}' AS long_one;\n"
    with AuditTap(tmp_path, "mysqld", "--pid", str(server.pid)) as tap:
        server.client(sql)
        tap.wait_events(lambda recs: any("long_one" in x.get("text", "") or x.get("truncated_from") for x in recs))
    (e,) = [e for e in tap.events("mysqld") if e.get("truncated_from")]
    sent = sql.rstrip(";\n")
    assert e["truncated_from"] == len(sent)
    assert e["text"] == sent[:8192]


def test_text_format(server, tmp_path):
    with AuditTap(tmp_path, "mysqld", "--pid", str(server.pid), fmt="text") as tap:
        r = server.client("SELECT CONNECTION_ID();\nSELECT * FROM no_such_table;\n", db="tlstap_a", check=False)
        wait_for(lambda: any("no_such_table" in ln for ln in tap.lines()), 20, "the failing query's line")
    conn = _connection_id(r.stdout)
    lines = [ln for ln in tap.lines() if f"conn_id={conn} " in ln]
    assert lines[0].endswith(f"comm=mariadbd conn_id={conn} db=tlstap_a command=query status=ok: "
                             f"SELECT CONNECTION_ID()"), lines
    assert lines[-1].endswith(f"conn_id={conn} db=tlstap_a command=query status=error errno=1146: "
                              f"SELECT * FROM no_such_table"), lines
    assert re.match(rf"\d{{4}}-\d\d-\d\dT[\d:.]+Z mysqld pid={server.pid} uid=0 ", lines[0]), lines[0]
    assert stat.S_IMODE(os.stat(tap.out).st_mode) == 0o600


def test_losses_are_told(server, tmp_path):
    """With the reader stopped, a 64K ring holds about 12 of these 20 query records: the rest
    are counted, told on stderr and written as `lost` records; what is written is what was sent,
    in order."""
    sent = [f"SELECT {i} AS n{i}, '{'z' * 5000}'" for i in range(20)]
    with AuditTap(tmp_path, "mysqld", "--pid", str(server.pid), "--mapsize", "64K") as tap:
        tap.proc.send_signal(signal.SIGSTOP)
        try:
            server.client("".join(f"{q};\n" for q in sent))
        finally:
            tap.proc.send_signal(signal.SIGCONT)
        tap.wait_line(r"lost \d+ events", 20)
    recs = tap.records()
    lost = sum(r["records"] for r in recs if r["type"] == "lost")
    assert lost > 0 and lost == tap.summary()["lost"]
    assert re.search(r"lost \d+ events: ring buffer full", tap.stderr)
    got = [r["text"] for r in recs if r["type"] == "mysqld" and r["text"] in sent]
    assert got and got == [q for q in sent if q in got]


def test_scope_pid_and_uid(server, tmp_path):
    """Scoped to another process or user, nothing of the server's is written; the same queries
    reach a capture scoped to the server (which is running at the same time)."""
    other = subprocess.Popen(["sleep", "60"])
    try:
        with AuditTap(tmp_path, "mysqld", "--pid", str(other.pid), "--mysqld", mariadb.MARIADBD) as wrong_pid, \
                AuditTap(tmp_path, "mysqld", "--uid", "4242") as wrong_uid, \
                AuditTap(tmp_path, "mysqld", "--pid", str(server.pid), "--uid", "0") as right:
            server.client("SELECT 'scope check';\n")
            right.wait_events(lambda recs: any(x.get("text") == "SELECT 'scope check'" for x in recs))
    finally:
        other.kill()
        other.wait()
    assert wrong_pid.events("mysqld") == [] and wrong_uid.events("mysqld") == []
    assert wrong_pid.summary()["events"] == 0 and wrong_uid.summary()["events"] == 0


# ---- refused commands: one line, the output file as it was --------------------------------

def test_not_mariadb():
    assert_one_line_error(run_tlstap("mysqld", "--mysqld", "/bin/ls"), "/bin/ls", "dispatch_command")
    assert_one_line_error(run_tlstap("mysqld", "--mysqld", "/etc/hostname"), "/etc/hostname", "not an ELF")
    assert_one_line_error(run_tlstap("mysqld", "--mysqld", "/nonexistent/mariadbd"), "/nonexistent/mariadbd")


def test_bad_pid_and_output(tmp_path):
    pid = dead_pid()
    assert_one_line_error(run_tlstap("mysqld", "--pid", str(pid)), f"--pid {pid}", "no such process")
    assert_one_line_error(run_tlstap("mysqld", "-o", str(tmp_path / "nodir" / "out")), "nodir/out")


@pytest.mark.parametrize("how", ["not-mariadb", "unloadable-object"])
def test_refused_command_leaves_output_as_it_was(tmp_path, how):
    out = tmp_path / "user.out"
    out.write_bytes(b"the user's file\n")
    out.chmod(0o644)
    os.utime(out, ns=(1_600_000_000_000_000_000,) * 2)
    before = (out.read_bytes(), out.stat().st_mode, out.stat().st_mtime_ns)
    env = dict(os.environ)
    argv = [tlstap_exe(), "mysqld", "-o", str(out)]
    if how == "not-mariadb":
        argv += ["--mysqld", "/bin/ls"]
    else:        # refused after the output was opened: the BPF object is cut short
        from tlstap.sources.base import bpf_object_path
        bpf = tmp_path / "bpf"
        bpf.mkdir()
        (bpf / "mysqld.bpf.o").write_bytes(open(bpf_object_path("mysqld.bpf.o"), "rb").read()[:2000])
        env["TLSTAP_BPF_DIR"] = str(bpf)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert_one_line_error(r)
    assert (out.read_bytes(), out.stat().st_mode, out.stat().st_mtime_ns) == before
    assert sorted(os.listdir(tmp_path)) == sorted(["user.out"] + (["bpf"] if how != "not-mariadb" else []))
