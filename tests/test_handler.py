"""Tests for synapse_replication.handler: the reader side of replication."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Final

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel

from synapse_replication._json import JsonValue
from synapse_replication.commands import (
    CancelTaskCommand,
    ClearUserSyncCommand,
    Command,
    FederationAckCommand,
    LockReleasedCommand,
    NewActiveTaskCommand,
    PositionCommand,
    RdataCommand,
    RemoteServerUpCommand,
    ReplicateCommand,
    UserIpCommand,
    UserSyncCommand,
)
from synapse_replication.data_handler import PositionKey
from synapse_replication.handler import (
    RESET_FROM_TOKEN,
    HandlerLimits,
    OtherCommandCallback,
    ReplicationCommandHandler,
)
from synapse_replication.interfaces import (
    HandlerResult,
    IReplicationConnection,
    dispatch_table,
)
from synapse_replication.streams import EventsStream, StreamUpdateResult, TypingStream
from synapse_replication.streams.events import EventsStreamEventRow
from synapse_replication.streams.parsed import (
    ParsedUpdateResult,
    UpdateFunctionWithParsed,
    parse_updates,
)
from synapse_replication.streams.typing import TypingStreamRow
from synapse_replication.testing import RdataCall, TestReplicationDataHandler
from tests.fakes import (
    BlockingDataHandler,
    FakeConnection,
    FakeStreamSource,
    SourceError,
    TypedTestCase,
    capture_logs,
)

READER: Final = "reader"
W: Final = "writer"
# Rows per update-function call of a catch-up with the default limits.
DEFAULT_ROWS: Final = HandlerLimits().catch_up_row_count


def ev(event_id: str) -> JsonValue:
    """An `events` stream `ev` row as on the wire."""
    return ["ev", [event_id, "!room", "m.room.message", None, None, None, None, False, False]]


def ev_row(event_id: str) -> EventsStreamEventRow:
    """The typed row of `ev(event_id)`."""
    return EventsStreamEventRow(
        event_id, "!room", "m.room.message", None, None, None, None, False, False
    )


def rdata(stream: str, token: int | None, row: JsonValue, instance: str = W) -> RdataCommand:
    return RdataCommand(stream, instance, token, row)


def position(stream: str, prev: int, new: int, instance: str = W) -> PositionCommand:
    return PositionCommand(stream, instance, prev, new)


class HandlerTestCase(TypedTestCase):
    """A reader (`READER`) following `typing` and `events`, whose sources are
    in-memory fakes."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.typing_source = FakeStreamSource()
        self.events_source = FakeStreamSource()
        self.logs = capture_logs(self.addCleanup)
        self.dh: TestReplicationDataHandler = TestReplicationDataHandler()

    def make_handler(
        self,
        positions: Mapping[PositionKey, int] | None = None,
        *,
        data_handler: TestReplicationDataHandler | None = None,
        limits: HandlerLimits | None = None,
        stream_writers: Mapping[str, Collection[str]] | None = None,
        writer_streams: Collection[str] = (),
        on_other_command: OtherCommandCallback | None = None,
    ) -> ReplicationCommandHandler:
        self.dh = data_handler or TestReplicationDataHandler(positions)
        typing = TypingStream(
            READER, self.typing_source.current_token, self.typing_source.update_function
        )
        events = EventsStream(
            READER, self.events_source.current_token, self.events_source.update_function
        )
        return ReplicationCommandHandler(
            instance_name=READER,
            clock=self.clock,
            streams={typing.NAME: typing, events.NAME: events},
            data_handler=self.dh,
            writer_streams=writer_streams,
            stream_writers=stream_writers,
            limits=limits,
            on_other_command=on_other_command,
        )

    def connect(self, handler: ReplicationCommandHandler, name: str = "master") -> FakeConnection:
        conn = FakeConnection(name)
        handler.new_connection(conn)
        return conn

    def add_events(self, instance: str, tokens: range) -> None:
        """One `ev` row per token, event id ``$<token>``."""
        for t in tokens:
            self.events_source.add(instance, t, ev(f"${t}"))

    def event_calls(self, instance: str, tokens: range) -> list[RdataCall]:
        """The `on_rdata` calls `add_events(instance, tokens)` rows should cause."""
        return [RdataCall("events", instance, t, (ev_row(f"${t}"),)) for t in tokens]


