"""Replication with several writers of one stream on PostgreSQL, end to end:
writer instances (store, streamer, TCP listener, and a client-only handler
following the other writers) and a reader connected to every writer, all in
one reactor over loopback TCP, against a real PostgreSQL server."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import psycopg2
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from synapse_replication.data_handler import (
    ReplicationDataHandler,
    WriterReplicationDataHandler,
)
from synapse_replication.handler import ReplicationCommandHandler
from synapse_replication.instance import Notifier, reader_streams
from synapse_replication.storage import MultiWriterIdGenerator, Stores
from synapse_replication.storage.postgres import open_postgres_stores
from synapse_replication.streamer import ReplicationStreamer
from synapse_replication.streams import (
    EventsStream,
    ReceiptsStream,
    Stream,
    StreamUpdateResult,
    Token,
)
from synapse_replication.tcp import (
    Backoff,
    ReplicationClientFactory,
    ReplicationServerFactory,
    connect_replication_client,
    listen_replication,
)
from synapse_replication.testing import TestReplicationDataHandler
from tests.postgres_server import fresh_database
from tests.storage._helpers import ROOM, message, state

# The global reactor, untyped: it provides every reactor interface.
REACTOR: Final[Any] = reactor
SERVER: Final = "test.local"
STREAMS: Final = (EventsStream.NAME, ReceiptsStream.NAME)
EVENTS: Final = EventsStream.NAME
ANNOUNCE_EVERY_S: Final = 0.05
PERSIST_INTERVAL_S: Final = 0.02
BACKOFF: Final = Backoff(initial=0.05, maximum=0.2)


async def wait_until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    """Let the reactor run until `predicate()` holds; fail after `timeout`."""
    deadline = REACTOR.seconds() + timeout
    while not predicate():
        if REACTOR.seconds() > deadline:
            raise AssertionError(f"not reached in {timeout}s: {what}")
        await deferLater(REACTOR, 0.005, lambda: None)


async def positions_only(
    instance_name: str, from_token: Token, upto_token: Token, limit: int
) -> StreamUpdateResult:
    """The source of a writer following the others: it wants their positions
    only, never their rows."""
    return [], upto_token, False


@attrs.define
class Clients:
    """Client connections of one handler, each to one writer's listener."""

    handler: ReplicationCommandHandler
    factories: list[ReplicationClientFactory] = attrs.Factory(list)

    def connect(self, name: str, port: int) -> None:
        factory = ReplicationClientFactory(
            clock=REACTOR,
            handler=self.handler,
            server_name=SERVER,
            instance_name=name,
            backoff=BACKOFF,
        )
        self.factories.append(factory)
        connect_replication_client(REACTOR, "127.0.0.1", port, factory)

    def stop(self) -> None:
        for factory in self.factories:
            factory.stopTrying()
        for connection in self.handler.connections():
            connection.close()


@attrs.define
class PgWriter:
    """One writer instance of `events` and `receipts`."""

    name: str
    stores: Stores
    handler: ReplicationCommandHandler
    streamer: ReplicationStreamer
    factory: ReplicationServerFactory
    port: IListeningPort | None
    follower: Clients

    @property
    def events_id_gen(self) -> MultiWriterIdGenerator:
        gen = self.stores.events_id_gen
        assert isinstance(gen, MultiWriterIdGenerator)
        return gen

    def listening_port(self) -> int:
        assert self.port is not None
        host = self.port.getHost()
        assert isinstance(host, IPv4Address)
        return host.port

    def follow(self, other: PgWriter) -> None:
        """Learn `other`'s positions (for the idle jump) over a client connection."""
        self.follower.connect(self.name, other.listening_port())

    async def stop(self) -> None:
        self.follower.stop()
        if self.port is not None:
            stopped = self.port.stopListening()
            self.port = None
            if stopped is not None:
                await stopped
        for connection in list(self.factory.connections):
            connection.close()
        self.streamer.stop()
        await self.streamer.wait_until_idle()
        self.stores.close()


