"""Tests for synapse_replication.storage.multi_writer: ids and positions of a
stream with several writers, on a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Callable, Collection
from contextlib import AbstractAsyncContextManager
from typing import Any, Final

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from synapse_replication.storage import Database, MultiWriterIdGenerator
from synapse_replication.storage.events import EVENTS_ID_TABLES, EVENTS_STREAM_NAME
from synapse_replication.storage.postgres import (
    EVENTS_SEQUENCE,
    prepare_postgres_schema,
)
from tests.postgres_server import fresh_database

# The global reactor, untyped: it provides every reactor interface.
REACTOR: Final[Any] = reactor
WRITERS: Final = ("a", "b")
PERSIST_INTERVAL_S: Final = 0.02


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Let the reactor run until `predicate()` holds; fail after `timeout`."""
    deadline = REACTOR.seconds() + timeout
    while not predicate():
        if REACTOR.seconds() > deadline:
            raise AssertionError("condition not reached in time")
        await deferLater(REACTOR, 0.005, lambda: None)


class Ids:
    """Ids taken and held open: `finish` ends their ``async with`` block."""

    def __init__(self, manager: AbstractAsyncContextManager[list[int]], ids: list[int]) -> None:
        self._manager = manager
        self.ids = ids

    @classmethod
    async def take(cls, gen: MultiWriterIdGenerator, n: int = 1) -> Ids:
        manager = gen.get_next_mult(n)
        return cls(manager, await manager.__aenter__())

    async def finish(self, error: BaseException | None = None) -> None:
        if error is None:
            await self._manager.__aexit__(None, None, None)
        else:
            suppressed = await self._manager.__aexit__(type(error), error, None)
            assert not suppressed


class MultiWriterTestCase(TestCase):
    def setUp(self) -> None:
        self.conn_args = fresh_database(self)

    async def open_db(self) -> Database:
        db = Database.postgres(self.conn_args, REACTOR, pool_size=2)
        self.addCleanup(db.close)
        await db.run_interaction("prepare_schema", prepare_postgres_schema)
        return db

    async def start(
        self,
        name: str,
        writers: Collection[str] = WRITERS,
        db: Database | None = None,
    ) -> MultiWriterIdGenerator:
        """Instance `name`'s generator of the events stream, on its own pool."""
        gen = await MultiWriterIdGenerator.create(
            db or await self.open_db(),
            REACTOR,
            instance_name=name,
            stream_name=EVENTS_STREAM_NAME,
            sequence_name=EVENTS_SEQUENCE,
            tables=EVENTS_ID_TABLES,
            writers=writers,
            persist_interval_s=PERSIST_INTERVAL_S,
        )
        self.addCleanup(gen.stop)
        return gen

    async def write(self, gen: MultiWriterIdGenerator, n: int = 1) -> list[int]:
        """`n` ids taken and finished at once (a write with no rows)."""
        async with gen.get_next_mult(n) as ids:
            return ids

    async def persisted(self, db: Database) -> dict[str, int]:
        rows = await db.execute(
            "positions",
            "SELECT instance_name, stream_id FROM stream_positions WHERE stream_name = ?",
            EVENTS_STREAM_NAME,
        )
        return {str(name): int(stream_id) for name, stream_id in rows}


class IdsTests(MultiWriterTestCase):
    async def test_ids_are_unique_across_writers(self) -> None:
        """Writers taking ids at the same time never get the same one."""
        a, b = await self.start("a"), await self.start("b")
        batches: list[Any] = await gatherResults(
            [Deferred.fromCoroutine(self.write(gen, 3)) for gen in (a, b) * 10]
        )
        ids = [i for batch in batches for i in batch]
        self.assertEqual(len(set(ids)), 60)
        self.assertTrue(all(batch == sorted(batch) for batch in batches))

    async def test_sequence_is_moved_above_existing_ids(self) -> None:
        """Ids already in the stream's tables (one writer before) are never handed out."""
        db = await self.open_db()
        await db.execute(
            "old row",
            "INSERT INTO current_state_delta_stream"
            " (stream_id, instance_name, room_id, type, state_key) VALUES (?, ?, ?, ?, ?)",
            40,
            "master",
            "!r",
            "m.room.name",
            "",
        )
        a = await self.start("a", db=db)
        self.assertEqual(await self.write(a), [41])
        self.assertEqual(await a.get_max_allocated_token(), 41)

    async def test_a_reader_tracks_positions_and_takes_no_ids(self) -> None:
        """An instance that is not a writer follows positions and refuses to take ids."""
        reader = await self.start("reader")
        with self.assertRaises(RuntimeError):
            await self.write(reader)
        reader.advance("a", 7)
        self.assertEqual(reader.get_current_token(), 0)
        reader.advance("b", 5)
        self.assertEqual(reader.get_current_token(), 5)
        self.assertEqual(reader.get_current_token_for_writer("a"), 7)


