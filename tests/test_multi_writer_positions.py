"""Positions of streams with several writers, without a database: the
streamer's periodic announcements, POSITION after rows when a writer's
position went past them, the reader's stream token over several writers, and
the data handler that feeds other writers' positions to an id generator."""

from __future__ import annotations

from typing import Final

from twisted.internet.task import Clock

from synapse_replication.commands import PositionCommand, RdataCommand
from synapse_replication.data_handler import (
    ReplicationDataHandler,
    WriterReplicationDataHandler,
)
from synapse_replication.handler import ReplicationCommandHandler
from synapse_replication.streamer import ReplicationStreamer
from synapse_replication.streams import EventsStream
from synapse_replication.testing import TestReplicationDataHandler
from tests.fakes import FakeConnection, FakeStreamSource, TypedTestCase

WRITER: Final = "event_persister1"
EVENTS: Final = "events"


def ev(event_id: str) -> list[object]:
    return ["ev", [event_id, "!room", "m.room.message", None, None, None, None, False, False]]


class AnnounceTests(TypedTestCase):
    """An events writer publishing through a real command handler to a fake connection."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.source = FakeStreamSource()
        self.stream = EventsStream(WRITER, self.source.current_token, self.source.update_function)
        self.handler = ReplicationCommandHandler(
            instance_name=WRITER,
            clock=self.clock,
            streams={EVENTS: self.stream},
            data_handler=TestReplicationDataHandler(),
            writer_streams=[EVENTS],
        )
        self.conn = FakeConnection("reader")
        self.handler.new_connection(self.conn)

    def make_streamer(self, every: float | None) -> ReplicationStreamer:
        streamer = ReplicationStreamer(
            clock=self.clock,
            command_handler=self.handler,
            streams=[self.stream],
            announce_positions_every_s=every,
        )
        self.addCleanup(streamer.stop)
        return streamer

    def test_moved_position_is_announced_without_a_poke(self) -> None:
        """With announcements on, a position that moved goes out within one period."""
        self.make_streamer(1.0)
        self.source.advance(WRITER, 7)
        self.clock.advance(0.5)
        self.assertEqual(self.conn.sent, [])
        self.clock.advance(0.5)
        self.assertEqual(self.conn.sent, [PositionCommand(EVENTS, WRITER, 0, 7)])

    def test_only_moves_are_announced(self) -> None:
        """A period in which the position did not move sends nothing."""
        self.make_streamer(1.0)
        self.source.advance(WRITER, 3)
        self.clock.pump([1.0] * 3)
        self.source.advance(WRITER, 5)
        self.clock.pump([1.0] * 3)
        self.assertEqual(
            self.conn.sent,
            [PositionCommand(EVENTS, WRITER, 0, 3), PositionCommand(EVENTS, WRITER, 3, 5)],
        )

    def test_no_announcements_by_default(self) -> None:
        """Without the option, a position moving without a poke sends nothing."""
        self.make_streamer(None)
        self.source.advance(WRITER, 3)
        self.clock.pump([1.0] * 5)
        self.assertEqual(self.conn.sent, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_ends_the_announcements(self) -> None:
        """After `stop`, no timer is left and nothing more is announced."""
        streamer = self.make_streamer(1.0)
        streamer.stop()
        self.source.advance(WRITER, 3)
        self.clock.pump([1.0] * 3)
        self.assertEqual(self.conn.sent, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_position_past_the_last_row_follows_the_rows(self) -> None:
        """Rows, then POSITION when the writer's position is past its last row."""
        streamer = self.make_streamer(None)
        self.source.add(WRITER, 2, ev("$a"))
        self.source.advance(WRITER, 9)
        streamer.on_notifier_poke()
        self.assertEqual(
            self.conn.sent,
            [RdataCommand(EVENTS, WRITER, 2, ev("$a")), PositionCommand(EVENTS, WRITER, 2, 9)],
        )

    def test_bad_period_is_refused(self) -> None:
        """A period that is not positive is an error."""
        with self.assertRaises(ValueError):
            self.make_streamer(0)


class StreamTokenTests(TypedTestCase):
    def test_lowest_position_of_the_writers(self) -> None:
        """The stream token is the lowest position among the given writers."""
        data = ReplicationDataHandler({(EVENTS, "a"): 9, (EVENTS, "b"): 4, (EVENTS, "c"): 1})
        self.assertEqual(data.get_stream_token(EVENTS, ["a", "b"]), 4)
        data.on_position(EVENTS, "b", 12)
        self.assertEqual(data.get_stream_token(EVENTS, ["a", "b"]), 9)

    def test_unknown_writer_gives_no_token(self) -> None:
        """A writer not heard from yet (or no writer at all) gives None."""
        data = ReplicationDataHandler({(EVENTS, "a"): 9})
        self.assertIsNone(data.get_stream_token(EVENTS, ["a", "b"]))
        self.assertIsNone(data.get_stream_token(EVENTS, []))
        self.assertIsNone(data.get_stream_token("receipts", ["a"]))


class FakeIdGen:
    def __init__(self) -> None:
        self.advanced: list[tuple[str, int]] = []

    def advance(self, instance_name: str, new_id: int) -> None:
        self.advanced.append((instance_name, new_id))


class WriterDataHandlerTests(TypedTestCase):
    def test_positions_and_rows_advance_the_id_generator(self) -> None:
        """Rows and POSITIONs of another writer advance that stream's generator."""
        gen = FakeIdGen()
        data = WriterReplicationDataHandler({EVENTS: gen})
        data.on_rdata(EVENTS, "a", 3, [object()])
        data.on_position(EVENTS, "a", 8)
        data.on_position("typing", "a", 4)
        self.assertEqual(gen.advanced, [("a", 3), ("a", 8)])
        self.assertEqual(data.get_position(EVENTS, "a"), 8)

    def test_never_advances_backwards(self) -> None:
        """A stale position gives the generator the position already reached."""
        gen = FakeIdGen()
        data = WriterReplicationDataHandler({EVENTS: gen})
        data.on_position(EVENTS, "a", 8)
        data.on_position(EVENTS, "a", 5)
        self.assertEqual(gen.advanced, [("a", 8), ("a", 8)])
