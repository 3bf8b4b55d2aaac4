"""Replication end to end: a real writer on an SQLite file and workers that
follow it, in one reactor, connected in memory (iosim) and over loopback TCP.

Every scenario is written once in `EndToEndScenarios` and runs in both
transports through `MemoryEndToEndTests` and `TcpEndToEndTests`.

The oracle is the writer's store: after each scenario a worker must hold
exactly the store's rows after its starting position (parsed with the
stream's `parse_row`, as the worker receives them), each once, in token
order, every token's rows in one `on_rdata` call.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Final

import attrs
from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITCPTransport
from twisted.internet.task import deferLater
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
    globalLogPublisher,
)
from twisted.trial import unittest
from zope.interface import implementer

from synapse_replication.data_handler import ReplicationDataHandler
from synapse_replication.handler import HandlerLimits, ReplicationCommandHandler
from synapse_replication.instance import (
    WRITER_STREAMS,
    Notifier,
    WriterInstance,
    make_worker,
    start_writer,
)
from synapse_replication.storage import EventToPersist, TypingWriter, open_sqlite_store
from synapse_replication.streamer import ReplicationStreamer
from synapse_replication.streams import (
    EventsStream,
    ReceiptsStream,
    Stream,
    StreamUpdateResult,
    TypingStream,
    UpdateFunction,
)
from synapse_replication.streams.events import (
    EventsStreamAllStateRow,
    EventsStreamCurrentStateRow,
    EventsStreamEventRow,
)
from synapse_replication.streams.receipts import ReceiptsStreamRow
from synapse_replication.streams.typing import TypingStreamRow
from synapse_replication.tcp import (
    Backoff,
    ClientReplicationProtocol,
    ReplicationServerFactory,
    listen_replication,
)
from synapse_replication.testing import TestReplicationDataHandler, inject
from synapse_replication.testing.harness import (
    HarnessWorker,
    ReplicationHarness,
    Transport,
)

if TYPE_CHECKING:
    from twisted.trial.unittest import TestCase as _Base
else:
    _Base = object

# The reactor the harness runs in, with every interface it provides.
harness_reactor: Any = _global_reactor

WRITER: Final = "master"
SERVER: Final = "test.local"
EVENTS: Final = EventsStream.NAME
RECEIPTS: Final = ReceiptsStream.NAME
TYPING: Final = TypingStream.NAME
PERSISTED: Final = (EVENTS, RECEIPTS)

ALICE: Final = "@alice:test.local"
BOB: Final = "@bob:test.local"
CAROL: Final = "@carol:test.local"

# What the catch-up variants ask per call of an update function: far below
# the streamer's 100, so catch-up pages many times.
SMALL_CATCH_UP: Final = HandlerLimits(catch_up_row_count=7)

Rows = list[tuple[int, Any]]


class TypingStateDataHandler(TestReplicationDataHandler):
    """Records like its base and also folds typing rows into `typing_state`,
    as a real reader would: each row replaces its room's list, and a reset of
    the typing stream forgets every room."""

    __test__ = False

    def __init__(self) -> None:
        super().__init__()
        self.typing_state: dict[str, tuple[str, ...]] = {}
        # Tokens of the typing rows since the last reset, in arrival order.
        self.typing_tokens: list[int] = []

    def process_rows(
        self, stream_name: str, instance_name: str, token: int, rows: list[Any]
    ) -> None:
        super().process_rows(stream_name, instance_name, token, rows)
        if stream_name == TYPING:
            self.typing_tokens.append(token)
            for row in rows:
                assert isinstance(row, TypingStreamRow)
                self.typing_state[row.room_id] = row.user_ids

    def process_reset(self, stream_name: str, instance_name: str, token: int) -> None:
        super().process_reset(stream_name, instance_name, token)
        if stream_name == TYPING:
            self.typing_state.clear()
            self.typing_tokens.clear()


@implementer(ILogObserver)
class _LogCapture:
    """Every log event published while installed."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def warnings(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] >= LogLevel.warn]


class _CutMidBatch:
    """Stands in for a client protocol's `lineReceived`: passes lines on until
    `keep` ``batch`` rows of `stream` have gone through, then drops the
    connection as a network failure would, at the next batch row, and passes
    nothing more."""

    def __init__(
        self,
        worker: HarnessWorker,
        protocol: ClientReplicationProtocol,
        stream: str,
        keep: int,
        reconnect: bool = False,
    ) -> None:
        """With `reconnect`, a TCP worker's factory reconnects as it would
        after any loss; without, the test reconnects it when it wants."""
        self._worker = worker
        self._protocol = protocol
        self._reconnect = reconnect
        self._receive = protocol.lineReceived
        self._prefix = f"RDATA {stream} {WRITER} batch ".encode()
        self._keep = keep
        self.batch_rows_passed = 0
        self.cut = False

    def lineReceived(self, line: bytes) -> None:
        if self.cut:
            return
        if line.startswith(self._prefix):
            if self.batch_rows_passed == self._keep:
                self.cut = True
                if not self._reconnect:
                    self._worker.instance.client_factory.stopTrying()
                transport = self._protocol.transport
                assert transport is not None
                ITCPTransport(transport).abortConnection()
                return
            self.batch_rows_passed += 1
        self._receive(line)


class _SwappableTyping:
    """The typing source of a writer whose typing writer can restart while the
    replication connections stay up (a typing writer that is not the process
    the workers connect to): a fresh `TypingWriter` starts again at 0."""

    def __init__(self, writer: TypingWriter, notify: Callable[[], None]) -> None:
        self.writer = writer
        self._notify = notify

    def restart(self) -> TypingWriter:
        self.writer.stop()
        self.writer = TypingWriter(harness_reactor, WRITER, self._notify)
        return self.writer

    def current_token(self, instance_name: str) -> int:
        return self.writer.current_token(instance_name)

    async def get_updates(
        self, instance_name: str, from_token: int, upto_token: int, limit: int
    ) -> StreamUpdateResult:
        return await self.writer.get_updates(instance_name, from_token, upto_token, limit)


async def _awaited(work: Awaitable[object]) -> None:
    await work


def _by_token(rows: Iterable[tuple[int, Any]]) -> list[tuple[int, list[Any]]]:
    """Consecutive rows sharing a token, grouped."""
    groups: list[tuple[int, list[Any]]] = []
    for token, row in rows:
        if groups and groups[-1][0] == token:
            groups[-1][1].append(row)
        else:
            groups.append((token, [row]))
    return groups


