# -*- test-case-name: tests.storage.test_database -*-
"""An async wrapper over `adbapi.ConnectionPool`: no query ever runs on the
reactor thread.

Every piece of database work is a function of a `Cursor`, run inside one
transaction in the pool's thread by `Database.run_interaction`: it commits if
the function returns and rolls back if it raises, so a caller sees all of its
writes or none of them.

SQL is written once, with ``?`` placeholders; the few differences between
database engines (placeholder style, how to connect, how a transaction starts,
how to ask whether a table exists) live in one `Engine` value, so PostgreSQL
(`storage.postgres`, `Database.postgres`) goes through this same class.

Booleans: columns declared BOOLEAN are written from Python bools and read back
as the engine returns them, ``0``/``1`` from SQLite and ``false``/``true``
from PostgreSQL. Stream rows deliberately carry them as read, as Synapse does.
"""

from __future__ import annotations

import importlib
import pathlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Concatenate, Final, ParamSpec, Protocol, TypeVar

import attrs
from twisted.enterprise import adbapi
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorCore
from twisted.logger import Logger
from twisted.python.failure import Failure

P = ParamSpec("P")
T = TypeVar("T")

log: Final = Logger()


def _sqlite_on_connect(conn: sqlite3.Connection) -> None:
    # WAL lets readers in other processes (a worker reading the writer's file)
    # run while the writer commits; NORMAL is durable across application
    # crashes in WAL mode and only risks the last commits on power loss.
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")


@attrs.frozen
class Engine:
    """What differs between database engines, and nothing else.

    - `dbapi_module`, `connect_kwargs`, `on_connect`: how the pool connects.
    - `placeholder`: the driver's parameter marker; SQL in this package is
      written with ``?`` and converted when the driver wants something else.
    - `begin_sql`: run at the start of every interaction when the driver does
      not open transactions by itself (SQLite is connected in autocommit mode,
      so that reads and DDL are inside the transaction too).
    - `table_exists_sql`: a query with one parameter, the table name, that
      returns a row if the table exists.
    - `bigint_primary_key`: the column type of a 64-bit integer primary key.
    """

    name: str
    dbapi_module: str
    connect_kwargs: dict[str, Any]
    on_connect: Callable[[Any], None] | None
    placeholder: str
    begin_sql: str | None
    table_exists_sql: str
    bigint_primary_key: str

    def convert_sql(self, sql: str) -> str:
        """`sql` written with ``?`` placeholders, in this driver's style.

        SQL in this package never has a literal ``?`` in a string constant.
        """
        if self.placeholder == "?":
            return sql
        if self.placeholder == "%s":
            # pyformat drivers (psycopg2) read every ``%`` as a marker.
            sql = sql.replace("%", "%%")
        return sql.replace("?", self.placeholder)


def sqlite_engine() -> Engine:
    """SQLite through the standard library's `sqlite3`.

    One connection, used from the pool's one thread (and closed from the
    reactor thread, hence ``check_same_thread=False``); ``isolation_level=None``
    turns off the module's implicit transactions so `begin_sql` controls them.
    """
    return Engine(
        name="sqlite3",
        dbapi_module="sqlite3",
        connect_kwargs={"check_same_thread": False, "isolation_level": None},
        on_connect=_sqlite_on_connect,
        placeholder="?",
        # IMMEDIATE takes the write lock at the start, so a transaction that
        # reads and then writes cannot fail half-way on a busy database.
        begin_sql="BEGIN IMMEDIATE",
        table_exists_sql=(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        ),
        bigint_primary_key="INTEGER PRIMARY KEY",
    )


def sqlite_reader_engine() -> Engine:
    """SQLite, read-only: for a process that follows another one's file.

    The file is opened through a ``mode=ro`` URI, so no statement can write
    to it, and transactions start with a deferred ``BEGIN``, which never asks
    for the write lock (``BEGIN IMMEDIATE`` asks for it at once; current
    SQLite skips that on a read-only connection, but the writer's commits
    must not depend on it). No pragma is set: the writer has put the file in
    WAL mode, which lets this reader read a consistent snapshot while the
    writer commits.
    """
    return attrs.evolve(
        sqlite_engine(),
        connect_kwargs={"check_same_thread": False, "isolation_level": None, "uri": True},
        on_connect=None,
        begin_sql="BEGIN",
    )


