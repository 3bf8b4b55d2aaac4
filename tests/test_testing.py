"""The public testing helpers: `TestReplicationDataHandler` records what it is
given, and the injection helpers write what they say they write."""

from __future__ import annotations

import random
import re
from typing import Any, Final, cast

from twisted.internet import reactor as _global_reactor
from twisted.internet.interfaces import IReactorCore
from twisted.internet.task import Clock
from twisted.trial import unittest

from synapse_replication.storage import Stores, TypingWriter, open_sqlite_store
from synapse_replication.streams import EventsStream
from synapse_replication.streams.events import (
    EventsStreamCurrentStateRow,
    EventsStreamEventRow,
    EventsStreamRow,
)
from synapse_replication.testing import RdataCall, TestReplicationDataHandler, inject

REACTOR: Final = cast(IReactorCore, _global_reactor)
WRITER: Final = "master"
ROOM: Final = "!room:test.local"
ALICE: Final = "@alice:test.local"
BOB: Final = "@bob:test.local"


class TestReplicationDataHandlerTests(unittest.SynchronousTestCase):
    def test_records_rows_and_calls(self) -> None:
        """Rows are recorded one by one and, grouped as they came, per call."""
        dh = TestReplicationDataHandler()
        dh.on_rdata("events", WRITER, 3, ["a", "b"])
        dh.on_rdata("typing", WRITER, 1, ["c"])
        self.assertEqual(
            dh.received_rdata_rows, [("events", 3, "a"), ("events", 3, "b"), ("typing", 1, "c")]
        )
        self.assertEqual(
            dh.rdata_calls,
            [RdataCall("events", WRITER, 3, ("a", "b")), RdataCall("typing", WRITER, 1, ("c",))],
        )
        self.assertEqual(dh.positions(), {("events", WRITER): 3, ("typing", WRITER): 1})

    def test_rows_for_filters_by_stream(self) -> None:
        """`rows_for` gives one stream's (token, row) pairs in arrival order."""
        dh = TestReplicationDataHandler()
        dh.on_rdata("events", WRITER, 3, ["a"])
        dh.on_rdata("receipts", WRITER, 1, ["r"])
        dh.on_rdata("events", "other", 2, ["b", "c"])
        self.assertEqual(dh.rows_for("events"), [(3, "a"), (2, "b"), (2, "c")])
        self.assertEqual(dh.rows_for("receipts"), [(1, "r")])
        self.assertEqual(dh.rows_for("typing"), [])

    def test_records_positions_and_resets(self) -> None:
        """POSITIONs and stream resets are recorded and move the position."""
        dh = TestReplicationDataHandler({("typing", WRITER): 9})
        dh.on_position("events", WRITER, 5)
        dh.on_stream_reset("typing", WRITER, 0)
        self.assertEqual(dh.positions_received, [("events", WRITER, 5)])
        self.assertEqual(dh.resets, [("typing", WRITER, 0)])
        self.assertEqual(dh.positions(), {("events", WRITER): 5, ("typing", WRITER): 0})

    def test_clear_forgets_records_but_keeps_positions(self) -> None:
        """`clear` empties every record and leaves the positions alone."""
        dh = TestReplicationDataHandler()
        dh.on_rdata("events", WRITER, 3, ["a"])
        dh.on_position("receipts", WRITER, 4)
        dh.on_stream_reset("typing", WRITER, 0)
        dh.clear()
        self.assertEqual(dh.received_rdata_rows, [])
        self.assertEqual(dh.rdata_calls, [])
        self.assertEqual(dh.positions_received, [])
        self.assertEqual(dh.resets, [])
        self.assertEqual(dh.rows_for("events"), [])
        self.assertEqual(
            dh.positions(),
            {("events", WRITER): 3, ("receipts", WRITER): 4, ("typing", WRITER): 0},
        )

    def test_records_again_after_clear(self) -> None:
        """After `clear`, new rows are recorded from scratch."""
        dh = TestReplicationDataHandler()
        dh.on_rdata("events", WRITER, 3, ["a"])
        dh.clear()
        dh.on_rdata("events", WRITER, 4, ["b"])
        self.assertEqual(dh.rows_for("events"), [(4, "b")])
        self.assertEqual(dh.rdata_calls, [RdataCall("events", WRITER, 4, ("b",))])


