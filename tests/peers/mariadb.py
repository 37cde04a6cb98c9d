"""A private MariaDB server for the mysqld audit tests: its own datadir and unix socket in a
temporary directory, no TCP, started from mariadbd directly (never the system's service) and
always stopped. Clients: the real `mariadb` command line client."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ._common import stop_process, tail, wait_for

MARIADBD = "/usr/sbin/mariadbd"


def available() -> bool:
    return os.path.exists(MARIADBD) and bool(shutil.which("mariadb-install-db")) and bool(shutil.which("mariadb"))


class MariaDB:
    """`with MariaDB() as m: m.query("SELECT 1")`; m.pid is mariadbd's."""

    def __init__(self, start_timeout: float = 60):
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "MariaDB":
        self._tmp = tempfile.TemporaryDirectory(prefix="tlstap-db-mariadb-")
        d = Path(self._tmp.name)
        self.datadir, self.socket, self.log = d / "data", d / "mysqld.sock", d / "error.log"
        # root runs the server (--user=root): the datadir lives in root's temporary directory
        common = ["--no-defaults", f"--datadir={self.datadir}", "--user=root"]
        r = subprocess.run(["mariadb-install-db", *common, "--auth-root-authentication-method=socket",
                            "--skip-test-db"], capture_output=True, text=True, timeout=120)
        if r.returncode:
            self._tmp.cleanup()
            raise RuntimeError(f"mariadb-install-db failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
        self.proc = subprocess.Popen([MARIADBD, *common, f"--socket={self.socket}", "--skip-networking",
                                      f"--pid-file={d / 'mysqld.pid'}", f"--log-error={self.log}",
                                      "--innodb-buffer-pool-size=16M", "--skip-log-bin",
                                      "--performance-schema=OFF"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        try:
            wait_for(lambda: self.proc.poll() is not None or self._pings(), self.start_timeout, "mariadbd to start")
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited: {tail(self.log)}")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _pings(self) -> bool:
        return subprocess.run(["mariadb-admin", f"--socket={self.socket}", "-uroot", "ping"],
                              capture_output=True, timeout=10).returncode == 0

    def client(self, sql: str, db: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        """Run `mariadb` (batch mode, no column names) with the statements `sql` on stdin."""
        argv = ["mariadb", f"--socket={self.socket}", "-uroot", "--batch", "--skip-column-names"]
        r = subprocess.run([*argv, *([db] if db else [])], input=sql, capture_output=True, text=True, timeout=60)
        if check and r.returncode:
            raise RuntimeError(f"mariadb failed ({r.returncode}): {r.stderr}")
        return r

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)
        self._tmp.cleanup()


class LibMariaDB:
    """The binary protocol's prepare through MariaDB's client library itself (libmariadb.so.3,
    through ctypes): mysql_stmt_prepare sends COM_STMT_PREPARE. One connection; close() ends it."""

    def __init__(self, socket: Path, db: str | None = None):
        self.lib = lib = ctypes.CDLL("libmariadb.so.3")
        lib.mysql_init.restype = ctypes.c_void_p
        lib.mysql_init.argtypes = [ctypes.c_void_p]
        lib.mysql_real_connect.restype = ctypes.c_void_p
        lib.mysql_real_connect.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                           ctypes.c_char_p, ctypes.c_uint, ctypes.c_char_p, ctypes.c_ulong]
        lib.mysql_error.restype = ctypes.c_char_p
        lib.mysql_error.argtypes = [ctypes.c_void_p]
        lib.mysql_thread_id.restype = ctypes.c_ulong
        lib.mysql_thread_id.argtypes = [ctypes.c_void_p]
        lib.mysql_close.argtypes = [ctypes.c_void_p]
        lib.mysql_stmt_init.restype = ctypes.c_void_p
        lib.mysql_stmt_init.argtypes = [ctypes.c_void_p]
        lib.mysql_stmt_prepare.restype = ctypes.c_int
        lib.mysql_stmt_prepare.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong]
        lib.mysql_stmt_errno.restype = ctypes.c_uint
        lib.mysql_stmt_errno.argtypes = [ctypes.c_void_p]
        lib.mysql_stmt_close.argtypes = [ctypes.c_void_p]
        self.conn = lib.mysql_init(None)
        if not lib.mysql_real_connect(self.conn, None, b"root", None, db.encode() if db else None, 0,
                                      str(socket).encode(), 0):
            err = lib.mysql_error(self.conn).decode()
            lib.mysql_close(self.conn)
            raise RuntimeError(f"libmariadb connect: {err}")
        self.connection_id = lib.mysql_thread_id(self.conn)

    def prepare(self, sql: str) -> int:
        """COM_STMT_PREPARE of `sql`; the error number (0: prepared)."""
        stmt = self.lib.mysql_stmt_init(self.conn)
        try:
            q = sql.encode()
            return self.lib.mysql_stmt_errno(stmt) if self.lib.mysql_stmt_prepare(stmt, q, len(q)) else 0
        finally:
            self.lib.mysql_stmt_close(stmt)

    def close(self) -> None:
        self.lib.mysql_close(self.conn)
