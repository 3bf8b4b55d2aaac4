"""Torture, topologies (c) and (d): PostgreSQL with two writers of `events`
and `receipts` (a `MultiWriterIdGenerator` per stream), a typing writer, and
readers of all three: (c) over loopback TCP, each reader connected to every
writer; (d) through a real redis-server, every instance (writers included)
on the one channel, as `app.py` wires a real deployment.

The event writers follow each other (so that an idle one's position keeps
up) and announce their positions: over TCP each connects to the other with
a second handler that takes only positions; over Redis a writer's own
handler hears the other writer on the channel and its positions move the
writer's id generators. Readers catch the persisted streams up from the
database and typing over HTTP. Faults, on top of those of the SQLite
topologies (cuts, stalled readers, restarts, failing writes, hanging HTTP
requests; over Redis: Redis restarts, connections killed by Redis,
subscribers that stop reading until Redis drops them): a writer's
PostgreSQL backends terminated (``pg_terminate_backend``) in the middle of a
burst of writes, after which the writer must go on writing.
"""

from __future__ import annotations

from typing import Any, Final

from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from synapse_replication.data_handler import (
    ReplicationDataHandler,
    WriterReplicationDataHandler,
)
from synapse_replication.handler import ReplicationCommandHandler
from synapse_replication.http import (
    HttpReplicationClient,
    InstanceLocation,
    ReplicationHttpResource,
    listen_http,
)
from synapse_replication.instance import Notifier, reader_streams
from synapse_replication.storage import MultiWriterIdGenerator, Stores, TypingWriter
from synapse_replication.storage.postgres import open_postgres_stores
from synapse_replication.streamer import ReplicationStreamer
from synapse_replication.streams import (
    EventsStream,
    ReceiptsStream,
    Stream,
    StreamUpdateResult,
    Token,
    TypingStream,
)
from synapse_replication.tcp import (
    Backoff,
    connect_replication_client,
    listen_replication,
)
from tests.postgres_server import fresh_database, terminate_backends
from tests.redis_server import RedisServer, start_redis
from tests.torture import redis_faults, seeds
from tests.torture.ledger import MonitoredHandler
from tests.torture.links import CutPlan, ProtocolProbe
from tests.torture.runner import (
    REACTOR,
    SECRET,
    AnnouncementWatch,
    EventWrites,
    MonitoredRedisClient,
    ProbedClientFactory,
    ProbedServerFactory,
    ReaderNode,
    Scenario,
    StallControl,
    StallingResource,
    Step,
    TrackingSite,
    TypingWrites,
    WriterNode,
    check_logged_errors,
    receipts_rows,
    run_concurrently,
    typing_expectation,
)

_log: Final = Logger(namespace="tests.torture")

SERVER: Final = "torture.local"
EVENTS: Final = EventsStream.NAME
RECEIPTS: Final = ReceiptsStream.NAME
TYPING: Final = TypingStream.NAME
PERSISTED: Final = (EVENTS, RECEIPTS)
EVENT_WRITERS: Final = ("a", "b")
TYPING_WRITER: Final = "t"
ANNOUNCE_EVERY_S: Final = 0.05
PERSIST_INTERVAL_S: Final = 0.02
BACKOFF: Final = Backoff(initial=0.02, maximum=0.2)


async def positions_only(
    instance_name: str, from_token: Token, upto_token: Token, limit: int
) -> StreamUpdateResult:
    """A writer follows the other for its positions only, never its rows."""
    return [], upto_token, False