class MultiWriterReplicationTestCase(TestCase):
    def setUp(self) -> None:
        self.conn_args = fresh_database(self)
        self.writer_names: tuple[str, ...] = ("a", "b")

    async def start_writer(
        self, name: str, *, announce_every_s: float | None = ANNOUNCE_EVERY_S, port: int = 0
    ) -> PgWriter:
        writers = self.writer_names
        notifier = Notifier()
        stores = await open_postgres_stores(
            self.conn_args,
            name,
            REACTOR,
            notifier.poke,
            events_writers=writers,
            receipts_writers=writers,
            persist_interval_s=PERSIST_INTERVAL_S,
        )
        streams: dict[str, Stream[Any]] = {
            EVENTS: EventsStream(name, stores.events.current_token, stores.events.get_updates),
            ReceiptsStream.NAME: ReceiptsStream(
                name, stores.receipts.current_token, stores.receipts.get_updates
            ),
        }
        stream_writers = dict.fromkeys(STREAMS, writers)
        handler = ReplicationCommandHandler(
            instance_name=name,
            clock=REACTOR,
            streams=streams,
            data_handler=ReplicationDataHandler(),
            writer_streams=STREAMS,
            stream_writers=stream_writers,
        )
        streamer = ReplicationStreamer(
            clock=REACTOR,
            command_handler=handler,
            streams=list(streams.values()),
            announce_positions_every_s=announce_every_s,
        )
        notifier.add(streamer.on_notifier_poke)
        factory = ReplicationServerFactory(clock=REACTOR, handler=handler, server_name=SERVER)
        id_gens = {EVENTS: stores.events_id_gen, ReceiptsStream.NAME: stores.receipts_id_gen}
        follower = ReplicationCommandHandler(
            instance_name=name,
            clock=REACTOR,
            streams=reader_streams(name, dict.fromkeys(STREAMS, positions_only)),
            data_handler=WriterReplicationDataHandler(
                {s: g for s, g in id_gens.items() if isinstance(g, MultiWriterIdGenerator)}
            ),
            stream_writers=stream_writers,
        )
        writer = PgWriter(
            name=name,
            stores=stores,
            handler=handler,
            streamer=streamer,
            factory=factory,
            port=listen_replication(REACTOR, port, factory),
            follower=Clients(follower),
        )
        self.addCleanup(self._stop_writer, writer)
        return writer

    async def _stop_writer(self, writer: PgWriter) -> None:
        await writer.stop()
        await self._settle()

    async def _settle(self) -> None:
        """Let closed connections go in the following reactor turns."""
        await deferLater(REACTOR, 0.02, lambda: None)

    async def start_reader(self, writers: Sequence[PgWriter]) -> TestReplicationDataHandler:
        """A reader following both streams of every writer in `writers`, with
        its own (non-writer) stores as the source of rows it missed."""
        stores = await open_postgres_stores(
            self.conn_args,
            "reader",
            REACTOR,
            lambda: None,
            events_writers=self.writer_names,
            receipts_writers=self.writer_names,
        )
        self.addCleanup(stores.close)
        data = TestReplicationDataHandler()
        handler = ReplicationCommandHandler(
            instance_name="reader",
            clock=REACTOR,
            streams=reader_streams(
                "reader",
                {EVENTS: stores.events.get_updates, ReceiptsStream.NAME: stores.receipts.get_updates},
            ),
            data_handler=data,
            stream_writers=dict.fromkeys(STREAMS, self.writer_names),
        )
        clients = Clients(handler)
        for writer in writers:
            clients.connect("reader", writer.listening_port())
        self.addCleanup(self._settle)
        self.addCleanup(clients.stop)
        await wait_until(
            lambda: all(
                data.get_position(stream, writer.name) is not None
                for stream in STREAMS
                for writer in writers
            ),
            what="the reader hears from every writer",
        )
        return data

    async def caught_up(self, data: TestReplicationDataHandler, writers: Sequence[PgWriter]) -> None:
        """Wait until the reader has every writer's published positions."""

        def done() -> bool:
            for writer in writers:
                tokens = {
                    EVENTS: writer.stores.events.current_token(writer.name),
                    ReceiptsStream.NAME: writer.stores.receipts.current_token(writer.name),
                }
                for stream, token in tokens.items():
                    position = data.get_position(stream, writer.name)
                    if position is None or position < token:
                        return False
            return True

        await wait_until(done, what="the reader catches up")

    async def token_reaches(self, data: TestReplicationDataHandler, target: int) -> None:
        """Wait until the reader's events token over both writers reaches `target`."""
        await wait_until(
            lambda: (data.get_stream_token(EVENTS, self.writer_names) or 0) >= target,
            what=f"the reader's token reaches {target}",
        )

    def received(
        self, data: TestReplicationDataHandler, stream: str, writer: str
    ) -> list[tuple[int, Any]]:
        return [
            (call.token, row)
            for call in data.rdata_calls
            if call.stream_name == stream and call.instance_name == writer
            for row in call.rows
        ]

    def _persisted_position(self, writer: str) -> int:
        conn = psycopg2.connect(**self.conn_args)
        try:
            with conn.cursor() as cursor:
                cursor.execute(
                    "SELECT stream_id FROM stream_positions"
                    " WHERE stream_name = %s AND instance_name = %s",
                    (EVENTS, writer),
                )
                row = cursor.fetchone()
                assert row is not None
                return int(row[0])
        finally:
            conn.close()

    def _waiting_on_lock(self) -> bool:
        conn = psycopg2.connect(**self.conn_args)
        try:
            with conn.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
                row = cursor.fetchone()
                return row is not None and row[0] > 0
        finally:
            conn.close()


