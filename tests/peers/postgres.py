"""A private PostgreSQL server for the postgres audit tests: initdb into a temporary
directory, the postmaster started from the postgres binary directly as the postgres user,
listening only on a unix socket in that directory (no TCP), always stopped. Clients: `psql`
and libpq itself (extended protocol: PQexecParams, through ctypes)."""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from ._common import stop_process, tail, wait_for


def bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    return os.path.dirname(found[-1]) if found else None


def available() -> bool:
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return False
    return bindir() is not None and bool(shutil.which("psql")) and ctypes.util.find_library("pq") is not None


class Postgres:
    """`with Postgres() as pg: pg.psql("SELECT 1")`; pg.pid is the postmaster's."""

    PORT = 5432      # only names the socket file, in our own directory

    def __init__(self, start_timeout: float = 60):
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "Postgres":
        self._tmp = tempfile.TemporaryDirectory(prefix="tlstap-db-pg-")
        d = self.dir = Path(self._tmp.name)
        pw = pwd.getpwnam("postgres")
        os.chown(d, pw.pw_uid, pw.pw_gid)
        self.data, self.log = d / "data", d / "server.log"
        self.bin = bindir()
        as_pg = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "cwd": d}
        r = subprocess.run([f"{self.bin}/initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres",
                            "--no-sync", "-E", "UTF8", "--locale=C"], capture_output=True, text=True,
                           timeout=120, **as_pg)
        if r.returncode:
            self._tmp.cleanup()
            raise RuntimeError(f"initdb failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        with open(self.log, "wb") as log:
            os.chown(self.log, pw.pw_uid, pw.pw_gid)
            self.proc = subprocess.Popen([f"{self.bin}/postgres", "-D", str(self.data), "-k", str(d), "-p",
                                          str(self.PORT), "-c", "listen_addresses=", "-c", "fsync=off",
                                          "-c", "shared_buffers=16MB", "-c", "max_connections=20"],
                                         stdout=log, stderr=log, **as_pg)
        self.pid = self.proc.pid
        try:
            wait_for(lambda: self.proc.poll() is not None or self._ready(), self.start_timeout, "postgres to start")
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {tail(self.log)}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _ready(self) -> bool:
        return subprocess.run([f"{self.bin}/pg_isready", "-h", str(self.dir), "-p", str(self.PORT)],
                              capture_output=True, timeout=10).returncode == 0

    @property
    def conninfo(self) -> str:
        return f"host={self.dir} port={self.PORT} user=postgres dbname=postgres"

    def psql(self, sql: str, db: str = "postgres", check: bool = True) -> subprocess.CompletedProcess:
        """Run `psql` with the statements `sql` on stdin: unaligned, tuples only."""
        r = subprocess.run(["psql", "-X", "-A", "-t", "-h", str(self.dir), "-p", str(self.PORT), "-U", "postgres",
                            "-d", db], input=sql, capture_output=True, text=True, timeout=60)
        if check and r.returncode:
            raise RuntimeError(f"psql failed ({r.returncode}): {r.stderr}")
        return r

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)     # SIGTERM: smart shutdown, backends included
        self._tmp.cleanup()


class Libpq:
    """The extended query protocol through libpq itself: PQexecParams sends Parse, Bind,
    Describe, Execute, Sync. One connection; close() ends it."""

    def __init__(self, conninfo: str):
        self.lib = lib = ctypes.CDLL(ctypes.util.find_library("pq"))
        lib.PQconnectdb.restype = ctypes.c_void_p
        lib.PQconnectdb.argtypes = [ctypes.c_char_p]
        for f, res in (("PQstatus", ctypes.c_int), ("PQbackendPID", ctypes.c_int),
                       ("PQerrorMessage", ctypes.c_char_p), ("PQfinish", None)):
            getattr(lib, f).restype = res
            getattr(lib, f).argtypes = [ctypes.c_void_p]
        lib.PQexecParams.restype = ctypes.c_void_p
        lib.PQexecParams.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p,
                                     ctypes.POINTER(ctypes.c_char_p), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        for f, res, args in (("PQresultStatus", ctypes.c_int, [ctypes.c_void_p]),
                             ("PQresultErrorField", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int]),
                             ("PQcmdStatus", ctypes.c_char_p, [ctypes.c_void_p]),
                             ("PQgetvalue", ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]),
                             ("PQclear", None, [ctypes.c_void_p])):
            getattr(lib, f).restype = res
            getattr(lib, f).argtypes = args
        self.conn = lib.PQconnectdb(conninfo.encode())
        if lib.PQstatus(self.conn) != 0:
            msg = lib.PQerrorMessage(self.conn).decode()
            lib.PQfinish(self.conn)
            raise RuntimeError(f"libpq connect: {msg}")
        self.backend_pid = lib.PQbackendPID(self.conn)

    def exec_params(self, sql: str, params: list[str]) -> tuple[str, str | None, str | None]:
        """(command status, SQLSTATE or None, first value or None) of one PQexecParams."""
        lib = self.lib
        arr = (ctypes.c_char_p * len(params))(*[p.encode() for p in params])
        res = lib.PQexecParams(self.conn, sql.encode(), len(params), None, arr, None, None, 0)
        try:
            state = lib.PQresultErrorField(res, ord("C"))
            status = lib.PQcmdStatus(res).decode()
            value = lib.PQgetvalue(res, 0, 0) if lib.PQresultStatus(res) == 2 else None   # PGRES_TUPLES_OK
            return status, state.decode() if state else None, value.decode() if value is not None else None
        finally:
            lib.PQclear(res)

    def close(self) -> None:
        self.lib.PQfinish(self.conn)