class PgWriter(WriterNode):
    """What writers `a`, `b` and `t` share: a handler and a streamer,
    reachable over a TCP listener or through Redis."""

    def __init__(self, scenario: PostgresScenario, name: str) -> None:
        self.name = name
        self._scenario = scenario
        self.port = 0
        self.handler: ReplicationCommandHandler | None = None
        self.streamer: ReplicationStreamer | None = None
        self.factory: ProbedServerFactory | None = None
        self._listening: IListeningPort | None = None
        self.redis: MonitoredRedisClient | None = None

    def _serve(self, handler: ReplicationCommandHandler) -> None:
        """Listen on our port, or join the Redis channel."""
        scenario = self._scenario
        self.running = True
        if scenario.redis_server is not None:
            self.redis = redis_faults.start_client(scenario, handler, SERVER, self.name)
            return
        self.factory = ProbedServerFactory(
            monitor=scenario.monitor,
            clock=REACTOR,
            handler=handler,
            server_name=SERVER,
            limits=scenario.connection_limits,
        )
        self._listening = listen_replication(REACTOR, self.port, self.factory)
        self.port = self._listening.getHost().port  # type: ignore[attr-defined]  # an IPv4Address here

    async def _unserve(self) -> None:
        """Stop listening and drop every connection, or leave Redis."""
        self.running = False
        if self._listening is not None:
            await _stop_listening(self._listening)
            self._listening = None
        if self.factory is not None:
            for proto in list(self.factory.connections):
                _abort(proto.transport)
        if self.redis is not None:
            await self.redis.stop()
            self.redis = None

    def busy(self) -> list[str]:
        assert self.streamer is not None
        busy = [f"{self.name} streamer busy"] if not self.streamer.is_idle() else []
        return busy + redis_faults.redis_busy(self.name, self.redis)


class EventWriter(PgWriter):
    """Writer `a` or `b` of events and receipts; follows the other writer."""

    def __init__(self, scenario: PostgresScenario, name: str) -> None:
        super().__init__(scenario, name)
        self.stores: Stores | None = None
        self.streams: dict[str, Stream[Any]] = {}
        self._follower: ProbedClientFactory | None = None
        self.application_name = f"torture-{name}"
        # What it announced, across its restarts (see AnnouncementWatch).
        self.announced: dict[tuple[str, str], int] = {}
        self.announcement_problems: list[str] = []

    async def start(self) -> None:
        scenario = self._scenario
        notifier = Notifier()
        self.stores = stores = await open_postgres_stores(
            {**scenario.conn_args, "application_name": self.application_name},
            self.name,
            REACTOR,
            notifier.poke,
            events_writers=EVENT_WRITERS,
            receipts_writers=EVENT_WRITERS,
            persist_interval_s=PERSIST_INTERVAL_S,
        )
        self.streams = {
            EVENTS: EventsStream(self.name, stores.events.current_token, stores.events.get_updates),
            RECEIPTS: ReceiptsStream(
                self.name, stores.receipts.current_token, stores.receipts.get_updates
            ),
        }
        stream_writers = dict.fromkeys(PERSISTED, EVENT_WRITERS)
        id_gens = {EVENTS: stores.events_id_gen, RECEIPTS: stores.receipts_id_gen}
        advancing = WriterReplicationDataHandler(
            {s: g for s, g in id_gens.items() if isinstance(g, MultiWriterIdGenerator)}
        )
        self.handler = ReplicationCommandHandler(
            instance_name=self.name,
            clock=REACTOR,
            streams=self.streams,
            # Over Redis this handler hears the other writer on the channel
            # and follows it, as a real instance does (over TCP the
            # follower below does).
            data_handler=advancing if scenario.redis_server else ReplicationDataHandler(),
            writer_streams=PERSISTED,
            stream_writers=stream_writers,
        )
        self.streamer = ReplicationStreamer(
            clock=REACTOR,
            command_handler=self.handler,
            streams=list(self.streams.values()),
            announce_positions_every_s=ANNOUNCE_EVERY_S,
        )
        notifier.add(self.streamer.on_notifier_poke)
        AnnouncementWatch(
            self.handler, PERSISTED, self._describe, self.announced, self.announcement_problems
        )
        self._serve(self.handler)
        if scenario.redis_server is not None:
            return
        follower = ReplicationCommandHandler(
            instance_name=self.name,
            clock=REACTOR,
            streams=reader_streams(self.name, dict.fromkeys(PERSISTED, positions_only)),
            data_handler=advancing,
            stream_writers=stream_writers,
        )
        self._follower = _client_factory(scenario, follower, self.name)

    def _describe(self) -> str:
        assert self.stores is not None
        gen = self.stores.events_id_gen
        assert isinstance(gen, MultiWriterIdGenerator)
        return (
            f"events id gen persisted={gen.get_current_token_for_writer(self.name)} "
            f"local={gen.get_local_position()} positions={gen.get_positions()} "
            f"stream last_token={self.streams[EVENTS].last_token}"
        )

    def follow(self, other: EventWriter) -> None:
        """Over TCP: connect to the other writer (over Redis: nothing to do)."""
        if self._follower is not None:
            connect_replication_client(REACTOR, "127.0.0.1", other.port, self._follower)

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.stopTrying()
            for probe in self._follower.probes:
                _abort(probe.proto.transport)
        await self._unserve()
        assert self.streamer is not None and self.stores is not None
        self.streamer.stop()
        await self.streamer.wait_until_idle()
        self.stores.close()

    def current_token(self, stream: str) -> int:
        return self.streams[stream].current_token(self.name)

    def problems(self) -> list[str]:
        return list(self.announcement_problems)


