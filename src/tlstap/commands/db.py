"""`tlstap mysqld` and `tlstap postgres`: the queries a database server runs (eCapture's
mysqld and postgres modules), one line or JSON object each (audit/output.py)."""
from __future__ import annotations

import argparse
import os

from ..errors import UsageError
from ..sizes import RING_MAX, format_size, next_pow2, parse_size
from .capture import RING_DEFAULT

MYSQLD_DEFAULTS = ("/usr/sbin/mariadbd", "/usr/sbin/mysqld")
RING_MIN = 64 << 10


def _postgres_defaults() -> tuple[str, ...]:
    """Debian's layout: /usr/lib/postgresql/<major>/bin/postgres, the newest first."""
    root = "/usr/lib/postgresql"
    try:
        majors = sorted((d for d in os.listdir(root) if d.isdigit()), key=int, reverse=True)
    except OSError:
        majors = []
    return tuple(f"{root}/{m}/bin/postgres" for m in majors) or (f"{root}/<major>/bin/postgres",)


def _add_common(p: argparse.ArgumentParser, pid_help: str) -> None:
    g = p.add_argument_group("scope (applied in the kernel)")
    g.add_argument("-p", "--pid", type=int, help=pid_help)
    g.add_argument("-u", "--uid", type=int, help="only processes of this user id")
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=("text", "json"), default="text",
                   help="text: one line per query; json: one object per line")
    g.add_argument("-o", "--output", metavar="FILE", default="-",
                   help="write events here (created 0600; default stdout)")
    g.add_argument("--mapsize", metavar="SIZE", default=RING_DEFAULT,
                   help=f"ring buffer size, rounded up to a power of two (default {RING_DEFAULT})")


def add_parsers(sub) -> None:
    p = sub.add_parser("mysqld", help="audit the queries MariaDB's server runs",
                       description="Each command MariaDB's server (mariadbd) runs: query text, connection "
                                   "id, database, and whether it ended ok or with an error (and its code).")
    p.add_argument("--mysqld", metavar="PATH",
                   help=f"the server binary (default: --pid's executable, else {MYSQLD_DEFAULTS[0]})")
    _add_common(p, "only this server process")
    p.set_defaults(func=lambda a: run("mysqld", a))
    p = sub.add_parser("postgres", help="audit the queries PostgreSQL's backends run",
                       description="Each statement PostgreSQL's backends run (simple protocol: each query "
                                   "message; extended: each Execute, and a Parse or Bind that fails), with "
                                   "the backend pid, user, database, command tag and rows, or the SQLSTATE "
                                   "of its error.")
    p.add_argument("--postgres", metavar="PATH",
                   help="the server binary (default: --pid's executable, else Debian's newest "
                        "/usr/lib/postgresql/N/bin/postgres)")
    _add_common(p, "only this process and its descendants: the postmaster's pid covers the backend "
                   "it forks for each connection")
    p.set_defaults(func=lambda a: run("postgres", a))


def _config(args):
    from ..audit.dbsource import DB_QUERY_MAX
    from ..sources.base import CaptureConfig
    asked = parse_size(args.mapsize, "--mapsize", bare_unit=1024)
    mapsize = next_pow2(max(1, asked or 0))
    if mapsize < RING_MIN or mapsize > RING_MAX:
        raise UsageError(f"--mapsize {args.mapsize}: between {format_size(RING_MIN)} (a few query records of "
                         f"{format_size(DB_QUERY_MAX)}) and {format_size(RING_MAX)}")
    if args.pid is not None and (args.pid <= 0 or not os.path.exists(f"/proc/{args.pid}")):
        raise UsageError(f"--pid {args.pid}: no such process")
    if args.uid is not None and args.uid < 0:
        raise UsageError(f"--uid {args.uid}: not a user id")
    return CaptureConfig(pid=args.pid, uid=args.uid, mapsize=mapsize)


def run(command: str, args) -> int:
    """Check the flags, analyse the binary, then open the output (left as it was until the
    probes are attached) and hand over to the runner."""
    from .. import preflight, runner
    from ..audit.dbsource import server_path
    from ..audit.output import AuditOutput
    cfg = _config(args)
    if command == "mysqld":
        from ..audit.mysqld import MysqldAudit as Source
        path = server_path("--mysqld", args.mysqld, cfg.pid, MYSQLD_DEFAULTS)
    else:
        from ..audit.postgres import PostgresAudit as Source
        path = server_path("--postgres", args.postgres, cfg.pid, _postgres_defaults())
    source = Source(cfg, path)
    source.resolve()                 # a bad binary is refused before the output is opened
    preflight.check_all()
    scope = f"pid {cfg.pid}" if cfg.pid else "all processes"
    if cfg.pid and command == "postgres":
        scope += " and its children"
    if cfg.uid is not None:
        scope += f", uid {cfg.uid}"
    return runner.run([source], [lambda: AuditOutput(source, args.output, args.format, runner.status)],
                      cfg.pid, scope)
