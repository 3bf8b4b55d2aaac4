"""Lines known to be hostile to Synapse's replication, fed to our reader.

Each test sets up a real writer (SQLite) and a reader connected to it over
loopback TCP or through a real redis-server, feeds the reader hostile lines
as the server (TCP) or another publisher (Redis) would send them, then
writes rows of every stream: the reader must end with every row once and in
order (the ledger's invariants), and keep the connection where it should.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from synapse_replication.commands import Command, RemoteServerUpCommand
from synapse_replication.handler import HandlerLimits
from synapse_replication.instance import (
    WRITER_STREAMS,
    WriterInstance,
    reader_streams,
    start_writer,
)
from synapse_replication.interfaces import IReplicationConnection
from synapse_replication.redis import RedisReplicationClient
from synapse_replication.storage import EventToPersist
from synapse_replication.streams import EventsStream, ReceiptsStream, TypingStream
from synapse_replication.tcp import (
    Backoff,
    ClientReplicationProtocol,
    ConnectionLimits,
    ReplicationClientFactory,
    connect_replication_client,
)
from synapse_replication.testing import inject
from tests.fakes import LogCapture, capture_logs
from tests.redis_server import RawRedis, RedisServer, start_redis, wait_until
from tests.torture.ledger import (
    LedgerDataHandler,
    MonitoredHandler,
    ReaderLedger,
    check_persisted,
    check_typing,
    typing_base,
)
from tests.torture.links import BoundsMonitor
from tests.torture.runner import REACTOR, receipts_rows

WRITER: Final = "master"
READER: Final = "reader"
SERVER: Final = "hostile.local"
EVENTS: Final = EventsStream.NAME
RECEIPTS: Final = ReceiptsStream.NAME
TYPING: Final = TypingStream.NAME
ALICE: Final = "@alice:hostile.local"
LIMIT: Final = 16 * 1024
BATCH_LIMIT: Final = 50
ROW: Final = '["ev",["$hostile","!r:hostile.local","m.room.message",null,null,null,null,false,false]]'


def exactly(length: int) -> bytes:
    """A REMOTE_SERVER_UP line of exactly `length` bytes (no newline)."""
    prefix = b"REMOTE_SERVER_UP "
    return prefix + b"x" * (length - len(prefix))


def _stopper(client: RedisReplicationClient) -> Callable[[], Deferred[None]]:
    return lambda: Deferred.fromCoroutine(client.stop())


class _Reader:
    """The reader under attack: its handler, what it received, and the
    other commands (REMOTE_SERVER_UP...) it was given."""

    def __init__(self, writer: WriterInstance, limits: HandlerLimits) -> None:
        self.ledger = ReaderLedger(READER)
        self.data = LedgerDataHandler(self.ledger)
        self.monitor = BoundsMonitor()
        self.others: list[Command] = []
        self.handler = MonitoredHandler(
            monitor=self.monitor,
            instance_name=READER,
            clock=REACTOR,
            streams=reader_streams(
                READER,
                {
                    EVENTS: writer.stores.events.get_updates,
                    RECEIPTS: writer.stores.receipts.get_updates,
                    TYPING: writer.typing.get_updates,
                },
            ),
            data_handler=self.data,
            stream_writers={name: [WRITER] for name in WRITER_STREAMS},
            limits=limits,
            on_other_command=self._other,
        )

    def _other(self, connection: IReplicationConnection, cmd: Command) -> None:
        self.others.append(cmd)

    def connection(self) -> IReplicationConnection | None:
        connections = self.handler.connections()
        return connections[-1] if connections else None


class HostileCase(TestCase):
    """Starts the writer and the reader, feeds lines, checks the rows."""

    timeout = 60
    transport: str = "tcp"
    limits = HandlerLimits(max_pending_batch_rows=BATCH_LIMIT)

    def setUp(self) -> Deferred[None]:  # type: ignore[override]  # trial waits for it
        return Deferred.fromCoroutine(self._set_up())

    async def _set_up(self) -> None:
        self.logs: LogCapture = capture_logs(self.addCleanup)
        self.redis: RedisServer | None = None
        if self.transport == "redis":
            self.redis = await start_redis(self, REACTOR)
        self.writer = await start_writer(
            REACTOR,
            db_path=self.mktemp() + ".db",
            instance_name=WRITER,
            server_name=SERVER,
            port=0 if self.transport == "tcp" else None,
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(self.writer.stop()))
        self.reader = _Reader(self.writer, self.limits)
        self.room = inject.make_room_id("hostile.local")
        if self.redis is None:
            self.factory = ReplicationClientFactory(
                clock=REACTOR,
                handler=self.reader.handler,
                server_name=SERVER,
                instance_name=READER,
                limits=ConnectionLimits(max_line_length=LIMIT),
                backoff=Backoff(initial=0.02, maximum=0.1),
            )
            connect_replication_client(
                REACTOR, "127.0.0.1", self.writer.listening_port(), self.factory
            )
            self.addCleanup(self._stop_tcp)
        else:
            for name, handler in ((WRITER, self.writer.handler), (READER, self.reader.handler)):
                client = RedisReplicationClient(
                    reactor=REACTOR,
                    handler=handler,
                    server_name=SERVER,
                    instance_name=name,
                    settings=self.redis.settings(),
                )
                client.start()
                self.addCleanup(_stopper(client))
            self.raw = await RawRedis.connect(REACTOR, self.redis.settings())
            self.addCleanup(lambda: Deferred.fromCoroutine(self.raw.close()))
        # A first row of each stream, so that positions are above 0.
        await self._write()
        await self._caught_up()

    def _stop_tcp(self) -> Deferred[None]:
        self.factory.stopTrying()
        connection = self.reader.connection()
        if connection is not None:
            connection.close()
        return Deferred.fromCoroutine(wait_until(REACTOR, lambda: not self.reader.handler.connected(), "closed"))

    # Feeding lines

    async def feed(self, *lines: bytes) -> None:
        """The lines arrive at the reader as if the writer (TCP) or another
        instance (Redis) had sent them; returns once they were handled."""
        if self.redis is None:
            connection = self.reader.connection()
            assert isinstance(connection, ClientReplicationProtocol)
            connection.dataReceived(b"".join(line + b"\n" for line in lines))
            return
        barrier = RemoteServerUpCommand(f"barrier{len(self.reader.others)}.example")
        for line in lines:
            await self.raw.execute("PUBLISH", SERVER, line)
        await self.raw.execute("PUBLISH", SERVER, f"REMOTE_SERVER_UP {barrier.data}")
        await wait_until(REACTOR, lambda: barrier in self.reader.others, "the barrier")

    # Writing and checking

    async def _write(self) -> None:
        """A row of every stream."""
        events = self.writer.stores.events
        event_id = await inject.inject_message(events, self.room, ALICE)
        await inject.inject_receipt(
            self.writer.stores.receipts, self.room, f"@r{event_id[1:8]}:hostile.local", event_id
        )
        inject.inject_typing(self.writer.typing, self.room, ALICE, typing=not self._typing_now())

    def _typing_now(self) -> bool:
        return ALICE in self.writer.typing.typing_state().get(self.room, ())

    def _token(self, stream: str) -> int:
        return self.writer.streams[stream].current_token(WRITER)

    async def _caught_up(self) -> None:
        def done() -> bool:
            return all(
                self.reader.data.get_position(s, WRITER) == self._token(s) for s in WRITER_STREAMS
            )

        await wait_until(REACTOR, done, "the reader reached the writer's positions")

    async def assert_every_row(self) -> None:
        """Write a row of each stream, then: the reader has exactly the
        store's rows and the writer's typing state."""
        await self._write()
        await self._caught_up()
        ledger = self.reader.ledger
        problems = []
        for stream in (EVENTS, RECEIPTS):
            position = self.reader.data.get_position(stream, WRITER)
            assert position is not None
            start = ledger.starts[(stream, WRITER)]
            if stream == EVENTS:
                raw = await self.writer.stores.events.get_all_rows_unpaged(WRITER)
                expected = [(t, EventsStream.parse_row(r)) for t, r in raw if start < t <= position]
            else:
                expected = await receipts_rows(self.writer.stores.db, WRITER, start, position)
            problems += check_persisted(ledger, stream, WRITER, position, expected)
        base = typing_base(ledger, WRITER)
        rows, _, _ = await self.writer.typing.get_updates(WRITER, base, self._token(TYPING), 10**9)
        expected_typing = {row[0]: tuple(row[1]) for _, row in rows}
        problems += check_typing(ledger, WRITER, expected_typing)
        self.assertEqual(problems, [])

    async def _reconnected(self, old: IReplicationConnection | None) -> None:
        await wait_until(
            REACTOR, lambda: self.reader.connection() not in (None, old), "a new connection"
        )

    def warnings(self, text: str) -> list[str]:
        return [m for m in self.logs.messages() if text in m]


class HostileLines(HostileCase):
    """The tests, run over TCP here and through Redis below."""

    async def test_position_for_unknown_stream_is_dropped(self) -> None:
        """A POSITION for an unknown stream is logged and dropped; the connection and other streams go on."""
        connection = self.reader.connection()
        await self.feed(b"POSITION un_partial_stated_room master 0 5")
        await self.assert_every_row()
        self.assertIs(self.reader.connection(), connection)
        self.assertTrue(self.warnings("unknown stream 'un_partial_stated_room'"))

    async def test_rdata_from_unknown_instance_is_dropped(self) -> None:
        """RDATA from an instance that does not write the stream is dropped; no position is kept for it."""
        connection = self.reader.connection()
        await self.feed(f"RDATA events stranger 99 {ROW}".encode())
        await self.assert_every_row()
        self.assertIs(self.reader.connection(), connection)
        self.assertNotIn(("events", "stranger"), self.reader.data.positions())
        self.assertTrue(self.warnings("from 'stranger', which does not write it"))

    async def test_rdata_token_going_backwards_is_discarded(self) -> None:
        """RDATA at a token below the reader's position is discarded as a duplicate."""
        position = self.reader.data.get_position(EVENTS, WRITER)
        assert position is not None
        delivered = len(self.reader.ledger.deliveries)
        await self.feed(f"RDATA events master {position - 1} {ROW}".encode())
        self.assertEqual(len(self.reader.ledger.deliveries), delivered)
        await self.assert_every_row()

    async def test_position_going_backwards_resets_and_refetches(self) -> None:
        """A POSITION below the reader's position is taken for a writer restart: the stream is reset, refetched up to it, and later rows arrive."""
        for _ in range(3):
            await self._write()
        await self._caught_up()
        connection = self.reader.connection()
        await self.feed(b"POSITION typing master 1 1")
        await wait_until(
            REACTOR, lambda: self.reader.data.get_position(TYPING, WRITER) == 1, "the reset"
        )
        self.assertEqual(self.reader.data.resets, [(TYPING, WRITER, 0)])
        self.assertIs(self.reader.connection(), connection)
        # The real writer's rows come on: every row after the reset arrives.
        for _ in range(3):
            await self._write()
        await self.assert_every_row()

    async def test_batch_that_never_ends_is_bounded_and_recovers_after_position(self) -> None:
        """A batch that never ends is dropped at its bound; rows missed meanwhile arrive after the next POSITION."""
        connection = self.reader.connection()
        await self.feed(*[f"RDATA events master batch {ROW}".encode()] * (BATCH_LIMIT * 3))
        self.assertLessEqual(self.reader.monitor.max_pending_batch, BATCH_LIMIT)
        self.assertTrue(self.warnings("rows in one batch of stream 'events'"))
        # Rows written now are not taken until a POSITION: a write that rolls
        # back moves the token without a row, and the writer says so.
        await self._write()
        stored = await inject.inject_message(self.writer.stores.events, self.room, ALICE)
        duplicate = EventToPersist(
            event_id=stored, room_id=self.room, type="m.room.message", sender=ALICE
        )
        try:
            await self.writer.stores.events.persist_events([duplicate])
        except Exception as e:
            self.assertIn("UNIQUE", str(e))
        else:
            self.fail("a duplicate event id was stored")
        await self.assert_every_row()
        self.assertIs(self.reader.connection(), connection)

    async def test_line_at_the_limit_is_accepted(self) -> None:
        """A line of exactly 16 KiB is handled."""
        connection = self.reader.connection()
        line = exactly(LIMIT)
        await self.feed(line)
        self.assertIn(RemoteServerUpCommand(line.decode()[len("REMOTE_SERVER_UP ") :]), self.reader.others)
        self.assertIs(self.reader.connection(), connection)
        await self.assert_every_row()



