"""Tests for synapse_replication.storage.postgres: the psycopg2 engine, the
shared schema on PostgreSQL, and the stores giving the same rows as on SQLite,
against a real PostgreSQL server (tests/postgres_server.py)."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Collection
from typing import Any, Final

from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase

from synapse_replication.storage import (
    MAX_STATE_UPDATES_PER_ROOM,
    SCHEMA_VERSION,
    Cursor,
    Database,
    EventsStore,
    EventToPersist,
    MultiWriterIdGenerator,
    ReceiptsStore,
    Stores,
    StreamIdGenerator,
)
from synapse_replication.storage.postgres import (
    open_postgres_stores,
    prepare_postgres_schema,
)
from synapse_replication.storage.schema import get_schema_version
from synapse_replication.streams import StreamUpdate
from tests.postgres_server import fresh_database
from tests.storage._helpers import (
    ALICE,
    REACTOR,
    ROOM,
    message,
    open_test_stores,
    state,
)

OTHER_ROOM: Final = "!other:test.local"
BOB: Final = "@bob:test.local"


async def open_pg(
    case: TestCase,
    conn_args: dict[str, Any] | None = None,
    *,
    instance_name: str = "master",
    events_writers: Collection[str] = ("master",),
    receipts_writers: Collection[str] = ("master",),
) -> Stores:
    """Stores on a fresh PostgreSQL database (or `conn_args`), closed after the test."""
    stores = await open_postgres_stores(
        conn_args if conn_args is not None else fresh_database(case),
        instance_name,
        REACTOR,
        lambda: None,
        events_writers=events_writers,
        receipts_writers=receipts_writers,
    )
    case.addCleanup(stores.close)
    return stores


async def events_workload(events: EventsStore) -> None:
    """Every kind of events stream row: messages, state, members, a redaction,
    a thread reply, rejected and outlier events, de-outliering, state changes
    without an event, a batch's state delta and a room-wide ``state-all``."""
    await events.persist_events(
        [
            state("$create", "m.room.create", ""),
            state("$join", "m.room.member", ALICE, membership="join"),
            message("$m1"),
        ]
    )
    await events.persist_events([message("$reply", relates_to="$m1", relation_type="m.thread")])
    await events.persist_events(
        [
            EventToPersist(
                event_id="$redact",
                room_id=ROOM,
                type="m.room.redaction",
                sender=ALICE,
                redacts="$m1",
            )
        ]
    )
    await events.persist_events([state("$rejected", "m.room.topic", "", rejected=True)])
    await events.persist_events([message("$out", room_id=OTHER_ROOM, outlier=True)])
    await events.de_outlier_events(["$out"])
    await events.update_current_state(ROOM, {("m.room.topic", ""): None, ("m.room.name", ""): "$n"})
    await events.persist_events(
        [state("$t1", "m.room.topic", ""), message("$m2")],
        state_delta={ROOM: {("m.room.topic", ""): "$t1"}, OTHER_ROOM: {("m.room.name", ""): "$x"}},
    )
    many = {("m.key", f"k{i:03}"): f"$k{i}" for i in range(MAX_STATE_UPDATES_PER_ROOM)}
    await events.update_current_state(OTHER_ROOM, many)
    with contextlib.suppress(Exception):
        await events.persist_events([message("$m2")])  # a duplicate: fails, uses an id
    await events.persist_events([message("$last")])


async def receipts_workload(receipts: ReceiptsStore) -> None:
    """Unthreaded, ``main`` and thread receipts, some replacing earlier ones."""
    await receipts.insert_receipt(ROOM, "m.read", ALICE, "$1", None, {"ts": 1})
    await receipts.insert_receipt(ROOM, "m.read", ALICE, "$2", "main", {"ts": 2})
    await receipts.insert_receipt(ROOM, "m.read", ALICE, "$3", "$root", {"ts": 3})
    await receipts.insert_receipt(ROOM, "m.read.private", BOB, "$1", None, {"é": ["x"]})
    await receipts.insert_receipt(ROOM, "m.read", ALICE, "$4", None, {"ts": 4})
    await receipts.insert_receipt(OTHER_ROOM, "m.read", BOB, "$5", "main", {})


