# -*- test-case-name: tests.test_metrics -*-
# mypy: allow-untyped-calls
# (twisted.test.iosim and StringTransport carry no annotations.)
"""Tests for synapse_replication.metrics: what is counted as commands and rows
flow through real protocols and handlers, the gauges read at scrape time, and
the ``/metrics`` listener scraped over loopback."""

from __future__ import annotations

import gc
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from typing import Any, Final, cast

from prometheus_client import REGISTRY, CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.internet import reactor as _global_reactor
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTCP, IReactorTime
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.test.iosim import IOPump, connectedServerAndClient
from twisted.trial.unittest import TestCase

from synapse_replication.commands import (
    Command,
    PositionCommand,
    RdataCommand,
    UserIpCommand,
)
from synapse_replication.handler import ReplicationCommandHandler
from synapse_replication.interfaces import IReplicationConnection
from synapse_replication.metrics import (
    register_replication_collector,
    start_metrics_listener,
)
from synapse_replication.redis import RedisReplicationClient, RedisSettings
from synapse_replication.streamer import ReplicationStreamer
from synapse_replication.streams import TypingStream
from synapse_replication.tcp import ClientReplicationProtocol, ServerReplicationProtocol
from synapse_replication.testing import TestReplicationDataHandler
from tests.fakes import (
    BlockingDataHandler,
    FakeConnection,
    FakeStreamSource,
    TypedTestCase,
)

_SERVER: Final = "test.local"
_MASTER: Final = "master"
_WORKER: Final = "worker1"
_TOKEN: Final = "syt_c2VjcmV0_not4scrapeXYZ"
_tcp_reactor = cast(IReactorTCP, _global_reactor)
_time_reactor = cast(IReactorTime, _global_reactor)


def _value(name: str, labels: dict[str, str], registry: CollectorRegistry = REGISTRY) -> float:
    """A sample's value now, 0 if it is absent."""
    return registry.get_sample_value(name, labels) or 0.0


def _samples(name: str, registry: CollectorRegistry = REGISTRY) -> list[Sample]:
    """Every sample named `name`, collected now."""
    return [s for family in registry.collect() for s in family.samples if s.name == name]


class _Delta:
    """How much samples moved since it was made."""

    def __init__(self, *keys: tuple[str, dict[str, str]]) -> None:
        self._before = {self._key(k): _value(*k) for k in keys}

    @staticmethod
    def _key(key: tuple[str, dict[str, str]]) -> tuple[str, tuple[tuple[str, str], ...]]:
        return key[0], tuple(sorted(key[1].items()))

    def __call__(self, name: str, labels: dict[str, str]) -> float:
        return _value(name, labels) - self._before[self._key((name, labels))]


def _inbound(command: str, transport: str = "tcp") -> tuple[str, dict[str, str]]:
    return (
        "synapse_replication_tcp_protocol_inbound_commands_total",
        {"command": command, "transport": transport},
    )


def _outbound(command: str, transport: str = "tcp") -> tuple[str, dict[str, str]]:
    return (
        "synapse_replication_tcp_protocol_outbound_commands_total",
        {"command": command, "transport": transport},
    )


