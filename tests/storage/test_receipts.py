"""Tests for synapse_replication.storage.receipts: receipts and their stream rows."""

from __future__ import annotations

from twisted.logger import LogLevel
from twisted.trial.unittest import TestCase

from synapse_replication.storage.receipts import ReceiptsStore
from synapse_replication.streams import ReceiptsStream, StreamUpdate
from synapse_replication.streams.parsed import UpdateFunctionWithParsed, parse_updates
from tests.fakes import capture_logs
from tests.storage._helpers import ALICE, ROOM, open_test_stores
from tests.wire_vectors import wire_json

BOB = "@bob:test.local"


async def page_all(store: ReceiptsStore, limit: int) -> list[StreamUpdate]:
    """Every row, paging with `limit` while limited."""
    upto = store.current_token("master")
    updates: list[StreamUpdate] = []
    token = 0
    while True:
        # The parsed form of the same page, for a catch-up, is the JSON form
        # as the handler would parse and group it.
        parsed = await store.get_parsed_updates("master", token, upto, limit)
        page, new_token, limited = await store.get_updates("master", token, upto, limit)
        assert parsed == (parse_updates(ReceiptsStream, page), new_token, limited), (parsed, page)
        updates.extend(page)
        token = new_token
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

    async def test_rows_sharing_a_token_are_one_parsed_group(self) -> None:
        """Receipts written at one stream id are one group of the parsed form,
        in the order of the JSON form, and a page never splits them."""
        stores, _ = await open_test_stores(self)
        receipts = stores.receipts
        await receipts.insert_receipt(ROOM, "m.read", ALICE, "$1", None, {})
        # Two more receipts at the next id, as a batch written at one id would be.
        await receipts.insert_receipt(ROOM, "m.read", BOB, "$2", None, {"ts": 2})
        await stores.db.execute(
            "share",
            "INSERT INTO receipts_linearized (stream_id, instance_name, room_id,"
            " receipt_type, user_id, event_id, thread_id, data)"
            " VALUES (2, 'master', ?, 'm.read', '@carol:x', '$3', 'main', '{}')",
            ROOM,
        )
        await receipts.insert_receipt(ROOM, "m.read", "@dan:x", "$4", None, {})
        for limit in (1, 2, 3, 100):
            await page_all(receipts, limit)
        groups, upto, limited = await receipts.get_parsed_updates("master", 0, 3, 4)
        self.assertEqual(
            [(t, [r.user_id for r in rows]) for t, rows in groups],
            [(1, [ALICE]), (2, [BOB, "@carol:x"])],
        )
        self.assertEqual((upto, limited), (2, True))

    async def test_parsed_form_drops_data_that_is_not_an_object(self) -> None:
        """A stored receipt whose data is not a JSON object is what `parse_row`
        refuses: the parsed form drops it with an error, as the JSON form
        parsed by the handler would, and keeps the other rows."""
        stores, _ = await open_test_stores(self)
        receipts = stores.receipts
        for i in range(3):
            await receipts.insert_receipt(ROOM, "m.read", f"@u{i}:x", f"${i}", None, {})
        await stores.db.execute(
            "corrupt", "UPDATE receipts_linearized SET data = '[1]' WHERE stream_id = 2"
        )
        logs = capture_logs(self.addCleanup)
        groups, upto, limited = await receipts.get_parsed_updates("master", 0, 3, 100)
        self.assertEqual([t for t, _ in groups], [1, 3])
        self.assertEqual((upto, limited), (3, False))
        errors = logs.messages(LogLevel.error)
        self.assertEqual(len(errors), 1, errors)
        self.assertIn("token 2", errors[0])
        self.assertIn("[1]", errors[0])
        page, _, _ = await receipts.get_updates("master", 0, 3, 100)
        self.assertEqual(groups, parse_updates(ReceiptsStream, page))

    async def test_update_function_offers_the_parsed_form(self) -> None:
        """`get_updates` is the update function, with `get_parsed_updates` as
        the parsed form a catch-up uses."""
        stores, _ = await open_test_stores(self)
        update_function = stores.receipts.get_updates
        assert isinstance(update_function, UpdateFunctionWithParsed)
        await stores.receipts.insert_receipt(ROOM, "m.read", ALICE, "$1", None, {"ts": 1})
        self.assertEqual(
            await update_function.parsed("master", 0, 1, 10),
            await stores.receipts.get_parsed_updates("master", 0, 1, 10),
        )
        self.assertEqual(
            await update_function("master", 0, 1, 10),
            ([(1, [ROOM, "m.read", ALICE, "$1", None, {"ts": 1}])], 1, False),
        )

    async def test_notify_after_each_write(self) -> None:
        """notify is poked after each committed receipt."""
        stores, pokes = await open_test_stores(self)
        before = pokes.count
        await stores.receipts.insert_receipt(ROOM, "m.read", ALICE, "$1", None, {})
        self.assertGreater(pokes.count, before)