class TypingWriterNode(PgWriter):
    """Writer `t` of typing: no database, an HTTP endpoint for catch-ups."""

    def __init__(self, scenario: PostgresScenario) -> None:
        super().__init__(scenario, TYPING_WRITER)
        self.http_port = 0
        self.typing: TypingWriter | None = None
        self.stream: TypingStream | None = None
        self._http: IListeningPort | None = None
        self._site: TrackingSite | None = None

    async def start(self) -> None:
        scenario = self._scenario
        notifier = Notifier()
        self.typing = typing = TypingWriter(REACTOR, self.name, notifier.poke)
        self.stream = TypingStream(self.name, typing.current_token, typing.get_updates)
        self.handler = ReplicationCommandHandler(
            instance_name=self.name,
            clock=REACTOR,
            streams={TYPING: self.stream},
            data_handler=ReplicationDataHandler(),
            writer_streams=[TYPING],
            stream_writers={TYPING: [self.name]},
        )
        self.streamer = ReplicationStreamer(
            clock=REACTOR, command_handler=self.handler, streams=[self.stream]
        )
        notifier.add(self.streamer.on_notifier_poke)
        resource = ReplicationHttpResource(
            instance_name=self.name, streams={TYPING: self.stream}, secret=SECRET, clock=REACTOR
        )
        self._site = TrackingSite(StallingResource(resource, scenario.stall))
        self._http = listen_http(REACTOR, self.http_port, self._site)
        self.http_port = self._http.getHost().port  # type: ignore[attr-defined]  # an IPv4Address here
        self._serve(self.handler)

    async def stop(self) -> None:
        if self._http is not None:
            await _stop_listening(self._http)
            self._http = None
        await self._unserve()
        assert self._site is not None
        self._site.abort_all()
        assert self.typing is not None and self.streamer is not None
        self.typing.stop()
        await self.streamer.wait_until_idle()

    def current_token(self, stream: str) -> int:
        assert self.typing is not None
        return self.typing.current_token(self.name)


