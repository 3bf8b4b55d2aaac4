"""The Redis transport: RESP framing, the client protocol, the settings, and
replication through a real redis-server started by the tests.

The integration tests run on the real reactor against `redis-server`
processes from `tests.redis_server` (which fails, not skips, when it is not
installed). Every wait has a timeout; nothing sleeps.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from typing import Any, Final

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial import unittest

from synapse_replication.commands import (
    Command,
    RdataCommand,
    RemoteServerUpCommand,
    UserIpCommand,
    encode_command,
)
from synapse_replication.handler import ReplicationCommandHandler
from synapse_replication.instance import (
    WRITER_STREAMS,
    WriterInstance,
    reader_streams,
    start_writer,
)
from synapse_replication.interfaces import IReplicationConnection
from synapse_replication.redis import (
    RedisClientProtocol,
    RedisReplicationClient,
    RedisReplyError,
    RedisSettings,
    RespError,
    RespParser,
    RespProtocolError,
    RespPush,
    RespValue,
    encode_request,
)
from synapse_replication.streams import EventsStream, ReceiptsStream, TypingStream
from synapse_replication.tcp import Backoff
from synapse_replication.testing import TestReplicationDataHandler, inject
from tests.fakes import FakeStreamSource, LogCapture, TypedTestCase, capture_logs
from tests.redis_server import (
    HoldingProxy,
    RawRedis,
    RedisServer,
    make_tls_files,
    start_redis,
    wait_until,
)

reactor: Any = _reactor

SERVER: Final = "test.local"
USER_IP_CHANNEL: Final = f"{SERVER}/USER_IP"
WRITER: Final = "master"
READER: Final = "worker1"
EVENTS: Final = EventsStream.NAME
ALICE: Final = "@alice:test.local"


def _feed_bytewise(parser: RespParser, data: bytes) -> list[tuple[int, RespValue]]:
    """Feed `data` one byte at a time; each reply with the index of the byte
    that completed it."""
    out = []
    for i in range(len(data)):
        for value in parser.feed(data[i : i + 1]):
            out.append((i, value))
    return out


class RespParserTests(TypedTestCase):
    """RESP2 framing, fed byte by byte."""

    def _one(self, data: bytes) -> RespValue:
        """`data` holds exactly one reply, complete only at its last byte."""
        replies = _feed_bytewise(RespParser(), data)
        self.assertEqual(len(replies), 1, replies)
        index, value = replies[0]
        self.assertEqual(index, len(data) - 1)
        return value

    def test_simple_string(self) -> None:
        """``+OK`` is the str ``OK``."""
        self.assertEqual(self._one(b"+OK\r\n"), "OK")

    def test_error(self) -> None:
        """``-ERR ...`` is a RespError value with its code."""
        value = self._one(b"-WRONGPASS invalid username-password pair\r\n")
        self.assertEqual(value, RespError("WRONGPASS invalid username-password pair"))
        assert isinstance(value, RespError)
        self.assertEqual(value.code, "WRONGPASS")

    def test_integers(self) -> None:
        """Integers, negative ones included."""
        self.assertEqual(self._one(b":0\r\n"), 0)
        self.assertEqual(self._one(b":-42\r\n"), -42)
        self.assertEqual(self._one(b":1234567890\r\n"), 1234567890)

    def test_bulk_string_is_binary_safe(self) -> None:
        """A bulk string is bytes taken by length: CRLF inside is data."""
        self.assertEqual(self._one(b"$8\r\na\r\nb\xff\x00cd\r\n"), b"a\r\nb\xff\x00cd")
        self.assertEqual(self._one(b"$0\r\n\r\n"), b"")

    def test_nulls(self) -> None:
        """``$-1`` and ``*-1`` are None; ``*0`` is an empty list."""
        self.assertIsNone(self._one(b"$-1\r\n"))
        self.assertIsNone(self._one(b"*-1\r\n"))
        self.assertEqual(self._one(b"*0\r\n"), [])

    def test_nested_arrays(self) -> None:
        """Arrays nest, mixing every type."""
        data = b"*3\r\n*2\r\n:1\r\n*1\r\n$1\r\nx\r\n+OK\r\n*2\r\n-ERR no\r\n$-1\r\n"
        self.assertEqual(self._one(data), [[1, [b"x"]], "OK", [RespError("ERR no"), None]])

    def test_pubsub_message(self) -> None:
        """A RESP2 pub/sub message is an array of three bulk strings."""
        data = b"*3\r\n$7\r\nmessage\r\n$10\r\ntest.local\r\n$10\r\nREPLICATE \r\n"
        self.assertEqual(self._one(data), [b"message", b"test.local", b"REPLICATE "])

    def test_push(self) -> None:
        """A RESP3 push (``>``) is a RespPush."""
        data = b">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$1\r\np\r\n"
        self.assertEqual(self._one(data), RespPush((b"message", b"c", b"p")))

    def test_several_replies_in_one_chunk(self) -> None:
        """One chunk may complete several replies and start another."""
        parser = RespParser()
        self.assertEqual(parser.feed(b"+OK\r\n:1\r\n*2\r\n$1\r\na\r\n"), ["OK", 1])
        self.assertEqual(parser.feed(b"$1\r\nb\r\n"), [[b"a", b"b"]])

    def test_unknown_type_byte(self) -> None:
        """A reply type RESP2 does not have is a protocol error."""
        self.assertRaises(RespProtocolError, _feed_bytewise, RespParser(), b"!oops\r\n")

    def test_bad_integer(self) -> None:
        """Integers are -?[0-9]+ only."""
        for data in (b":1_0\r\n", b": 1\r\n", b":+1\r\n", b":\r\n", b"$x\r\n", b"*1.5\r\n"):
            self.assertRaises(RespProtocolError, _feed_bytewise, RespParser(), data)

    def test_bulk_string_without_crlf(self) -> None:
        """A bulk string longer than its length is a protocol error."""
        self.assertRaises(RespProtocolError, _feed_bytewise, RespParser(), b"$1\r\nab\r\n")

    def test_negative_lengths(self) -> None:
        """Lengths below -1 are refused."""
        for data in (b"$-2\r\n", b"*-2\r\n", b">-1\r\n"):
            self.assertRaises(RespProtocolError, _feed_bytewise, RespParser(), data)

    def test_header_line_too_long(self) -> None:
        """A header line without CRLF cannot grow without bound."""
        parser = RespParser()
        parser.MAX_LINE_LENGTH = 10
        self.assertRaises(RespProtocolError, parser.feed, b"+" + b"x" * 20)

    def test_too_deep(self) -> None:
        """Nesting is bounded."""
        parser = RespParser()
        parser.MAX_DEPTH = 3
        self.assertRaises(RespProtocolError, parser.feed, b"*1\r\n" * 4)

    def test_failed_parser_refuses_more(self) -> None:
        """After an error the stream cannot be framed: more input is refused."""
        parser = RespParser()
        self.assertRaises(RespProtocolError, parser.feed, b"?\r\n")
        self.assertRaises(RespProtocolError, parser.feed, b"+OK\r\n")

    def test_encode_request(self) -> None:
        """A request is an array of bulk strings; str is UTF-8, int decimal."""
        self.assertEqual(
            encode_request(b"PUBLISH", "t\u00e9", 12),
            b"*3\r\n$7\r\nPUBLISH\r\n$3\r\nt\xc3\xa9\r\n$2\r\n12\r\n",
        )

    def test_encode_then_parse(self) -> None:
        """What we encode, a RESP parser reads back (as an array of bulks)."""
        args = [b"SUBSCRIBE", b"a\r\nb", b""]
        self.assertEqual(RespParser().feed(encode_request(*args)), [args])


class RedisClientProtocolTests(TypedTestCase):
    """The client protocol on a StringTransport and a Clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.messages: list[tuple[bytes, bytes]] = []
        self.proto = RedisClientProtocol(
            clock=self.clock,
            name="test",
            reply_timeout=5.0,
            close_timeout=1.0,
            on_message=lambda channel, payload: self.messages.append((channel, payload)),
        )
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def _sent(self) -> list[RespValue]:
        data = self.transport.value()
        self.transport.clear()
        return RespParser().feed(data)

    def test_replies_answer_requests_in_order(self) -> None:
        """Each reply answers the oldest request."""
        first = Deferred.fromCoroutine(self.proto.execute("PING"))
        second = Deferred.fromCoroutine(self.proto.execute("SELECT", 3))
        self.assertEqual(self._sent(), [[b"PING"], [b"SELECT", b"3"]])
        self.proto.dataReceived(b"+PONG\r\n+OK\r\n")
        self.assertEqual(self.successResultOf(first), "PONG")
        self.assertEqual(self.successResultOf(second), "OK")

    def test_error_reply_raises(self) -> None:
        """An error reply raises RedisReplyError naming only the command, never its arguments."""
        d = Deferred.fromCoroutine(self.proto.execute("AUTH", "hunter2"))
        self.proto.dataReceived(b"-WRONGPASS invalid username-password pair\r\n")
        error = self.failureResultOf(d, RedisReplyError).value
        self.assertEqual(str(error), "Redis refused AUTH: WRONGPASS invalid username-password pair")

    def test_subscribe_waits_for_every_confirmation(self) -> None:
        """SUBSCRIBE returns once every channel is confirmed."""
        d = Deferred.fromCoroutine(self.proto.subscribe([b"a", b"b"]))
        self.assertEqual(self._sent(), [[b"SUBSCRIBE", b"a", b"b"]])
        self.proto.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n")
        self.assertNoResult(d)
        self.proto.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nb\r\n:2\r\n")
        self.assertIsNone(self.successResultOf(d))

    def test_messages_are_not_replies(self) -> None:
        """In subscribe mode messages go to the callback and ``["pong", ""]`` answers the PING."""
        Deferred.fromCoroutine(self.proto.subscribe([b"c"]))
        self.proto.dataReceived(b"*3\r\n$9\r\nsubscribe\r\n$1\r\nc\r\n:1\r\n")
        ping = Deferred.fromCoroutine(self.proto.execute("PING"))
        self.proto.dataReceived(
            b"*3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$4\r\nPING\r\n*2\r\n$4\r\npong\r\n$0\r\n\r\n"
        )
        self.assertEqual(self.messages, [(b"c", b"PING")])
        self.assertEqual(self.successResultOf(ping), [b"pong", b""])

    def test_no_reply_within_timeout_aborts(self) -> None:
        """A request unanswered for `reply_timeout` drops the connection."""
        d = Deferred.fromCoroutine(self.proto.execute("PING"))
        self.clock.advance(4.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnecting)
        self.proto.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(d, ConnectionLost)

    def test_timeout_counts_from_the_oldest_unanswered(self) -> None:
        """The reply deadline follows the oldest unanswered request."""
        Deferred.fromCoroutine(self.proto.execute("PING"))
        self.clock.advance(3)
        second = Deferred.fromCoroutine(self.proto.execute("PING"))
        self.clock.advance(1)
        self.proto.dataReceived(b"+PONG\r\n")
        self.clock.advance(3.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnecting)
        self.proto.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(second, ConnectionLost)

    def test_pings_every_interval(self) -> None:
        """Once started, a PING goes out every interval."""
        self.proto.start_pinging(2.0)
        self.clock.advance(2.0)
        self.assertEqual(self._sent(), [[b"PING"]])
        self.proto.dataReceived(b"+PONG\r\n")
        self.clock.advance(2.0)
        self.assertEqual(self._sent(), [[b"PING"]])

    def test_unsolicited_reply_drops_the_connection(self) -> None:
        """A reply to nothing means we lost track: drop the connection."""
        self.proto.dataReceived(b"+OK\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_garbage_drops_the_connection(self) -> None:
        """Bytes that are not RESP drop the connection."""
        self.proto.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_loss_cancels_timers(self) -> None:
        """Nothing stays scheduled once the connection is gone."""
        self.proto.start_pinging(1.0)
        self.proto.send(b"PUBLISH", b"c", b"x")
        self.proto.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.proto.unanswered_at_loss, ["PUBLISH"])