async def paged(
    get_updates: Any, instance_name: str, upto: int, limit: int
) -> list[StreamUpdate]:
    """Every row up to `upto`, paging with `limit` while limited."""
    updates: list[StreamUpdate] = []
    token = 0
    while True:
        page, token, limited = await get_updates(instance_name, token, upto, limit)
        updates.extend(page)
        if not limited:
            return updates


class PostgresDatabaseTests(TestCase):
    async def test_schema_is_created_once_at_the_current_version(self) -> None:
        """The shared schema applies on PostgreSQL, and a second open changes nothing."""
        conn_args = fresh_database(self)
        db = Database.postgres(conn_args, REACTOR, pool_size=2)
        self.addCleanup(db.close)
        self.assertEqual(await db.run_interaction("prep", prepare_postgres_schema), SCHEMA_VERSION)
        self.assertEqual(await db.run_interaction("prep", prepare_postgres_schema), SCHEMA_VERSION)
        self.assertEqual(await db.run_interaction("version", get_schema_version), SCHEMA_VERSION)
        tables = await db.execute(
            "tables",
            "SELECT tablename FROM pg_catalog.pg_tables WHERE schemaname = current_schema()",
        )
        self.assertTrue(
            {"events", "receipts_linearized", "stream_positions", "schema_version"}
            <= {row[0] for row in tables}
        )

    async def test_instances_starting_together_both_get_the_schema(self) -> None:
        """Concurrent schema preparation is serialized: neither instance fails."""
        conn_args = fresh_database(self)
        dbs = [Database.postgres(conn_args, REACTOR, pool_size=1) for _ in range(3)]
        for db in dbs:
            self.addCleanup(db.close)
        versions = await gatherResults(
            [Deferred.fromCoroutine(db.run_interaction("prep", prepare_postgres_schema)) for db in dbs]
        )
        self.assertEqual(versions, [SCHEMA_VERSION] * 3)

    async def test_question_mark_placeholders_and_literal_percent(self) -> None:
        """SQL written with ``?`` runs on psycopg2, with a literal ``%`` left alone."""
        db = Database.postgres(fresh_database(self), REACTOR, pool_size=1)
        self.addCleanup(db.close)
        rows = await db.execute("q", "SELECT '100%' || ?, ? + 1", "!", 41)
        self.assertEqual(rows, [("100%!", 42)])

    async def test_a_failed_interaction_rolls_back(self) -> None:
        """An interaction that raises leaves none of its writes behind."""
        db = Database.postgres(fresh_database(self), REACTOR, pool_size=1)
        self.addCleanup(db.close)
        await db.run_interaction("prep", prepare_postgres_schema)

        def write_then_fail(cursor: Cursor) -> None:
            cursor.execute(
                "INSERT INTO stream_positions (stream_name, instance_name, stream_id)"
                " VALUES (?, ?, ?)",
                ("events", "w", 5),
            )
            raise ValueError("boom")

        with self.assertRaises(ValueError):
            await db.run_interaction("fail", write_then_fail)
        self.assertEqual(await db.execute("rows", "SELECT * FROM stream_positions"), [])

    async def test_pool_runs_transactions_concurrently(self) -> None:
        """Two interactions run at once on a pool of two connections."""
        db = Database.postgres(fresh_database(self), REACTOR, pool_size=2)
        self.addCleanup(db.close)
        first_running = threading.Event()

        def first(cursor: Cursor) -> bool:
            cursor.execute("SELECT 1")
            first_running.set()
            return True

        def second(cursor: Cursor) -> bool:
            cursor.execute("SELECT 1")
            # Only true if `first` runs while this one is still open.
            return first_running.wait(timeout=5)

        results = await gatherResults(
            [
                Deferred.fromCoroutine(db.run_interaction("second", second)),
                Deferred.fromCoroutine(db.run_interaction("first", first)),
            ]
        )
        self.assertEqual(results, [True, True])

    async def test_booleans_come_back_as_true_and_false(self) -> None:
        """``ev`` rows carry PostgreSQL's booleans (Synapse's writers send them so)."""
        stores = await open_pg(self)
        await stores.events.persist_events([message("$o", outlier=True), message("$m")])
        rows = await stores.events.get_all_rows("master")
        flags = [row[1][-2:] for _, row in rows]
        self.assertEqual(flags, [[False, True], [False, False]])
        self.assertTrue(all(type(flag) is bool for pair in flags for flag in pair))