async def _stop_listening(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


def _abort(transport: Any) -> None:
    if transport is not None:
        transport.abortConnection()


def _client_factory(
    scenario: PostgresScenario, handler: ReplicationCommandHandler, name: str
) -> ProbedClientFactory:
    """A TCP client factory for `handler`, of instance `name`."""
    return ProbedClientFactory(
        monitor=scenario.monitor,
        clock=REACTOR,
        handler=handler,
        server_name=SERVER,
        instance_name=name,
        limits=scenario.connection_limits,
        backoff=BACKOFF,
        rand=scenario.io_rng.random,
    )


class PgReader(ReaderNode):
    """A reader connected to `a`, `b` and `t` over TCP, or on the Redis
    channel."""

    def __init__(self, scenario: PostgresScenario, name: str) -> None:
        super().__init__(name)
        self._scenario = scenario
        self.handler: MonitoredHandler | None = None
        self.factories: dict[str, ProbedClientFactory] = {}
        self.redis: MonitoredRedisClient | None = None
        self._stores: Stores | None = None
        self._http: HttpReplicationClient | None = None

    def follows(self) -> dict[str, list[str]]:
        return {EVENTS: list(EVENT_WRITERS), RECEIPTS: list(EVENT_WRITERS), TYPING: [TYPING_WRITER]}

    async def start(self) -> None:
        scenario = self._scenario
        self._stores = stores = await open_postgres_stores(
            {**scenario.conn_args, "application_name": f"torture-{self.name}"},
            self.name,
            REACTOR,
            lambda: None,
            events_writers=EVENT_WRITERS,
            receipts_writers=EVENT_WRITERS,
            pool_size=2,
        )
        typing_writer = scenario.typing_writer
        self._http = HttpReplicationClient(
            REACTOR,
            {TYPING_WRITER: InstanceLocation("127.0.0.1", typing_writer.http_port)},
            SECRET,
            timeout_s=0.4,
            retries=2,
            backoff=Backoff(initial=0.02, maximum=0.1),
            rand=scenario.io_rng.random,
            pool=HTTPConnectionPool(REACTOR, persistent=False),
        )
        sources = {
            EVENTS: stores.events.get_updates,
            RECEIPTS: stores.receipts.get_updates,
            TYPING: self._http.update_function(TYPING),
        }
        self.handler = MonitoredHandler(
            monitor=scenario.monitor,
            instance_name=self.name,
            clock=REACTOR,
            streams=reader_streams(self.name, sources),
            data_handler=self.new_data_handler(),
            stream_writers=self.follows(),
            limits=scenario.handler_limits,
        )
        self.running = True
        if scenario.redis_server is not None:
            self.redis = redis_faults.start_client(scenario, self.handler, SERVER, self.name)
            return
        for writer in scenario.all_writers():
            factory = _client_factory(scenario, self.handler, self.name)
            self.factories[writer.name] = factory
            connect_replication_client(REACTOR, "127.0.0.1", writer.port, factory)

    async def stop(self) -> None:
        self.running = False
        self.kill_data_handler()
        for factory in self.factories.values():
            factory.stopTrying()
            for probe in factory.probes:
                _abort(probe.proto.transport)
        if self.redis is not None:
            await self.redis.stop()
            self.redis = None
        assert self._http is not None and self._stores is not None
        await self._http.close()
        self._stores.close()

    def probe_to(self, writer: str) -> ProtocolProbe | None:
        factory = self.factories.get(writer)
        if factory is None or self.handler is None:
            return None
        live = self.handler.connections()
        return next((p for p in reversed(factory.probes) if p.proto in live), None)

    def connected(self) -> bool:
        if self._scenario.redis_server is not None:
            handler = self.handler
            return handler is not None and handler.connected() and redis_faults.redis_connected(self.redis)
        return all(self.probe_to(name) is not None for name in self.factories)

    def busy(self) -> list[str]:
        if self.handler is not None and not self.handler.is_idle():
            return [f"{self.name} handler busy"]
        return []


class PostgresScenario(Scenario):
    """One randomized run of topology (c), or (d) with `redis`."""

    def __init__(
        self, case: TestCase, seed: int, steps: int, redis: RedisServer | None = None
    ) -> None:
        super().__init__(case, seed, steps)
        self.redis_server = redis
        self.redis_settings = None if redis is None else redis_faults.torture_settings(redis)
        self.conn_args = fresh_database(case)
        self.stall = StallControl()
        self.event_writers = {name: EventWriter(self, name) for name in EVENT_WRITERS}
        self.typing_writer = TypingWriterNode(self)
        self.writers.update(self.event_writers)
        self.writers[TYPING_WRITER] = self.typing_writer
        self.writes = {
            name: EventWrites(
                self.rng,
                SERVER,
                [f"!{name}{i}:{SERVER}" for i in range(3)],
                lambda w=writer: self._stores(w).events,  # type: ignore[misc]  # a lambda with a default
                lambda w=writer: self._stores(w).receipts,  # type: ignore[misc]  # a lambda with a default
                name,
            )
            for name, writer in self.event_writers.items()
        }
        self.typing = TypingWrites(self.rng, SERVER, self._typing)

    def all_writers(self) -> list[EventWriter | TypingWriterNode]:
        return [*self.event_writers.values(), self.typing_writer]

    @staticmethod
    def _stores(writer: EventWriter) -> Stores:
        assert writer.stores is not None
        return writer.stores

    def _typing(self) -> TypingWriter:
        assert self.typing_writer.typing is not None
        return self.typing_writer.typing

    async def setup(self) -> None:
        if self.redis_server is not None:
            await redis_faults.configure_redis(self.redis_server)
        for writer in self.all_writers():
            await writer.start()
        a, b = self.event_writers["a"], self.event_writers["b"]
        a.follow(b)
        b.follow(a)
        for i in range(self.rng.randint(2, 3)):
            reader = PgReader(self, f"reader{i + 1}")
            self.readers.append(reader)
            await reader.start()
        await self.settle()

    async def teardown(self) -> None:
        self.count("http requests stalled", self.stall.stalled)
        self.count("writes rolled back", sum(w.failed_writes for w in self.writes.values()))
        for reader in self.readers:
            if reader.running:
                await reader.stop()
        for writer in self.all_writers():
            if writer.running:
                await writer.stop()
        await deferLater(REACTOR, 0.05, lambda: None)

    async def store_rows(
        self, stream: str, writer: str, after: int, upto: int
    ) -> list[tuple[int, Any]]:
        stores = self._stores(self.event_writers[writer])
        if stream == EVENTS:
            raw = await stores.events.get_all_rows_unpaged(writer)
            return [(t, EventsStream.parse_row(r)) for t, r in raw if after < t <= upto]
        return await receipts_rows(stores.db, writer, after, upto)

    def typing_rows(self, writer: str, after: int) -> dict[str, tuple[str, ...]]:
        return typing_expectation(self._typing(), writer, after)

    def bounds_problems(self) -> list[str]:
        problems = super().bounds_problems()
        for writer in self.event_writers.values():
            problems += writer.problems()
        return problems

    def make_schedule(self) -> list[Step]:
        rng = self.rng
        kinds = {
            "write": 40,
            "burst": 8,
            "typing": 10,
            "quiet": 6,
            "cut": 7,
            "pause": 2,
            "terminate": 4,
            "restart_reader": 2,
            "restart_writer": 3,
            "stall_http": 3,
            "redis_restart": 2 if self.redis_server is not None else 0,
            "redis_kill": 4 if self.redis_server is not None else 0,
        }
        instances = [*self.writers, *(r.name for r in self.readers)]
        schedule = []
        for _ in range(self.n_steps):
            kind = rng.choices(list(kinds), list(kinds.values()))[0]
            reader = rng.choice(self.readers).name
            writer = rng.choice(EVENT_WRITERS)
            if kind == "write":
                schedule.append(Step(kind, (writer,)))
            elif kind == "burst":
                schedule.append(
                    Step(kind, tuple(rng.choice(EVENT_WRITERS) for _ in range(rng.randint(2, 8))))
                )
            elif kind == "typing":
                schedule.append(Step(kind, (rng.randint(1, 5),)))
            elif kind == "cut":
                target = rng.choice((*EVENT_WRITERS, TYPING_WRITER))
                mode = rng.choice(("bytes", "batch"))
                schedule.append(Step(kind, (reader, target, mode, rng.randint(1, 4000))))
            elif kind == "pause":
                schedule.append(Step(kind, (reader, writer)))
            elif kind == "terminate":
                schedule.append(Step(kind, (writer, rng.randint(4, 12), rng.uniform(0, 0.01))))
            elif kind == "restart_reader":
                schedule.append(Step(kind, (reader, rng.randint(0, 3))))
            elif kind == "restart_writer":
                schedule.append(Step(kind, (rng.choice((*EVENT_WRITERS, TYPING_WRITER)),)))
            elif kind == "stall_http":
                schedule.append(Step(kind, (rng.randint(1, 3),)))
            elif kind == "redis_kill":
                which = rng.choice(("subscriber", "publisher"))
                schedule.append(Step(kind, (rng.choice(instances), which)))
            else:
                schedule.append(Step(kind))
        return schedule

    def _reader(self, name: str) -> PgReader:
        reader = next(r for r in self.readers if r.name == name)
        assert isinstance(reader, PgReader)
        return reader

    async def execute(self, step: Step) -> None:
        kind = step.kind
        if kind == "write":
            await self.writes[step.args[0]].random_write()
        elif kind == "burst":
            results = await run_concurrently([self.writes[w].random_write for w in step.args])
            for result in results:
                if not isinstance(result, str):
                    result.raiseException()
        elif kind == "typing":
            for _ in range(step.args[0]):
                self.typing.random_change()
        elif kind == "quiet":
            await self.settle_and_check("a quiet period")
        elif kind == "cut":
            name, target, mode, after = step.args
            reader = self._reader(name)
            probe = reader.probe_to(target)
            if probe is not None:
                probe.arm(CutPlan(mode, after))
            elif reader.running and reader.redis is not None:
                redis_faults.cut_subscriber(self, reader.redis)
        elif kind == "pause":
            await self._pause(self._reader(step.args[0]), step.args[1])
        elif kind == "terminate":
            await self._terminate(*step.args)
        elif kind == "restart_reader":
            reader = self._reader(step.args[0])
            await reader.stop()
            for _ in range(step.args[1]):
                await self.writes[self.rng.choice(EVENT_WRITERS)].random_write()
            await reader.start()
        elif kind == "restart_writer":
            await self._restart_writer(step.args[0])
        elif kind == "stall_http":
            self.stall.stall_next += step.args[0]
        elif kind == "redis_restart":
            assert self.redis_server is not None
            await redis_faults.restart_redis(self.redis_server)
        elif kind == "redis_kill":
            assert self.redis_server is not None
            name, which = step.args
            node = self.writers.get(name) or self._reader(name)
            assert isinstance(node, PgWriter | PgReader)
            await redis_faults.kill_connection(self, self.redis_server, node.redis, which)
        else:
            raise AssertionError(f"unknown step {step}")

    async def _restart_writer(self, name: str) -> None:
        writer = self.writers[name]
        await writer.stop()
        await deferLater(REACTOR, self.io_rng.uniform(0.0, 0.1), lambda: None)
        await writer.start()
        if isinstance(writer, EventWriter):
            other = self.event_writers["b" if name == "a" else "a"]
            writer.follow(other)
        # Typing restarts from 0: readers must see it before it moves on.
        await self.settle_and_check(f"a restart of {name}")

    async def _pause(self, reader: PgReader, writer: str) -> None:
        if reader.redis is not None:
            await redis_faults.stall_subscriber(
                self, reader.redis, lambda: self.writes[writer].bulk(self.rng.randint(100, 150))
            )
            return
        probe = reader.probe_to(writer)
        if probe is None:
            return
        transport: Any = probe.proto.transport
        before = self.monitor.failed_to_keep_up
        transport.pauseProducing()
        try:
            for _ in range(8):
                await self.writes[writer].bulk(self.rng.randint(60, 150))
                if self.monitor.failed_to_keep_up > before:
                    break
            await deferLater(REACTOR, 0.6, lambda: None)
        finally:
            transport.resumeProducing()

    async def _terminate(self, name: str, writes: int, delay: float) -> None:
        """A burst of writes on `name`, during which its PostgreSQL backends
        are terminated; then `name` must write again."""
        writer = self.event_writers[name]
        burst = run_concurrently([self.writes[name].random_write] * writes)

        async def kill() -> int:
            await deferLater(REACTOR, delay, lambda: None)
            return await deferToThread(
                terminate_backends, self.conn_args, writer.application_name
            )

        killed, results = await run_concurrently([kill, lambda: burst])
        self.count("backends terminated", killed if isinstance(killed, int) else 0)
        if isinstance(results, list):
            failed = sum(not isinstance(r, str) for r in results)
            self.count("writes failed by a terminated backend", failed)
        # The writer recovers: a few writes may still meet a connection
        # that died, but then every write succeeds.
        failures = 0
        succeeded = 0
        while succeeded < 3:
            try:
                await self.writes[name].random_write()
                succeeded += 1
            except Exception as e:
                failures += 1
                self.count("writes that met a dead connection afterwards")
                if failures > 10:
                    raise AssertionError(f"{name} does not recover from terminated backends: {e}") from e


class PostgresTortureTests(TestCase):
    """Topologies (c) and (d) under random schedules."""

    timeout = 3600 if seeds.long_mode() else 240

    async def _torture(self, base: int, redis: RedisServer | None) -> None:
        steps = seeds.schedule_length(60, 200)

        async def one(seed: int) -> None:
            scenario = PostgresScenario(self, seed, steps, redis)
            await scenario.run()
            check_logged_errors(self, seed)

        await seeds.run_seeds(self.id(), seeds.seeds(base, 4, 10), one)

    async def test_two_event_writers_and_a_typing_writer(self) -> None:
        """Readers of two event writers and a typing writer end with every row once and in order."""
        await self._torture(4000, None)

    async def test_two_event_writers_and_a_typing_writer_through_redis(self) -> None:
        """The same with every instance, writers included, replicating through Redis."""
        await self._torture(5000, await start_redis(self, REACTOR))
