"""Tests for synapse_replication.streamer: the source side of replication."""

from __future__ import annotations

from typing import Any, Final

from twisted.internet.task import Clock

from synapse_replication._json import JsonValue
from synapse_replication.commands import Command, PositionCommand, RdataCommand
from synapse_replication.handler import ReplicationCommandHandler
from synapse_replication.streamer import ReplicationStreamer
from synapse_replication.streams import EventsStream, Stream, TypingStream
from synapse_replication.testing import TestReplicationDataHandler
from tests.fakes import (
    FakeConnection,
    FakeStreamSource,
    SourceError,
    TypedTestCase,
    capture_logs,
)

MASTER: Final = "master"


def room(name: str) -> JsonValue:
    """A `typing` row for room `name` with nobody typing."""
    return [name, []]


def typing_rdata(token: int | None, name: str) -> RdataCommand:
    return RdataCommand("typing", MASTER, token, room(name))


def ev(event_id: str) -> JsonValue:
    return ["ev", [event_id, "!room", "m.room.message", None, None, None, None, False, False]]


class StreamerTestCase(TypedTestCase):
    """A writer `MASTER` publishing `typing` (and `events`) from in-memory sources
    through a real command handler to fake connections."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.typing_source = FakeStreamSource()
        self.events_source = FakeStreamSource()
        self.logs = capture_logs(self.addCleanup)
        self.typing = TypingStream(
            MASTER, self.typing_source.current_token, self.typing_source.update_function
        )
        self.events = EventsStream(
            MASTER, self.events_source.current_token, self.events_source.update_function
        )
        self.handler = ReplicationCommandHandler(
            instance_name=MASTER,
            clock=self.clock,
            streams={"typing": self.typing, "events": self.events},
            data_handler=TestReplicationDataHandler(),
            writer_streams=["typing", "events"],
        )

    def make_streamer(
        self, *, with_events: bool = False, target_row_count: int = 100
    ) -> ReplicationStreamer:
        streams: list[Stream[Any]] = [self.typing]
        if with_events:
            streams.append(self.events)
        return ReplicationStreamer(
            clock=self.clock,
            command_handler=self.handler,
            streams=streams,
            target_row_count=target_row_count,
        )

    def connect(self, name: str = "worker1") -> FakeConnection:
        conn = FakeConnection(name)
        self.handler.new_connection(conn)
        return conn


class PublishTests(StreamerTestCase):
    def test_rows_published_as_rdata_with_batches(self) -> None:
        """New rows go out in order; all but the last row of a shared token as `batch`."""
        streamer = self.make_streamer()
        conn = self.connect()
        self.typing_source.add(MASTER, 1, room("!a"))
        for name in ("!b", "!c", "!d"):
            self.typing_source.add(MASTER, 2, room(name))
        self.typing_source.add(MASTER, 3, room("!e"))
        streamer.on_notifier_poke()
        self.successResultOf(streamer.wait_until_idle())
        self.assertEqual(
            conn.sent,
            [
                typing_rdata(1, "!a"),
                typing_rdata(None, "!b"),
                typing_rdata(None, "!c"),
                typing_rdata(2, "!d"),
                typing_rdata(3, "!e"),
            ],
        )
        self.assertEqual(self.typing.last_token, 3)

    def test_every_poke_publishes(self) -> None:
        """A poke after an earlier run (that finished at once) publishes the new rows too."""
        streamer = self.make_streamer()
        conn = self.connect()
        self.typing_source.add(MASTER, 1, room("!a"))
        streamer.on_notifier_poke()
        self.typing_source.add(MASTER, 2, room("!b"))
        streamer.on_notifier_poke()
        self.typing_source.add(MASTER, 3, room("!c"))
        streamer.on_notifier_poke()
        self.successResultOf(streamer.wait_until_idle())
        self.assertEqual(
            conn.sent, [typing_rdata(1, "!a"), typing_rdata(2, "!b"), typing_rdata(3, "!c")]
        )

    def test_rows_sent_on_every_connection(self) -> None:
        """Each connection gets the same commands."""
        streamer = self.make_streamer()
        conn1 = self.connect("one")
        conn2 = self.connect("two")
        self.typing_source.add(MASTER, 1, room("!a"))
        streamer.on_notifier_poke()
        self.assertEqual(conn1.sent, [typing_rdata(1, "!a")])
        self.assertEqual(conn2.sent, [typing_rdata(1, "!a")])

    def test_token_moved_without_rows_sends_position(self) -> None:
        """The token moving with no row sends POSITION(last, current)."""
        streamer = self.make_streamer()
        conn = self.connect()
        self.typing_source.add(MASTER, 2, room("!a"))
        streamer.on_notifier_poke()
        self.typing_source.advance(MASTER, 5)
        streamer.on_notifier_poke()
        self.successResultOf(streamer.wait_until_idle())
        self.assertEqual(
            conn.sent, [typing_rdata(2, "!a"), PositionCommand("typing", MASTER, 2, 5)]
        )
        self.assertEqual(self.typing.last_token, 5)

    def test_nothing_new_sends_nothing(self) -> None:
        """A poke with the token unchanged sends no command and asks the source nothing."""
        streamer = self.make_streamer()
        conn = self.connect()
        self.typing_source.add(MASTER, 1, room("!a"))
        streamer.on_notifier_poke()
        streamer.on_notifier_poke()
        self.successResultOf(streamer.wait_until_idle())
        self.assertEqual(conn.sent, [typing_rdata(1, "!a")])
        self.assertEqual(self.typing_source.calls, [(MASTER, 0, 1, 100)])


class NoConnectionTests(StreamerTestCase):
    def test_no_connection_advances_without_sending(self) -> None:
        """With nobody connected, streams skip ahead; a later reader gets only later rows."""
        streamer = self.make_streamer()
        self.typing_source.add(MASTER, 1, room("!old1"))
        self.typing_source.add(MASTER, 2, room("!old2"))
        streamer.on_notifier_poke()
        self.successResultOf(streamer.wait_until_idle())
        self.assertEqual(self.typing.last_token, 2)
        self.assertEqual(self.typing_source.calls, [])

        conn = self.connect()
        streamer.on_notifier_poke()
        self.assertEqual(conn.sent, [])
        self.typing_source.add(MASTER, 3, room("!new"))
        streamer.on_notifier_poke()
        self.successResultOf(streamer.wait_until_idle())
        self.assertEqual(conn.sent, [typing_rdata(3, "!new")])
        self.assertEqual(self.typing_source.calls, [(MASTER, 2, 3, 100)])


class LoopTests(StreamerTestCase):
    def test_limited_updates_loop_until_done(self) -> None:
        """A limited update function is called again until every row is sent, each once."""
        streamer = self.make_streamer(target_row_count=2)
        conn = self.connect()
        for t in range(1, 6):
            self.typing_source.add(MASTER, t, room(f"!{t}"))
        streamer.on_notifier_poke()
        self.successResultOf(streamer.wait_until_idle())
        self.assertEqual(conn.sent, [typing_rdata(t, f"!{t}") for t in range(1, 6)])
        self.assertEqual(
            self.typing_source.calls, [(MASTER, 0, 5, 2), (MASTER, 2, 5, 2), (MASTER, 4, 5, 2)]
        )

    def test_limited_never_splits_a_token(self) -> None:
        """Rows of one token spread over a limit still go out as one batch."""
        streamer = self.make_streamer(target_row_count=2)
        conn = self.connect()
        self.typing_source.add(MASTER, 1, room("!a"))
        for name in ("!b", "!c", "!d"):
            self.typing_source.add(MASTER, 2, room(name))
        self.typing_source.add(MASTER, 3, room("!e"))
        streamer.on_notifier_poke()
        self.assertEqual(
            conn.sent,
            [
                typing_rdata(1, "!a"),
                typing_rdata(None, "!b"),
                typing_rdata(None, "!c"),
                typing_rdata(2, "!d"),
                typing_rdata(3, "!e"),
            ],
        )

    def test_pokes_during_a_run_coalesce(self) -> None:
        """Pokes while a run waits are folded into one more pass; nothing is lost or repeated."""
        streamer = self.make_streamer(target_row_count=2)
        conn = self.connect()
        self.typing_source.add(MASTER, 1, room("!1"))
        self.typing_source.add(MASTER, 2, room("!2"))
        self.typing_source.block_next()
        streamer.on_notifier_poke()
        idle = streamer.wait_until_idle()
        self.assertNoResult(idle)
        for t in range(3, 6):
            self.typing_source.add(MASTER, t, room(f"!{t}"))
            streamer.on_notifier_poke()
        self.assertEqual(self.typing_source.calls, [(MASTER, 0, 2, 2)])
        self.assertEqual(conn.sent, [])

        self.typing_source.release()
        self.successResultOf(idle)
        self.assertEqual(conn.sent, [typing_rdata(t, f"!{t}") for t in range(1, 6)])
        self.assertEqual(
            self.typing_source.calls, [(MASTER, 0, 2, 2), (MASTER, 2, 5, 2), (MASTER, 4, 5, 2)]
        )

    def test_wait_until_idle_fires_at_once_when_idle(self) -> None:
        """wait_until_idle fires immediately when nothing is running."""
        streamer = self.make_streamer()
        self.successResultOf(streamer.wait_until_idle())

    def test_poke_after_blocked_run_starts_new_run(self) -> None:
        """After a run that waited has finished, a new poke starts another run."""
        streamer = self.make_streamer()
        conn = self.connect()
        self.typing_source.add(MASTER, 1, room("!1"))
        self.typing_source.block_next()
        streamer.on_notifier_poke()
        self.typing_source.release()
        self.successResultOf(streamer.wait_until_idle())
        self.typing_source.add(MASTER, 2, room("!2"))
        streamer.on_notifier_poke()
        self.successResultOf(streamer.wait_until_idle())
        self.assertEqual(conn.sent, [typing_rdata(1, "!1"), typing_rdata(2, "!2")])


class FailureTests(StreamerTestCase):
    def test_failing_stream_does_not_stop_others(self) -> None:
        """A stream whose source fails is logged; the other streams still publish."""
        streamer = self.make_streamer(with_events=True)
        conn = self.connect()
        self.typing_source.add(MASTER, 1, room("!a"))
        self.events_source.add(MASTER, 7, ev("$7"))
        self.typing_source.fail_next()
        streamer.on_notifier_poke()
        self.successResultOf(streamer.wait_until_idle())
        expected: list[Command] = [RdataCommand("events", MASTER, 7, ev("$7"))]
        self.assertEqual(conn.sent, expected)
        self.assertEqual(len(self.flushLoggedErrors(SourceError)), 1)
        self.assertIn("Failed to publish stream 'typing'", " ".join(self.logs.messages()))

    def test_failed_stream_retried_on_next_poke(self) -> None:
        """Rows a failing source held back are sent on the next poke, from where it stopped."""
        streamer = self.make_streamer()
        conn = self.connect()
        self.typing_source.add(MASTER, 1, room("!a"))
        self.typing_source.fail_next()
        streamer.on_notifier_poke()
        self.assertEqual(conn.sent, [])
        self.assertEqual(self.typing.last_token, 0)
        self.typing_source.add(MASTER, 2, room("!b"))
        streamer.on_notifier_poke()
        self.successResultOf(streamer.wait_until_idle())
        self.assertEqual(conn.sent, [typing_rdata(1, "!a"), typing_rdata(2, "!b")])
        self.assertEqual(len(self.flushLoggedErrors(SourceError)), 1)
