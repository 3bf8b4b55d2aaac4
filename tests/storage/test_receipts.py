"""Tests for synapse_replication.storage.receipts: receipts and their stream rows."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from synapse_replication.storage.receipts import ReceiptsStore
from synapse_replication.streams import ReceiptsStream, StreamUpdate
from tests.storage._helpers import ALICE, ROOM, open_test_stores
from tests.wire_vectors import wire_json

BOB = "@bob:test.local"


async def page_all(store: ReceiptsStore, limit: int) -> list[StreamUpdate]:
    """Every row, paging with `limit` while limited."""
    upto = store.current_token("master")
    updates: list[StreamUpdate] = []
    token = 0
    while True:
        page, token, limited = await store.get_updates("master", token, upto, limit)
        updates.extend(page)
        if not limited:
            return updates


class ReceiptsStoreTests(TestCase):
    async def test_unthreaded_main_and_threaded_are_separate(self) -> None:
        """Unthreaded, "main" and thread receipts of one user are three receipts."""
        stores, _ = await open_test_stores(self)
        receipts = stores.receipts
        await receipts.insert_receipt(ROOM, "m.read", ALICE, "$1", None, {"ts": 1})
        await receipts.insert_receipt(ROOM, "m.read", ALICE, "$2", "main", {"ts": 2})
        await receipts.insert_receipt(ROOM, "m.read", ALICE, "$3", "$root", {"ts": 3})
        self.assertEqual(
            await page_all(receipts, 100),
            [
                (1, [ROOM, "m.read", ALICE, "$1", None, {"ts": 1}]),
                (2, [ROOM, "m.read", ALICE, "$2", "main", {"ts": 2}]),
                (3, [ROOM, "m.read", ALICE, "$3", "$root", {"ts": 3}]),
            ],
        )

    async def test_new_receipt_replaces_the_previous_one(self) -> None:
        """A newer receipt of the same key replaces the old row at a new stream id."""
        stores, _ = await open_test_stores(self)
        receipts = stores.receipts
        await receipts.insert_receipt(ROOM, "m.read", ALICE, "$1", None, {"ts": 1})
        await receipts.insert_receipt(ROOM, "m.read", ALICE, "$t", "$root", {})
        await receipts.insert_receipt(ROOM, "m.read", BOB, "$1", None, {})
        stream_id = await receipts.insert_receipt(ROOM, "m.read", ALICE, "$9", None, {})
        self.assertEqual(stream_id, 4)
        self.assertEqual(
            await receipts.get_receipt(ROOM, "m.read", ALICE, None), (4, "$9", {})
        )
        self.assertEqual(
            [token for token, _ in await page_all(receipts, 100)], [2, 3, 4]
        )

    async def test_threaded_receipt_replaces_only_its_thread(self) -> None:
        """A thread receipt replaces that thread's receipt and no other."""
        stores, _ = await open_test_stores(self)
        receipts = stores.receipts
        await receipts.insert_receipt(ROOM, "m.read", ALICE, "$a", "$root", {})
        await receipts.insert_receipt(ROOM, "m.read", ALICE, "$b", "$other", {})
        await receipts.insert_receipt(ROOM, "m.read", ALICE, "$c", "$root", {})
        self.assertEqual(
            await receipts.get_receipt(ROOM, "m.read", ALICE, "$root"), (3, "$c", {})
        )
        self.assertEqual(
            await receipts.get_receipt(ROOM, "m.read", ALICE, "$other"), (2, "$b", {})
        )
        self.assertIsNone(await receipts.get_receipt(ROOM, "m.read", ALICE, None))

    async def test_paging_returns_every_row_once(self) -> None:
        """Paged with any small target, the rows are all the receipts, in order."""
        stores, _ = await open_test_stores(self)
        receipts = stores.receipts
        for i in range(23):
            await receipts.insert_receipt(ROOM, "m.read", f"@u{i}:x", f"${i}", None, {})
        everything = await page_all(receipts, 1000)
        self.assertEqual([token for token, _ in everything], list(range(1, 24)))
        for limit in (1, 2, 5, 22, 23, 24):
            self.assertEqual(await page_all(receipts, limit), everything)

    async def test_limited_page(self) -> None:
        """A full page says limited and ends at its last whole token."""
        stores, _ = await open_test_stores(self)
        receipts = stores.receipts
        for i in range(5):
            await receipts.insert_receipt(ROOM, "m.read", f"@u{i}:x", f"${i}", None, {})
        page, upto, limited = await receipts.get_updates("master", 0, 5, 3)
        self.assertEqual([token for token, _ in page], [1, 2])
        self.assertEqual((upto, limited), (2, True))

    async def test_data_is_stored_as_compact_json(self) -> None:
        """Receipt data is stored as compact JSON text and comes back decoded."""
        stores, _ = await open_test_stores(self)
        await stores.receipts.insert_receipt(
            ROOM, "m.read", ALICE, "$1", None, {"ts": 5, "é": [1, 2]}
        )
        rows = await stores.db.execute("data", "SELECT data FROM receipts_linearized")
        self.assertEqual(rows, [('{"ts":5,"\\u00e9":[1,2]}',)])

    async def test_reproduces_synapse_rows(self) -> None:
        """The receipts of Synapse's capture, stored here, give Synapse's rows."""
        expected = wire_json("http-get_repl_stream_updates-receipts.json")["updates"]
        stores, _ = await open_test_stores(self)
        async with stores.receipts_id_gen.get_next():
            pass  # The capture starts at token 2.
        for _, row in expected:
            await stores.receipts.insert_receipt(*row)
        rows = await page_all(stores.receipts, 100)
        self.assertEqual(rows, [(token, row) for token, row in expected])
        for _, row in rows:
            self.assertEqual(
                ReceiptsStream.row_to_json(ReceiptsStream.parse_row(row)), row
            )

    async def test_notify_after_each_write(self) -> None:
        """notify is poked after each committed receipt."""
        stores, pokes = await open_test_stores(self)
        before = pokes.count
        await stores.receipts.insert_receipt(ROOM, "m.read", ALICE, "$1", None, {})
        self.assertGreater(pokes.count, before)