class RedisSettingsTests(TypedTestCase):
    def test_password_not_in_repr(self) -> None:
        """The password never shows in a repr."""
        settings = RedisSettings(password="hunter2")
        self.assertNotIn("hunter2", repr(settings))
        self.assertIn("password='<redacted>'", repr(settings))

    def test_username_needs_password(self) -> None:
        """A username without a password is refused."""
        self.assertRaises(ValueError, RedisSettings, username="alice")

    def test_certificate_needs_key(self) -> None:
        """A client certificate without its key is refused."""
        self.assertRaises(
            ValueError, RedisSettings, use_tls=True, certificate_file="c.pem"
        )

    def test_tls_files_need_tls(self) -> None:
        """TLS files without use_tls are a mistake, not silently ignored."""
        self.assertRaises(ValueError, RedisSettings, ca_file="ca.pem")
        self.assertRaises(ValueError, RedisSettings, ca_path="/etc/ssl/certs")

    def test_no_tls_over_unix_socket(self) -> None:
        """TLS over a unix socket is refused."""
        self.assertRaises(ValueError, RedisSettings, path="/tmp/r.sock", use_tls=True)

    def test_address(self) -> None:
        """The address shown in logs."""
        self.assertEqual(RedisSettings(host="::1", port=7000).address(), "[::1]:7000")
        self.assertEqual(RedisSettings(path="/run/r.sock").address(), "unix:/run/r.sock")