async def write_events(writer: PgWriter, prefix: str, count: int) -> list[str]:
    """`count` events, one write each, every fifth a state event (an ``ev``
    and a ``state`` row at one token); their event ids. Each writer changes
    the state of its own room (events are sharded by room across writers)."""
    event_ids = [f"${prefix}{i}" for i in range(count)]
    room_id = f"!{prefix}:test.local"
    for i, event_id in enumerate(event_ids):
        if i % 5 == 4:
            event = state(event_id, "m.room.topic", "", room_id=room_id)
        else:
            event = message(event_id, room_id=room_id)
        await writer.stores.events.persist_events([event])
    return event_ids


async def write_receipts(writer: PgWriter, prefix: str, count: int) -> None:
    for i in range(count):
        await writer.stores.receipts.insert_receipt(
            ROOM, "m.read", f"@{prefix}{i}:test.local", f"${prefix}{i}", None, {"ts": i}
        )


class TwoWritersOneReaderTests(MultiWriterReplicationTestCase):
    async def test_reader_gets_every_row_of_both_writers_once_in_order(self) -> None:
        """Both writers write concurrently; the reader gets each writer's rows
        exactly once, in that writer's token order, equal to the database's."""
        a, b = await self.start_writer("a"), await self.start_writer("b")
        a.follow(b)
        b.follow(a)
        data = await self.start_reader([a, b])
        writes: list[Deferred[Any]] = [
            Deferred.fromCoroutine(write_events(a, "a", 25)),
            Deferred.fromCoroutine(write_events(b, "b", 25)),
            Deferred.fromCoroutine(write_receipts(a, "a", 10)),
            Deferred.fromCoroutine(write_receipts(b, "b", 10)),
        ]
        await gatherResults(writes)
        await self.caught_up(data, [a, b])
        self.assertEqual(data.resets, [])
        for writer in (a, b):
            for stream, store in (
                (EVENTS, writer.stores.events),
                (ReceiptsStream.NAME, writer.stores.receipts),
            ):
                position = data.get_position(stream, writer.name)
                assert position is not None
                rows, _, limited = await store.get_updates(writer.name, 0, position, 10_000)
                self.assertFalse(limited)
                parse = EventsStream.parse_row if stream == EVENTS else ReceiptsStream.parse_row
                expected = [(token, parse(row)) for token, row in rows]
                self.assertEqual(len(expected), 30 if stream == EVENTS else 10)
                got = self.received(data, stream, writer.name)
                self.assertEqual(got, expected)
                tokens = [call.token for call in data.rdata_calls if call.stream_name == stream and call.instance_name == writer.name]
                self.assertEqual(tokens, sorted(set(tokens)))

    async def test_idle_writer_keeps_the_reader_token_advancing(self) -> None:
        """A writer that writes nothing follows the other and announces it, so
        the reader's stream token keeps up with the busy writer."""
        a, b = await self.start_writer("a"), await self.start_writer("b")
        b.follow(a)
        data = await self.start_reader([a, b])
        for round_ in range(3):
            await write_events(a, f"r{round_}-", 3)
            await self.token_reaches(data, a.stores.events.current_token("a"))
        self.assertEqual(self.received(data, EVENTS, "b"), [])
        announced = [t for s, w, t in data.positions_received if s == EVENTS and w == "b"]
        self.assertGreaterEqual(len(announced), 3)
        self.assertEqual(announced, sorted(announced))

        # Once nothing moves, nothing more is announced.
        await deferLater(REACTOR, 4 * ANNOUNCE_EVERY_S, lambda: None)
        count = len(data.positions_received)
        await deferLater(REACTOR, 4 * ANNOUNCE_EVERY_S, lambda: None)
        self.assertEqual(len(data.positions_received), count)

    async def test_without_announcements_an_idle_writer_holds_the_token(self) -> None:
        """The stall that announcements prevent: an idle writer that does not
        announce its moves holds the reader's token at its start."""
        a, b = await self.start_writer("a"), await self.start_writer("b", announce_every_s=None)
        b.follow(a)
        data = await self.start_reader([a, b])
        start = data.get_stream_token(EVENTS, ["a", "b"])
        await write_events(a, "x", 3)
        await wait_until(lambda: (data.get_position(EVENTS, "a") or 0) >= a.stores.events.current_token("a"))
        await wait_until(lambda: b.events_id_gen.get_current_token_for_writer("b") >= a.stores.events.current_token("a"))
        self.assertEqual(data.get_stream_token(EVENTS, ["a", "b"]), start)

    async def test_open_transaction_is_not_skipped(self) -> None:
        """A writer's row whose transaction is still open holds the reader's
        token below it, even as later rows of both writers commit; it arrives,
        before that writer's later rows, once committed."""
        a, b = await self.start_writer("a"), await self.start_writer("b")
        a.follow(b)
        b.follow(a)
        data = await self.start_reader([a, b])

        # Another session inserts the event's JSON without committing: `a`'s
        # transaction, with its id taken and its `events` row written, waits
        # on that unique key.
        blocker = psycopg2.connect(**self.conn_args)
        self.addCleanup(blocker.close)
        with blocker.cursor() as cursor:
            cursor.execute(
                "INSERT INTO event_json (event_id, room_id, json) VALUES ('$held', %s, '{}')",
                (ROOM,),
            )
        held = Deferred.fromCoroutine(a.stores.events.persist_events([message("$held")]))
        await wait_until(self._waiting_on_lock, what="a's write blocks")

        after = await a.stores.events.persist_events([message("$after")])
        await write_events(b, "b", 3)
        b_token = b.stores.events.current_token("b")
        await wait_until(lambda: (data.get_position(EVENTS, "b") or 0) >= b_token)
        held_id = after[0] - 1
        await deferLater(REACTOR, 4 * ANNOUNCE_EVERY_S, lambda: None)
        token = data.get_stream_token(EVENTS, ["a", "b"])
        assert token is not None
        self.assertLess(token, held_id)
        self.assertEqual(self.received(data, EVENTS, "a"), [])

        blocker.rollback()
        (held_id_written,) = await held
        self.assertEqual(held_id_written, held_id)
        await self.caught_up(data, [a, b])
        self.assertEqual(
            [(token, row.event_id) for token, row in self.received(data, EVENTS, "a")],
            [(held_id, "$held"), (after[0], "$after")],
        )
        final = data.get_stream_token(EVENTS, ["a", "b"])
        assert final is not None
        self.assertGreaterEqual(final, after[0])

class RestartTests(MultiWriterReplicationTestCase):
    async def test_restarted_writer_resumes_without_a_reset(self) -> None:
        """A writer restarting on its persisted position is not seen going back:
        the reader gets its later rows once, with no reset."""
        a, b = await self.start_writer("a"), await self.start_writer("b")
        b.follow(a)
        data = await self.start_reader([a, b])
        await write_events(b, "before", 3)
        await write_events(a, "a", 3)
        await self.caught_up(data, [a, b])
        port = b.listening_port()
        await b.stop()
        await self._settle()
        persisted = self._persisted_position("b")
        seen = data.get_position(EVENTS, "b")
        assert seen is not None
        self.assertGreaterEqual(persisted, seen)

        again = await self.start_writer("b", port=port)
        self.assertEqual(again.events_id_gen.get_current_token_for_writer("b"), persisted)
        await write_events(again, "after", 2)
        await self.caught_up(data, [a, again])
        self.assertEqual(data.resets, [])
        self.assertEqual(
            [row.event_id for _, row in self.received(data, EVENTS, "b")],
            ["$before0", "$before1", "$before2", "$after0", "$after1"],
        )
