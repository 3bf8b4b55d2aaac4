"""Tests for synapse_replication.data_handler: the reader's positions."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from synapse_replication.commands import PositionCommand, RdataCommand
from synapse_replication.data_handler import ReplicationDataHandler
from synapse_replication.handler import ReplicationCommandHandler
from synapse_replication.streams import TypingStream
from tests.fakes import FakeConnection, FakeStreamSource, TypedTestCase


class SlowDataHandler(ReplicationDataHandler):
    """`process_rows` returns a Deferred the test fires; rows are recorded when
    processing starts."""

    def __init__(self, initial: dict[tuple[str, str], int] | None = None) -> None:
        super().__init__(initial)
        self.started: list[tuple[str, str, int, list[Any]]] = []
        self.pending: list[Deferred[None]] = []

    def process_rows(
        self, stream_name: str, instance_name: str, token: int, rows: list[Any]
    ) -> Awaitable[None] | None:
        self.started.append((stream_name, instance_name, token, rows))
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        return d


async def _await(result: Awaitable[None]) -> None:
    await result


def run(result: Awaitable[None] | None) -> Deferred[None]:
    """`result` of an `on_rdata` call, driven as a Deferred."""
    assert result is not None, "expected an awaitable"
    return Deferred.fromCoroutine(_await(result))


class PositionTests(TypedTestCase):
    def test_sync_process_rows_advances_at_once(self) -> None:
        """With the default (synchronous) process_rows, on_rdata moves the position at once."""
        dh = ReplicationDataHandler({("typing", "w"): 3})
        self.assertIsNone(dh.on_rdata("typing", "w", 4, ["row"]))
        self.assertEqual(dh.get_position("typing", "w"), 4)

    def test_position_advances_after_async_process_rows(self) -> None:
        """The position moves only once an async process_rows has completed."""
        dh = SlowDataHandler({("typing", "w"): 3})
        d = run(dh.on_rdata("typing", "w", 4, ["row"]))
        self.assertEqual(dh.started, [("typing", "w", 4, ["row"])])
        self.assertEqual(dh.get_position("typing", "w"), 3)
        self.assertNoResult(d)
        dh.pending[0].callback(None)
        self.successResultOf(d)
        self.assertEqual(dh.get_position("typing", "w"), 4)

    def test_failed_process_rows_leaves_position(self) -> None:
        """If an async process_rows fails, the position stays where a retry can start."""
        dh = SlowDataHandler({("typing", "w"): 3})
        d = run(dh.on_rdata("typing", "w", 4, ["row"]))
        dh.pending[0].errback(ValueError("boom"))
        self.failureResultOf(d, ValueError)
        self.assertEqual(dh.get_position("typing", "w"), 3)

    def test_position_never_goes_back(self) -> None:
        """on_position and on_rdata with an older token leave the position alone."""
        dh = ReplicationDataHandler({("events", "w"): 10})
        dh.on_position("events", "w", 7)
        dh.on_rdata("events", "w", 8, ["row"])
        self.assertEqual(dh.get_position("events", "w"), 10)
        dh.on_position("events", "w", 12)
        self.assertEqual(dh.positions(), {("events", "w"): 12})

    def test_reset_sets_position_back(self) -> None:
        """on_stream_reset puts the position at the given token, even below the current one."""
        dh = ReplicationDataHandler({("typing", "w"): 50})
        dh.on_stream_reset("typing", "w", 0)
        self.assertEqual(dh.get_position("typing", "w"), 0)
        dh.on_rdata("typing", "w", 1, ["row"])
        self.assertEqual(dh.get_position("typing", "w"), 1)


class WaitTests(TypedTestCase):
    def test_wait_fires_at_token_not_before(self) -> None:
        """wait_for_stream_position fires when the position reaches the token, not before."""
        dh = ReplicationDataHandler({("events", "w"): 3})
        d = dh.wait_for_stream_position("events", "w", 5)
        dh.on_rdata("events", "w", 4, ["row"])
        self.assertNoResult(d)
        dh.on_rdata("events", "w", 5, ["row"])
        self.successResultOf(d)

    def test_wait_fires_past_token(self) -> None:
        """A waiter fires when the position jumps past its token; a later one keeps waiting."""
        dh = ReplicationDataHandler({("events", "w"): 3})
        d5 = dh.wait_for_stream_position("events", "w", 5)
        d9 = dh.wait_for_stream_position("events", "w", 9)
        dh.on_position("events", "w", 7)
        self.successResultOf(d5)
        self.assertNoResult(d9)

    def test_many_waiters_fire_once_in_token_order(self) -> None:
        """Waiters added in any order fire once each, in token order, as the
        position passes them; those for the same token in the order they came."""
        dh = ReplicationDataHandler({("events", "w"): 0})
        fired: list[str] = []
        for token, name in [(6, "6"), (2, "2a"), (9, "9"), (2, "2b"), (4, "4")]:
            dh.wait_for_stream_position("events", "w", token).addCallback(
                lambda _, name: fired.append(name), name
            )
        for token in range(1, 8):
            dh.on_rdata("events", "w", token, ["row"])
        self.assertEqual(fired, ["2a", "2b", "4", "6"])
        dh.on_position("events", "w", 12)
        self.assertEqual(fired, ["2a", "2b", "4", "6", "9"])

    def test_wait_already_reached(self) -> None:
        """Waiting for a token at or below the position fires at once."""
        dh = ReplicationDataHandler({("events", "w"): 3})
        self.successResultOf(dh.wait_for_stream_position("events", "w", 3))
        self.successResultOf(dh.wait_for_stream_position("events", "w", 1))

    def test_wait_unknown_writer(self) -> None:
        """Waiting on a writer with no position yet waits until it gets one at the token."""
        dh = ReplicationDataHandler()
        d = dh.wait_for_stream_position("events", "w", 2)
        self.assertNoResult(d)
        dh.on_position("events", "w", 2)
        self.successResultOf(d)

    def test_wait_per_writer(self) -> None:
        """A position of one writer does not fire a waiter on another writer."""
        dh = ReplicationDataHandler({("events", "w1"): 0, ("events", "w2"): 0})
        d = dh.wait_for_stream_position("events", "w2", 1)
        dh.on_position("events", "w1", 5)
        self.assertNoResult(d)

    def test_wait_fires_only_after_async_process_rows(self) -> None:
        """A waiter for a token fires once that token's async processing is done."""
        dh = SlowDataHandler({("typing", "w"): 3})
        waiter = dh.wait_for_stream_position("typing", "w", 4)
        run(dh.on_rdata("typing", "w", 4, ["row"]))
        self.assertNoResult(waiter)
        dh.pending[0].callback(None)
        self.successResultOf(waiter)


