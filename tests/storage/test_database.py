"""Tests for synapse_replication.storage.database: transactions off the reactor thread."""

from __future__ import annotations

import os
import sqlite3
import threading

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from synapse_replication.storage import Cursor, Database
from tests.storage._helpers import REACTOR


def _create_table(cursor: Cursor) -> None:
    cursor.execute("CREATE TABLE t (x INTEGER NOT NULL)")


def _insert(cursor: Cursor, x: int) -> None:
    cursor.execute("INSERT INTO t (x) VALUES (?)", (x,))


class DatabaseTests(TestCase):
    async def _db(self) -> Database:
        db = Database.sqlite(self.mktemp(), REACTOR)
        self.addCleanup(db.close)
        await db.run_interaction("create", _create_table)
        return db

    async def test_interaction_commits(self) -> None:
        """Rows written by a finished interaction are seen by the next one."""
        db = await self._db()
        await db.run_interaction("insert", _insert, 7)
        self.assertEqual(await db.execute("select", "SELECT x FROM t"), [(7,)])

    async def test_exception_rolls_back(self) -> None:
        """An interaction that raises leaves no row behind and raises to the caller."""
        db = await self._db()

        def insert_then_fail(cursor: Cursor) -> None:
            _insert(cursor, 1)
            raise KeyError("boom")

        with self.assertRaises(KeyError):
            await db.run_interaction("fail", insert_then_fail)
        self.assertEqual(await db.execute("select", "SELECT x FROM t"), [])

    async def test_runs_off_the_reactor_thread(self) -> None:
        """The interaction function runs in a thread other than the reactor's."""
        db = await self._db()
        ident = await db.run_interaction("ident", lambda cursor: threading.get_ident())
        self.assertNotEqual(ident, threading.get_ident())

    async def test_execute_without_result_set(self) -> None:
        """`execute` of a statement without rows returns an empty list."""
        db = await self._db()
        self.assertEqual(await db.execute("insert", "INSERT INTO t VALUES (?)", 3), [])
        self.assertEqual(await db.execute("select", "SELECT x FROM t"), [(3,)])

    async def test_sqlite_is_in_wal_mode(self) -> None:
        """SQLite files are opened in WAL mode with synchronous=NORMAL (1)."""
        db = await self._db()
        self.assertEqual(await db.execute("mode", "PRAGMA journal_mode"), [("wal",)])
        self.assertEqual(await db.execute("sync", "PRAGMA synchronous"), [(1,)])

    async def test_closed_database_refuses_work(self) -> None:
        """After close (which may be repeated), run_interaction raises."""
        db = await self._db()
        db.close()
        db.close()
        with self.assertRaises(RuntimeError):
            await db.run_interaction("late", _insert, 1)

    async def test_cancel_waits_for_the_transaction(self) -> None:
        """A cancelled caller hears of it only once its transaction is over."""
        db = await self._db()
        started = threading.Event()
        release = threading.Event()

        def slow(cursor: Cursor) -> None:
            _insert(cursor, 5)
            started.set()
            release.wait(10)

        d = Deferred.fromCoroutine(db.run_interaction("slow", slow))
        await deferToThread(started.wait, 10)
        d.cancel()
        self.assertNoResult(d)
        release.set()
        with self.assertRaises(CancelledError):
            await d
        self.assertEqual(await db.execute("select", "SELECT x FROM t"), [(5,)])


