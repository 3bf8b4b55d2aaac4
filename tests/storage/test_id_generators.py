"""Tests for synapse_replication.storage.id_generators: ids and the current token."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from synapse_replication.storage import AbstractStreamIdGenerator, StreamIdGenerator
from tests.storage._helpers import Pokes, message, open_test_stores


class _Holder:
    """Takes ids from a generator and holds them until told to finish."""

    def __init__(self, gen: StreamIdGenerator, n: int = 1) -> None:
        self.ids: list[int] = []
        self._release: Deferred[None] = Deferred()
        self.done = Deferred.fromCoroutine(self._hold(gen, n))

    async def _hold(self, gen: StreamIdGenerator, n: int) -> None:
        async with gen.get_next_mult(n) as ids:
            self.ids = ids
            await self._release

    def finish(self) -> None:
        self._release.callback(None)

    def fail(self) -> None:
        self._release.errback(RuntimeError("transaction failed"))


class StreamIdGeneratorTests(SynchronousTestCase):
    def test_is_an_abstract_stream_id_generator(self) -> None:
        """StreamIdGenerator provides the AbstractStreamIdGenerator protocol."""
        gen: AbstractStreamIdGenerator = StreamIdGenerator("master", 0)
        self.assertEqual(gen.get_current_token(), 0)

    def test_starts_after_current_token(self) -> None:
        """The first id handed out follows the token it was created with."""
        gen = StreamIdGenerator("master", 41)
        holder = _Holder(gen)
        self.assertEqual(holder.ids, [42])
        self.assertEqual(gen.get_current_token(), 41)
        holder.finish()
        self.assertEqual(gen.get_current_token(), 42)

    def test_out_of_order_completion(self) -> None:
        """The token passes only ids below which nothing is in flight."""
        gen = StreamIdGenerator("master", 0)
        one, two, three = _Holder(gen), _Holder(gen), _Holder(gen)
        self.assertEqual([one.ids, two.ids, three.ids], [[1], [2], [3]])
        three.finish()
        self.assertEqual(gen.get_current_token(), 0)
        one.finish()
        self.assertEqual(gen.get_current_token(), 1)
        two.finish()
        self.assertEqual(gen.get_current_token(), 3)

    def test_failure_releases_the_id(self) -> None:
        """An id whose block raised is given back: the token passes it."""
        gen = StreamIdGenerator("master", 0)
        failing, later = _Holder(gen), _Holder(gen)
        later.finish()
        failing.fail()
        self.failureResultOf(failing.done, RuntimeError)
        self.assertEqual(gen.get_current_token(), 2)

    def test_get_next_mult_gives_consecutive_ids(self) -> None:
        """get_next_mult(n) hands out n consecutive ids, all held until the end."""
        gen = StreamIdGenerator("master", 10)
        many = _Holder(gen, 3)
        after = _Holder(gen)
        self.assertEqual(many.ids, [11, 12, 13])
        self.assertEqual(after.ids, [14])
        after.finish()
        self.assertEqual(gen.get_current_token(), 10)
        many.finish()
        self.assertEqual(gen.get_current_token(), 14)

    def test_get_next_mult_refuses_zero(self) -> None:
        """Asking for no ids is a mistake, reported as such."""
        gen = StreamIdGenerator("master", 0)

        async def take_none() -> None:
            async with gen.get_next_mult(0):
                pass

        self.failureResultOf(Deferred.fromCoroutine(take_none()), ValueError)
        self.assertEqual(gen.get_current_token(), 0)

    def test_on_advanced_fires_when_the_token_moves(self) -> None:
        """on_advanced is called each time the token moves, and only then."""
        pokes = Pokes()
        gen = StreamIdGenerator("master", 0, on_advanced=pokes)
        one, two = _Holder(gen), _Holder(gen)
        two.finish()
        self.assertEqual(pokes.count, 0)
        one.finish()
        self.assertEqual(pokes.count, 1)

    def test_broken_on_advanced_does_not_fail_the_write(self) -> None:
        """A listener that raises is logged; the block still succeeds."""

        def broken() -> None:
            raise ZeroDivisionError()

        gen = StreamIdGenerator("master", 0, on_advanced=broken)
        holder = _Holder(gen)
        holder.finish()
        self.successResultOf(holder.done)
        self.assertEqual(gen.get_current_token(), 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_positions_name_the_one_writer(self) -> None:
        """One writer: its position is the stream's, whoever asks."""
        gen = StreamIdGenerator("master", 5)
        self.assertEqual(gen.get_positions(), {"master": 5})
        self.assertEqual(gen.get_current_token_for_writer("master"), 5)
        self.assertEqual(gen.get_current_token_for_writer("other"), 5)


class CreateFromDatabaseTests(TestCase):
    async def test_starts_after_the_highest_id_of_every_table(self) -> None:
        """The events generator starts after ids used by events, deltas and ex-outliers."""
        path = self.mktemp()
        stores, _ = await open_test_stores(self, path)
        await stores.events.persist_events([message("$m", outlier=True)])
        await stores.events.update_current_state("!r", {("m.room.topic", ""): None})
        await stores.events.de_outlier_events(["$m"])
        self.assertEqual(stores.events.current_token("master"), 3)
        stores.close()

        stores, _ = await open_test_stores(self, path)
        self.assertEqual(stores.events_id_gen.get_current_token(), 3)

    async def test_failed_write_ids_are_not_reused_after_restart(self) -> None:
        """Ids of a failed write, which the token passed, are never handed out again."""
        path = self.mktemp()
        stores, _ = await open_test_stores(self, path)
        await stores.events.persist_events([message("$a")])
        with self.assertRaises(sqlite3.IntegrityError):
            await stores.events.persist_events([message("$b"), message("$a")])
        self.assertEqual(stores.events.current_token("master"), 3)
        stores.close()

        stores, _ = await open_test_stores(self, path)
        self.assertEqual(await stores.events.persist_events([message("$c")]), [4])

    async def test_unknown_identifiers_refused(self) -> None:
        """Table and column names must be plain identifiers."""
        stores, _ = await open_test_stores(self)
        tables: Sequence[tuple[str, str]] = [("events; DROP TABLE events", "x")]
        with self.assertRaises(ValueError):
            await StreamIdGenerator.create(stores.db, "master", tables, stream_name="x")
