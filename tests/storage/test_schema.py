"""Tests for synapse_replication.storage.schema: created on first open, versioned."""

from __future__ import annotations

import sqlite3
from contextlib import closing

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from synapse_replication.storage import SCHEMA_VERSION, Database, SchemaVersionError
from synapse_replication.storage.schema import (
    UPGRADES,
    get_schema_version,
    prepare_schema,
)
from tests.storage._helpers import open_test_stores, state


def _tables(path: str) -> set[str]:
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {row[0] for row in rows}


def _version(path: str) -> int:
    with closing(sqlite3.connect(path)) as conn:
        (version,) = conn.execute("SELECT version FROM schema_version").fetchone()
        return int(version)


class SchemaOnOpenTests(TestCase):
    async def test_creates_itself_on_first_open(self) -> None:
        """A new file gets every table and the latest schema version."""
        path = self.mktemp()
        stores, _ = await open_test_stores(self, path)
        stores.close()
        self.assertTrue(
            {
                "events",
                "state_events",
                "redactions",
                "event_relations",
                "room_memberships",
                "rejections",
                "current_state_events",
                "current_state_delta_stream",
                "ex_outlier_stream",
                "receipts_linearized",
                "stream_positions",
                "schema_version",
            }
            <= _tables(path)
        )
        self.assertEqual(_version(path), SCHEMA_VERSION)

    async def test_reopen_keeps_data_and_tokens(self) -> None:
        """Reopening a database keeps its rows and its streams' tokens."""
        path = self.mktemp()
        stores, _ = await open_test_stores(self, path)
        await stores.events.persist_events([state("$a", "m.room.create", "")])
        await stores.receipts.insert_receipt("!r", "m.read", "@u", "$a", None, {})
        rows = await stores.events.get_all_rows("master")
        stores.close()

        stores, _ = await open_test_stores(self, path)
        self.assertEqual(stores.events.current_token("master"), 1)
        self.assertEqual(stores.receipts.current_token("master"), 1)
        self.assertEqual(await stores.events.get_all_rows("master"), rows)

    async def test_newer_version_refused(self) -> None:
        """A database of a newer schema version is refused with a clear error."""
        path = self.mktemp()
        stores, _ = await open_test_stores(self, path)
        stores.close()
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("UPDATE schema_version SET version = 99")

        with self.assertRaises(SchemaVersionError) as caught:
            await open_test_stores(self, path)
        self.assertIn("version 99 is newer", str(caught.exception))
        self.assertEqual(_version(path), 99)


class UpgradeTests(SynchronousTestCase):
    def _prepare(self, db: Database, upgrades: list[tuple[str, ...]]) -> int:
        return self.successResultOf(
            Deferred.fromCoroutine(
                db.run_interaction("prepare", prepare_schema, upgrades)
            )
        )

    def _db(self) -> Database:
        db = Database.sqlite_inline(self.mktemp())
        self.addCleanup(db.close)
        return db

    def test_older_version_upgraded_in_order(self) -> None:
        """An older database gets only the steps after its version, in order."""
        db = self._db()
        self.assertEqual(self._prepare(db, [("CREATE TABLE a (x INTEGER)",)]), 1)
        version = self._prepare(
            db,
            [
                ("CREATE TABLE a (x INTEGER)",),
                ("CREATE TABLE b (y INTEGER)", "INSERT INTO b SELECT x FROM a"),
                ("ALTER TABLE b ADD COLUMN z TEXT",),
            ],
        )
        self.assertEqual(version, 3)
        rows = self.successResultOf(
            Deferred.fromCoroutine(db.execute("b", "SELECT * FROM b"))
        )
        self.assertEqual(rows, [])

    def test_failed_upgrade_changes_nothing(self) -> None:
        """An upgrade step that fails leaves the database at its old version."""
        db = self._db()
        self._prepare(db, [("CREATE TABLE a (x INTEGER)",)])
        self.failureResultOf(
            Deferred.fromCoroutine(
                db.run_interaction(
                    "prepare",
                    prepare_schema,
                    [
                        ("CREATE TABLE a (x INTEGER)",),
                        ("CREATE TABLE c (x)", "NOT SQL"),
                    ],
                )
            ),
            sqlite3.OperationalError,
        )
        version = self.successResultOf(
            Deferred.fromCoroutine(db.run_interaction("version", get_schema_version))
        )
        self.assertEqual(version, 1)
        tables = self.successResultOf(
            Deferred.fromCoroutine(
                db.execute("t", "SELECT name FROM sqlite_master WHERE name = 'c'")
            )
        )
        self.assertEqual(tables, [])

    def test_latest_version_is_number_of_steps(self) -> None:
        """SCHEMA_VERSION counts the upgrade steps."""
        self.assertEqual(SCHEMA_VERSION, len(UPGRADES))