class RdataAfterPositionTests(HandlerTestCase):
    def test_rdata_before_position_is_dropped(self) -> None:
        """RDATA from a writer before any POSITION from it on the connection is dropped."""
        handler = self.make_handler({("typing", W): 5})
        conn = self.connect(handler)
        handler.on_rdata(conn, rdata("typing", 6, ["!r", ["@a:x"]]))
        self.assertEqual(self.dh.rdata_calls, [])
        self.assertEqual(self.dh.get_position("typing", W), 5)

    def test_rdata_after_position_is_delivered_typed(self) -> None:
        """After a POSITION, RDATA reaches on_rdata as the parsed row, with its token."""
        handler = self.make_handler({("typing", W): 5})
        conn = self.connect(handler)
        handler.on_position(conn, position("typing", 5, 5))
        handler.on_rdata(conn, rdata("typing", 6, ["!r", ["@a:x", "@b:x"]]))
        self.assertEqual(
            self.dh.rdata_calls,
            [RdataCall("typing", W, 6, (TypingStreamRow("!r", ("@a:x", "@b:x")),))],
        )
        self.assertEqual(self.dh.get_position("typing", W), 6)

    def test_position_on_another_connection_does_not_count(self) -> None:
        """A POSITION processed on one connection does not let RDATA in on another."""
        handler = self.make_handler({("typing", W): 5})
        conn1 = self.connect(handler, "one")
        conn2 = self.connect(handler, "two")
        handler.on_position(conn1, position("typing", 5, 5))
        handler.on_rdata(conn2, rdata("typing", 6, ["!r", []]))
        self.assertEqual(self.dh.rdata_calls, [])


class CatchUpTests(HandlerTestCase):
    def test_catch_up_loops_while_limited(self) -> None:
        """Reader behind prev_token: rows fetched in limited steps, each once, grouped by token."""
        src = self.events_source
        src.add(W, 1, ev("$a"))
        for eid in ("$b", "$c", "$d"):
            src.add(W, 2, ev(eid))
        src.add(W, 3, ev("$e"))
        src.add(W, 4, ev("$f"))
        src.add(W, 5, ev("$g"))
        handler = self.make_handler({("events", W): 1}, limits=HandlerLimits(catch_up_row_count=2))
        conn = self.connect(handler)
        handler.on_position(conn, position("events", 5, 6))
        self.assertEqual(src.calls, [(W, 1, 6, 2), (W, 2, 6, 2), (W, 4, 6, 2)])
        self.assertEqual(
            self.dh.rdata_calls,
            [
                RdataCall("events", W, 2, (ev_row("$b"), ev_row("$c"), ev_row("$d"))),
                RdataCall("events", W, 3, (ev_row("$e"),)),
                RdataCall("events", W, 4, (ev_row("$f"),)),
                RdataCall("events", W, 5, (ev_row("$g"),)),
            ],
        )
        self.assertEqual(self.dh.get_position("events", W), 6)
        self.assertEqual(self.dh.positions_received, [("events", W, 6)])

    def test_rdata_accepted_after_catch_up(self) -> None:
        """After a catch-up, the next RDATA is delivered and older ones are not."""
        self.add_events(W, range(1, 6))
        handler = self.make_handler({("events", W): 1})
        conn = self.connect(handler)
        handler.on_position(conn, position("events", 5, 5))
        handler.on_rdata(conn, rdata("events", 5, ev("$5")))
        handler.on_rdata(conn, rdata("events", 6, ev("$6")))
        self.assertEqual(self.dh.rdata_calls, self.event_calls(W, range(2, 7)))

    def test_fresh_reader_adopts_new_token_without_fetching(self) -> None:
        """A reader with no position starts at new_token and fetches nothing."""
        self.add_events(W, range(1, 11))
        handler = self.make_handler()
        conn = self.connect(handler)
        handler.on_position(conn, position("events", 3, 10))
        self.assertEqual(self.events_source.calls, [])
        self.assertEqual(self.dh.rdata_calls, [])
        self.assertEqual(self.dh.get_position("events", W), 10)
        self.assertEqual(self.dh.positions_received, [("events", W, 10)])

    def test_position_within_range_moves_without_fetching(self) -> None:
        """prev <= reader position <= new: nothing fetched, position moves to new."""
        self.add_events(W, range(1, 4))
        for current in (3, 5, 10):
            with self.subTest(current=current):
                self.events_source.calls.clear()
                handler = self.make_handler({("events", W): current})
                conn = self.connect(handler)
                handler.on_position(conn, position("events", 3, 10))
                self.assertEqual(self.events_source.calls, [])
                self.assertEqual(self.dh.rdata_calls, [])
                self.assertEqual(self.dh.get_position("events", W), 10)

    def test_rdata_at_or_below_position_is_discarded(self) -> None:
        """RDATA with a token at or below the reader's position is a duplicate and dropped."""
        handler = self.make_handler({("events", W): 10})
        conn = self.connect(handler)
        handler.on_position(conn, position("events", 10, 10))
        handler.on_rdata(conn, rdata("events", 9, ev("$9")))
        handler.on_rdata(conn, rdata("events", 10, ev("$10")))
        handler.on_rdata(conn, rdata("events", None, ev("$10b")))
        handler.on_rdata(conn, rdata("events", 10, ev("$10c")))
        handler.on_rdata(conn, rdata("events", 11, ev("$11")))
        self.assertEqual(self.dh.rdata_calls, self.event_calls(W, range(11, 12)))
        self.assertEqual(self.dh.get_position("events", W), 11)

    def test_malformed_row_in_catch_up_is_dropped(self) -> None:
        """A malformed row from the update function is logged and the others delivered."""
        self.events_source.add(W, 2, ev("$2"))
        self.events_source.add(W, 3, ["ev", ["$bad"]])
        self.events_source.add(W, 4, ev("$4"))
        handler = self.make_handler({("events", W): 1})
        conn = self.connect(handler)
        handler.on_position(conn, position("events", 4, 4))
        self.assertEqual(
            self.dh.rdata_calls,
            [
                RdataCall("events", W, 2, (ev_row("$2"),)),
                RdataCall("events", W, 4, (ev_row("$4"),)),
            ],
        )
        self.assertEqual(self.dh.get_position("events", W), 4)
        self.assertEqual(
            len([m for m in self.logs.messages(LogLevel.error) if "malformed row" in m]), 1
        )


