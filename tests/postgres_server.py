"""A throwaway PostgreSQL server for the tests, and a fresh database per test.

`fresh_database(case)` returns psycopg2 connection arguments for a new, empty
database, dropped when the test ends. The server behind it is started once
per test process (trial has no per-class set-up, and ``initdb`` costs about a
second), on a free port on 127.0.0.1 with its unix socket and data in a
temporary directory, durability off (``fsync=off``). It is stopped when the
process exits; it is also killed if the process dies without exiting cleanly
(parent-death signal), so no server outlives a test run.

PostgreSQL refuses to run as root. When the tests run as root (CI does), the
server runs as the ``postgres`` system user (the ``postgresql`` package
creates it), or as a system user created for the purpose if there is none.

Missing server binaries fail the test with what to install; they never skip it.
"""

from __future__ import annotations

import atexit
import ctypes
import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Final

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

# Where Debian's packages put the server binaries (not on PATH).
_BIN_GLOB: Final = "/usr/lib/postgresql/*/bin"
_FALLBACK_USER: Final = "synapse_repl_pg"
_START_TIMEOUT_S: Final = 30.0
_PR_SET_PDEATHSIG: Final = 1


class PostgresUnavailable(AssertionError):
    """The server binaries are missing or the server would not start."""


def find_bin_dir() -> str:
    """The directory holding ``initdb`` and ``postgres`` (the newest version)."""
    override = os.environ.get("SYNAPSE_REPLICATION_PG_BIN")
    candidates = [override] if override else []
    candidates += sorted(
        glob.glob(_BIN_GLOB), key=lambda d: int(d.split("/")[-2]), reverse=True
    )
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(os.path.dirname(on_path))
    for directory in candidates:
        if all(os.access(os.path.join(directory, b), os.X_OK) for b in ("initdb", "postgres")):
            return directory
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, postgres) not found in "
        f"{_BIN_GLOB} or on PATH: install the 'postgresql' package "
        "(scripts/test does it with apt-get), or set SYNAPSE_REPLICATION_PG_BIN"
    )


def _server_user() -> str | None:
    """The user to run the server as: None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", _FALLBACK_USER):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            pass
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", _FALLBACK_USER],
        check=True,
        capture_output=True,
    )
    return _FALLBACK_USER


def _die_with_parent() -> None:
    """In the server's process: be killed if the test process dies (runs
    after the switch of user, which would clear the setting)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresServer:
    """One running server; `stop` it (the module does at exit)."""

    def __init__(self) -> None:
        self._bin_dir = find_bin_dir()
        self._user = _server_user()
        self._dir = tempfile.mkdtemp(prefix="synrepl-pg-")
        self._data = os.path.join(self._dir, "data")
        self._log_path = os.path.join(self._dir, "server.log")
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._names = itertools.count(1)
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self._dir, entry.pw_uid, entry.pw_gid)
        os.chmod(self._dir, 0o700)

    def _run_kwargs(self) -> dict[str, Any]:
        if self._user is None:
            return {}
        return {"user": self._user, "group": pwd.getpwnam(self._user).pw_gid, "extra_groups": []}

    def start(self) -> None:
        result = subprocess.run(
            [
                os.path.join(self._bin_dir, "initdb"),
                "--pgdata", self._data,
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            check=False,
            cwd=self._dir,
            **self._run_kwargs(),
        )
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"initdb failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
            )
        last_error = ""
        # A port found free may be taken before the server binds it: retry.
        for _ in range(3):
            self.port = _free_port()
            if self._launch():
                return
            last_error = self._read_log()
        raise PostgresUnavailable(f"PostgreSQL did not start:\n{last_error}")

    def _launch(self) -> bool:
        log = open(self._log_path, "wb")  # noqa: SIM115 (the child keeps it)
        self._process = subprocess.Popen(
            [
                os.path.join(self._bin_dir, "postgres"),
                "-D", self._data,
                "-p", str(self.port),
                "-c", "listen_addresses=127.0.0.1",
                "-c", f"unix_socket_directories={self._dir}",
                "-c", "fsync=off",
                "-c", "synchronous_commit=off",
                "-c", "full_page_writes=off",
                "-c", "max_connections=200",
                "-c", "log_min_messages=warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self._dir,
            # Only async-signal-safe work (one prctl call) between fork and exec.
            preexec_fn=_die_with_parent,  # noqa: PLW1509
            **self._run_kwargs(),
        )
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                psycopg2.connect(**self.conn_args("postgres"), connect_timeout=2).close()
                return True
            except psycopg2.OperationalError:
                time.sleep(0.05)
        self._kill()
        return False

    def _read_log(self) -> str:
        try:
            with open(self._log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def conn_args(self, dbname: str) -> dict[str, Any]:
        """psycopg2 keyword arguments for database `dbname`."""
        return {"host": "127.0.0.1", "port": self.port, "user": "postgres", "dbname": dbname}

    def _admin(self, sql: str) -> None:
        conn = psycopg2.connect(**self.conn_args("postgres"))
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(sql)
        finally:
            conn.close()

    def create_database(self) -> str:
        """A new empty database's name."""
        name = f"test_{os.getpid()}_{next(self._names)}"
        self._admin(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _kill(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        """Fast shutdown (killed after 10 s), then remove the directory."""
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._kill()
        self._process = None
        shutil.rmtree(self._dir, ignore_errors=True)


_server: PostgresServer | None = None


def get_server() -> PostgresServer:
    """This process's server, started on first use."""
    global _server
    if _server is None:
        server = PostgresServer()
        try:
            server.start()
        except BaseException:
            server.stop()
            raise
        atexit.register(server.stop)
        _server = server
    return _server


def fresh_database(case: SynchronousTestCase) -> dict[str, Any]:
    """Connection arguments of a new, empty database, dropped after `case`
    (register this before anything that connects to it, so that cleanups,
    run last-registered first, close those connections before the drop)."""
    server = get_server()
    name = server.create_database()
    case.addCleanup(server.drop_database, name)
    return server.conn_args(name)


def terminate_backends(conn_args: dict[str, Any], application_name: str) -> int:
    """``pg_terminate_backend`` every session of `application_name` on the
    database of `conn_args`, as a crashed or restarted server would end them;
    how many. Blocking: call it from a thread or before the reactor runs."""
    conn = psycopg2.connect(**conn_args)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s AND datname = current_database()",
                (application_name,),
            )
            return len(cursor.fetchall())
    finally:
        conn.close()