class _Pair:
    """A writer (`_MASTER`, writing `typing`) and a reader (`_WORKER`), each a
    real `ReplicationCommandHandler`, connected by the TCP protocols over
    iosim's in-memory transports."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.source = FakeStreamSource()
        self.other_commands: list[Command] = []
        writer_typing = TypingStream(_MASTER, self.source.current_token, self.source.update_function)
        self.writer = ReplicationCommandHandler(
            instance_name=_MASTER,
            clock=self.clock,
            streams={"typing": writer_typing},
            data_handler=TestReplicationDataHandler(),
            writer_streams=["typing"],
            on_other_command=self._other,
        )
        self.streamer = ReplicationStreamer(
            clock=self.clock, command_handler=self.writer, streams=[writer_typing]
        )
        self.data = TestReplicationDataHandler()
        reader_typing = TypingStream(_WORKER, self.source.current_token, self.source.update_function)
        self.reader = ReplicationCommandHandler(
            instance_name=_WORKER,
            clock=self.clock,
            streams={"typing": reader_typing},
            data_handler=self.data,
        )
        self.client: ClientReplicationProtocol
        self.server: ServerReplicationProtocol
        self.pump: IOPump
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: ServerReplicationProtocol(
                clock=self.clock, handler=self.writer, server_name=_SERVER
            ),
            lambda: ClientReplicationProtocol(
                clock=self.clock,
                handler=self.reader,
                server_name=_SERVER,
                instance_name=_WORKER,
            ),
        )

    def _other(self, connection: IReplicationConnection, cmd: Command) -> None:
        self.other_commands.append(cmd)

    def disconnect(self) -> None:
        assert self.client.transport is not None
        self.client.transport.loseConnection()
        self.pump.flush()


def _room(name: str) -> list[Any]:
    """A `typing` row: room `name`, nobody typing."""
    return [name, []]


class CommandCounterTests(TypedTestCase):
    """Commands counted by name and transport as they cross a real TCP pair."""

    def test_handshake_commands_counted_both_ways(self) -> None:
        """REPLICATE and its POSITION answer are counted once sent and once received."""
        keys = [_inbound("REPLICATE"), _outbound("REPLICATE")]
        keys += [_inbound("POSITION"), _outbound("POSITION")]
        delta = _Delta(*keys)
        pair = _Pair()
        self.addCleanup(pair.disconnect)
        self.assertEqual([delta(*k) for k in keys], [1.0, 1.0, 1.0, 1.0])

    def test_rdata_counted_per_line(self) -> None:
        """Each RDATA line is one outbound and one inbound RDATA."""
        keys = [_inbound("RDATA"), _outbound("RDATA")]
        pair = _Pair()
        self.addCleanup(pair.disconnect)
        delta = _Delta(*keys)
        for token in (1, 2, 3):
            pair.server.send_command(RdataCommand("typing", _MASTER, token, _room(f"!{token}")))
        pair.pump.flush()
        self.assertEqual([delta(*k) for k in keys], [3.0, 3.0])


class RowCounterTests(TypedTestCase):
    """Rows published and received, per stream."""

    def test_rows_received_by_stream_and_writer(self) -> None:
        """Rows reaching the reader's data handler are counted by stream and writer."""
        key = ("synapse_replication_rows_received_total", {"stream": "typing", "instance": _MASTER})
        pair = _Pair()
        self.addCleanup(pair.disconnect)
        delta = _Delta(key)
        for token in (1, 2):
            pair.server.send_command(RdataCommand("typing", _MASTER, token, _room("!r")))
        pair.pump.flush()
        self.assertEqual(len(pair.data.received_rdata_rows), 2)
        self.assertEqual(delta(*key), 2.0)

    def test_stream_updates_published(self) -> None:
        """Rows the streamer publishes count in Synapse's stream_updates."""
        key = ("synapse_replication_tcp_resource_stream_updates_total", {"stream_name": "typing"})
        pair = _Pair()
        self.addCleanup(pair.disconnect)
        delta = _Delta(key)
        for token, room in ((1, "!a"), (2, "!b"), (2, "!c")):
            pair.source.add(_MASTER, token, _room(room))
        pair.streamer.on_notifier_poke()
        pair.pump.flush()
        self.assertEqual(delta(*key), 3.0)

    def test_catch_up_rows_counted(self) -> None:
        """Rows fetched by a catch-up count as catch-up rows and as received rows."""
        keys = [
            ("synapse_replication_catch_up_rows_total", {"stream": "typing"}),
            ("synapse_replication_rows_received_total", {"stream": "typing", "instance": _MASTER}),
        ]
        pair = _Pair()
        self.addCleanup(pair.disconnect)
        delta = _Delta(*keys)
        for token in (1, 2, 3):
            pair.source.add(_MASTER, token, _room(f"!{token}"))
        pair.server.send_command(PositionCommand("typing", _MASTER, 3, 3))
        pair.pump.flush()
        self.assertEqual([delta(*k) for k in keys], [3.0, 3.0])