class ReaderDatabaseTests(TestCase):
    """`Database.sqlite_reader`: another process's view of a writer's file."""

    async def _writer_and_reader(self, name: str = "db") -> tuple[Database, Database]:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, name)
        writer = Database.sqlite(path, REACTOR)
        self.addCleanup(writer.close)
        await writer.run_interaction("create", _create_table)
        await writer.run_interaction("insert", _insert, 1)
        reader = Database.sqlite_reader(path, REACTOR)
        self.addCleanup(reader.close)
        return writer, reader

    async def test_reader_sees_committed_rows(self) -> None:
        """The reader sees what the writer committed, also after it opened."""
        writer, reader = await self._writer_and_reader()
        self.assertEqual(await reader.execute("s", "SELECT x FROM t"), [(1,)])
        await writer.run_interaction("insert", _insert, 2)
        self.assertEqual(
            await reader.execute("s", "SELECT x FROM t ORDER BY x"), [(1,), (2,)]
        )

    async def test_reader_cannot_write(self) -> None:
        """A write through the reader fails and changes nothing."""
        writer, reader = await self._writer_and_reader()
        with self.assertRaises(sqlite3.OperationalError):
            await reader.run_interaction("insert", _insert, 9)
        self.assertEqual(await writer.execute("s", "SELECT x FROM t"), [(1,)])

    async def test_reader_does_not_take_the_write_lock(self) -> None:
        """While a reader's transaction is open, another connection can still
        start a write transaction and commit.

        The reader's transactions start with a plain (deferred) BEGIN, which
        never asks for the write lock; the writer's BEGIN IMMEDIATE would.
        (Current SQLite also ignores IMMEDIATE on a ``mode=ro`` connection, so
        the engine's statement is checked as well.)"""
        writer, reader = await self._writer_and_reader()
        self.assertEqual(reader.engine.begin_sql, "BEGIN")

        def read_while_another_writes(cursor: Cursor) -> list[tuple[int, ...]]:
            cursor.execute("SELECT x FROM t")
            seen = [tuple(row) for row in cursor.fetchall()]
            # timeout=0: fail at once with "database is locked" if the reader
            # held the write lock.
            other = sqlite3.connect(db_file, timeout=0, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                other.execute("INSERT INTO t (x) VALUES (3)")
                other.execute("COMMIT")
            finally:
                other.close()
            return seen

        db_file = await writer.run_interaction("file", _main_file)
        self.assertEqual(
            await reader.run_interaction("read", read_while_another_writes), [(1,)]
        )
        self.assertEqual(
            await writer.execute("s", "SELECT x FROM t ORDER BY x"), [(1,), (3,)]
        )

    async def test_path_with_uri_characters(self) -> None:
        """Characters that mean something in a URI are quoted in the path."""
        _, reader = await self._writer_and_reader("a ?b#c%20.db")
        self.assertEqual(await reader.execute("s", "SELECT x FROM t"), [(1,)])

    async def test_missing_file_is_not_created(self) -> None:
        """A reader never creates the file it is asked to read."""
        path = os.path.abspath(self.mktemp())
        reader = Database.sqlite_reader(path, REACTOR)
        self.addCleanup(reader.close)
        with self.assertRaises(sqlite3.OperationalError):
            await reader.execute("s", "SELECT 1")
        self.assertFalse(os.path.exists(path))


def _main_file(cursor: Cursor) -> str:
    """The file of the connection's main database."""
    cursor.execute("PRAGMA database_list")
    return str(next(row[2] for row in cursor.fetchall() if row[1] == "main"))


class InlineDatabaseTests(SynchronousTestCase):
    def test_inline_interactions_complete_at_once(self) -> None:
        """An inline database finishes each interaction before returning."""
        db = Database.sqlite_inline(":memory:")
        self.addCleanup(db.close)
        self.successResultOf(
            Deferred.fromCoroutine(db.run_interaction("c", _create_table))
        )
        self.successResultOf(
            Deferred.fromCoroutine(db.run_interaction("i", _insert, 2))
        )
        rows = self.successResultOf(
            Deferred.fromCoroutine(db.execute("s", "SELECT x FROM t"))
        )
        self.assertEqual(rows, [(2,)])

    def test_inline_exception_rolls_back(self) -> None:
        """An inline interaction that raises rolls back and fails its Deferred."""
        db = Database.sqlite_inline(":memory:")
        self.addCleanup(db.close)
        self.successResultOf(
            Deferred.fromCoroutine(db.run_interaction("c", _create_table))
        )

        def insert_then_fail(cursor: Cursor) -> None:
            _insert(cursor, 1)
            raise KeyError("boom")

        self.failureResultOf(
            Deferred.fromCoroutine(db.run_interaction("f", insert_then_fail)), KeyError
        )
        rows = self.successResultOf(
            Deferred.fromCoroutine(db.execute("s", "SELECT x FROM t"))
        )
        self.assertEqual(rows, [])