class ThroughHandlerTests(TypedTestCase):
    def test_handler_waits_for_async_process_rows(self) -> None:
        """Through the command handler, rows of a token wait for the previous token's processing."""
        source = FakeStreamSource()
        stream = TypingStream("reader", source.current_token, source.update_function)
        dh = SlowDataHandler({("typing", "w"): 0})
        handler = ReplicationCommandHandler(
            instance_name="reader",
            clock=Clock(),
            streams={"typing": stream},
            data_handler=dh,
        )
        conn = FakeConnection()
        handler.new_connection(conn)
        handler.on_position(conn, PositionCommand("typing", "w", 0, 0))
        handler.on_rdata(conn, RdataCommand("typing", "w", 1, ["!a", []]))
        handler.on_rdata(conn, RdataCommand("typing", "w", 2, ["!b", []]))
        waiter = dh.wait_for_stream_position("typing", "w", 2)
        self.assertEqual([t for _, _, t, _ in dh.started], [1])
        self.assertEqual(dh.get_position("typing", "w"), 0)
        dh.pending[0].callback(None)
        self.assertEqual([t for _, _, t, _ in dh.started], [1, 2])
        self.assertEqual(dh.get_position("typing", "w"), 1)
        self.assertNoResult(waiter)
        dh.pending[1].callback(None)
        self.assertEqual(dh.get_position("typing", "w"), 2)
        self.successResultOf(waiter)