class CatchUpPagingTests(HandlerTestCase):
    """The next page is fetched while one is delivered, never more than one ahead."""

    def test_next_page_fetched_while_delivering(self) -> None:
        """Page 2 is asked for before page 1 is delivered, page 3 only after."""
        self.add_events(W, range(1, 7))
        dh = BlockingDataHandler({("events", W): 0})
        dh.blocking.add("events")
        handler = self.make_handler(data_handler=dh, limits=HandlerLimits(catch_up_row_count=2))
        conn = self.connect(handler)
        handler.on_position(conn, position("events", 6, 6))
        self.assertEqual(self.events_source.calls, [(W, 0, 6, 2), (W, 2, 6, 2)])
        self.assertEqual(dh.arrivals, [("events", W, 1)])
        dh.release("events")
        dh.release("events")
        self.assertEqual(self.events_source.calls, [(W, 0, 6, 2), (W, 2, 6, 2), (W, 4, 6, 2)])
        while dh.waiting("events"):
            dh.release("events")
        self.assertEqual(dh.rdata_calls, self.event_calls(W, range(1, 7)))
        self.assertEqual(dh.get_position("events", W), 6)

    def test_failed_next_page_retried_from_delivered_rows(self) -> None:
        """The prefetch fails: the page fetched before it is still delivered,
        and the retry goes on from there."""
        self.add_events(W, range(1, 7))
        handler = self.make_handler(
            {("events", W): 0}, limits=HandlerLimits(catch_up_row_count=2)
        )
        conn = self.connect(handler)
        self.events_source.fail_next(1, after=1)
        handler.on_position(conn, position("events", 6, 6))
        self.assertEqual(self.dh.rdata_calls, self.event_calls(W, range(1, 3)))
        self.clock.advance(0.5)
        self.assertEqual(self.dh.rdata_calls, self.event_calls(W, range(1, 7)))
        self.assertEqual(self.events_source.calls[2:], [(W, 2, 6, 2), (W, 4, 6, 2)])
        self.assertEqual(len(self.flushLoggedErrors(SourceError)), 1)

    def test_data_handler_failure_with_page_in_flight(self) -> None:
        """The data handler fails while the next page, fetched meanwhile, has
        failed too: no unhandled error, and the retry delivers every row."""
        self.add_events(W, range(1, 7))
        dh = BlockingDataHandler({("events", W): 0})
        dh.blocking.add("events")
        handler = self.make_handler(data_handler=dh, limits=HandlerLimits(catch_up_row_count=2))
        conn = self.connect(handler)
        self.events_source.fail_next(1, after=1)
        handler.on_position(conn, position("events", 6, 6))
        self.assertEqual(self.events_source.calls, [(W, 0, 6, 2), (W, 2, 6, 2)])
        dh.fail("events", ValueError("data handler down"))
        dh.blocking.clear()
        self.clock.advance(0.5)
        self.assertEqual(dh.rdata_calls, self.event_calls(W, range(1, 7)))
        self.assertEqual(dh.get_position("events", W), 6)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(self.flushLoggedErrors(SourceError), [])

    def test_update_function_with_parsed_rows(self) -> None:
        """A source offering parsed rows is asked for them, not for JSON rows."""
        self.add_events(W, range(1, 5))
        json_calls: list[int] = []

        async def update(instance: str, low: int, high: int, count: int) -> StreamUpdateResult:
            json_calls.append(low)
            return await self.events_source.update_function(instance, low, high, count)

        async def parsed(instance: str, low: int, high: int, count: int) -> ParsedUpdateResult:
            updates, new_token, limited = await self.events_source.update_function(
                instance, low, high, count
            )
            return parse_updates(EventsStream, updates), new_token, limited

        handler = self.make_handler({("events", W): 0}, limits=HandlerLimits(catch_up_row_count=3))
        conn = self.connect(handler)
        # The source of `make_handler`'s events stream, offering parsed rows.
        handler._streams["events"] = EventsStream(
            READER, self.events_source.current_token, UpdateFunctionWithParsed(update, parsed)
        )
        handler.on_position(conn, position("events", 4, 4))
        self.assertEqual(json_calls, [])
        self.assertEqual(self.events_source.calls, [(W, 0, 4, 3), (W, 3, 4, 3)])
        self.assertEqual(self.dh.rdata_calls, self.event_calls(W, range(1, 5)))