class CatchUpHistogramTests(TypedTestCase):
    def test_catch_up_duration_observed(self) -> None:
        """A catch-up that takes 2 s on the handler's clock lands in the 2.5 s bucket."""
        name = "synapse_replication_catch_up_duration_seconds"
        labels = {"stream": "typing"}
        keys = [
            (f"{name}_count", labels),
            (f"{name}_sum", labels),
            (f"{name}_bucket", {**labels, "le": "1.0"}),
            (f"{name}_bucket", {**labels, "le": "2.5"}),
        ]
        clock, source = Clock(), FakeStreamSource()
        data = TestReplicationDataHandler({("typing", _MASTER): 2})
        handler = ReplicationCommandHandler(
            instance_name=_WORKER,
            clock=clock,
            streams={"typing": TypingStream(_WORKER, source.current_token, source.update_function)},
            data_handler=data,
        )
        conn = FakeConnection(_MASTER)
        handler.new_connection(conn)
        for token in (3, 4, 5):
            source.add(_MASTER, token, _room(f"!{token}"))
        source.block_next()
        delta = _Delta(*keys)
        handler.on_position(conn, PositionCommand("typing", _MASTER, 5, 5))
        clock.advance(2)
        source.release()
        self.assertEqual(data.get_position("typing", _MASTER), 5)
        self.assertEqual([delta(*k) for k in keys], [1.0, 2.0, 0.0, 1.0])