class InjectTests(unittest.TestCase):
    async def _stores(self) -> Stores:
        stores = await open_sqlite_store(self.mktemp(), WRITER, REACTOR, lambda: None)
        self.addCleanup(stores.close)
        return stores

    async def _rows(self, stores: Stores) -> list[tuple[int, EventsStreamRow]]:
        raw = await stores.events.get_all_rows_unpaged(WRITER)
        return [(token, EventsStream.parse_row(row)) for token, row in raw]

    async def test_inject_message(self) -> None:
        """`inject_message` writes one non-state, unrelated, accepted event."""
        stores = await self._stores()
        event_id = await inject.inject_message(stores.events, ROOM, ALICE, "hi")
        self.assertEqual(
            await self._rows(stores),
            [
                (
                    1,
                    EventsStreamEventRow(
                        event_id, ROOM, "m.room.message", None, None, None, None, False, False
                    ),
                )
            ],
        )

    async def test_inject_message_in_a_thread(self) -> None:
        """`inject_message` with `relates_to` writes a reply related to its root."""
        stores = await self._stores()
        root = await inject.inject_message(stores.events, ROOM, ALICE, "root")
        reply = await inject.inject_message(stores.events, ROOM, BOB, "reply", relates_to=root)
        rows = await self._rows(stores)
        self.assertEqual([t for t, _ in rows], [1, 2])
        row = rows[1][1]
        assert isinstance(row, EventsStreamEventRow)
        self.assertEqual((row.event_id, row.relates_to), (reply, root))

    async def test_inject_outlier_message(self) -> None:
        """`inject_message` with `outlier` writes an outlier that changes nothing else."""
        stores = await self._stores()
        event_id = await inject.inject_message(stores.events, ROOM, ALICE, outlier=True)
        ((_, row),) = await self._rows(stores)
        assert isinstance(row, EventsStreamEventRow)
        self.assertEqual((row.event_id, row.outlier), (event_id, True))

    async def test_inject_state(self) -> None:
        """`inject_state` writes a state event that becomes the current state."""
        stores = await self._stores()
        event_id = await inject.inject_state(
            stores.events, ROOM, "m.room.topic", "", ALICE, {"topic": "t"}
        )
        self.assertEqual(
            await self._rows(stores),
            [
                (
                    1,
                    EventsStreamEventRow(
                        event_id, ROOM, "m.room.topic", "", None, None, None, False, False
                    ),
                ),
                (1, EventsStreamCurrentStateRow(ROOM, "m.room.topic", "", event_id)),
            ],
        )
        self.assertEqual(
            await stores.events.get_current_state(ROOM), {("m.room.topic", ""): event_id}
        )

    async def test_inject_member(self) -> None:
        """`inject_member` writes a member event with its membership and state key."""
        stores = await self._stores()
        event_id = await inject.inject_member(stores.events, ROOM, BOB, "invite", sender=ALICE)
        rows = await self._rows(stores)
        self.assertEqual(
            rows[0][1],
            EventsStreamEventRow(
                event_id, ROOM, "m.room.member", BOB, None, None, "invite", False, False
            ),
        )
        self.assertEqual(
            await stores.events.get_current_state(ROOM), {("m.room.member", BOB): event_id}
        )

    async def test_inject_redaction(self) -> None:
        """`inject_redaction` writes a redaction naming the redacted event."""
        stores = await self._stores()
        target = await inject.inject_message(stores.events, ROOM, BOB, "oops")
        redaction = await inject.inject_redaction(stores.events, ROOM, ALICE, target)
        row = (await self._rows(stores))[1][1]
        assert isinstance(row, EventsStreamEventRow)
        self.assertEqual(
            (row.event_id, row.type, row.redacts), (redaction, "m.room.redaction", target)
        )

    async def test_inject_outlier_then_de_outlier(self) -> None:
        """The event is stored as an outlier, then streamed again as a real event."""
        stores = await self._stores()
        event_id = await inject.inject_outlier_then_de_outlier(stores.events, ROOM, ALICE)
        rows = await self._rows(stores)
        self.assertEqual([t for t, _ in rows], [1, 2])
        for _, row in rows:
            assert isinstance(row, EventsStreamEventRow)
            # The store reads the flag as it is now (as Synapse does).
            self.assertEqual((row.event_id, row.outlier), (event_id, False))
        count = await stores.db.execute(
            "count", "SELECT COUNT(*) FROM ex_outlier_stream WHERE event_id = ?", event_id
        )
        self.assertEqual(count, [(1,)])

    async def test_inject_state_change(self) -> None:
        """`inject_state_change` writes every change at one new stream id."""
        stores = await self._stores()
        topic = await inject.inject_state(stores.events, ROOM, "m.room.topic", "", ALICE)
        token = await inject.inject_state_change(
            stores.events, ROOM, {("m.room.topic", ""): None, ("m.room.name", ""): "$name"}
        )
        self.assertEqual(token, 2)
        rows = await self._rows(stores)
        self.assertEqual(
            [r for t, r in rows if t == token],
            [
                EventsStreamCurrentStateRow(ROOM, "m.room.name", "", "$name"),
                EventsStreamCurrentStateRow(ROOM, "m.room.topic", "", None),
            ],
        )
        self.assertNotIn(topic, (await stores.events.get_current_state(ROOM)).values())
        self.assertEqual(
            await stores.events.get_current_state(ROOM), {("m.room.name", ""): "$name"}
        )

    async def test_inject_state_change_without_changes(self) -> None:
        """`inject_state_change` with nothing to change writes nothing."""
        stores = await self._stores()
        self.assertIsNone(await inject.inject_state_change(stores.events, ROOM, {}))
        self.assertEqual(await self._rows(stores), [])

    async def test_inject_receipt(self) -> None:
        """`inject_receipt` stores unthreaded, main and threaded receipts apart."""
        stores = await self._stores()
        receipts = stores.receipts
        tokens = [
            await inject.inject_receipt(receipts, ROOM, ALICE, "$a", ts=1),
            await inject.inject_receipt(receipts, ROOM, ALICE, "$b", thread_id="main", ts=2),
            await inject.inject_receipt(receipts, ROOM, ALICE, "$c", thread_id="$root", ts=3),
            await inject.inject_receipt(
                receipts, ROOM, ALICE, "$d", receipt_type="m.read.private", ts=4
            ),
        ]
        self.assertEqual(tokens, [1, 2, 3, 4])
        self.assertEqual(
            [
                await receipts.get_receipt(ROOM, "m.read", ALICE, None),
                await receipts.get_receipt(ROOM, "m.read", ALICE, "main"),
                await receipts.get_receipt(ROOM, "m.read", ALICE, "$root"),
                await receipts.get_receipt(ROOM, "m.read.private", ALICE, None),
            ],
            [(1, "$a", {"ts": 1}), (2, "$b", {"ts": 2}), (3, "$c", {"ts": 3}), (4, "$d", {"ts": 4})],
        )

    def test_inject_typing(self) -> None:
        """`inject_typing` starts and stops a user typing in a room."""
        clock = Clock()
        writer = TypingWriter(clock, WRITER, lambda: None)
        self.addCleanup(writer.stop)
        inject.inject_typing(writer, ROOM, ALICE)
        inject.inject_typing(writer, ROOM, BOB, timeout_ms=1_000)
        self.assertEqual(writer.typing_state(), {ROOM: (ALICE, BOB)})
        inject.inject_typing(writer, ROOM, ALICE, typing=False)
        self.assertEqual(writer.typing_state(), {ROOM: (BOB,)})
        clock.advance(1)
        self.assertEqual(writer.typing_state(), {ROOM: ()})
        self.assertEqual(writer.current_token(WRITER), 4)


class IdentifierTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        # Leave the helpers' generator unpredictable for whoever comes next.
        self.addCleanup(inject.seed, random.randrange(2**63))

    def _some_ids(self) -> list[Any]:
        return [inject.make_event_id(), inject.make_room_id(), inject.make_event_id()]

    def test_seed_makes_ids_repeatable(self) -> None:
        """The same seed gives the same identifiers; another seed, others."""
        inject.seed(42)
        first = self._some_ids()
        inject.seed(42)
        self.assertEqual(self._some_ids(), first)
        inject.seed(43)
        self.assertNotEqual(self._some_ids(), first)

    def test_ids_look_like_matrix_ids(self) -> None:
        """Event ids are ``$`` and 43 url-safe characters; room ids name their server."""
        for _ in range(50):
            self.assertRegex(inject.make_event_id(), r"\A\$[A-Za-z0-9_-]{43}\Z")
            self.assertRegex(
                inject.make_room_id("example.org"), r"\A![A-Za-z0-9_-]{18}:example\.org\Z"
            )
        self.assertTrue(re.fullmatch(r"!.{18}:example\.com", inject.make_room_id()))