class BatchTests(HandlerTestCase):
    def test_batch_rows_delivered_with_the_real_token(self) -> None:
        """`batch` rows are held and delivered with the row carrying the token, in one call."""
        handler = self.make_handler({("events", W): 6})
        conn = self.connect(handler)
        handler.on_position(conn, position("events", 6, 6))
        handler.on_rdata(conn, rdata("events", None, ev("$r1")))
        handler.on_rdata(conn, rdata("events", None, ev("$r2")))
        self.assertEqual(self.dh.rdata_calls, [])
        handler.on_rdata(conn, rdata("events", 7, ev("$r3")))
        self.assertEqual(
            self.dh.rdata_calls,
            [RdataCall("events", W, 7, (ev_row("$r1"), ev_row("$r2"), ev_row("$r3")))],
        )
        self.assertEqual(self.dh.get_position("events", W), 7)

    def test_batches_are_per_writer(self) -> None:
        """Batch rows of two writers of a stream are not mixed."""
        handler = self.make_handler({("events", "w1"): 0, ("events", "w2"): 0})
        conn = self.connect(handler)
        handler.on_position(conn, position("events", 0, 0, "w1"))
        handler.on_position(conn, position("events", 0, 0, "w2"))
        handler.on_rdata(conn, rdata("events", None, ev("$a1"), "w1"))
        handler.on_rdata(conn, rdata("events", None, ev("$b1"), "w2"))
        handler.on_rdata(conn, rdata("events", 1, ev("$a2"), "w1"))
        handler.on_rdata(conn, rdata("events", 1, ev("$b2"), "w2"))
        self.assertEqual(
            self.dh.rdata_calls,
            [
                RdataCall("events", "w1", 1, (ev_row("$a1"), ev_row("$a2"))),
                RdataCall("events", "w2", 1, (ev_row("$b1"), ev_row("$b2"))),
            ],
        )

    def test_position_mid_batch_discards_partial_batch(self) -> None:
        """A POSITION in the middle of a batch drops the held rows; the catch-up refetches them."""
        for eid in ("$r1", "$r2", "$r3"):
            self.events_source.add(W, 6, ev(eid))
        handler = self.make_handler({("events", W): 5})
        conn = self.connect(handler)
        handler.on_position(conn, position("events", 5, 5))
        handler.on_rdata(conn, rdata("events", None, ev("$r1")))
        handler.on_rdata(conn, rdata("events", None, ev("$r2")))
        handler.on_position(conn, position("events", 6, 6))
        handler.on_rdata(conn, rdata("events", 7, ev("$r4")))
        self.assertEqual(
            self.dh.rdata_calls,
            [
                RdataCall("events", W, 6, (ev_row("$r1"), ev_row("$r2"), ev_row("$r3"))),
                RdataCall("events", W, 7, (ev_row("$r4"),)),
            ],
        )

    def test_lost_connection_mid_batch_forgets_partial_rows(self) -> None:
        """Rows of a batch cut short by a lost connection never reach a later connection's rows."""
        for eid in ("$r1", "$r2", "$r3"):
            self.events_source.add(W, 7, ev(eid))
        handler = self.make_handler({("events", W): 6})
        conn1 = self.connect(handler, "one")
        handler.on_position(conn1, position("events", 6, 6))
        handler.on_rdata(conn1, rdata("events", None, ev("$r1")))
        handler.on_rdata(conn1, rdata("events", None, ev("$r2")))
        handler.lost_connection(conn1)
        conn2 = self.connect(handler, "two")
        handler.on_position(conn2, position("events", 7, 7))
        handler.on_rdata(conn2, rdata("events", 8, ev("$r4")))
        self.assertEqual(
            self.dh.rdata_calls,
            [
                RdataCall("events", W, 7, (ev_row("$r1"), ev_row("$r2"), ev_row("$r3"))),
                RdataCall("events", W, 8, (ev_row("$r4"),)),
            ],
        )