class PositionAndLagTests(TypedTestCase):
    """The reader's positions and its lag behind each writer, read when scraped."""

    def setUp(self) -> None:
        self.registry = CollectorRegistry()
        self.source = FakeStreamSource()
        self.data = BlockingDataHandler()
        self.handler = ReplicationCommandHandler(
            instance_name=_WORKER,
            clock=Clock(),
            streams={
                "typing": TypingStream(
                    _WORKER, self.source.current_token, self.source.update_function
                )
            },
            data_handler=self.data,
        )
        register_replication_collector(self.handler, self.data, self.registry)
        self.conn = FakeConnection(_MASTER)
        self.handler.new_connection(self.conn)
        self.handler.on_position(self.conn, PositionCommand("typing", _MASTER, 5, 5))

    def gauge(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(f"synapse_replication_{name}", labels)

    def fall_behind(self) -> None:
        """Rows 6 and 7 arrive while the data handler is stuck on row 6."""
        self.data.blocking.add("typing")
        for token in (6, 7):
            self.handler.on_rdata(self.conn, RdataCommand("typing", _MASTER, token, _room("!r")))

    def test_position_of_a_writer(self) -> None:
        """The position is the data handler's for that stream and writer."""
        self.assertEqual(self.gauge("stream_position", stream="typing", instance=_MASTER), 5.0)

    def test_blocked_reader_lags(self) -> None:
        """While the data handler is stuck, the position stays and the lag grows."""
        self.fall_behind()
        self.assertEqual(self.gauge("stream_position", stream="typing", instance=_MASTER), 5.0)
        self.assertEqual(self.gauge("stream_lag", stream="typing", instance=_MASTER), 2.0)

    def test_blocked_reader_queues(self) -> None:
        """Commands waiting behind the stuck one show in the command queue gauge."""
        self.fall_behind()
        self.assertEqual(self.gauge("tcp_command_queue", stream_name="typing"), 1.0)

    def test_caught_up_reader_has_no_lag(self) -> None:
        """Once the data handler moves on, the position reaches the writer's and the lag is 0."""
        self.fall_behind()
        self.data.release("typing")
        self.data.release("typing")
        self.assertEqual(self.gauge("stream_position", stream="typing", instance=_MASTER), 7.0)
        self.assertEqual(self.gauge("stream_lag", stream="typing", instance=_MASTER), 0.0)
        self.assertIsNone(self.gauge("tcp_command_queue", stream_name="typing"))

    def test_position_announcement_sets_lag(self) -> None:
        """A POSITION past the reader's position shows as lag until it is caught up."""
        self.source.add(_MASTER, 9, _room("!r"))
        self.source.block_next()
        self.handler.on_position(self.conn, PositionCommand("typing", _MASTER, 9, 9))
        self.assertEqual(self.gauge("stream_lag", stream="typing", instance=_MASTER), 4.0)
        self.source.release()
        self.assertEqual(self.gauge("stream_lag", stream="typing", instance=_MASTER), 0.0)


class ReplicationCollectorTests(TypedTestCase):
    """Registering handlers' collectors: many per registry, held weakly."""

    def make(
        self, registry: CollectorRegistry, position: int = 3
    ) -> tuple[ReplicationCommandHandler, TestReplicationDataHandler]:
        """A reader registered in `registry` whose position for `_MASTER`'s
        typing is `position`."""
        data = TestReplicationDataHandler({("typing", _MASTER): position})
        source = FakeStreamSource()
        handler = ReplicationCommandHandler(
            instance_name=_WORKER,
            clock=Clock(),
            streams={"typing": TypingStream(_WORKER, source.current_token, source.update_function)},
            data_handler=data,
        )
        register_replication_collector(handler, data, registry)
        return handler, data

    def test_many_handlers_in_one_registry(self) -> None:
        """Several handlers register in one registry; a position they all know is the first one's."""
        registry = CollectorRegistry()
        self.readers = [self.make(registry, position) for position in (3, 4, 5)]
        positions = _samples("synapse_replication_stream_position", registry)
        self.assertEqual([s.value for s in positions], [3.0])

    def test_garbage_handler_not_reported(self) -> None:
        """A handler nobody holds any more disappears from the scrape."""
        registry = CollectorRegistry()
        self.make(registry)
        gc.collect()
        self.assertEqual(_samples("synapse_replication_stream_position", registry), [])

    def test_unregister(self) -> None:
        """The function returned by registration stops the reporting."""
        registry = CollectorRegistry()
        data = TestReplicationDataHandler({("typing", _MASTER): 3})
        handler = ReplicationCommandHandler(
            instance_name=_WORKER, clock=Clock(), streams={}, data_handler=data
        )
        unregister = register_replication_collector(handler, data, registry)
        self.assertEqual(len(_samples("synapse_replication_stream_position", registry)), 1)
        unregister()
        self.assertEqual(_samples("synapse_replication_stream_position", registry), [])


class TransportGaugeTests(TypedTestCase):
    """Live connections and their send queues, read when scraped."""

    def test_connections_counted_while_up(self) -> None:
        """A TCP pair counts one server and one client connection until it goes."""
        keys = [
            ("synapse_replication_connections", {"transport": "tcp", "side": "server"}),
            ("synapse_replication_connections", {"transport": "tcp", "side": "client"}),
            ("synapse_replication_tcp_resource_total_connections", {}),
        ]
        delta = _Delta(*keys)
        pair = _Pair()
        self.assertEqual([delta(*k) for k in keys], [1.0, 1.0, 2.0])
        pair.disconnect()
        self.assertEqual([delta(*k) for k in keys], [0.0, 0.0, 0.0])

    def test_pending_commands_while_paused(self) -> None:
        """Commands queued behind a paused transport show per connection, then drain."""
        handler = ReplicationCommandHandler(
            instance_name=_MASTER,
            clock=Clock(),
            streams={},
            data_handler=TestReplicationDataHandler(),
        )
        proto = ServerReplicationProtocol(clock=Clock(), handler=handler, server_name=_SERVER)
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"NAME pending-test-worker\n")
        labels = {"transport": "tcp", "name": "pending-test-worker"}

        def pending() -> list[float]:
            return [
                s.value
                for s in _samples("synapse_replication_tcp_protocol_pending_commands")
                if labels.items() <= s.labels.items()
            ]

        proto.pauseProducing()
        for token in (1, 2, 3):
            proto.send_command(RdataCommand("typing", _MASTER, token, _room("!r")))
        self.assertEqual(pending(), [3.0])
        proto.resumeProducing()
        self.assertEqual(pending(), [0.0])
        proto.connectionLost()
        self.assertEqual(pending(), [])

    def test_redis_publish_queue_pending(self) -> None:
        """Commands waiting for the Redis publisher show as pending, labelled redis."""
        client = RedisReplicationClient(
            reactor=MemoryReactorClock(),
            handler=ReplicationCommandHandler(
                instance_name=_WORKER,
                clock=Clock(),
                streams={},
                data_handler=TestReplicationDataHandler(),
            ),
            server_name=_SERVER,
            instance_name=_WORKER,
            settings=RedisSettings(),
        )

        def redis_queues() -> dict[str, float]:
            return {
                s.labels["conn_id"]: s.value
                for s in _samples("synapse_replication_tcp_protocol_pending_commands")
                if s.labels["transport"] == "redis" and s.labels["name"] == "redis"
            }

        before = redis_queues()
        client.start()
        for _ in range(4):
            client.publish_command(UserIpCommand("@u:x", _TOKEN, "1.2.3.4", "ua", None, 1))
        new = {k: v for k, v in redis_queues().items() if k not in before}
        self.assertEqual(list(new.values()), [4.0])
        self.successResultOf(Deferred.fromCoroutine(client.stop()))
        self.assertEqual({k: v for k, v in redis_queues().items() if k not in before}, {})