def _state_changes(prefix: str, count: int) -> dict[tuple[str, str], str | None]:
    return {("org.example.state", f"{prefix}{i:03}"): inject.make_event_id() for i in range(count)}


def _message(room_id: str, body: str) -> EventToPersist:
    return EventToPersist(
        event_id=inject.make_event_id(),
        room_id=room_id,
        type="m.room.message",
        sender=ALICE,
        content={"msgtype": "m.text", "body": body},
    )


class EndToEndScenarios(_Base):
    """The scenarios; subclasses pick the transport."""

    transport: ClassVar[Transport]

    # Setting up

    async def _start(
        self, workers: int = 1, limits: HandlerLimits | None = None
    ) -> tuple[ReplicationHarness, list[HarnessWorker]]:
        """A writer on a new file and `workers` connected workers, quiet."""
        self.db_path = self.mktemp() + ".db"
        # Worker name -> tokens of outliers it received before they were
        # de-outliered (see `_store_rows`).
        self.seen_as_outlier: dict[str, set[int]] = {}
        harness = await ReplicationHarness.start(
            self.db_path,
            workers=0,
            transport=self.transport,
            server_name=SERVER,
            handler_limits=limits,
        )
        self.addCleanup(harness.stop)
        added = [
            harness.add_worker(f"worker{i + 1}", TypingStateDataHandler()) for i in range(workers)
        ]
        await harness.pump_until_quiet()
        return harness, added

    def _positions(self, worker: HarnessWorker) -> dict[str, int]:
        positions = {}
        for stream in WRITER_STREAMS:
            position = worker.data.get_position(stream, WRITER)
            assert position is not None, f"{worker.name} has no position for {stream}"
            positions[stream] = position
        return positions

    def _writer_tokens(self, harness: ReplicationHarness) -> dict[str, int]:
        return {s: harness.writer.streams[s].current_token(WRITER) for s in WRITER_STREAMS}

    def _typing_state(self, worker: HarnessWorker) -> dict[str, tuple[str, ...]]:
        assert isinstance(worker.data, TypingStateDataHandler)
        return worker.data.typing_state

    def _client_protocol(self, worker: HarnessWorker) -> ClientReplicationProtocol:
        (connection,) = worker.instance.handler.connections()
        assert isinstance(connection, ClientReplicationProtocol)
        return connection

    def _capture_logs(self) -> _LogCapture:
        capture = _LogCapture()
        globalLogPublisher.addObserver(capture)
        self.addCleanup(globalLogPublisher.removeObserver, capture)
        return capture

    async def _until(
        self,
        harness: ReplicationHarness,
        condition: Callable[[], bool],
        what: str,
        pump: bool = True,
    ) -> None:
        """Turn the reactor (and pump memory connections, unless not `pump`)
        until `condition`."""
        deadline = harness.reactor.seconds() + 10
        while not condition():
            if harness.reactor.seconds() > deadline:
                self.fail(f"timed out waiting until {what}")
            for worker in harness.workers:
                if pump and worker.pump is not None:
                    worker.pump.pump()
            await deferLater(harness.reactor, 0.002, lambda: None)

    async def _through_catch_up(
        self,
        harness: ReplicationHarness,
        worker: HarnessWorker,
        write: Callable[[], Awaitable[object]],
    ) -> None:
        """Disconnect `worker`, `write`, reconnect: the worker gets the rows
        only through the catch-up its reconnection's POSITION starts."""
        before = self._positions(worker)
        calls = len(worker.data.rdata_calls)
        harness.disconnect(worker)
        await write()
        await harness.pump_until_quiet()
        self.assertEqual(self._positions(worker), before)
        self.assertEqual(len(worker.data.rdata_calls), calls)
        self.assertNotEqual(self._writer_tokens(harness), before)
        harness.connect(worker)
        await harness.pump_until_quiet()

    # The oracle

    async def _store_rows(
        self, harness: ReplicationHarness, stream: str, after: int, worker: HarnessWorker
    ) -> Rows:
        """The store's rows of `stream` with tokens above `after`, typed, as
        `worker` received them.

        The one row that changes once written: as in Synapse, an ``ev`` row
        carries the event's outlier flag as it is when the row is read, so
        the row at an outlier's own token says ``outlier`` to a worker that
        read it live, and no longer once the event was de-outliered (which
        also streams it again at a new token). The scenarios pump before
        de-outliering, so which one a worker got is known.
        """
        stores = harness.writer.stores
        if stream == EVENTS:
            raw = await stores.events.get_all_rows_unpaged(WRITER)
            rows = [(t, EventsStream.parse_row(r)) for t, r in raw if t > after]
            live_outliers = self.seen_as_outlier.get(worker.name, set())
            for i, (token, row) in enumerate(rows):
                if token in live_outliers:
                    assert isinstance(row, EventsStreamEventRow) and not row.outlier
                    rows[i] = (token, attrs.evolve(row, outlier=True))
            return rows
        assert stream == RECEIPTS
        upto = stores.receipts.current_token(WRITER)
        raw, new_upto, limited = await stores.receipts.get_updates(WRITER, 0, upto, 10**9)
        assert (new_upto, limited) == (upto, False)
        return [(t, ReceiptsStream.parse_row(r)) for t, r in raw if t > after]

    async def _assert_has_store_rows(
        self, harness: ReplicationHarness, worker: HarnessWorker, start: Mapping[str, int]
    ) -> dict[str, Rows]:
        """`worker` received exactly the store's rows after `start`: each once,
        in token order, with its token, every token's rows in one call; and it
        is at the writer's position. Returns those rows by stream."""
        expected: dict[str, Rows] = {}
        for stream in PERSISTED:
            rows = await self._store_rows(harness, stream, start[stream], worker)
            self.assertEqual(worker.data.rows_for(stream), rows, f"{worker.name}: {stream}")
            calls = [
                (c.instance_name, c.token, list(c.rows))
                for c in worker.data.rdata_calls
                if c.stream_name == stream
            ]
            self.assertEqual(
                calls,
                [(WRITER, token, group) for token, group in _by_token(rows)],
                f"{worker.name}: {stream} calls",
            )
            self.assertEqual(
                worker.data.get_position(stream, WRITER),
                harness.writer.streams[stream].current_token(WRITER),
            )
            expected[stream] = rows
        return expected

    def _assert_typing_matches(
        self,
        harness: ReplicationHarness,
        worker: HarnessWorker,
        rooms: Iterable[str] | None = None,
    ) -> None:
        """The worker's typing state, built from its rows, is the writer's
        (for `rooms` only: those changed since the worker connected)."""
        writer_state = harness.writer.typing.typing_state()
        if rooms is not None:
            writer_state = {room: writer_state[room] for room in rooms}
        self.assertTrue(writer_state, "the scenario wrote no typing")
        self.assertEqual(self._typing_state(worker), writer_state)
        assert isinstance(worker.data, TypingStateDataHandler)
        tokens = worker.data.typing_tokens
        self.assertEqual(tokens, sorted(set(tokens)), "typing tokens not increasing")
        self.assertEqual(
            worker.data.get_position(TYPING, WRITER),
            harness.writer.typing.current_token(WRITER),
        )

    # Writing

    async def _write_every_kind(self, harness: ReplicationHarness) -> list[str]:
        """Every kind of row the writer produces; the rooms where typing changed."""
        events = harness.writer.stores.events
        receipts = harness.writer.stores.receipts
        typing = harness.writer.typing
        room = inject.make_room_id(SERVER)
        other_room = inject.make_room_id(SERVER)

        await inject.inject_member(events, room, ALICE, "join")
        await inject.inject_state(events, room, "m.room.name", "", ALICE, {"name": "Lobby"})
        await inject.inject_member(events, room, BOB, "invite", sender=ALICE)
        await inject.inject_member(events, room, BOB, "join")
        root = await inject.inject_message(events, room, ALICE, "thread root")
        reply = await inject.inject_message(events, room, BOB, "in thread", relates_to=root)
        spam = await inject.inject_message(events, room, BOB, "spam")
        await inject.inject_redaction(events, room, ALICE, spam)
        outlier = await inject.inject_message(events, room, CAROL, "from the past", outlier=True)
        await harness.pump_until_quiet()
        for worker in harness.workers:
            if worker.connected:
                token = events.current_token(WRITER)
                self.seen_as_outlier.setdefault(worker.name, set()).add(token)
        await events.de_outlier_events([outlier])
        await inject.inject_member(events, room, BOB, "leave")
        await inject.inject_member(events, room, CAROL, "ban", sender=ALICE)
        topic = await inject.inject_state(events, room, "m.room.topic", "", ALICE, {"topic": "t"})
        await inject.inject_state_change(
            events,
            room,
            {("m.room.topic", ""): topic, ("m.room.name", ""): None, ("org.example", "k"): root},
        )
        # A batch whose state delta is recorded at its first stream ordering.
        name = EventToPersist(
            event_id=inject.make_event_id(),
            room_id=room,
            type="m.room.name",
            sender=ALICE,
            state_key="",
            content={"name": "Renamed"},
        )
        avatar = EventToPersist(
            event_id=inject.make_event_id(),
            room_id=room,
            type="m.room.avatar",
            sender=ALICE,
            state_key="",
        )
        await events.persist_events(
            [name, avatar, _message(room, "after rename")],
            state_delta={
                room: {
                    ("m.room.name", ""): name.event_id,
                    ("m.room.avatar", ""): avatar.event_id,
                }
            },
        )
        rejected = EventToPersist(
            event_id=inject.make_event_id(),
            room_id=room,
            type="m.room.power_levels",
            sender=BOB,
            state_key="",
            rejected=True,
        )
        await events.persist_events([rejected])
        await inject.inject_member(events, other_room, ALICE, "join")

        await inject.inject_receipt(receipts, room, ALICE, reply)
        await inject.inject_receipt(receipts, room, BOB, reply, thread_id="main")
        await inject.inject_receipt(receipts, room, BOB, reply, thread_id=root)
        await inject.inject_receipt(receipts, room, CAROL, root, receipt_type="m.read.private")
        await inject.inject_receipt(receipts, other_room, ALICE, root, thread_id="main")

        inject.inject_typing(typing, room, ALICE)
        inject.inject_typing(typing, room, BOB)
        inject.inject_typing(typing, other_room, CAROL)
        inject.inject_typing(typing, room, ALICE, typing=False)
        inject.inject_typing(typing, other_room, CAROL, typing=False)
        inject.inject_typing(typing, other_room, ALICE)
        return [room, other_room]

    def _assert_every_kind(self, rows: Mapping[str, Rows], outlier_seen_live: bool) -> None:
        """The rows hold what `_write_every_kind` wrote (a check of the
        scenario itself: an injection that wrote less would pass emptily)."""
        ev = [r for _, r in rows[EVENTS] if isinstance(r, EventsStreamEventRow)]
        state = [r for _, r in rows[EVENTS] if isinstance(r, EventsStreamCurrentStateRow)]
        self.assertEqual(
            {r.membership for r in ev} - {None}, {"join", "invite", "leave", "ban"}
        )
        self.assertTrue(any(r.redacts is not None for r in ev))
        self.assertTrue(any(r.relates_to is not None for r in ev))
        self.assertTrue(any(r.rejected for r in ev))
        # The de-outliered event: at its own token, then at its ex-outlier one.
        (ex_outlier,) = {r.event_id for r in ev if [e.event_id for e in ev].count(r.event_id) > 1}
        self.assertEqual(
            [r.outlier for r in ev if r.event_id == ex_outlier], [outlier_seen_live, False]
        )
        self.assertTrue(any(r.event_id is None for r in state))
        self.assertTrue(any(len(group) >= 3 for _, group in _by_token(rows[EVENTS])))
        receipts = [r for _, r in rows[RECEIPTS]]
        self.assertTrue(all(isinstance(r, ReceiptsStreamRow) for r in receipts))
        self.assertEqual(len({r.thread_id for r in receipts}), 3)
        self.assertEqual(len(receipts), 5)

    async def _write_messages(
        self, harness: ReplicationHarness, count: int, one_by_one: bool
    ) -> None:
        events = harness.writer.stores.events
        room = inject.make_room_id(SERVER)
        if one_by_one:
            for i in range(count):
                await inject.inject_message(events, room, ALICE, f"message {i}")
        else:
            await events.persist_events([_message(room, f"message {i}") for i in range(count)])

    async def _write_huge_state_changes(self, harness: ReplicationHarness) -> dict[str, int]:
        """Huge state changes at single tokens, with and without an event;
        their tokens by name."""
        events = harness.writer.stores.events
        room = inject.make_room_id(SERVER)
        tokens = {}
        token = await inject.inject_state_change(events, room, _state_changes("a", 200))
        assert token is not None
        tokens["200 keys"] = token
        token = await inject.inject_state_change(events, room, _state_changes("b", 149))
        assert token is not None
        tokens["149 keys"] = token
        event = _message(room, "with a big delta")
        (tokens["event, 200 keys"],) = await events.persist_events(
            [event], state_delta={room: _state_changes("c", 200)}
        )
        (tokens["event, 149 keys"],) = await events.persist_events(
            [_message(room, "with a delta")], state_delta={room: _state_changes("d", 149)}
        )
        other_room = inject.make_room_id(SERVER)
        tokens["two rooms"], _ = await events.persist_events(
            [_message(room, "two rooms"), _message(other_room, "two rooms")],
            state_delta={room: _state_changes("e", 3), other_room: _state_changes("f", 150)},
        )
        return tokens

    def _assert_huge_state_calls(
        self, worker: HarnessWorker, tokens: Mapping[str, int]
    ) -> None:
        calls = {c.token: c.rows for c in worker.data.rdata_calls if c.stream_name == EVENTS}
        (all_state,) = calls[tokens["200 keys"]]
        self.assertIsInstance(all_state, EventsStreamAllStateRow)
        rows = calls[tokens["149 keys"]]
        self.assertEqual(len(rows), 149)
        self.assertTrue(all(isinstance(r, EventsStreamCurrentStateRow) for r in rows))
        ev, all_state = calls[tokens["event, 200 keys"]]
        self.assertIsInstance(ev, EventsStreamEventRow)
        self.assertIsInstance(all_state, EventsStreamAllStateRow)
        rows = calls[tokens["event, 149 keys"]]
        self.assertEqual(len(rows), 150)
        self.assertIsInstance(rows[0], EventsStreamEventRow)
        self.assertTrue(all(isinstance(r, EventsStreamCurrentStateRow) for r in rows[1:]))
        rows = calls[tokens["two rooms"]]
        self.assertEqual(
            [type(r) for r in rows],
            [EventsStreamEventRow] + [EventsStreamCurrentStateRow] * 3 + [EventsStreamAllStateRow],
        )

    async def _write_state_over_many_tokens(self, harness: ReplicationHarness) -> None:
        """State changes spread over some 400 stream ids, written every way."""
        events = harness.writer.stores.events
        room = inject.make_room_id(SERVER)
        for i in range(120):
            await inject.inject_state(events, room, "org.example.one", f"k{i}", ALICE)
        for i in range(60):
            await inject.inject_state_change(events, room, _state_changes(f"s{i}-", 3))
        await events.persist_events(
            [
                EventToPersist(
                    event_id=inject.make_event_id(),
                    room_id=room,
                    type="org.example.many",
                    sender=BOB,
                    state_key=f"k{i}",
                )
                for i in range(200)
            ]
        )
        for i in range(20):
            await inject.inject_message(events, room, BOB, f"between {i}")
            await inject.inject_state_change(events, room, _state_changes(f"m{i}-", 2))

    # 1. Everything written after a worker connects arrives once, in order.

    async def test_every_kind_of_row_arrives_once_in_order(self) -> None:
        """Events of every kind, receipts and typing arrive live exactly as stored."""
        harness, (worker,) = await self._start()
        start = self._positions(worker)
        rooms = await self._write_every_kind(harness)
        await harness.pump_until_quiet()
        self._assert_every_kind(
            await self._assert_has_store_rows(harness, worker, start), outlier_seen_live=True
        )
        self._assert_typing_matches(harness, worker, rooms)

    async def test_every_kind_of_row_through_catch_up(self) -> None:
        """Every kind of row written while disconnected arrives through catch-up."""
        harness, (worker,) = await self._start(limits=SMALL_CATCH_UP)
        start = self._positions(worker)
        rooms: list[str] = []

        async def write() -> None:
            rooms.extend(await self._write_every_kind(harness))

        await self._through_catch_up(harness, worker, write)
        self._assert_every_kind(
            await self._assert_has_store_rows(harness, worker, start), outlier_seen_live=False
        )
        self._assert_typing_matches(harness, worker, rooms)

    # 2. Past the row limits.

    async def test_many_messages_in_one_write_live(self) -> None:
        """1000 messages persisted in one call arrive live, none lost or doubled."""
        harness, (worker,) = await self._start()
        await self._write_messages(harness, 1000, one_by_one=False)
        await harness.pump_until_quiet()
        rows = await self._assert_has_store_rows(harness, worker, dict.fromkeys(PERSISTED, 0))
        self.assertEqual(len(rows[EVENTS]), 1000)

    async def test_many_messages_in_one_write_through_catch_up(self) -> None:
        """1000 messages persisted in one call arrive through a paged catch-up."""
        harness, (worker,) = await self._start(limits=SMALL_CATCH_UP)
        await self._through_catch_up(
            harness, worker, lambda: self._write_messages(harness, 1000, one_by_one=False)
        )
        rows = await self._assert_has_store_rows(harness, worker, dict.fromkeys(PERSISTED, 0))
        self.assertEqual(len(rows[EVENTS]), 1000)

    async def test_many_messages_one_by_one_live(self) -> None:
        """1000 messages persisted one by one arrive live, none lost or doubled."""
        harness, (worker,) = await self._start()
        await self._write_messages(harness, 1000, one_by_one=True)
        await harness.pump_until_quiet()
        rows = await self._assert_has_store_rows(harness, worker, dict.fromkeys(PERSISTED, 0))
        self.assertEqual(len(rows[EVENTS]), 1000)

    async def test_many_messages_one_by_one_through_catch_up(self) -> None:
        """1000 messages persisted one by one arrive through a paged catch-up."""
        harness, (worker,) = await self._start(limits=SMALL_CATCH_UP)
        await self._through_catch_up(
            harness, worker, lambda: self._write_messages(harness, 1000, one_by_one=True)
        )
        rows = await self._assert_has_store_rows(harness, worker, dict.fromkeys(PERSISTED, 0))
        self.assertEqual(len(rows[EVENTS]), 1000)

    async def test_huge_state_change_live(self) -> None:
        """A huge state change at one token arrives live as one call (state-all at 200 keys)."""
        harness, (worker,) = await self._start()
        tokens = await self._write_huge_state_changes(harness)
        await harness.pump_until_quiet()
        await self._assert_has_store_rows(harness, worker, dict.fromkeys(PERSISTED, 0))
        self._assert_huge_state_calls(worker, tokens)

    async def test_huge_state_change_through_catch_up(self) -> None:
        """A huge state change at one token arrives through catch-up as one call."""
        harness, (worker,) = await self._start(limits=SMALL_CATCH_UP)
        tokens: dict[str, int] = {}

        async def write() -> None:
            tokens.update(await self._write_huge_state_changes(harness))

        await self._through_catch_up(harness, worker, write)
        await self._assert_has_store_rows(harness, worker, dict.fromkeys(PERSISTED, 0))
        self._assert_huge_state_calls(worker, tokens)

    async def test_state_changes_over_many_stream_ids_live(self) -> None:
        """State changes spread over hundreds of stream ids arrive live exactly as stored."""
        harness, (worker,) = await self._start()
        await self._write_state_over_many_tokens(harness)
        await harness.pump_until_quiet()
        rows = await self._assert_has_store_rows(harness, worker, dict.fromkeys(PERSISTED, 0))
        self.assertEqual(len(rows[EVENTS]), 120 * 2 + 60 * 3 + 200 * 2 + 20 * 3)

    async def test_state_changes_over_many_stream_ids_through_catch_up(self) -> None:
        """State changes spread over hundreds of stream ids arrive through catch-up."""
        harness, (worker,) = await self._start(limits=SMALL_CATCH_UP)
        await self._through_catch_up(
            harness, worker, lambda: self._write_state_over_many_tokens(harness)
        )
        rows = await self._assert_has_store_rows(harness, worker, dict.fromkeys(PERSISTED, 0))
        self.assertEqual(len(rows[EVENTS]), 120 * 2 + 60 * 3 + 200 * 2 + 20 * 3)

    async def _write_typing_in_many_rooms(self, harness: ReplicationHarness) -> None:
        """Typing changes in 150 rooms at once: more than a page."""
        typing = harness.writer.typing
        # The streamer now waits for the database, so it finds all the
        # typing changes below at once when it gets to the typing stream.
        await inject.inject_message(harness.writer.stores.events, inject.make_room_id(), ALICE)
        for i in range(150):
            room = inject.make_room_id(SERVER)
            inject.inject_typing(typing, room, ALICE)
            if i % 2:
                inject.inject_typing(typing, room, BOB)
            if i % 3 == 0:
                inject.inject_typing(typing, room, ALICE, typing=False)

    async def test_typing_in_many_rooms_live(self) -> None:
        """Typing in more rooms than the streamer sends at once arrives live, room by room."""
        harness, (worker,) = await self._start()
        await self._write_typing_in_many_rooms(harness)
        await harness.pump_until_quiet()
        self._assert_typing_matches(harness, worker)
        self.assertEqual(len(self._typing_state(worker)), 150)

    async def test_typing_in_many_rooms_through_catch_up(self) -> None:
        """Typing in many rooms while disconnected arrives through a paged catch-up."""
        harness, (worker,) = await self._start(limits=SMALL_CATCH_UP)

        await self._through_catch_up(
            harness, worker, lambda: self._write_typing_in_many_rooms(harness)
        )
        self._assert_typing_matches(harness, worker)
        self.assertEqual(len(self._typing_state(worker)), 150)

    async def test_failed_write_moves_the_position_without_rows(self) -> None:
        """Stream ids used by a failed write reach the worker as a position, with no rows."""
        harness, (worker,) = await self._start()
        events = harness.writer.stores.events
        room = inject.make_room_id(SERVER)
        event_id = await inject.inject_message(events, room, ALICE)
        duplicate = EventToPersist(
            event_id=event_id, room_id=room, type="m.room.message", sender=ALICE
        )
        try:
            await events.persist_events([_message(room, "fine"), duplicate])
        except sqlite3.IntegrityError:
            pass
        else:
            self.fail("a duplicate event id was persisted")
        self.assertEqual(events.current_token(WRITER), 3)
        await harness.pump_until_quiet()
        self.assertEqual(worker.data.get_position(EVENTS, WRITER), 3)
        self.assertIn((EVENTS, WRITER, 3), worker.data.positions_received)
        await inject.inject_message(events, room, BOB)
        await harness.pump_until_quiet()
        rows = await self._assert_has_store_rows(harness, worker, dict.fromkeys(PERSISTED, 0))
        self.assertEqual([t for t, _ in rows[EVENTS]], [1, 4])

    # 3. A connection lost in the middle of a batch.

    async def test_disconnect_in_the_middle_of_a_batch(self) -> None:
        """A batch cut by a lost connection is never delivered in part; catch-up delivers it whole."""
        harness, (worker,) = await self._start(limits=SMALL_CATCH_UP)
        events = harness.writer.stores.events
        room = inject.make_room_id(SERVER)
        await inject.inject_member(events, room, ALICE, "join")
        await inject.inject_state_change(events, room, _state_changes("small", 5))
        await harness.pump_until_quiet()
        before = self._positions(worker)
        calls_before = list(worker.data.rdata_calls)

        protocol = self._client_protocol(worker)
        cutter = _CutMidBatch(worker, protocol, EVENTS, keep=60)
        self.patch(protocol, "lineReceived", cutter.lineReceived)
        big = await inject.inject_state_change(events, room, _state_changes("big", 149))
        await self._until(harness, lambda: cutter.cut, "the batch is cut")
        await self._until(
            harness, lambda: not worker.instance.handler.connected(), "the worker sees the loss"
        )
        harness.disconnect(worker)
        # 60 rows of the batch were received, and none of them delivered.
        self.assertEqual(cutter.batch_rows_passed, 60)
        self.assertEqual(worker.data.rdata_calls, calls_before)
        self.assertEqual(self._positions(worker), before)
        assert big is not None and big > before[EVENTS]

        await self._write_messages(harness, 30, one_by_one=True)
        await inject.inject_state_change(events, room, _state_changes("later", 149))
        await inject.inject_receipt(harness.writer.stores.receipts, room, ALICE, "$e", thread_id="main")
        inject.inject_typing(harness.writer.typing, room, BOB)
        harness.connect(worker)
        await harness.pump_until_quiet()
        # A batch sent live on the new connection holds its own rows only.
        await inject.inject_state_change(events, room, _state_changes("live", 20))
        await harness.pump_until_quiet()
        rows = await self._assert_has_store_rows(harness, worker, dict.fromkeys(PERSISTED, 0))
        self.assertEqual(len([t for t, _ in rows[EVENTS] if t == big]), 149)
        self.assertEqual(len(worker.data.rdata_calls[-1].rows), 20)
        self._assert_typing_matches(harness, worker)

    async def test_reconnecting_after_a_cut_batch_while_rows_are_written(self) -> None:
        """A worker whose connection drops mid-batch reconnects, while rows keep coming, and misses nothing."""
        harness, (worker,) = await self._start(limits=SMALL_CATCH_UP)
        events = harness.writer.stores.events
        room = inject.make_room_id(SERVER)
        await inject.inject_member(events, room, ALICE, "join")
        await harness.pump_until_quiet()
        protocol = self._client_protocol(worker)
        cutter = _CutMidBatch(worker, protocol, EVENTS, keep=100, reconnect=True)
        self.patch(protocol, "lineReceived", cutter.lineReceived)
        (big,) = await events.persist_events(
            [_message(room, "big")], state_delta={room: _state_changes("big", 149)}
        )
        writing = Deferred.fromCoroutine(self._write_mixed(harness, 100))
        await self._until(harness, lambda: cutter.cut, "the batch is cut")
        await self._until(
            harness, lambda: not worker.instance.handler.connected(), "the worker sees the loss"
        )
        if self.transport == "memory":
            # No connector to retry in memory: reconnect as the factory would.
            harness.disconnect(worker)
            harness.connect(worker)
        await self._until(
            harness,
            lambda: worker.instance.handler.connected()
            and self._client_protocol(worker) is not protocol,
            "the worker is connected again",
        )
        await self._pump_while(harness, writing)
        await harness.pump_until_quiet()
        rows = await self._assert_has_store_rows(harness, worker, dict.fromkeys(PERSISTED, 0))
        self.assertEqual(len(rows[RECEIPTS]), 100)
        self.assertEqual(len([t for t, _ in rows[EVENTS] if t == big]), 150)
        self._assert_typing_matches(harness, worker)

    # 4. A typing writer that restarts.

    def _add_worker_following_restarts(
        self, harness: ReplicationHarness, name: str
    ) -> HarnessWorker:
        """A worker whose sources are those of whichever writer runs now: the
        database file and, for typing, the writer process (over HTTP in real
        life), which is what a writer restart changes."""

        def source(stream: str) -> UpdateFunction:
            async def update(
                instance: str, from_token: int, upto_token: int, limit: int
            ) -> StreamUpdateResult:
                function = harness.writer.streams[stream].update_function
                return await function(instance, from_token, upto_token, limit)

            return update

        data = TypingStateDataHandler()
        instance = make_worker(
            harness.reactor,
            instance_name=name,
            server_name=SERVER,
            sources={stream: source(stream) for stream in WRITER_STREAMS},
            data_handler=data,
            stream_writers={stream: [WRITER] for stream in WRITER_STREAMS},
            backoff=Backoff(initial=0.05, maximum=0.5),
        )
        worker = HarnessWorker(name, instance, data)
        harness.workers.append(worker)
        harness.connect(worker)
        return worker

    async def _restart_writer(self, harness: ReplicationHarness) -> None:
        """Stop the writer process and start a new one on the same file: the
        persisted streams go on from the database, typing starts again at 0."""
        for worker in harness.workers:
            if worker.connected:
                harness.disconnect(worker)
        await harness.writer.stop()
        harness.writer = await start_writer(
            harness.reactor,
            db_path=self.db_path,
            instance_name=WRITER,
            server_name=SERVER,
            port=0 if self.transport == "tcp" else None,
        )

    async def _typing_writer_restarts(self, typing_before_reconnect: bool) -> None:
        harness, _ = await self._start(workers=0)
        worker = self._add_worker_following_restarts(harness, "worker1")
        await harness.pump_until_quiet()
        rooms = [inject.make_room_id(SERVER) for _ in range(5)]
        typing = harness.writer.typing
        inject.inject_typing(typing, rooms[0], ALICE)
        inject.inject_typing(typing, rooms[0], BOB)
        inject.inject_typing(typing, rooms[1], CAROL)
        inject.inject_typing(typing, rooms[1], CAROL, typing=False)
        inject.inject_typing(typing, rooms[2], ALICE)
        await inject.inject_message(harness.writer.stores.events, rooms[0], ALICE)
        await inject.inject_receipt(harness.writer.stores.receipts, rooms[0], BOB, "$e")
        await harness.pump_until_quiet()
        self._assert_typing_matches(harness, worker)
        old_position = worker.data.get_position(TYPING, WRITER)
        self.assertEqual(old_position, 5)
        self.assertEqual(worker.data.resets, [])

        await self._restart_writer(harness)
        typing = harness.writer.typing
        self.assertEqual(typing.current_token(WRITER), 0)
        if typing_before_reconnect:
            inject.inject_typing(typing, rooms[3], BOB)
        await inject.inject_message(harness.writer.stores.events, rooms[0], BOB)
        harness.connect(worker)
        await harness.pump_until_quiet()
        # Not stale: what the old writer said is gone.
        self.assertEqual(worker.data.resets, [(TYPING, WRITER, 0)])
        self.assertEqual(self._typing_state(worker), typing.typing_state())

        # Not stuck: rows at tokens below the old position are delivered.
        calls = len(worker.data.rdata_calls)
        inject.inject_typing(typing, rooms[0], CAROL)
        inject.inject_typing(typing, rooms[4], ALICE)
        await inject.inject_receipt(harness.writer.stores.receipts, rooms[0], ALICE, "$e")
        await harness.pump_until_quiet()
        new_tokens = [
            c.token for c in worker.data.rdata_calls[calls:] if c.stream_name == TYPING
        ]
        first = 2 if typing_before_reconnect else 1
        self.assertEqual(new_tokens, [first, first + 1])
        self._assert_typing_matches(harness, worker)
        self.assertEqual(worker.data.resets, [(TYPING, WRITER, 0)])
        # The persisted streams went on from the database, without a reset.
        rows = await self._assert_has_store_rows(harness, worker, dict.fromkeys(PERSISTED, 0))
        self.assertEqual((len(rows[EVENTS]), len(rows[RECEIPTS])), (2, 2))

    async def test_typing_writer_restart(self) -> None:
        """After the typing writer restarts, the worker resets its typing and follows the new writer."""
        await self._typing_writer_restarts(typing_before_reconnect=False)

    async def test_typing_writer_restart_with_typing_before_reconnect(self) -> None:
        """Typing on the restarted writer before the worker reconnects arrives after the reset."""
        await self._typing_writer_restarts(typing_before_reconnect=True)

    async def _start_with_swappable_typing(self) -> tuple[ReplicationHarness, _SwappableTyping]:
        """A writer assembled as `start_writer` does, but whose typing stream
        reads a `_SwappableTyping`, and one connected worker."""
        self.db_path = self.mktemp() + ".db"
        self.seen_as_outlier = {}
        reactor = harness_reactor
        notifier = Notifier()
        stores = await open_sqlite_store(self.db_path, WRITER, reactor, notifier.poke)
        typing = _SwappableTyping(TypingWriter(reactor, WRITER, notifier.poke), notifier.poke)
        streams: dict[str, Stream[Any]] = {
            EVENTS: EventsStream(WRITER, stores.events.current_token, stores.events.get_updates),
            RECEIPTS: ReceiptsStream(
                WRITER, stores.receipts.current_token, stores.receipts.get_updates
            ),
            TYPING: TypingStream(WRITER, typing.current_token, typing.get_updates),
        }
        handler = ReplicationCommandHandler(
            instance_name=WRITER,
            clock=reactor,
            streams=streams,
            data_handler=ReplicationDataHandler(),
            writer_streams=WRITER_STREAMS,
            stream_writers={name: [WRITER] for name in WRITER_STREAMS},
        )
        streamer = ReplicationStreamer(
            clock=reactor, command_handler=handler, streams=list(streams.values())
        )
        notifier.add(streamer.on_notifier_poke)
        factory = ReplicationServerFactory(clock=reactor, handler=handler, server_name=SERVER)
        writer = WriterInstance(
            instance_name=WRITER,
            server_name=SERVER,
            stores=stores,
            typing=typing.writer,
            streams=streams,
            handler=handler,
            streamer=streamer,
            server_factory=factory,
            port=listen_replication(reactor, 0, factory) if self.transport == "tcp" else None,
        )
        harness = ReplicationHarness(writer, self.transport, reactor, None)
        self.addCleanup(harness.stop)
        harness.add_worker("worker1", TypingStateDataHandler())
        await harness.pump_until_quiet()
        return harness, typing

    async def test_typing_writer_restart_on_a_live_connection(self) -> None:
        """A typing writer restarting behind a live connection resets the worker's typing."""
        harness, typing = await self._start_with_swappable_typing()
        (worker,) = harness.workers
        rooms = [inject.make_room_id(SERVER) for _ in range(4)]
        inject.inject_typing(typing.writer, rooms[0], ALICE)
        inject.inject_typing(typing.writer, rooms[1], BOB)
        inject.inject_typing(typing.writer, rooms[1], CAROL)
        await harness.pump_until_quiet()
        self._assert_typing_matches(harness, worker)
        self.assertEqual(worker.data.get_position(TYPING, WRITER), 3)
        connection = self._client_protocol(worker)

        harness.writer.typing = typing.restart()
        inject.inject_typing(typing.writer, rooms[2], ALICE)
        await harness.pump_until_quiet()
        self.assertEqual(worker.data.resets, [(TYPING, WRITER, 0)])
        self._assert_typing_matches(harness, worker)
        self.assertEqual(self._typing_state(worker), {rooms[2]: (ALICE,)})

        inject.inject_typing(typing.writer, rooms[0], BOB)
        inject.inject_typing(typing.writer, rooms[3], CAROL)
        await harness.pump_until_quiet()
        assert isinstance(worker.data, TypingStateDataHandler)
        self.assertEqual(worker.data.typing_tokens, [1, 2, 3])
        self._assert_typing_matches(harness, worker)
        self.assertEqual(worker.data.resets, [(TYPING, WRITER, 0)])
        self.assertEqual(worker.instance.handler.connections(), [connection])

    # 5. Bad commands from the server.

    async def _inject_lines_then_write(
        self, lines: list[bytes]
    ) -> tuple[HarnessWorker, _LogCapture]:
        """Feed `lines` to a worker's connection as if the server sent them,
        then write rows of every stream: those must arrive, on the same
        connection, and nothing else."""
        harness, (worker,) = await self._start()
        start = self._positions(worker)
        logs = self._capture_logs()
        protocol = self._client_protocol(worker)
        positions_received = list(worker.data.positions_received)
        protocol.dataReceived(b"".join(line + b"\n" for line in lines))
        await harness.pump_until_quiet()
        self.assertEqual(worker.data.rdata_calls, [])
        self.assertEqual(worker.data.positions_received, positions_received)
        self.assertEqual(worker.data.positions(), {(s, WRITER): start[s] for s in WRITER_STREAMS})

        rooms = await self._write_every_kind(harness)
        await harness.pump_until_quiet()
        self.assertEqual(worker.instance.handler.connections(), [protocol])
        self._assert_every_kind(
            await self._assert_has_store_rows(harness, worker, start), outlier_seen_live=True
        )
        self._assert_typing_matches(harness, worker, rooms)
        return worker, logs

    async def test_command_for_unknown_stream_is_logged_and_dropped(self) -> None:
        """RDATA and POSITION for an unknown stream are logged and dropped; the rest flows."""
        _, logs = await self._inject_lines_then_write(
            [
                b'RDATA nonexistent master 1 ["!r:test.local",["@a:test.local"]]',
                b"POSITION nonexistent master 0 5",
            ]
        )
        warnings = logs.warnings()
        self.assertTrue(
            any("RDATA" in w and "unknown stream 'nonexistent'" in w for w in warnings), warnings
        )

    async def test_malformed_row_is_logged_and_dropped(self) -> None:
        """Rows that do not parse are logged and dropped; later rows of the stream still arrive."""
        _, logs = await self._inject_lines_then_write(
            [
                b'RDATA events master batch ["ev",["$only-an-id"]]',
                b'RDATA events master 1 ["nonsense",[]]',
                b'RDATA receipts master 1 ["!r:test.local","m.read"]',
                b'RDATA typing master 1 ["!r:test.local","@not-a-list:test.local"]',
            ]
        )
        warnings = logs.warnings()
        for stream in (EVENTS, RECEIPTS, TYPING):
            self.assertTrue(
                any(f"malformed row of stream {stream!r}" in w for w in warnings), warnings
            )

    async def test_position_from_unknown_instance_is_logged_and_dropped(self) -> None:
        """A POSITION from an instance that does not write the stream is logged and dropped."""
        worker, logs = await self._inject_lines_then_write(
            [b"POSITION events stranger 0 100", b"POSITION typing stranger 0 7"]
        )
        warnings = logs.warnings()
        for stream in (EVENTS, TYPING):
            self.assertTrue(
                any(
                    f"POSITION for stream {stream!r} from 'stranger'" in w for w in warnings
                ),
                warnings,
            )
        self.assertNotIn("stranger", {instance for _, instance in worker.data.positions()})

    # Writes that do not wait for the worker.

    async def _write_mixed(self, harness: ReplicationHarness, rounds: int) -> list[str]:
        """Rows of every stream, a round at a time; the typing rooms."""
        events = harness.writer.stores.events
        receipts = harness.writer.stores.receipts
        rooms = [inject.make_room_id(SERVER) for _ in range(4)]
        for i in range(rounds):
            room = rooms[i % len(rooms)]
            user = f"@user{i}:test.local"
            event_id = await inject.inject_message(events, room, user, f"round {i}")
            await inject.inject_receipt(receipts, room, user, event_id, thread_id="main")
            inject.inject_typing(harness.writer.typing, room, user, typing=i % 3 != 2)
            if i % 10 == 0:
                await inject.inject_state_change(events, room, _state_changes(f"r{i}-", 4))
        return rooms

    async def _pump_while(self, harness: ReplicationHarness, work: Awaitable[object]) -> None:
        """Let `work` run to its end while connections are pumped."""
        d = Deferred.fromCoroutine(_awaited(work))
        await self._until(harness, lambda: d.called, "the writes are done")
        await d

    async def test_rows_written_while_a_worker_reconnects_arrive_once(self) -> None:
        """Rows written while a worker reconnects and catches up arrive exactly once."""
        harness, (worker,) = await self._start(limits=SMALL_CATCH_UP)
        harness.disconnect(worker)
        await self._write_messages(harness, 300, one_by_one=False)
        writing = self._write_mixed(harness, 150)
        harness.connect(worker)
        await self._pump_while(harness, writing)
        await harness.pump_until_quiet()
        rows = await self._assert_has_store_rows(harness, worker, dict.fromkeys(PERSISTED, 0))
        self.assertEqual(len(rows[RECEIPTS]), 150)
        self._assert_typing_matches(harness, worker)

    async def test_worker_added_during_writes_receives_exactly_the_later_rows(self) -> None:
        """A worker added while rows are being written gets exactly those after its first POSITION."""
        harness, (first,) = await self._start()
        writing = Deferred.fromCoroutine(self._write_mixed(harness, 150))
        await self._until(
            harness,
            lambda: harness.writer.stores.receipts.current_token(WRITER) >= 40,
            "some rows are written",
        )
        late = harness.add_worker("late", TypingStateDataHandler())
        # Let the writer publish to the new connection before it is pumped
        # (in memory): rows then reach the worker before its first POSITION.
        written = harness.writer.stores.receipts.current_token(WRITER)
        await self._until(
            harness,
            lambda: harness.writer.stores.receipts.current_token(WRITER) >= written + 10,
            "more rows are written",
            pump=False,
        )
        await self._pump_while(harness, writing)
        await harness.pump_until_quiet()
        start = {}
        for stream in WRITER_STREAMS:
            start[stream] = next(
                t for s, i, t in late.data.positions_received if s == stream and i == WRITER
            )
        self.assertGreaterEqual(start[RECEIPTS], 40)
        rows = await self._assert_has_store_rows(harness, late, start)
        self.assertEqual(len(rows[RECEIPTS]), 150 - start[RECEIPTS])
        self.assertTrue(rows[RECEIPTS])
        writer_typing = harness.writer.typing.typing_state()
        late_typing = self._typing_state(late)
        self.assertEqual(late_typing, {room: writer_typing[room] for room in late_typing})
        await self._assert_has_store_rows(harness, first, dict.fromkeys(PERSISTED, 0))
        self._assert_typing_matches(harness, first)

    # 6. and 7. Who receives what.

    async def test_rows_written_before_a_worker_connects_are_not_delivered(self) -> None:
        """A worker added after writes receives only the rows written after it connected."""
        harness, (first,) = await self._start()
        await self._write_every_kind(harness)
        await self._write_messages(harness, 150, one_by_one=False)
        # No pumping: the writer may still be publishing these to `first`.
        before = self._writer_tokens(harness)
        late = harness.add_worker("late", TypingStateDataHandler())
        await harness.pump_until_quiet()
        self.assertEqual(late.data.rdata_calls, [])
        self.assertEqual(self._positions(late), before)

        rooms = await self._write_every_kind(harness)
        await harness.pump_until_quiet()
        self._assert_every_kind(
            await self._assert_has_store_rows(harness, late, before), outlier_seen_live=True
        )
        self._assert_typing_matches(harness, late, rooms)
        await self._assert_has_store_rows(harness, first, dict.fromkeys(PERSISTED, 0))

    async def test_two_workers_receive_everything(self) -> None:
        """Two workers, one of them reconnecting in between, both receive every row."""
        harness, workers = await self._start(workers=2, limits=SMALL_CATCH_UP)
        await self._write_every_kind(harness)
        await harness.pump_until_quiet()
        await self._through_catch_up(
            harness, workers[1], lambda: self._write_state_over_many_tokens(harness)
        )
        await self._write_every_kind(harness)
        await self._write_messages(harness, 200, one_by_one=False)
        await harness.pump_until_quiet()
        for worker in workers:
            rows = await self._assert_has_store_rows(harness, worker, dict.fromkeys(PERSISTED, 0))
            self.assertEqual(len(rows[RECEIPTS]), 10)
            self._assert_typing_matches(harness, worker)


class MemoryEndToEndTests(EndToEndScenarios, unittest.TestCase):
    transport = "memory"


class TcpEndToEndTests(EndToEndScenarios, unittest.TestCase):
    transport = "tcp"
