"""Tests for synapse_replication.storage.open_sqlite_store: the stores together."""

from __future__ import annotations

import sqlite3

from twisted.trial.unittest import TestCase

from tests.storage._helpers import ROOM, message, open_test_stores


class OpenSqliteStoreTests(TestCase):
    async def test_events_sources_share_one_token_space(self) -> None:
        """Events, state changes and ex-outliers take ids from one generator."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        self.assertEqual(
            await events.persist_events([message("$o", outlier=True)]), [1]
        )
        self.assertEqual(await events.update_current_state(ROOM, {("t", ""): "$o"}), 2)
        self.assertEqual(await events.de_outlier_events(["$o"]), [3])
        self.assertEqual(stores.events_id_gen.get_current_token(), 3)
        self.assertEqual(stores.receipts_id_gen.get_current_token(), 0)

    async def test_failed_write_still_pokes(self) -> None:
        """A failed write moves the token past its ids, and notify hears of it."""
        stores, pokes = await open_test_stores(self)
        await stores.events.persist_events([message("$a")])
        before = pokes.count
        with self.assertRaises(sqlite3.IntegrityError):
            await stores.events.persist_events([message("$a")])
        self.assertEqual(stores.events.current_token("master"), 2)
        self.assertGreater(pokes.count, before)

    async def test_close_closes_the_database(self) -> None:
        """After close, the stores refuse work."""
        stores, _ = await open_test_stores(self)
        stores.close()
        with self.assertRaises(RuntimeError):
            await stores.events.persist_events([message("$a")])
        # Recording the failed write's ids fails too, and is logged.
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