class TcpHostileLines(HostileLines):
    transport = "tcp"

    async def test_line_over_the_limit_closes_with_error(self) -> None:
        """A line one byte over 16 KiB is answered with ERROR and the connection closed; the reader reconnects and misses nothing."""
        connection = self.reader.connection()
        await self.feed(exactly(LIMIT + 1))
        await self._reconnected(connection)
        self.assertTrue(self.warnings("closing: Line too long"))
        await wait_until(
            REACTOR,
            lambda: bool(self.warnings("peer reported an error: Line too long")),
            "the writer hears the ERROR",
        )
        await self.assert_every_row()

    async def test_invalid_utf8_closes_with_error(self) -> None:
        """Over TCP a line that is not UTF-8 closes the connection with ERROR; the reader reconnects."""
        connection = self.reader.connection()
        await self.feed(b"POSITION events master 1 \xff")
        await self._reconnected(connection)
        self.assertTrue(self.warnings("closing: Invalid UTF-8"))
        await self.assert_every_row()


class RedisHostileLines(HostileLines):
    transport = "redis"

    async def test_line_over_the_limit_is_dropped(self) -> None:
        """Over Redis a message one byte over 16 KiB is dropped with a log; the session goes on."""
        connection = self.reader.connection()
        line = exactly(LIMIT + 1)
        await self.feed(line)
        self.assertNotIn(RemoteServerUpCommand(line.decode()[len("REMOTE_SERVER_UP ") :]), self.reader.others)
        self.assertTrue(self.warnings("over the 16384 byte line limit"))
        self.assertIs(self.reader.connection(), connection)
        await self.assert_every_row()

    async def test_rdata_over_the_limit_restarts_the_session(self) -> None:
        """Over Redis an RDATA over 16 KiB is dropped, and the reader catches up through a new session rather than lose the row."""
        connection = self.reader.connection()
        padding = "x" * LIMIT
        # No barrier after it: the session it ends would not hear one.
        await self.raw.execute(
            "PUBLISH", SERVER, f'RDATA typing master 999 ["!big:hostile.local",["@{padding}:x"]]'
        )
        await self._reconnected(connection)
        self.assertTrue(self.warnings("over the 16384 byte line limit"))
        await self.assert_every_row()

    async def test_invalid_utf8_keeps_the_session(self) -> None:
        """Over Redis a message that is not UTF-8 is dropped and the session kept."""
        connection = self.reader.connection()
        await self.feed(b"POSITION events master 1 \xff")
        self.assertIs(self.reader.connection(), connection)
        self.assertTrue(self.warnings("that is not UTF-8"))
        await self.assert_every_row()


del HostileLines