class ImportTests(TypedTestCase):
    def test_import_installs_no_reactor(self) -> None:
        """Importing the transports (and so metrics) leaves the reactor to be chosen later."""
        code = (
            "import sys, synapse_replication.tcp, synapse_replication.redis, "
            "synapse_replication.metrics; "
            "sys.exit('twisted.internet.reactor' in sys.modules)"
        )
        subprocess.run([sys.executable, "-c", code], check=True)


class ListenerTests(TestCase):
    """The ``/metrics`` listener, scraped over loopback by a real HTTP client."""

    timeout = 30

    def listen(self, registry: CollectorRegistry = REGISTRY) -> int:
        """Serve `registry` on a free loopback port; returns the port."""
        port = start_metrics_listener(_tcp_reactor, 0, registry=registry)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        self.addCleanup(self._stop, port, address.port)
        return address.port

    async def _stop(self, port: IListeningPort, number: int) -> None:
        stopped = port.stopListening()
        if stopped is not None:
            await stopped
        # Wait for the server side of the scrapes' connections to go.
        await self.until(lambda: not _server_connections(number))

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await deferLater(_time_reactor, 0.005)

    async def scrape(self, port: int) -> str:
        """GET /metrics, as a Prometheus server would; the body as text."""

        def get() -> str:
            url = f"http://127.0.0.1:{port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                body: bytes = response.read()
            return body.decode("utf-8")

        return await deferToThread(get)

    async def test_scrape_parses(self) -> None:
        """A scrape returns the registry's metrics in the text format."""
        registry = CollectorRegistry()
        Counter("test_scraped", "A counter for this test", registry=registry).inc(3)
        text = await self.scrape(self.listen(registry))
        samples = {
            s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
        }
        self.assertEqual(samples["test_scraped_total"], 3.0)

    def test_binds_loopback_by_default(self) -> None:
        """Without a bind address the listener is on 127.0.0.1 only."""
        port = start_metrics_listener(_tcp_reactor, 0, registry=CollectorRegistry())
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        self.assertEqual(address.host, "127.0.0.1")

    async def test_no_secret_exposed(self) -> None:
        """USER_IP flows and is counted, and its access token shows nowhere in a scrape."""
        pair = _Pair()
        self.addCleanup(pair.disconnect)
        register_replication_collector(pair.reader, pair.data)
        pair.client.send_command(UserIpCommand("@u:x", _TOKEN, "1.2.3.4", "ua", None, 1))
        pair.pump.flush()
        self.assertEqual([c.NAME for c in pair.other_commands], ["USER_IP"])
        text = await self.scrape(self.listen())
        self.assertNotIn(_TOKEN, text)
        self.assertNotIn(_TOKEN.encode("ascii").hex(), text)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        inbound = families["synapse_replication_tcp_protocol_inbound_commands"]
        self.assertIn(
            ("USER_IP", "tcp"),
            [(s.labels["command"], s.labels["transport"]) for s in inbound.samples if s.value],
        )


def _server_connections(port: int) -> list[tcp.Server]:
    """The reactor's live server-side connections accepted on `port`."""
    selectables = [*_global_reactor.getReaders(), *_global_reactor.getWriters()]
    return [s for s in selectables if isinstance(s, tcp.Server) and s.getHost().port == port]