class FilteringTests(HandlerTestCase):
    def test_own_echoes_ignored(self) -> None:
        """RDATA and POSITION naming our own instance are ignored (Redis echoes)."""
        self.add_events(READER, range(3, 6))
        handler = self.make_handler({("events", READER): 2})
        conn = self.connect(handler)
        handler.on_position(conn, position("events", 5, 5, READER))
        handler.on_rdata(conn, rdata("events", 6, ev("$6"), READER))
        self.assertEqual(self.events_source.calls, [])
        self.assertEqual(self.dh.rdata_calls, [])
        self.assertEqual(self.dh.positions_received, [])
        self.assertEqual(self.dh.get_position("events", READER), 2)

    def test_unknown_stream_logged_and_dropped(self) -> None:
        """Commands for an unknown stream are logged and dropped; other streams carry on."""
        handler = self.make_handler({("typing", W): 0})
        conn = self.connect(handler)
        handler.on_position(conn, position("nosuch", 0, 1))
        handler.on_rdata(conn, rdata("nosuch", 2, ["x"]))
        handler.on_position(conn, position("typing", 0, 0))
        handler.on_rdata(conn, rdata("typing", 1, ["!r", ["@a:x"]]))
        self.assertEqual(
            self.dh.rdata_calls, [RdataCall("typing", W, 1, (TypingStreamRow("!r", ("@a:x",)),))]
        )
        self.assertIsNone(self.dh.get_position("nosuch", W))
        self.assertFalse(conn.closed)
        self.assertEqual(handler.connections(), [conn])
        dropped = [m for m in self.logs.messages(LogLevel.debug) if "unknown stream 'nosuch'" in m]
        self.assertEqual(len(dropped), 2)
        self.assertIn("POSITION", dropped[0])
        self.assertIn("RDATA", dropped[1])

    def test_writer_not_allowed_logged_and_dropped(self) -> None:
        """Commands from an instance not among the stream's writers are logged and dropped."""
        self.add_events("w2", range(1, 4))
        handler = self.make_handler(
            {("events", "w1"): 0, ("events", "w2"): 0}, stream_writers={"events": ["w1"]}
        )
        conn = self.connect(handler)
        handler.on_position(conn, position("events", 3, 3, "w2"))
        handler.on_rdata(conn, rdata("events", 4, ev("$w2"), "w2"))
        handler.on_position(conn, position("events", 0, 0, "w1"))
        handler.on_rdata(conn, rdata("events", 1, ev("$w1"), "w1"))
        self.assertEqual(self.events_source.calls, [])
        self.assertEqual(self.dh.rdata_calls, [RdataCall("events", "w1", 1, (ev_row("$w1"),))])
        self.assertEqual(self.dh.get_position("events", "w2"), 0)
        self.assertFalse(conn.closed)
        dropped = [m for m in self.logs.messages(LogLevel.debug) if "does not write it" in m]
        self.assertEqual(len(dropped), 2)
        self.assertIn("'w2'", dropped[0])

    def test_malformed_row_logged_and_dropped(self) -> None:
        """A row of the wrong shape is logged and dropped; later rows still arrive."""
        handler = self.make_handler({("typing", W): 5})
        conn = self.connect(handler)
        handler.on_position(conn, position("typing", 5, 5))
        handler.on_rdata(conn, rdata("typing", 6, ["!r"]))
        handler.on_rdata(conn, rdata("typing", None, ["!a", ["@a:x"]]))
        handler.on_rdata(conn, rdata("typing", None, {"room": "!b"}))
        handler.on_rdata(conn, rdata("typing", 7, ["!c", []]))
        self.assertEqual(
            self.dh.rdata_calls,
            [
                RdataCall(
                    "typing", W, 7, (TypingStreamRow("!a", ("@a:x",)), TypingStreamRow("!c", ()))
                )
            ],
        )
        self.assertEqual(self.dh.get_position("typing", W), 7)
        self.assertFalse(conn.closed)
        malformed = [m for m in self.logs.messages(LogLevel.error) if "malformed row" in m]
        self.assertEqual(len(malformed), 2)


class OrderingTests(HandlerTestCase):
    def test_slow_data_handler_blocks_only_its_stream(self) -> None:
        """An unfinished on_rdata holds later commands of its stream, in order, but not others."""
        dh = BlockingDataHandler({("typing", W): 0, ("events", W): 0})
        dh.blocking.add("typing")
        handler = self.make_handler(data_handler=dh)
        conn = self.connect(handler)
        handler.on_position(conn, position("typing", 0, 0))
        handler.on_position(conn, position("events", 0, 0))
        handler.on_rdata(conn, rdata("typing", 1, ["!r1", []]))
        handler.on_rdata(conn, rdata("typing", 2, ["!r2", []]))
        handler.on_rdata(conn, rdata("typing", 3, ["!r3", []]))
        handler.on_rdata(conn, rdata("events", 1, ev("$1")))
        self.assertEqual(dh.arrivals, [("typing", W, 1), ("events", W, 1)])
        self.assertEqual(dh.rdata_calls, self.event_calls(W, range(1, 2)))
        self.assertEqual(dh.get_position("typing", W), 0)

        dh.release("typing")
        self.assertEqual(dh.arrivals[2:], [("typing", W, 2)])
        self.assertEqual(dh.get_position("typing", W), 1)
        dh.release("typing")
        dh.release("typing")
        self.assertEqual(dh.waiting("typing"), 0)
        self.assertEqual(
            [(c.stream_name, c.token) for c in dh.rdata_calls],
            [("events", 1), ("typing", 1), ("typing", 2), ("typing", 3)],
        )
        self.assertEqual(dh.get_position("typing", W), 3)

    def test_position_waits_behind_slow_rdata(self) -> None:
        """A POSITION queued behind an unfinished on_rdata is handled after it, in order."""
        self.typing_source.add(W, 1, ["!r1", []])
        self.typing_source.add(W, 2, ["!r2", []])
        dh = BlockingDataHandler({("typing", W): 0})
        dh.blocking.add("typing")
        handler = self.make_handler(data_handler=dh)
        conn = self.connect(handler)
        handler.on_position(conn, position("typing", 0, 0))
        handler.on_rdata(conn, rdata("typing", 1, ["!r1", []]))
        handler.on_position(conn, position("typing", 2, 5))
        self.assertEqual(self.typing_source.calls, [])
        dh.release("typing")
        # The catch-up runs from the position the first row left: 1.
        self.assertEqual(self.typing_source.calls, [(W, 1, 5, DEFAULT_ROWS)])
        dh.release("typing")
        self.assertEqual([c.token for c in dh.rdata_calls], [1, 2])
        self.assertEqual(dh.get_position("typing", W), 5)


