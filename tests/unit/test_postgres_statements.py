"""audit/postgres.py's StatementTracker (sans-IO: the kernel's records in, events out) and
the SQLSTATE unpacking, on record sequences a backend produces."""
from __future__ import annotations

from tlstap.audit.postgres import StatementTracker, sqlstate


def make_sqlstate(s: str) -> int:
    """PostgreSQL's MAKE_SQLSTATE (utils/elog.h): six bits per character, the first lowest."""
    return sum(((ord(c) - ord("0")) & 0x3F) << (6 * i) for i, c in enumerate(s))


def test_sqlstate_round_trip():
    for s in ("42P01", "22012", "00000", "XX000", "57014"):
        assert sqlstate(make_sqlstate(s)) == s


def tracker():
    out = []
    t = StatementTracker(out.append)
    t.session(10, "alice", "shop")
    return t, out


def run(t, pid, msg, text):
    t.activity(pid, pid, 1000, "postgres", 0, msg, text, len(text.encode()) if text else 0)


def summary(out):
    return [(e.fields["message"], e.text, e.fields["status"], e.fields["tag"], e.fields["rows"],
             e.fields["sqlstate"]) for e in out]


def test_simple_query_ends_at_idle():
    t, out = tracker()
    run(t, 10, "Q", "INSERT INTO t VALUES (1)")
    t.end(10, "INSERT", 1)
    assert out == []                    # not before the backend is ready for the next query
    run(t, 10, "Q", None)
    assert summary(out) == [("query", "INSERT INTO t VALUES (1)", "ok", "INSERT", 1, None)]
    assert (out[0].fields["user"], out[0].fields["db"], out[0].pid) == ("alice", "shop", 10)


def test_extended_reports_execute_and_failures_of_parse_and_bind():
    t, out = tracker()
    for msg in "PBE":
        run(t, 10, msg, "SELECT $1")
    t.end(10, "SELECT", 1)
    run(t, 10, "B", "SELECT $1")
    run(t, 10, "E", "SELECT $1")        # a prepared statement executed again: Bind, Execute
    t.end(10, "SELECT", 1)
    run(t, 10, "S", None)
    run(t, 10, "P", "SELEC 1")
    t.error(10, "42601")
    run(t, 10, "S", None)
    assert summary(out) == [("execute", "SELECT $1", "ok", "SELECT", 1, None),
                            ("execute", "SELECT $1", "ok", "SELECT", 1, None),
                            ("parse", "SELEC 1", "error", None, None, "42601")]


def test_caught_error_then_completion_is_ok():
    """An error a PL/pgSQL handler caught is followed by the command's completion."""
    t, out = tracker()
    run(t, 10, "Q", "DO $$ BEGIN PERFORM 1/0; EXCEPTION WHEN others THEN NULL; END $$")
    t.error(10, "22012")
    t.end(10, "DO", 0)
    run(t, 10, "Q", None)
    assert summary(out)[0][2:] == ("ok", "DO", 0, None)


def test_backends_apart_and_unknown_messages_ignored():
    t, out = tracker()
    run(t, 10, "Q", "SELECT 10")
    run(t, 11, "Q", "SELECT 11")
    run(t, 12, "", "SELECT from a parallel worker")     # no frontend message: not a client's statement
    t.end(11, "SELECT", 1)
    run(t, 11, "Q", None)
    t.close_all()                                       # the capture ends: 10 told as it stands
    assert [(e.pid, e.text, e.fields["status"]) for e in out] == [(11, "SELECT 11", "ok"), (10, "SELECT 10", "ok")]


def test_cut_text_says_so():
    t, out = tracker()
    t.activity(10, 10, 0, "postgres", 0, "Q", "SELECT 'xx", 8192)
    t.activity(10, 10, 0, "postgres", 0, "Q", "SELECT 'x'", 10)
    run(t, 10, "Q", None)
    assert [e.fields.get("truncated") for e in out] == [True, None]


def test_sweep_tells_statements_of_exited_backends():
    t, out = tracker()
    run(t, 10, "Q", "SELECT pg_sleep(60)")
    t.error(10, "57P01")                 # FATAL: terminated; the backend exits, no idle report
    run(t, 11, "Q", "SELECT 11")
    t.sweep(lambda pid: pid != 10)
    assert [(e.pid, e.fields["status"], e.fields["sqlstate"]) for e in out] == [(10, "error", "57P01")]
    assert 10 not in t.sessions and 11 in t.open