class RedisTlsOptionsTests(TypedTestCase):
    def test_options_from_files(self) -> None:
        """CA bundle and client certificate files make client TLS options."""
        from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

        from synapse_replication.redis import redis_tls_options

        directory = tempfile.mkdtemp(prefix="srr-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        files = make_tls_files(directory)
        options = redis_tls_options(
            RedisSettings(
                host="127.0.0.1",
                use_tls=True,
                ca_file=files.ca,
                certificate_file=files.client_cert,
                private_key_file=files.client_key,
            )
        )
        self.assertTrue(IOpenSSLClientConnectionCreator.providedBy(options))

    def test_ca_path_without_certificate(self) -> None:
        """A ca_path holding no certificate is refused at start-up."""
        from synapse_replication.redis import redis_tls_options

        directory = tempfile.mkdtemp(prefix="srr-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        with open(f"{directory}/README", "w") as f:
            f.write("nothing here\n")
        self.assertRaises(
            ValueError, redis_tls_options, RedisSettings(use_tls=True, ca_path=directory)
        )

    def test_ca_file_without_certificate(self) -> None:
        """A ca_file holding no certificate is refused at start-up."""
        from synapse_replication.redis import redis_tls_options

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a certificate\n")
        self.assertRaises(
            ValueError, redis_tls_options, RedisSettings(use_tls=True, ca_file=path)
        )


def _other_commands(handler_commands: list[Command]) -> Callable[[IReplicationConnection, Command], None]:
    def record(connection: IReplicationConnection, cmd: Command) -> None:
        handler_commands.append(cmd)

    return record


class RedisTransportTests(unittest.TestCase):
    """Replication through a real redis-server."""

    timeout = 30

    def setUp(self) -> None:
        self.logs: LogCapture = capture_logs(self.addCleanup)

    # -- helpers

    def _client(
        self,
        server: RedisServer,
        handler: ReplicationCommandHandler,
        *,
        instance_name: str = READER,
        subscribe_user_ip: bool = False,
        **settings: Any,
    ) -> RedisReplicationClient:
        client = RedisReplicationClient(
            reactor=reactor,
            handler=handler,
            server_name=SERVER,
            instance_name=instance_name,
            settings=server.settings(**settings),
            subscribe_user_ip=subscribe_user_ip,
            rand=lambda: 0.0,
        )
        client.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(client.stop()))
        return client

    def _handler(
        self, instance_name: str = READER, others: list[Command] | None = None
    ) -> ReplicationCommandHandler:
        return ReplicationCommandHandler(
            instance_name=instance_name,
            clock=reactor,
            streams={},
            data_handler=TestReplicationDataHandler(),
            on_other_command=_other_commands(others) if others is not None else None,
        )

    def _typing_writer(self, source: FakeStreamSource) -> ReplicationCommandHandler:
        """A handler writing the typing stream, its rows in `source`."""
        return ReplicationCommandHandler(
            instance_name=WRITER,
            clock=reactor,
            streams={
                TypingStream.NAME: TypingStream(
                    WRITER, source.current_token, source.update_function
                )
            },
            data_handler=TestReplicationDataHandler(),
            writer_streams=[TypingStream.NAME],
        )

    async def _up(self, client: RedisReplicationClient) -> None:
        await wait_until(
            reactor,
            lambda: client.connection is not None and client.publisher_connected,
            "both Redis connections are up",
        )

    async def _raw(self, server: RedisServer, *subscribe: str, **settings: Any) -> RawRedis:
        raw = await RawRedis.connect(reactor, server.settings(**settings))
        self.addCleanup(lambda: Deferred.fromCoroutine(raw.close()))
        if subscribe:
            await raw.subscribe(*subscribe)
        return raw

    async def _writer(self, **kwargs: Any) -> WriterInstance:
        writer = await start_writer(
            reactor,
            db_path=self.mktemp() + ".db",
            instance_name=WRITER,
            server_name=SERVER,
            port=None,
            **kwargs,
        )
        self.addCleanup(lambda: Deferred.fromCoroutine(writer.stop()))
        return writer

    def _reader_handler(
        self, writer: WriterInstance, data: TestReplicationDataHandler
    ) -> ReplicationCommandHandler:
        """A reader of the writer's streams, catching up from its stores."""
        return ReplicationCommandHandler(
            instance_name=READER,
            clock=reactor,
            streams=reader_streams(
                READER,
                {
                    EVENTS: writer.stores.events.get_updates,
                    ReceiptsStream.NAME: writer.stores.receipts.get_updates,
                    TypingStream.NAME: writer.typing.get_updates,
                },
            ),
            data_handler=data,
            stream_writers={name: [WRITER] for name in WRITER_STREAMS},
        )

    async def _store_events(self, writer: WriterInstance) -> list[tuple[int, Any]]:
        raw = await writer.stores.events.get_all_rows_unpaged(WRITER)
        return [(token, EventsStream.parse_row(row)) for token, row in raw]

    def _caught_up(self, writer: WriterInstance, data: TestReplicationDataHandler) -> bool:
        return data.get_position(EVENTS, WRITER) == writer.stores.events.current_token(WRITER)

    def _warns(self) -> list[str]:
        return self.logs.messages()

    def _assert_never_logged(self, *secrets: str) -> None:
        """No log event shows a secret, in its text or in any of its fields."""
        self.assertTrue(self.logs.events)
        for event in self.logs.events:
            shown = formatEvent(event) + repr(event)
            for secret in secrets:
                self.assertNotIn(secret, shown)

    # -- order on connect

    async def test_replicate_published_only_after_subscribe_confirmed(self) -> None:
        """REPLICATE goes out only once our SUBSCRIBE is confirmed, then our POSITIONs."""
        server = await start_redis(self, reactor)
        observer = await self._raw(server, SERVER)
        proxy = HoldingProxy(reactor, server.port)
        self.addCleanup(lambda: Deferred.fromCoroutine(proxy.stop()))
        proxy.hold()

        source = FakeStreamSource()
        source.add(WRITER, 5, ["!room:test.local", [ALICE]])
        handler = self._typing_writer(source)
        client = self._client(
            server, handler, instance_name=WRITER, port=proxy.port, reply_timeout=10.0
        )
        inspector = await self._raw(server)

        async def numsub() -> RespValue:
            return await inspector.execute("PUBSUB", "NUMSUB", SERVER)

        # Redis ran our SUBSCRIBE, but the proxy holds its confirmation.
        subscribed = [b"test.local", 2]
        for _ in range(500):
            if await numsub() == subscribed:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(await numsub(), subscribed)
        await deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(observer.lines_on(SERVER), [])
        self.assertIsNone(client.connection)

        proxy.release()
        await wait_until(reactor, lambda: len(observer.lines_on(SERVER)) >= 2, "REPLICATE and POSITION")
        # (More POSITIONs follow: we hear our own REPLICATE and answer it.)
        self.assertEqual(
            observer.lines_on(SERVER)[:2], ["REPLICATE ", "POSITION typing master 5 5"]
        )
        self.assertEqual(handler.connections(), [client.connection])

    # -- two instances

    async def test_rows_flow_from_writer_to_reader(self) -> None:
        """Rows written by one instance reach another through Redis, each once."""
        server = await start_redis(self, reactor)
        writer = await self._writer()
        data = TestReplicationDataHandler()
        self._client(server, writer.handler, instance_name=WRITER)
        self._client(server, self._reader_handler(writer, data))
        await wait_until(reactor, lambda: data.get_position(EVENTS, WRITER) is not None, "positions")

        room = inject.make_room_id("test.local")
        for i in range(30):
            await inject.inject_message(writer.stores.events, room, ALICE, body=f"m{i}")
        await wait_until(reactor, lambda: self._caught_up(writer, data), "the reader caught up")
        self.assertEqual(data.rows_for(EVENTS), await self._store_events(writer))
        self.assertEqual(len(data.rows_for(EVENTS)), 30)

    async def test_own_echoes_are_ignored(self) -> None:
        """An instance hears its own RDATA back from Redis and ignores it."""
        server = await start_redis(self, reactor)
        observer = await self._raw(server, SERVER)
        writer_data = TestReplicationDataHandler()
        writer = await self._writer(data_handler=writer_data)
        client = self._client(server, writer.handler, instance_name=WRITER)
        await self._up(client)
        room = inject.make_room_id("test.local")
        for i in range(5):
            await inject.inject_message(writer.stores.events, room, ALICE, body=f"m{i}")
        await wait_until(
            reactor,
            lambda: sum(line.startswith("RDATA events master") for line in observer.lines_on(SERVER)) == 5,
            "five RDATA published",
        )
        # The writer's subscriber received them as well: one more round trip
        # through Redis (a PUBLISH it also hears) makes sure they were handled.
        client.publish_command(RemoteServerUpCommand("barrier.example"))
        await wait_until(
            reactor,
            lambda: "REMOTE_SERVER_UP barrier.example" in observer.lines_on(SERVER),
            "the barrier",
        )
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(writer_data.received_rdata_rows, [])
        self.assertEqual(writer_data.positions_received, [])

    async def test_user_ip_goes_to_its_own_channel(self) -> None:
        """USER_IP goes to ``<server>/USER_IP`` only, and reaches only its subscribers."""
        server = await start_redis(self, reactor)
        observer = await self._raw(server, SERVER, USER_IP_CHANNEL)
        ip_seen: list[Command] = []
        sender_seen: list[Command] = []
        ip_client = self._client(
            server, self._handler("background", ip_seen), instance_name="background",
            subscribe_user_ip=True,
        )
        sender = self._client(server, self._handler(READER, sender_seen))
        await self._up(ip_client)
        await self._up(sender)

        cmd = UserIpCommand(ALICE, "syt_token", "10.0.0.1", "agent", "DEVICE", 1234)
        assert sender.connection is not None
        sender.connection.send_command(cmd)
        await wait_until(reactor, lambda: cmd in ip_seen, "USER_IP handled")
        self.assertEqual(
            observer.lines_on(USER_IP_CHANNEL),
            ['USER_IP @alice:test.local ["syt_token","10.0.0.1","agent","DEVICE",1234]'],
        )
        self.assertFalse(any(line.startswith("USER_IP") for line in observer.lines_on(SERVER)))
        self.assertNotIn(cmd, sender_seen)

    # -- authentication and database

    async def test_password(self) -> None:
        """With the right password both connections come up."""
        server = await start_redis(self, reactor, password="s3cret-pass")
        client = self._client(server, self._handler())
        await self._up(client)
        self._assert_never_logged("s3cret-pass")

    async def test_wrong_password_is_logged_and_retried_until_fixed(self) -> None:
        """A refused AUTH is logged as an error and retried until accepted; no password is logged."""
        server = await start_redis(self, reactor, password="right-pass")
        client = self._client(server, self._handler(), password="wrong-pass")

        def refusals() -> int:
            return sum(
                "WRONGPASS" in m for m in self.logs.messages(min_level=LogLevel.error)
            )

        await wait_until(reactor, lambda: refusals() >= 4, "several refused AUTHs")
        self.assertIsNone(client.connection)
        self.assertFalse(client.publisher_connected)

        await server.restart(password="wrong-pass")
        await self._up(client)
        self._assert_never_logged("wrong-pass", "right-pass")

    async def test_username_and_password(self) -> None:
        """An ACL user authenticates with ``AUTH username password``."""
        server = await start_redis(self, reactor)
        raw = await self._raw(server)
        await raw.execute("ACL", "SETUSER", "replicator", "on", ">user-pass", "allchannels", "+@all")
        client = self._client(server, self._handler(), username="replicator", password="user-pass")
        await self._up(client)
        users = {c["user"] for c in await raw.client_list()}
        self.assertEqual(users, {"replicator"})

    async def test_dbid_selects_the_database(self) -> None:
        """Both connections SELECT the configured database."""
        server = await start_redis(self, reactor)
        raw = await self._raw(server)
        client = self._client(server, self._handler(), dbid=5)
        await self._up(client)
        clients = await raw.client_list()
        self.assertEqual(len(clients), 2)
        self.assertEqual({c["db"] for c in clients}, {"5"})

    # -- other ways in

    async def test_unix_socket(self) -> None:
        """Redis can be reached through a unix socket."""
        server = await start_redis(self, reactor, unix_socket=True)
        observer = await self._raw(server, SERVER)
        assert server.socket_path is not None
        client = self._client(server, self._handler(), path=server.socket_path)
        await self._up(client)
        await wait_until(reactor, lambda: "REPLICATE " in observer.lines_on(SERVER), "REPLICATE")
        inspector = await self._raw(server)
        addresses = [c["addr"] for c in await inspector.client_list()]
        self.assertEqual(
            sum(a.startswith(server.socket_path) for a in addresses), 2, addresses
        )

    async def test_tls_with_client_certificate(self) -> None:
        """Over TLS the server is verified and our client certificate accepted."""
        directory = tempfile.mkdtemp(prefix="srr-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        files = make_tls_files(directory)
        server = await start_redis(self, reactor, tls=files)
        observer = await self._raw(server, SERVER)
        client = self._client(server, self._handler())
        await self._up(client)
        await wait_until(reactor, lambda: "REPLICATE " in observer.lines_on(SERVER), "REPLICATE")

        # The server does require it: without one, no connection is usable.
        anonymous = self._client(
            server,
            self._handler("anonymous"),
            instance_name="anonymous",
            certificate_file=None,
            private_key_file=None,
        )
        await wait_until(
            reactor,
            lambda: sum("(anonymous): connection failed" in m for m in self._warns()) >= 2,
            "refused anonymous connections",
        )
        self.assertIsNone(anonymous.connection)

    async def test_tls_with_ca_path(self) -> None:
        """The authorities may come from a directory (ca_path)."""
        directory = tempfile.mkdtemp(prefix="srr-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        files = make_tls_files(directory)
        authorities = tempfile.mkdtemp(prefix="srr-ca-")
        self.addCleanup(shutil.rmtree, authorities, True)
        shutil.copy(files.ca, authorities)
        server = await start_redis(self, reactor, tls=files)
        client = self._client(server, self._handler(), ca_file=None, ca_path=authorities)
        await self._up(client)

    async def test_tls_refuses_an_unknown_server(self) -> None:
        """A server certificate not signed by ca_file is refused, and retried."""
        directory = tempfile.mkdtemp(prefix="srr-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        files = make_tls_files(directory)
        other = tempfile.mkdtemp(prefix="srr-tls-")
        self.addCleanup(shutil.rmtree, other, True)
        other_files = make_tls_files(other)
        server = await start_redis(self, reactor, tls=files)
        client = self._client(server, self._handler(), ca_file=other_files.ca)
        await wait_until(
            reactor,
            lambda: sum("certificate verify failed" in m for m in self._warns()) >= 2,
            "refused TLS handshakes",
        )
        self.assertIsNone(client.connection)

    # -- failures

    async def test_connects_once_redis_starts(self) -> None:
        """A refused connection is retried until Redis is there."""
        server = RedisServer(reactor)
        self.addCleanup(lambda: Deferred.fromCoroutine(server.cleanup()))
        client = self._client(server, self._handler())
        await wait_until(
            reactor,
            lambda: sum("cannot connect" in m for m in self._warns()) >= 4,
            "refused connections",
        )
        await server.start()
        await self._up(client)

    async def test_redis_restart_mid_stream(self) -> None:
        """After a Redis restart mid-stream the reader has every row exactly once."""
        server = await start_redis(self, reactor)
        writer = await self._writer()
        data = TestReplicationDataHandler()
        writer_client = self._client(server, writer.handler, instance_name=WRITER)
        reader_client = self._client(server, self._reader_handler(writer, data))
        await wait_until(reactor, lambda: data.get_position(EVENTS, WRITER) is not None, "positions")

        room = inject.make_room_id("test.local")
        writing = True
        written = 0

        async def write() -> None:
            nonlocal written
            while writing:
                await inject.inject_message(writer.stores.events, room, ALICE, body=f"m{written}")
                written += 1
                await deferLater(reactor, 0.003, lambda: None)

        loop = Deferred.fromCoroutine(write())
        try:
            await wait_until(reactor, lambda: len(data.rows_for(EVENTS)) >= 20, "rows before")
            before = (writer_client.connection, reader_client.connection)
            await server.restart()
            await wait_until(
                reactor,
                lambda: None
                not in (writer_client.connection, reader_client.connection)
                and (writer_client.connection, reader_client.connection) != before,
                "both subscribed again",
            )
            during = written
            await wait_until(reactor, lambda: written >= during + 20, "rows after")
        finally:
            writing = False
            await loop
        await wait_until(reactor, lambda: self._caught_up(writer, data), "the reader caught up")
        self.assertEqual(data.rows_for(EVENTS), await self._store_events(writer))
        self.assertEqual(len(data.rows_for(EVENTS)), written)

    async def test_dead_connection_found_by_ping(self) -> None:
        """A Redis that stops answering is found by PING; we reconnect once it answers."""
        server = await start_redis(self, reactor)
        handler = self._handler()
        client = self._client(server, handler, ping_interval=0.1, reply_timeout=0.4)
        await self._up(client)
        first = client.connection
        assert first is not None

        server.pause()
        await wait_until(reactor, lambda: first.lost, "the subscriber dropped")
        self.assertEqual(handler.connections(), [])
        self.assertTrue(any("no reply to PING" in m for m in self._warns()))

        server.resume()
        await wait_until(
            reactor,
            lambda: client.connection not in (None, first) and client.publisher_connected,
            "reconnected",
        )
        self.assertEqual(handler.connections(), [client.connection])

    async def _kill_publisher(self, raw: RawRedis, client: RedisReplicationClient) -> None:
        """Kill our publisher connection from the server side (it is the only
        connection not subscribed), and wait until we noticed."""
        (publisher,) = [c for c in await raw.client_list() if c["sub"] == "0"]
        await raw.execute("CLIENT", "KILL", "ID", publisher["id"])
        await wait_until(reactor, lambda: not client.publisher_connected, "publisher down")

    async def test_commands_queue_while_publisher_is_down(self) -> None:
        """Commands sent while the publisher is down go out in order once it is back."""
        server = await start_redis(self, reactor)
        observer = await self._raw(server, SERVER)
        client = self._client(server, self._handler(), backoff=Backoff(initial=1.0, maximum=2.0))
        await self._up(client)
        await self._kill_publisher(await self._raw(server), client)

        conn = client.connection
        assert conn is not None
        for name in ("a", "b", "c"):
            conn.send_command(RemoteServerUpCommand(f"{name}.example"))
        self.assertEqual(client.queued_commands, 3)

        await wait_until(reactor, lambda: client.publisher_connected, "publisher back")
        expected = [f"REMOTE_SERVER_UP {n}.example" for n in "abc"]
        await wait_until(
            reactor, lambda: observer.lines_on(SERVER)[-3:] == expected, "the queued commands"
        )
        self.assertEqual(client.queued_commands, 0)

    async def test_queue_is_bounded(self) -> None:
        """Past its bound the queue drops its oldest commands, with an error."""
        server = await start_redis(self, reactor)
        observer = await self._raw(server, SERVER)
        client = self._client(
            server,
            self._handler(),
            backoff=Backoff(initial=1.0, maximum=2.0),
            max_queued_commands=2,
        )
        await self._up(client)
        await self._kill_publisher(await self._raw(server), client)
        published = len(observer.lines_on(SERVER))

        conn = client.connection
        assert conn is not None
        for name in "abcd":
            conn.send_command(RemoteServerUpCommand(f"{name}.example"))
        self.assertEqual(client.queued_commands, 2)
        errors = self.logs.messages(min_level=LogLevel.error)
        self.assertTrue(any("dropping the oldest" in m for m in errors), errors)

        await wait_until(
            reactor, lambda: len(observer.lines_on(SERVER)) >= published + 2, "the queued commands"
        )
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(
            observer.lines_on(SERVER)[published:],
            ["REMOTE_SERVER_UP c.example", "REMOTE_SERVER_UP d.example"],
        )

    async def test_after_a_drop_positions_replace_queued_rows(self) -> None:
        """After a drop, fresh POSITIONs replace the queued rows; other commands still go out."""
        server = await start_redis(self, reactor)
        observer = await self._raw(server, SERVER)
        source = FakeStreamSource()
        source.add(WRITER, 5, ["!a:test.local", [ALICE]])
        client = self._client(
            server,
            self._typing_writer(source),
            instance_name=WRITER,
            backoff=Backoff(initial=1.0, maximum=2.0),
            max_queued_commands=3,
        )
        await self._up(client)
        await self._kill_publisher(await self._raw(server), client)
        published = len(observer.lines_on(SERVER))

        conn = client.connection
        assert conn is not None
        for token in (6, 7, 8):
            row: list[Any] = [f"!r{token}:test.local", [ALICE]]
            source.add(WRITER, token, row)
            conn.send_command(RdataCommand(TypingStream.NAME, WRITER, token, row))
        conn.send_command(RemoteServerUpCommand("other.example"))
        self.assertEqual(client.queued_commands, 3)

        await wait_until(
            reactor, lambda: len(observer.lines_on(SERVER)) >= published + 2, "the resync"
        )
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(
            observer.lines_on(SERVER)[published:],
            ["POSITION typing master 8 8", "REMOTE_SERVER_UP other.example"],
        )

    async def test_malformed_message_is_logged_and_dropped(self) -> None:
        """A malformed message is logged with its channel and dropped; the next command is handled."""
        server = await start_redis(self, reactor)
        seen: list[Command] = []
        client = self._client(server, self._handler(others=seen))
        await self._up(client)
        conn = client.connection
        raw = await self._raw(server)
        await raw.execute("PUBLISH", SERVER, "NOT_A_COMMAND at all")
        await raw.execute("PUBLISH", SERVER, "POSITION events master x 3")
        await raw.execute("PUBLISH", SERVER, b"\xff\xfe")
        await raw.execute("PUBLISH", SERVER, "REMOTE_SERVER_UP good.example")
        await wait_until(reactor, lambda: RemoteServerUpCommand("good.example") in seen, "the good one")

        warnings = [m for m in self._warns() if "dropping a message" in m]
        self.assertEqual(len(warnings), 3, warnings)
        self.assertTrue(all(f"channel '{SERVER}'" in m for m in warnings), warnings)
        self.assertIn("NOT_A_COMMAND at all", warnings[0])
        self.assertIn("POSITION events master x 3", warnings[1])
        self.assertIs(client.connection, conn)

    async def test_bad_user_ip_messages_show_no_token(self) -> None:
        """A USER_IP message that cannot be read is dropped with a warning that
        names the channel but shows none of the access token, whether it is
        not UTF-8 or malformed; the next one is handled."""
        server = await start_redis(self, reactor)
        seen: list[Command] = []
        client = self._client(
            server, self._handler("background", seen), instance_name="background",
            subscribe_user_ip=True,
        )
        await self._up(client)
        raw = await self._raw(server)
        await raw.execute(
            "PUBLISH", USER_IP_CHANNEL, b'USER_IP @a:x ["syt_secret\xff","1.2.3.4","ua",null,1]'
        )
        await raw.execute("PUBLISH", USER_IP_CHANNEL, 'USER_IP @a:x ["syt_secret2","1.2.3.4"]')
        good = UserIpCommand(ALICE, "syt_ok", "10.0.0.1", "agent", None, 5)
        await raw.execute("PUBLISH", USER_IP_CHANNEL, encode_command(good).decode())
        await wait_until(reactor, lambda: good in seen, "the good one")
        warnings = [m for m in self._warns() if "dropping a message" in m]
        self.assertEqual(len(warnings), 2, warnings)
        self.assertIn("that is not UTF-8", warnings[0])
        self.assertTrue(all(f"channel '{USER_IP_CHANNEL}'" in m for m in warnings), warnings)
        self._assert_never_logged("syt_secret", "syt_secret2")

    async def test_stop_closes_both_connections(self) -> None:
        """After stop, no connection is left and none is made again."""
        server = await start_redis(self, reactor)
        raw = await self._raw(server)
        handler = self._handler()
        client = self._client(server, handler)
        await self._up(client)
        self.assertEqual(len(await raw.client_list()), 2)
        await client.stop()
        self.assertEqual(handler.connections(), [])
        await wait_until(reactor, lambda: not client.publisher_connected, "stopped")
        await deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(await raw.client_list(), [])