class CatchUpFailureTests(HandlerTestCase):
    def test_failed_catch_up_retried_with_growing_backoff(self) -> None:
        """A failing catch-up is retried after 1s, 2s, 4s on the clock, then succeeds."""
        self.add_events(W, range(1, 4))
        handler = self.make_handler(
            {("events", W): 0}, limits=HandlerLimits(catch_up_retry_initial_s=1.0)
        )
        conn = self.connect(handler)
        self.events_source.fail_next(3)
        handler.on_position(conn, position("events", 3, 3))
        calls = self.events_source.calls
        self.assertEqual(len(calls), 1)
        for delay in (1.0, 2.0, 4.0):
            before = len(calls)
            self.clock.advance(delay - 0.01)
            self.assertEqual(len(calls), before)
            self.clock.advance(0.01)
            self.assertEqual(len(calls), before + 1)
        self.assertEqual(calls, [(W, 0, 3, DEFAULT_ROWS)] * 4)
        self.assertEqual(self.dh.rdata_calls, self.event_calls(W, range(1, 4)))
        self.assertEqual(self.dh.get_position("events", W), 3)
        self.assertEqual(len(self.flushLoggedErrors(SourceError)), 3)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_backoff_is_capped(self) -> None:
        """Retry delays double up to catch_up_retry_max_s and no further."""
        handler = self.make_handler(
            {("events", W): 0},
            limits=HandlerLimits(catch_up_retry_initial_s=1.0, catch_up_retry_max_s=3.0),
        )
        conn = self.connect(handler)
        self.events_source.fail_next(4)
        handler.on_position(conn, position("events", 3, 3))
        delays = []
        for _ in range(4):
            (call,) = self.clock.getDelayedCalls()
            delays.append(call.getTime() - self.clock.seconds())
            self.clock.advance(delays[-1])
        self.assertEqual(delays, [1.0, 2.0, 3.0, 3.0])
        self.assertEqual(self.dh.get_position("events", W), 3)
        self.flushLoggedErrors(SourceError)

    def test_retry_fetches_up_to_dropped_rdata(self) -> None:
        """RDATA dropped while a catch-up failed is fetched by the retry: no hole, no duplicate."""
        self.add_events(W, range(1, 14))
        handler = self.make_handler({("events", W): 5})
        conn = self.connect(handler)
        self.events_source.fail_next(1)
        handler.on_position(conn, position("events", 10, 10))
        handler.on_rdata(conn, rdata("events", 11, ev("$11")))
        handler.on_rdata(conn, rdata("events", 12, ev("$12")))
        self.assertEqual(self.dh.rdata_calls, [])
        self.clock.advance(0.5)
        self.assertEqual(self.dh.get_position("events", W), 12)
        handler.on_rdata(conn, rdata("events", 13, ev("$13")))
        self.assertEqual(self.dh.rdata_calls, self.event_calls(W, range(6, 14)))
        self.assertEqual(
            self.events_source.calls,
            [(W, 5, 10, DEFAULT_ROWS), (W, 5, 10, DEFAULT_ROWS), (W, 10, 12, DEFAULT_ROWS)],
        )
        self.assertEqual(len(self.flushLoggedErrors(SourceError)), 1)

    def test_retry_after_failure_fetching_dropped_rdata(self) -> None:
        """If fetching up to dropped RDATA fails, the next retry still fetches it (no hole)."""
        self.add_events(W, range(1, 14))
        handler = self.make_handler({("events", W): 5})
        conn = self.connect(handler)
        self.events_source.fail_next(1)
        handler.on_position(conn, position("events", 10, 10))
        handler.on_rdata(conn, rdata("events", 11, ev("$11")))
        handler.on_rdata(conn, rdata("events", 12, ev("$12")))
        # The retry catches up to 10, then fails on the way to 12.
        self.events_source.fail_next(1, after=1)
        self.clock.advance(0.5)
        self.assertEqual(self.dh.get_position("events", W), 10)
        self.clock.advance(1.0)
        self.assertEqual(self.dh.get_position("events", W), 12)
        handler.on_rdata(conn, rdata("events", 13, ev("$13")))
        self.assertEqual(self.dh.rdata_calls, self.event_calls(W, range(6, 14)))
        self.assertEqual(self.dh.resets, [])
        self.assertEqual(len(self.flushLoggedErrors(SourceError)), 2)

    def test_retry_after_partial_fetch_past_position(self) -> None:
        """A retry after delivering rows past the POSITION's token resumes; it is no reset."""
        self.add_events(W, range(1, 14))
        handler = self.make_handler(
            {("events", W): 5}, limits=HandlerLimits(catch_up_row_count=1)
        )
        conn = self.connect(handler)
        self.events_source.fail_next(1)
        handler.on_position(conn, position("events", 10, 10))
        handler.on_rdata(conn, rdata("events", 11, ev("$11")))
        handler.on_rdata(conn, rdata("events", 12, ev("$12")))
        # The retry fetches 6..10 in five calls and 11 in one, then fails.
        self.events_source.fail_next(1, after=6)
        self.clock.advance(0.5)
        self.assertEqual(self.dh.get_position("events", W), 11)
        self.clock.advance(1.0)
        handler.on_rdata(conn, rdata("events", 13, ev("$13")))
        self.assertEqual(self.dh.resets, [])
        self.assertEqual(self.dh.rdata_calls, self.event_calls(W, range(6, 14)))
        self.assertEqual(len(self.flushLoggedErrors(SourceError)), 2)

    def test_no_retry_after_connection_lost(self) -> None:
        """A catch-up that failed is not retried once its connection is gone."""
        self.add_events(W, range(1, 4))
        handler = self.make_handler({("events", W): 0})
        conn = self.connect(handler)
        self.events_source.fail_next(1)
        handler.on_position(conn, position("events", 3, 3))
        handler.lost_connection(conn)
        # Its timer goes with it: a stopped instance leaves none behind.
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(10)
        self.assertEqual(len(self.events_source.calls), 1)
        self.assertEqual(self.dh.rdata_calls, [])
        self.assertEqual(self.dh.get_position("events", W), 0)
        self.flushLoggedErrors(SourceError)

    def test_catch_up_failing_after_connection_lost_sets_no_timer(self) -> None:
        """A catch-up in flight when its connection goes, and failing after, is not retried."""
        self.add_events(W, range(1, 4))
        handler = self.make_handler({("events", W): 0})
        conn = self.connect(handler)
        self.events_source.block_next(1)
        handler.on_position(conn, position("events", 3, 3))
        handler.lost_connection(conn)
        self.events_source.blocked.pop(0).errback(SourceError("the database closed"))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.dh.rdata_calls, [])
        self.assertTrue(handler.is_idle())
        self.flushLoggedErrors(SourceError)