def _cancel_after(inner: Deferred[T]) -> Deferred[T]:
    """`inner`'s result; if cancelled, a CancelledError that only arrives once
    `inner` has fired.

    A transaction runs to its end in the pool's thread even when its caller is
    cancelled. A caller holding stream ids must not give them back while the
    transaction may still commit rows at them, so it only hears of the
    cancellation once the transaction is over.
    """

    def cancel(outer: Deferred[T]) -> None:
        outer.pause()
        outer.errback(CancelledError())

    outer: Deferred[T] = Deferred(cancel)

    def on_result(result: T) -> None:
        if outer.called:
            outer.unpause()
        else:
            outer.callback(result)

    def on_failure(failure: Failure) -> None:
        if outer.called:
            log.failure("Interaction failed after its caller was cancelled", failure)
            outer.unpause()
        else:
            outer.errback(failure)

    inner.addCallbacks(on_result, on_failure)
    return outer


class Cursor:
    """The cursor an interaction function receives, for ``?``-style SQL.

    It only exists inside `Database.run_interaction`; keeping a reference and
    using it afterwards is an error.
    """

    def __init__(self, txn: Any, engine: Engine) -> None:
        self._txn = txn
        self.engine = engine

    def execute(self, sql: str, args: Sequence[Any] = ()) -> None:
        self._txn.execute(self.engine.convert_sql(sql), tuple(args))

    def execute_many(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self._txn.executemany(self.engine.convert_sql(sql), [tuple(r) for r in rows])

    def fetchall(self) -> list[tuple[Any, ...]]:
        rows = self._txn.fetchall()
        # Our drivers give a list of tuples (sqlite3 without a row factory,
        # psycopg2's default cursor): no copy, which would cost a catch-up
        # about 2% of its time. A driver's rows are all of one type.
        if type(rows) is list and (not rows or type(rows[0]) is tuple):
            return rows
        return [tuple(row) for row in rows]

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self._txn.fetchone()
        return None if row is None else tuple(row)

    @property
    def has_result_set(self) -> bool:
        """True if the last statement returned rows (possibly zero of them)."""
        return self._txn.description is not None

    @property
    def rowcount(self) -> int:
        count: int = self._txn.rowcount
        return count


class _Runner(Protocol):
    """Runs ``interaction(txn)`` as one transaction; commits or rolls back."""

    def run(self, interaction: Callable[[Any], T]) -> Deferred[T]: ...

    def close(self) -> None: ...


class _PoolRunner:
    """Transactions in an `adbapi.ConnectionPool`'s threads.

    With `reconnect`, a connection whose transaction failed and that no
    longer answers (its server process was terminated, the server restarted)
    is dropped from the pool, and the next transaction of that thread opens a
    new one; without it, a dead connection would fail every later
    transaction of its thread. The transaction that met the dead connection
    still fails: it may or may not have committed, so it is not retried.
    """

    def __init__(
        self,
        engine: Engine,
        reactor: IReactorCore,
        connect_args: Sequence[Any],
        pool_size: int,
        reconnect: bool = False,
    ) -> None:
        self._pool = adbapi.ConnectionPool(  # type: ignore[no-untyped-call]  # adbapi is unannotated
            engine.dbapi_module,
            *connect_args,
            cp_min=pool_size,
            cp_max=pool_size,
            cp_openfun=engine.on_connect,
            cp_reactor=reactor,
            cp_noisy=False,
            cp_reconnect=reconnect,
            **engine.connect_kwargs,
        )

    def run(self, interaction: Callable[[Any], T]) -> Deferred[T]:
        d: Deferred[T] = self._pool.runInteraction(  # type: ignore[no-untyped-call]  # adbapi is unannotated
            interaction
        )
        return d

    def close(self) -> None:
        self._pool.close()  # type: ignore[no-untyped-call]  # adbapi is unannotated


class _InlineRunner:
    """Transactions run at once in the calling thread, on one connection."""

    def __init__(self, engine: Engine, connect_args: Sequence[Any]) -> None:
        module = importlib.import_module(engine.dbapi_module)
        self._conn = module.connect(*connect_args, **engine.connect_kwargs)
        if engine.on_connect is not None:
            engine.on_connect(self._conn)

    def run(self, interaction: Callable[[Any], T]) -> Deferred[T]:
        cursor = self._conn.cursor()
        try:
            result = interaction(cursor)
            self._conn.commit()
        except BaseException:
            self._conn.rollback()
            return fail()
        finally:
            cursor.close()
        return succeed(result)

    def close(self) -> None:
        self._conn.close()


class Database:
    """One database, used from the reactor thread.

    Invariant: the reactor thread never runs a query; every query runs in the
    pool's threads, inside the transaction of one `run_interaction` call.
    With SQLite the pool has exactly one connection, so writes are serialized
    and a transaction never waits for another one in this process.

    The one exception is `sqlite_inline`, for tests driven by a fake clock:
    it runs each transaction at once in the calling thread, so every
    `run_interaction` completes without the reactor.
    """

    def __init__(self, engine: Engine, runner: _Runner) -> None:
        self.engine = engine
        self._runner = runner
        self._closed = False

    @classmethod
    def sqlite(cls, path: str, reactor: IReactorCore) -> Database:
        """A database on the SQLite file `path` (created if missing).

        `reactor` runs the pool; it must also provide `IReactorFromThreads`
        (every real reactor does).
        """
        engine = sqlite_engine()
        return cls(engine, _PoolRunner(engine, reactor, (path,), pool_size=1))

    @classmethod
    def sqlite_reader(cls, path: str, reactor: IReactorCore) -> Database:
        """The SQLite file `path`, which must exist, opened read-only.

        For a worker reading the writer's file from another process: every
        write fails (``attempt to write a readonly database``) and reads never
        take the write lock, so the writer is never held up by this reader.
        """
        uri = pathlib.Path(path).absolute().as_uri() + "?mode=ro"
        engine = sqlite_reader_engine()
        return cls(engine, _PoolRunner(engine, reactor, (uri,), pool_size=1))

    @classmethod
    def postgres(
        cls, conn_args: Mapping[str, Any], reactor: IReactorCore, pool_size: int = 5
    ) -> Database:
        """A PostgreSQL database, through a pool of `pool_size` psycopg2
        connections made with `conn_args` (``host``, ``port``, ``dbname``,
        ``user``, ...; see `synapse_replication.storage.postgres`).

        Transactions run concurrently, one per connection, at PostgreSQL's
        default READ COMMITTED isolation. A connection found dead (a failed
        transaction whose rollback fails too) is replaced by a new one for
        the next transaction. Needs the ``postgres`` extra.
        """
        from synapse_replication.storage.postgres import postgres_engine

        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, not {pool_size}")
        engine = postgres_engine(conn_args)
        return cls(
            engine, _PoolRunner(engine, reactor, (), pool_size=pool_size, reconnect=True)
        )

    @classmethod
    def sqlite_inline(cls, path: str) -> Database:
        """A database on the SQLite file `path` (or ``":memory:"``) whose
        transactions run synchronously in the caller's thread. For tests only:
        it blocks whoever calls it for as long as each query takes."""
        engine = sqlite_engine()
        return cls(engine, _InlineRunner(engine, (path,)))

    async def run_interaction(
        self,
        desc: str,
        func: Callable[Concatenate[Cursor, P], T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """``func(cursor, *args, **kwargs)`` in one transaction in the pool.

        Commits and returns its result, or rolls back and raises its
        exception. `desc` names the work in logs.
        """
        if self._closed:
            raise RuntimeError(f"database is closed (running {desc!r})")
        engine = self.engine

        def interaction(txn: Any) -> T:
            cursor = Cursor(txn, engine)
            if engine.begin_sql is not None:
                cursor.execute(engine.begin_sql)
            return func(cursor, *args, **kwargs)

        start = time.monotonic()
        try:
            result: T = await _cancel_after(self._runner.run(interaction))
        finally:
            log.debug(
                "{desc} took {duration:.3f}s",
                desc=desc,
                duration=time.monotonic() - start,
            )
        return result

    async def execute(self, desc: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Run one statement in its own transaction; its rows, if any."""

        def run(cursor: Cursor) -> list[tuple[Any, ...]]:
            cursor.execute(sql, args)
            # Statements without a result set (INSERT, ...) return no rows.
            return cursor.fetchall() if cursor.has_result_set else []

        return await self.run_interaction(desc, run)

    def close(self) -> None:
        """Close the connections and stop the pool's threads (idempotent).

        Waits for an interaction in progress to finish; `run_interaction`
        fails from then on.
        """
        if self._closed:
            return
        self._closed = True
        self._runner.close()