class SameRowsAsSqliteTests(TestCase):
    """The same workload through SQLite and PostgreSQL stores gives the same
    rows at the same tokens, paged or not (PostgreSQL's booleans equal
    SQLite's 0 and 1)."""

    async def _assert_same_events(self, pg: Stores) -> None:
        sqlite, _ = await open_test_stores(self)
        await events_workload(sqlite.events)
        await events_workload(pg.events)
        expected = await sqlite.events.get_all_rows_unpaged("master")
        self.assertEqual(len(expected), 18)
        self.assertEqual(await pg.events.get_all_rows_unpaged("master"), expected)
        upto = pg.events.current_token("master")
        self.assertEqual(upto, sqlite.events.current_token("master"))
        for limit in (1, 3, 1000):
            self.assertEqual(await paged(pg.events.get_updates, "master", upto, limit), expected)

    async def test_events_single_writer(self) -> None:
        """One events writer (a `StreamIdGenerator`): rows equal SQLite's."""
        pg = await open_pg(self)
        self.assertIsInstance(pg.events_id_gen, StreamIdGenerator)
        await self._assert_same_events(pg)

    async def test_events_multi_writer(self) -> None:
        """Events with a second writer configured (ids from the sequence): rows equal SQLite's."""
        pg = await open_pg(self, events_writers=("master", "other"))
        self.assertIsInstance(pg.events_id_gen, MultiWriterIdGenerator)
        await self._assert_same_events(pg)

    async def test_receipts(self) -> None:
        """Receipts through one and through several writers: rows equal SQLite's."""
        sqlite, _ = await open_test_stores(self)
        await receipts_workload(sqlite.receipts)
        expected = await paged(
            sqlite.receipts.get_updates, "master", sqlite.receipts.current_token("master"), 1000
        )
        self.assertEqual(len(expected), 5)
        for writers in (("master",), ("master", "other")):
            pg = await open_pg(self, receipts_writers=writers)
            await receipts_workload(pg.receipts)
            upto = pg.receipts.current_token("master")
            for limit in (1, 1000):
                self.assertEqual(await paged(pg.receipts.get_updates, "master", upto, limit), expected)


class ConcurrentStateWritesTests(TestCase):
    """Writes that change one room's current state, made at once on a pool
    of several connections (bug: the second insert of a key failed on the
    unique constraint, or an older write could win)."""

    async def test_concurrent_writes_of_one_state_key_all_succeed_in_order(self) -> None:
        """Concurrent writes of one key all commit; the latest stream ordering is the current state."""
        stores = await open_pg(self, events_writers=("master", "other"))
        events = stores.events
        writes: list[Deferred[Any]] = []
        for i in range(12):
            writes.append(
                Deferred.fromCoroutine(
                    events.persist_events([state(f"$t{i}", "m.room.topic", ""), message(f"$m{i}")])
                )
            )
            writes.append(
                Deferred.fromCoroutine(
                    events.update_current_state(ROOM, {("m.room.topic", ""): f"$u{i}"})
                )
            )
        await gatherResults(writes, consumeErrors=True)
        deltas = await stores.db.execute(
            "deltas",
            "SELECT stream_id, event_id, prev_event_id FROM current_state_delta_stream"
            " ORDER BY stream_id",
        )
        self.assertEqual(len(deltas), 24)
        # Each change replaced the one at the stream id before it.
        for before, after in itertools.pairwise(deltas):
            self.assertEqual(after[2], before[1])
        current = await events.get_current_state(ROOM)
        self.assertEqual(current, {("m.room.topic", ""): deltas[-1][1]})