class StreamResetTests(HandlerTestCase):
    def test_stream_went_backwards(self) -> None:
        """Reader ahead of a restarted writer: reset, refetch (0, new], then accept new RDATA."""
        self.typing_source.add(W, 1, ["!a", ["@a:x"]])
        self.typing_source.add(W, 2, ["!b", []])
        self.typing_source.add(W, 3, ["!c", ["@c:x"]])
        handler = self.make_handler({("typing", W): 50})
        conn = self.connect(handler)
        handler.on_position(conn, position("typing", 3, 3))
        self.assertEqual(self.dh.resets, [("typing", W, RESET_FROM_TOKEN)])
        self.assertEqual(self.typing_source.calls, [(W, 0, 3, DEFAULT_ROWS)])
        self.assertEqual(
            self.dh.rows_for("typing"),
            [
                (1, TypingStreamRow("!a", ("@a:x",))),
                (2, TypingStreamRow("!b", ())),
                (3, TypingStreamRow("!c", ("@c:x",))),
            ],
        )
        self.assertEqual(self.dh.get_position("typing", W), 3)
        handler.on_rdata(conn, rdata("typing", 4, ["!d", []]))
        self.assertEqual(self.dh.rows_for("typing")[3:], [(4, TypingStreamRow("!d", ()))])
        self.assertEqual(self.dh.get_position("typing", W), 4)


    def test_stale_streamer_position_is_no_reset(self) -> None:
        """A POSITION below the reader's position with prev < new (the streamer's, overtaken by a REPLICATE answer) is no reset."""
        # Found by tests/torture: a persisted stream was refetched from 0.
        self.add_events(W, range(1, 11))
        handler = self.make_handler({("events", W): 4})
        conn = self.connect(handler)
        handler.on_position(conn, position("events", 10, 10))  # the REPLICATE answer
        handler.on_position(conn, position("events", 4, 7))  # the streamer's, computed before
        self.assertEqual(self.dh.resets, [])
        self.assertEqual(self.dh.get_position("events", W), 10)
        self.add_events(W, range(11, 12))
        handler.on_rdata(conn, rdata("events", 11, ev("$11")))
        self.assertEqual(self.dh.rdata_calls, self.event_calls(W, range(5, 12)))