class PositionTests(MultiWriterTestCase):
    async def test_position_stays_below_an_unfinished_id(self) -> None:
        """A writer's position waits below its lowest id still in flight."""
        a = await self.start("a")
        held = await Ids.take(a)
        later = await self.write(a, 2)
        self.assertEqual(a.get_local_position(), held.ids[0] - 1)
        self.assertEqual(a.get_current_token_for_writer("a"), held.ids[0] - 1)
        await held.finish()
        self.assertEqual(a.get_current_token_for_writer("a"), later[-1])

    async def test_a_write_returns_with_its_position_persisted(self) -> None:
        """Once the ``async with`` block exits, the new position is in stream_positions."""
        db = await self.open_db()
        a = await self.start("a", db=db)
        ids = await self.write(a, 2)
        self.assertEqual(a.get_current_token_for_writer("a"), ids[-1])
        self.assertEqual((await self.persisted(db))["a"], ids[-1])

    async def test_failed_write_is_passed_but_not_recorded_above_ids_in_flight(self) -> None:
        """A failed write's ids are passed once nothing lower is in flight, and
        stream_positions never gets ahead of an unfinished id."""
        db = await self.open_db()
        a = await self.start("a", db=db)
        held = await Ids.take(a)
        failed = await Ids.take(a)
        await failed.finish(ValueError("rolled back"))
        self.assertEqual(a.get_local_position(), held.ids[0] - 1)
        self.assertLess((await self.persisted(db))["a"], held.ids[0])
        await held.finish()
        self.assertEqual((await self.persisted(db))["a"], failed.ids[0])

    async def test_idle_writer_follows_the_others(self) -> None:
        """An idle writer moves its position to the newest position it has seen,
        and persists (so may announce) it shortly after."""
        a, b = await self.start("a"), await self.start("b")
        ids = await self.write(a, 3)
        b.advance("a", ids[-1])
        self.assertEqual(b.get_local_position(), ids[-1])
        self.assertEqual(b.get_current_token(), ids[-1])
        await wait_until(lambda: b.get_current_token_for_writer("b") == ids[-1])

    async def test_idle_jump_stops_below_own_unfinished_id(self) -> None:
        """A writer with an id in flight claims nothing at or above it, whatever it sees."""
        b = await self.start("b")
        held = await Ids.take(b)
        b.advance("a", held.ids[0] + 10)
        self.assertEqual(b.get_local_position(), held.ids[0] - 1)
        await held.finish()
        self.assertEqual(b.get_local_position(), held.ids[0] + 10)

    async def test_idle_jump_stops_where_an_id_fetch_started(self) -> None:
        """While `nextval` is under way, positions seen meanwhile are not claimed:
        the id coming back may be below them."""
        b = await self.start("b")
        manager = b.get_next()
        fetching = Deferred.fromCoroutine(manager.__aenter__())
        b.advance("a", 1000)
        self.assertEqual(b.get_local_position(), 0)
        stream_id = await fetching
        self.assertEqual(stream_id, 1)
        self.assertEqual(b.get_local_position(), 0)
        await manager.__aexit__(None, None, None)
        self.assertEqual(b.get_local_position(), 1000)

    async def test_stream_token_is_the_lowest_writer_position(self) -> None:
        """The current token is the minimum over every configured writer."""
        a = await self.start("a", writers=("a", "b", "c"))
        await self.write(a, 4)
        a.advance("b", 2)
        a.advance("c", 3)
        self.assertEqual(a.get_current_token(), 2)
        a.advance("b", 9)
        self.assertEqual(a.get_current_token(), 3)
        self.assertEqual(a.get_positions(), {"a": 4, "b": 9, "c": 3})


class StartTests(MultiWriterTestCase):
    async def test_restart_resumes_from_the_persisted_position(self) -> None:
        """A writer restarting starts where its persisted position is."""
        db = await self.open_db()
        a = await self.start("a", db=db)
        ids = await self.write(a, 3)
        a.stop()
        db.close()
        again = await self.start("a")
        self.assertEqual(again.get_current_token_for_writer("a"), ids[-1])
        self.assertEqual(await self.write(again), [ids[-1] + 1])

    async def test_restart_never_goes_back_behind_an_announced_position(self) -> None:
        """A position reached by following others is persisted before it is
        announced, so the restarted writer is not behind it (a reader would
        take that for a reset)."""
        db = await self.open_db()
        a = await self.start("a", db=db)
        a.advance("b", 50)
        await wait_until(lambda: a.get_current_token_for_writer("a") == 50)
        a.stop()
        db.close()
        again = await self.start("a")
        self.assertEqual(again.get_current_token_for_writer("a"), 50)

    async def test_new_writer_does_not_pass_rows_in_flight(self) -> None:
        """A writer starting while another has an id in flight starts at the
        lowest persisted position, and its stream token stays below that id
        until the other writer announces it is done."""
        a, b = await self.start("a", ("a", "b", "c")), await self.start("b", ("a", "b", "c"))
        await self.write(a)
        held = await Ids.take(a)
        later = await self.write(b, 3)
        self.assertLess(held.ids[0], later[0])

        c = await self.start("c", ("a", "b", "c"))
        self.assertEqual(c.get_current_token_for_writer("c"), held.ids[0] - 1)
        self.assertEqual(c.get_current_token_for_writer("a"), held.ids[0] - 1)
        self.assertLess(c.get_current_token(), held.ids[0])

        c.advance("b", later[-1])
        self.assertLess(c.get_current_token(), held.ids[0])
        await held.finish()
        c.advance("a", a.get_current_token_for_writer("a"))
        self.assertEqual(c.get_current_token(), held.ids[0])

    async def test_writer_not_started_yet_holds_the_stream_token(self) -> None:
        """A configured writer never heard of holds the token where it was
        when we started: its first ids will be above that, and nothing lower
        is provably safe."""
        a = await self.start("a")
        await self.write(a, 3)
        self.assertEqual(a.get_current_token(), 0)
        b = await self.start("b")
        self.assertEqual(b.get_current_token_for_writer("b"), 3)
        a.advance("b", 3)
        self.assertEqual(a.get_current_token(), 3)