class BoundsTests(HandlerTestCase):
    def test_queue_overflow_closes_that_connection(self) -> None:
        """Too many commands queued for a stream closes the connection that overflowed it only."""
        dh = BlockingDataHandler({("events", "w1"): 0, ("events", "w2"): 0})
        dh.blocking.add("events")
        handler = self.make_handler(
            data_handler=dh, limits=HandlerLimits(max_queued_commands_per_stream=2)
        )
        conn1 = self.connect(handler, "one")
        conn2 = self.connect(handler, "two")
        handler.on_position(conn1, position("events", 0, 0, "w1"))
        handler.on_position(conn2, position("events", 0, 0, "w2"))
        handler.on_rdata(conn1, rdata("events", 1, ev("$a1"), "w1"))  # runs, waits
        handler.on_rdata(conn2, rdata("events", 1, ev("$b1"), "w2"))  # queued
        handler.on_rdata(conn1, rdata("events", 2, ev("$a2"), "w1"))  # queued
        self.assertFalse(conn1.closed)
        handler.on_rdata(conn1, rdata("events", 3, ev("$a3"), "w1"))  # over the bound
        self.assertTrue(conn1.closed)
        self.assertFalse(conn2.closed)
        handler.lost_connection(conn1)

        dh.blocking.clear()
        dh.release("events")
        handler.on_rdata(conn2, rdata("events", 2, ev("$b2"), "w2"))
        self.assertEqual(
            dh.rdata_calls,
            [
                RdataCall("events", "w1", 1, (ev_row("$a1"),)),
                RdataCall("events", "w2", 1, (ev_row("$b1"),)),
                RdataCall("events", "w2", 2, (ev_row("$b2"),)),
            ],
        )
        self.assertEqual(handler.connections(), [conn2])
        self.assertIn(
            "closing fake:one", " ".join(self.logs.messages(LogLevel.error))
        )

    def test_endless_batch_dropped_and_recovered_by_position(self) -> None:
        """A batch past max_pending_batch_rows is dropped; the next POSITION refetches it all."""
        for eid in ("$a", "$b", "$c", "$d"):
            self.events_source.add(W, 6, ev(eid))
        handler = self.make_handler(
            {("events", W): 5}, limits=HandlerLimits(max_pending_batch_rows=2)
        )
        conn = self.connect(handler)
        handler.on_position(conn, position("events", 5, 5))
        for eid in ("$a", "$b", "$c"):
            handler.on_rdata(conn, rdata("events", None, ev(eid)))
        handler.on_rdata(conn, rdata("events", 6, ev("$d")))
        self.assertEqual(self.dh.rdata_calls, [])
        self.assertEqual(self.dh.get_position("events", W), 5)
        self.assertIn("More than 2 rows in one batch", " ".join(self.logs.messages(LogLevel.error)))

        handler.on_position(conn, position("events", 6, 6))
        handler.on_rdata(conn, rdata("events", 7, ev("$e")))
        self.assertEqual(
            self.dh.rdata_calls,
            [
                RdataCall("events", W, 6, tuple(ev_row(e) for e in ("$a", "$b", "$c", "$d"))),
                RdataCall("events", W, 7, (ev_row("$e"),)),
            ],
        )
        self.assertFalse(conn.closed)


class WriterSideTests(HandlerTestCase):
    def test_replicate_answered_with_positions_on_that_connection(self) -> None:
        """REPLICATE: one POSITION per written stream (prev == new == current), that connection."""
        self.typing_source.advance(READER, 7)
        self.events_source.add(READER, 12, ev("$12"))
        self.events_source.add(W, 30, ev("$30"))
        handler = self.make_handler(writer_streams=["typing", "events"])
        conn1 = self.connect(handler, "one")
        conn2 = self.connect(handler, "two")
        handler.on_replicate(conn1, ReplicateCommand())
        self.assertEqual(
            conn1.sent,
            [PositionCommand("typing", READER, 7, 7), PositionCommand("events", READER, 12, 12)],
        )
        self.assertEqual(conn2.sent, [])

    def test_other_commands_go_to_callback(self) -> None:
        """USER_SYNC, USER_IP and the other non-stream commands reach on_other_command."""
        received: list[tuple[IReplicationConnection, Command]] = []
        result: Deferred[None] = Deferred()

        def on_other(connection: IReplicationConnection, cmd: Command) -> HandlerResult:
            received.append((connection, cmd))
            return result

        handler = self.make_handler(on_other_command=on_other)
        conn = self.connect(handler)
        cmds: list[Command] = [
            UserSyncCommand("worker1", "@a:x", "DEV", True, 1000),
            ClearUserSyncCommand("worker1"),
            FederationAckCommand("fed", 4),
            UserIpCommand("@a:x", "tok", "1.2.3.4", "ua", None, 5),
            RemoteServerUpCommand("other.example"),
            LockReleasedCommand("worker1", "lock", "key"),
            NewActiveTaskCommand("task1"),
            CancelTaskCommand("task2"),
        ]
        table = dispatch_table(handler)
        for cmd in cmds:
            self.assertIs(table[cmd.NAME](conn, cmd), result)
        self.assertEqual(received, [(conn, cmd) for cmd in cmds])

    def test_other_commands_without_callback_ignored(self) -> None:
        """Without on_other_command, non-stream commands are accepted and ignored."""
        handler = self.make_handler()
        conn = self.connect(handler)
        cmd = UserSyncCommand("worker1", "@a:x", None, False, 1)
        self.assertIsNone(dispatch_table(handler)[cmd.NAME](conn, cmd))
        self.assertFalse(conn.closed)
